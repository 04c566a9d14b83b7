# SPDX-License-Identifier: Apache-2.0
"""Calibration of ``hotweights simulate`` against real replications on this machine.

CPU (default): shared-memory rings, K = 1 and 2 subscriber processes. CUDA (``--device cuda``):
one GPU holding the publisher's ring and every subscriber (CUDA IPC).

1. Measures the link table with the path harness (``hotweights.bench``, cpu_shm_xproc and the
   component rates), or reads one given with ``--table``.
2. Runs real updates: a Publisher and K subscriber processes (spawned, ``swap="storage"``),
   an fp32 model of 200 equal tensors, every tensor changed at each publish; per case one
   warm-up publish, then the median of ``--reps`` publishes (publish -> all committed, and
   PublishResult.timings per stage).
3. Simulates the same cases from the measured table and prints measured vs predicted per stage
   (manifest, plan, stream, commit, total) with the error.

    python benchmarks/bench_simulate.py [--table results.json] [--mib 1024] [--quick] [--out calib.json]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import describe, machine, parser, table  # noqa: E402

N_TENSORS = 200


from bench_replicate import Bag, publish_all, stop_subscribers  # noqa: E402  (shared with bench_replicate)
from hotweights.bench import use_device  # noqa: E402


def _subscriber(i, endpoint, numel, q, stop, device="cpu"):
    import hotweights  # noqa: F401  (registers register_hotweights)

    torch.set_num_threads(1)
    use_device(device)
    model = Bag(N_TENSORS, numel, 100 + i, device)
    h = model.register_hotweights(name="calib", endpoint=endpoint, commit="manual", swap="storage")
    q.put(("ready", i))
    try:
        while not stop.is_set():
            try:
                v = h.wait(timeout=1.0)
            except TimeoutError:
                continue
            q.put(("applied", i, v))
    finally:
        h.close()


def merge_tables(tables: list[dict]) -> dict:
    """One link table from several measurements: the geometric mean of every number (and of
    every entry of per-count dicts); sources say so."""
    if len(tables) == 1:
        return tables[0]
    def mean(xs):
        return statistics.geometric_mean(xs) if all(x > 0 for x in xs) else statistics.fmean(xs)

    out = dict(tables[0])
    for key, v in tables[0].items():
        if key.endswith(("_Bps", "_s")) and isinstance(v, (int, float)):
            out[key] = mean([t[key] for t in tables])
        elif key.endswith(("_Bps", "_s")) and isinstance(v, dict):
            out[key] = {c: mean([t[key][c] for t in tables]) for c in v}
    out["sources"] = {k: f"{s} (geometric mean of {len(tables)} runs bracketing the real ones)"
                      for k, s in tables[0].get("sources", {}).items()}
    return out


def run_case(coord, src, q, k: int, bucket_mib: int, window: int | None, reps: int,
             direct: bool = False) -> dict:
    """Median (by total) of ``reps`` full publishes after one warm-up, with this case's
    bucket size and window (None: adaptive with the default bounds), through the ring or as
    direct reads."""
    import hotweights
    from hotweights import config

    over = {"bucket_mb": bucket_mib}
    if window is not None:
        over.update(ipc_adapt=False, ipc_inflight_buckets=window)
    cfg = config.load(os.environ, **over)
    pub = hotweights.Publisher(src, name="calib", endpoint=coord.endpoint, serve_late=False,
                               config=cfg, direct="on" if direct else "off",
                               bucket_bytes=bucket_mib << 20)  # exactly, direct reads too
    try:
        def publish(label):
            return publish_all(pub, src, q, k, label)

        publish("warm-up")
        runs = sorted((publish(f"b{bucket_mib}w{window}-{i}") for i in range(reps)), key=lambda x: x[0])
        wall, r = runs[len(runs) // 2]
        t = dict(r.timings)
        return {"wall_s": wall, "timings": t, "bytes": r.bytes, "buckets": r.buckets,
                "window_end": pub.window.current, "all_totals": [x[1].timings["total_s"] for x in runs]}
    finally:
        pub.close()


def recompute(files: list[str]) -> None:
    """Measured vs predicted (current simulator) for saved runs; the error over all of them."""
    from hotweights import simulate

    errs, rows = [], []
    for f in files:
        with open(f) as fh:
            d = json.load(fh)
        lt = merge_tables([simulate.load_table_dict(h) for h in d["harness"]])
        for c in d["cases"]:
            pred = simulate.simulate(lt, c["measured"]["bytes"], c["bucket_mib"] << 20,
                                     subscribers=c["k"], window=c["window"], tensors=N_TENSORS,
                                     min_window=1, max_window=8, slots=8,
                                     direct=c.get("direct", False),
                                     buckets=c["measured"].get("buckets"))
            m = c["measured"]["timings"]["total_s"]
            e = (pred.stages["total"] - m) / m
            errs.append(e)
            rows.append({"run": os.path.basename(f), "case": c["case"], "measured s": m,
                         "predicted s": pred.stages["total"], "error": f"{e * 100:+.0f}%",
                         "bottleneck": pred.bottleneck})
    print(table(rows, ["run", "case", "measured s", "predicted s", "error", "bottleneck"]))
    within = sum(abs(e) <= 0.25 for e in errs)
    print(f"{within} of {len(errs)} cases within 25%; median |error| "
          f"{statistics.median(abs(e) for e in errs) * 100:.0f}%, mean error "
          f"{statistics.fmean(errs) * 100:+.0f}%, max |error| {max(abs(e) for e in errs) * 100:.0f}%")


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--table", help="link table JSON from `python -m hotweights.bench --out` "
                   "(default: measure one now)")
    p.add_argument("--mib", type=int, default=None, help="model size in MiB (default 1024; quick 256)")
    p.add_argument("--reps", type=int, default=None, help="timed publishes per case (default 5)")
    p.add_argument("--recompute", nargs="+", metavar="FILE",
                   help="predict saved runs (this script's --out files) again with the current "
                   "simulator, without measuring anything")
    args = p.parse_args()
    from hotweights import bench, simulate

    if args.recompute:
        recompute(args.recompute)
        return
    from hotweights.coordinator import start_embedded

    cuda = args.device.startswith("cuda")
    mib = args.mib or ((1024 if args.quick else 4096) if cuda else (256 if args.quick else 1024))
    reps = args.reps or (2 if args.quick else 5)
    load_before = os.getloadavg()
    measured = []  # harness results bracketing the real runs (before, after)

    def measure(when: str) -> None:
        print(f"measuring the link table ({when} the real runs)", file=sys.stderr, flush=True)
        measured.append(bench.run("cuda" if cuda else "cpu", quick=args.quick,
                                  paths=["ipc_same_gpu"] if cuda else ["cpu_shm_xproc"]))

    if args.table:
        with open(args.table) as f:
            measured.append(json.load(f))
    else:
        measure("before")
    # (bucket MiB, window, direct reads): a CPU publisher reads directly by default; the ring
    # cases keep its model calibrated too
    cases_by_k = {2: [(64, None, True), (16, None, True), (4, None, True), (64, None, False),
                      (4, None, False), (64, 1, False), (64, 4, False)],
                  1: [(64, None, True), (4, None, True), (64, None, False)]}
    if args.quick:
        cases_by_k = {2: [(64, None, True), (64, None, False)], 1: [(16, None, True)]}
    if cuda:  # one GPU: the publisher's ring and every subscriber on cuda:0
        cases_by_k = {1: [(64, None, False), (256, None, False), (16, None, False), (64, 1, False),
                          (64, 8, False)],
                      2: [(64, None, False)]}
        if args.quick:
            cases_by_k = {1: [(64, None, False), (16, None, False), (256, None, False)]}
    numel = mib * 2**20 // 4 // N_TENSORS
    rows, details = [], []
    ctx = mp.get_context("spawn")
    for k, cases in cases_by_k.items():
        coord = start_embedded()
        q, stop = ctx.Queue(), ctx.Event()
        dev = "cuda:0" if cuda else "cpu"
        procs = [ctx.Process(target=_subscriber, args=(i, coord.endpoint, numel, q, stop, dev),
                             daemon=True) for i in range(k)]
        for pr in procs:
            pr.start()
        try:
            for _ in procs:
                assert q.get(timeout=180)[0] == "ready"
            src = Bag(N_TENSORS, numel, 1, dev)
            for bucket_mib, window, direct in cases:
                meas = run_case(coord, src, q, k, bucket_mib, window, reps, direct)
                case = f"{mib} MiB, {bucket_mib} MiB buckets, K={k}, " + (
                    "direct" if direct else f"ring, window {window}" if window else "ring, adaptive")
                details.append({"case": case, "k": k, "bucket_mib": bucket_mib, "window": window,
                                "direct": direct, "measured": meas})
                print(f"{case}: measured {meas['timings']['total_s']:.3f} s", file=sys.stderr,
                      flush=True)
        finally:
            stop_subscribers(stop, procs)
            coord.stop()
    if not args.table:
        measure("after")
    if args.out:  # the raw measurements first: nothing below can lose them
        with open(args.out + ".raw.json", "w") as f:
            json.dump({"harness": measured, "cases": details}, f, indent=2, default=str)
    tables = [simulate.load_table_dict(r) for r in measured]
    lt = merge_tables(tables)
    for d in details:  # predictions from the combined table, and the spread over each table
        kw = dict(subscribers=d["k"], window=d["window"], tensors=N_TENSORS, min_window=1,
                  max_window=8, slots=8, direct=d["direct"], buckets=d["measured"]["buckets"])
        pred = simulate.simulate(lt, d["measured"]["bytes"], d["bucket_mib"] << 20, **kw)
        d["predicted"] = pred.to_dict()
        d["predicted_each_table"] = [simulate.simulate(t, d["measured"]["bytes"],
                                                       d["bucket_mib"] << 20, **kw).stages["total"]
                                     for t in tables]
    rows = []
    for d in details:
        t, pred = d["measured"]["timings"], d["predicted"]
        for stage, key in (("manifest", "manifest_s"), ("plan", "plan_s"), ("stream", "stream_s"),
                           ("commit", "commit_wait_s"), ("total", "total_s")):
            m_, p_ = t[key], pred["stages"][stage]
            rows.append({"case": d["case"] if stage == "manifest" else "", "stage": stage,
                         "measured s": m_, "predicted s": p_,
                         "error": (p_ - m_) / m_ if m_ > 0 else None,
                         "bottleneck": pred["bottleneck"] if stage == "stream" else "",
                         "range": (" / ".join(f"{x:.3g}" for x in d["predicted_each_table"])
                                   if stage == "total" and len(tables) > 1 else "")})
    for r in rows:
        if r["error"] is not None:
            r["error"] = f"{r['error'] * 100:+.0f}%"
    print(f"# bench_simulate on {describe()} (load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); link table: "
          + (args.table or "measured before and after the runs, combined (geometric mean)"))
    print(table(rows, ["case", "stage", "measured s", "predicted s", "error", "bottleneck", "range"]))
    print("range: the total predicted from the table measured before / after the real runs")
    errs = [abs(d["predicted"]["stages"]["total"] - d["measured"]["timings"]["total_s"])
            / d["measured"]["timings"]["total_s"] for d in details]
    print(f"total-time error: median {statistics.median(errs) * 100:.0f}%, max {max(errs) * 100:.0f}% "
          f"over {len(errs)} cases")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "bench_simulate", "machine": machine(), "link_table": lt,
                       "tables": tables, "harness": measured, "rows": rows, "cases": details,
                       "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
                      f, indent=2, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
