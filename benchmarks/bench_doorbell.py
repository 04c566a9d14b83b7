# SPDX-License-Identifier: Apache-2.0
"""The ring's per-bucket control through the same-node doorbell (Note [Doorbell]) against the
coordinator-only path, measured in the same run (the baseline is HOTWEIGHTS_DOORBELL=0).

1. The pipeline's fixed cost per bucket (hotweights.bench.pipeline_overhead: the real
   Publisher, embedded coordinator, K spawned subscribers, 4 KiB buckets): the latency of one
   bucket alone, the interval with the ring full, CPU seconds of all processes per bucket.
2. Real ring updates (direct reads off): a model of --mib MiB in 200 tensors to K=2 subscriber
   processes in buckets of each --bucket-mib, publish -> all committed, the best of --reps
   publishes after a warm-up, with and without the doorbell (alternating publishers over the
   same subscribers).

    python benchmarks/bench_doorbell.py [--device cpu|cuda] [--mib 256] [--bucket-mib 1 4 64]
        [--reps 5] [--out results.json]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parser  # noqa: E402
from bench_replicate import (N_TENSORS, Bag, _hw_subscriber, publish_all,  # noqa: E402
                             stop_subscribers)


def overhead(device: str, reps: int) -> list[dict]:
    from hotweights.bench import pipeline_overhead

    on = pipeline_overhead(counts=(1, 2), reps=reps, device=device, doorbell=True)
    off = pipeline_overhead(counts=(1, 2), reps=reps, device=device, doorbell=False)
    rows = []
    for key, what in (("latency_s", "one bucket alone"), ("interval_s", "interval, ring full"),
                      ("cpu_s", "CPU s of all processes"),
                      ("cpu_publisher_s", "CPU s of the publisher's process")):
        for k in ("1", "2"):
            a, b = on[key][k], off[key][k]
            rows.append({"case": f"4 KiB bucket, K={k}: {what}", "doorbell ms": a * 1e3,
                         "coordinator ms": b * 1e3, "ratio": b / a})
    return rows


def updates(device: str, mib: int, buckets_mib: list[int], reps: int,
            subscribers: int = 2) -> list[dict]:
    import hotweights
    from hotweights import config as _config
    from hotweights.coordinator import start_embedded

    numel = mib * 2**20 // 4 // N_TENSORS
    coord = start_embedded()
    src = Bag(N_TENSORS, numel, 1, device)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_hw_subscriber, args=(i, coord.endpoint, N_TENSORS, numel,
                                                      "storage", device, q, stop), daemon=True)
             for i in range(subscribers)]
    for p in procs:
        p.start()
    rows = []
    try:
        for _ in procs:
            assert q.get(timeout=120)[0] == "ready"

        for bmib in buckets_mib:
            times = {True: [], False: []}
            results = {}
            for rep in range(reps + 1):  # alternating, so drift hits both alike
                for bell in (True, False):
                    cfg = _config.load(doorbell=bell)
                    with hotweights.Publisher(src, name="bench", endpoint=coord.endpoint,
                                              serve_late=False, direct="off", config=cfg,
                                              bucket_bytes=bmib << 20) as pub:
                        # the warm-up: the subscribers map the new ring, claim lanes
                        publish_all(pub, src, q, subscribers, "warm-up")
                        t, r = publish_all(pub, src, q, subscribers, f"{bmib} MiB {bell}")
                        results[bell] = (r.buckets, pub.stats["doorbell_acks"])
                    if rep:
                        times[bell].append(t)
            a, b = min(times[True]), min(times[False])
            rows.append({"case": f"{mib} MiB ring update, {bmib} MiB buckets "
                                 f"({results[True][0]}), K={subscribers}",
                         "doorbell ms": a * 1e3, "coordinator ms": b * 1e3, "ratio": b / a,
                         "doorbell acks": results[True][1]})
    finally:
        stop_subscribers(stop, procs)
        coord.stop()
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--bucket-mib", type=int, nargs="+", default=[1, 4, 64])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if a.quick:
        a.mib, a.bucket_mib, a.reps = 16, [1], 1
    rows = overhead(a.device, 1 if a.quick else 3)
    rows += updates(a.device, a.mib, a.bucket_mib, a.reps)
    finish("bench_doorbell", rows, ["case", "doorbell ms", "coordinator ms", "ratio",
                                    "doorbell acks"], a.out)


if __name__ == "__main__":
    main()
