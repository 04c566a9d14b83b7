# SPDX-License-Identifier: Apache-2.0
"""``python -m hotweights.bench``: bandwidth and per-bucket latency of every data path this
machine has, swept over bucket size and window, against the raw-copy ceiling of the same link
measured in the same run.

Paths (each runs when present):

=================  ======================================================================
cpu_shm            same process: gather+hash into a slot of a shared-memory SlotRing, then
                   scatter+hash out of it (the publisher's and subscriber's copies)
cpu_shm_xproc      a SlotRing exported to a spawned child, which scatters+hashes each bucket
                   and acks it over a pipe (the real cross-process data path, minus the
                   coordinator)
mpi                mpirun -n 2: rank 0 sends buckets to rank 1, W unacknowledged at most
h2d_pinned         pinned host -> device (copy engine, chunked over streams)
d2h_pinned         device -> pinned host
same_device        device -> device on one GPU
ipc_same_gpu       a CUDA SlotRing exported to a spawned child on the same GPU (gather+hash,
                   interprocess event, scatter+hash in the child)
peer               GPU 0 -> GPU 1 (the link type comes from hotweights.topo)
=================  ======================================================================

A bucket's latency is from the start of its first copy to its completion (cross-process:
to the child's ack). Each path's latency-vs-size at window 1 is fitted to
``fixed + bytes / bandwidth``; those fits, the hash rate, the coordinator round trip and the
aggregate copy rate of 1..3 concurrent processes form the ``simulator`` link table that
``hotweights simulate --topology results.json`` reads. No number here is asserted anywhere.

    python -m hotweights.bench [--device cpu|cuda] [--quick] [--out results.json]
                               [--plot results.png] [--paths cpu_shm,mpi,...]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["machine", "describe", "table", "run", "main", "add_cli", "CPU_PATHS", "CUDA_PATHS"]

GB = 1e9
MiB = 1 << 20
CPU_PATHS = ("cpu_shm", "cpu_shm_xproc", "mpi")
CUDA_PATHS = ("h2d_pinned", "d2h_pinned", "same_device", "ipc_same_gpu", "peer")


# --------------------------------------------------------------------------- reporting helpers
# (benchmarks/common.py re-exports these: one implementation)


def _stop_workers(pipes, procs) -> None:
    """Asks every worker to stop through its pipe, then reaps (or kills) it."""
    for a in pipes:
        try:
            a.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()


def machine() -> dict:
    """Where a result was measured."""
    from .topo import cpu_model

    cpu = cpu_model() or platform.processor() or platform.machine()
    d = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        d["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
        d["gpus"] = torch.cuda.device_count()
    return d


def describe(m: dict | None = None) -> str:
    """One line naming the machine."""
    m = m or machine()
    s = f"{m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, torch {m['torch']}"
    if "gpu" in m:
        s += f", {m['gpus']}x {m['gpu']}"
    return s


def table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    """Plain-text table of dict rows."""
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(xs))  # noqa: E731
    return "\n".join([line(cols), line(["-" * x for x in w])] + [line(x) for x in cells])


# --------------------------------------------------------------------------- sweep settings


class Sweep:
    """Bucket sizes, windows, bytes per run and repetitions (``--quick``: a CI smoke run)."""

    def __init__(self, device: str, quick: bool):
        cuda = device.startswith("cuda")
        if quick:
            self.total = (512 if cuda else 32) * MiB
            self.buckets = [8 * MiB, 64 * MiB] if cuda else [1 * MiB, 8 * MiB]
            self.windows = [1, 4] if cuda else [1, 2]
            self.reps = 1
            self.parallel = [1, 2]
            self.parallel_s = 0.2
        else:
            self.total = (2048 if cuda else 256) * MiB
            self.buckets = ([4, 16, 64, 256] if cuda else [1, 4, 16, 64])
            self.buckets = [b * MiB for b in self.buckets]
            self.windows = [1, 2, 4, 8] if cuda else [1, 2, 4]
            self.reps = 3
            self.parallel = [1, 2, 3]
            self.parallel_s = 0.5


def _fit(points: list[tuple[int, float]]) -> dict | None:
    """Least-squares ``latency = fixed + bytes / Bps`` over (bytes, seconds) points."""
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    slope, fixed = np.polyfit(x, y, 1)
    if slope <= 0:
        return {"fixed_s": float(max(fixed, 0.0)), "Bps": None, "points": len(points)}
    return {"fixed_s": float(max(fixed, 0.0)), "Bps": float(1.0 / slope), "points": len(points)}


def _median_run(fn: Callable[[], tuple[float, list[float]]], reps: int) -> tuple[float, list[float]]:
    runs = [fn() for _ in range(reps)]
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


# --------------------------------------------------------------------------- CPU: ceilings


def memcpy_ceiling(nbytes: int, reps: int = 3) -> float:
    """Seconds of one memcpy of nbytes (pages faulted in first): the raw-copy ceiling."""
    s, d = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    ctypes.memmove(d.ctypes.data, s.ctypes.data, nbytes)
    best = []
    for _ in range(max(reps, 3)):
        t0 = time.perf_counter()
        ctypes.memmove(d.ctypes.data, s.ctypes.data, nbytes)
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


def hash_rate(nbytes: int, pieces: int = 64, device: str = "cpu") -> float:
    """Bytes/s of ops.checksum_batch over ``pieces`` tensors (the manifest's hash pass; it
    returns host values, so a CUDA call includes its synchronisation)."""
    from . import ops

    ts = [torch.ones(nbytes // pieces // 4, device=device) for _ in range(pieces)]
    ops.checksum_batch(ts)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ops.checksum_batch(ts)
        times.append(time.perf_counter() - t0)
    return sum(t.numel() * 4 for t in ts) / statistics.median(times)


# --------------------------------------------------------------------------- ring paths


def _views(buf: torch.Tensor, bucket: int, n: int) -> list[torch.Tensor]:
    return [buf[i * bucket:(i + 1) * bucket] for i in range(n)]


def ring_same_process(device: str, sweep: Sweep) -> list[dict]:
    """cpu_shm: gather+hash into a ring slot, scatter+hash out, W buckets in flight."""
    from . import ops
    from .ipc import SlotRing

    rows = []
    src = torch.randint(0, 255, (sweep.total,), dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    for b in sweep.buckets:
        n = sweep.total // b
        for w in sweep.windows:
            ring = SlotRing(b, w, device, name="bench")
            ring.buffer.fill_(0)
            sv, dv = _views(src, b, n), _views(dst, b, n)
            stage = {"gather": [], "scatter": []}

            def one() -> tuple[float, list[float]]:
                free = list(range(w))
                pend: collections.deque = collections.deque()
                lat: list[float] = []

                def finish():
                    i, t0, slot, h = pend.popleft()
                    h.wait()
                    t1 = time.perf_counter()
                    ops.scatter(ring.slot(slot), [dv[i]], [0], hash=True).partials()
                    t2 = time.perf_counter()
                    if w == 1:  # stage times only when buckets do not overlap
                        stage["gather"].append(t1 - t0)
                        stage["scatter"].append(t2 - t1)
                    lat.append(t2 - t0)
                    free.append(slot)

                t_start = time.perf_counter()
                for i in range(n):
                    while not free:
                        finish()
                    slot = free.pop()
                    t0 = time.perf_counter()
                    h = ops.gather(ring.slot(slot), [sv[i]], [0], hash=True, async_op=True)
                    pend.append((i, t0, slot, h))
                while pend:
                    finish()
                return time.perf_counter() - t_start, lat

            one()  # warm: engine threads, first touch of the ring
            wall, lat = _median_run(one, sweep.reps)
            if not torch.equal(src, dst):
                raise RuntimeError("cpu_shm: destination differs from source after the run")
            dst.zero_()
            rows.append(_row("cpu_shm", b, w, sweep.total, wall, lat,
                             extra={"gather_s": _mean(stage["gather"]), "scatter_s": _mean(stage["scatter"])}))
    return rows


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _row(path: str, bucket: int, window: int, total: int, wall: float, lat: list[float],
         extra: dict | None = None) -> dict:
    r = {"path": path, "bucket_mib": bucket / MiB, "window": window, "bytes": total,
         "wall_s": wall, "GB/s": total / wall / GB,
         "latency_ms": statistics.mean(lat) * 1e3 if lat else None,
         "latency_p90_ms": float(np.percentile(lat, 90)) * 1e3 if lat else None}
    if extra:
        r.update({k: v for k, v in extra.items() if v is not None})
    return r


def use_device(device: str) -> None:
    """Makes a benchmark process's CUDA device current: "cuda" alone means cuda:0 (what a
    fresh process would use), "cuda:N" device N; nothing for "cpu"."""
    d = torch.device(device)
    if d.type == "cuda":
        torch.cuda.set_device(0 if d.index is None else d.index)


def _xproc_child(conn, device: str) -> None:
    """Child of the cross-process ring path: imports each ring once, scatters+hashes every
    announced bucket into its own buffer, acks with the digest and the scatter time."""
    from . import ops
    from .ipc import open_ring

    torch.set_num_threads(1)
    use_device(device)
    dst = None
    ring = None
    bucket = 0
    try:
        while True:
            msg = conn.recv()
            kind = msg[0]
            if kind == "stop":
                return
            if kind == "ping":
                conn.send(("pong",))
            elif kind == "ring":
                _, handle, bucket, total = msg
                ring = open_ring(handle, device)
                if dst is None or dst.numel() != total:
                    dst = torch.zeros(total, dtype=torch.uint8, device=device)
                conn.send(("ok",))
            elif kind == "close":
                if ring is not None:
                    ring.close()
                ring = None
                conn.send(("ok",))
            elif kind == "bucket":
                _, i, slot = msg
                t0 = time.perf_counter()
                if device.startswith("cuda"):
                    ring.wait(slot)
                h = ops.scatter(ring.slot(slot), [dst[i * bucket:(i + 1) * bucket]], [0], hash=True)
                digest = h.digest()
                conn.send(("ack", i, digest, time.perf_counter() - t0))
            elif kind == "digest":
                conn.send(("digest", ops.checksum(dst)))
    except EOFError:
        return


class _Child:
    """A spawned _xproc_child with a pipe; always terminated on exit."""

    def __init__(self, device: str, timeout: float = 120.0):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.p = ctx.Process(target=_xproc_child, args=(child, device), daemon=True)
        self.p.start()
        child.close()
        self.timeout = timeout

    def call(self, *msg):
        self.conn.send(msg)
        return self.recv()

    def recv(self):
        if not self.conn.poll(self.timeout):
            raise TimeoutError(f"bench child (pid {self.p.pid}) did not answer in {self.timeout} s")
        return self.conn.recv()

    def close(self):
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.p.join(10)
        if self.p.is_alive():
            self.p.kill()
            self.p.join(5)


def pipe_rtt(child: _Child, n: int = 200) -> float:
    """Median round trip of a tiny message over the child's pipe."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        child.call("ping")
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ring_cross_process(device: str, sweep: Sweep, path: str) -> tuple[list[dict], dict]:
    """cpu_shm_xproc / ipc_same_gpu: the publisher side here, the subscriber in a child."""
    from . import ops
    from .ipc import SlotRing

    rows = []
    child = _Child(device)
    extra: dict = {}
    try:
        extra["pipe_rtt_s"] = pipe_rtt(child)
        src = torch.randint(0, 255, (sweep.total,), dtype=torch.uint8, device=device)
        want = ops.checksum(src)
        for b in sweep.buckets:
            n = sweep.total // b
            sv = _views(src, b, n)
            for w in sweep.windows:
                ring = SlotRing(b, w, device, name="bench")
                ring.buffer.fill_(0)
                child.call("ring", ring.handle(), b, sweep.total)
                stage = {"gather": [], "scatter": []}

                def one() -> tuple[float, list[float]]:
                    free = list(range(w))
                    t_of: dict[int, tuple[float, int, int]] = {}
                    lat: list[float] = []

                    def take_ack():
                        _, i, digest, t_sc = child.recv()
                        t0, slot, d = t_of.pop(i)
                        if digest != d:
                            raise RuntimeError(f"{path}: bucket {i} arrived with digest {digest:016x}, "
                                               f"sent {d:016x}")
                        lat.append(time.perf_counter() - t0)
                        if w == 1:
                            stage["scatter"].append(t_sc)
                        free.append(slot)

                    t_start = time.perf_counter()
                    for i in range(n):
                        while not free:
                            take_ack()
                        slot = free.pop()
                        t0 = time.perf_counter()
                        h = ops.gather(ring.slot(slot), [sv[i]], [0], hash=True)
                        d = h.digest()
                        ring.record(slot)
                        if device.startswith("cuda"):
                            torch.cuda.current_stream().synchronize()
                        if w == 1:
                            stage["gather"].append(time.perf_counter() - t0)
                        t_of[i] = (t0, slot, d)
                        child.conn.send(("bucket", i, slot))
                    while t_of:
                        take_ack()
                    return time.perf_counter() - t_start, lat

                one()  # warm: child's first touch of its buffer and the ring
                wall, lat = _median_run(one, sweep.reps)
                got = child.call("digest")[1]
                if got != want:
                    raise RuntimeError(f"{path}: the child's copy hashes to {got:016x}, the source "
                                       f"to {want:016x}")
                child.call("close")
                del ring
                rows.append(_row(path, b, w, sweep.total, wall, lat,
                                 extra={"gather_s": _mean(stage["gather"]),
                                        "scatter_s": _mean(stage["scatter"])}))
    finally:
        child.close()
    return rows, extra


