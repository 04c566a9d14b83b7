#!/usr/bin/env bash
# Idempotent setup for a fresh machine: Debian packages (Redis, Open MPI) when missing, a venv
# in .venv with the CPU build of torch and the dependencies, and hotweights._C built in place.
# Used by scripts/demo.sh, scripts/test.sh and .ci/run, so all three install the same things.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_SPEC="${HOTWEIGHTS_TORCH_SPEC:-torch==2.13.0}"
log() { printf '[setup +%ss] %s\n' "$SECONDS" "$*"; }

if ! command -v redis-server >/dev/null || ! command -v mpirun >/dev/null; then
  log "installing redis-server and Open MPI (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends redis-server openmpi-bin libopenmpi-dev >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_SPEC#torch==}') else 1)" 2>/dev/null; then
  log "installing $TORCH_SPEC"
  $PY -m pip install -q "$TORCH_SPEC"
fi
log "installing Python dependencies"
$PY -m pip install -q -r requirements-dev.txt
log "building hotweights._C"
MAX_JOBS="${MAX_JOBS:-2}" $PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -c "import hotweights" || { echo "setup: hotweights does not import after the build" >&2; exit 1; }
log "ready: $($PY -c 'import hotweights, torch; print("hotweights", hotweights.__version__, "torch", torch.__version__)')"
