# SPDX-License-Identifier: Apache-2.0
"""Shared benchmark helpers: timing (wall clock on CPU, CUDA events on GPU), the machine
description every result carries, and table/JSON output. Benchmarks print the baseline
measured in the same run and the ratio; nothing here asserts a timing."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import torch

# Benchmarks measure the checkout they live in (its in-place built _C), not whatever
# hotweights an environment happens to have installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# One implementation of the machine description and the table, shared with the packaged
# harness (python -m hotweights.bench).
from hotweights.bench import describe, machine, table  # noqa: E402,F401


def time_fn(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1,
            device: str = "cpu") -> float:
    """Median seconds of fn() over reps runs (CUDA: measured with events on the current stream)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parser(desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--out", help="write results as JSON to this file")
    return p


def finish(name: str, rows: list[dict], cols: Sequence[str], out: str | None, **extra) -> None:
    print(f"# {name} on {describe()}")
    print(table(rows, cols))
    if out:
        with open(out, "w") as f:
            json.dump({"benchmark": name, "machine": machine(), "rows": rows, **extra}, f, indent=2)
        print(f"wrote {out}")