# --------------------------------------------------------------------------- CPU contention


def _parallel_worker(conn) -> None:
    from . import ops

    torch.set_num_threads(1)
    b = 16 * MiB
    src = torch.randint(0, 255, (b,), dtype=torch.uint8)
    slot = torch.zeros(b, dtype=torch.uint8)
    ops.gather(slot, [src], [0], hash=True).partials()
    conn.send(("ready",))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, start_at, duration = msg
        while time.time() < start_at:
            time.sleep(0.0005)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            ops.gather(slot, [src], [0], hash=True).partials()
            n += 1
        conn.send(("done", n * b, time.perf_counter() - t0))


def parallel_copy_rates(counts: Sequence[int], duration: float, rounds: int = 3) -> dict[int, float]:
    """Aggregate gather+hash bytes/s of k processes copying at once (k in counts; median of
    ``rounds``): the CPU (cores and memory bandwidth) is one resource shared by publisher and
    subscribers."""
    ctx = mp.get_context("spawn")
    k = max(counts)
    pipes, procs = [], []
    try:
        for _ in range(k):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_parallel_worker, args=(b,), daemon=True)
            p.start()
            b.close()
            pipes.append(a)
            procs.append(p)
        for a in pipes:
            if not a.poll(120):
                raise TimeoutError("parallel copy worker did not start in 120 s")
            a.recv()
        got: dict[int, list[float]] = {c: [] for c in counts}
        for _ in range(rounds):  # interleaved rounds: a burst of foreign load hits every count
            for c in counts:
                start = time.time() + 0.05
                for a in pipes[:c]:
                    a.send(("go", start, duration))
                total = 0.0
                for a in pipes[:c]:
                    if not a.poll(60 + duration):
                        raise TimeoutError("parallel copy worker did not finish")
                    _, nbytes, dt = a.recv()
                    total += nbytes / dt
                got[c].append(total)
        return {c: statistics.median(v) for c, v in got.items()}
    finally:
        _stop_workers(pipes, procs)


