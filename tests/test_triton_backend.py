"""The Triton backend against the reference backend, through the optimizers and
through the functional core (``cblr_ext.functional`` with backend="triton" against
backend="reference": the ops' contract, docs/architecture.md).

On the CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 must
be set before triton is imported, hence at the top of this module) on tiny
shapes with tiny chunks, so that layers span many chunks.  GPU tests run the
same parity at real sizes, CUDA-graph capture and the no-sync check; they
skip without a GPU.
"""
import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

# Without a GPU the kernels run in the interpreter; with one, the GPU tests must run
# compiled kernels, and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cblr_ext import CBLR, LARS, MCLR, functional as F, layer_math as lm, ops  # noqa: E402
from cblr_ext.backends import reference, triton as tb  # noqa: E402
from helpers import assert_graph_replay_equals_eager, sin_grads  # noqa: E402

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
    """A skipped first step stashes nothing: the next step (``lagged_valid`` false) uses
    its own inputs, as in the reference."""
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
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lag_stats_report_the_lagged_inputs(backend):
    """docs/algorithm.md (lag = 1): ``layer_stats()`` reports the lagged ‖w‖, ‖g‖, those of
    the previous step's inputs (the first step: its own)."""
    p = torch.nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    opt = LARS([p], lr=0.5, lag=1, momentum=0.9, backend=backend)
    inputs = []
    for step in range(3):
        p.grad = torch.sin(p.detach() * (step + 1))
        inputs.append((p.detach().norm().item(), p.grad.norm().item()))
        opt.step()
        stats = opt.layer_stats()["0.0"]
        expected = inputs[max(step - 1, 0)]
        assert stats["w_norm"] == pytest.approx(expected[0], rel=1e-6), step
        assert stats["g_norm"] == pytest.approx(expected[1], rel=1e-6), step


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

def reduce_of(rule, params, grads, backend="triton", adapt=None, ages=None, probe_grads=None, probe_steps=None,
              **hp):
    """Pass 1 through the functional API: every layer adapted and due to measure."""
    hp = F.Hyperparams(**dict(dict(weight_decay=0.0, eps=0.0), **hp))
    ages = [torch.full((), float("inf")) for _ in params] if ages is None else ages
    adapt = [True] * len(params) if adapt is None else adapt
    return F.layerwise_reduce(rule, list(params), list(grads), ages, adapt, hp, probe_grads=probe_grads,
                              probe_steps=probe_steps, backend=backend)


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
    """The Reduction's median (bf16-truncated for approx) bit for bit; NaN for no quotient
    or a NaN one."""
    from cblr_ext.kernels import median as km
    monkeypatch.setattr(km, "passes", lambda kind, n_layers, data_bytes: getattr(km, schedule)[kind])
    params, grads = zip(*median_cases())
    red = reduce_of("mclr", params, grads, median=median, weight_decay=weight_decay)
    assert red.flags[:, F.FLAG_MEDIAN].all()
    for i, (w, g) in enumerate(zip(params, grads)):
        q = lm.curvature_quotients(lm.decayed_grad(g, w, weight_decay), w)
        expected = lm.lower_median(q, approx=median == "approx")
        got = red.median[i]
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
    runs = [reduce_of("lars", [w], [g]) for _ in range(2)]
    assert all(_same(a, b) for a, b in zip(runs[0].tensors(), runs[1].tensors()))
    expected = reduce_of("lars", [w], [g], backend="reference")
    # Σw² to 1e-6 (the old ‖w‖, ‖g‖ check; Σg² is +inf in both)
    torch.testing.assert_close(runs[0].sums[0, :2], expected.sums[0, :2], rtol=1e-6, atol=0)
    assert runs[0].nonfinite[0] and runs[0].flags[0, F.FLAG_NORMS] and runs[0].sums.dtype == torch.float64


