# SPDX-License-Identifier: Apache-2.0
"""Every data path of this machine (bandwidth and per-bucket latency vs bucket size and window,
against the raw-copy ceiling of the same link): the script form of ``python -m
hotweights.bench``, kept here beside the other benchmarks (scripts/gpu_check.sh runs it).

    python benchmarks/bench_paths.py [--device cuda] [--quick] [--out results.json] [--plot results.png]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts this checkout first on sys.path)

from hotweights.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
