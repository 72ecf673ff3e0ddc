"""Loading the C++ extension: ``cblr_ext._C`` when setup.py built it, else a JIT build
of ``csrc/`` with ninja into a cache directory on first use (torch's own extension
cache, ``TORCH_EXTENSIONS_DIR``; rebuilt when a source changes)."""
from __future__ import annotations

import importlib
from pathlib import Path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("binding.cpp", "cpu/dispatch.cpp", "cpu/isa_baseline.cpp", "cpu/isa_avx2.cpp", "cpu/isa_avx512.cpp")
# -ffp-contract=off: no fused multiply-add, so MCLR quotients are bit-identical across backends.
# -fno-trapping-math: lets gcc compute |d|/|w| for w = 0 lanes too and blend (vectorised
# quotient loops); results are unchanged, only FP exception traps are assumed off.
# No -march: the passes are compiled per instruction set and picked at run time
# (csrc/cpu/dispatch.h), so one build runs on every x86-64 CPU at its best.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
JIT_NAME = "cblr_ext_cpu"

_loaded = None


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
        except ImportError:
            jit_build()
    return _loaded
