#!/usr/bin/env bash
# CI: the CUDA build check (no GPU needed; .ci/cuda_build_check.py says what is checked).
# A venv with torch's CUDA build (torch==2.14.1: CUDA 13.0, triton 3.8), created once and
# reused while it holds that torch ($CBLR_CUDA_VENV, default /work/venv-cuda; ~5.5 GB,
# about a minute from this machine's local package index); the package is built and
# installed there (not in place: the main environment's cblr_ext/_C*.so stay as they are)
# with the CUDA extension for sm_80, sm_90 and sm_100.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV="${CBLR_CUDA_VENV:-/work/venv-cuda}"
TORCH_CUDA_VERSION=2.14.1
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_CUDA_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_CUDA_VERSION" ninja setuptools numpy
fi
echo "cuda build check: venv ready after $(( $(date +%s) - start )) s"
# The toolkit the nvcc on PATH runs (a wrapper script: torch would guess its parent folder).
unset TORCH_CUDA_ARCH_LIST CBLR_EXT_NO_CUDA
export MAX_JOBS="${MAX_JOBS:-2}"
log=$(mktemp)
if ! "$VENV/bin/pip" install --no-build-isolation --no-deps --force-reinstall . >"$log" 2>&1; then
  tail -n 60 "$log"; echo "cuda build check: the build failed"; exit 1
fi
grep -E "^cblr_ext:|error" "$log" || true
rm -f "$log"
(cd /tmp && "$VENV/bin/python" -c "import cblr_ext._C_cuda") 2>/dev/null || { echo "cuda build check: cblr_ext._C_cuda was not built"; exit 1; }
echo "cuda build check: built after $(( $(date +%s) - start )) s"
# Run from outside the repository root: the installed package is checked, not the sources.
(cd /tmp && "$VENV/bin/python" "$OLDPWD/.ci/cuda_build_check.py")
echo "cuda build check: done in $(( $(date +%s) - start )) s"
