#!/usr/bin/env bash
# One prepared script for a machine with a GPU (Python 3.12, torch 2.11+cu130, nvcc, ninja; no
# package registry): builds _C in place with CUDA, runs the CUDA/multi-GPU tests and the GPU
# benchmarks, and writes logs and JSON into the folder given as $1 (default ./gpu_check_out).
# Must finish in under 8 minutes. Usage: bash scripts/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-./gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HOTWEIGHTS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-8}"
status=0
BUDGET=${GPU_CHECK_BUDGET_S:-450}   # the whole script stays under 8 minutes
left() { echo $(( BUDGET - SECONDS )); }
step() { echo "=== $* ($(date -u +%T), $(left) s left)"; }

# Wheels the image lacks (pyzmq), carried in .whl/ (scripts/fetch_gpu_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import zmq" 2>/dev/null || echo "WARNING: pyzmq missing: run scripts/fetch_gpu_wheels.sh and carry .whl"

step "environment"
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; nvcc --version; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "build _C with CUDA"
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -m hotweights info --json > "$OUT/info.json" 2>&1 || status=1
$PY -m hotweights info || status=1

step "topology and preset"
# The raw matrix is also a real capture for tests/fixtures/nvidia_smi.
nvidia-smi topo -m > "$OUT/nvidia_smi_topo.txt" 2>&1 || true
$PY -m hotweights topo --json > "$OUT/topo.json" 2>&1 || status=1
$PY -m hotweights topo || status=1
$PY -m hotweights preset --detect --shell || status=1

step "pytest -m 'cuda or multigpu'"
timeout $(( $(left) > 240 ? 180 : $(left) / 2 )) $PY -m pytest -q -m "cuda or multigpu" tests -p no:cacheprovider \
  --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks"
run_bench() {  # name, then the command
  local name=$1; shift
  echo "--- $name"
  local t=$(( $(left) - 15 )); [ $t -gt 90 ] && t=90
  if [ $t -lt 20 ]; then echo "$name SKIPPED: out of time budget"; status=1; return; fi
  timeout $t "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$name FAILED"; status=1; }
}
run_bench bench_copy $PY benchmarks/bench_copy.py --device cuda
[ -f benchmarks/bench_replicate.py ] && run_bench bench_replicate $PY benchmarks/bench_replicate.py --device cuda --quick
[ -f benchmarks/bench_kv.py ] && run_bench bench_kv $PY benchmarks/bench_kv.py --device cuda
[ -f benchmarks/bench_paths.py ] && run_bench bench_paths $PY benchmarks/bench_paths.py --device cuda --quick
[ -f benchmarks/bench_storage.py ] && run_bench bench_storage $PY benchmarks/bench_storage.py --device cuda --quick --repeat 1
# Simulator calibration on one GPU: the link table measured above (ipc_same_gpu), then real
# same-GPU updates against the simulator's prediction (docs/BENCHMARKS.md, "Simulator").
[ -f benchmarks/bench_simulate.py ] && [ -f "$OUT/bench_paths.json" ] && run_bench bench_simulate \
  $PY benchmarks/bench_simulate.py --device cuda --quick --table "$OUT/bench_paths.json"

step "done (status $status)"
exit $status
