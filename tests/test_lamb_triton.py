"""LAMB and the median rule on the Adam direction with backend="triton".

On the CPU the kernels run in the Triton interpreter at small sizes: LAMB against the
fp64 formula of tests/test_lamb.py, the ops element-wise against the reference kernels
(backends/reference_adam.py) on layers around the chunk size, the skipped step, bf16
parameters, the ops' contract (fakes, mutability, bad input, no host traffic), and the
kernels built for a CUDA target.  The GPU tests (opcheck through the dispatcher, parity at
model sizes) skip without a GPU.

Where the kernels and the reference may differ: the per-layer sums are fp64 in another
order, and torch's CPU square root is not correctly rounded (AVX2, torch 2.13) where the
kernels' is, so u may differ by an ulp of fp32; m, v and the step count depend on
neither and are compared bit for bit.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cblr_ext import LAMB, ops  # noqa: E402
from cblr_ext.backends import reference_adam as ra, triton as tb  # noqa: E402
from cblr_ext.contract import FLAG_MEDIAN, FLAG_NORMS, SCHEMAS  # noqa: E402
from test_lamb import _problem, _run, lamb_formula  # noqa: E402
from test_no_sync import kernel_launches_paused  # noqa: E402,F401 (a fixture)

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET was not 1 when triton was imported")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BETAS, EPS = (0.9, 0.999), 1e-6


@interpreted
@pytest.mark.parametrize("case", [
    dict(weight_decay=0.1, max_grad_norm=1.0, max_ratio=3.0),  # the trust clip binds on some layers and steps
    dict(weight_decay=0.05, rule="mclr", trust_coefficient=0.02),
])
def test_matches_the_formula_over_20_steps(case):
    ws, grads = _problem(0, scale=3.0)
    formula = {k: v for k, v in case.items() if k != "trust_coefficient"}
    expected = lamb_formula(ws, grads, 0.01, BETAS, EPS, trust=case.get("trust_coefficient", 1.0), **formula)
    params, opt = _run(ws, grads, lr=0.01, eps=EPS, backend="triton", **dict(dict(max_grad_norm=None), **case))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)
    assert opt.skipped_steps == 0
    assert all(s["step"].item() == 20 for s in opt.state.values())


def layer_inputs(shapes, dtype=torch.float32, seed=0, step=4.0):
    """Parameters, gradients (×64, for a grad scale of 64) and Adam state some steps in."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 64).to(dtype) for s in shapes]
    exp_avgs = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 0.01 for s in shapes]
    steps = [torch.full((), step) for _ in shapes]
    return params, grads, exp_avgs, exp_avg_sqs, steps


def both_backends(rule, shapes, dtype=torch.float32, clip=1.7, bias_correction=True):
    """One step of the ops on each backend from the same inputs (the last layer not
    adapted): {backend: (reduction, stats, params, exp_avgs, exp_avg_sqs, steps)}."""
    hp = dict(beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=0.01, bias_correction=bias_correction)
    grad_scale = torch.tensor(64.0)
    clip = None if clip is None else torch.tensor(clip)
    out, reductions = {}, {}
    for name, backend in (("reference", ra), ("triton", tb)):
        params, grads, m, v, steps = layer_inputs(shapes, dtype)
        reductions[name] = backend.adam_reduce(rule, params, grads, m, v, steps, grad_scale, clip, **hp)
    for name, backend in (("reference", ra), ("triton", tb)):
        params, grads, m, v, steps = layer_inputs(shapes, dtype)
        stats = backend.adam_update_(rule, params, grads, m, v, steps, [True] * (len(shapes) - 1) + [False],
                                     *reductions[name], torch.tensor(0.0), grad_scale, clip, torch.tensor(0.01), **hp,
                                     trust_coefficient=0.5, max_ratio=None)
        out[name] = (reductions[name], stats, params, m, v, steps)
    return out


def assert_same_step(out, w_rtol=1e-6):
    (r_red, r_stats, r_w, r_m, r_v, r_steps), (t_red, t_stats, t_w, t_m, t_v, t_steps) = out.values()
    torch.testing.assert_close(t_red[0], r_red[0], rtol=1e-6, atol=0)  # Σw², Σu²
    torch.testing.assert_close(t_red[1], r_red[1], rtol=1e-6, atol=0, equal_nan=True)  # the median
    assert torch.equal(t_red[2], r_red[2])
    torch.testing.assert_close(t_stats, r_stats, rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(t_w, r_w):  # an ulp of α·u is an absolute error in w: relative to the layer's peak
        peak = b.float().abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=w_rtol, atol=w_rtol * peak)
    for a, b in zip(t_m + t_v + t_steps, r_m + r_v + r_steps):
        assert torch.equal(a, b)