# --------------------------------------------------------------------------- control plane


def coordinator_rtt(n: int = 300) -> dict:
    """Round trip of a request to an embedded coordinator from a client in the same process
    (where the publisher's requests go): median and p90 seconds."""
    from .coordinator import Client, start_embedded

    coord = start_embedded()
    try:
        c = Client(coord.endpoint)
        try:
            for _ in range(20):
                c.ping()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                c.ping()
                ts.append(time.perf_counter() - t0)
        finally:
            c.close()
    finally:
        coord.stop()
    return {"rtt_s": statistics.median(ts), "rtt_p90_s": float(np.percentile(ts, 90))}


def _overhead_subscriber(conn, name: str, endpoint: str, n: int, numel: int,
                         device: str = "cpu") -> None:
    """A real subscriber (register_hotweights) of ``n`` small tensors; reports each applied
    version and, on request, its process CPU time."""
    serve_buffers(conn, name, endpoint, n, numel, device,
                  lambda msg: ("cpu", time.process_time()))


def serve_buffers(conn, name: str, endpoint: str, n: int, numel: int, device: str,
                  on_message: Callable[[tuple], tuple], poll_s: float = 0.005) -> None:
    """Body of a benchmark's subscriber process: a module of ``n`` buffers of ``numel``
    floats registered for ``name``; sends ("ready",), then ("applied", version) for each
    version it applies, answers every other message from ``conn`` with ``on_message(msg)``
    until ("stop",)."""
    import hotweights  # noqa: F401  (adds nn.Module.register_hotweights)

    torch.set_num_threads(1)
    use_device(device)
    model = torch.nn.Module()
    for i in range(n):
        model.register_buffer(f"t{i:04d}", torch.zeros(numel, device=device))
    h = model.register_hotweights(name=name, endpoint=endpoint, commit="manual", swap="storage")
    conn.send(("ready",))
    try:
        while True:
            if conn.poll(poll_s):
                msg = conn.recv()
                if msg[0] == "stop":
                    return
                conn.send(on_message(msg))
            try:
                v = h.wait(timeout=0.05)
            except TimeoutError:
                continue
            conn.send(("applied", v))
    finally:
        h.close()


