# SPDX-License-Identifier: Apache-2.0
"""Between nodes, simulated on one machine by node ids: mpirun and torchrun launches of
2 nodes x 2 ranks, and a relay that dies mid-version."""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import hotweights
from hotweights import config
from hotweights.coordinator import Client, start_embedded
from hotweights.manifest import Manifest

from internode_children import subscriber

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "internode_worker.py")
ROOT = os.path.dirname(HERE)


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "GLOO_SOCKET_IFNAME": "lo", **extra}
    env.pop("HOTWEIGHTS_TRANSPORT", None)
    env.update(extra)
    return env


def _check(out: subprocess.CompletedProcess, transport: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    steps = re.findall(r"RESULT step=(\d) version=\d+ bytes=(\d+) relayed_total=(\d+) "
                       r"transport=(\w+) identical=(\w+) relays=\[(.*?)\]", text)
    assert len(steps) == 2, text[-3000:]
    full, delta = int(steps[0][1]), int(steps[1][1])
    assert delta == 64 * 256 * 4 < full  # the second version is a delta
    for _, _, _, t, identical, relays in steps:
        assert t == transport and identical == "True"
        assert relays.replace(" ", "") == "False,True,False"  # rank 2 leads node1
    crossed, expected = map(int, re.search(r"RESULT crossed=(\d+) expected_once_per_node=(\d+)", text).groups())
    assert crossed == expected == full + delta  # once per node, not once per subscriber
    assert text.count("done ok=True") == 4


@pytest.mark.mpi
@pytest.mark.slow
def test_mpirun_two_nodes_two_ranks():
    out = subprocess.run(["mpirun", "--oversubscribe", "-n", "4", sys.executable, WORKER],
                         capture_output=True, text=True, timeout=300, env=_env(),
                         stdin=subprocess.DEVNULL, cwd=ROOT)
    _check(out, "mpi")


@pytest.mark.slow
@pytest.mark.parametrize("forced", [None, "torch"])
def test_torchrun_two_nodes_two_ranks(forced):
    extra = {"HOTWEIGHTS_TRANSPORT": forced} if forced else {}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "4", WORKER], capture_output=True, text=True,
                         timeout=300, env=_env(**extra), stdin=subprocess.DEVNULL, cwd=ROOT)
    auto = "ucx" if importlib.util.find_spec("ucxx") else "torch"
    _check(out, forced or auto)


FAST = {"HOTWEIGHTS_HEARTBEAT_S": "0.2", "HOTWEIGHTS_DEAD_AFTER_S": "1.5",
        "HOTWEIGHTS_HANDLE_TTL": "5", "HOTWEIGHTS_VERSION_TIMEOUT_S": "60",
        "HOTWEIGHTS_TRANSPORT": "ucx"}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed")
def test_relay_dies_mid_version_then_next_version_succeeds(monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    config.reset()
    coord = start_embedded()
    ctx = mp.get_context("spawn")
    q, stop, mid = ctx.Queue(), ctx.Event(), ctx.Event()
    nodes = ["node0", "node1", "node1"]
    procs = [ctx.Process(target=subscriber, daemon=True,
                         args=(i, coord.endpoint, {**FAST, "HOTWEIGHTS_NODE_ID": n, "KILL_IN_VERSION": "2"},
                               q, stop, mid)) for i, n in enumerate(nodes)]
    for p in procs:
        p.start()
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    pub = hotweights.Publisher(src, name="net", endpoint=coord.endpoint, node="node0",
                               bucket_bytes=16384, slots=4, serve_late=False, transport="ucx")

    def applied(version, who, timeout=60):
        got, end = {}, time.monotonic() + timeout
        while set(got) != set(who):
            msg = q.get(timeout=max(0.1, end - time.monotonic()))
            if msg[0] == "error":
                raise AssertionError(f"subscriber {msg[1]}: {msg[2]}")
            if msg[0] == "applied" and msg[2] == version:
                got[msg[1]] = msg
        return got

    try:
        pids = {}
        for _ in procs:
            _, i, _cid, pid = q.get(timeout=60)
            pids[i] = pid
        r1 = pub.publish("v1")
        got = applied(r1.version, {0, 1, 2})
        want = Manifest.from_state_dict(src).digest
        assert all(m[3] == want for m in got.values())
        leader = next(i for i, m in got.items() if m[4])
        assert nodes[leader] == "node1" and pub.stats["relayed_bytes"] == r1.bytes
        # v2: the relay of node1 dies mid-version -> a clear, bounded abort
        with torch.no_grad():
            src[0].weight.add_(1)
        import threading

        err = {}
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: err.setdefault("e", _raises(pub.publish, "v2")))
        th.start()
        assert mid.wait(60)
        os.kill(pids[leader], signal.SIGKILL)
        th.join(90)
        elapsed = time.monotonic() - t0
        assert not th.is_alive(), "publish hung after the relay died"
        assert isinstance(err.get("e"), hotweights.PublishError), err
        assert "relay" in str(err["e"]) and "node1" in str(err["e"])
        assert elapsed < 60
        # v3 goes through the survivors: node1's other subscriber becomes its relay
        with torch.no_grad():
            src[2].weight.add_(1)
        r3 = pub.publish("v3")
        survivors = {0, 1, 2} - {leader}
        got = applied(r3.version, survivors)
        want = Manifest.from_state_dict(src).digest
        assert all(m[3] == want for m in got.values())
        new_leader = next(i for i in survivors if nodes[i] == "node1")
        assert got[new_leader][4]  # it relays now
    finally:
        stop.set()
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
        pub.close()
        coord.stop()


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    return None