# Around the chunk size of the Triton backend (backends/triton.py): one chunk less one
# element, exactly one, one and an element; a layer of no elements, not adapted.
CHUNK_SHAPES = [(tb.CHUNK - 1,), (64, tb.CHUNK // 64), (tb.CHUNK + 1,), (0, 3)]


@interpreted
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_ops_match_the_reference_across_the_chunk_boundary(rule):
    """GradScaler's 1/S and the clip divisor applied in the kernel; m, v and the step
    count bit-equal, the step count advanced (the empty layer's too)."""
    out = both_backends(rule, CHUNK_SHAPES)
    assert_same_step(out)
    assert all(s.item() == 5.0 for s in out["triton"][5])
    moved = [not torch.equal(a, b) for a, b in zip(out["triton"][2], layer_inputs(CHUNK_SHAPES)[0])]
    assert moved == [True, True, True, False]


@interpreted
def test_without_bias_correction_or_clip_the_ops_match_the_reference():
    assert_same_step(both_backends("lars", [(7, 5), (3,)], clip=None, bias_correction=False))


@interpreted
def test_grad_sq_sums_match_the_reference():
    _, grads, *_ = layer_inputs([(tb.CHUNK + 1,), (5, 3), (0,)], torch.bfloat16)
    scale = torch.tensor(64.0)
    torch.testing.assert_close(tb.grad_sq_sums(grads, scale), ra.grad_sq_sums(grads, scale), rtol=1e-12, atol=0)


@interpreted
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_the_update_completes_a_reduction_that_left_out_the_norms_and_the_median(rule):
    """A reduction made elsewhere (here: the reference's, its flags saying nothing was
    taken and its sums garbage) gives the step of the update's own pass."""
    shapes = [(9, 4), (17,), (0, 3)]
    own = both_backends(rule, shapes)["triton"]
    params, grads, m, v, steps = layer_inputs(shapes)
    sums, median, flags = ra.adam_reduce(rule, params, grads, m, v, steps, torch.tensor(64.0), torch.tensor(1.7),
                                         BETAS[0], BETAS[1], EPS, 0.01, True)
    flags[:, FLAG_NORMS] = flags[:, FLAG_MEDIAN] = False
    stats = tb.adam_update_(rule, params, grads, m, v, steps, [True, True, False], sums * 7, median * 3, flags,
                            torch.tensor(0.0), torch.tensor(64.0), torch.tensor(1.7), torch.tensor(0.01), BETAS[0],
                            BETAS[1], EPS, 0.01, True, 0.5, None)
    torch.testing.assert_close(stats, own[1], rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(params + m + v + steps, own[2] + own[3] + own[4] + own[5]))


@interpreted
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_bf16_parameters_take_fp32_moments_and_match_the_reference(rule):
    out = both_backends(rule, [(tb.CHUNK + 1,), (6, 5), (0,)], dtype=torch.bfloat16)
    # w rounds to bf16 after the update: the fp32 ulp of u may move it by one bf16 ulp.
    assert_same_step(out, w_rtol=2 ** -8)
    assert all(t.dtype == torch.bfloat16 for t in out["triton"][2])


@interpreted
def test_lamb_keeps_fp32_moments_of_bf16_parameters():
    ws, grads = _problem(7, steps=3)
    runs = []
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(x.bfloat16()) for x in ws]
        opt = LAMB(params, lr=0.01, backend=backend, max_grad_norm=None)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.bfloat16()
            opt.step()
        runs.append((params, [opt.state[p] for p in params]))
    (r_params, r_state), (t_params, t_state) = runs
    for a, b in zip(t_params, r_params):
        torch.testing.assert_close(a, b, rtol=2 ** -8, atol=0)
    for a, b in zip(t_state, r_state):
        assert a["exp_avg"].dtype == a["exp_avg_sq"].dtype == torch.float32 and a["step"].item() == 3
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])  # g² does not depend on w


@interpreted
@pytest.mark.parametrize("how", ["nan_grad", "grad_scaler"])
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_skipped_step_changes_nothing(rule, how):
    ws, grads = _problem(4, steps=2)
    params, opt = _run(ws, grads, lr=0.01, weight_decay=0.01, rule=rule, backend="triton")
    before = copy.deepcopy((params, opt.state_dict()["state"]))
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    if how == "nan_grad":
        params[1].grad[0] = float("nan")
    else:
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    after = opt.state_dict()["state"]
    for p, b in zip(params, before[0]):
        assert torch.equal(p, b)
    for key, value in before[1].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after[key][name], value[name]), (key, name)
    assert opt.skipped_steps == 1
    assert all(s["step_norm"] == 0.0 for s in opt.layer_stats().values())