@interpreted
@pytest.mark.parametrize("rule", RULES)
def test_reduction_matches_the_reference_where_taken(small_chunks, rule):
    """Sums (fp64) to 1e-6, flags equal; the median where the triton
    pass took it (the layers that measure), 0 elsewhere (not taken)."""
    params = [p.detach() for p in make_params(layer_shapes())]
    grads = [g.detach() for g in make_params(layer_shapes(), seed=1)]
    ages = [torch.tensor(a) for a in (float("inf"), 0.0, 5.0, 1.0)]
    adapt = [True, True, False, True]
    probe = {}
    if rule == "cblr":
        probe = dict(probe_grads=[g * 1.5 if i != 1 else None for i, g in enumerate(grads)],
                     probe_steps=[p * 1e-2 if i != 1 else None for i, p in enumerate(params)])
    hp = F.Hyperparams(weight_decay=1e-2, curvature_interval=2)
    ref, tri = (F.layerwise_reduce(rule, params, grads, ages, adapt, hp, backend=b, **probe)
                for b in ("reference", "triton"))
    torch.testing.assert_close(tri.sums, ref.sums, rtol=1e-6, atol=0)
    for col in (F.FLAG_MEASURED, F.FLAG_NORMS, F.FLAG_NONFINITE):
        assert torch.equal(tri.flags[:, col], ref.flags[:, col]), col
    taken = tri.flags[:, F.FLAG_MEDIAN]
    assert torch.equal(taken, ref.flags[:, F.FLAG_MEDIAN] & tri.measured)
    assert torch.equal(tri.median[taken].view(torch.int32), ref.median[taken].view(torch.int32))
    assert (tri.median[~taken] == 0).all()


@interpreted
@pytest.mark.parametrize("check_nonfinite", [True, False])
def test_lag_reduction_leaves_stashed_layers_to_the_update(small_chunks, check_nonfinite):
    """lag=1, layers with a stash: no norms in pass 1 (0, flag false); g is still read for
    the non-finite check unless check_nonfinite=False."""
    params = [p.detach() for p in make_params(layer_shapes())]
    grads = [g.detach().clone() for g in make_params(layer_shapes(), seed=1)]
    grads[1].view(-1)[3] = float("nan")
    hp = F.Hyperparams(lag=True, check_nonfinite=check_nonfinite)
    ages = [torch.tensor(float("inf")) for _ in params]
    valid = [True, True, False, True]
    red, ref = (F.layerwise_reduce("lars", params, grads, ages, [True] * 4, hp, lagged_valid=valid, backend=b)
                for b in ("triton", "reference"))
    assert red.flags[:, F.FLAG_NORMS].tolist() == [False, False, True, False]
    assert (red.sums[[0, 1, 3], :2] == 0).all()
    torch.testing.assert_close(red.sums[2], ref.sums[2], rtol=1e-6, atol=0)
    assert red.nonfinite.tolist() == [False, check_nonfinite, False, False]


# ------------------------------------------------------ CBLR protocol ops

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_probe_ops_match_reference_bit_exactly(small_chunks, dtype):
    shapes = [(5, 9), (0,), (3, 3, 2)]
    w = [p.detach() for p in make_params(shapes, dtype)]
    g = [p.detach() for p in make_params(shapes, dtype, seed=1)]
    s = [p.detach().float() * 1e-2 for p in make_params(shapes, seed=2)]
    w_t = [t.clone() for t in w]
    saved = [torch.full_like(t, 7.0) for t in w]
    shifted_ref, saved_ref = [t.clone() for t in w], [torch.empty_like(t) for t in w]
    moved_ref, moved = [torch.empty_like(t) for t in s], [torch.empty_like(t) for t in s]
    w_sq_ref = F.probe_shift_(shifted_ref, s, saved_ref, moved_ref, backend="reference")
    w_sq = F.probe_shift_(w, s, saved, moved, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(moved, moved_ref))
    assert all(torch.equal(a, b) for a, b in zip(saved, w_t))
    assert all(torch.equal(a, b) for a, b in zip(w, shifted_ref))
    assert w_sq.dtype == torch.float64 and w_sq.shape == (3,)
    torch.testing.assert_close(w_sq, w_sq_ref, rtol=1e-6, atol=0)
    # The secant norms from pass 1's sums, to 1e-6 of the reference's.
    g_p = [t * 1.5 for t in g]
    reds = [reduce_of("cblr", w_t, g, backend=b, weight_decay=0.1, probe_grads=g_p, probe_steps=s)
            for b in ("triton", "reference")]
    norms = [red.sums[:, [F.SUM_DIFF2, F.SUM_STEP2]].sqrt() for red in reds]
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-6, atol=0)
    F.probe_restore_(w, saved, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(w, w_t))


# ------------------------------------------- the functional contract (issue 14)

