#!/usr/bin/env bash
# CI: the oldest supported versions, torch 2.11 and Triton 3.6 (what the lent GPU machines
# hold: torch 2.11.0+cu130, triton 3.6.0).  A venv with torch==2.11.0 (PyPI's default
# wheel, CUDA 13.0) and triton==3.6.0, created once and reused while it holds that torch
# ($CBLR_TORCH211_VENV, default /work/venv-torch211; ~5 GB).  The package is installed
# there (not in place: the main environment's cblr_ext/_C*.so stay as they are), with the
# CUDA extension for sm_90 only where the wheel's CUDA major matches nvcc's; then:
# 1. a fast subset of the tests (API, parity of reference/cpp/Triton interpreter,
#    conformance, torch.compile) against the installed package;
# 2. where the CUDA extension was built, .ci/cuda_build_check.py's checks (build, link,
#    load, registrations, fakes, Triton 3.6 cubins; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$(date +%s)
VENV="${CBLR_TORCH211_VENV:-/work/venv-torch211}"
TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
if ! "$VENV/bin/python" -c "import torch, importlib.metadata as m, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or m.version('triton') != '$TRITON_VERSION')" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" ninja setuptools numpy
fi
"$VENV/bin/pip" install -q "setuptools>=64" wheel pytest hypothesis scipy tqdm matplotlib
echo "torch 2.11 check: venv ready after $(( $(date +%s) - start )) s"

# The CUDA extension only where the wheel's CUDA major is nvcc's (torch refuses a mismatch).
torch_cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
nvcc_cuda=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p' || true)
if [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" = "${nvcc_cuda%%.*}" ]; then
  unset CBLR_EXT_NO_CUDA; with_cuda=1
  export TORCH_CUDA_ARCH_LIST="9.0"
else
  export CBLR_EXT_NO_CUDA=1; with_cuda=0
  echo "torch 2.11 check: no CUDA extension (torch CUDA '${torch_cuda}', nvcc '${nvcc_cuda}')"
fi
export MAX_JOBS="${MAX_JOBS:-2}"
log=$(mktemp)
if ! "$VENV/bin/pip" install --no-build-isolation --no-deps --force-reinstall . >"$log" 2>&1; then
  tail -n 60 "$log"; echo "torch 2.11 check: the build failed"; exit 1
fi
rm -f "$log"
echo "torch 2.11 check: built after $(( $(date +%s) - start )) s"

# pytest's script, not python -m pytest: the repository root must not shadow the installed
# package (its cblr_ext/_C*.so are built for the main environment's torch).
(cd /tmp && "$VENV/bin/python" -c "import cblr_ext, sys; from cblr_ext import ops; print('cblr_ext from', cblr_ext.__file__); sys.exit(ops.LOAD_ERROR is not None)")
"$VENV/bin/pytest" -q -p no:cacheprovider "$repo/tests/test_api.py" "$repo/tests/test_parity.py" \
  "$repo/tests/test_conformance.py" "$repo/tests/test_compile.py"
echo "torch 2.11 check: tests done after $(( $(date +%s) - start )) s"
if [ "$with_cuda" = 1 ]; then
  (cd /tmp && "$VENV/bin/python" "$repo/.ci/cuda_build_check.py")
fi
echo "torch 2.11 check: done in $(( $(date +%s) - start )) s"
