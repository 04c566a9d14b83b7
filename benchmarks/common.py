# SPDX-License-Identifier: Apache-2.0
"""Shared benchmark helpers: timing (wall clock on CPU, CUDA events on GPU), the machine
description every result carries, and table/JSON output. Benchmarks print the baseline
measured in the same run and the ratio; nothing here asserts a timing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from typing import Callable, Sequence

import torch


def machine() -> dict:
    """Where a result was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    d = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
        d["gpus"] = torch.cuda.device_count()
    return d


def describe() -> str:
    m = machine()
    s = f"{m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, torch {m['torch']}"
    if "gpu" in m:
        s += f", {m['gpus']}x {m['gpu']}"
    return s


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


def table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    """Plain-text table of dict rows."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(xs))  # noqa: E731
    return "\n".join([line(cols), line(["-" * x for x in w])] + [line(x) for x in cells])


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
