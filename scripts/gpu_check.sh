#!/usr/bin/env bash
# One prepared script for a machine with a GPU (Python 3.12, torch 2.11+cu130, nvcc, ninja; no
# package registry): builds _C in place with CUDA, runs the CUDA/multi-GPU tests and the GPU
# benchmarks, most important first, and leaves in the folder given as $1 (default
# ./gpu_check_out) two files: summary.txt and gpu_check.tgz (every log and JSON; the device
# tool brings back at most 8 files). Must finish in under 8 minutes.
#
#   bash scripts/fetch_gpu_wheels.sh          # here, once: pyzmq for Python 3.12 into .whl/
#   run(command='bash scripts/gpu_check.sh "$OUT"', carry=[".whl"], timeout_s=540)
#
# A rerun can pick its steps and reuse the first run's build, which comes back as $OUT/_C.so:
#   GPU_CHECK_STEPS="pytest bench" (default "build pytest bench topo"; "profile" adds
#     benchmarks/profile_pipeline.py on three cases (needs yappi); without "build" the carried
#     hotweights/_C.cpython-312-x86_64-linux-gnu.so is used), GPU_CHECK_BENCH="bench_copy bench_kv"
#     (default all), GPU_CHECK_PYTEST="tests/test_ipc.py" (default tests), GPU_CHECK_BUDGET_S,
#     GPU_CHECK_GDB="tests/x.py::test_y" (native backtraces under cuda-gdb of tests that crash),
#     GPU_CHECK_SIM_ARGS (bench_simulate's sizes; default "--mib 1024 --reps 3", the calibration
#     size of sessions 5-6, ~25 s), GPU_CHECK_PROFILE_CASES
#     (which of the three profile cases: 64 MiB ring, 256 MiB ring, 1 GiB direct; default "1 2 3").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
W=/tmp/gpu_check          # everything is written here, packed into $OUT when the script ends
rm -rf "$W" && mkdir -p "$W"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HOTWEIGHTS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-12}"
# the image's ninja is a pip package beside its python: without it on PATH the build is serial
export PATH="$($PY -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
status=0
BUDGET=${GPU_CHECK_BUDGET_S:-450}   # the whole script stays under 8 minutes
left() { echo $(( BUDGET - SECONDS )); }
step() { echo "=== $* ($(date -u +%T), $(left) s left)" | tee -a "$W/summary.txt"; }
note() { echo "$*" | tee -a "$W/summary.txt"; }
pack() {
  note "exit status $status after ${SECONDS} s"
  tar czf "$OUT/gpu_check.tgz" -C /tmp gpu_check 2>/dev/null
  cp "$W/summary.txt" "$OUT/summary.txt"
}
trap pack EXIT

# Wheels the image lacks (pyzmq), carried in .whl/ (scripts/fetch_gpu_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import zmq" 2>/dev/null; then
  status=2; note "FATAL: pyzmq missing (run scripts/fetch_gpu_wheels.sh here and carry .whl)"; exit 2
fi

step "environment"
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; nvcc --version; which ninja; } \
  > "$W/env.txt" 2>&1
cat "$W/env.txt"
grep -m1 -E "H100|H200|A100|GPU" "$W/env.txt" >> "$W/summary.txt" || true

STEPS=" ${GPU_CHECK_STEPS:-build pytest bench topo} "
BENCH=" ${GPU_CHECK_BENCH:-bench_replicate bench_doorbell bench_spin bench_paths bench_simulate bench_copy bench_kv bench_storage} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
GPU_CHECK_PROFILE=("--bucket-mib 64 --tensors 200 --tensor-mib 5.12"
                   "--bucket-mib 256 --tensors 200 --tensor-mib 5.12"
                   "--bucket-mib 1024 --tensors 200 --tensor-mib 5.12 --direct on")
if want build; then
  step "build _C with CUDA"
  if ! timeout 300 $PY setup.py build_ext --inplace > "$W/build.log" 2>&1; then
    tail -60 "$W/build.log" | tee -a "$W/summary.txt"; status=1; note "BUILD FAILED"; exit 1
  fi
  so=$(ls hotweights/_C*.so | head -1)
  note "built $so in ${SECONDS} s ($(stat -c %s "$so") bytes)"
  # comes back for a rerun to carry (the device returns files up to 16 MiB)
  [ "$(stat -c %s "$so")" -lt 16000000 ] && cp "$so" "$OUT/_C.so"
else
  note "build skipped: using $(ls hotweights/_C*.so 2>&1)"
fi
$PY -m hotweights info --json > "$W/info.json" 2> "$W/info.err" || status=1
$PY -m hotweights info 2>&1 | head -30

if [ -n "${GPU_CHECK_GDB:-}" ]; then  # native backtraces of tests that crash the interpreter
  step "cuda-gdb: $GPU_CHECK_GDB"
  for t in $GPU_CHECK_GDB; do
    timeout 75 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info registers rip" \
      --args $PY -m pytest -q -p no:cacheprovider "$t" >> "$W/gdb.log" 2>&1
    grep -A25 -E "^Thread .* received signal|SIGSEGV" "$W/gdb.log" | grep -E "^#|signal" | head -30 \
      | tee -a "$W/summary.txt"
  done
