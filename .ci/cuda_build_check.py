"""CI: the CUDA build check, everything short of running a kernel (no GPU needed).

Run with the interpreter of a venv holding torch's CUDA build, after the package was
installed there with the CUDA extension (.ci/cuda_build_check.sh does both):

1. the package imports; the CUDA extension (cblr_ext._C_cuda) owns the CUDA dispatch key:
   every op has a CUDA kernel, its schema is ops.SCHEMAS', and the Triton functions are
   not registered for CUDA (backend="triton" calls them directly);
2. the fakes run on (fake) CUDA tensors and give the shapes, dtypes and devices of the op
   contract;
3. every csrc/cuda/*.cu compiles alone with nvcc -c (torch-free), and ptxas -v shows no
   register spills and no stack frame for sm_90 (the figures are printed);
4. the Triton kernels compile to cubins for sm_80 and sm_90 with this torch's triton.

Exits non-zero at the first failed check.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The step ops and the Adam base's (cblr_ext/contract.py: STEP_OPS, ADAM_OPS).
OPS = ("layerwise_reduce", "layerwise_update_", "probe_shift_", "probe_restore_", "grad_sq_sums", "adam_reduce",
       "adam_update_")


def step(title):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(start):
    print(f"   ok ({time.perf_counter() - start:.1f} s)", flush=True)


def check_registration():
    import torch
    import cblr_ext
    from cblr_ext import backends, ops
    assert torch.version.cuda is not None, f"torch {torch.__version__} has no CUDA"
    print(f"   torch {torch.__version__} (CUDA {torch.version.cuda}), cblr_ext from {Path(cblr_ext.__file__).parent}")
    assert ops.LOAD_ERROR is None, f"the CPU extension did not load: {ops.LOAD_ERROR}"
    assert ops.cuda_kernels() == "cuda", f"the CUDA extension did not load: {ops.CUDA_LOAD_ERROR}"
    for name in OPS:
        for key in ("CUDA", "CPU", "CompositeExplicitAutograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{name}", key), (name, key)
        schema = str(getattr(torch.ops.cblr_ext, name).default._schema)
        assert schema == f"cblr_ext::{ops.SCHEMAS[name]}", f"{name}: {schema} != {ops.SCHEMAS[name]}"
    # The CUDA key's kernels are the extension's, not the Triton functions (the dispatch
    # table names the file that registered each kernel).
    for name in OPS:
        table = torch._C._dispatch_dump_table(f"cblr_ext::{name}")
        cuda_row = next(line for line in table.splitlines() if line.startswith("CUDA:"))
        assert "csrc/cuda/binding.cpp" in cuda_row, cuda_row
    print(f"   {cuda_row.strip()}")
    from cblr_ext.contract import ADAM_OPS, STEP_OPS
    assert OPS == STEP_OPS + ADAM_OPS, (OPS, STEP_OPS + ADAM_OPS)
    assert backends.why_unavailable("cuda", "cuda") is None, backends.why_unavailable("cuda", "cuda")
    assert backends.get("cuda", "cuda").updates_from_saved
    assert backends.why_unavailable("cuda", "cpu") is not None
    from cblr_ext.backends import triton as triton_backend
    assert backends.get("triton", "cuda").ops is triton_backend, "backend='triton' on CUDA must call triton directly"
    assert backends.resolve("auto", "cuda") == "cuda"
    # A CUDA kernel called with CPU tensors never runs: the dispatcher picks the CPU kernel.
    assert backends.available_backends("cpu")[:2] == ["reference", "cpp"]


def check_fakes():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    import cblr_ext.ops  # noqa: F401 (defines the ops)
    from cblr_ext.functional import FLAG_COLUMNS, SCALAR_DTYPE, STAT_COLUMNS, SUM_COLUMNS
    ops = torch.ops.cblr_ext
    with FakeTensorMode():
        dev = torch.device("cuda", 0)
        params = [torch.empty(10, device=dev), torch.empty(3, 4, device=dev, dtype=torch.bfloat16),
                  torch.empty(5, device=dev, dtype=torch.float16)]
        n = len(params)
        grads = [torch.empty_like(p) for p in params]
        scalars = [torch.empty((), device=dev) for _ in params]
        steps = [torch.empty_like(p, dtype=torch.float32) for p in params]
        ws = torch.empty(0, dtype=torch.uint8, device=dev)
        sums, median, flags = ops.layerwise_reduce("mclr", params, grads, scalars, [True] * n, [False] * n, [], [],
                                                   None, [], torch.empty((), device=dev), 0.0, 1, False, False,
                                                   True, ws)
        assert (sums.shape, sums.dtype, sums.device) == ((n, SUM_COLUMNS), torch.float64, dev), sums
        assert (median.shape, median.dtype, median.device) == ((n,), torch.float32, dev), median
        assert (flags.shape, flags.dtype, flags.device) == ((n, FLAG_COLUMNS), torch.bool, dev), flags
        stats = ops.layerwise_update_("lars", params, grads, steps, [], scalars, scalars,
                                      [torch.empty(3, device=dev) for _ in params], [False] * n, [], [True] * n,
                                      sums, median, flags, torch.empty((), dtype=torch.bool, device=dev), None,
                                      torch.empty((), device=dev), 0.9, False, 0.0, 1e-8, 1e-3, 0.0, None, 1e-3, 1,
                                      False, False, ws, None)
        assert (stats.shape, stats.dtype, stats.device) == ((n, STAT_COLUMNS), SCALAR_DTYPE, dev), stats
        saved = [torch.empty_like(p) for p in params]
        w_sq = ops.probe_shift_(params, steps, saved, [torch.empty_like(s) for s in steps])
        assert (w_sq.shape, w_sq.dtype, w_sq.device) == ((n,), torch.float64, dev), w_sq
        ops.probe_restore_(params, saved)
        moments = [torch.empty_like(p, dtype=torch.float32) for p in params]
        g2 = ops.grad_sq_sums(grads, None)
        assert (g2.shape, g2.dtype, g2.device) == ((n,), torch.float64, dev), g2
        clip = torch.empty((), device=dev)
        sums, median, flags = ops.adam_reduce("mclr", params, grads, moments, moments, scalars, None, clip, 0.9,
                                              0.999, 1e-6, 0.01, True)
        assert (sums.shape, sums.dtype, sums.device) == ((n, SUM_COLUMNS), torch.float64, dev), sums
        assert (median.shape, median.dtype, flags.shape, flags.dtype) == ((n,), torch.float32, (n, FLAG_COLUMNS),
                                                                          torch.bool), (median, flags)
        stats = ops.adam_update_("lars", params, grads, moments, moments, scalars, [True] * n, sums, median, flags,
                                 torch.empty((), dtype=torch.bool, device=dev), None, clip,
                                 torch.empty((), device=dev), 0.9, 0.999, 1e-6, 0.01, True, 1.0, None)
        assert (stats.shape, stats.dtype, stats.device) == ((n, STAT_COLUMNS), SCALAR_DTYPE, dev), stats


def cuda_home():
    sys.path.insert(0, str(REPO / "cblr_ext"))
    try:
        import _build
    finally:
        sys.path.pop(0)
    home = _build.find_cuda_home()
    assert home, "no CUDA toolkit found (nvcc on PATH or CUDA_HOME)"
    return home, _build


def check_cu_files():
    home, build = cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc")
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no csrc/cuda/*.cu"
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|caffe2)/')
    for path in sorted((REPO / "csrc" / "cuda").iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            assert not torch_include.search(path.read_text()), f"{path.name} includes a torch header"
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [nvcc, "-c", str(src), "-o", os.path.join(tmp, src.stem + ".o"), "-arch=sm_90", "-Xptxas", "-v",
                   *build.NVCC_FLAGS, *[f"-I{d}" for d in build.cuda_include_dirs()]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            assert out.returncode == 0, f"nvcc -c {src.name} failed:\n{out.stderr[-4000:]}"
            kernel = None
            for line in out.stderr.splitlines():
                m = re.search(r"Compiling entry function '([^']+)'", line)
                if m:
                    kernel = demangle(m.group(1))
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m:
                    stack, stores, loads = map(int, m.groups())
                m = re.search(r"Used (\d+) registers", line)
                if m and kernel:
                    smem = re.search(r"(\d+) bytes smem", line)
                    rows.append((src.name, kernel, int(m.group(1)), stack, stores, loads,
                                 int(smem.group(1)) if smem else 0))
                    if stores or loads or stack:
                        failures.append(f"{kernel}: {stack} B stack, {stores} B spill stores, {loads} B spill loads")
                    kernel = None
    print(f"   {'file':10} {'kernel (sm_90)':44} regs stack spill-st spill-ld smem")
    for r in rows:
        print(f"   {r[0]:10} {r[1][:44]:44} {r[2]:4} {r[3]:5} {r[4]:8} {r[5]:8} {r[6]:5}")
    assert rows, "ptxas reported no kernels"
    assert not failures, "register spills or stack frames:\n" + "\n".join(failures)


def demangle(name):
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    out = re.sub(r"cblr::cuda::\(anonymous namespace\)::", "", out)
    return re.sub(r"\(.*\)$", "", out)


def check_triton_cubins():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cblr_ext.kernels import chunks, closure, median, reduce, update

    print(f"   triton {triton.__version__}")
    P, C = "*i64", "constexpr"
    head = dict(chunks=P, ptrs=P, n_layers="i32")
    for arch in (80, 90):
        target = GPUTarget("cuda", arch, 32)
        built = 0

        def build(fn, signature, constexprs):
            nonlocal built
            sig = dict(signature, **{k: C for k in constexprs})
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                      options=dict(enable_fp_fusion=False))
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{arch}"
            built += 1

        for dt in (tl.float32, tl.bfloat16, tl.float16):
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
        print(f"   sm_{arch}: {built} cubins")


def main():
    for title, check in (("registration: the CUDA extension owns the CUDA key, same schemas", check_registration),
                         ("fakes on CUDA tensors", check_fakes),
                         ("csrc/cuda/*.cu: torch-free, nvcc -c alone, ptxas -v for sm_90", check_cu_files),
                         ("Triton kernels to cubins for sm_80 and sm_90", check_triton_cubins)):
        start = step(title)
        check()
        done(start)
    print("\nCUDA build check passed (no kernel was run: no GPU here)")


if __name__ == "__main__":
    main()