# ------------------------------------------------------------ the ops' contract

def op_cases():
    params, grads, m, v, steps = layer_inputs([(9, 4), (17,), (0, 3)])
    common = dict(params=params, grads=grads, exp_avgs=m, exp_avg_sqs=v, steps=steps, grad_scale=torch.tensor(64.0),
                  clip=torch.tensor(1.7), beta1=0.9, beta2=0.999, eps=EPS, weight_decay=0.01, bias_correction=True)
    yield "grad_sq_sums", dict(grads=grads, grad_scale=torch.tensor(64.0))
    for rule in ("lars", "mclr"):
        yield "adam_reduce", dict(common, rule=rule)
        red = tb.adam_reduce(rule, params, grads, m, v, steps, common["grad_scale"], common["clip"], 0.9, 0.999, EPS,
                             0.01, True)
        yield "adam_update_", dict(common, rule=rule, adapt=[True, False, True], sums=red[0], median=red[1],
                                   flags=red[2], found_inf=torch.tensor(0.0), lr=torch.tensor(0.01),
                                   trust_coefficient=1.0, max_ratio=2.0)


def _schema(name):
    return torch._C.parse_schema(f"cblr_ext::{SCHEMAS[name]}")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


def _same(a, b) -> bool:
    """Bit-equal values, NaN equal to NaN (the median of a layer without elements)."""
    return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(), b.nan_to_num()))


FAKES = {"grad_sq_sums": ops._grad_sq_sums_fake, "adam_reduce": ops._adam_reduce_fake,
         "adam_update_": ops._adam_update_fake}


@interpreted
@pytest.mark.parametrize("case", range(5))
def test_ops_return_what_their_fakes_say_and_write_only_mutable_arguments(case):
    """``opcheck`` needs the dispatcher, which runs these kernels only on CUDA tensors
    (see the GPU test below): on the CPU, the functions against the fakes' shapes and
    dtypes and the schema's mutability (what is not marked ``!`` is bit-equal afterwards;
    what was written through raw pointers moved its version counter)."""
    name, kwargs = list(op_cases())[case]
    schema = _schema(name)
    args = [kwargs[a.name] for a in schema.arguments]
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    before = {k: [(t.clone(), t._version) for t in _tensors(v)] for k, v in kwargs.items()}
    out = getattr(tb, name)(*args)
    fake = FAKES[name](*args)
    assert [(t.shape, t.dtype) for t in _tensors(out)] == [(t.shape, t.dtype) for t in _tensors(fake)]
    changed = set()
    for k, v in kwargs.items():
        for (old, version), t in zip(before[k], _tensors(v)):
            if not _same(old, t):
                changed.add(k)
                assert t._version > version, f"{name}: {k} written without a version bump"
    assert changed <= mutable, f"{name} wrote {changed - mutable}, not marked mutable in its schema"
    if name == "adam_update_":
        assert changed == {"params", "exp_avgs", "exp_avg_sqs", "steps"}
    else:
        assert not changed


@interpreted
@pytest.mark.parametrize("bad", ["bf16_moment", "fp64_step", "two_clips", "short_steps", "fp64_param"])
def test_bad_input_is_refused_before_anything_changes(bad):
    kwargs = list(op_cases())[2][1]  # lars' update
    if bad == "bf16_moment":
        kwargs["exp_avgs"] = [kwargs["exp_avgs"][0].bfloat16()] + kwargs["exp_avgs"][1:]
    elif bad == "fp64_step":
        kwargs["steps"] = [kwargs["steps"][0].double()] + kwargs["steps"][1:]
    elif bad == "two_clips":
        kwargs["clip"] = torch.tensor([1.7, 1.7])
    elif bad == "short_steps":
        kwargs["steps"] = kwargs["steps"][:2]
    else:
        kwargs["params"] = [kwargs["params"][0].double()] + kwargs["params"][1:]
    before = copy.deepcopy(kwargs)
    with pytest.raises(ValueError, match="triton backend"):
        tb.adam_update_(*[kwargs[a.name] for a in _schema("adam_update_").arguments])
    for k, v in kwargs.items():
        assert all(_same(a, b) for a, b in zip(_tensors(v), _tensors(before[k])))