fi
if want pytest; then
  step "pytest -m 'cuda or multigpu'"
  t=$(( $(left) / 3 )); [ $t -gt ${GPU_CHECK_PYTEST_S:-150} ] && t=${GPU_CHECK_PYTEST_S:-150}; [ $t -lt 30 ] && t=30
  # the image has pytest-xdist: files spread over workers (the CUDA tests are xdist-safe: no
  # fixed ports, no global /dev/shm listing)
  xd=(); $PY -c "import xdist" 2>/dev/null && xd=(-n 8 --dist loadfile)
  timeout $t $PY -m pytest -q -m "cuda or multigpu" ${GPU_CHECK_PYTEST:-tests} "${xd[@]}" \
    -p no:cacheprovider --timeout=90 -rfEs --junitxml="$W/pytest_cuda.xml" > "$W/pytest_cuda.log" 2>&1
  rc=$?
  tail -40 "$W/pytest_cuda.log"
  grep -E "^(FAILED|ERROR)|passed|failed" "$W/pytest_cuda.log" | tail -40 >> "$W/summary.txt"
  [ $rc -eq 0 ] || { status=1; note "pytest rc=$rc"; }
fi

if want profile; then  # where a bucket's time goes (yappi, carried in .whl): ring and direct
  step "profile_pipeline"
  i=0
  for args in "${GPU_CHECK_PROFILE[@]}"; do
    i=$((i + 1)); n=$i
    [[ " ${GPU_CHECK_PROFILE_CASES:-1 2 3} " == *" $n "* ]] || continue
    if [ "$(left)" -lt 70 ]; then note "profile $args SKIPPED: out of time budget"; continue; fi
    timeout 60 $PY benchmarks/profile_pipeline.py --device cuda $args --out "$W/profile_$n" \
      > "$W/profile_$n.txt" 2>&1 || note "profile $args FAILED (rc=$?)"
    grep -E "^per bucket|^timings" "$W/profile_$n.txt" | sed "s/^/[$args] /" | tee -a "$W/summary.txt"
  done
fi

want bench && step "benchmarks"
run_bench() {  # name, then the command
  local name=$1; shift
  want bench && [[ "$BENCH" == *" $name "* ]] || return 0
  local t=$(( $(left) - 15 )); [ $t -gt ${GPU_CHECK_BENCH_S:-100} ] && t=${GPU_CHECK_BENCH_S:-100}
  if [ $t -lt 20 ]; then note "$name SKIPPED: out of time budget"; status=1; return; fi
  echo "--- $name (limit $t s)"
  timeout $t "$@" --out "$W/$name.json" > "$W/$name.log" 2>&1
  local rc=$?
  tail -25 "$W/$name.log"
  if [ $rc -eq 0 ]; then note "$name ok"; else note "$name FAILED (rc=$rc)"; tail -5 "$W/$name.log" >> "$W/summary.txt"; status=1; fi
}
# #6's CUDA goals first, then the path table the simulator needs, then its calibration
run_bench bench_replicate $PY benchmarks/bench_replicate.py --device cuda   # the 8 GiB model
# the ring's per-bucket control through the doorbell vs the coordinator (same run)
run_bench bench_doorbell $PY benchmarks/bench_doorbell.py --device cuda --mib 1024 \
  --bucket-mib 16 64 256 --reps 3
# waits that poll before they sleep (HOTWEIGHTS_SPIN_US=auto: 100 us here) vs sleeping at once
run_bench bench_spin $PY benchmarks/bench_doorbell.py --device cuda --compare spin --mib 1024 \
  --bucket-mib 64 256 --reps 3
run_bench bench_paths $PY benchmarks/bench_paths.py --device cuda --quick \
  --paths h2d_pinned,d2h_pinned,same_device,ipc_same_gpu
if [ -f "$W/bench_paths.json" ]; then
  run_bench bench_simulate $PY benchmarks/bench_simulate.py --device cuda ${GPU_CHECK_SIM_ARGS:---mib 1024 --reps 3} \
    --table "$W/bench_paths.json"
fi
run_bench bench_copy $PY benchmarks/bench_copy.py --device cuda
run_bench bench_kv $PY benchmarks/bench_kv.py --device cuda --quick
run_bench bench_storage $PY benchmarks/bench_storage.py --device cuda --quick --repeat 1

if want topo; then
  step "topology and preset"
  nvidia-smi topo -m > "$W/nvidia_smi_topo.txt" 2>&1 || true   # a real capture for tests/fixtures
  $PY -m hotweights topo --json > "$W/topo.json" 2> "$W/topo.err" || status=1
  $PY -m hotweights topo 2>&1 | tail -20
  $PY -m hotweights preset --detect --shell 2>&1 | tee -a "$W/summary.txt" || status=1
fi

step "done (status $status)"
exit $status