def pipeline_overhead(counts: Sequence[int] = (1, 2), buckets: int = 64, bucket_bytes: int = 4096,
                      reps: int = 3, device: str = "cpu",
                      doorbell: bool = True) -> dict[str, dict[str, float]]:
    """The real pipeline's fixed cost per bucket (Publisher, embedded coordinator in this
    process, K spawned subscribers) measured with buckets of ``bucket_bytes`` (4 KiB: the
    copies cost nothing): through the ring, the latency of one bucket alone (window 1), the
    interval between buckets with the ring full (window 8), and the CPU seconds all processes
    spend per bucket; on the CPU the same for direct reads (``direct_*``: every bucket posted
    at once; the latency from a one-bucket update). ``doorbell``: the ring's same-node
    buckets through the doorbell (the default, Note [Doorbell]) or through the coordinator.
    """
    from . import config as _config
    from .coordinator import start_embedded
    from .replicate import Publisher

    out: dict[str, dict[str, float]] = {"latency_s": {}, "interval_s": {}, "cpu_s": {},
                                        "cpu_publisher_s": {}}
    if device == "cpu":
        out.update({f"direct_{key}": {} for key in list(out)})
    ctx = mp.get_context("spawn")
    numel = bucket_bytes // 4
    for k in counts:
        name = f"overhead{k}"
        coord = start_embedded()
        pipes, procs = [], []
        try:
            for _ in range(k):
                a, b = ctx.Pipe()
                pr = ctx.Process(target=_overhead_subscriber,
                                 args=(b, name, coord.endpoint, buckets, numel, device), daemon=True)
                pr.start()
                b.close()
                pipes.append(a)
                procs.append(pr)
            for a in pipes:
                if not a.poll(180) or a.recv()[0] != "ready":
                    raise TimeoutError("pipeline-overhead subscriber did not start in 180 s")
            src = {f"t{i:04d}": torch.zeros(numel, device=device) for i in range(buckets)}

            backlog: dict[int, list] = {i: [] for i in range(k)}

            def expect(i: int, match: Callable[[tuple], bool], what: str) -> tuple:
                """The next message of subscriber i that matches; others are kept."""
                for j, msg in enumerate(backlog[i]):
                    if match(msg):
                        return backlog[i].pop(j)
                while True:
                    if not pipes[i].poll(120):
                        raise TimeoutError(f"pipeline-overhead subscriber {i}: no {what} in 120 s")
                    msg = pipes[i].recv()
                    if match(msg):
                        return msg
                    backlog[i].append(msg)

            def applied(version: int) -> None:
                for i in range(k):
                    expect(i, lambda m: m[0] == "applied" and m[1] >= version, f"apply of v{version}")

            def cpu_now() -> tuple[float, float]:
                """(this process's CPU seconds: publisher and embedded coordinator, all)"""
                mine = time.process_time()
                total = mine
                for a in pipes:
                    a.send(("cpu",))
                for i in range(k):
                    total += expect(i, lambda m: m[0] == "cpu", "CPU time")[1]
                return mine, total

            passes = [(1, "latency_s", "off"), (8, "interval_s", "off")]
            if device == "cpu":
                passes.append((8, "direct_interval_s", "on"))
            for w, key, direct in passes:
                cfg = _config.load({}, bucket_mb=1, ipc_adapt=False, ipc_inflight_buckets=w,
                                   ipc_max_inflight=8, doorbell=doorbell)
                pub = Publisher(src, name=name, endpoint=coord.endpoint, bucket_bytes=bucket_bytes,
                                serve_late=False, config=cfg, direct=direct)
                try:
                    per, cpus, pubs, lat = [], [], [], []
                    for rep in range(reps + 1):
                        for t in src.values():
                            t.add_(1)
                        c0 = cpu_now()
                        r = pub.publish(f"w{w}-{direct}-{rep}")
                        c1 = cpu_now()
                        applied(r.version)
                        if rep:  # the first publish warms staging and rings
                            per.append(r.timings["stream_s"] / r.buckets)
                            pubs.append((c1[0] - c0[0]) / r.buckets)
                            cpus.append((c1[1] - c0[1]) / r.buckets)
                        if direct == "on":  # one bucket alone: its latency
                            next(iter(src.values())).add_(1)
                            r1 = pub.publish(f"one-{rep}")
                            applied(r1.version)
                            if rep:
                                lat.append(r1.timings["stream_s"])
                    out[key][str(k)] = statistics.median(per)
                    pre = "direct_" if direct == "on" else ""
                    if w == 8:
                        out[pre + "cpu_s"][str(k)] = statistics.median(cpus)
                        out[pre + "cpu_publisher_s"][str(k)] = statistics.median(pubs)
                    if lat:
                        out["direct_latency_s"][str(k)] = statistics.median(lat)
                finally:
                    pub.close()
        finally:
            _stop_workers(pipes, procs)
            coord.stop()
    return out


