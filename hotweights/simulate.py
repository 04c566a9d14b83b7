# SPDX-License-Identifier: Apache-2.0
"""``hotweights simulate``: predicts the time of one full update, stage by stage, from a link
table, for machines we cannot reach.

Every output is a **projection** computed from the table, never a measurement. Built-in tables
(``nvlink8``, ``pcie8``) take each number from ../shared/reference/weight-sync-anchors.md §5 or
from this project's own measurements, and name the source next to it; ``--topology FILE``
reads the table that ``python -m hotweights.bench --out FILE`` measured on a real machine.

Note [Update model]: the pipeline as built (hotweights/replicate.py, Note [One update]).

* hash/manifest: the publisher hashes all M bytes where they live (``hash_Bps``) plus a cost
  per tensor; nothing else runs meanwhile.
* plan: plan construction per tensor and the ``clients`` request (one round trip r).
* stream: the ``publish`` request (r), then N = ceil(M / B) buckets. The fixed cost of a
  bucket (gather/scatter set-up, the handle's post, each subscriber's long-poll for it and
  ack, the release: 2 + 2K coordinator requests and the Python around them) is
  **measured on the real pipeline with 4 KiB buckets** (``bucket0_*``, by subscriber count K;
  linear in K beyond the counts measured): ``L0`` the latency of one bucket alone, ``I0`` the
  interval between buckets when the ring is full, ``C0`` the CPU seconds all processes spend
  on it. The bytes add:
    - latency of a bucket ``T_b = L0 + B/gather_Bps + B/scatter'`` (the publisher's
      gather+hash into a ring slot, then each subscriber's scatter+hash out of it), with
      ``scatter' = min(scatter_Bps, link_Bps)``, and on CPU tables slowed by
      ``parallel_copy_Bps[K] / (K parallel_copy_Bps[1])``: the K subscribers copy the same
      bucket at the same time and contend as K concurrent copiers do;
    - pipeline interval ``I0 + max(B/gather_Bps, B/scatter')``: the slowest copy stage plus
      the control work that the same threads do;
    - CPU tables: the publisher's process is serial (its threads and the embedded
      coordinator share one interpreter and the cores the copies use): ``C0_pub +
      B/gather_Bps`` per bucket, with ``C0_pub`` its measured CPU seconds per zero-byte
      bucket; each subscriber process ``(C0 - C0_pub) / K + B/scatter'``. Not on GPU tables:
      on a GPU machine a process's threads overlap on spare cores (zmq and the copy engine
      release the GIL), and ``I0`` already holds the real serialisation (H200: 2.0 ms of
      publisher CPU per bucket, 1.7 ms interval; with the term a window-8 case came out +36%);
    - publisher egress ``K B / egress_Bps`` when its port is shared by K readers (GPU rings);
    - one GPU holding the ring and every subscriber (same-GPU IPC): the 1 + K copies share its
      memory, ``(1 + K) B / shared_device_Bps``;
    - CPU machines: publisher, subscribers and their control work share the cores and the
      memory bandwidth, and on a saturated CPU they do not overlap:
      ``I0 + (1 + K) B / agg`` (the zero-byte interval, a wall time that already reflects
      the cores the processes really got, plus the copies at the aggregate rate ``agg`` that
      1 + K processes copying at once reach: ``parallel_copy_Bps`` measured with single-
      threaded copiers, taken at (1 + K) x ``copy_threads`` (each process's copy engine,
      default 2) and at most (1 + K) x scatter', so one process alone still uses every core).
  The slowest of these sets the interval. Streaming is run bucket by bucket (``_pipeline``):
  a bucket admitted at t finishes at max(t + T_b, the previous finish + interval), with at
  most W in flight: a fixed window, or what the real adaptive controller (_C.WindowController)
  decides on those service times, within its bounds and the ring's slots, over two updates in
  a row. With the pipe full that is ``T_b + (N - 1) * interval``: the first bucket's latency
  fills the pipe, then one bucket per interval (the last bucket's latency is the drain).
* commit: the subscribers' precommit (r) and the answer to the publisher's waiting request
  (r / 2).

Direct reads (``direct=True``, Note [Direct reads] in replicate.py; CPU subscribers on the
publisher's node): no gather and no slot. Every bucket is posted at once, so no window caps
anything; a bucket's latency is ``L0' + B/scatter'`` and the interval the slowest of the
subscribers' per-bucket work ``I0' + B/scatter'``, each subscriber process
``C0'_sub / K + B/scatter'`` and, on a CPU, ``I0' + K B / parallel_copy_Bps[K]`` (only the K
subscribers copy). With a core to spare (K < cores) the control work overlaps the copies
instead of adding to them: a subscriber's acks go out from a helper thread while it reads the
next bucket and the coordinator runs on the spare core, so those two resources become
``max(I0', B/scatter')`` and ``max(I0', K B / parallel_copy_Bps[K])`` (calibrated: 4 MiB
direct buckets with one subscriber were over-predicted by 26-40% by the sum). The primed fixed
costs are the ``bucket0_direct_*`` entries, measured the same way with direct reads; a table
without them uses the ring's (noted).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

__all__ = ["BUILTIN", "load_table", "load_table_dict", "simulate", "Prediction", "add_cli"]

_ANCHORS = "weight-sync-anchors.md §5"
_BENCH = "docs/BENCHMARKS.md (Machine A, 2-vCPU AMD EPYC VM)"

# The pipeline's fixed cost per bucket (control plane and Python, no bytes), measured on
# Machine A only: the ring with its same-node doorbell (Note [Doorbell]; median of 3
# hotweights.bench runs in session 7; the coordinator-only path measured 2.3 / 2.9 ms
# interval, median of 8 runs in session 1; spreads in docs/BENCHMARKS.md). A GPU host's
# faster and more numerous cores make it pessimistic there.
_OV = {"latency": (0.94e-3, 1.1e-3), "interval": (0.56e-3, 0.66e-3), "cpu": (0.87e-3, 1.27e-3),
       "cpu_publisher": (0.52e-3, 0.57e-3)}
_OV_SRC = (f"{_BENCH}, hotweights.bench pipeline overhead (real pipeline through the doorbell, "
           "4 KiB buckets, K=1 and K=2 subscribers, median of 3 runs; linear in K beyond)")

# Per-GPU numbers shared by both 8-GPU tables (H100 SXM class).
_H100 = {
    "hash_Bps": (1.12e12, f"{_ANCHORS}: HBM device_local_copy 1.12 TB/s measured (nvbandwidth #48, "
                 "H20-3e; the only measured HBM copy there; H100 spec copy <= 1.7 TB/s). Used for "
                 "the read-only hash pass too: conservative (a hash reads half the bytes a copy moves)"),
    "gather_Bps": (1.12e12, f"{_ANCHORS}: HBM copy 1.12 TB/s measured (publisher gather+hash "
                   "into its ring is one device-local copy)"),
    "scatter_Bps": (1.12e12, f"{_ANCHORS}: HBM copy 1.12 TB/s (the subscriber's local side)"),
    "coord_rtt_s": (0.237e-3, f"{_BENCH}: coordinator ping p50 0.237 ms on an idle coordinator"),
    "bucket0_latency_s": ({"1": _OV["latency"][0], "2": _OV["latency"][1]},
                          f"{_OV_SRC}: one bucket alone (window 1)"),
    "bucket0_interval_s": ({"1": _OV["interval"][0], "2": _OV["interval"][1]},
                           f"{_OV_SRC}: interval with the ring full (window 8)"),
    "bucket0_cpu_s": ({"1": _OV["cpu"][0], "2": _OV["cpu"][1]},
                      f"{_OV_SRC}: CPU seconds of all processes"),
    "bucket0_cpu_publisher_s": ({"1": _OV["cpu_publisher"][0], "2": _OV["cpu_publisher"][1]},
                                f"{_OV_SRC}: CPU seconds of the publisher's process"),
    "manifest_per_tensor_s": (20e-6, "assumption: per-tensor Python cost of a manifest (CPU "
                              "measurement order of magnitude)"),
    "plan_per_tensor_s": (5e-6, f"{_BENCH}: diff + pack of 1,000,000 tensors in 0.144 s "
                          "(0.14 us/tensor), rounded up for Python around it"),
}

BUILTIN: dict[str, dict[str, tuple[Any, str]]] = {
    "nvlink8": {
        "name": ("nvlink8: 8x H100 SXM, NVLink4 through NVSwitch", "topology"),
        "kind": ("gpu", "topology"),
        "link_Bps": (380e9, f"{_ANCHORS}: NVLink4 H100 SXM 380 GB/s one direction measured "
                     "(p2pBandwidthLatencyTest, NCCL #1264); spec 450"),
        "egress_Bps": (380e9, f"{_ANCHORS}: the publisher GPU's NVLink port (380 GB/s measured) "
                       "carries every subscriber's read of its ring"),
        "default_subscribers": (7, "topology: publisher on GPU0, subscribers on GPU1..7"),
        **_H100,
    },
    "pcie8": {
        "name": ("pcie8: 8x H100-class GPUs, PCIe Gen5 x16, no NVLink", "topology"),
        "kind": ("gpu", "topology"),
        "link_Bps": (50e9, f"{_ANCHORS}: PCIe Gen5 P2P D2D planning estimate 50 GB/s (UCX PR "
                     "#11865); spec ~63; H2D measured 55.3"),
        "egress_Bps": (50e9, f"{_ANCHORS}: the publisher GPU's x16 port (50 GB/s) carries every "
                       "subscriber's read of its ring"),
        "default_subscribers": (7, "topology: publisher on GPU0, subscribers on GPU1..7"),
        **_H100,
    },
}

_REQUIRED = ("hash_Bps", "gather_Bps", "scatter_Bps", "coord_rtt_s", "bucket0_latency_s",
             "bucket0_interval_s")


def load_table(topology: str) -> dict[str, Any]:
    """A link table: a built-in name, or a JSON file (hotweights.bench --out, whose
    ``simulator`` section is used, or a bare table). Values must be positive numbers."""
    if topology in BUILTIN:
        b = BUILTIN[topology]
        t = {k: v for k, (v, _) in b.items()}
        t["sources"] = {k: s for k, (_, s) in b.items() if s != "topology"}
        t["measured"] = False
        return t
    if not os.path.exists(topology):
        raise ValueError(f"--topology {topology!r}: expected {', '.join(BUILTIN)} or a JSON file "
                         "written by `python -m hotweights.bench --out FILE`")
    with open(topology) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--topology {topology}: not JSON ({e})") from None
    return load_table_dict(d, topology)


def load_table_dict(d: Mapping[str, Any], where: str = "link table") -> dict[str, Any]:
    """A measured link table from a dict: hotweights.bench results (their ``simulator``
    section) or a bare table."""
    if not isinstance(d, Mapping):
        raise ValueError(f"--topology {where}: expected a JSON object (a link table, or "
                         f"`hotweights.bench --out` results), got a {type(d).__name__}")
    t = d.get("simulator", d)
    if not isinstance(t, Mapping):
        raise ValueError(f"--topology {where}: 'simulator' is a {type(t).__name__}, expected "
                         "an object (the link table)")
    t = dict(t)
    missing = [k for k in _REQUIRED if not t.get(k)]
    if missing:
        raise ValueError(f"--topology {where}: the link table lacks {missing} (was it written "
                         "by `python -m hotweights.bench --out` with the cpu_shm_xproc path?)")
    t.setdefault("sources", {})
    t["measured"] = True
    t.setdefault("name", os.path.basename(where))
    return t


def _by_count(key: str) -> bool:
    """Columns measured per subscriber count (or per concurrent copiers): {"K": value}."""
    return key.startswith("bucket0_") or key == "parallel_copy_Bps"


def _check(t: Mapping[str, Any]) -> None:
    def number(k: str, v: Any) -> None:
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or v < 0 or (k.endswith("_Bps") and v == 0)):
            raise ValueError(f"link table: {k}={v!r}: expected a positive number")

    for k, v in t.items():
        if not k.endswith(("_Bps", "_s")) or v is None:
            continue
        if isinstance(v, Mapping):  # by subscriber count (or by concurrent copiers)
            for kk, vv in v.items():
                if not str(kk).isdigit() or int(kk) < 1:
                    raise ValueError(f"link table: {k} has key {kk!r}: expected a count >= 1")
                number(f"{k}[{kk}]", vv)
        elif _by_count(k):
            raise ValueError(f"link table: {k}={v!r}: expected an object of numbers by "
                             "subscriber count, e.g. {\"1\": ..., \"2\": ...}")
        else:
            number(k, v)


def _agg(par: Mapping[str, float] | None, k: int) -> tuple[float | None, str]:
    """Aggregate copy rate of k concurrent processes (the largest measured count when k is
    beyond it: the CPU is saturated there)."""
    if not par:
        return None, ""
    counts = sorted(int(x) for x in par)
    use = max([c for c in counts if c <= k] or [counts[0]])
    note = "" if use == k else (f" (measured up to {use} single-threaded copiers; {k} assumed "
                                "saturated at it)")
    return float(par[str(use)]), note


@dataclasses.dataclass
class Prediction:
    """One simulated update; every time in seconds."""

    topology: str
    measured_table: bool
    model_bytes: int
    bucket_bytes: int
    buckets: int
    subscribers: int
    tensors: int
    window: float                   # fixed, or the adaptive controller's mean over the update
    window_mode: str
    stages: dict[str, float]        # manifest, plan, stream, commit, total (comparable to PublishResult.timings)
    busy: dict[str, float]          # resource busy times during the stream
    per_bucket: dict[str, float]    # the per-bucket terms of Note [Update model]
    bottleneck: str
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _by_k(d: Mapping[str, float] | None, k: int, what: str, notes: list[str]) -> float | None:
    """A per-subscriber-count value at K: measured, or linear in K through the two largest
    measured counts (constant when only one was measured)."""
    if not d:
        return None
    pts = sorted((int(x), float(v)) for x, v in d.items())
    exact = dict(pts)
    if k in exact:
        return exact[k]
    if len(pts) == 1:
        notes.append(f"{what}: measured for K={pts[0][0]} only, used for K={k}")
        return pts[0][1]
    (k1, v1), (k2, v2) = pts[-2], pts[-1]
    v = v2 + (k - k2) * (v2 - v1) / (k2 - k1)
    notes.append(f"{what}: K={k} extrapolated linearly from K={k1}, {k2}")
    return max(v, min(v1, v2))


def _pipeline(n: int, nbytes: float, t_b: float, interval: float, window: int | None, *,
              min_window: int = 1, max_window: int = 8, versions: int = 2) -> tuple[float, float]:
    """Runs ``n`` buckets through a pipeline that takes ``t_b`` for a bucket alone and finishes
    at most one bucket per ``interval`` (its slowest resource): a bucket admitted at t finishes
    at max(t + t_b, the previous finish + interval). At most ``window`` buckets are in flight;
    ``window`` None admits as the real adaptive controller (_C.WindowController with the
    publisher's default base window 4 and 250 ms target) decides, fed the service times this
    produces (admission to finish, clamped like the publisher's), over ``versions`` updates in
    a row. Returns (the last update's streaming time, the mean window its buckets were
    admitted at). Finishes are in admission order, so the oldest in flight finishes first."""
    from . import _C

    if versions < 1:
        raise ValueError(f"simulate: versions={versions!r}: expected >= 1")
    ctl = None
    if window is None:
        ctl = _C.WindowController(base=min(4, max_window), min_window=min_window,
                                  max_window=max_window, target_s=0.25)
    now, stream, w_sum = 0.0, 0.0, 0
    for _ in range(versions if ctl is not None else 1):
        if ctl is not None:
            ctl.on_start(now)
        start, flight, last, admitted, w_sum, done = now, collections.deque(), -math.inf, 0, 0, 0
        while done < n:
            w = window if ctl is None else ctl.current
            while admitted < n and len(flight) < w:
                last = max(now + t_b, last + interval)
                flight.append((now, last))
                admitted += 1
                w_sum += w
            t0, t1 = flight.popleft()
            now = max(now, t1)
            done += 1
            if ctl is not None:
                ctl.on_complete(now, max(t1 - t0, 1e-9), max(int(nbytes), 1))
        stream = now - start
    return stream, w_sum / n


def simulate(table: Mapping[str, Any], model_bytes: float, bucket_bytes: int, *,
             subscribers: int | None = None, window: int | None = None, tensors: int | None = None,
             min_window: int = 1, max_window: int = 8, slots: int | None = None,
             direct: bool = False, buckets: int | None = None,
             versions: int = 2) -> Prediction:
    """Predicts one full update of ``model_bytes`` (Note [Update model]). ``window`` None runs
    the adaptive controller within [min_window, max_window] and ``slots``, over ``versions``
    updates in a row (the last one is predicted: a publisher's later updates start from what
    the controller learnt). ``direct``: subscribers read the source in place (CPU tables only).
    ``buckets``: the plan's bucket count when known (default ceil(model_bytes / bucket_bytes):
    packing whole tensors into buckets can take one or more extra)."""
    _check(table)
    for what, v in (("model_bytes", model_bytes), ("bucket_bytes", bucket_bytes)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"simulate: {what}={v!r}: expected a finite number of bytes")
    m = int(model_bytes)
    b = int(bucket_bytes)
    if m <= 0:
        raise ValueError(f"simulate: model_bytes={model_bytes!r}: expected > 0")
    if b <= 0:
        raise ValueError(f"simulate: bucket_bytes={bucket_bytes!r}: expected > 0")
    k = int(subscribers if subscribers is not None else table.get("default_subscribers", 2))
    if k < 1:
        raise ValueError(f"simulate: subscribers={subscribers!r}: expected >= 1")
    slots = int(slots or max_window)
    if window is not None and not 1 <= window <= slots:
        raise ValueError(f"simulate: window={window}: expected 1..{slots} (the ring's slots)")
    if not 1 <= min_window <= max_window:
        raise ValueError(f"simulate: window bounds [{min_window}, {max_window}] are not ordered")
    n_t = int(tensors if tensors is not None else max(1, round(m / 190e6)))
    if n_t < 1:
        raise ValueError(f"simulate: tensors={tensors!r}: expected >= 1")
    n = max(1, math.ceil(m / b)) if buckets is None else int(buckets)
    if n < 1:
        raise ValueError(f"simulate: buckets={buckets!r}: expected >= 1")
    b_eff = m / n  # mean bytes per bucket (the last one is partial)
    notes: list[str] = []
    r = float(table["coord_rtt_s"])
    g_bps, s_bps = float(table["gather_Bps"]), float(table["scatter_Bps"])
    link = float(table.get("link_Bps") or s_bps)
    egress = table.get("egress_Bps")
    if direct and table.get("kind") != "cpu":
        raise ValueError("simulate: direct reads are modelled for CPU tables only (a GPU "
                         "publisher streams through its ring)")
    pre = "bucket0_"
    if direct:
        if table.get("bucket0_direct_latency_s") and table.get("bucket0_direct_interval_s"):
            pre = "bucket0_direct_"
        else:
            notes.append("direct: no bucket0_direct_* in the table: the ring's fixed costs used")
    l0 = _by_k(table.get(pre + "latency_s"), k, pre + "latency_s", notes)
    i0 = _by_k(table.get(pre + "interval_s"), k, pre + "interval_s", notes)
    c0 = _by_k(table.get(pre + "cpu_s"), k, pre + "cpu_s", notes)
    c0_pub = _by_k(table.get(pre + "cpu_publisher_s"), k, pre + "cpu_publisher_s", notes)
    if l0 is None or i0 is None:
        raise ValueError("link table: bucket0_latency_s and bucket0_interval_s (the pipeline's "
                         "fixed cost per bucket) are missing: measure them with "
                         "`python -m hotweights.bench --out FILE`")

    t_g = 0.0 if direct else b_eff / g_bps
    t_s = b_eff / min(s_bps, link)
    cores = float(table.get("cores") or 1)
    copiers = k if direct else 1 + k  # processes copying at once in the pipeline's steady state
    if table.get("kind") == "cpu":
        # a bucket's K subscribers copy it at the same time: each copy slowed by the contention
        # that K concurrent copiers show, agg(K) / (K agg(1)) (2 on 2 cores: 0.86). (The
        # publisher's gather overlapping other buckets' copies is the "cpu" resource below.)
        agg_1, _ = _agg(table.get("parallel_copy_Bps"), 1)
        agg_k, _ = _agg(table.get("parallel_copy_Bps"), k)
        if agg_k is not None and agg_1:
            t_s /= min(1.0, agg_k / (k * agg_1))
    # Direct reads with a core to spare (K < cores): a subscriber's acks go out from a helper
    # thread while it reads the next bucket, and the coordinator runs on the spare core, so
    # the per-bucket control work overlaps the copies instead of adding to them.
    overlap = direct and table.get("kind") == "cpu" and k < cores
    t_x = b_eff / link
    t_e = k * b_eff / float(egress) if egress else 0.0
    t_b = l0 + t_g + t_s
    res = {"pipeline": max(i0, t_s) if overlap else i0 + max(t_g, t_s)}
    if c0_pub is not None and table.get("kind") == "cpu":
        # The publisher's process (its threads and the embedded coordinator share one
        # interpreter) does its control work and waits for its gather, bucket after bucket;
        # each subscriber process likewise with its scatter. Only where the copies compete
        # for the same cores: on a GPU machine a process's threads overlap on spare cores
        # (zmq and the copy engine release the GIL), so its CPU seconds per bucket (2.0 ms
        # on the H200 machine) overstate its serial time, and the interval measured with the
        # ring full (1.7 ms there) is the control plane's real limit.
        if not direct:  # direct: the publisher only posts (all at once)
            res["publisher process"] = c0_pub + t_g
        if c0 is not None:
            res["subscriber process"] = max(c0 - c0_pub, 0.0) / k + t_s
    if egress:
        res["egress"] = t_e
    if table.get("shared_device_Bps"):  # one GPU holds the ring and every subscriber
        res["device"] = (1 + k) * b_eff / float(table["shared_device_Bps"])
    if table.get("kind") == "cpu":
        # parallel_copy_Bps is indexed by single-threaded copiers; each process's copy engine
        # runs copy_threads workers (HOTWEIGHTS_IPC_COPY_STREAMS), so fewer processes than
        # cores still use every core, each process at most at its own measured rate (calibrated:
        # one direct subscriber copied 64 MiB buckets at its scatter rate, 18 GB/s, not at one
        # thread's 10.5: the model said +26-33%)
        threads = copiers * int(table.get("copy_threads") or 2)
        agg, note = _agg(table.get("parallel_copy_Bps"), threads)
        if agg is not None:
            agg = min(agg, copiers * s_bps)
        if agg is None:
            agg = g_bps * min(cores, copiers)
            notes.append("cpu: no parallel_copy_Bps in the table: copies assumed to scale with cores")
        elif note:
            notes.append("cpu: aggregate copy rate" + note)
        # On a saturated CPU the control work and the copies do not overlap: the zero-byte
        # interval I0 (measured wall time, so it already reflects how many cores the
        # processes really got) plus the 1 + K copies at their aggregate rate.
        res["cpu"] = (max(i0, copiers * b_eff / agg) if overlap
                      else i0 + copiers * b_eff / agg)
    res_name, res_interval = max(res.items(), key=lambda kv: kv[1])
    if direct:  # no slots: every bucket is posted at once
        w_run, mode = n, "direct reads (no window)"
    elif window is None:
        w_run = None
        mode = f"adaptive (the controller in [{min(min_window, slots)}, {min(max_window, slots)}])"
    else:
        w_run, mode = int(window), "fixed"
    pipe, w = _pipeline(n, b_eff, t_b, res_interval, w_run, min_window=min(min_window, slots),
                        max_window=min(max_window, slots), versions=versions)
    interval = (pipe - t_b) / (n - 1) if n > 1 else res_interval
    # the window limits when it holds fewer buckets than a bucket's latency spans intervals
    bottleneck = (f"window ({w:.3g} x {b_eff / 2**20:.3g} MiB in flight)"
                  if w < t_b / res_interval else res_name)
    if bottleneck == "pipeline":
        bottleneck = ("per-bucket control" if i0 > max(t_g, t_s) else
                      "gather (publisher copy)" if t_g >= t_s else "scatter (subscriber copy)")
    stream = r + pipe
    manifest = m / float(table["hash_Bps"]) + n_t * float(table.get("manifest_per_tensor_s") or 0)
    plan = n_t * float(table.get("plan_per_tensor_s") or 0) + r
    commit = 1.5 * r
    stages = {"manifest": manifest, "plan": plan, "stream": stream, "commit": commit,
              "total": manifest + plan + stream + commit}
    busy = {"gather": n * t_g, "transfer": n * (t_e if egress else t_x),
            "scatter/verify": n * t_s, "control": n * i0}
    per_bucket = {"gather_s": t_g, "scatter_s": t_s, "link_s": t_x, "egress_s": t_e,
                  "control_latency_s": l0, "control_interval_s": i0, "latency_s": t_b,
                  "interval_s": interval, **{f"resource_{k2}_s": v for k2, v in res.items()}}
    return Prediction(str(table.get("name")), bool(table.get("measured")), m, b, n, k, n_t,
                      round(w, 2), mode, stages, busy, per_bucket, bottleneck, notes)


# --------------------------------------------------------------------------- CLI


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def render(preds: Sequence[Prediction], table: Mapping[str, Any]) -> str:
    """Tables of the predictions and the link table with sources."""
    kind = "measured link table" if table.get("measured") else "built-in link table"
    out = [f"# hotweights simulate: {table.get('name')} ({kind})",
           "# PROJECTION: computed from the link table below, not measured on this topology"]
    cols = ["bucket", "window", "subs", "manifest", "plan", "stream", "commit", "total",
            "bottleneck", "model GB/s"]
    rows = [cols]
    for p in preds:
        s = p.stages
        mode = ("fixed" if p.window_mode == "fixed" else "direct" if p.window_mode.startswith("direct")
                else "adaptive")
        rows.append([f"{p.bucket_bytes / 2**20:g} MiB", f"{p.window:g} ({mode})",
                     str(p.subscribers), _fmt_s(s["manifest"]), _fmt_s(s["plan"]), _fmt_s(s["stream"]),
                     _fmt_s(s["commit"]), _fmt_s(s["total"]), p.bottleneck,
                     f"{p.model_bytes / s['total'] / 1e9:.3g}"])
    w = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    out += ["  ".join(x.ljust(w[i]) for i, x in enumerate(r)).rstrip() for r in rows]
    p = preds[0]
    out.append(f"model {p.model_bytes / 1e9:g} GB in {p.tensors} tensors; busy time of each "
               "stream resource for the first row (pipelined, they overlap):")
    for name, v in p.busy.items():
        out.append(f"  {name:15s} {_fmt_s(v)}")
    out.append("link table:")
    src = table.get("sources", {})
    for key in sorted(k for k in table if k.endswith(("_Bps", "_s")) or k in ("cores",)):
        v = table[key]
        unit = ((lambda x: f"{x / 1e9:.4g} GB/s") if key.endswith("_Bps") else
                (lambda x: f"{x * 1e3:.4g} ms") if key.endswith("_s") else str)
        shown = (", ".join(f"{a}: {unit(x)}" for a, x in v.items()) if isinstance(v, dict)
                 else unit(v))
        out.append(f"  {key:22s} {shown:28s} {src.get(key, '')}")
    for note in dict.fromkeys(n for p in preds for n in p.notes):
        out.append(f"note: {note}")
    return "\n".join(out)


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("simulate", help="project the time of a full update from a link "
                              "table (nvlink8, pcie8, or a hotweights.bench JSON file)")
    s.add_argument("--topology", required=True, help=f"{', '.join(BUILTIN)} or FILE (bench --out)")
    s.add_argument("--model-bytes", type=float, required=True, help="bytes per update, e.g. 140e9")
    s.add_argument("--bucket-mb", type=float, nargs="+", default=None,
                   help="bucket size(s) in MiB (default HOTWEIGHTS_BUCKET_MB)")
    s.add_argument("--window", type=int, nargs="+", default=None,
                   help="fixed window(s); default: the adaptive controller, run on the modelled pipeline")
    s.add_argument("--subscribers", type=int, default=None,
                   help="subscribers (default: 7 on the 8-GPU tables, 2 otherwise)")
    s.add_argument("--tensors", type=int, default=None, help="tensors in the model (default: bytes / 190 MB)")
    s.add_argument("--preset", default=None, help="take window bounds and bucket size from a preset")
    s.add_argument("--ring", action="store_true",
                   help="CPU tables: model the slot ring (HOTWEIGHTS_DIRECT_READ=off) instead of "
                   "direct reads, which is what a CPU publisher does by default")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from . import config as _config

    if args.preset:
        from . import presets

        cfg = presets.config_for(args.preset)
    else:
        cfg = _config.get()
    table = load_table(args.topology)
    for x in args.bucket_mb or ():
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"--bucket-mb {x}: expected a size in MiB > 0")
    buckets = [int(x * 2**20) for x in (args.bucket_mb or [cfg.bucket_mb])]
    windows = args.window or [None]
    direct = table.get("kind") == "cpu" and not args.ring and cfg.direct_read != "off"
    preds = [simulate(table, args.model_bytes, b, subscribers=args.subscribers, window=w,
                      tensors=args.tensors, min_window=cfg.ipc_min_inflight,
                      max_window=cfg.ipc_max_inflight, slots=cfg.ipc_max_inflight, direct=direct)
             for b in buckets for w in windows]
    if args.json:
        print(json.dumps({"projection": True, "table": table,
                          "predictions": [p.to_dict() for p in preds]}, indent=2, default=str))
    else:
        print(render(preds, table))
    return 0
