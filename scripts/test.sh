#!/usr/bin/env bash
# The test command of the README (and of .ci/run): set up, start a private Redis, run pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k window`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/redis.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 GLOO_SOCKET_IFNAME=lo
export OMPI_MCA_rmaps_base_oversubscribe=1 PYTHONUNBUFFERED=1
.venv/bin/python -m pytest -q tests "$@"