def per_tensor_costs(n: int = 2000) -> dict:
    """Seconds per tensor of building a manifest and a plan (tiny tensors: no bytes to hash)."""
    from .manifest import Manifest
    from .plan import SubscriberSpec, make_plan

    sd = {f"layer.{i}.weight": torch.zeros(2) for i in range(n)}
    Manifest.from_state_dict(sd)
    t0 = time.perf_counter()
    m = Manifest.from_state_dict(sd)
    t1 = time.perf_counter()
    make_plan(m, [SubscriberSpec("a"), SubscriberSpec("b")], 64 * MiB)
    t2 = time.perf_counter()
    return {"manifest_per_tensor_s": (t1 - t0) / n, "plan_per_tensor_s": (t2 - t1) / n}


# --------------------------------------------------------------------------- MPI


MPI_SCRIPT = r"""
import json, sys, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = int(sys.argv[1]); buckets = [int(x) for x in sys.argv[2].split(",")]
windows = [int(x) for x in sys.argv[3].split(",")]; reps = int(sys.argv[4])
src = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
dst = np.zeros(total, np.uint8)
ack = np.zeros(1, np.uint8)
if comm.rank == 0:
    d = np.zeros(total, np.uint8); np.copyto(d, src)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); np.copyto(d, src); ts.append(time.perf_counter() - t0)
    print(json.dumps({"ceiling_s": sorted(ts)[1]}), flush=True)
for b in buckets:
    n = total // b
    for w in windows:
        best = None
        for rep in range(reps + 1):
            comm.Barrier()
            t_start = time.perf_counter()
            lat = []
            if comm.rank == 0:
                t_post = {}
                reqs = {}
                for i in range(n):
                    if i >= w:
                        comm.Recv(ack, source=1, tag=i - w)
                        lat.append(time.perf_counter() - t_post.pop(i - w)); reqs.pop(i - w).Wait()
                    t_post[i] = time.perf_counter()
                    reqs[i] = comm.Isend(src[i * b:(i + 1) * b], dest=1, tag=i)
                for i in range(max(0, n - w), n):
                    comm.Recv(ack, source=1, tag=i)
                    lat.append(time.perf_counter() - t_post.pop(i)); reqs.pop(i).Wait()
            else:
                for i in range(n):
                    comm.Recv(dst[i * b:(i + 1) * b], source=0, tag=i)
                    comm.Send(ack, dest=0, tag=i)
            comm.Barrier()
            wall = time.perf_counter() - t_start
            if rep and (best is None or wall < best[0]):
                best = (wall, lat)
        if comm.rank == 1 and not np.array_equal(src, dst):
            print("MISMATCH", file=sys.stderr); comm.Abort(1)
        dst[:] = 0
        if comm.rank == 0:
            print(json.dumps({"bucket": b, "window": w, "wall_s": best[0], "lat": best[1]}), flush=True)
"""


def mpi_reason() -> str | None:
    """None when the MPI path can run, else why not."""
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    if not shutil.which("mpirun"):
        return "mpirun is not on PATH"
    return None


