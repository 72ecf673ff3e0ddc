"""LAMB and the median rule on the Adam direction with backend="cuda" (csrc/cuda/adam.cu).

On a GPU: LAMB against the fp64 formula of tests/test_lamb.py over 20 steps, the ops
element-wise against the reference kernels (backends/reference_adam.py, on the same GPU)
on layers around the CUDA chunk size (16384 elements) and at an unaligned address,
bit-identical to the C++ kernels where both are exact (no bias correction: no powf; no
ratio: α = γ), a skipped step that writes nothing, GradScaler's unscaling in the kernel,
opcheck, bad input refused before anything is written, and no host sync in a warm step.
Without a GPU and the CUDA extension those skip; what runs everywhere: the backend is
accepted by LAMB and, where it cannot run, refused with its reason.

Where the kernels and the reference may differ: the per-layer sums are fp64 in another
order (so the ratio, and w through it, agree to a relative 1e-6), and 1 − β^t comes
from the device's powf, which is not correctly rounded; m, v and the step count depend on
neither and are compared bit for bit.
"""
import pytest
import torch

from cblr_ext import LAMB, backends, ops
from cblr_ext.contract import ADAM_OPS, FLAG_MEDIAN, FLAG_NORMS
from cblr_ext.lamb import ADAM_BACKENDS
from test_lamb import _adam_state, _problem, lamb_formula

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or ops.cuda_kernels() != "cuda",
                                reason="needs a CUDA GPU and the CUDA extension (cblr_ext._C_cuda)")
CHUNK = 256 * 4 * 16  # csrc/cuda/kernels.h: kChunk
HP = (0.9, 0.999, 1e-6, 0.01, True)  # beta1, beta2, eps, weight_decay, bias_correction


# ------------------------------------------------------------------ CPU

def test_lamb_takes_the_cuda_backend():
    assert "cuda" in ADAM_BACKENDS
    LAMB([torch.nn.Parameter(torch.zeros(3))], backend="cuda")  # accepted at construction


@pytest.mark.skipif(ops.cuda_kernels() == "cuda", reason="the CUDA extension is loaded here")
def test_cuda_backend_is_refused_with_its_reason_where_it_cannot_run():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = LAMB([p], backend="cuda")
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


# ------------------------------------------------------------------ GPU

def _cuda_run(ws, grads, **kwargs):
    params = [torch.nn.Parameter(x.cuda()) for x in ws]
    opt = LAMB(params, backend="cuda", **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.cuda()
        opt.step()
    return params, opt


@needs_cuda
def test_cuda_registers_every_adam_op():
    for name in ADAM_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{name}", "CUDA"), name
    assert backends.why_unavailable("cuda", "cuda") is None


@needs_cuda
@pytest.mark.parametrize("case", [
    dict(weight_decay=0.01),
    dict(weight_decay=0.1, max_grad_norm=1.0),
    dict(weight_decay=0.01, bias_correction=False, max_ratio=0.5),
    dict(weight_decay=0.05, rule="mclr", trust=0.02),
])
def test_matches_the_formula_over_20_steps(case):
    ws, grads = _problem(0, scale=3.0)
    formula = dict(case)
    trust = formula.pop("trust", 1.0)
    expected = lamb_formula(ws, grads, 0.01, (0.9, 0.999), 1e-6, trust=trust, **formula)
    options = {k: v for k, v in case.items() if k != "trust"}
    params, opt = _cuda_run(ws, grads, lr=0.01, eps=1e-6, trust_coefficient=trust,
                            **dict(dict(max_grad_norm=None), **options))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().cpu().double(), e, rtol=1e-6, atol=1e-6)
    assert opt.skipped_steps == 0
    assert all(s["step"].item() == 20 for s in opt.state.values())


def _layers(sizes, dtype, seed, device, offset=0):
    """w, m, v, step of each layer (test_lamb._adam_state) on ``device``; ``offset`` > 0
    places every tensor that many elements into a larger buffer (an unaligned address)."""
    def placed(t):
        buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
        view = buffer[offset:]
        view.copy_(t)
        return view
    states = [_adam_state(n, dtype, seed + i) for i, n in enumerate(sizes)]
    ws, ms, vs, steps = ([placed(s[k]) if k < 3 else s[k].to(device) for s in states] for k in range(4))
    gen = torch.Generator().manual_seed(seed + 100)
    grads = [placed((torch.randn(n, generator=gen, dtype=torch.float64) * 64).to(dtype)) for n in sizes]
    return ws, grads, ms, vs, steps


def _step(kernels, rule, sizes, dtype, device, grad_scale, clip, found_inf=False, adapt=True, hp=HP, offset=0):
    """(w, m, v, steps, the reduction, the statistics) after one step of ``kernels``."""
    ws, grads, ms, vs, steps = _layers(sizes, dtype, 11, device, offset)
    to = (lambda t: None if t is None else t.to(device))
    red = kernels.adam_reduce(rule, ws, grads, ms, vs, steps, to(grad_scale), to(clip), *hp)
    stats = kernels.adam_update_(rule, ws, grads, ms, vs, steps, [adapt] * len(ws), *red,
                                 torch.tensor(found_inf, device=device), to(grad_scale), to(clip),
                                 torch.tensor(0.02, device=device), *hp, 1.0, None)
    return ws, ms, vs, steps, red, stats


