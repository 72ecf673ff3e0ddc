"""Loading the C++ extensions: ``cblr_ext._C`` (CPU kernels) when setup.py built it, else
a JIT build of ``csrc/`` with ninja into a cache directory on first use (torch's own
extension cache, ``TORCH_EXTENSIONS_DIR``; rebuilt when a source changes); and
``cblr_ext._C_cuda`` (CUDA kernels, csrc/cuda/), built by setup.py when torch has CUDA
and nvcc is found, else JIT-built on first use when a GPU is present.

This file is also loaded by path from setup.py: it imports nothing of cblr_ext, and
torch only inside functions.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("binding.cpp", "cpu/dispatch.cpp", "cpu/isa_baseline.cpp", "cpu/isa_avx2.cpp", "cpu/isa_avx512.cpp")
# -ffp-contract=off: no fused multiply-add, so MCLR quotients are bit-identical across backends.
# -fno-trapping-math: lets gcc compute |d|/|w| for w = 0 lanes too and blend (vectorised
# quotient loops); results are unchanged, only FP exception traps are assumed off.
# -fno-math-errno: sqrtf need not set errno for a negative argument, so gcc emits vsqrtps
# instead of a scalar sqrtss with a library call behind it, and the Adam passes vectorise;
# every result is the same IEEE square root (no reassociation, unlike -ffast-math).
# No -march: the passes are compiled per instruction set and picked at run time
# (csrc/cpu/dispatch.h), so one build runs on every x86-64 CPU at its best.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
LINK_FLAGS = ["-fopenmp"]
JIT_NAME = "cblr_ext_cpu"

# The CUDA extension: torch-free kernels (each compiles alone with nvcc -c) and one binding.
CUDA_SOURCES = ("cuda/binding.cpp", "cuda/reduce.cu", "cuda/update.cu", "cuda/probe.cu", "cuda/adam.cu")
# --fmad=false: no fused multiply-add (bit-identical quotients and updates, as the CPU's
# -ffp-contract=off); IEEE division and square root (no --use_fast_math).
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "-lineinfo"]
CUDA_CXX_FLAGS = ["-O3"]
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0"  # sm_80, sm_90, sm_100; TORCH_CUDA_ARCH_LIST overrides
CUDA_JIT_NAME = "cblr_ext_cuda"
# CBLR_EXT_NO_JIT=1: a missing extension stays missing (an import records why) instead of
# being JIT-built on import; for a command that builds the extensions itself, under a limit.
NO_JIT = "CBLR_EXT_NO_JIT"

_loaded = None
_cuda_loaded = None


def source_paths() -> list:
    return [str(_CSRC / s) for s in SOURCES]


def jit_build(build_directory=None, verbose=False) -> str:
    """Compile csrc/ with ninja (MAX_JOBS bounds the parallel jobs) and load the ops."""
    from torch.utils import cpp_extension

    global _loaded
    if _loaded is not None:  # torch accepts one registration of the cblr_ext namespace per process
        raise RuntimeError(f"the cblr_ext ops are already loaded (from the {_loaded} build)")
    if not _CSRC.is_dir():
        raise ImportError(f"cblr_ext._C is not built and the C++ sources are missing ({_CSRC})")
    cpp_extension.load(name=JIT_NAME, sources=source_paths(), extra_cflags=CXX_FLAGS,
                       extra_ldflags=LINK_FLAGS, build_directory=build_directory,
                       is_python_module=False, verbose=verbose)
    _loaded = "jit"
    return _loaded


def load() -> str:
    """Register the ``torch.ops.cblr_ext`` ops once; returns how: "setup.py" or "jit"."""
    global _loaded
    if _loaded is None:
        try:
            importlib.import_module("cblr_ext._C")
            _loaded = "setup.py"
        except ImportError as exc:
            if os.environ.get(NO_JIT) == "1":
                raise ImportError(f"cblr_ext._C is not built and {NO_JIT}=1") from exc
            jit_build()
    return _loaded


# ------------------------------------------------------------------- CUDA

def cuda_source_paths() -> list:
    return [str(_CSRC / s) for s in CUDA_SOURCES]


def _nvcc_toolkit(nvcc: str):
    """The toolkit an nvcc runs (a wrapper script's too): ``nvcc --dryrun`` prints it as TOP."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cu"
        source.write_text("")
        try:
            done = subprocess.run([nvcc, "--dryrun", "-c", str(source), "-o", str(Path(tmp) / "probe.o")],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", done.stdout + done.stderr, re.MULTILINE)
    if not match:
        return None
    return os.path.realpath(match.group(1).strip())


def find_cuda_home():
    """The CUDA toolkit to build with: $CUDA_HOME (or $CUDA_PATH) when set, else the
    toolkit that the nvcc on PATH runs.  torch guesses the parent of nvcc's folder, which
    is wrong for a wrapper script (the link then fails: cannot find -lcudart).  None when
    no nvcc is found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    top = _nvcc_toolkit(nvcc)
    if top and os.path.exists(os.path.join(top, "bin", "nvcc")):
        return top
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_build_reason():
    """Why the CUDA extension is not built here (None: it is): torch without CUDA (the CPU
    wheel: torch.version.cuda is None), no nvcc, or CBLR_EXT_NO_CUDA=1.  Sets CUDA_HOME
    (the environment and torch's cpp_extension) and a default TORCH_CUDA_ARCH_LIST when
    it is built."""
    import torch
    if os.environ.get("CBLR_EXT_NO_CUDA") == "1":
        return "CBLR_EXT_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    home = find_cuda_home()
    if home is None:
        return "nvcc is not on PATH and CUDA_HOME is not set"
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = home  # torch read it on import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return None


def cuda_include_dirs() -> list:
    """CUB and thrust: CUDA 13 keeps them in include/cccl."""
    home = os.environ.get("CUDA_HOME") or find_cuda_home()
    cccl = os.path.join(home, "include", "cccl") if home else None
    return [cccl] if cccl and os.path.isdir(cccl) else []


def jit_build_cuda(build_directory=None, verbose=False) -> str:
    """Compile csrc/cuda/ with ninja and load its CUDA kernels."""
    from torch.utils import cpp_extension

    global _cuda_loaded
    reason = cuda_build_reason()
    if reason is not None:
        raise ImportError(f"the CUDA kernels are not built: {reason}")
    cpp_extension.load(name=CUDA_JIT_NAME, sources=cuda_source_paths(), extra_cflags=CUDA_CXX_FLAGS,
                       extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=cuda_include_dirs(),
                       build_directory=build_directory, is_python_module=False, verbose=verbose)
    _cuda_loaded = "jit"
    return _cuda_loaded


def load_cuda() -> str:
    """Register the CUDA kernels of the ops once: "setup.py" (cblr_ext._C_cuda), "jit"
    (built now: only with a GPU present), or ImportError with the reason."""
    global _cuda_loaded
    if _cuda_loaded is None:
        import torch
        if torch.version.cuda is None:
            raise ImportError(f"torch {torch.__version__} has no CUDA")
        try:
            importlib.import_module("cblr_ext._C_cuda")
            _cuda_loaded = "setup.py"
        except ImportError as exc:
            if os.environ.get(NO_JIT) == "1":
                raise ImportError(f"cblr_ext._C_cuda is not built and {NO_JIT}=1") from exc
            if not torch.cuda.is_available():
                raise ImportError(f"cblr_ext._C_cuda is not built ({exc}) and no GPU is present to JIT-build "
                                  "it for") from exc
            if not (_CSRC / "cuda").is_dir():
                raise ImportError(f"cblr_ext._C_cuda is not built and the CUDA sources are missing") from exc
            jit_build_cuda()
    return _cuda_loaded
