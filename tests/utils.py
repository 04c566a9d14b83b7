# SPDX-License-Identifier: Apache-2.0
"""Test helpers: device parametrization, spawned children that are always cleaned up."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import time

import pytest


# Heartbeats, deaths and leases fast enough for tests that kill and wait.
FAST_ENV = {"HOTWEIGHTS_HEARTBEAT_S": "0.2", "HOTWEIGHTS_DEAD_AFTER_S": "1.5",
            "HOTWEIGHTS_HANDLE_TTL": "3", "HOTWEIGHTS_VERSION_TIMEOUT_S": "60"}


@pytest.fixture(name="coord")
def fast_coord(monkeypatch):
    """The ``coord`` fixture of a module that imports it: an embedded coordinator on a loopback
    port under FAST_ENV; yields its endpoint, stops it after the test."""
    from hotweights import config
    from hotweights.coordinator import start_embedded

    for k, v in FAST_ENV.items():
        monkeypatch.setenv(k, v)
    config.reset()
    c = start_embedded()
    yield c.endpoint
    c.stop()


def same_state(a, b) -> bool:
    """Two modules (or state dicts) hold the same names and the same values, bit for bit."""
    import torch

    a = a.state_dict() if isinstance(a, torch.nn.Module) else a
    b = b.state_dict() if isinstance(b, torch.nn.Module) else b
    return a.keys() == b.keys() and all(torch.equal(a[k].detach(), b[k].detach()) for k in a)


def cpu_and_cuda():
    """Parametrize over "cpu" always and "cuda" (marked, so it skips with a reason)."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spawned(target, *args, n: int = 1, timeout: float = 60.0):
    """Starts n spawn-context children running target(i, *args); always terminates them.

    Yields the list of processes; on exit joins them with a timeout, kills stragglers and
    raises if any exited non-zero (with its exit code or signal).
    """
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(i, *args), daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    try:
        yield procs
        for p in procs:
            p.join(timeout)
        bad = [(p.pid, p.exitcode) for p in procs if p.exitcode not in (0,)]
        if bad:
            raise AssertionError(f"children failed (pid, exitcode; negative = signal): {bad}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def hotweights_fds() -> list[str]:
    """Open /proc/self/fd entries that point at hotweights memfds (leak checks)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "hotweights:" in target:
                out.append(target)
    return out


@contextlib.contextmanager
def children(target, endpoint, specs, q, stop):
    """Starts one spawned child target(i, endpoint, spec, q, stop) per spec; always stops
    (sets ``stop``) and reaps them, killing stragglers."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(i, endpoint, s, q, stop), daemon=True)
             for i, s in enumerate(specs)]
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        stop.set()
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join(5)


def get_message(q, kind, timeout=120):
    """The next message ("kind", child, ...) of a kind from q; a child's ("error", i, text)
    fails the test at once."""
    end = time.monotonic() + timeout
    while True:
        msg = q.get(timeout=max(0.1, end - time.monotonic()))
        if msg[0] == "error":
            raise AssertionError(f"child {msg[1]} failed: {msg[2]}")
        if msg[0] == kind:
            return msg
