"""What this machine and this checkout's build have, as JSON: the probe stage writes it,
the stages read it (the GPU's compute capability decides the architecture to build).

``python -m cblr_ext.gpu_check.probe FILE [--require cpu|cuda]``: with ``--require``,
exit 1 unless the CPU extension (and, for ``cuda``, the CUDA extension owning the CUDA
key) loaded.  Run with CBLR_EXT_NO_JIT=1: a missing extension is reported, not built.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc_version():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if "release" in line), None)


def machine() -> dict:
    """Versions, cores and the GPU (imports torch, not cblr_ext)."""
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": _version("triton"), "nvcc": _nvcc_version(), "cpu_count": os.cpu_count(),
            "cuda_available": torch.cuda.is_available(), "gpu": None}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                       "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                       "l2_mib": props.L2_cache_size / 2**20}
    return info


def build() -> dict:
    """Which of this checkout's extensions loaded (imports cblr_ext)."""
    import cblr_ext
    from cblr_ext import ops
    return {"cblr_ext": str(Path(cblr_ext.__file__).parent), "cpu_extension_error": _text(ops.LOAD_ERROR),
            "cuda_kernels": ops.cuda_kernels(), "cuda_extension_error": _text(ops.CUDA_LOAD_ERROR)}


def _text(error):
    return None if error is None else f"{type(error).__name__}: {error}"


def unmet(built: dict, require: str) -> list:
    """What ``require`` ("cpu" or "cuda") asks of the build that ``built`` lacks."""
    missing = []
    if built["cpu_extension_error"] is not None:
        missing.append(f"the CPU extension did not load ({built['cpu_extension_error']})")
    if require == "cuda" and built["cuda_kernels"] != "cuda":
        missing.append(f"the CUDA extension does not own the CUDA key ({built['cuda_extension_error']})")
    return missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cblr_ext.gpu_check.probe", description=__doc__)
    ap.add_argument("file", type=Path)
    ap.add_argument("--require", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    info = machine()
    if args.require:
        info["build"] = build()
    args.file.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    missing = unmet(info["build"], args.require) if args.require else []
    for line in missing:
        print(f"build check: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
