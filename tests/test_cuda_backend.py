"""The CUDA backend (csrc/cuda/, cblr_ext._C_cuda).  CPU-runnable: the kernels are
torch-free, the build logic finds the toolkit behind an nvcc wrapper and skips CUDA with
the CPU wheel, and the backend says why it is unavailable.  The GPU tests (parity at real
sizes, the median bit-equal to torch.median, CUDA-graph replay, no host sync) skip
without a GPU and the CUDA extension.  CI's build check (.ci/cuda_build_check.py) covers
build, link, load, registrations, fakes and ptxas on the CPU machine.
"""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR, backends, functional as F, ops
from cblr_ext.backends import reference
from helpers import assert_graph_replay_equals_eager, max_rel_diff
from optim_db import BACKEND_DTYPES, TOLERANCE, cases

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
RULES = {"lars": LARS, "mclr": MCLR, "cblr": CBLR}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or ops.cuda_kernels() != "cuda",
                                reason="needs a CUDA GPU and the CUDA extension (cblr_ext._C_cuda)")


def _build_module():
    spec = importlib.util.spec_from_file_location("cblr_build", Path(cblr_ext.__file__).parent / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ CPU

def test_cuda_sources_are_torch_free():
    include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|caffe2)/')
    files = [p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    assert any(p.suffix == ".cu" for p in files)
    for path in files:
        assert not include.search(path.read_text()), path.name
    binding = (CUDA_DIR / "binding.cpp").read_text()
    assert not re.search(r"#\s*include\s*[<\"]ATen/cuda/", binding)  # CUDAContext.h needs cusparse.h


def test_the_toolkit_behind_an_nvcc_wrapper_is_found(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-x"
    (toolkit / "bin").mkdir(parents=True)
    real = toolkit / "bin" / "nvcc"
    real.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    real.chmod(0o755)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f"#!/bin/sh\nexec {real} \"$@\"\n")
    (wrappers / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}:/usr/bin:/bin")
    assert _build_module().find_cuda_home() == str(toolkit)


@pytest.mark.skipif(torch.version.cuda is not None, reason="the CPU wheel's behaviour")
def test_the_cpu_wheel_skips_cuda_cleanly():
    assert "has no CUDA" in _build_module().cuda_build_reason()
    assert ops.cuda_kernels() is None and ops.CUDA_LOAD_ERROR is not None
    assert "cuda" not in cblr_ext.available_backends("cpu")
    assert "not loaded" in backends.why_unavailable("cuda", "cuda")


def test_cuda_backend_runs_on_cuda_tensors_only():
    assert backends.why_unavailable("cuda", "cpu") is not None


# ------------------------------------------------------------------ GPU

def _model(dtype, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 33)).to(device, dtype)
    return model


def _run(cls, kwargs, backend, dtype, steps=7):
    model = _model(dtype, "cuda")
    opt = cls(model.parameters(), backend=backend, **kwargs)
    gen = torch.Generator("cuda").manual_seed(1)
    for t in range(steps):
        x = torch.randn(32, 64, generator=gen, device="cuda").to(dtype)
        y = torch.randn(32, 33, generator=gen, device="cuda").to(dtype)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            if t == 0:
                model[0].weight.grad[0, 0] = float("inf")  # a skipped step
            return loss
        opt.step(closure)
    return [p.detach() for p in model.parameters()], opt


@needs_cuda
@pytest.mark.parametrize("dtype", BACKEND_DTYPES["cuda"], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(cases("cuda")), ids=lambda c: c[0])
def test_parity_table_on_cuda(case, dtype):
    _, info, kwargs = case
    ref, ref_opt = _run(info.cls, kwargs, "reference", dtype)
    got, got_opt = _run(info.cls, kwargs, "cuda", dtype)
    assert got_opt.skipped_steps == ref_opt.skipped_steps == 1
    for i, (p, q) in enumerate(zip(ref, got)):
        assert max_rel_diff(p, q) <= TOLERANCE[dtype], f"parameter {i}"


