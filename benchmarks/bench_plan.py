# SPDX-License-Identifier: Apache-2.0
"""Plan and manifest speed against baselines measured in the same run.

1. diff + pack of N tensors (default 1,000,000) with a few percent changed, vs a plain-Python
   implementation of the same (dict diff + next-fit loop), which is what Python planners do.
   Target: under 1 s for 1M tensors on a 2-core machine.
2. Manifest hashing of a 1 GiB state_dict (about 200 tensors) vs one memcpy of the same bytes.
   Target: at least 50% of memcpy bandwidth.

    python benchmarks/bench_plan.py [--tensors 1000000] [--quick] [--out results.json]
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parser, time_fn  # noqa: E402

from hotweights.manifest import Manifest  # noqa: E402
from hotweights.plan import SubscriberSpec, make_plan  # noqa: E402


def synthetic(n: int, seed: int = 0) -> tuple[Manifest, Manifest]:
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i // 16}.block.p{i % 16}.weight" for i in range(n)]
    sizes = rng.integers(1, 1 << 16, n).astype(np.int64)
    old = Manifest(names, ["bfloat16"] * n, [(int(s),) for s in sizes], sizes,
                   rng.integers(0, 2**63, n).astype(np.uint64))
    h = old.hashes.copy()
    h[rng.choice(n, n // 50, replace=False)] ^= np.uint64(1)  # 2% changed
    new = Manifest(names, old.dtypes, old.shapes, sizes, h)
    return old, new


def python_baseline(old: Manifest, new: Manifest, bucket: int, align: int = 256):
    """Dict diff plus a Python next-fit loop: the straightforward Python planner."""
    prev = dict(zip(old.names, old.hashes.tolist()))
    changed = [(name, size) for name, size, h in zip(new.names, new.nbytes.tolist(), new.hashes.tolist())
               if prev.get(name) != h]
    buckets, cur, pos = [], [], 0
    for name, size in changed:
        if pos + size > bucket and cur:
            buckets.append(cur)
            cur, pos = [], 0
        cur.append((name, pos, size))
        pos = (pos + size + align - 1) // align * align
    if cur:
        buckets.append(cur)
    return buckets


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--tensors", type=int, default=1_000_000)
    args = p.parse_args()
    n = 100_000 if args.quick else args.tensors
    rows = []
    old, new = synthetic(n)
    bucket = 64 << 20
    subs = [SubscriberSpec("s", old)]
    t_plan = time_fn(lambda: make_plan(new, subs, bucket), reps=3)
    t_py = time_fn(lambda: python_baseline(old, new, bucket), reps=1, warmup=0)
    plan = make_plan(new, subs, bucket)
    rows.append({"case": f"diff+pack {n:,} tensors", "hotweights s": t_plan, "baseline": "python dict+loop",
                 "baseline s": t_py, "speedup": t_py / t_plan, "target": "< 1 s",
                 "buckets": plan.num_buckets, "moved MiB": plan.total_bytes / 2**20})
    # manifest hashing of a 1 GiB state dict vs memcpy
    gib = (256 if args.quick else 1024) << 20
    per = gib // 200
    sd = {f"w{i}": torch.randint(0, 255, (per,), dtype=torch.uint8) for i in range(200)}
    big_src = torch.cat(list(sd.values()))
    big_dst = torch.empty_like(big_src)
    t_hash = time_fn(lambda: Manifest.from_state_dict(sd), reps=3)
    t_mem = time_fn(lambda: ctypes.memmove(big_dst.data_ptr(), big_src.data_ptr(), big_src.numel()), reps=3)
    rows.append({"case": f"manifest of {big_src.numel() / 2**30:.2f} GiB / 200 tensors",
                 "hotweights s": t_hash, "baseline": "memcpy", "baseline s": t_mem,
                 "speedup": t_mem / t_hash, "target": ">= 0.5 of memcpy",
                 "GB/s": big_src.numel() / t_hash / 1e9})
    finish("bench_plan", rows, ["case", "hotweights s", "baseline", "baseline s", "speedup", "target"],
           args.out)


if __name__ == "__main__":
    main()