@interpreted
def test_cblr_after_a_skipped_first_step_follows_the_reference(small_chunks):
    """Issue 14: the backend made a zero momentum buffer on the skipped first step and so
    probed one step early (closure calls [1, 2, 1, 1, 2, 1]); the optimizer owns the state
    now and both backends follow the cadence of docs/algorithm.md."""
    runs, calls = [], []
    for backend in ("reference", "triton"):
        params = make_params(layer_shapes())
        opt = CBLR(params, lr=0.1, momentum=0.9, curvature_interval=3, backend=backend)
        gen = torch.Generator().manual_seed(1)
        per_step = []
        for step in range(6):
            targets = [torch.randn(p.shape, generator=gen) for p in params]
            count = [0]

            def closure():
                count[0] += 1
                opt.zero_grad()
                loss = sum(((p - t) ** 2 + p.cos()).sum() * 0.1 for p, t in zip(params, targets))
                loss.backward()
                if step == 0:
                    params[0].grad[0, 0] = float("inf")
                return loss
            opt.step(closure)
            per_step.append(count[0])
        runs.append((params, opt))
        calls.append(per_step)
    assert calls == [[1, 1, 2, 1, 1, 2]] * 2
    assert runs[1][1].skipped_steps == 1
    assert_same_run(runs[0], runs[1], tol=1e-5)


def layer_inputs(rule, lag, seed=0):
    """One group's inputs and state in mid-run: momentum, κ̄ of earlier measurements (NaN
    for one layer), ages due and not, a lag stash where ``lag`` (none for layer 2), a probe
    (CBLR, not for layer 1)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 7), (3, 2, 3, 3), (5, 4), (9,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    state = dict(
        kappas=[torch.tensor(v, dtype=F.SCALAR_DTYPE) for v in (0.8, float("nan"), 1.5, float("nan"))],
        ages=[torch.tensor(v) for v in (float("inf"), 1.0, 2.0, 3.0)],
        momentum_buffers=[torch.randn(s, generator=gen) * 0.1 for s in shapes],
        lagged=[torch.tensor([4.0, 5.0, 1.2], dtype=F.SCALAR_DTYPE) + i for i in range(4)] if lag else [],
        lagged_valid=[lag, lag, False, lag])
    probe = {}
    if rule == "cblr":
        probe = dict(probe_grads=[g * 0.7 + 0.1 if i != 1 else None for i, g in enumerate(grads)],
                     probe_steps=[b if i != 1 else None for i, b in enumerate(state["momentum_buffers"])])
    return params, grads, state, probe, [True, True, True, False]


def clone_state(state):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in state.items()}


def thinned(red: F.Reduction) -> F.Reduction:
    """A reduction that took no norms and no median (the update must take them)."""
    sums, median, flags = (t.clone() for t in red.tensors())
    sums[:, [F.SUM_W2, F.SUM_G2]] = 0
    median.zero_()
    flags[:, [F.FLAG_NORMS, F.FLAG_MEDIAN]] = False
    return F.Reduction(sums, median, flags)


INTERCHANGE_CASES = [
    ("lars", dict()), ("lars", dict(lag=True)), ("mclr", dict(curvature_interval=2)),
    ("mclr", dict(lag=True, median="approx", wide=True)), ("mclr", dict(lag=True)), ("cblr", dict()),
]


@interpreted
@pytest.mark.parametrize("rule,kwargs", INTERCHANGE_CASES)
def test_reductions_are_interchangeable_between_backends(small_chunks, monkeypatch, rule, kwargs):
    """A triton Reduction fed to the reference update, a reference one to the triton update,
    and one that took no norms and no median, give the step each update gives with its own
    backend's reduction (the one-pass lag median with ``wide``)."""
    from cblr_ext.kernels import median as km
    kwargs = dict(kwargs)
    if kwargs.pop("wide", False):
        monkeypatch.setattr(km, "passes", lambda kind, n_layers, data_bytes: km.WIDE[kind])
    hp = F.Hyperparams(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, **kwargs)
    params, grads, state, probe, adapt = layer_inputs(rule, hp.lag)
    reductions = {b: F.layerwise_reduce(rule, params, grads, state["ages"], adapt, hp,
                                        lagged_valid=state["lagged_valid"], backend=b, **probe)
                  for b in ("reference", "triton")}
    reductions["thin"] = thinned(reductions["reference"])
    for updater in ("reference", "triton"):
        results = {}
        for reducer, red in reductions.items():
            w, s = [p.clone() for p in params], clone_state(state)
            stats = F.layerwise_update_(rule, w, grads, F.LayerState(**s), adapt, red, torch.tensor(False), hp,
                                        backend=updater)
            results[reducer] = (w, s, stats)
        own = results[updater]
        for reducer, (w, s, stats) in results.items():
            where = f"{reducer} reduction, {updater} update"
            assert all(max_rel_diff(a, b) <= 1e-5 for a, b in zip(own[0], w)), where
            for key in ("kappas", "ages", "momentum_buffers", "lagged"):
                for a, b in zip(own[1][key], s[key]):
                    assert torch.equal(a.isnan(), b.isnan()) and max_rel_diff(a.nan_to_num(), b.nan_to_num()) <= 1e-5, \
                        f"{where}: {key}"
            torch.testing.assert_close(stats, own[2], rtol=1e-5, atol=0, equal_nan=True, msg=where)