@needs_cuda
@pytest.mark.parametrize("rule", ["lars", "mclr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scaled_and_clipped", [False, True])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_matches_the_reference_element_wise_across_the_chunk_boundary(rule, dtype, scaled_and_clipped, offset):
    """One step on layers of a chunk ± 1 element and of two chunks and one (the last chunk
    holds 1 element), and a small one, against the reference kernels on the same GPU."""
    sizes = [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 10]
    grad_scale = torch.tensor([64.0]) if scaled_and_clipped else None
    clip = torch.tensor(1.7) if scaled_and_clipped else None
    got = _step(ops.OPS, rule, sizes, dtype, "cuda", grad_scale, clip, offset=offset)
    want = _step(ops.REFERENCE_OPS, rule, sizes, dtype, "cuda", grad_scale, clip)
    for name, a, b in zip(("exp_avg", "exp_avg_sq", "step"), got[1:4], want[1:4]):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    ulp = 1e-6 if dtype == torch.float32 else 1e-2  # 16-bit w: within one rounding
    for x, y in zip(got[0], want[0]):
        torch.testing.assert_close(x.double(), y.double(), rtol=ulp, atol=ulp * float(y.abs().max()))
    (sums, median, flags), (sums_want, median_want, flags_want) = got[4], want[4]
    torch.testing.assert_close(sums, sums_want, rtol=1e-6, atol=0)
    assert torch.equal(flags, flags_want)
    torch.testing.assert_close(median, median_want, rtol=1e-6, atol=0)
    if rule == "mclr":
        assert (median > 0).all()
    torch.testing.assert_close(got[5], want[5], rtol=1e-6, atol=0, equal_nan=True)


@needs_cuda
@pytest.mark.parametrize("rule", ["lars", "mclr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_bit_identical_to_the_cpp_kernels_where_both_are_exact(rule, dtype):
    """Without bias correction (no powf) and without a ratio (α = γ), every element is a
    chain of correctly rounded fp32 operations in the same order on both: w, m, v, the
    step count and the median are the same bits; the fp64 sums differ in order only."""
    sizes = [CHUNK + 1, 777]
    hp = HP[:4] + (False,)
    scale, clip = torch.tensor([64.0]), torch.tensor(1.7)
    got = _step(ops.OPS, rule, sizes, dtype, "cuda", scale, clip, adapt=False, hp=hp)
    want = _step(ops.OPS, rule, sizes, dtype, "cpu", scale, clip, adapt=False, hp=hp)
    for name, a, b in zip(("w", "exp_avg", "exp_avg_sq", "step"), got[:4], want[:4]):
        assert all(torch.equal(x.cpu(), y) for x, y in zip(a, b)), name
    assert torch.equal(got[4][1].cpu(), want[4][1])
    torch.testing.assert_close(got[4][0].cpu(), want[4][0], rtol=1e-12, atol=0)


@needs_cuda
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_skipped_step_writes_nothing_and_reports_the_step_it_would_take(rule):
    sizes = [CHUNK + 5, 9]
    skipped = _step(ops.OPS, rule, sizes, torch.float32, "cuda", None, None, found_inf=True)
    want = _step(ops.REFERENCE_OPS, rule, sizes, torch.float32, "cuda", None, None, found_inf=True)
    before = _layers(sizes, torch.float32, 11, "cuda")
    for got, fresh in zip((skipped[0], skipped[1], skipped[2], skipped[3]), (before[0], before[2], before[3],
                                                                            before[4])):
        assert all(torch.equal(a, b) for a, b in zip(got, fresh))
    assert (skipped[5][:, 2] == 0).all()
    torch.testing.assert_close(skipped[5], want[5], rtol=1e-6, atol=0, equal_nan=True)


@needs_cuda
def test_lamb_skips_a_nonfinite_step_bit_identically():
    ws, grads = _problem(4, steps=3)
    params, opt = _cuda_run(ws, grads[:2], lr=0.01, weight_decay=0.01)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for i, (p, g) in enumerate(zip(params, grads[2])):
        p.grad = g.cuda()
        if i == 1:
            p.grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.equal(v, saved[k]) for p, saved in zip(params, state) for k, v in opt.state[p].items())
    assert all(opt.state[p]["step"].item() == 2 for p in params)


@needs_cuda
def test_a_reduction_without_norms_or_median_is_completed_by_the_update():
    sizes = [CHUNK + 3, 33]
    results = []
    for kernels in (ops.OPS, ops.REFERENCE_OPS):
        ws, grads, ms, vs, steps = _layers(sizes, torch.float32, 40, "cuda")
        sums = torch.zeros(2, 4, dtype=torch.float64, device="cuda")
        flags = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
        assert not flags[:, FLAG_NORMS].any() and not flags[:, FLAG_MEDIAN].any()
        stats = kernels.adam_update_("mclr", ws, grads, ms, vs, steps, [True, True], sums,
                                     torch.zeros(2, device="cuda"), flags, torch.tensor(False, device="cuda"), None,
                                     None, torch.tensor(0.01), *HP, 1.0, None)
        results.append((ws, stats))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_cuda
def test_grad_scaler_unscales_in_the_kernel():
    """LAMB under torch.amp.GradScaler: the same steps as the reference backend's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")
    results = []
    for backend in ("cuda", "reference"):
        net = torch.nn.Sequential(*[torch.nn.Linear(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                                    else torch.nn.Tanh() for m in model]).cuda()
        net.load_state_dict(model.state_dict())
        opt = LAMB(net.parameters(), lr=0.01, backend=backend)
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        for _ in range(5):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_adam_ops_pass_opcheck(rule, dtype):
    ws, grads, ms, vs, steps = _layers([30, CHUNK + 7], dtype, 60, "cuda")
    scale, clip = torch.tensor([4.0], device="cuda"), torch.tensor(1.5, device="cuda")
    torch.library.opcheck(ops.OPS.grad_sq_sums.default, (grads, scale))
    reduce_args = (rule, ws, grads, ms, vs, steps, scale, clip, *HP)
    torch.library.opcheck(ops.OPS.adam_reduce.default, reduce_args)
    red = ops.OPS.adam_reduce(*reduce_args)
    for found_inf in (False, True):
        torch.library.opcheck(ops.OPS.adam_update_.default,
                              (rule, [w.clone() for w in ws], grads, [m.clone() for m in ms],
                               [v.clone() for v in vs], [s.clone() for s in steps], [True, True], *red,
                               torch.tensor(found_inf, device="cuda"), scale, clip, torch.tensor(0.01), *HP, 1.0, 2.0))


@needs_cuda
def test_grad_sq_sums_and_the_nonfinite_flag():
    grads = [torch.randn(100, device="cuda"), torch.randn(CHUNK + 1, device="cuda")]
    expected = torch.stack([(g.double() * 0.125).square().sum() for g in grads])
    torch.testing.assert_close(ops.OPS.grad_sq_sums(grads, torch.tensor([8.0], device="cuda")), expected,
                               rtol=1e-12, atol=0)
    ws, _, ms, vs, steps = _layers([100, CHUNK + 1], torch.float32, 20, "cuda")
    grads[1][CHUNK] = float("inf")
    _, _, flags = ops.OPS.adam_reduce("lars", ws, grads, ms, vs, steps, None, None, *HP)
    assert flags[:, 3].tolist() == [False, True]
    assert flags[:, :2].all() and not flags[:, 2].any()


@needs_cuda
@pytest.mark.parametrize("bad, message", [
    (lambda a: a.__setitem__(3, [torch.zeros(4, device="cuda", dtype=torch.float16)] * 2), "exp_avg of layer 0"),
    (lambda a: a.__setitem__(5, [torch.zeros(2, device="cuda"), torch.zeros((), device="cuda")]), "step of layer 0"),
    (lambda a: a.__setitem__(7, torch.tensor(1.5)), "clip must be a one-element fp32"),
    (lambda a: a.__setitem__(0, "cblr"), "runs the rules lars and mclr"),
    (lambda a: a.__setitem__(1, [torch.zeros(4, device="cuda", dtype=torch.float64)] * 2), "float32, float16"),
])
def test_bad_input_is_refused_before_writing(bad, message):
    ws = [torch.randn(4, device="cuda", dtype=torch.float16), torch.randn(3, device="cuda")]
    grads = [torch.randn(4, device="cuda", dtype=torch.float16), torch.randn(3, device="cuda")]
    moments = [torch.zeros(4, device="cuda"), torch.zeros(3, device="cuda")]
    steps = [torch.zeros((), device="cuda"), torch.zeros((), device="cuda")]
    args = ["lars", ws, grads, moments, [m.clone() for m in moments], steps, None, None, *HP]
    red = ops.REFERENCE_OPS.adam_reduce(*args)
    bad(args)
    before = [w.clone() for w in ws]
    with pytest.raises(RuntimeError, match=message):
        ops.OPS.adam_reduce(*args)
    with pytest.raises(RuntimeError, match=message):
        ops.OPS.adam_update_(*args[:6], [True, True], *red, torch.tensor(False, device="cuda"), *args[6:8],
                             torch.tensor(0.1), *args[8:], 1.0, None)
    assert all(torch.equal(a, b) for a, b in zip(ws, before))
    assert all(s.item() == 0 for s in steps)


@needs_cuda
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_warm_step_makes_no_host_sync(rule):
    gen = torch.Generator("cuda").manual_seed(0)
    params = [torch.randn(s, generator=gen, device="cuda").requires_grad_() for s in [(512, 256), (256,)]]
    opt = LAMB(params, lr=0.01, rule=rule, max_grad_norm=1.0, backend="cuda")
    for _ in range(3):
        for i, p in enumerate(params):
            p.grad = torch.sin(p.detach() + i)
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(opt.state[p]["step"].item() == 5 for p in params)
