"""The Triton backend against the reference backend.

On the CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 must
be set before triton is imported, hence at the top of this module) on tiny
shapes with tiny chunks, so that layers span many chunks.  GPU tests run the
same parity at real sizes, CUDA-graph capture and the no-sync check; they
skip without a GPU.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# Without a GPU the kernels run in the interpreter; with one, the GPU tests must run
# compiled kernels, and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cblr_ext import CBLR, LARS, MCLR, layer_math as lm  # noqa: E402
from cblr_ext.backends import reference, triton as tb  # noqa: E402
from cblr_ext.functional import RED_KAPPA, RED_NONFINITE, LayerBatch, init_layer_state  # noqa: E402

RULES = {"lars": LARS, "mclr": MCLR, "cblr": CBLR}
VARIANTS = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "wd_no_momentum": dict(weight_decay=5e-3),
}
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET was not 1 when triton was imported")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def small_chunks(monkeypatch):
    """16-element chunks: every layer but the tiniest spans several chunks."""
    monkeypatch.setattr(tb, "CHUNK", 16)


def layer_shapes():
    # a matrix, a 4-D "conv" weight, a bias (not adapted), a zero-element tensor
    return [(6, 7), (3, 2, 3, 3), (9,), (0, 4)]


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_() for s in shapes]


def run(rule, backend, shapes, steps, dtype=torch.float32, device="cpu", lr=0.5, **kwargs):
    """``steps`` steps of a smooth non-quadratic loss: its curvature varies along the
    path but stays bounded, so the non-adapted bias (r = 1) does not diverge."""
    params = make_params(shapes, dtype, device)
    opt = RULES[rule](params, lr=lr, backend=backend, **kwargs)
    gen = torch.Generator(device).manual_seed(1)
    for _ in range(steps):
        targets = [torch.randn(p.shape, generator=gen, device=device).to(dtype) for p in params]

        def closure():
            opt.zero_grad()
            loss = sum(((p.float() - t.float()) ** 2 + p.float().cos()).sum() * 0.1
                       for p, t in zip(params, targets))
            loss.backward()
            return loss
        opt.step(closure)
    return params, opt


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def assert_same_run(ref, tri, tol):
    (ref_params, ref_opt), (tri_params, tri_opt) = ref, tri
    for i, (p, q) in enumerate(zip(ref_params, tri_params)):
        assert max_rel_diff(p.detach(), q.detach()) <= tol, f"parameter {i}"
        for key in ("momentum_buffer", "prev_step", "kappa", "age", "lagged"):
            a, b = ref_opt.state[p].get(key), tri_opt.state[q].get(key)
            assert (a is None) == (b is None), key
            if a is not None:
                assert torch.equal(a.isnan(), b.isnan()), key
                assert max_rel_diff(a.nan_to_num(), b.nan_to_num()) <= tol, key
    ref_stats, tri_stats = ref_opt.layer_stats(), tri_opt.layer_stats()
    for name, row in ref_stats.items():
        for key, value in row.items():
            torch.testing.assert_close(torch.tensor(float(tri_stats[name][key])), torch.tensor(float(value)),
                                       rtol=tol, atol=0, equal_nan=True, msg=f"{name} {key}")


# ------------------------------------------------------------ availability

def test_importing_cblr_ext_does_not_import_triton():
    code = "import sys, cblr_ext; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_available_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.available(torch.device("cpu")) is True
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in tb.available(torch.device("cpu"))


# ----------------------------------------------------------------- parity

@interpreted
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", RULES)
def test_parity_with_reference_over_ten_steps(small_chunks, rule, variant):
    kwargs = VARIANTS[variant]
    ref = run(rule, "reference", layer_shapes(), 10, **kwargs)
    tri = run(rule, "triton", layer_shapes(), 10, **kwargs)
    assert_same_run(ref, tri, tol=1e-5)


@interpreted
@pytest.mark.parametrize("rule,kwargs", [
    ("lars", dict(lag=1, momentum=0.9)),
    ("mclr", dict(lag=1, weight_decay=1e-2, median="approx")),
    ("mclr", dict(curvature_interval=3, momentum=0.9, curvature_ema=0.5)),
    ("cblr", dict(curvature_interval=2, momentum=0.9, max_ratio=2.0)),
])
def test_parity_lag_interval_approx_and_clipping(small_chunks, rule, kwargs):
    """lag=1 runs the fused one-pass variant from the second step on."""
    ref = run(rule, "reference", layer_shapes(), 10, **kwargs)
    tri = run(rule, "triton", layer_shapes(), 10, **kwargs)
    assert_same_run(ref, tri, tol=1e-5)


@interpreted
@pytest.mark.parametrize("median", ["exact", "approx"])
def test_mclr_lag_with_the_wide_median_schedule(small_chunks, monkeypatch, median):
    """Wide schedule: approx is one pass, so the update pass histograms the next step's
    inputs (one-pass variant); exact stays two passes in pass 1."""
    from cblr_ext.kernels import median as km
    monkeypatch.setattr(km, "passes", lambda kind, n_layers, data_bytes: km.WIDE[kind])
    kwargs = dict(lag=1, momentum=0.9, weight_decay=1e-2, median=median, curvature_interval=2)
    ref = run("mclr", "reference", layer_shapes(), 10, **kwargs)
    tri = run("mclr", "triton", layer_shapes(), 10, **kwargs)
    assert_same_run(ref, tri, tol=1e-5)


@interpreted
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_lag_after_a_skipped_first_step_matches_reference(small_chunks, rule):
    """A skipped first step stashes nothing in the reference; the device-side stash
    (NaN rows) must make the next step use its own inputs too."""
    runs = []
    for backend in ("reference", "triton"):
        params = make_params(layer_shapes())
        opt = RULES[rule](params, lr=0.1, momentum=0.9, lag=1, backend=backend)
        for step in range(4):
            for p in params:
                p.grad = p.detach().sin() * (step + 1)
            if step == 0:
                params[0].grad[0, 0] = float("inf")
            opt.step()
        runs.append((params, opt))
    assert runs[1][1].skipped_steps == 1
    assert_same_run(runs[0], runs[1], tol=1e-5)


@interpreted
def test_tensor_lr_and_mixed_dtypes_in_one_group(small_chunks):
    def build(backend):
        params = [p.detach().to(dtype).requires_grad_()
                  for p, dtype in zip(make_params([(5, 6), (4, 4)]), (torch.float32, torch.bfloat16))]
        return params, LARS(params, lr=torch.tensor(0.25), momentum=0.9, backend=backend)

    runs = []
    for backend in ("reference", "triton"):
        params, opt = build(backend)
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach() * 0.5
            opt.step()
        runs.append(params)
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=8e-3, atol=0)


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("rule", RULES)
def test_low_precision_params_match_reference(small_chunks, rule, dtype, tol):
    """fp32 math and fp32 state in both; w is rounded once per step, so the two agree
    to about one ulp of the parameter dtype."""
    ref = run(rule, "reference", layer_shapes(), 4, dtype=dtype, lr=0.05, momentum=0.9)
    tri = run(rule, "triton", layer_shapes(), 4, dtype=dtype, lr=0.05, momentum=0.9)
    for p, q in zip(ref[0], tri[0]):
        assert q.dtype == dtype and max_rel_diff(p.detach(), q.detach()) <= tol
        assert tri[1].state[q]["momentum_buffer"].dtype == torch.float32


@interpreted
def test_channels_last_parameters_match_reference(small_chunks):
    runs = []
    for backend in ("reference", "triton"):
        conv = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
        param = conv.to(memory_format=torch.channels_last).requires_grad_()
        opt = MCLR([param], lr=0.1, momentum=0.9, backend=backend)
        for step in range(3):
            param.grad = (param.detach() * (step + 2)).cos()
            opt.step()
        assert opt.state[param]["momentum_buffer"].stride() == param.stride()
        runs.append(param.detach())
    assert max_rel_diff(runs[0], runs[1]) <= 1e-5


# --------------------------------------------------------- pass 1 directly

def batch_of(rule, params, grads, **hp):
    states = [{} for _ in params]
    for p, s in zip(params, states):
        init_layer_state(s, p)
    hp = dict(dict(weight_decay=0.0, eps=0.0, median="exact", lag=0, curvature_interval=1), **hp)
    return LayerBatch(rule, params, grads, states, [True] * len(params), hp)


def median_cases():
    """Layers chosen to stress the selection: ties, odd/even counts, zeros in w (not
    quotients), zero quotients, exponents far apart, no quotient at all, a NaN quotient."""
    gen = torch.Generator().manual_seed(3)
    ties = (torch.randint(0, 4, (10, 13), generator=gen).float() + 1) / 8
    w_with_zeros = torch.randn(77, generator=gen)
    w_with_zeros[::3] = 0
    spread = torch.randn(40, generator=gen) * torch.logspace(-15, 15, 40)
    nan_g = torch.randn(9, generator=gen)
    nan_g[4] = float("nan")
    return [
        (ties, torch.randn(10, 13, generator=gen)),
        (torch.randn(33, generator=gen), ties.flatten()[:33]),
        (w_with_zeros, torch.randn(77, generator=gen)),
        (torch.randn(6, generator=gen), torch.tensor([0.0, 0, 0, 0, 1, 2])),
        (spread, torch.randn(40, generator=gen)),
        (torch.randn(1, generator=gen), torch.randn(1, generator=gen)),
        (torch.zeros(5), torch.randn(5, generator=gen)),
        (torch.randn(9, generator=gen), nan_g),
        (torch.zeros(0, 3), torch.zeros(0, 3)),
    ]


@interpreted
@pytest.mark.parametrize("schedule", ["WIDE", "NARROW"])
@pytest.mark.parametrize("median", ["exact", "approx"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_median_is_bit_equal_to_torch_median(small_chunks, monkeypatch, schedule, median, weight_decay):
    from cblr_ext.kernels import median as km
    monkeypatch.setattr(km, "passes", lambda kind, n_layers, data_bytes: getattr(km, schedule)[kind])
    params, grads = zip(*median_cases())
    red = tb.reduce(batch_of("mclr", list(params), list(grads), median=median, weight_decay=weight_decay))
    for i, (w, g) in enumerate(zip(params, grads)):
        q = lm.curvature_quotients(lm.decayed_grad(g, w, weight_decay), w)
        expected = lm.median_kappa(lm.lower_median(q, approx=median == "approx"), 0.0)
        got = red[i, RED_KAPPA]
        if torch.isnan(expected):
            assert torch.isnan(got), f"layer {i}"
        else:
            assert got.view(torch.int32) == expected.view(torch.int32), f"layer {i}: {got} != {expected}"


def test_median_schedule_is_wide_for_large_layers_and_narrow_for_many_small_ones():
    from cblr_ext.kernels import median as km
    resnet50 = dict(n_layers=161, data_bytes=25_557_032 * 8)  # fp32 w and g
    many_tiny = dict(n_layers=2048, data_bytes=901_120 * 8)
    assert km.passes("exact", **resnet50) == km.WIDE["exact"] and len(km.WIDE["exact"]) == 2
    assert km.passes("approx", **resnet50) == km.WIDE["approx"] and len(km.WIDE["approx"]) == 1
    assert km.passes("exact", **many_tiny) == km.NARROW["exact"]


@interpreted
def test_a_layer_over_many_chunks_reduces_deterministically(small_chunks):
    """200 chunks (more than one block of the per-layer sum), summed in a fixed order."""
    w = torch.randn(3200, generator=torch.Generator().manual_seed(5)) * 3
    g = torch.randn(3200, generator=torch.Generator().manual_seed(6))
    g[2500] = float("inf")
    runs = [tb.reduce(batch_of("lars", [w], [g])) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    expected = reference.reduce(batch_of("lars", [w], [g]))
    torch.testing.assert_close(runs[0][0, :2], expected[0, :2], rtol=1e-6, atol=0)
    assert runs[0][0, RED_NONFINITE] == 1


# ------------------------------------------------------ CBLR protocol ops

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_closure_ops_match_reference_bit_exactly(small_chunks, dtype):
    shapes = [(5, 9), (0,), (3, 3, 2)]
    w = [p.detach() for p in make_params(shapes, dtype)]
    g = [p.detach() for p in make_params(shapes, dtype, seed=1)]
    s = [p.detach().float() * 1e-2 for p in make_params(shapes, seed=2)]
    w_t = [t.clone() for t in w]
    saved = [torch.full_like(t, 7.0) for t in w]
    shifted_ref, saved_ref = [t.clone() for t in w], [torch.empty_like(t) for t in w]
    reference.shift(shifted_ref, s, saved_ref)
    tb.shift(w, s, saved)
    assert all(torch.equal(a, b) for a, b in zip(saved, w_t))
    assert all(torch.equal(a, b) for a, b in zip(w, shifted_ref))
    g_p = [t * 1.5 for t in g]
    torch.testing.assert_close(tb.secant_norms(w, g, g_p, s, 0.1),
                               reference.secant_norms(w, g, g_p, s, 0.1), rtol=1e-6, atol=0)
    tb.restore(w, saved)
    assert all(torch.equal(a, b) for a, b in zip(w, w_t))


# ------------------------------------------------------------ bad input

@interpreted
def test_fp64_parameters_are_rejected_before_anything_changes():
    params = make_params([(3, 3)], torch.float64)
    before = params[0].detach().clone()
    opt = LARS(params, backend="triton")
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(ValueError, match="float64"):
        opt.step()
    assert torch.equal(params[0].detach(), before)


@interpreted
def test_non_dense_gradient_is_rejected_before_anything_changes():
    params = make_params([(4, 4)])
    before = params[0].detach().clone()
    opt = LARS(params, backend="triton")
    params[0].grad = torch.ones(4, 8)[:, ::2]
    with pytest.raises(ValueError, match="dense"):
        opt.step()
    assert torch.equal(params[0].detach(), before)


@interpreted
@pytest.mark.parametrize("rule", RULES)
def test_nonfinite_gradient_skips_the_step_on_device(small_chunks, rule):
    results = []
    for backend in ("reference", "triton"):
        params, opt = run(rule, backend, layer_shapes(), 2, momentum=0.9)
        snap = [p.detach().clone() for p in params]
        bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        params[0].grad[0, 0] = float("nan")
        opt.step(lambda: None)
        assert all(torch.equal(a, b.detach()) for a, b in zip(snap, params))
        assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(bufs, params))
        results.append(opt.skipped_steps)
    assert results == [1, 1]


# --------------------------------------------------- kernels build for a GPU

COMPILE_SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cblr_ext.kernels import chunks, closure, median, reduce, update

    P, C = "*i64", "constexpr"
    def build(fn, signature, constexprs):
        sig = dict(signature, **{k: C for k in constexprs})
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(enable_fp_fusion=False))
    head = dict(chunks=P, ptrs=P, n_layers="i32")
    for dt in (tl.float32, tl.bfloat16):
        build(reduce.chunk_stats_kernel, dict(head, partials="*fp32", hist="*i32", prefix="*i32", norm_rows="*u8", measure="*u8",
              weight_decay="fp32"), dict(DTYPE=dt, STATS=True, HIST=True, FILTER=True,
              SHIFT=10, BITS=10, BLOCK=4096))
        build(update.momentum_update_kernel, dict(head, alpha="*fp32", skip="*u8", partials="*fp32",
              hist="*i32", weight_decay="fp32", momentum="fp32"), dict(DTYPE=dt, MOMENTUM=True,
              NESTEROV=True, STORE_STEP=True, INPUT_NORMS=True, INPUT_HIST=True, SHIFT=16, BITS=15,
              BLOCK=4096))
        build(closure.copy_kernel, head, dict(DTYPE=dt, BLOCK=4096))
        build(closure.shift_kernel, head, dict(DTYPE=dt, BLOCK=4096))
        build(closure.secant_partials_kernel, dict(head, partials="*fp32", weight_decay="fp32"),
              dict(DTYPE=dt, BLOCK=4096))
    build(median.radix_select_kernel, dict(hist="*i32", prefix="*i32", rank="*i32", count="*i32"),
          dict(SHIFT=20, BITS=11, FIRST=True))
    build(chunks.sum_partials_kernel, dict(partials="*fp32", chunk_begin=P, rows=P, out="*fp32"),
          dict(N_COLS=3, COLS=4, BLOCK_C=64))
""")


