"""master_weights=True: 16-bit parameters are updated through fp32 masters, exactly as an
fp32 run on the same gradients, and rounded into the parameters after every step."""
import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR

from optim_db import BACKEND_DTYPES

CASES = [(backend, dtype) for backend in cblr_ext.available_backends("cpu")
         for dtype in (torch.bfloat16, torch.float16)
         if backend == "reference" or dtype in BACKEND_DTYPES.get(backend, ())]
SHAPES = [(16, 8), (16,), (4, 4, 3)]


@pytest.mark.parametrize("cls", [LARS, MCLR])
@pytest.mark.parametrize("backend,dtype", CASES)
def test_master_weights_follow_an_fp32_run(cls, backend, dtype):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    low = [torch.nn.Parameter(w.clone()) for w in start]
    full = [torch.nn.Parameter(w.float()) for w in start]
    kwargs = dict(lr=2.0, momentum=0.9, weight_decay=5e-3, backend=backend)
    opt_low, opt_full = cls(low, master_weights=True, **kwargs), cls(full, **kwargs)
    for _ in range(5):
        for p, q in zip(low, full):
            g = torch.randn(p.shape, generator=gen).to(dtype)  # gradients as a 16-bit model yields them
            p.grad, q.grad = g, g.float()
        opt_low.step()
        opt_full.step()
        for p, q in zip(low, full):
            assert torch.equal(opt_low.state[p]["master"], q.detach())
            assert p.dtype == dtype and torch.equal(p.detach(), q.detach().to(dtype))
    # The masters are checkpointed and come back as fp32.
    again = cls(low, master_weights=True, **kwargs)
    again.load_state_dict(opt_low.state_dict())
    assert all(again.state[p]["master"].dtype == torch.float32 for p in low)


def test_a_16_bit_run_without_masters_drifts_from_fp32():
    """Why masters: at lr·r ≈ 2e-3 most bf16 updates round away."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen)
    low, full = torch.nn.Parameter(w.bfloat16()), torch.nn.Parameter(w.bfloat16().float())
    opt_low, opt_full = LARS([low], lr=2.0, backend="reference"), LARS([full], lr=2.0, backend="reference")
    for _ in range(5):
        g = torch.randn(64, 64, generator=gen).bfloat16()
        low.grad, full.grad = g, g.float()
        opt_low.step()
        opt_full.step()
    assert not torch.equal(low.detach(), full.detach().bfloat16())


def cblr_run(backend, dtype, steps=6):
    """CBLR with masters on ½‖w − c‖² (κ = 1): the closure evaluates the 16-bit parameters."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter((torch.rand(32, 16, generator=gen) + 0.5).to(dtype))
    centre = torch.rand(32, 16, generator=gen)
    opt = CBLR([w], lr=0.5, momentum=0.9, weight_decay=0.0, master_weights=True, backend=backend)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w.float() - centre).square().sum()
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    return w, opt


@pytest.mark.parametrize("backend,dtype", CASES)
def test_cblr_with_master_weights_follows_the_reference_and_measures_the_curvature(backend, dtype):
    w, opt = cblr_run(backend, dtype)
    w_ref, opt_ref = cblr_run("reference", dtype)
    master, master_ref = opt.state[w]["master"], opt_ref.state[w_ref]["master"]
    assert master.dtype == torch.float32
    assert ((master - master_ref).abs().max() / master_ref.abs().max()).item() <= 1e-6
    assert torch.equal(w.detach(), master.to(dtype))
    stats = opt.layer_stats()["0.0"]
    assert not stats["fallback"] and abs(stats["kappa"] - 1.0) <= 1e-2, stats