@interpreted
@pytest.mark.parametrize("rule,kwargs,wide", [("lars", dict(lag=1), False), ("mclr", dict(), False),
                                              ("mclr", dict(lag=1, median="approx"), True)])
def test_the_update_reads_nothing_more_after_this_backends_pass_one(small_chunks, monkeypatch, rule, kwargs, wide):
    """A reduction of this backend's pass 1 is recognised: the update runs no pass of its
    own before the ratio (a foreign one may need it: see the interchange test)."""
    from cblr_ext.kernels import median as km
    if wide:
        monkeypatch.setattr(km, "passes", lambda kind, n_layers, data_bytes: km.WIDE[kind])
    calls = []
    first_pass = tb._pass_one
    monkeypatch.setattr(tb, "_pass_one", lambda *a, **k: calls.append(1) or first_pass(*a, **k))
    monkeypatch.setattr(tb, "_reduce", lambda *a, reduce=tb._reduce: (calls.append("reduce"), reduce(*a))[1])
    params = make_params(layer_shapes())
    opt = RULES[rule](params, lr=0.1, momentum=0.9, backend="triton", **kwargs)
    for step in range(3):
        for p in params:
            p.grad = p.detach().sin() * (step + 1)
        opt.step()
    assert calls == ["reduce", 1] * 3


@interpreted
def test_through_the_dispatcher_the_update_still_recognises_the_reduction(small_chunks, monkeypatch):
    """On CUDA the ops reach these functions through the dispatcher; registered for the
    CPU key for the test's duration, the reduction it returns is still this backend's
    own (no pass of the update's own), and the step equals the direct call's."""
    calls = []
    first_pass = tb._pass_one
    monkeypatch.setattr(tb, "_pass_one", lambda *a, **k: calls.append(1) or first_pass(*a, **k))
    hp = F.Hyperparams(lr=0.5, momentum=0.9, weight_decay=1e-2, median="approx")
    results = []
    with torch.library._scoped_library("cblr_ext", "IMPL") as lib, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning only once", UserWarning)  # overriding cpp's kernels: meant
        for name in ("layerwise_reduce", "layerwise_update_", "probe_shift_", "probe_restore_"):
            lib.impl(name, getattr(tb, name), "CPU")
        for backend in ("auto", "triton"):
            params, grads, state, _, adapt = layer_inputs("mclr", False)
            red = F.layerwise_reduce("mclr", params, grads, state["ages"], adapt, hp, backend=backend)
            stats = F.layerwise_update_("mclr", params, grads, F.LayerState(**state), adapt, red,
                                        torch.tensor(False), hp, backend=backend)
            results.append((params, stats))
    assert calls == [1, 1]
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert _same(results[0][1], results[1][1])


