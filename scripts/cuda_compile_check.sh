#!/usr/bin/env bash
# CUDA compile check: most machines here have no GPU, so the CUDA code must at least build and
# import. A second venv gets torch 2.14.1 (a CUDA 13.0 build, matching nvcc 13.0), then _C is
# built with HOTWEIGHTS_CUDA=1 in a copy of the tree (the CPU build stays untouched), imported,
# and its build record must say CUDA is compiled in.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf '[cuda-check +%ss] %s\n' "$SECONDS" "$*"; }
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "CUDA compile check SKIPPED: no nvcc found (set CUDA_HOME)"; exit 0
fi
VENV=.venv-cuda
[ -x $VENV/bin/python ] || { log "creating $VENV"; python3 -m venv $VENV; }
if ! $VENV/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') else 1)" 2>/dev/null; then
  log "installing torch==2.14.1 (CUDA 13.0 build)"
  $VENV/bin/pip install -q torch==2.14.1
fi
$VENV/bin/pip install -q ninja numpy pybind11 msgpack pyzmq pytest pytest-timeout hypothesis
WORK="$(mktemp -d -t hotweights-cuda.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
tar --exclude=./.venv --exclude=./.venv-cuda --exclude=./build --exclude='*.so' \
    --exclude=./csrc/generated -cf - . | tar -C "$WORK" -xf -
log "building _C with HOTWEIGHTS_CUDA=1 (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
(cd "$WORK" && HOTWEIGHTS_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$OLDPWD/$VENV/bin/python" setup.py -q build_ext --inplace)
log "importing the CUDA build"
(cd "$WORK" && "$OLDPWD/$VENV/bin/python" - <<'PY'
import hotweights
from hotweights import info, ops
b = info.build_info()
assert b["with_cuda"], f"build record says CUDA is not compiled in: {b}"
assert ops.HAS_CUDA_BUILD
print(info.render(info.collect()))
PY
)
log "CPU tests of the build record under the CUDA build"
(cd "$WORK" && "$OLDPWD/$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_build_info.py)
log "CUDA compile check passed"
