# SPDX-License-Identifier: Apache-2.0
"""The ring's per-bucket control through the same-node doorbell (Note [Doorbell]) against the
coordinator-only path (the baseline is HOTWEIGHTS_DOORBELL=0), or with ``--compare spin`` the
waits that poll before they sleep (HOTWEIGHTS_SPIN_US, Note [Batch completion]) against
sleeping at once (HOTWEIGHTS_SPIN_US=0), both measured in the same run.

1. The pipeline's fixed cost per bucket (hotweights.bench.pipeline_overhead: the real
   Publisher, embedded coordinator, K spawned subscribers, 4 KiB buckets): the latency of one
   bucket alone, the interval with the ring full, CPU seconds of all processes per bucket.
2. Real ring updates (direct reads off): a model of --mib MiB in 200 tensors to K=2 subscriber
   processes in buckets of each --bucket-mib, publish -> all committed, the best of --reps
   publishes after a warm-up, in each variant (alternating publishers; each variant has its
   own subscriber processes, started with its environment).

    python benchmarks/bench_doorbell.py [--device cpu|cuda] [--compare doorbell|spin]
        [--mib 256] [--bucket-mib 1 4 64] [--reps 5] [--out results.json]
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parser  # noqa: E402
from bench_replicate import (N_TENSORS, Bag, _hw_subscriber, publish_all,  # noqa: E402
                             stop_subscribers)


# each comparison: (column, config overrides, environment) of the variant and of its baseline
COMPARE = {
    "doorbell": (("doorbell ms", {"doorbell": True}, {}),
                 ("coordinator ms", {"doorbell": False}, {})),
    "spin": (("spin ms", {}, {}),
             ("no spin ms", {}, {"HOTWEIGHTS_SPIN_US": "0"})),
}


@contextlib.contextmanager
def environment(env: dict):
    """os.environ with ``env`` applied (children started inside inherit it) and the cached
    config re-read, both undone on exit."""
    from hotweights import config as _config

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _config.reset()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _config.reset()


def overhead(device: str, reps: int, compare: str) -> list[dict]:
    from hotweights.bench import pipeline_overhead

    res = []
    for _, over, env in COMPARE[compare]:
        with environment(env):
            res.append(pipeline_overhead(counts=(1, 2), reps=reps, device=device,
                                         doorbell=over.get("doorbell", True)))
    (col_a, _, _), (col_b, _, _) = COMPARE[compare]
    rows = []
    for key, what in (("latency_s", "one bucket alone"), ("interval_s", "interval, ring full"),
                      ("cpu_s", "CPU s of all processes"),
                      ("cpu_publisher_s", "CPU s of the publisher's process")):
        for k in ("1", "2"):
            a, b = res[0][key][k], res[1][key][k]
            rows.append({"case": f"4 KiB bucket, K={k}: {what}", col_a: a * 1e3,
                         col_b: b * 1e3, "ratio": b / a})
    return rows


def updates(device: str, mib: int, buckets_mib: list[int], reps: int, compare: str,
            subscribers: int = 2) -> list[dict]:
    import hotweights
    from hotweights import config as _config
    from hotweights.coordinator import start_embedded

    variants = COMPARE[compare]
    numel = mib * 2**20 // 4 // N_TENSORS
    coord = start_embedded()
    src = Bag(N_TENSORS, numel, 1, device)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    queues, procs = [], []
    for v, (_, _, env) in enumerate(variants):
        q = ctx.Queue()
        queues.append(q)
        with environment(env):
            for i in range(subscribers):
                p = ctx.Process(target=_hw_subscriber, daemon=True,
                                args=(i, coord.endpoint, N_TENSORS, numel, "storage", device,
                                      q, stop, f"bench{v}"))
                p.start()
                procs.append(p)
    rows = []
    try:
        for q in queues:
            for _ in range(subscribers):
                assert q.get(timeout=120)[0] == "ready"

        for bmib in buckets_mib:
            times = {v: [] for v in range(len(variants))}
            results = {}
            for rep in range(reps + 1):  # alternating, so drift hits both alike
                for v, (_, over, env) in enumerate(variants):
                    with environment(env):
                        cfg = _config.load(**over)
                        with hotweights.Publisher(src, name=f"bench{v}", endpoint=coord.endpoint,
                                                  serve_late=False, direct="off", config=cfg,
                                                  bucket_bytes=bmib << 20) as pub:
                            # the warm-up: the subscribers map the new ring, claim lanes
                            publish_all(pub, src, queues[v], subscribers, "warm-up")
                            t, r = publish_all(pub, src, queues[v], subscribers, f"{bmib} MiB {v}")
                            results[v] = (r.buckets, pub.stats["doorbell_acks"])
                    if rep:
                        times[v].append(t)
            a, b = min(times[0]), min(times[1])
            rows.append({"case": f"{mib} MiB ring update, {bmib} MiB buckets "
                                 f"({results[0][0]}), K={subscribers}",
                         variants[0][0]: a * 1e3, variants[1][0]: b * 1e3, "ratio": b / a,
                         "doorbell acks": results[0][1]})
    finally:
        stop_subscribers(stop, procs)
        coord.stop()
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--bucket-mib", type=int, nargs="+", default=[1, 4, 64])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compare", choices=sorted(COMPARE), default="doorbell",
                   help="doorbell: vs HOTWEIGHTS_DOORBELL=0; spin: vs HOTWEIGHTS_SPIN_US=0")
    a = p.parse_args()
    if a.quick:
        a.mib, a.bucket_mib, a.reps = 16, [1], 1
    if a.compare == "spin":
        from hotweights import config as _config

        spin_us = _config.get().spin_s * 1e6
        print(f"HOTWEIGHTS_SPIN_US resolves to {spin_us:g} us here, against 0", flush=True)
        if spin_us == 0:
            print("both variants sleep at once on this host (auto spins only on 8+ cores): "
                  "set HOTWEIGHTS_SPIN_US to compare", flush=True)
    rows = overhead(a.device, 1 if a.quick else 3, a.compare)
    rows += updates(a.device, a.mib, a.bucket_mib, a.reps, a.compare)
    (col_a, _, _), (col_b, _, _) = COMPARE[a.compare]
    if a.compare == "spin":
        rows.insert(0, {"case": "HOTWEIGHTS_SPIN_US (us)", col_a: spin_us, col_b: 0.0})
    finish("bench_doorbell", rows, ["case", col_a, col_b, "ratio", "doorbell acks"], a.out)


if __name__ == "__main__":
    main()