@interpreted
@pytest.mark.parametrize("variant", ["momentum", "nesterov_wd"])
def test_cblr_may_update_from_the_saved_copy(small_chunks, monkeypatch, variant):
    """The backend table runs triton with updates_from_saved=False (the probe restores w_t
    before pass 1); its ops support True as well (pass 1 takes Σw_t² from the shift and
    reads no w of a shifted layer, the update reads w_t from the copy and restores it on a
    skipped step), which saves the restore's pass: the run still follows the reference."""
    from cblr_ext import backends
    real_get = backends.get

    def get(name, device):
        backend = real_get(name, device)
        if backend.name == "triton":
            return backends.Backend("triton", tb, updates_from_saved=True)
        return backend
    monkeypatch.setattr(backends, "get", get)
    shift_sums = []
    reduce = tb._reduce
    monkeypatch.setattr(tb, "_reduce", lambda *a: (shift_sums.append(a[9] is not None), reduce(*a))[1])
    kwargs = dict(VARIANTS[variant], curvature_interval=2)
    ref = run("cblr", "reference", layer_shapes(), 6, **kwargs)
    tri = run("cblr", "triton", layer_shapes(), 6, **kwargs)
    assert shift_sums == [False, True, False, True, False, True]  # Σw_t² from the shift on probe steps
    assert_same_run(ref, tri, tol=1e-5)


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's value reaches the host raises (the CPU stand-in for CUDA's
    sync debug mode: the interpreter itself reads none of these)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def host_read(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")
    try:
        for name in names:
            setattr(torch.Tensor, name, host_read)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@interpreted
@pytest.mark.parametrize("rule,kwargs", [("lars", dict(lag=True)), ("mclr", dict()), ("mclr", dict(lag=True)),
                                         ("cblr", dict())])
def test_the_ops_read_nothing_on_the_host(small_chunks, rule, kwargs):
    hp = F.Hyperparams(lr=0.5, momentum=0.9, weight_decay=1e-2, **kwargs)
    params, grads, state, probe, adapt = layer_inputs(rule, hp.lag)
    layer_state = F.LayerState(**state)
    lr = torch.tensor(0.5)
    hp = F.Hyperparams(**dict(vars(hp), lr=lr))
    for warm in (True, False):  # the first call fills the chunk, pointer and flag caches
        with contextlib.nullcontext() if warm else no_host_reads():
            if rule == "cblr":
                saved = [torch.empty_like(p) for p in params]
                F.probe_shift_(params, state["momentum_buffers"], saved,
                               [torch.empty_like(s) for s in state["momentum_buffers"]], backend="triton")
                F.probe_restore_(params, saved, backend="triton")
            red = F.layerwise_reduce(rule, params, grads, state["ages"], adapt, hp,
                                     lagged_valid=state["lagged_valid"], backend="triton", **probe)
            F.layerwise_update_(rule, params, grads, layer_state, adapt, red, red.nonfinite.any(), hp,
                                backend="triton")


@interpreted
@pytest.mark.parametrize("skip", [False, True])
def test_update_from_the_saved_copy_equals_restore_then_update(small_chunks, skip):
    """The contract's update from saved w_t (a backend with updates_from_saved=False must
    still honour it): bit-equal to restoring first; a skipped step restores w_t and writes
    nothing else.  Layer 1 was not shifted (saved None)."""
    hp = F.Hyperparams(lr=0.5, momentum=0.9, weight_decay=1e-2)
    params, grads, state, probe, adapt = layer_inputs("cblr", False)
    red = F.layerwise_reduce("cblr", params, grads, state["ages"], adapt, hp, backend="triton", **probe)
    found_inf = torch.tensor(skip)
    runs = []
    for from_copy in (False, True):
        w, s = [p.clone() for p in params], clone_state(state)
        shifted = [0, 2, 3]
        saved = [torch.empty_like(p) for p in w]
        F.probe_shift_([w[i] for i in shifted], [s["momentum_buffers"][i] for i in shifted],
                       [saved[i] for i in shifted], [torch.empty_like(s["momentum_buffers"][i]) for i in shifted],
                       backend="triton")
        if not from_copy:
            F.probe_restore_([w[i] for i in shifted], [saved[i] for i in shifted], backend="triton")
        next_w_sq = torch.full((4,), -1.0, dtype=torch.float64)
        stats = F.layerwise_update_("cblr", w, grads, F.LayerState(**s), adapt, red, found_inf, hp,
                                    saved=[saved[i] if from_copy and i in shifted else None for i in range(4)],
                                    next_w_sq=next_w_sq, backend="triton")
        runs.append((w, s, stats, next_w_sq))
    (w0, s0, stats0, sq0), (w1, s1, stats1, sq1) = runs
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    for key in ("kappas", "ages", "momentum_buffers"):
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(s0[key], s1[key])), key
    assert torch.equal(stats0.nan_to_num(), stats1.nan_to_num()) and torch.equal(sq0, sq1)
    if skip:
        assert all(torch.equal(a, b) for a, b in zip(w1, params))
        assert all(torch.equal(a, b) for a, b in zip(s1["momentum_buffers"], state["momentum_buffers"]))
        assert (sq1 == -1).all()
    else:
        torch.testing.assert_close(sq1, torch.stack([_sq(p) for p in w1]), rtol=1e-6, atol=0)