@interpreted
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_steady_state_lamb_step_reads_nothing_on_the_host(rule, kernel_launches_paused):
    """As tests/test_no_sync.py for the SGD base: the third step (the first creates the
    state, the second the cached tables), clipping and a tensor learning rate on."""
    params = [torch.randn(s, generator=torch.Generator().manual_seed(0)).requires_grad_()
              for s in [(6, 7), (3, 2, 3, 3), (9,), (0, 4)]]
    opt = LAMB(params, lr=torch.tensor(0.01), rule=rule, max_grad_norm=1.0, backend="triton")
    for p in params:
        p.grad = torch.zeros_like(p)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad.copy_(torch.sin(p.detach() * 3 + i + step))
        if step == 2:
            with kernel_launches_paused:
                opt.step()
        else:
            opt.step()
    assert kernel_launches_paused.events == []


# --------------------------------------------------- kernels build for a GPU

COMPILE_SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cblr_ext.kernels import adam

    P, C = "*i64", "constexpr"
    def build(fn, signature, constexprs):
        sig = dict(signature, **{k: C for k in constexprs})
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(enable_fp_fusion=False))
    scalars = dict(bc1="*fp32", bc2="*fp32", unscale="*fp32", clip="*fp32", beta1="fp32", one_minus_beta1="fp32",
                   beta2="fp32", one_minus_beta2="fp32", eps="fp32", weight_decay="fp32")
    head = dict(chunks=P, ptrs=P, n_layers="i32", partials="*fp64")
    for dt in (tl.float32, tl.bfloat16):
        build(adam.adam_stats_kernel, dict(head, hist="*i32", prefix="*i32", **scalars),
              dict(DTYPE=dt, CLIP=True, STATS=True, HIST=True, FILTER=True, SHIFT=16, BITS=15, BLOCK=4096))
        build(adam.adam_update_kernel, dict(head, alpha="*fp32", skip="*u8", **scalars),
              dict(DTYPE=dt, CLIP=True, BLOCK=4096))
""")


def test_kernels_compile_for_a_cuda_target():
    """The interpreter does not type-check like the compiler: build both kernels to a
    cubin for sm_90 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("ptxas is not available")
    assert done.returncode == 0, done.stderr[-3000:]


UNINTERPRETED_SCRIPT = textwrap.dedent("""
    import torch
    from cblr_ext import LAMB, functional
    from cblr_ext.backends import BackendUnavailable
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = LAMB(params, lr=0.01, backend="reference")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # state to keep
    before = [p.detach().clone() for p in params], [{k: t.clone() for k, t in s.items()} for s in opt.state.values()]
    opt.param_groups[0]["backend"] = "triton"
    try:
        opt.step()
    except BackendUnavailable as exc:
        assert "TRITON_INTERPRET=1" in str(exc), exc
    else:
        raise AssertionError("a step on CPU tensors without the interpreter did not raise")
    assert all(torch.equal(p, b) for p, b in zip(params, before[0]))
    for s, b in zip(opt.state.values(), before[1]):
        assert all(torch.equal(s[k], b[k]) for k in b), "a moment or step count changed"
    try:
        functional.probe_restore_(list(params), [p.detach() for p in params], backend="triton")
    except BackendUnavailable as exc:
        assert "TRITON_INTERPRET=1" in str(exc), exc
    else:
        raise AssertionError("the functional call did not raise")
""")


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error_before_anything_changes():
    """backend="triton" resolved by name (no device yet) checks the tensors' device at the
    first op: without TRITON_INTERPRET=1 (a fresh process) a CPU step raises
    BackendUnavailable naming the fix, with parameters, moments and step counts unchanged."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on a machine with a GPU too
    done = subprocess.run([sys.executable, "-c", UNINTERPRETED_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------- GPU

triton_owns_cuda = pytest.mark.skipif(ops.cuda_kernels() != "triton",
                                      reason="the Triton kernels own the CUDA key only without the CUDA extension")


@needs_gpu
@triton_owns_cuda
@pytest.mark.parametrize("case", range(5))
def test_opcheck_on_cuda(case):
    name, kwargs = list(op_cases())[case]
    kwargs = {k: [t.cuda() for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
              else v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    args = tuple(kwargs[a.name] for a in _schema(name).arguments)
    torch.library.opcheck(getattr(torch.ops.cblr_ext, name), args)


@needs_gpu
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_gpu_parity_at_model_sizes(rule):
    from bench.suites import SUITES  # the repository's model-shape suites
    shapes = [shape for _, shape in SUITES["resnet50"].shapes]
    runs = []
    for backend in ("reference", "triton"):
        gen = torch.Generator("cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, device="cuda")) for s in shapes]
        opt = LAMB(params, lr=0.01, rule=rule, backend=backend)
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * 3 + i + step)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