# --- a node leader and its node-mate on node1, the publisher (this process) on node0, UCX ----

needs_ucx = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None,
                               reason="ucxx is not installed")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))


@contextlib.contextmanager
def _node1_pair(monkeypatch, **env):
    """An embedded coordinator and two subscriber processes on node1 (``env``: their test
    hooks, see internode_children); yields (endpoint, queue) once both are ready, and stops
    everything on exit."""
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    config.reset()
    coord = start_embedded()
    ctx = mp.get_context("spawn")
    q, stop, mid = ctx.Queue(), ctx.Event(), ctx.Event()
    env = {**FAST, "HOTWEIGHTS_NODE_ID": "node1", "KILL_IN_VERSION": "99", **env}
    procs = [ctx.Process(target=subscriber, daemon=True, args=(i, coord.endpoint, env, q, stop, mid))
             for i in range(2)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            q.get(timeout=60)
        yield coord.endpoint, q
    finally:
        stop.set()
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
        coord.stop()


def _ucx_publisher(src, endpoint: str, bucket_bytes: int = 16384):
    return hotweights.Publisher(src, name="net", endpoint=endpoint, node="node0",
                                bucket_bytes=bucket_bytes, slots=4, serve_late=False,
                                transport="ucx")


def _applied(q, version: int, src, others: list | None = None) -> dict:
    """Waits until both node1 subscribers applied ``version`` and checks they hold ``src``
    bit for bit; other messages go to ``others``."""
    got, end = {}, time.monotonic() + 60
    while len(got) < 2:
        msg = q.get(timeout=max(0.1, end - time.monotonic()))
        assert msg[0] != "error", msg
        if msg[0] == "applied" and msg[2] == version:
            got[msg[1]] = msg
        elif others is not None:
            others.append(msg)
    want = Manifest.from_state_dict(src).digest
    assert all(m[3] == want for m in got.values())
    return got


@needs_ucx
def test_a_relay_ring_grows_for_a_publisher_with_larger_buckets(monkeypatch):
    """A node leader's relay ring is sized by the first publisher it relays for; a later
    publisher session with larger buckets gets a larger ring (node-mates re-import it by id)
    instead of truncated receives."""
    src = _net()
    with _node1_pair(monkeypatch) as (endpoint, q):
        for version, bucket_bytes in ((1, 16384), (2, 1 << 20)):
            with _ucx_publisher(src, endpoint, bucket_bytes) as pub:
                with torch.no_grad():
                    src[0].weight.add_(1)
                assert pub.publish(f"v{version}", timeout=60).version == version
                _applied(q, version, src)


@needs_ucx
def test_a_relayed_bucket_a_node_mate_nacks_is_posted_again(monkeypatch):
    """The leader acked the publisher already: the re-send of a bucket a node-mate could not
    read is the leader's, from the slot it still holds (as the publisher re-sends a same-node
    ring bucket); the version commits instead of waiting out its timeout."""
    src = _net()
    with _node1_pair(monkeypatch, NACK_RELAYED_IN_VERSION="2") as (endpoint, q), \
            _ucx_publisher(src, endpoint) as pub:
        others: list = []
        for version in (1, 2):
            with torch.no_grad():
                src[0].weight.add_(1)
            t0 = time.monotonic()
            assert pub.publish(f"v{version}", timeout=60).version == version
            assert time.monotonic() - t0 < 30  # not the version timeout
            _applied(q, version, src, others)
        # the injected refusal happened, and was repaired
        assert len([m for m in others if m[0] == "nacked"]) == 1


@needs_ucx
def test_a_node_mate_that_cannot_read_a_relayed_bucket_refuses_the_version(monkeypatch):
    """After the leader's third copy of a bucket is read wrong too, the node-mate refuses the
    version (it does not wait for a fourth until the timeout): the rest commit without it,
    and the next version reaches it."""
    src = _net()
    with _node1_pair(monkeypatch, NACK_RELAYED_IN_VERSION="2",
                     NACK_RELAYED_TIMES="99") as (endpoint, q), \
            _ucx_publisher(src, endpoint) as pub, Client(endpoint) as cl:
        with torch.no_grad():
            src[0].weight.add_(1)
        _applied(q, pub.publish("v1", timeout=60).version, src)
        with torch.no_grad():
            src[0].weight.add_(1)
        t0 = time.monotonic()
        r2 = pub.publish("v2", timeout=60)  # committed by the leader; the mate refused it
        assert r2.state == "committed" and time.monotonic() - t0 < 30
        info = cl.version("net", r2.version)
        assert len(info["rejected"]) == 1
        assert "read wrong 3 times" in next(iter(info["rejected"].values()))
        with torch.no_grad():
            src[2].weight.add_(1)
        _applied(q, pub.publish("v3", timeout=60).version, src)  # both, the refuser too