def mpi_path(sweep: Sweep) -> tuple[list[dict], float]:
    """mpirun -n 2 of MPI_SCRIPT; rows, and rank 0's memcpy ceiling (seconds)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MPI_SCRIPT)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = ["mpirun", "--oversubscribe", "-n", "2", sys.executable, f.name, str(sweep.total),
           ",".join(map(str, sweep.buckets)), ",".join(map(str, sweep.windows)), str(sweep.reps)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                           stdin=subprocess.DEVNULL)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"mpirun exited {r.returncode}: {r.stderr.strip()[-400:]}")
    rows, ceiling = [], None
    for line in r.stdout.splitlines():
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "ceiling_s" in d:
            ceiling = d["ceiling_s"]
            continue
        rows.append(_row("mpi", d["bucket"], d["window"], sweep.total, d["wall_s"], d["lat"]))
    if ceiling is None or not rows:
        raise RuntimeError(f"mpirun printed no results: {r.stdout[-300:]!r}")
    return rows, ceiling


# --------------------------------------------------------------------------- CUDA paths


def _cuda_time(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def cuda_copy_path(path: str, src: torch.Tensor, dst: torch.Tensor, sweep: Sweep) -> list[dict]:
    """A bucketed copy src -> dst with the hotweights copy engine, W batches in flight."""
    from . import ops

    rows = []
    for b in sweep.buckets:
        n = sweep.total // b
        sv, dv = _views(src, b, n), _views(dst, b, n)
        for w in sweep.windows:
            def one() -> tuple[float, list[float]]:
                pend: collections.deque = collections.deque()
                lat: list[float] = []
                torch.cuda.synchronize()
                t_start = time.perf_counter()
                for i in range(n):
                    if len(pend) >= w:
                        t0, h = pend.popleft()
                        h.wait()
                        lat.append(time.perf_counter() - t0)
                    pend.append((time.perf_counter(), ops.copy_([dv[i]], [sv[i]], async_op=True)))
                while pend:
                    t0, h = pend.popleft()
                    h.wait()
                    lat.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
                return time.perf_counter() - t_start, lat

            one()
            wall, lat = _median_run(one, sweep.reps)
            rows.append(_row(path, b, w, sweep.total, wall, lat))
    if not torch.equal(src.cpu() if src.is_cuda else src, dst.cpu() if dst.is_cuda else dst):
        raise RuntimeError(f"{path}: destination differs from source after the run")
    return rows


def cuda_paths(sweep: Sweep, wanted: set[str]) -> tuple[list[dict], dict, dict]:
    """Rows, ceilings (seconds per path) and link labels of every CUDA path present."""
    from . import topo

    rows, ceil, links = [], {}, {}
    t = sweep.total
    dev = torch.device("cuda", 0)
    host = torch.randint(0, 255, (t,), dtype=torch.uint8).pin_memory()
    host2 = torch.zeros(t, dtype=torch.uint8).pin_memory()
    d0 = torch.randint(0, 255, (t,), dtype=torch.uint8, device=dev)
    d1 = torch.zeros(t, dtype=torch.uint8, device=dev)
    if "h2d_pinned" in wanted:
        ceil["h2d_pinned"] = min(_cuda_time(lambda: d1.copy_(host, non_blocking=True)) for _ in range(3))
        links["h2d_pinned"] = "PCIe (host->device)"
        rows += cuda_copy_path("h2d_pinned", host, d1, sweep)
    if "d2h_pinned" in wanted:
        ceil["d2h_pinned"] = min(_cuda_time(lambda: host2.copy_(d0, non_blocking=True)) for _ in range(3))
        links["d2h_pinned"] = "PCIe (device->host)"
        rows += cuda_copy_path("d2h_pinned", d0, host2, sweep)
    if "same_device" in wanted or "ipc_same_gpu" in wanted:
        ceil["same_device"] = min(_cuda_time(lambda: d1.copy_(d0)) for _ in range(3))
        links["same_device"] = "HBM (same device)"
    if "same_device" in wanted:
        rows += cuda_copy_path("same_device", d0, d1, sweep)
    if "ipc_same_gpu" in wanted:
        r, extra = ring_cross_process("cuda:0", sweep, "ipc_same_gpu")
        ceil["ipc_same_gpu"] = ceil["same_device"]
        links["ipc_same_gpu"] = "CUDA IPC, same GPU (HBM)"
        rows += r
    peer_ok = torch.cuda.device_count() >= 2 and torch.cuda.can_device_access_peer(1, 0)
    if "peer" in wanted and peer_ok:
        topo.install_classifier()
        lk = topo.get()
        kind = "unknown"
        try:
            m, _ = topo.cuda_index_map(lk)
            if 0 in m and 1 in m:
                kind = lk.link(m[0], m[1]).describe()
        except (IndexError, topo.TopologyError):
            pass
        p1 = torch.zeros(t, dtype=torch.uint8, device="cuda:1")
        ceil["peer"] = min(_cuda_time(lambda: p1.copy_(d0)) for _ in range(3))
        links["peer"] = f"GPU0->GPU1: {kind} ({lk.source})"
        rows += cuda_copy_path("peer", d0, p1, sweep)
    return rows, ceil, links


# --------------------------------------------------------------------------- driver


def run(device: str = "cpu", quick: bool = False, paths: Sequence[str] | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Measures every requested path present on this machine; returns the results dict."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    sweep = Sweep(device, quick)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    known = CPU_PATHS + CUDA_PATHS
    wanted = set(paths or (known if cuda else CPU_PATHS))
    bad = wanted - set(known)
    if bad:
        raise ValueError(f"--paths: unknown path(s) {sorted(bad)}: expected some of {', '.join(known)}")
    skipped: dict[str, str] = {}
    rows: list[dict] = []
    ceilings: dict[str, float] = {}
    links: dict[str, str] = {}
    control: dict[str, Any] = {}
    log(f"# hotweights.bench on {describe()}: {sweep.total // MiB} MiB per run, buckets "
        f"{[b // MiB for b in sweep.buckets]} MiB, windows {sweep.windows}")
    mem_bytes = min(sweep.total, 256 * MiB)
    host = {"memcpy_Bps": mem_bytes / memcpy_ceiling(mem_bytes)}
    t_mem = sweep.total / host["memcpy_Bps"]  # one memcpy of a run's bytes
    log(f"memcpy {host['memcpy_Bps'] / GB:.2f} GB/s")
    # 512 MiB: on Machine A the hash pass over 256 MiB measured half the rate it reaches over
    # 0.5-1 GiB (a fixed cost per call that a model-sized manifest amortises)
    host["hash_Bps"] = hash_rate(32 * MiB if quick else 512 * MiB)
    log(f"hash (checksum_batch) {host['hash_Bps'] / GB:.2f} GB/s")
    host.update(per_tensor_costs())
    control.update(coordinator_rtt())
    log(f"coordinator round trip {control['rtt_s'] * 1e3:.3f} ms")
    # the host pipeline's fixed costs and the copy contention feed the CPU link table only:
    # not measured when only GPU paths are asked for (a GPU machine's minutes are few)
    host_paths = bool(wanted & set(CPU_PATHS))
    if host_paths:
        control["bucket_overhead"] = pipeline_overhead((1,) if quick else (1, 2),
                                                       reps=1 if quick else 3)
        ov = control["bucket_overhead"]
        log("pipeline per-bucket overhead: " + ", ".join(
            f"K={k}: latency {ov['latency_s'][k] * 1e3:.2f} ms, interval "
            f"{ov['interval_s'][k] * 1e3:.2f} ms, CPU {ov['cpu_s'][k] * 1e3:.2f} ms "
            f"(publisher {ov['cpu_publisher_s'][k] * 1e3:.2f})" for k in ov["latency_s"]))
    if "cpu_shm" in wanted:
        rows += ring_same_process("cpu", sweep)
        ceilings["cpu_shm"] = t_mem
        links["cpu_shm"] = "host memory (same process)"
        log("cpu_shm done")
    if "cpu_shm_xproc" in wanted:
        r, extra = ring_cross_process("cpu", sweep, "cpu_shm_xproc")
        rows += r
        control["pipe_rtt_s"] = extra["pipe_rtt_s"]
        ceilings["cpu_shm_xproc"] = t_mem
        links["cpu_shm_xproc"] = "POSIX shared memory (memfd), 2 processes"
        log("cpu_shm_xproc done")
    if "mpi" in wanted:
        why = mpi_reason()
        if why:
            skipped["mpi"] = why
        else:
            try:
                r, c = mpi_path(sweep)
                rows += r
                # the same memcpy ceiling as the other host paths: rank 0's own copy runs
                # while rank 1 busy-polls in MPI, so it understates the machine
                ceilings["mpi"] = t_mem
                host["mpi_rank0_copy_Bps"] = sweep.total / c
                links["mpi"] = "MPI (mpirun -n 2, one node)"
                log("mpi done")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                skipped["mpi"] = str(e)
    if cuda:
        # K = 1 and 2 and three repetitions even with --quick: the buckets are tiny, so on a GPU
        # this costs the spawns (~20 s), while one repetition's interval varied 1.1-1.7 ms from
        # run to run on an H200 and a K=2 update predicted from K=1's costs came out 31% short
        control["bucket_overhead_cuda"] = pipeline_overhead((1, 2), reps=3, device="cuda:0")
        host["gpu_hash_Bps"] = hash_rate(sweep.total, device="cuda")
        log(f"hash on the GPU {host['gpu_hash_Bps'] / GB:.1f} GB/s")
        r, c, lk = cuda_paths(sweep, wanted)
        rows += r
        ceilings.update(c)
        links.update(lk)
        if "peer" in wanted and torch.cuda.device_count() < 2:
            skipped["peer"] = f"needs 2 GPUs, {torch.cuda.device_count()} visible"
        elif "peer" in wanted and not torch.cuda.can_device_access_peer(1, 0):
            # the copy engine's batched kernel reads small peer pieces directly
            skipped["peer"] = "GPU 1 cannot access GPU 0's memory (no peer access)"
    for p in sorted(wanted):
        if p in CUDA_PATHS and not cuda:
            skipped[p] = "CUDA path (run with --device cuda on a GPU machine)"
    par = {}
    if host_paths:
        par = parallel_copy_rates(sweep.parallel, sweep.parallel_s, rounds=1 if quick else 3)
        log("parallel copy: " + ", ".join(f"{k} proc {v / GB:.2f} GB/s" for k, v in par.items()))
    for r in rows:
        c = ceilings.get(r["path"])
        if c:
            r["ceiling GB/s"] = r["bytes"] / c / GB
            r["ratio"] = r["GB/s"] / r["ceiling GB/s"]
        r["link"] = links.get(r["path"], "")
    fits = {}
    for p in {r["path"] for r in rows}:
        pts = [(int(r["bucket_mib"] * MiB), r["latency_ms"] / 1e3) for r in rows
               if r["path"] == p and r["window"] == 1 and r.get("latency_ms")]
        fits[p] = {"latency": _fit(pts)}
        for stage in ("gather", "scatter"):
            sp = [(int(r["bucket_mib"] * MiB), r[f"{stage}_s"]) for r in rows
                  if r["path"] == p and r["window"] == 1 and r.get(f"{stage}_s")]
            if sp:
                fits[p][stage] = _fit(sp)
    res = {"benchmark": "hotweights.bench", "machine": machine(), "device": device,
           "quick": quick, "command": " ".join([os.path.basename(sys.executable), "-m",
                                                "hotweights.bench", *sys.argv[1:]]),
           "sweep": {"total_bytes": sweep.total, "buckets": sweep.buckets, "windows": sweep.windows,
                     "reps": sweep.reps},
           "rows": rows, "ceilings_s": ceilings, "links": links, "fits": fits, "host": host,
           "control": control, "parallel_copy_Bps": {str(k): v for k, v in par.items()},
           "skipped": skipped}
    res["simulator"] = link_table(res)
    return res


def link_table(res: dict, path: str | None = None) -> dict:
    """The simulator's link table (hotweights.simulate) from measured results, for one ring
    path (default: ipc_same_gpu when measured, else cpu_shm_xproc, else cpu_shm). Every value
    names its source: "measured: <what> on <machine>"."""
    m = describe(res["machine"])
    fits = res["fits"]
    if path is None:
        path = next((p for p in ("ipc_same_gpu", "cpu_shm_xproc", "cpu_shm") if p in fits), None)
    if path is None:
        return {}
    gpu = path == "ipc_same_gpu"
    t: dict[str, Any] = {"name": f"{path} measured on {res['machine'].get('host')}",
                         "kind": "gpu" if gpu else "cpu", "path": path,
                         "cores": res["machine"].get("cores") or 1, "sources": {}}

    def put(key, value, what):
        if value is not None:
            t[key] = value
            t["sources"][key] = f"measured: {what} on {m}"

    hash_key = "gpu_hash_Bps" if gpu and res["host"].get("gpu_hash_Bps") else "hash_Bps"
    put("hash_Bps", res["host"].get(hash_key), "ops.checksum_batch over 64 tensors"
        + (" on the GPU" if hash_key == "gpu_hash_Bps" else ""))
    put("manifest_per_tensor_s", res["host"].get("manifest_per_tensor_s"),
        "Manifest.from_state_dict of 2000 tiny tensors")
    put("plan_per_tensor_s", res["host"].get("plan_per_tensor_s"), "make_plan of 2000 tensors")
    put("coord_rtt_s", res["control"]["rtt_s"], "median coordinator ping (embedded coordinator)")
    ov = res["control"].get("bucket_overhead_cuda" if gpu else "bucket_overhead") or {}
    for key, what in (("latency_s", "latency of one bucket alone (window 1)"),
                      ("interval_s", "interval between buckets, ring full (window 8)"),
                      ("cpu_s", "CPU seconds of all processes per bucket"),
                      ("cpu_publisher_s", "CPU seconds of the publisher's process (with the "
                       "embedded coordinator) per bucket"),
                      ("direct_latency_s", "direct reads: latency of a one-bucket update"),
                      ("direct_interval_s", "direct reads: interval between buckets, all "
                       "posted at once"),
                      ("direct_cpu_s", "direct reads: CPU seconds of all processes per bucket"),
                      ("direct_cpu_publisher_s", "direct reads: CPU seconds of the "
                       "publisher's process per bucket")):
        if ov.get(key):
            put(f"bucket0_{key}", dict(ov[key]), f"real pipeline on {'cuda:0' if gpu else 'cpu'} "
                "with 4 KiB buckets (Publisher, embedded coordinator, K spawned subscribers): "
                f"{what}, by subscriber count K")
    f = fits[path]
    lat = (f.get("latency") or {}).get("Bps") if gpu else None
    for stage in ("gather", "scatter"):
        fit = f.get(stage)
        if fit and fit["Bps"]:
            put(f"{stage}_Bps", fit["Bps"], f"{path} {stage}+hash, fit over bucket sizes at window 1")
            put(f"{stage}_fixed_s", fit["fixed_s"], f"{path} {stage} fixed cost per bucket (same fit)")
        elif fit and lat:
            # On a GPU a bucket's copy takes tens of microseconds and each stage's fixed cost
            # (launch, synchronize, Python) dominates: its own fit finds no positive slope.
            # The bucket's whole latency (gather + scatter, one after the other) still grows
            # with its size: each of the two copies gets twice that fitted rate.
            put(f"{stage}_Bps", 2 * lat, f"{path}: twice the per-bucket latency's fitted rate "
                f"(gather then scatter; the {stage} fit alone found no positive slope)")
            # (that fit's intercept lies above its points when its slope is negative)
            pts = [r[f"{stage}_s"] for r in res.get("rows", ())
                   if r["path"] == path and r["window"] == 1 and r.get(f"{stage}_s")]
            if pts:
                put(f"{stage}_fixed_s", min(pts), f"{path}: fastest {stage} at window 1")
    if not gpu:
        put("parallel_copy_Bps", dict(res.get("parallel_copy_Bps") or {}) or None,
            "aggregate gather+hash rate of k single-threaded processes copying at once")
        from . import config as _config
        put("copy_threads", _config.get().ipc_copy_streams,
            "copy-engine threads per process (HOTWEIGHTS_IPC_COPY_STREAMS)")
    elif res["ceilings_s"].get("same_device"):
        # every copy of a same-GPU update (the publisher's gather, each subscriber's scatter)
        # shares one device's memory bandwidth
        put("shared_device_Bps", res["sweep"]["total_bytes"] / res["ceilings_s"]["same_device"],
            "one device-to-device copy_ (raw ceiling) of the run's bytes")
    return t


# --------------------------------------------------------------------------- output


COLS = ["path", "link", "bucket_mib", "window", "GB/s", "latency_ms", "ceiling GB/s", "ratio"]


def render(res: dict) -> str:
    """Table of every row, then fits, control-plane and contention numbers."""
    out = [f"# hotweights.bench on {describe(res['machine'])} ({res['device']}"
           f"{', quick' if res['quick'] else ''})", table(res["rows"], COLS), ""]
    out.append("per-bucket latency fit at window 1 (latency = fixed + bytes / bandwidth):")
    for p, f in sorted(res["fits"].items()):
        lat = f.get("latency")
        if lat and lat["Bps"]:
            out.append(f"  {p:14s} fixed {lat['fixed_s'] * 1e3:.3f} ms, {lat['Bps'] / GB:.2f} GB/s")
    c = res["control"]
    out.append(f"coordinator round trip: median {c['rtt_s'] * 1e3:.3f} ms, p90 {c['rtt_p90_s'] * 1e3:.3f} ms"
               + (f"; pipe round trip {c['pipe_rtt_s'] * 1e6:.0f} us" if c.get("pipe_rtt_s") else ""))
    out.append(f"hash (manifest pass): {res['host']['hash_Bps'] / GB:.2f} GB/s; one memcpy "
               f"{res['host']['memcpy_Bps'] / GB:.2f} GB/s")
    if res["parallel_copy_Bps"]:
        out.append("concurrent gather+hash: " + ", ".join(
            f"{k} process(es) {v / GB:.2f} GB/s" for k, v in res["parallel_copy_Bps"].items()))
    for p, why in sorted(res["skipped"].items()):
        out.append(f"skipped {p}: {why}")
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    """Bandwidth vs bucket size per path (one line per path at its best window)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: "
                           "pip install matplotlib (or pip install hotweights[plot])") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in sorted({r["path"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["path"] == p]
        for w in sorted({r["window"] for r in rs}):
            pts = sorted((r["bucket_mib"], r["GB/s"]) for r in rs if r["window"] == w)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    label=f"{p} (W={w})", alpha=0.9 if w == max(r["window"] for r in rs) else 0.4)
        c = res["ceilings_s"].get(p)
        if c:
            ax.axhline(res["sweep"]["total_bytes"] / c / GB, linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bucket size (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title(f"hotweights.bench: {describe(res['machine'])}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m hotweights.bench",
                                     description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (CPU paths) or cuda (CPU and CUDA paths)")
    p.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI smoke run)")
    p.add_argument("--paths", help=f"comma-separated subset of {', '.join(CPU_PATHS + CUDA_PATHS)}")
    p.add_argument("--out", help="write results (and the simulator link table) as JSON")
    p.add_argument("--plot", help="write bandwidth vs bucket size as PNG (needs matplotlib)")
    return p


def _cmd(args) -> int:
    if args.plot:  # fail before measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RuntimeError("--plot needs matplotlib, which is not installed: pip install "
                               "matplotlib (or pip install hotweights[plot])") from None
    paths = [x.strip() for x in args.paths.split(",")] if args.paths else None
    res = run(args.device, args.quick, paths)
    print(render(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("bench", help="bandwidth and latency of every data path on this "
                              "machine (same as python -m hotweights.bench)")
    _parser(s)
    s.set_defaults(fn=_cmd)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _cmd(args)
    except (RuntimeError, ValueError, TimeoutError) as e:
        print(f"hotweights.bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