def _sq(t):
    return t.double().square().sum()


def _schema(name):
    return torch._C.parse_schema(ops.SCHEMAS[name])


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


def _same(a, b):
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def op_cases():
    """(op name, arguments by schema name) covering every optional input."""
    hp = F.Hyperparams(lr=0.5, momentum=0.9, weight_decay=1e-2, lag=True)
    params, grads, state, _, adapt = layer_inputs("lars", True)
    _, _, _, probe, _ = layer_inputs("cblr", False)
    red = F.layerwise_reduce("lars", params, grads, state["ages"], adapt, hp, lagged_valid=state["lagged_valid"],
                             backend="reference")
    common = dict(params=params, grads=grads, ages=state["ages"], adapt=adapt, weight_decay=1e-2,
                  curvature_interval=1, approx_median=False, workspace=torch.empty(0, dtype=torch.uint8),
                  grad_scale=torch.tensor(8.0))
    yield "layerwise_reduce", dict(common, rule="mclr", lagged_valid=state["lagged_valid"], probe_grads=[],
                                   probe_steps=[], w_sq=None, w_sq_known=[False] * 4, lag=True,
                                   check_nonfinite=True)
    yield "layerwise_reduce", dict(common, rule="cblr", lagged_valid=[False] * 4, w_sq=torch.rand(4).double(),
                                   w_sq_known=[True, False, True, True], lag=False, check_nonfinite=True, **probe)
    saved = [p.clone() for p in params]
    saved[1] = None
    yield "layerwise_update_", dict(
        common, rule="lars", momentum_buffers=state["momentum_buffers"],
        prev_steps=[torch.zeros_like(p) for p in params], kappas=state["kappas"], lagged=state["lagged"],
        lagged_valid=state["lagged_valid"], saved=saved, sums=red.sums, median=red.median, flags=red.flags,
        found_inf=torch.tensor(False), lr=torch.tensor(0.5), momentum=0.9, nesterov=False, eps=1e-8,
        trust_coefficient=1e-3, curvature_ema=0.0, max_ratio=None, fallback_trust=1e-3, lag=True,
        next_w_sq=torch.zeros(4, dtype=torch.float64))
    yield "probe_shift_", dict(params=params, steps=state["momentum_buffers"],
                               saved=[torch.empty_like(p) for p in params],
                               displacements=[torch.empty_like(s) for s in state["momentum_buffers"]])
    yield "probe_restore_", dict(params=params, saved=[p + 1 for p in params])


FAKES = {"layerwise_reduce": ops._reduce_fake, "layerwise_update_": ops._update_fake,
         "probe_shift_": ops._shift_fake, "probe_restore_": ops._restore_fake}


