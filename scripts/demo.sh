#!/usr/bin/env bash
# The main job of the README: set up, then a local hot-swap demo on CPU with the embedded
# coordinator (a publisher and two subscriber processes). Arguments go to `hotweights demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/hotweights demo "$@"
