# SPDX-License-Identifier: Apache-2.0
"""Coordinator load test: N simulated subscribers (threads in a few processes) register and
heartbeat while one publisher runs versions through the whole cycle (publish, post handles,
every subscriber fetches and acks them, precommit, commit, applied), for a bounded time.

Prints p50/p99 latency per method (measured by the clients), errors, versions committed, and,
as the baseline measured in the same run on the same machine, the round trip of a bare ZeroMQ
DEALER/ROUTER echo (and of the coordinator's own ``ping`` when idle), with the ratios.

    python benchmarks/bench_coordinator.py                    # 64 subscribers, 30 s
    python benchmarks/bench_coordinator.py --seconds 5 --quick --out results.json
    python benchmarks/bench_coordinator.py --backend redis --redis-url redis://127.0.0.1:6379/0

This is a benchmark, not a test: nothing here asserts a time. On a 2-core VM each epoll wake-up
costs ~0.25-0.5 ms, so absolute numbers mostly measure that; compare the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "bench-model"
LONG_POLLS = {"get_handles", "released", "events", "wait_version"}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))]


def _summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": _pct(xs, 50) * 1e3, "p99_ms": _pct(xs, 99) * 1e3,
            "mean_ms": (statistics.fmean(xs) * 1e3) if xs else float("nan")}


def machine() -> dict:
    """What this ran on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import zmq
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "platform": platform.platform()}


# --- baseline: bare DEALER/ROUTER echo ------------------------------------------------------------

def _echo_server(q) -> None:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind("tcp://127.0.0.1:0")
    q.put(s.getsockopt(zmq.LAST_ENDPOINT).decode())
    while True:
        frames = s.recv_multipart()
        if frames[-1] == b"stop":
            break
        s.send_multipart(frames)
    s.close(0)
    ctx.term()


def echo_baseline(n: int, payload: bytes) -> list[float]:
    """Round trips of a bare DEALER to a ROUTER echo in another process."""
    import zmq
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_echo_server, args=(q,), daemon=True)
    p.start()
    try:
        ep = q.get(timeout=60)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        out = []
        for i in range(n + 50):
            t0 = time.perf_counter()
            s.send(payload)
            if not s.poll(5000):
                raise RuntimeError("echo server did not answer within 5 s")
            s.recv()
            if i >= 50:  # warm-up excluded
                out.append(time.perf_counter() - t0)
        s.send(b"stop")
        s.close(0)
        ctx.term()
        return out
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


# --- load: subscribers -----------------------------------------------------------------------

