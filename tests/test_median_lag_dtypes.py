"""The MCLR median against torch.median, the approx median's bound, the lag=1
variant, and low-precision parameters."""
import math

import pytest
import torch

from cblr_ext import LARS, MCLR


def quotients(w, g, beta):
    d = g + w * beta
    keep = w != 0
    return d.abs()[keep] / w.abs()[keep]


@pytest.mark.parametrize("shape", [(7, 3), (8, 4), (1, 1), (33, 5, 3, 3)])
@pytest.mark.parametrize("beta", [0.0, 1e-2])
def test_mclr_kappa_is_torch_median_of_the_quotients(shape, beta):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape)
    w.view(-1)[::5] = 0.0  # zero weights are left out
    g = torch.randn(shape)
    eps = 1e-8
    p = torch.nn.Parameter(w.clone())
    opt = MCLR([p], lr=1.0, weight_decay=beta, eps=eps, backend="reference")
    p.grad = g.clone()
    opt.step()
    q = quotients(w, g, beta)
    got = opt.layer_stats()["0.0"]["kappa"]
    if q.numel() and torch.median(q) > 0:
        assert got == float(torch.median(q).double() + eps)  # the fp32 median, then fp64, bit for bit
    else:
        assert math.isnan(got)


def test_approx_median_truncates_to_8_significant_bits():
    torch.manual_seed(3)
    w, g = torch.randn(101, 7), torch.randn(101, 7)
    p = torch.nn.Parameter(w.clone())
    opt = MCLR([p], lr=1.0, eps=0.0, median="approx", backend="reference")
    p.grad = g.clone()
    opt.step()
    exact = float(torch.median(quotients(w, g, 0.0)))
    got = opt.layer_stats()["0.0"]["kappa"]
    assert got <= exact and (exact - got) / exact < 2 ** -7
    mantissa = torch.tensor(got, dtype=torch.float32).view(torch.int32).item() & 0xFFFF
    assert mantissa == 0


def test_lars_lag1_uses_the_previous_steps_norms():
    w0, g1, g2 = [3.0, 4.0], [0.6, 0.8], [0.0, 2.0]
    eta, lr = 0.01, 1.0
    p = torch.nn.Parameter(torch.tensor([w0]))
    opt = LARS([p], lr=lr, trust_coefficient=eta, eps=0.0, lag=1, backend="reference")
    p.grad = torch.tensor([g1])
    opt.step()  # no lagged measurement yet: the current inputs
    r1 = eta * 5.0 / 1.0
    w1 = [wi - lr * r1 * gi for wi, gi in zip(w0, g1)]
    assert p.detach().reshape(-1).tolist() == pytest.approx(w1, rel=1e-6)
    p.grad = torch.tensor([g2])
    opt.step()  # ratio from (w0, g1), not (w1, g2)
    w2 = [wi - lr * r1 * gi for wi, gi in zip(w1, g2)]
    assert p.detach().reshape(-1).tolist() == pytest.approx(w2, rel=1e-6)
    s = opt.layer_stats()["0.0"]
    assert s["w_norm"] == pytest.approx(5.0) and s["g_norm"] == pytest.approx(1.0)
    # what step 3 will use: (w1, g2)
    lagged = opt.state[p]["lagged"]
    assert lagged.tolist() == pytest.approx([math.hypot(*w1), 2.0, 2.0 / math.hypot(*w1)], rel=1e-6)


def test_mclr_lag1_matches_exact_one_step_later():
    """Under lag=1, step t's ratio is what the exact rule computed at step t−1."""
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    grads = [torch.randn(6, 5) for _ in range(4)]
    lagged_p, exact_p = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    lagged = MCLR([lagged_p], lr=1.0, lag=1, backend="reference")
    exact = MCLR([exact_p], lr=1.0, backend="reference")
    ratios_lagged, ratios_exact = [], []
    for g in grads:
        for p, opt, out in ((lagged_p, lagged, ratios_lagged), (exact_p, exact, ratios_exact)):
            p.grad = g.clone()
            opt.step()
            out.append(opt.layer_stats()["0.0"]["ratio"])
        exact_p.data.copy_(lagged_p)  # same inputs for both next step
    assert ratios_lagged[0] == ratios_exact[0]
    assert ratios_lagged[1:] == pytest.approx(ratios_exact[:-1], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_use_fp32_math_and_state(dtype):
    torch.manual_seed(0)
    w, g = torch.randn(8, 8), torch.randn(8, 8)
    low = torch.nn.Parameter(w.to(dtype))
    high = torch.nn.Parameter(w.to(dtype).float())
    opt_low = MCLR([low], lr=2.0, momentum=0.9, weight_decay=1e-3, backend="reference")
    opt_high = MCLR([high], lr=2.0, momentum=0.9, weight_decay=1e-3, backend="reference")
    for _ in range(3):
        low.grad, high.grad = g.to(dtype), g.to(dtype).float()
        opt_low.step()
        opt_high.step()
        assert low.dtype == dtype
        assert opt_low.state[low]["momentum_buffer"].dtype == torch.float32
        # same fp32 step, rounded once to the parameter's dtype
        assert torch.equal(low, high.detach().to(dtype))
        high.data.copy_(low.float())
