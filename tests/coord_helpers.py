# SPDX-License-Identifier: Apache-2.0
"""Helpers of the coordinator tests: servers, clients, raw sockets and child processes that are
always cleaned up, and a leak check."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid

import psutil
import zmq

from hotweights.coordinator import Client, Coordinator
from hotweights.coordinator import protocol as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small timings so that deaths happen within a test, yet a heartbeat thread starved for a
# second on a busy 2-core machine does not kill a client by accident.
FAST = dict(heartbeat_s=0.1, dead_after_s=1.5)


def wait_until(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Polls ``pred`` until it returns a truthy value (returned) or ``timeout`` passes (raises)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Harness:
    """Starts coordinators and clients for one test and stops them all at the end."""

    def __init__(self, backend: str, redis_url: str | None):
        self.backend = backend
        self.redis_url = redis_url
        self.prefix = f"hwtest-{uuid.uuid4().hex[:12]}"
        self.coords: list[Coordinator] = []
        self.clients: list[Client] = []
        self.procs: list[subprocess.Popen] = []

    def coord(self, **kw) -> Coordinator:
        """A started coordinator on a free loopback port with this test's backend."""
        kw.setdefault("backend", self.backend)
        if kw["backend"] == "redis":
            kw.setdefault("redis_url", self.redis_url)
            kw.setdefault("redis_prefix", self.prefix)
            kw.setdefault("leader_lease_s", 1.0)
        for k, v in FAST.items():
            kw.setdefault(k, v)
        c = Coordinator(**kw)
        self.coords.append(c)
        return c.start()

    def client(self, endpoint, **kw) -> Client:
        """A client that is closed at the end of the test."""
        kw.setdefault("timeout_s", 2.0)
        kw.setdefault("retries", 2)
        c = Client(endpoint, **kw)
        self.clients.append(c)
        return c

    def spawn(self, args: list[str], env: dict | None = None,
              capture: bool = False) -> subprocess.Popen:
        """A child process (killed at the end of the test) with the worktree on its path."""
        e = dict(os.environ)
        e.update(env or {})
        e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        p = subprocess.Popen(args, cwd=REPO, env=e, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        return p

    def coord_serve(self, endpoint: str, env: dict, *extra: str) -> subprocess.Popen:
        """``hotweights coord-serve`` in a child; returns once it printed its serving line."""
        if "--metrics-port" not in extra:  # several run at once: no fixed exporter port
            extra = (*extra, "--metrics-port", "0")
        p = self.spawn([sys.executable, "-m", "hotweights", "coord-serve", "--endpoint", endpoint,
                        *extra], env, capture=True)
        lines: list[str] = []
        ready = threading.Event()

        def pump():  # keeps reading so the child never blocks on a full pipe
            for line in p.stdout:
                lines.append(line)
                if "serving" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60) or p.poll() is not None:
            raise AssertionError(f"coord-serve did not start: {''.join(lines)}")
        p.output = lines
        return p

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for c in self.coords:
            c.stop()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            if p.stdout:
                p.stdout.close()
        if self.backend == "redis":
            from hotweights.coordinator.backends import RedisBackend
            b = RedisBackend(self.redis_url, prefix=self.prefix)
            b.open()
            b.wipe()
            b.close()


@contextlib.contextmanager
def raw_socket(endpoint: str):
    """A bare DEALER for sending hand-made (or fuzzed) frames."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        yield s
    finally:
        s.close(0)
        ctx.term()


def raw_call(sock, payload: bytes | list, timeout: float = 5.0) -> dict | None:
    """Sends raw frames; returns the decoded reply, or None when none came within ``timeout``."""
    frames = payload if isinstance(payload, list) else [payload]
    sock.send_multipart(frames)
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        return None
    return P.decode_reply(sock.recv_multipart()[-1])


def request_bytes(method: str, args: dict, **kw) -> bytes:
    """A well-formed request (signed when ``token`` is given)."""
    return P.encode_request(method, args, **kw)[1]


def snapshot_threads() -> set:
    return {t for t in threading.enumerate()}


def assert_no_leaks(threads_before: set, fds_before: int, timeout: float = 5.0) -> None:
    """No threads, child processes or file descriptors left behind by a test."""
    me = psutil.Process()

    def clean():
        extra = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        return not extra and not me.children(recursive=True)

    end = time.monotonic() + timeout
    while not clean() and time.monotonic() < end:
        time.sleep(0.05)
    extra = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not extra, f"threads left behind: {extra}"
    kids = me.children(recursive=True)
    assert not kids, f"child processes left behind: {[k.pid for k in kids]}"
    fds = len(os.listdir("/proc/self/fd"))
    assert fds <= fds_before, f"file descriptors grew from {fds_before} to {fds}"