def _subscriber_process(idx: int, endpoint: str, n: int, buckets: int, heartbeat_s: float,
                        go, pub_done, q) -> None:
    sys.path.insert(0, REPO)
    from hotweights.coordinator import Client

    lat: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    cl = Client(endpoint, timeout_s=10.0, retries=2)

    def timed(method, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        except Exception as e:
            with lock:
                errors.append(f"{method}: {type(e).__name__}: {e}")
            return None
        finally:
            dt = time.perf_counter() - t0
            with lock:
                lat.setdefault(method, []).append(dt)

    ids = [f"sub-{idx}-{i}" for i in range(n)]
    for cid in ids:
        timed("register", cl.register, "subscriber", MODEL, node=f"node{idx}", device="cpu",
              consumer=["*"], capabilities={"ring": os.urandom(64)}, client_id=cid,
              heartbeat=False)
    q.put(("registered", idx, len(ids)))
    done = threading.Event()

    def heartbeats():
        # One thread beats for the whole process, like a node agent would; timed per call.
        while not done.wait(heartbeat_s):
            for cid in ids:
                timed("heartbeat", cl.heartbeat, cid)
        cl.release_thread()

    def subscriber(cid):
        after, acked = 0, {}
        # Serve until the publisher has finished its last version (not until a clock runs
        # out), so that no version is left waiting for subscribers that already quit.
        while not pub_done.is_set():
            r = timed("get_handles", cl.get_handles, cid, MODEL, None, after, 500)
            if not r:
                continue
            after = r["last"]
            for hd in r["handles"]:
                timed("ack_handle", cl.ack_handle, cid, hd["handle_id"])
                v = hd["version"]
                acked[v] = acked.get(v, 0) + 1
                if acked[v] == buckets:
                    pc = timed("precommit", cl.precommit, cid, MODEL, v)
                    if pc is None:
                        continue
                    info = timed("wait_version", cl.wait_version, MODEL, v, 60.0)
                    if info and info["state"] == "committed":
                        timed("applied", cl.applied, cid, MODEL, v)
                    acked.pop(v, None)
        cl.release_thread()

    hb = threading.Thread(target=heartbeats, daemon=True)
    hb.start()
    if not go.wait(300):
        raise RuntimeError("the benchmark never started the load")
    ts = [threading.Thread(target=subscriber, args=(c,), daemon=True) for c in ids]
    for t in ts:
        t.start()
    pub_done.wait(3600)
    for t in ts:
        t.join(90)
    done.set()
    hb.join(10)
    for cid in ids:
        timed("deregister", cl.deregister, cid)
    cl.close()
    q.put(("result", idx, lat, errors))


# --- load: publisher -------------------------------------------------------------------------

def _publisher(endpoint: str, buckets: int, stop_at: float, manifest_bytes: int, lat, errors,
               counts) -> None:
    sys.path.insert(0, REPO)
    from hotweights.coordinator import Client

    cl = Client(endpoint, timeout_s=10.0, retries=2)

    def timed(method, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        except Exception as e:
            errors.append(f"publisher {method}: {type(e).__name__}: {e}")
            return None
        finally:
            lat.setdefault(method, []).append(time.perf_counter() - t0)

    pub = timed("register", cl.register, "publisher", MODEL, node="node-pub",
                client_id=f"pub-{uuid.uuid4().hex[:6]}")["client_id"]
    manifest = os.urandom(manifest_bytes)
    rel_after = 0
    while time.time() < stop_at:
        t_version = time.perf_counter()
        r = timed("publish", cl.publish, pub, MODEL, manifest, label="bench")
        if r is None:
            continue
        v = r["version"]
        for b in range(buckets):
            timed("post_handle", cl.post_handle, pub, MODEL, v, {"slot": b, "bucket": b},
                  handle_id=f"{pub}-v{v}-b{b}")
        released = 0
        while released < buckets and time.time() < stop_at + 10:
            rr = timed("released", cl.released, pub, rel_after, 1000)
            if rr:
                rel_after = rr["last"]
                released += len(rr["released"])
        info = timed("wait_version", cl.wait_version, MODEL, v, 30.0)
        state = info["state"] if info else "error"
        counts[state] = counts.get(state, 0) + 1
        if state == "committed":
            lat.setdefault("version_cycle", []).append(time.perf_counter() - t_version)
    cl.deregister(pub)
    cl.close()


# --- main ---------------------------------------------------------------------------------------

def _cpu(proc) -> float | None:
    """CPU seconds (user + system) used so far by the coordinator process we started."""
    if proc is None:
        return None
    import psutil
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def _served(counters: dict) -> int:
    return sum(v for k, v in counters.items() if k.startswith("requests.") and k.endswith(".ok"))


def _start_coordinator(args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"HOTWEIGHTS_HEARTBEAT_S": str(args.heartbeat_s),
                "HOTWEIGHTS_DEAD_AFTER_S": str(max(args.heartbeat_s * 10, 10.0)),
                "HOTWEIGHTS_VERSION_TIMEOUT_S": "30", "HOTWEIGHTS_COORD_BACKEND": args.backend})
    if args.redis_url:
        env["HOTWEIGHTS_REDIS_URL"] = args.redis_url
    cmd = [sys.executable, "-m", "hotweights", "coord-serve", "--endpoint",
           "tcp://127.0.0.1:0", "--redis-prefix", args.prefix]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    end = time.monotonic() + 60
    for line in p.stdout:
        m = re.search(r"serving (tcp://\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, m.group(1)
        if time.monotonic() > end:
            break
    p.kill()
    raise RuntimeError("coord-serve did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration (default 30)")
    ap.add_argument("--quick", action="store_true", help="fewer baseline samples (CI smoke)")
    ap.add_argument("--subscribers", type=int, default=64)
    ap.add_argument("--processes", type=int, default=4, help="processes hosting subscribers")
    ap.add_argument("--buckets", type=int, default=4, help="handles per version")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--manifest-bytes", type=int, default=64 << 10)
    ap.add_argument("--backend", choices=("memory", "redis"), default="memory")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--endpoint", help="load an already running coordinator instead of "
                    "starting one (e.g. under a profiler)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.backend == "redis" and not args.redis_url:
        ap.error("--backend redis needs --redis-url")
    args.prefix = f"bench-{uuid.uuid4().hex[:8]}"
    sys.path.insert(0, REPO)
    from hotweights.coordinator import Client
    from hotweights.coordinator import protocol as P

    n_base = 300 if args.quick else 2000
    info = machine()
    print(f"machine: {info['host']} | {info['cpu']} | {info['cores']} cores | "
          f"python {info['python']} | libzmq {info['libzmq']}")
    # A payload the size of a typical heartbeat request, so both measure the same bytes.
    hb_size = len(P.encode_request("heartbeat", {"client_id": "sub-0-0"})[1])
    echo = echo_baseline(n_base, b"x" * hb_size)

    coord, endpoint = (None, args.endpoint) if args.endpoint else _start_coordinator(args)
    procs = []
    try:
        with Client(endpoint, timeout_s=5.0) as cl:
            ping = []
            for i in range(n_base + 50):
                t0 = time.perf_counter()
                cl.ping()
                if i >= 50:
                    ping.append(time.perf_counter() - t0)

        ctx = mp.get_context("spawn")
        q, go, pub_done = ctx.Queue(), ctx.Event(), ctx.Event()
        per = [args.subscribers // args.processes + (1 if i < args.subscribers % args.processes
                                                     else 0) for i in range(args.processes)]
        for i, n in enumerate(per):
            p = ctx.Process(target=_subscriber_process,
                            args=(i, endpoint, n, args.buckets, args.heartbeat_s, go,
                                  pub_done, q), daemon=True)
            p.start()
            procs.append(p)
        # Everyone registers first; the clock starts when all are in.
        registered = 0
        while registered < args.subscribers:
            _kind, _idx, count = q.get(timeout=300)
            registered += count
        with Client(endpoint, timeout_s=5.0) as cl:
            served0 = _served(cl.status()["counters"])
        cpu0 = _cpu(coord)
        t_load = time.perf_counter()
        stop_at = time.time() + args.seconds
        go.set()
        pub_lat: dict[str, list[float]] = {}
        pub_err: list[str] = []
        counts: dict[str, int] = {}
        try:
            _publisher(endpoint, args.buckets, stop_at, args.manifest_bytes, pub_lat, pub_err,
                       counts)
        finally:
            pub_done.set()
        with Client(endpoint, timeout_s=5.0) as cl:
            served = _served(cl.status()["counters"]) - served0
        load_s = time.perf_counter() - t_load
        coord_cpu = None if cpu0 is None else _cpu(coord) - cpu0
        lat: dict[str, list[float]] = {}
        errors = list(pub_err)
        for _ in procs:
            msg = q.get(timeout=180)
            _, idx, l, e = msg
            for k, v in l.items():
                lat.setdefault(k, []).extend(v)
            errors.extend(e)
        for p in procs:
            p.join(30)
        with Client(endpoint, timeout_s=5.0) as cl:
            counters = cl.status()["counters"]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if coord is not None:
            coord.terminate()
            try:
                coord.wait(10)
            except subprocess.TimeoutExpired:
                coord.kill()
                coord.wait(5)
            if args.backend == "redis":  # leave the shared Redis as we found it
                from hotweights.coordinator.backends import RedisBackend
                b = RedisBackend(args.redis_url, prefix=args.prefix)
                b.open()
                b.wipe()
                b.close()

    methods = {k: _summary(v) for k, v in sorted(lat.items())}
    pub_methods = {k: _summary(v) for k, v in sorted(pub_lat.items())}
    base = _summary(echo)
    ping_s = _summary(ping)
    hb = methods.get("heartbeat", {"p50_ms": float("nan"), "p99_ms": float("nan")})
    result = {
        "machine": info, "backend": args.backend, "seconds": args.seconds,
        "subscribers": args.subscribers, "processes": args.processes, "buckets": args.buckets,
        "heartbeat_s": args.heartbeat_s,
        "baseline_zmq_echo": base, "coordinator_ping_idle": ping_s,
        "ratio_ping_idle_vs_echo_p50": ping_s["p50_ms"] / base["p50_ms"],
        "ratio_heartbeat_loaded_vs_echo_p50": hb["p50_ms"] / base["p50_ms"],
        "subscriber_methods": methods, "publisher_methods": pub_methods,
        "versions": counts, "versions_per_s": counts.get("committed", 0) / load_s,
        "load_s": load_s, "requests_served": served, "requests_per_s": served / load_s,
        "coordinator_cpu_s": coord_cpu,
        "coordinator_cpu_us_per_request": (coord_cpu / served * 1e6) if coord_cpu and served
        else None,
        "errors": len(errors), "error_samples": errors[:10], "server_counters": counters,
    }
    print(f"\nload: {args.subscribers} subscribers in {args.processes} processes, "
          f"{args.seconds:.0f} s, {args.buckets} handles/version, heartbeat {args.heartbeat_s} s,"
          f" backend {args.backend}")
    print(f"{'who':<13}{'method':<16}{'n':>8}{'p50 ms':>10}{'p99 ms':>10}")
    rows = [("baseline", "zmq echo", base), ("coordinator", "ping (idle)", ping_s)]
    rows += [("subscriber", k + (" *" if k in LONG_POLLS else ""), v) for k, v in methods.items()]
    rows += [("publisher", k + (" *" if k in LONG_POLLS or k == "version_cycle" else ""), v)
             for k, v in pub_methods.items()]
    for who, name, s in rows:
        print(f"{who:<13}{name:<16}{s['n']:>8}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}")
    print("(* includes waiting: long-polls, or a whole version cycle)")
    print(f"ratio p50 ping(idle)/echo: {result['ratio_ping_idle_vs_echo_p50']:.2f}   "
          f"ratio p50 heartbeat(loaded)/echo: {result['ratio_heartbeat_loaded_vs_echo_p50']:.2f}")
    print(f"versions: {counts} ({result['versions_per_s']:.2f}/s)   coordinator served "
          f"{served} requests in {load_s:.1f} s ({result['requests_per_s']:.0f}/s)   "
          f"errors: {len(errors)}")
    if coord_cpu is not None:
        print(f"coordinator CPU during the load: {coord_cpu:.1f} s of {load_s:.1f} s "
              f"({100 * coord_cpu / load_s:.0f}% of one core), "
              f"{result['coordinator_cpu_us_per_request']:.0f} us per request")
    for e in errors[:5]:
        print("  error:", e)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