def _model_shapes(suite):
    from bench.suites import SUITES
    return [shape for _, shape in SUITES[suite].shapes]


@needs_cuda
@pytest.mark.parametrize("suite", ["resnet50", "bert-large"])
@pytest.mark.parametrize("rule,kwargs", [("lars", {}), ("lars", dict(lag=1)), ("mclr", {}),
                                         ("mclr", dict(median="approx")), ("mclr", dict(lag=1)),
                                         ("cblr", {}), ("cblr", dict(nesterov=True))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_parity_at_real_sizes(suite, rule, kwargs, dtype):
    runs = []
    for backend in ("reference", "cuda"):
        gen = torch.Generator("cuda").manual_seed(0)
        params = [torch.randn(s, generator=gen, device="cuda").to(dtype).requires_grad_() for s in _model_shapes(suite)]
        opt = RULES[rule](params, lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend, **kwargs)
        for step in range(4):
            def closure():
                for i, p in enumerate(params):
                    p.grad = torch.sin(p.detach().float() * (step + 1) + i).to(dtype)
            closure()
            opt.step(closure)
        runs.append(params)
    for i, (p, q) in enumerate(zip(*runs)):
        assert max_rel_diff(p.detach(), q.detach()) <= TOLERANCE[dtype] * 10, f"parameter {i}"


@needs_cuda
@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("n", [1, 2, 7, 4096, 65537, 1_000_003])
def test_median_is_bit_equal_to_torch_median(n, approx):
    gen = torch.Generator("cuda").manual_seed(n)
    w = torch.randn(n, generator=gen, device="cuda")
    w[::5] = 0  # no quotient there
    g = torch.randn(n, generator=gen, device="cuda").round()  # ties
    hp = F.Hyperparams(weight_decay=1e-3, median="approx" if approx else "exact")
    ages = [torch.full((), float("inf"), device="cuda")]
    red = F.layerwise_reduce("mclr", [w], [g], ages, [True], hp, backend="cuda")
    ref = reference.layerwise_reduce("mclr", [w], [g], ages, [True], [False], [], [], None, [], 1e-3, 1, False,
                                     approx, True, F.empty_workspace(w.device))
    assert red.median.view(torch.int32).item() == ref[1].view(torch.int32).item()
    torch.testing.assert_close(red.sums[:, :2], ref[0][:, :2], rtol=1e-12, atol=0)


@needs_cuda
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_cuda_graph_capture_and_replay_matches_eager(rule):
    shapes = [(512, 256), (256,), (64, 32, 3, 3), (0,)]

    def setup():
        gen = torch.Generator("cuda").manual_seed(0)
        params = [torch.randn(s, generator=gen, device="cuda").requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, RULES[rule](params, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="cuda")

    assert_graph_replay_equals_eager(setup)


@needs_cuda
@pytest.mark.parametrize("rule", ["lars", "mclr", "cblr"])
def test_a_warm_step_makes_no_host_sync(rule):
    gen = torch.Generator("cuda").manual_seed(0)
    params = [torch.randn(s, generator=gen, device="cuda").requires_grad_() for s in [(512, 256), (256,)]]
    opt = RULES[rule](params, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="cuda")

    def closure():
        for i, p in enumerate(params):
            p.grad = torch.sin(p.detach() + i)
    for _ in range(2):
        closure()
        opt.step(closure)
    closure()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if rule == "cblr":  # the optimizer reads one flag per group; the ops must not sync
            steps = [opt.state[p]["momentum_buffer"] for p in params]
            saved = [torch.empty_like(p) for p in params]
            F.probe_shift_(params, steps, saved, [torch.empty_like(s) for s in steps], backend="cuda")
            F.probe_restore_(params, saved, backend="cuda")
        else:
            opt.step()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_fp64_is_rejected_clearly():
    p = torch.zeros(4, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        F.layerwise_reduce("lars", [p], [p], [torch.zeros((), device="cuda")], [True], F.Hyperparams(),
                           backend="cuda")
