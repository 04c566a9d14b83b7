#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (Python 3.12, no package registry there) into .whl/
# (git-ignored), so a device run can carry them: `carry: [".whl"]`. gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64)
for pkg in pyzmq yappi; do   # yappi: benchmarks/profile_pipeline.py; the rest is on the image
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .whl "$pkg"
done
ls -la .whl