@interpreted
@pytest.mark.parametrize("case", range(5))
def test_ops_return_what_their_fakes_say_and_write_only_mutable_arguments(small_chunks, case):
    """``opcheck`` needs the dispatcher, which runs the triton kernels only for CUDA tensors:
    on the CPU, check the functions against the fakes' shapes and dtypes and the schema's
    mutability (what is not marked ``!`` is bit-equal afterwards; what was written through
    raw pointers moved its version counter)."""
    name, kwargs = list(op_cases())[case]
    schema = _schema(name)
    args = [kwargs[a.name] for a in schema.arguments]
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    before = {k: [(t.clone(), t._version) for t in _tensors(v)] for k, v in kwargs.items()}
    out = getattr(tb, name)(*args)
    fake = FAKES[name](*args)
    for got, expected in zip(_tensors(out) if isinstance(out, tuple) else _tensors(out), _tensors(fake)):
        assert (got.shape, got.dtype, got.device) == (expected.shape, expected.dtype, expected.device)
    assert (out is None) == (fake is None) and len(_tensors(out)) == len(_tensors(fake))
    changed = set()
    for k, v in kwargs.items():
        for (old, version), t in zip(before[k], _tensors(v)):
            if not _same(old, t):
                changed.add(k)
                assert t._version > version, f"{name}: {k} written without a version bump"
    assert changed <= mutable, f"{name} wrote {changed - mutable}, not marked mutable in its schema"
    assert bool(changed) == name.endswith("_"), f"{name} wrote {changed}"


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
@pytest.mark.parametrize("bad", ["momentum_dtype", "saved_shape", "lag_without_stash", "short_kappas"])
def test_bad_functional_inputs_are_rejected_before_anything_changes(small_chunks, bad):
    hp = F.Hyperparams(lr=0.5, momentum=0.9, lag=bad == "lag_without_stash")
    params, grads, state, _, adapt = layer_inputs("lars", False)
    red = F.layerwise_reduce("lars", params, grads, state["ages"], adapt, hp, backend="reference")
    saved = None
    if bad == "momentum_dtype":
        state["momentum_buffers"][2] = state["momentum_buffers"][2].bfloat16()
    elif bad == "saved_shape":
        saved = [None, torch.zeros(3), None, None]
    elif bad == "short_kappas":
        state["kappas"] = state["kappas"][:3]
    state["lagged_valid"] = [False] * 4
    w, s = [p.clone() for p in params], clone_state(state)
    with pytest.raises(ValueError, match="triton backend"):
        F.layerwise_update_("lars", w, grads, F.LayerState(**s), adapt, red, torch.tensor(False), hp, saved=saved,
                            backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(w, params))
    assert all(torch.equal(a, b) for a, b in zip(s["momentum_buffers"], state["momentum_buffers"]))


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
        build(reduce.chunk_stats_kernel, dict(head, partials="*fp64", hist="*i32", prefix="*i32", modes="*u8",
              measure="*u8", weight_decay="fp32", unscale="*fp32"), dict(DTYPE=dt, STATS=True, SECANT=True, HIST=True,
              FILTER=True, SHIFT=10, BITS=10, BLOCK=4096))
        build(update.momentum_update_kernel, dict(head, partials="*fp64", alpha="*fp32", skip="*u8",
              hist="*i32", weight_decay="fp32", momentum="fp32", unscale="*fp32"), dict(DTYPE=dt, MOMENTUM=True,
              NESTEROV=True, STORE_STEP=True, FROM_SAVED=True, INPUT_NORMS=True, INPUT_HIST=True,
              NEXT_W2=True, SHIFT=16, BITS=15, BLOCK=4096))
        build(closure.copy_kernel, head, dict(DTYPE=dt, BLOCK=4096))
        build(closure.shift_kernel, dict(head, partials="*fp64"), dict(DTYPE=dt, BLOCK=4096))
    build(median.radix_select_kernel, dict(hist="*i32", prefix="*i32", rank="*i32", count="*i32"),
          dict(SHIFT=20, BITS=11, FIRST=True))
    build(chunks.sum_partials_kernel, dict(partials="*fp64", chunk_begin=P, rows=P, out="*fp64"),
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


# The steady state on the CPU (no host read, no host-to-device copy: the chunk and
# pointer tables are cached) is checked for every backend in test_no_sync.py.


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


@needs_gpu
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_cuda_graph_capture_and_replay_matches_eager(rule):
    shapes = [(512, 256), (256,), (64, 32, 3, 3), (0,)]
    assert_graph_replay_equals_eager(lambda: gpu_setup(rule, shapes))


@needs_gpu
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_warm_step_makes_no_host_sync(rule):
    params, opt = gpu_setup(rule, [(512, 256), (256,), (64, 32, 3, 3)])
    sin_grads(params, 0)
    opt.step()
    sin_grads(params, 1)
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
    sin_grads(params, 0)
    opt.step(lambda: sin_grads(params, 0))
    torch.cuda.synchronize()
    steps = [opt.state[p]["momentum_buffer"] for p in params]
    grads = [p.grad for p in params]
    saved_w = [torch.empty_like(p) for p in params]
    probe = [g * 1.01 for g in grads]
    torch.cuda.set_sync_debug_mode("error")
    try:
        w_sq = F.probe_shift_(params, steps, saved_w, [torch.empty_like(s) for s in steps], backend="triton")
        red = F.layerwise_reduce("cblr", params, grads, [s["age"] for s in map(opt.state.get, params)],
                                 [True] * len(params), F.Hyperparams(weight_decay=1e-4), probe_grads=probe,
                                 probe_steps=steps, backend="triton")
        F.probe_restore_(params, saved_w, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(params, saved_w))
    assert torch.isfinite(red.sums).all() and torch.isfinite(w_sq).all()


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
