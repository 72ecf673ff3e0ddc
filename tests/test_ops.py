"""Every op passes ``torch.library.opcheck`` (schema, fake, autograd registration,
AOT dispatch) with the kernels of every backend available here: cpp through its CPU
registration; the reference and Triton (interpreter) kernels registered for the CPU
key for the test's duration."""
import contextlib
import math
import warnings

import pytest
import torch

import cblr_ext
from cblr_ext import functional as F
from cblr_ext import ops

BACKENDS = cblr_ext.available_backends("cpu")


@contextlib.contextmanager
def cpu_kernels(backend):
    """Run ``backend``'s kernels for CPU tensors through the dispatcher."""
    if backend == "cpp":
        yield
        return
    module = cblr_ext.backends.get(backend, "cpu").ops
    with torch.library._scoped_library("cblr_ext", "IMPL") as lib, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning only once", UserWarning)  # overriding cpp's kernels: meant
        for name in ("layerwise_reduce", "layerwise_update_", "probe_shift_", "probe_restore_"):
            lib.impl(name, getattr(module, name), "CPU")
        yield


def tensors(gen, *shapes, dtype=torch.float32):
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


SHAPES = [(5, 3), (40,)]
GRAD_SCALE = torch.tensor(4.0)  # GradScaler's scale: the kernels unscale g by it


def reduce_args(rule, gen, probe=False, lag=False):
    ws, gs = tensors(gen, *SHAPES), tensors(gen, *SHAPES)
    ages = [torch.tensor(math.inf), torch.tensor(math.inf)]
    probe_grads = tensors(gen, *SHAPES) if probe else []
    steps = tensors(gen, *SHAPES) if probe else []
    # A probed layer sits at w_t + s: Σw_t² comes from the shift.
    w_sq = torch.stack([w.double().square().sum() for w in ws]) if probe else None
    return (rule, ws, gs, ages, [True, True], [lag, False], probe_grads, steps, w_sq, [probe, probe],
            GRAD_SCALE, 1e-3, 1, lag, False, True, F.empty_workspace("cpu"))


def update_args(rule, gen, lag=False, momentum=0.9):
    """Every layer adapted and measured, so that no output holds a NaN (opcheck compares
    without equal_nan)."""
    ws, gs = tensors(gen, *SHAPES), tensors(gen, *SHAPES)
    ages = [torch.tensor(math.inf), torch.tensor(math.inf)]
    sums, median, flags = ops.OPS.layerwise_reduce(*reduce_args(rule, torch.Generator().manual_seed(9),
                                                                probe=rule == "cblr"))
    buffers = [torch.zeros_like(w) for w in ws] if momentum else []
    lagged = [torch.tensor([1.0, 2.0, 3.0], dtype=F.SCALAR_DTYPE), torch.zeros(3, dtype=F.SCALAR_DTYPE)] if lag else []
    return (rule, ws, gs, buffers, [], [torch.tensor(0.5, dtype=F.SCALAR_DTYPE), torch.tensor(0.25, dtype=F.SCALAR_DTYPE)], ages, lagged, [lag, False],
            [], [True, True], sums, median, flags, torch.tensor(False), GRAD_SCALE, torch.tensor(0.1), momentum, False,
            1e-3, 1e-8, 1e-3, 0.0, None, 1e-3, 1, lag, False, F.empty_workspace("cpu"), None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["lars", "mclr", "cblr"])
def test_opcheck_reduce_and_update(backend, rule):
    gen = torch.Generator().manual_seed(0)
    with cpu_kernels(backend):
        torch.library.opcheck(ops.OPS.layerwise_reduce.default, reduce_args(rule, gen, probe=rule == "cblr"))
        torch.library.opcheck(ops.OPS.layerwise_update_.default, update_args(rule, gen))
        if rule != "cblr":
            torch.library.opcheck(ops.OPS.layerwise_reduce.default, reduce_args(rule, gen, lag=True))
            torch.library.opcheck(ops.OPS.layerwise_update_.default, update_args(rule, gen, lag=True, momentum=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_probe_shift_and_restore(backend):
    gen = torch.Generator().manual_seed(1)
    ws, steps = tensors(gen, *SHAPES), tensors(gen, *SHAPES)
    with cpu_kernels(backend):
        torch.library.opcheck(ops.OPS.probe_shift_.default, (ws, steps, [torch.empty_like(w) for w in ws],
                                                             [torch.empty_like(s) for s in steps]))
        torch.library.opcheck(ops.OPS.probe_restore_.default, (ws, tensors(gen, *SHAPES)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_returns_the_squares_of_w_t(backend):
    gen = torch.Generator().manual_seed(2)
    ws, steps = tensors(gen, *SHAPES), tensors(gen, *SHAPES)
    w_t = [w.clone() for w in ws]
    saved, moved = [torch.empty_like(w) for w in ws], [torch.empty_like(s) for s in steps]
    w_sq = F.probe_shift_(ws, steps, saved, moved, backend=backend)
    assert w_sq.dtype == torch.float64
    torch.testing.assert_close(w_sq, torch.stack([w.double().square().sum() for w in w_t]), rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(saved, w_t))
    assert all(torch.equal(w, a + s) for w, a, s in zip(ws, w_t, steps))
    assert all(torch.equal(d, w - a) for d, w, a in zip(moved, ws, w_t))  # what the shift really moved
    F.probe_restore_(ws, saved, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(ws, w_t))


def test_ops_are_declared_once_in_python():
    assert set(ops.SCHEMAS) == {"layerwise_reduce", "layerwise_update_", "probe_shift_", "probe_restore_",
                                "cpu_isa", "grad_sq_sums", "adam_reduce", "adam_update_", "adam_secant_sums",
                                "adam_secant_update_", "median_histogram",
                                "median_candidates", "median_candidate_histogram"}
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(ops.OPS, name).default._schema).startswith(f"cblr_ext::{name}(")


def test_the_adam_ops_pass_opcheck():
    """The Adam base's ops against their fakes and schemas (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(3)
    ws = tensors(gen, *SHAPES)
    gs = tensors(gen, *SHAPES)
    ms, vs = tensors(gen, *SHAPES), [t.abs() for t in tensors(gen, *SHAPES)]
    steps = [torch.tensor(2.0) for _ in SHAPES]
    for rule in ("lars", "mclr"):
        reduce_args = (rule, ws, gs, ms, vs, steps, None, None, 0.9, 0.999, 1e-6, 0.01, True)
        torch.library.opcheck(ops.OPS.adam_reduce.default, reduce_args)
        sums, median, flags = ops.OPS.adam_reduce(*reduce_args)
        torch.library.opcheck(ops.OPS.adam_update_.default,
                              (rule, [w.clone() for w in ws], gs, [m.clone() for m in ms], [v.clone() for v in vs],
                               [s.clone() for s in steps], [True] * len(ws), sums, median, flags,
                               torch.tensor(False), None, None, torch.tensor(0.01), 0.9, 0.999, 1e-6, 0.01, True,
                               1.0, None))
    torch.library.opcheck(ops.OPS.grad_sq_sums.default, (gs, None))
