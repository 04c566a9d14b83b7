# SPDX-License-Identifier: Apache-2.0
"""Where a bucket's time goes: profiles a real pipeline (Publisher with the embedded
coordinator in this process, one spawned subscriber) with yappi over every thread of both
processes, and prints the top functions of each, plus the per-bucket wall time of the same
run without the profiler (the baseline) so the profiler's own overhead shows.

    python benchmarks/profile_pipeline.py [--device cuda] [--bucket-mib 64] [--tensors 200]
        [--tensor-mib 1] [--publishes 3] [--clock wall|cpu] [--out DIR]
        [--delta N --change-tracking version]   (a delta of N tensors per publish)

Needs yappi (pip install yappi). Writes DIR/publisher.pstat and DIR/subscriber.pstat
(pstats format) when --out is given.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pstats
import sys
import time

import torch

from common import describe  # noqa: F401  (puts the checkout first on sys.path)


def _subscriber(conn, endpoint: str, n: int, numel: int, device: str, clock: str) -> None:
    """hotweights.bench's subscriber process, which also starts yappi on ("profile",) and
    saves its stats on ("dump", dir)."""
    import yappi

    from hotweights.bench import serve_buffers

    def on_message(msg):
        if msg[0] == "profile":
            yappi.set_clock_type(clock)
            yappi.start()
            return ("profiling",)
        yappi.stop()  # ("dump", dir)
        path = os.path.join(msg[1], "subscriber.pstat")
        yappi.get_func_stats().save(path, type="pstat")
        return ("dumped", path)

    serve_buffers(conn, "prof", endpoint, n, numel, device, on_message, poll_s=0.002)


def _top(path: str, title: str, k: int) -> None:
    print(f"--- {title}: top {k} by own time")
    st = pstats.Stats(path)
    st.sort_stats("tottime").print_stats(k)


def main() -> None:
    import argparse
    import tempfile

    import yappi

    from hotweights.coordinator import start_embedded
    from hotweights.replicate import Publisher

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bucket-mib", type=float, default=64)
    p.add_argument("--tensors", type=int, default=200)
    p.add_argument("--tensor-mib", type=float, default=1.0)
    p.add_argument("--publishes", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--direct", default="off")
    p.add_argument("--delta", type=int, default=0,
                   help="change only the first N tensors per publish (0: every tensor)")
    p.add_argument("--change-tracking", default="hash", choices=("hash", "version"))
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="hw-profile-")
    os.makedirs(out, exist_ok=True)
    dev = "cuda:0" if a.device.startswith("cuda") else "cpu"
    numel = int(a.tensor_mib * 2**20) // 4
    ctx = mp.get_context("spawn")
    coord = start_embedded()
    conn, child_end = ctx.Pipe()
    pr = ctx.Process(target=_subscriber, args=(child_end, coord.endpoint, a.tensors, numel, dev,
                                                a.clock), daemon=True)
    pr.start()
    child_end.close()
    pub = None
    try:
        if not conn.poll(180):
            raise TimeoutError("subscriber did not start in 180 s")
        assert conn.recv()[0] == "ready"
        src = torch.nn.Module()
        for i in range(a.tensors):
            src.register_buffer(f"t{i:04d}", torch.zeros(numel, device=dev))
        pub = Publisher(src, name="prof", endpoint=coord.endpoint, serve_late=False,
                        bucket_bytes=int(a.bucket_mib * 2**20), direct=a.direct,
                        change_tracking=a.change_tracking)
        changed = list(src.buffers())[:a.delta] if a.delta else list(src.buffers())

        def one():
            with torch.no_grad():
                for t in changed:
                    t.add_(1)
            if dev != "cpu":  # the changes queued on the GPU are not the update's time
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = pub.publish()
            dt = time.perf_counter() - t0
            while True:
                if not conn.poll(120):
                    raise TimeoutError("subscriber did not apply in 120 s")
                m = conn.recv()
                if m[0] == "applied" and m[1] == r.version:
                    return dt, r

        one()  # warm-up
        base = [one() for _ in range(a.publishes)]
        conn.send(("profile",))
        while conn.recv()[0] != "profiling":
            pass
        yappi.set_clock_type(a.clock)
        yappi.start()
        prof = [one() for _ in range(a.publishes)]
        yappi.stop()
        pub_path = os.path.join(out, "publisher.pstat")
        yappi.get_func_stats().save(pub_path, type="pstat")
        conn.send(("dump", out))
        while True:
            m = conn.recv()
            if m[0] == "dumped":
                sub_path = m[1]
                break
        r = base[-1][1]
        per = lambda runs: [round(dt / r.buckets * 1e3, 3) for dt, _ in runs]  # noqa: E731
        print(f"# profile_pipeline on {describe()} ({dev}, {a.tensors} x {a.tensor_mib} MiB, "
              f"{r.buckets} buckets of {a.bucket_mib} MiB, {a.clock} clock)")
        print(f"per bucket ms without the profiler: {per(base)}; with it: {per(prof)}")
        print(f"timings of the last unprofiled publish: {r.timings}")
        for th in yappi.get_thread_stats():
            print(f"publisher thread {th.name}: {th.ttot:.3f} s")
        _top(pub_path, "publisher process (with the embedded coordinator)", a.top)
        _top(sub_path, "subscriber process", a.top)
    finally:
        try:
            conn.send(("stop",))
        except OSError:
            pass
        pr.join(20)
        if pr.is_alive():
            pr.kill()
        if pub is not None:
            pub.close()
        coord.stop()


if __name__ == "__main__":
    sys.exit(main())