def test_kernels_compile_for_a_cuda_target():
    """The interpreter does not type-check like the compiler; build every kernel
    to a cubin for sm_90 (no GPU needed) so GPU-only errors show up in CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("ptxas is not available")
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------- steady state, on the CPU

@interpreted
@pytest.mark.parametrize("rule", RULES)
def test_steady_state_steps_copy_nothing_to_the_device(small_chunks, monkeypatch, rule):
    """Once warmed up (grads kept in place), a step reuses the cached chunk and pointer
    tables: no host-to-device copy, as CUDA-graph replay requires."""
    from cblr_ext.kernels import chunks
    params = make_params(layer_shapes())
    opt = RULES[rule](params, lr=0.1, momentum=0.9, backend="triton")
    for p in params:
        p.grad = torch.zeros_like(p)

    def closure():
        for p in params:
            p.grad.copy_(p.detach().sin())
    for _ in range(2):
        closure()
        opt.step(closure)

    def no_copies(*args):
        raise AssertionError("a host list was copied to the device during a steady-state step")
    monkeypatch.setattr(chunks, "to_device", no_copies)
    closure()
    opt.step(closure)


# ------------------------------------------------------------------- GPU

def model_shapes(suite):
    from bench.suites import SUITES  # the repository's model-shape suites
    return [shape for _, shape in SUITES[suite].shapes]


@needs_gpu
@pytest.mark.parametrize("suite", ["resnet50", "bert-large"])
@pytest.mark.parametrize("rule", RULES)
def test_gpu_parity_at_real_sizes(rule, suite):
    kwargs = dict(momentum=0.9, weight_decay=1e-4, lr=0.1)
    ref = run(rule, "reference", model_shapes(suite), 10, device="cuda", **kwargs)
    tri = run(rule, "triton", model_shapes(suite), 10, device="cuda", **kwargs)
    assert_same_run(ref, tri, tol=1e-5)


def gpu_setup(rule, shapes, backend="triton"):
    params = make_params(shapes, device="cuda")
    opt = RULES[rule](params, lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
    for p in params:
        p.grad = torch.zeros_like(p)
    return params, opt


def set_grads(params, step):
    for i, p in enumerate(params):
        p.grad.copy_(torch.sin(p.detach() * (step + 1) + i))


@needs_gpu
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_cuda_graph_capture_and_replay_matches_eager(rule):
    shapes = [(512, 256), (256,), (64, 32, 3, 3), (0,)]
    eager, eager_opt = gpu_setup(rule, shapes)
    for step in range(6):
        set_grads(eager, step)
        eager_opt.step()

    params, opt = gpu_setup(rule, shapes)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile kernels, create state and tables
        for step in range(3):
            set_grads(params, step)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(3, 6):
        set_grads(params, step)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, params):
        assert torch.equal(p, q)


@needs_gpu
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_warm_step_makes_no_host_sync(rule):
    params, opt = gpu_setup(rule, [(512, 256), (256,), (64, 32, 3, 3)])
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    lr = torch.tensor(0.05, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_cblr_protocol_ops_make_no_host_sync():
    """The optimizer decides on the host whether to probe; the backend's kernels
    between the closure's calls must not sync."""
    params, opt = gpu_setup("cblr", [(512, 256), (64, 32, 3, 3)])
    set_grads(params, 0)
    opt.step(lambda: set_grads(params, 0))
    torch.cuda.synchronize()
    steps = [opt.state[p]["momentum_buffer"] for p in params]
    grads = [p.grad for p in params]
    saved_w = [torch.empty_like(p) for p in params]
    probe = [g * 1.01 for g in grads]
    torch.cuda.set_sync_debug_mode("error")
    try:
        tb.shift(params, steps, saved_w)
        norms = tb.secant_norms(params, grads, probe, steps, 1e-4)
        tb.restore(params, saved_w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(params, saved_w)) and torch.isfinite(norms).all()


@interpreted
def test_a_step_is_an_inplace_update_to_autograd():
    """The kernels write through raw pointers; the step still moves the version counters,
    so a backward through a graph that saved the old weights raises, as with torch's ops."""
    lin = torch.nn.Linear(4, 3)
    loss = (lin.weight ** 2).sum() + lin.bias.sum()
    loss.backward(retain_graph=True)
    before = lin.weight._version
    LARS(lin.parameters(), lr=0.1, momentum=0.9, backend="triton").step()
    assert lin.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
