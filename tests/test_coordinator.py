# SPDX-License-Identifier: Apache-2.0
"""The coordinator: lifecycle on both backends, quorums with dying subscribers, handle leases,
authentication, malformed input, failover, restart after SIGKILL and standby takeover.

Real sockets on loopback, real Redis (marked), real child processes; every wait has a timeout;
no timing assertions.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from hotweights.coordinator import (Client, Coordinator, CoordinatorError, CoordinatorUnavailable,
                                    MemoryBackend)
from hotweights.coordinator import protocol as P
from hotweights.coordinator.backends import BackendError, NotLeader, RedisBackend, WriteBatch
from hotweights.coordinator.state import State, StateSettings

from coord_helpers import (Harness, assert_no_leaks, raw_call, raw_socket, request_bytes,
                           snapshot_threads, wait_until)
from utils import free_port

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no threads, child processes or descriptors behind."""
    threads, fds = snapshot_threads(), len(os.listdir("/proc/self/fd"))
    yield
    assert_no_leaks(threads, fds)


@pytest.fixture
def make_harness():
    made = []

    def make(backend="memory"):
        url = os.environ.get("HOTWEIGHTS_TEST_REDIS_URL") if backend == "redis" else None
        h = Harness(backend, url)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(params=BACKENDS)
def h(request, make_harness):
    """A harness for each backend."""
    return make_harness(request.param)


@pytest.fixture
def hm(make_harness):
    """A memory-backend harness (behaviour that does not depend on the backend)."""
    return make_harness("memory")


def _setup(h, n_subs=2, model="m", **coord_kw):
    c = h.coord(**coord_kw)
    cl = h.client(c.endpoint)
    pub = cl.register("publisher", model, node="n0", device="cpu", client_id="pub")["client_id"]
    subs = [cl.register("subscriber", model, node=f"n{i}", device="cpu", consumer=["*"],
                        client_id=f"s{i + 1}")["client_id"] for i in range(n_subs)]
    return c, cl, pub, subs


# --- lifecycle --------------------------------------------------------------------------------

def test_full_lifecycle(h):
    c = h.coord()
    cl = h.client(c.endpoint)
    r = cl.register("publisher", "llama", node="n0", device="cuda:0", client_id="pub",
                    capabilities={"ring": b"\x00\xff" * 32})
    assert r == {"client_id": "pub", "current_version": None, "heartbeat_s": 0.1,
                 "dead_after_s": 1.5}
    for i, dev in enumerate(("cuda:1", "cpu")):
        cl.register("subscriber", "llama", node="n0", device=dev, consumer=["layers.*"],
                    client_id=f"s{i + 1}", capabilities={"ring": b"\x01" * 8})
    assert cl.get_client("s1")["capabilities"] == {"ring": b"\x01" * 8}
    assert {x["client_id"] for x in cl.clients("llama")} == {"pub", "s1", "s2"}

    manifest, plan = os.urandom(300_000), b"plan-bytes"
    v = cl.publish("pub", "llama", manifest, label="step-10", plan=plan, meta={"step": 10})
    assert v["version"] == 1
    info = cl.version("llama", 1)
    assert info["state"] == "transferring" and info["expected"] == ["s1", "s2"]
    assert info["label"] == "step-10" and info["meta"] == {"step": 10}
    assert cl.manifest("llama", 1) == manifest and cl.plan("llama", 1) == plan
    assert cl.current("llama") is None

    h1 = cl.post_handle("pub", "llama", 1, {"slot": 0, "ipc": b"\x07" * 64})["handle_id"]
    h2 = cl.post_handle("pub", "llama", 1, {"slot": 1})["handle_id"]
    got1 = cl.get_handles("s1", "llama", 1, after=0, wait_ms=2000)
    got2 = cl.get_handles("s2", "llama", 1, after=0, wait_ms=2000)
    assert [x["handle_id"] for x in got1["handles"]] == [h1, h2]
    assert [x["handle_id"] for x in got2["handles"]] == [h1, h2]
    assert got1["handles"][0]["payload"] == {"slot": 0, "ipc": b"\x07" * 64}
    assert got1["handles"][0]["owner"] == "pub" and got1["handles"][0]["expires_in"] > 0

    # One consumer's ack never hides the handle from the other.
    assert cl.ack_handle("s1", h1) == {"known": True, "released": False}
    assert [x["handle_id"] for x in cl.get_handles("s1", "llama", 1)["handles"]] == [h2]
    assert [x["handle_id"] for x in cl.get_handles("s2", "llama", 1)["handles"]] == [h1, h2]
    assert cl.ack_handle("s2", h1) == {"known": True, "released": True}
    rel = cl.released("pub", after=0, wait_ms=2000)
    assert [(x["handle_id"], x["reason"], sorted(x["acked"]), x["missing"]) for x in
            rel["released"]] == [(h1, "acked", ["s1", "s2"], [])]
    cl.ack_handle("s1", h2)
    cl.ack_handle("s2", h2)
    rel2 = cl.released("pub", after=rel["last"], wait_ms=2000)
    assert [x["handle_id"] for x in rel2["released"]] == [h2]

    cl.progress("s1", "llama", 1, buckets=2, bytes=1 << 20)
    assert cl.version("llama", 1)["progress"] == {"s1": {"buckets": 2, "bytes": 1 << 20}}
    assert cl.precommit("s1", "llama", 1) == {"state": "transferring"}
    assert cl.precommit("s2", "llama", 1) == {"state": "committed"}
    assert cl.current("llama") == 1
    cl.applied("s1", "llama", 1)

    st = cl.status()
    m = st["models"]["llama"]
    assert m["current"] == 1 and m["versions"][0]["state"] == "committed"
    lag = {x["client_id"]: x["lag"] for x in m["clients"] if x["role"] == "subscriber"}
    assert lag == {"s1": 0, "s2": 1}
    assert st["gauges"]["subscribers_live"] == 2 and st["gauges"]["handles_active"] == 0
    assert st["counters"]["handles.posted"] == 2 and st["counters"]["handles.acked"] == 4
    assert st["counters"]["requests.publish.ok"] == 1
    # Status names capabilities but never shows their bytes.
    assert all(x["capabilities"] == ["ring"] for x in m["clients"])

    evs = cl.events("llama", after=0)["events"]
    seqs = [e["seq"] for e in evs]
    assert seqs == list(range(1, len(evs) + 1))
    types = [e["type"] for e in evs]
    assert types.index("version") < types.index("handle") < types.index("commit")
    assert all("payload" not in e for e in evs)
    # A late joiner learns the current version.
    assert cl.register("subscriber", "llama", client_id="s3")["current_version"] == 1


def test_publish_with_handles_is_atomic(h):
    """Handles posted with their version (direct reads' first buckets): delivered like posted
    ones, persisted like them; a bad handle leaves no version behind."""
    c, cl, pub, subs = _setup(h)
    early = [{"payload": {"bucket": b}, "consumers": subs, "handle_id": f"early{b}"}
             for b in range(2)]
    r = cl.publish(pub, "m", b"manifest", plan=b"plan", handles=early)
    assert r == {"version": 1, "handles": ["early0", "early1"]}
    for s in subs:
        got = cl.get_handles(s, "m", 1, after=0, wait_ms=2000)["handles"]
        assert [(x["handle_id"], x["payload"]) for x in got] == [
            ("early0", {"bucket": 0}), ("early1", {"bucket": 1})]
        for x in got:
            cl.ack_handle(s, x["handle_id"])
        cl.precommit(s, "m", 1)
    assert cl.wait_version("m", 1, 5.0)["state"] == "committed"
    rel = cl.released(pub, after=0, wait_ms=2000)["released"]
    assert sorted(x["handle_id"] for x in rel) == ["early0", "early1"]
    # all or nothing: an unknown consumer, a taken id, a malformed handle
    for bad, err in (([{"payload": {}, "consumers": ["nobody"]}], "not registered"),
                     ([{"payload": {}, "consumers": subs, "handle_id": "x1"},
                       {"payload": {}, "consumers": subs, "handle_id": "x1"}], None),
                     ([{"payload": 3}], "map")):
        with pytest.raises(CoordinatorError) as e:
            cl.publish(pub, "m", b"manifest", handles=bad)
        assert err is None or err in str(e.value)
        assert cl.version("m")["version"] == 1 and len(cl.get_handles(subs[0], "m", 1)["handles"]) == 0


def test_small_plans_ride_in_the_version_event(hm):
    from hotweights.coordinator.state import INLINE_PLAN_BYTES

    c, cl, pub, subs = _setup(hm)
    small, big = b"p" * 100, b"q" * (INLINE_PLAN_BYTES + 1)
    cl.publish(pub, "m", b"manifest", plan=small)
    cl.publish(pub, "m", b"manifest", plan=big)
    cl.publish(pub, "m", b"manifest")
    ev = [e for e in cl.events("m", after=0)["events"] if e["type"] == "version"]
    assert [e.get("plan") for e in ev] == [small, None, None]
    assert cl.plan("m", 2) == big  # what does not ride along is fetched as before


def test_small_handles_ride_in_the_version_event(hm):
    """Handles posted with their version come with its event (subscribers skip get_handles);
    too many bytes of them do not, and are fetched as before."""
    from hotweights.coordinator.state import INLINE_HANDLE_BYTES

    c, cl, pub, subs = _setup(hm)
    early = [{"payload": {"bucket": b}, "consumers": subs[:1], "handle_id": f"e{b}"}
             for b in range(2)]
    cl.publish(pub, "m", b"manifest", handles=early)
    fat = [{"payload": {"blob": b"z" * (INLINE_HANDLE_BYTES + 1)}, "consumers": subs,
            "handle_id": "fat"}]
    cl.publish(pub, "m", b"manifest", handles=fat)
    ev = [e for e in cl.events("m", after=0)["events"] if e["type"] == "version"]
    got = ev[0]["handles"]
    assert [(x["handle_id"], x["payload"], x["consumers"], x["owner"], x["version"])
            for x in got] == [("e0", {"bucket": 0}, subs[:1], pub, 1),
                              ("e1", {"bucket": 1}, subs[:1], pub, 1)]
    # the same views get_handles returns (but for the lease countdown), plus the consumers
    fetched = cl.get_handles(subs[0], "m", 1)["handles"]
    assert [{k: v for k, v in x.items() if k != "expires_in"} for x in fetched] == [
        {k: v for k, v in x.items() if k not in ("expires_in", "consumers")} for x in got]
    assert "handles" not in ev[1]
    assert [x["handle_id"] for x in cl.get_handles(subs[1], "m", 2)["handles"]] == ["fat"]


def test_precommit_rides_on_the_last_ack(hm):
    """ack_handle(precommit=True) acks and precommits in one request: the last one commits,
    and the owner's release says so; on an aborted version the ack stands and the precommit
    is refused in the reply, not as an error (nothing half-applied)."""
    c, cl, pub, (s1, s2) = _setup(hm)
    cl.publish(pub, "m", b"manifest", handles=[{"payload": {"bucket": 0}, "consumers": [s1, s2],
                                                "handle_id": "h0"}])
    r1 = cl.ack_handle(s1, "h0", precommit=True)
    assert r1 == {"known": True, "released": False, "state": "transferring"}
    assert cl.version("m", 1)["precommitted"] == [s1]
    r2 = cl.ack_handle(s2, "h0", precommit=True)
    assert r2 == {"known": True, "released": True, "state": "committed"}
    rel = cl.released(pub, after=0)["released"]
    assert [(x["handle_id"], x["reason"], x["version_state"]) for x in rel] == [
        ("h0", "acked", "committed")]
    # a nack does not precommit
    cl.publish(pub, "m", b"manifest", parent=1)
    cl.post_handle(pub, "m", 2, {"bucket": 0}, handle_id="h1")
    r = cl.ack_handle(s1, "h1", ok=False, error="bad bytes", precommit=True)
    assert "state" not in r and cl.version("m", 2)["precommitted"] == []
    # refused by this subscriber earlier: the ack is recorded, the precommit refused in the
    # reply (an aborted version's handles are gone: that ack is answered known=False)
    cl.post_handle(pub, "m", 2, {"bucket": 1}, handle_id="h2", consumers=[s1, s2])
    cl.reject(s1, "m", 2, "shape mismatch")
    r = cl.ack_handle(s1, "h2", precommit=True)
    assert r["known"] and "rejected" in r["precommit_error"] and "state" not in r
    assert c.state.handles["h2"]["acked"] == [s1] and cl.version("m", 2)["precommitted"] == []
    cl.abort(pub, "m", 2, "operator")
    assert cl.ack_handle(s2, "h2", precommit=True) == {"known": False, "released": True}
    # a publisher is not a subscriber: forbidden before anything changes
    cl.publish(pub, "m", b"manifest", parent=1)
    cl.post_handle(pub, "m", 3, {"bucket": 0}, handle_id="h3", consumers=[pub])
    with pytest.raises(CoordinatorError, match="forbidden|expected a subscriber"):
        cl.ack_handle(pub, "h3", precommit=True)
    assert c.state.handles["h3"]["acked"] == []


def test_state_survives_reload(h):
    """Every change reaches the backend: a fresh State loaded from it equals the live one."""
    c, cl, pub, (s1, s2) = _setup(h)
    cl.publish(pub, "m", b"x")
    hid = cl.post_handle(pub, "m", 1, {"a": 1})["handle_id"]
    cl.ack_handle(s1, hid)
    cl.post_handle(pub, "m", 1, {"b": 2}, consumers=[s1])
    cl.precommit(s1, "m", 1)
    cl.reject(s2, "m", 1, "shape mismatch")
    cl.applied(s1, "m", 1)
    cl.publish(pub, "m", b"y", parent=1)
    cl.abort(pub, "m", 2, "operator")
    cl.status()
    live = c.state
    fresh = State(live.s, c.backend)
    # Read the backend from the serving thread's point of view: it is idle between requests.
    fresh.load(c.backend.load())
    for attr in ("clients", "models", "versions", "handles", "idem", "rseq"):
        assert getattr(fresh, attr) == getattr(live, attr), attr
    assert {k: list(v) for k, v in fresh.events.items()} == {
        k: list(v) for k, v in live.events.items()}
    assert {k: list(v) for k, v in fresh.released_log.items()} == {
        k: list(v) for k, v in live.released_log.items()}


class FailingWrites(MemoryBackend):
    """A real memory backend whose writes can be made to fail (Redis going away, in effect)."""

    failing = False

    def write(self, batch):
        if self.failing:
            raise BackendError("injected: the backend refused the write")
        super().write(batch)


def test_no_ok_for_an_unwritten_change(make_harness):
    """A group whose write fails gets errors, and its changes are rolled back from memory."""
    h = make_harness("memory")
    backend = FailingWrites()
    c = h.coord(backend=backend)
    cl = h.client(c.endpoint, retries=0, timeout_s=1.0)
    cl.register("publisher", "m", client_id="pub", heartbeat=False)
    backend.failing = True
    with raw_socket(c.endpoint) as s:
        for i in range(5):  # back to back: most land in one group
            s.send(request_bytes("register", {"role": "subscriber", "model": "m",
                                              "client_id": f"s{i}"}))
        replies = []
        for _ in range(5):
            assert s.poll(5000)
            replies.append(P.decode_reply(s.recv()))
    assert all(not r["ok"] and r["error"]["code"] == "unavailable" for r in replies), replies
    assert "injected" in replies[0]["error"]["message"]
    backend.failing = False
    assert [x["client_id"] for x in cl.clients("m")] == ["pub"]  # nothing half-applied
    assert cl.register("subscriber", "m", client_id="s0", heartbeat=False)["client_id"] == "s0"
    assert sorted(x["client_id"] for x in cl.clients("m")) == ["pub", "s0"]


def test_restart_on_the_same_memory_backend_continues(make_harness):
    h = make_harness("memory")
    backend = MemoryBackend()
    c1 = h.coord(backend=backend)
    cl = h.client(c1.endpoint)
    cl.register("publisher", "m", client_id="pub", heartbeat=False)
    cl.register("subscriber", "m", client_id="s1", heartbeat=False)
    v = cl.publish("pub", "m", b"m")["version"]
    c1.stop()
    c2 = h.coord(backend=backend)
    cl2 = h.client(c2.endpoint)
    assert cl2.version("m", v)["state"] == "transferring"
    cl2.precommit("s1", "m", v)
    assert cl2.current("m") == v


def test_long_poll_wakes_on_change(hm):
    c, cl, pub, subs = _setup(hm)
    last = cl.events("m")["last"]
    out = {}

    def waiter():
        out["r"] = cl.events("m", after=last, wait_ms=30_000)

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: cl.status()["gauges"]["parked"] == 1, what="the long-poll to park")
    cl.publish(pub, "m", b"m")
    t.join(20)
    assert not t.is_alive()
    # Woken by the publish, not by the 30 s expiry: it carries the version event.
    assert [e["type"] for e in out["r"]["events"]][0] == "version"
    # An expired long-poll answers with nothing, and a cursor from the future is flagged.
    r = cl.events("m", after=out["r"]["last"], wait_ms=50)
    assert r["events"] == [] and r["last"] == out["r"]["last"]
    assert cl.events("m", after=10_000)["truncated"] is True


def test_event_log_is_bounded(make_harness):
    h = make_harness("memory")
    c = h.coord(event_log_len=8)
    cl = h.client(c.endpoint)
    for i in range(12):
        cl.register("observer", "m", client_id=f"o{i}", heartbeat=False)
    r = cl.events("m", after=0)
    assert r.get("truncated") is True and len(r["events"]) == 8
    assert r["events"][0]["seq"] == 5 and r["last"] == 12


# --- quorum -----------------------------------------------------------------------------------

_CHILD = r"""
import sys, time
from hotweights.coordinator import Client
c = Client(sys.argv[1], timeout_s=2.0, retries=3)
c.register("subscriber", "m", client_id=sys.argv[2])
print("registered", flush=True)
time.sleep(120)
"""


def test_dead_subscriber_process_then_rest_commits(h):
    """on_dead=commit: a subscriber whose process is killed is dropped from the required set."""
    c, cl, pub, (s1,) = _setup(h, n_subs=1, on_dead="commit")
    child = h.spawn([sys.executable, "-c", _CHILD, c.endpoint, "s-child"])
    wait_until(lambda: any(x["client_id"] == "s-child" and x["alive"] for x in cl.clients("m")),
               timeout=60, what="the child to register")
    v = cl.publish(pub, "m", b"m")["version"]
    assert cl.version("m", v)["expected"] == [s1, "s-child"]
    cl.precommit(s1, "m", v)
    assert cl.version("m", v)["state"] == "transferring"  # still waits for the child
    child.kill()
    child.wait(10)
    info = cl.wait_version("m", v, timeout_s=20)
    assert info["state"] == "committed" and info["precommitted"] == [s1]
    assert not cl.get_client("s-child")["alive"]
    assert cl.get_client("s-child")["state"] == "dead"
    assert cl.current("m") == v


def test_dead_subscriber_aborts_when_configured(h):
    c, cl, pub, (s1, s2) = _setup(h, on_dead="abort")
    v = cl.publish(pub, "m", b"m")["version"]
    cl.precommit(s1, "m", v)
    cl.stop_heartbeat(s2)  # its heartbeats stop: dead after dead_after_s
    info = cl.wait_version("m", v, timeout_s=20)
    assert info["state"] == "aborted" and info["reason"] == f"subscriber {s2} died"
    assert cl.current("m") is None


@pytest.mark.parametrize("quorum,n_pre,commits", [
    (2, 1, False), (2, 2, True), (0.5, 1, False), (0.5, 2, True), ("all", 2, False),
    ("all", 3, True), (0.34, 1, False), (0.34, 2, True)])
def test_quorum_count_and_fraction(hm, quorum, n_pre, commits):
    c, cl, pub, subs = _setup(hm, n_subs=3)
    v = cl.publish(pub, "m", b"m", quorum=quorum)["version"]
    for s in subs[:n_pre]:
        cl.precommit(s, "m", v)
    assert cl.version("m", v)["state"] == ("committed" if commits else "transferring")


def test_quorum_from_config(make_harness):
    h = make_harness("memory")
    c, cl, pub, subs = _setup(h, n_subs=3, quorum=1)
    v = cl.publish(pub, "m", b"m")["version"]
    assert cl.version("m", v)["quorum"] == 1
    cl.precommit(subs[2], "m", v)
    assert cl.current("m") == v


def test_reject_leaves_the_quorum(hm):
    c, cl, pub, (s1, s2, s3) = _setup(hm, n_subs=3)
    v = cl.publish(pub, "m", b"m")["version"]
    cl.precommit(s1, "m", v)
    cl.reject(s3, "m", v, "shape mismatch for layers.0.weight")
    assert cl.version("m", v)["state"] == "transferring"
    cl.precommit(s2, "m", v)
    info = cl.version("m", v)
    assert info["state"] == "committed"
    assert info["rejected"] == {s3: "shape mismatch for layers.0.weight"}
    with pytest.raises(CoordinatorError) as ei:
        cl.applied(s3, "m", v + 1)
    assert ei.value.code == "unknown_version"
    # Everyone rejects the next one: it aborts instead of committing with nobody.
    v2 = cl.publish(pub, "m", b"m2")["version"]
    for s in (s1, s2, s3):
        cl.reject(s, "m", v2, "no")
    assert cl.version("m", v2)["state"] == "aborted"
    assert cl.current("m") == v


def test_behind_asks_for_a_catch_up_until_the_next_vote(h):
    """applied(behind=True): a subscriber that dropped a committed version asks for a catch-up;
    its record says so (with a `client behind` event) until its next precommit, reject or
    applied - so a refused catch-up is never asked for again."""
    c, cl, pub, (s1, s2) = _setup(h)
    v1 = cl.publish(pub, "m", b"m1")["version"]
    for s in (s1, s2):
        cl.precommit(s, "m", v1)
    for s in (s1, s2):
        cl.applied(s, "m", v1)
    v2 = cl.publish(pub, "m", b"m2")["version"]
    cl.precommit(s1, "m", v2)
    assert cl.get_client(s1)["holds"] == v1  # not before v2 commits
    cl.precommit(s2, "m", v2)
    # both hold v2 (staged), applied v1: their next delta is planned from v2
    assert [(r["version"], r["holds"]) for r in cl.clients("m") if r["role"] == "subscriber"] \
        == [(v1, v2), (v1, v2)]
    cl.applied(s2, "m", v1)  # a late report of an older version keeps what it holds
    assert cl.get_client(s2)["holds"] == v2
    seen = cl.events("m")["last"]
    cl.applied(s1, "m", v1, behind=True)  # s1 dropped v2
    ev = [e for e in cl.events("m", after=seen)["events"] if e["type"] == "client"]
    assert [(e["action"], e["client_id"], e["version"]) for e in ev] == [("behind", s1, v1)]
    view = {r["client_id"]: r for r in cl.clients("m")}
    assert view[s1]["behind"] and view[s1]["version"] == view[s1]["holds"] == v1
    assert not view[s2]["behind"]
    v3 = cl.publish(pub, "m", b"m3")["version"]  # the catch-up; it aborts
    cl.precommit(s1, "m", v3)
    assert cl.get_client(s1)["behind"]  # until it commits: an aborted one is served again
    cl.abort(pub, "m", v3, "source changed")
    assert cl.get_client(s1)["behind"] and cl.get_client(s1)["holds"] == v1
    v4 = cl.publish(pub, "m", b"m4")["version"]
    for s in (s1, s2):
        cl.precommit(s, "m", v4)
    assert not cl.get_client(s1)["behind"] and cl.get_client(s1)["holds"] == v4
    cl.applied(s1, "m", v1, behind=True)
    v5 = cl.publish(pub, "m", b"m5")["version"]
    cl.reject(s1, "m", v5, "no")  # a refusal ends the request too
    assert not cl.get_client(s1)["behind"]
    with pytest.raises(CoordinatorError) as ei:
        cl.applied(s1, "m", v1, behind="yes")
    assert ei.value.code == "bad_args" and "behind" in str(ei.value)
    # nothing applied yet: the request still goes through (the catch-up is a full send)
    s3 = cl.register("subscriber", "m", consumer=["*"], client_id="s3")["client_id"]
    with pytest.raises(CoordinatorError) as ei:
        cl.applied(s3, "m", None)
    assert ei.value.code == "bad_args"
    cl.applied(s3, "m", None, behind=True)
    rec = cl.get_client(s3)
    assert rec["behind"] and rec["holds"] is None and rec["version"] is None
    with pytest.raises(CoordinatorError) as ei:  # s1 has applied v1: it must say so
        cl.applied(s1, "m", None, behind=True)
    assert ei.value.code == "bad_state" and "has applied version 1" in str(ei.value)
    # a refusal after its vote: the version is not held
    v6 = cl.publish(pub, "m", b"m6")["version"]
    for s in (s1, s2, s3):
        cl.precommit(s, "m", v6)
    assert cl.get_client(s2)["holds"] == v6
    cl.reject(s2, "m", v6, "failed after its precommit")
    assert cl.get_client(s2)["holds"] == cl.get_client(s2)["version"] == v1


def test_empty_required_set_commits_at_once(hm):
    c, cl, pub, _ = _setup(hm, n_subs=0)
    assert cl.version("m", cl.publish(pub, "m", b"m")["version"])["state"] == "committed"


def test_publisher_death_aborts_and_drops_its_handles(h):
    c, cl, pub, (s1, s2) = _setup(h)
    v = cl.publish(pub, "m", b"m")["version"]
    hid = cl.post_handle(pub, "m", v, {"slot": 0})["handle_id"]
    cl.stop_heartbeat(pub)
    info = cl.wait_version("m", v, timeout_s=20)
    assert info["state"] == "aborted" and info["reason"] == "publisher died"
    assert cl.get_handles(s1, "m", v)["handles"] == []
    evs = cl.events("m")["events"]
    assert any(e["type"] == "handle" and e["action"] == "dropped" and e["handle_id"] == hid
               for e in evs)


def test_version_timeout_aborts_and_releases_handles(make_harness):
    h = make_harness("memory")
    c, cl, pub, (s1, s2) = _setup(h, version_timeout_s=1.5)
    v = cl.publish(pub, "m", b"m")["version"]
    hid = cl.post_handle(pub, "m", v, {"slot": 0})["handle_id"]
    info = cl.wait_version("m", v, timeout_s=20)
    assert info["state"] == "aborted" and info["reason"] == "timeout"
    rel = cl.released(pub, wait_ms=5000)["released"]
    assert [(x["handle_id"], x["reason"]) for x in rel] == [(hid, "aborted")]
    with pytest.raises(CoordinatorError, match="aborted"):
        cl.precommit(s1, "m", v)


def test_history_is_trimmed(make_harness):
    h = make_harness("memory")
    c, cl, pub, (s1,) = _setup(h, n_subs=1, keep_versions=4, keep_manifests=2)
    for i in range(1, 7):
        v = cl.publish(pub, "m", b"manifest-%d" % i, idempotency_key=f"k{i}")["version"]
        cl.precommit(s1, "m", v)
    assert cl.current("m") == 6
    with pytest.raises(CoordinatorError, match="version 2 of model 'm' was trimmed"):
        cl.version("m", 2)
    assert cl.version("m", 3)["state"] == "committed"
    with pytest.raises(CoordinatorError, match="the manifest of version 4 .* was dropped"):
        cl.manifest("m", 4)
    assert cl.manifest("m", 5) == b"manifest-5" and cl.manifest("m", 6) == b"manifest-6"
    # A trimmed version's idempotency key is forgotten with it.
    assert cl.publish(pub, "m", b"again", idempotency_key="k6")["version"] == 6
    assert cl.publish(pub, "m", b"new", idempotency_key="k1")["version"] == 7


def test_reregistering_in_another_role_settles_the_old_one(hm):
    c, cl, pub, (s1,) = _setup(hm, n_subs=1)
    v = cl.publish(pub, "m", b"m")["version"]
    cl.register("subscriber", "m", client_id=pub, heartbeat=False)  # same id, new role
    info = cl.version("m", v)
    assert info["state"] == "aborted" and info["reason"] == "publisher left"
    assert cl.get_client(pub)["role"] == "subscriber"


def test_newer_commit_supersedes_older_version(hm):
    c, cl, pub, (s1,) = _setup(hm, n_subs=1)
    v1 = cl.publish(pub, "m", b"1")["version"]
    v2 = cl.publish(pub, "m", b"2")["version"]
    cl.precommit(s1, "m", v2)
    assert cl.current("m") == v2
    assert cl.version("m", v1)["reason"] == f"superseded by version {v2}"


# --- handles ----------------------------------------------------------------------------------

def test_lease_expiry_and_early_release(h):
    c, cl, pub, (s1, s2) = _setup(h)
    v = cl.publish(pub, "m", b"m")["version"]
    early = cl.post_handle(pub, "m", v, {"n": 1}, ttl=60)["handle_id"]
    late = cl.post_handle(pub, "m", v, {"n": 2}, ttl=1.5)["handle_id"]
    cl.ack_handle(s1, early)
    cl.ack_handle(s2, early)  # every consumer acked: released long before its 60 s lease
    cl.ack_handle(s1, late)   # s2 never acks this one: it expires
    got, after = {}, 0
    end = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < end:
        r = cl.released(pub, after=after, wait_ms=2000)
        after = r["last"]
        got.update({x["handle_id"]: x for x in r["released"]})
    assert got[early]["reason"] == "acked" and got[early]["missing"] == []
    assert got[late]["reason"] == "expired"
    assert got[late]["acked"] == [s1] and got[late]["missing"] == [s2]
    assert cl.get_handles(s2, "m", v)["handles"] == []
    assert cl.ack_handle(s2, late) == {"known": False, "released": True}
    st = cl.status()
    assert st["counters"]["handles.expired"] == 1 and st["gauges"]["handles_active"] == 0


def test_nack_and_consumer_death(h):
    c, cl, pub, (s1, s2, s3) = _setup(h, n_subs=3)
    v = cl.publish(pub, "m", b"m")["version"]
    hid = cl.post_handle(pub, "m", v, {"n": 1}, consumers=[s1, s2])["handle_id"]
    assert [x["handle_id"] for x in cl.get_handles(s3, "m", v)["handles"]] == []
    cl.ack_handle(s1, hid)
    cl.ack_handle(s2, hid, ok=False, error="checksum mismatch in bucket 3")
    r = cl.released(pub, wait_ms=5000)["released"]
    assert r[0]["reason"] == "nacked"
    assert r[0]["errors"] == {s2: "checksum mismatch in bucket 3"}
    # A consumer that dies no longer holds the handle.
    hid2 = cl.post_handle(pub, "m", v, {"n": 2}, consumers=[s1, s3])["handle_id"]
    cl.ack_handle(s1, hid2)
    cl.stop_heartbeat(s3)
    r2 = cl.released(pub, after=r[0]["seq"], wait_ms=10_000)["released"]
    assert r2[0]["handle_id"] == hid2 and r2[0]["reason"] == "acked"
    assert r2[0]["missing"] == [s3]
    hid3 = cl.post_handle(pub, "m", v, {"n": 3}, consumers=[s1])["handle_id"]
    with pytest.raises(CoordinatorError) as ei:
        cl.ack_handle(s2, hid3)
    assert ei.value.code == "forbidden" and "not a consumer" in ei.value.message


def test_two_consumers_long_poll_one_handle(hm):
    c, cl, pub, (s1, s2) = _setup(hm)
    v = cl.publish(pub, "m", b"m")["version"]
    results = {}

    def consume(sid):
        results[sid] = cl.get_handles(sid, "m", v, after=0, wait_ms=20_000)

    ts = [threading.Thread(target=consume, args=(s,)) for s in (s1, s2)]
    for t in ts:
        t.start()
    wait_until(lambda: cl.status()["gauges"]["parked"] == 2, what="both long-polls to park")
    hid = cl.post_handle(pub, "m", v, {"slot": 3})["handle_id"]
    for t in ts:
        t.join(20)
    assert [x["handle_id"] for x in results[s1]["handles"]] == [hid]
    assert [x["handle_id"] for x in results[s2]["handles"]] == [hid]


def test_idempotent_retries(hm):
    c, cl, pub, (s1, s2) = _setup(hm)
    a = cl.publish(pub, "m", b"m", idempotency_key="k1")
    b = cl.publish(pub, "m", b"m", idempotency_key="k1")
    assert a["version"] == b["version"] == 1 and b.get("duplicate")
    x = cl.post_handle(pub, "m", 1, {"n": 1}, handle_id="h-1")
    y = cl.post_handle(pub, "m", 1, {"n": 1}, handle_id="h-1")
    assert x["handle_id"] == y["handle_id"] == "h-1" and y.get("duplicate")
    assert cl.precommit(s1, "m", 1) == cl.precommit(s1, "m", 1)
    assert len(cl.version("m", 1)["precommitted"]) == 1
    cl.register("subscriber", "m", client_id="other", heartbeat=False)
    with pytest.raises(CoordinatorError) as ei:
        cl.post_handle("other", "m", 1, {}, handle_id="h-1")
    assert ei.value.code == "conflict"


def test_errors_name_the_problem(hm):
    c, cl, pub, (s1, s2) = _setup(hm)
    cases = [
        (lambda: cl.version("nope"), "unknown_model", "'nope'"),
        (lambda: cl.version("m", 5), "unknown_version", "no version 5"),
        (lambda: cl.publish(s1, "m", b"m"), "forbidden", "expected a publisher"),
        (lambda: cl.precommit("ghost", "m", 1), "unknown_client", "'ghost'"),
        (lambda: cl.call("publish", {"client_id": pub, "model": "m", "manifest": "not bytes"}),
         "bad_args", "argument 'manifest'"),
        (lambda: cl.call("register", {"role": "boss", "model": "m"}), "bad_args", "boss"),
        (lambda: cl.call("version", {"model": "m", "extra": 1}), "bad_args", "'extra'"),
        (lambda: cl.call("no_such_method"), "unknown_method", "no_such_method"),
        (lambda: cl.publish(pub, "m", b"m", expected=["ghost"]), "bad_args", "'ghost'"),
        (lambda: cl.publish(pub, "m", b"m", quorum=1.5), "bad_args", "quorum"),
    ]
    for fn, code, needle in cases:
        with pytest.raises(CoordinatorError) as ei:
            fn()
        assert ei.value.code == code and needle in ei.value.message, ei.value


# --- security and malformed input -------------------------------------------------------------

def test_mac_is_independent_of_key_order():
    a = P.compute_mac("k", 1, "id", "publish", {"x": 1, "y": {"b": 2, "a": [1, {"d": 4, "c": 3}]}},
                      None, 1.5, b"n" * 16)
    b = P.compute_mac("k", 1, "id", "publish", {"y": {"a": [1, {"c": 3, "d": 4}], "b": 2}, "x": 1},
                      None, 1.5, b"n" * 16)
    assert a == b and len(a) == 32
    assert a != P.compute_mac("other", 1, "id", "publish", {"x": 1}, None, 1.5, b"n" * 16)


TOKEN = "t0ken-s3cret-value"


def test_token_required_for_mutations(make_harness):
    h = make_harness("memory")
    c = h.coord(token=TOKEN, pub_endpoint="tcp://127.0.0.1:0")
    anon = h.client(c.endpoint, token=None)
    wrong = h.client(c.endpoint, token="not-the-token")
    good = h.client(c.endpoint, token=TOKEN)
    for cl in (anon, wrong):
        with pytest.raises(CoordinatorError) as ei:
            cl.register("subscriber", "m", client_id="intruder")
        assert ei.value.code == "unauthenticated"
    from hotweights.coordinator import EventSubscriber
    with EventSubscriber(c.pub_endpoint, ["m"], token=TOKEN) as sub:
        wait_until(lambda: (good.register("observer", "m", client_id="probe", heartbeat=False)
                            and sub.recv(0.2)), what="the PUB connection")
        good.register("publisher", "m", client_id="pub")
        ev = sub.recv(5)
        assert ev is not None and P.verify_event(TOKEN, ev)
        assert TOKEN not in repr(ev)
    # Public reads work without the token; reads of capabilities and handles do not, and
    # version events carry no plan or handles then (they do without a token).
    good.register("subscriber", "m", client_id="sub")
    good.publish("pub", "m", b"manifest", plan=b"secret plan",
                 handles=[{"payload": {"ipc": b"secret handle"}, "consumers": ["sub"]}])
    assert anon.status()["coordinator"]["auth"] is True
    assert anon.events("m")["events"]
    v = [e for e in anon.events("m")["events"] if e["type"] == "version"]
    assert len(v) == 1 and "plan" not in v[0] and "handles" not in v[0]
    assert b"secret" not in P.pack(anon.events("m"))
    with pytest.raises(CoordinatorError, match="unauthenticated"):
        anon.clients("m")
    with pytest.raises(CoordinatorError, match="unauthenticated"):
        anon.heartbeat("pub")
    st = good.status()
    assert st["counters"]["rejected.unauthenticated"] >= 4
    assert "intruder" not in str(st)
    # The token never travels: not in any message the server sent or was sent.
    for blob in (repr(st), repr(good.events("m")), repr(good.clients())):
        assert TOKEN not in blob


def test_replay_and_stale_requests(make_harness):
    h = make_harness("memory")
    c = h.coord(token=TOKEN)
    with raw_socket(c.endpoint) as s:
        msg = request_bytes("register", {"role": "observer", "model": "m", "client_id": "o1"},
                            token=TOKEN)
        assert raw_call(s, msg)["ok"] is True
        r = raw_call(s, msg)  # the very same signed bytes again
        assert r["ok"] is False and r["error"]["code"] == "replay"
        old = request_bytes("heartbeat", {"client_id": "o1"}, token=TOKEN, ts=time.time() - 600)
        r = raw_call(s, old)
        assert r["error"]["code"] == "stale" and "off this coordinator's clock" in \
            r["error"]["message"]
        # Tampering with a signed request breaks its mac.
        req = P.unpack(request_bytes("deregister", {"client_id": "o1"}, token=TOKEN))
        req["args"]["client_id"] = "o2"
        r = raw_call(s, P.pack(req))
        assert r["error"]["code"] == "unauthenticated"
        assert TOKEN not in repr(r)
    cl = h.client(c.endpoint, token=TOKEN)
    counters = cl.status()["counters"]
    assert counters["rejected.replay"] == 1 and counters["rejected.stale"] == 1


def test_malformed_messages_get_error_replies(hm):
    c = hm.coord()
    with raw_socket(c.endpoint) as s:
        cases = [
            (b"\xc1", "bad_message"),                      # invalid msgpack
            (P.pack([1, 2, 3]), "bad_message"),            # not a map
            (P.pack({"v": 1}), "bad_message"),             # no id
            (P.pack({"v": 2, "id": "x", "method": "ping"}), "bad_version"),
            (P.pack({"v": 1, "id": "x", "method": 5}), "bad_message"),
            (P.pack({"v": 1, "id": "x", "method": "status", "args": []}), "bad_message"),
            (P.pack({"v": 1, "id": "x", "method": "status", "args": {}, "ts": "now"}),
             "bad_message"),
            (P.pack({"v": 1, "id": "x", "method": "ping", "args": {}, "ts": 0, "evil": 1}),
             "bad_message"),
            (b"\xd4\x01\x00", "bad_message"),              # an ext type
            (P.pack({"v": 1, "id": "x", "method": "heartbeat", "args": {"client_id": 7},
                     "ts": 0}), "bad_args"),
        ]
        for payload, code in cases:
            r = raw_call(s, payload)
            assert r is not None and r["ok"] is False and r["error"]["code"] == code, (payload, r)
        r = raw_call(s, P.pack({"v": 2, "id": "x", "method": "ping"}))
        assert "this coordinator speaks v=1" in r["error"]["message"]
        r = raw_call(s, [b"a", b"b", b"c"])  # wrong framing
        assert r["error"]["code"] == "bad_message"
        assert raw_call(s, request_bytes("ping", {}))["ok"] is True
    st = h_status(c)
    assert st["counters"]["rejected.bad_message"] >= 9
    assert st["counters"]["rejected.bad_version"] >= 2


def h_status(c, token=None):
    with Client(c.endpoint, timeout_s=2, retries=0, token=token) as cl:
        return cl.status()


def test_oversized_requests(make_harness):
    h = make_harness("memory")
    c = h.coord(max_request_bytes=1 << 20)
    with raw_socket(c.endpoint) as s:
        big = request_bytes("publish", {"client_id": "x", "model": "m",
                                        "manifest": b"\0" * ((1 << 20) + 10)})
        r = raw_call(s, big)
        assert r["error"]["code"] == "too_large" and "exceeds the limit" in r["error"]["message"]
        # Past the hard limit zmq drops the connection: no reply, but the server serves on.
        assert raw_call(s, b"\0" * (3 << 20), timeout=1.0) is None
    with raw_socket(c.endpoint) as s:
        assert raw_call(s, request_bytes("ping", {}))["ok"] is True
    assert h_status(c)["counters"]["rejected.too_large"] == 1


def test_default_size_limit_is_64mib(hm):
    c = hm.coord()
    with raw_socket(c.endpoint) as s:
        r = raw_call(s, b"\0" * (P.MAX_REQUEST_BYTES + 1), timeout=30)
        assert r["error"]["code"] == "too_large"
        assert raw_call(s, request_bytes("ping", {}))["ok"] is True


# --- fuzzing ----------------------------------------------------------------------------------

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                  st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
_value = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)),
    max_leaves=12)
_FUZZ = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


def _alive(s):
    r = raw_call(s, request_bytes("ping", {}))
    return r is not None and r["ok"]


def test_fuzz_random_bytes(hm):
    c = hm.coord()
    with raw_socket(c.endpoint) as s:
        @_FUZZ
        @given(st.binary(max_size=2048))
        def check(data):
            r = raw_call(s, data)
            assert r is not None and r["ok"] is False
        check()
        assert _alive(s)
    st_ = h_status(c)
    assert sum(v for k, v in st_["counters"].items() if k.startswith("rejected.")) >= 100


def test_fuzz_envelopes(hm):
    c = hm.coord()
    keys = st.sampled_from(["v", "id", "method", "args", "client", "ts", "nonce", "mac", "x"])
    with raw_socket(c.endpoint) as s:
        @_FUZZ
        @given(st.dictionaries(keys, _value, max_size=8))
        def check(env):
            r = raw_call(s, P.pack(env))
            assert r is not None and isinstance(r["ok"], bool)
        check()
        assert _alive(s)


def test_fuzz_method_arguments(hm):
    """Every method with random (mostly wrong) arguments: an answer each time, never a crash."""
    c = hm.coord(token=TOKEN)
    cl = hm.client(c.endpoint, token=TOKEN, retries=0)
    cl.register("publisher", "m", client_id="pub", heartbeat=False)
    cl.register("subscriber", "m", client_id="sub", heartbeat=False)
    cl.publish("pub", "m", b"x")
    methods = sorted(P.METHODS)

    def arg_names(m):
        return st.sampled_from(list(P.METHODS[m].args) + ["bogus"])

    @st.composite
    def calls(draw):
        m = draw(st.sampled_from(methods))
        names = draw(st.lists(arg_names(m), max_size=6, unique=True)) if P.METHODS[m].args \
            else []
        args = {}
        for n in names:
            args[n] = draw(st.one_of(_value, st.sampled_from(
                ["m", "pub", "sub", 1, 0, -1, 2**63, "all", 0.5, b"bytes", [], {}])))
        return m, args

    @_FUZZ
    @given(calls())
    def check(call):
        m, args = call
        if "wait_ms" in args:
            args["wait_ms"] = 0  # no parking: each example answers at once
        try:
            cl.call(m, args)
        except CoordinatorError as e:
            assert e.code not in ("internal",), e
    check()
    assert cl.ping()["leader"] is True
    assert "requests.internal" not in str(cl.status()["counters"])


# --- availability -----------------------------------------------------------------------------

def test_dead_coordinator_is_an_error_not_a_hang(hm):
    ep = f"tcp://127.0.0.1:{free_port()}"
    cl = hm.client(ep, timeout_s=0.2, retries=2)
    with pytest.raises(CoordinatorUnavailable) as ei:
        cl.status()
    assert f"coordinator at {ep} did not answer status: 3 attempts of 0.2 s" in str(ei.value)
    with pytest.raises(CoordinatorUnavailable):
        cl.register("subscriber", "m")  # its heartbeat thread never starts
    assert not cl._heartbeats


def test_failover_across_endpoints(hm):
    c = hm.coord()
    dead = f"tcp://127.0.0.1:{free_port()}"
    cl = hm.client(f"{dead},{c.endpoint}", timeout_s=0.3, retries=2)
    assert cl.ping()["endpoint"] == c.endpoint
    assert cl.register("observer", "m", heartbeat=False)["client_id"]


def test_client_threads_share_one_client(hm):
    c, cl, pub, subs = _setup(hm, n_subs=4)
    errors = []

    def work(sid):
        try:
            for _ in range(20):
                assert cl.heartbeat(sid)["known"]
                cl.status("m")
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            cl.release_thread()

    ts = [threading.Thread(target=work, args=(s,)) for s in subs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in ts)


def test_memory_restart_clients_reregister(make_harness):
    h = make_harness("memory")
    port = free_port()
    c1 = h.coord(endpoint=f"tcp://127.0.0.1:{port}")
    cl = h.client(c1.endpoint, timeout_s=1.0, retries=5)
    cl.register("subscriber", "m", client_id="s1", capabilities={"k": 1})
    cl.register("publisher", "m", client_id="pub", heartbeat=False)
    c1.stop()
    c2 = h.coord(endpoint=f"tcp://127.0.0.1:{port}")  # empty state
    # The heartbeat thread notices "unknown" and registers s1 again by itself ...
    wait_until(lambda: any(x["client_id"] == "s1" for x in cl.clients("m")),
               what="s1 to re-register")
    assert cl.get_client("s1")["capabilities"] == {"k": 1}
    # ... and a call on behalf of a forgotten client does the same.
    assert cl.publish("pub", "m", b"m")["version"] == 1
    assert c2.counters["clients.registered"] >= 2


def test_embedded_coordinator(monkeypatch):
    from hotweights.coordinator import server
    monkeypatch.delenv("HOTWEIGHTS_COORD_ENDPOINT", raising=False)
    try:
        with Client(None, timeout_s=2) as cl:
            assert cl.endpoints[0].startswith("tcp://127.0.0.1:")
            assert cl.ping()["leader"] is True
            ep = server.embedded()
            assert ep == cl.endpoints[0]  # one per process
    finally:
        if server._embedded is not None:
            server._embedded.stop()
            server._embedded = None


def test_cli_status(hm, capsys, monkeypatch):
    from hotweights import config
    from hotweights.cli import main
    c, cl, pub, (s1, s2) = _setup(hm)
    cl.publish(pub, "m", b"m", label="first")
    cl.post_handle(pub, "m", 1, {"x": 1})
    cl.precommit(s1, "m", 1)
    cl.precommit(s2, "m", 1)
    cl.applied(s1, "m", 1)
    assert main(["status", "--endpoint", c.endpoint]) == 0
    out = capsys.readouterr().out
    assert "model m: current 1" in out and "first" in out and "committed" in out
    assert "s2" in out and "lag" in out
    assert main(["status", "--endpoint", c.endpoint, "--json"]) == 0
    import json
    data = json.loads(capsys.readouterr().out)
    assert data["models"]["m"]["current"] == 1
    monkeypatch.setenv("HOTWEIGHTS_REQUEST_TIMEOUT_S", "0.2")
    monkeypatch.setenv("HOTWEIGHTS_REQUEST_RETRIES", "0")
    config.reset()
    dead = f"tcp://127.0.0.1:{free_port()}"
    assert main(["status", "--endpoint", dead]) == 1
    assert f"coordinator at {dead} did not answer status" in capsys.readouterr().err


def test_coord_serve_process_stops_cleanly_on_sigint(hm):
    p = hm.coord_serve("tcp://127.0.0.1:0", {"HOTWEIGHTS_COORD_BACKEND": "memory"},
                       "--pub-endpoint", "tcp://127.0.0.1:0")
    line = next(ln for ln in p.output if "serving tcp://" in ln)
    endpoint = line.split("serving ")[1].split()[0]
    cl = hm.client(endpoint)
    assert cl.ping()["pub_endpoint"].startswith("tcp://127.0.0.1:")
    cl.register("observer", "m", client_id="o", heartbeat=False)
    p.send_signal(signal.SIGINT)
    assert p.wait(15) == 0


def test_metrics_hook_sees_counters_and_gauges(make_harness):
    h = make_harness("memory")
    seen = []
    c = h.coord(hook=lambda name, value, kind: seen.append((name, value, kind)))
    cl = h.client(c.endpoint)
    cl.register("subscriber", "m", client_id="s1")
    wait_until(lambda: any(k == "gauge" and n == "subscribers_live" for n, _, k in list(seen)),
               what="a gauge")
    assert ("requests.register.ok", 1, "counter") in seen


# --- Redis: persistence, HA, fencing ------------------------------------------------------------

@pytest.mark.redis
def test_redis_unreachable_is_a_startup_error():
    url = f"redis://127.0.0.1:{free_port()}/0"
    c = Coordinator(backend="redis", redis_url=url)
    with pytest.raises(BackendError, match=f"cannot reach Redis at {url}"):
        c.start()


def test_redis_url_password_is_redacted():
    from hotweights.coordinator.backends import redact_url
    assert redact_url("redis://user:hunter2@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://:hunter2@h/0") == "redis://:***@h/0"


@pytest.mark.redis
def test_fencing_rejects_a_deposed_leader(redis_url):
    prefix = f"hwtest-fence-{os.getpid()}"
    a = RedisBackend(redis_url, prefix=prefix, lease_s=1.0)
    b = RedisBackend(redis_url, prefix=prefix, lease_s=1.0)
    a.open()
    b.open()
    try:
        assert a.acquire() and not b.acquire()
        batch = WriteBatch()
        batch.put("meta", "k", 1)
        a.write(batch)
        a._r.delete(f"{prefix}:leader")  # a's lease runs out (a paused, partitioned...)
        assert b.acquire() and b.epoch == a.epoch + 1
        with pytest.raises(NotLeader):
            a.write(batch)
        assert not a.acquire()
        b.write(batch)
    finally:
        b.wipe()
        a.close()
        b.close()


@pytest.mark.redis
def test_redis_lease_is_renewed(make_harness):
    """A lone leader keeps its lease (and serves writes) across many lease periods."""
    h = make_harness("redis")
    c = h.coord(leader_lease_s=1.0)
    cl = h.client(c.endpoint, retries=0)
    end = time.monotonic() + 3.5  # without renewal the lease would lapse 3 times
    i = 0
    while time.monotonic() < end:
        cl.register("observer", "m", client_id=f"o{i % 4}", heartbeat=False)
        i += 1
        time.sleep(0.02)
    assert c.is_leader and c.backend.epoch == 1
    assert not [k for k in c.counters if k.endswith(".not_leader")]


def _env(redis_url, prefix, **extra):
    env = {"HOTWEIGHTS_COORD_BACKEND": "redis", "HOTWEIGHTS_REDIS_URL": redis_url,
           "HOTWEIGHTS_HEARTBEAT_S": "0.2", "HOTWEIGHTS_DEAD_AFTER_S": "3",
           "HOTWEIGHTS_LEADER_LEASE_S": "1", "HOTWEIGHTS_LOG_LEVEL": "INFO"}
    env.update(extra)
    return env


@pytest.mark.redis
@pytest.mark.slow
def test_redis_sigkill_mid_version_then_restart(make_harness):
    h = make_harness("redis")
    ep = f"tcp://127.0.0.1:{free_port()}"
    env = _env(h.redis_url, h.prefix)
    p1 = h.coord_serve(ep, env, "--redis-prefix", h.prefix)
    cl = h.client(ep, timeout_s=1.0, retries=15)
    cl.register("publisher", "m", client_id="pub")
    cl.register("subscriber", "m", client_id="s1")
    cl.register("subscriber", "m", client_id="s2")
    v = cl.publish("pub", "m", b"manifest-1", plan=b"plan-1")["version"]
    hid = cl.post_handle("pub", "m", v, {"slot": 0})["handle_id"]
    cl.ack_handle("s1", hid)
    cl.precommit("s1", "m", v)
    before = cl.events("m")["events"]

    p1.send_signal(signal.SIGKILL)
    p1.wait(10)
    p2 = h.coord_serve(ep, env, "--redis-prefix", h.prefix)

    # The client's next calls wait out the restart (and the dead leader's lease).
    info = cl.version("m", v)
    assert info["state"] == "transferring" and info["precommitted"] == ["s1"]
    assert cl.manifest("m", v) == b"manifest-1" and cl.plan("m", v) == b"plan-1"
    assert [x["handle_id"] for x in cl.get_handles("s2", "m", v)["handles"]] == [hid]
    assert cl.get_handles("s1", "m", v)["handles"] == []  # s1's ack survived
    cl.ack_handle("s2", hid)
    rel = cl.released("pub", wait_ms=5000)["released"]
    assert rel[0]["handle_id"] == hid and sorted(rel[0]["acked"]) == ["s1", "s2"]
    cl.precommit("s2", "m", v)
    assert cl.current("m") == v
    after = cl.events("m")["events"]
    assert after[:len(before)] == before  # nothing lost, nothing renumbered
    assert [e["seq"] for e in after] == list(range(1, len(after) + 1))
    # Heartbeats kept everyone alive through the restart (grace period, then beats).
    assert all(x["alive"] for x in cl.clients("m"))
    assert cl.ping()["epoch"] >= 2
    p2.send_signal(signal.SIGTERM)
    assert p2.wait(10) == 0


@pytest.mark.redis
@pytest.mark.slow
def test_redis_standby_takes_over(make_harness):
    h = make_harness("redis")
    ep_a, ep_b = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    env = _env(h.redis_url, h.prefix)
    pa = h.coord_serve(ep_a, env, "--redis-prefix", h.prefix)
    pb = h.coord_serve(ep_b, env, "--redis-prefix", h.prefix)
    assert "standby" in "".join(pb.output)
    cl = h.client(f"{ep_b},{ep_a}", timeout_s=1.0, retries=15)  # the standby first
    assert cl.ping()["endpoint"] == ep_b and not cl.ping()["leader"]
    cl.register("publisher", "m", client_id="pub")  # fails over to the leader
    cl.register("subscriber", "m", client_id="s1")
    v = cl.publish("pub", "m", b"m")["version"]
    pa.send_signal(signal.SIGKILL)
    pa.wait(10)
    cl.precommit("s1", "m", v)  # answered by b once it holds the lease
    assert cl.current("m") == v
    info = cl.version("m", v)
    assert info["precommitted"] == ["s1"] and info["expected"] == ["s1"]
    assert cl.get_client("s1")["alive"]  # its heartbeats failed over too
    with Client(ep_b, timeout_s=2, retries=0) as direct:
        assert direct.ping()["leader"] is True
    pb.send_signal(signal.SIGTERM)
    assert pb.wait(10) == 0


@pytest.mark.redis
def test_redis_going_away_gives_error_replies(make_harness, tmp_path):
    """A private Redis is stopped while serving: requests get error replies, then recover."""
    import shutil
    import subprocess
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        import redis
        wait_until(lambda: _ping_redis(redis, url), what="the private Redis")
        h = make_harness("memory")
        c = h.coord(backend="redis", redis_url=url, redis_prefix="hw", leader_lease_s=1.0)
        cl = h.client(c.endpoint, timeout_s=1.0, retries=0)
        cl.register("publisher", "m", client_id="pub", heartbeat=False)
        proc.kill()
        proc.wait(10)
        with pytest.raises((CoordinatorError, CoordinatorUnavailable)) as ei:
            cl.register("subscriber", "m", client_id="s1", heartbeat=False)
        # Either Redis's failure itself, or the step-down it caused once the lease lapsed.
        msg = str(ei.value)
        assert f"Redis at {url} failed" in msg or "steps down" in msg or "standby" in msg, msg
        assert c.running
        with pytest.raises(CoordinatorUnavailable):
            cl.status()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _ping_redis(redis, url):
    r = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        return r.ping()
    except Exception:
        return False
    finally:
        r.close()


# --- hostile and runaway input (session 9 review) ---------------------------------------------

def _nested(depth: int) -> bytes:
    """A msgpack map nested ``depth`` levels deep ({"a": {"a": ... {}}})."""
    b = b"\x80"
    for _ in range(depth):
        b = b"\x81\xa1a" + b
    return b


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_deep_or_timestamped_requests_are_refused_without_a_reload(make_harness, token):
    """A map nested 1000 levels deep (in any field, signed or not) or a msgpack timestamp
    gets a bad_message reply; the coordinator neither logs an internal error nor reloads."""
    import msgpack

    hm = make_harness("memory")
    c = hm.coord(token=token)
    with raw_socket(c.endpoint) as s:
        for field in ("id", "model"):
            msg = P.unpack(request_bytes("current", {"model": "m"}))
            if field == "model":
                msg["args"]["model"] = "__X__"
            else:
                msg[field] = "__X__"
            body = P.pack(msg).replace(P.pack("__X__"), _nested(1000))
            r = raw_call(s, body)
            assert r is not None and r["error"]["code"] == "bad_message", (field, r)
            assert "more than 32 levels deep" in r["error"]["message"]
        msg = P.unpack(request_bytes("ping", {}))  # well formed, then a timestamp in args
        msg["args"] = {"t": msgpack.Timestamp(1, 0)}
        r = raw_call(s, msgpack.packb(msg, use_bin_type=True))
        assert r["error"]["code"] == "bad_message" and "timestamp" in r["error"]["message"]
        assert raw_call(s, request_bytes("ping", {}))["ok"] is True
    assert "internal_errors" not in h_status(c, token)["counters"]


def test_a_reload_keeps_liveness_and_counters():
    """Recovering in place (State.load after an internal error) must not make a silent
    client look alive again, nor lose counters not flushed yet."""
    st = State(StateSettings(), MemoryBackend())
    st.register({"client_id": "s1", "role": "subscriber", "model": "m", "node": "", "device": "",
                 "consumer": [], "capabilities": {}})
    st.seen["s1"] -= 100.0  # silent for 100 s
    st.count("requests.x.ok", 7)
    b, _ = st.take()
    snap = {"client": {k: v for (ns, k), v in b.records.items() if ns == "client"}}
    st.load(snap)
    assert time.monotonic() - st.seen["s1"] > 99 and st.counters["requests.x.ok"] == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_expected_subscribers_vote(make_harness, backend):
    """A subscriber that registered after the publish is not in the version's quorum: its
    precommit is refused, so the version aborts when its only expected subscriber refuses it,
    whatever the order of the votes."""
    h = make_harness(backend)
    c, cl, pub, (a,) = _setup(h, n_subs=1)
    v = cl.publish(pub, "m", b"m")["version"]
    late = cl.register("subscriber", "m", client_id="late")["client_id"]
    with pytest.raises(CoordinatorError, match="is not expected for version 1") as ei:
        cl.precommit(late, "m", v)
    assert ei.value.code == "bad_state"
    cl.reject(a, "m", v, "bad checksum")
    info = cl.version("m", v)
    assert info["state"] == "aborted" and cl.current("m") is None


def test_versions_in_flight_are_bounded(make_harness):
    hm = make_harness("memory")
    c, cl, pub, subs = _setup(hm, n_subs=1, max_transferring=3)
    vs = [cl.publish(pub, "m", b"x" * 1000)["version"] for _ in range(6)]  # nobody votes
    states = [cl.version("m", v)["state"] for v in vs]
    assert states == ["aborted"] * 3 + ["transferring"] * 3
    assert "superseded: more than 3 versions" in cl.version("m", vs[0])["reason"]


def test_models_nobody_uses_are_forgotten_and_bounded(make_harness):
    hm = make_harness("memory")
    c = hm.coord(max_models=5)
    cl = hm.client(c.endpoint)
    for i in range(40):  # one client id hopping across model names
        cl.register("subscriber", f"m{i}", client_id="hopper")
        wait_until(lambda: len(cl.status()["models"]) <= 2, what="empty models forgotten")
    cl.deregister("hopper")
    wait_until(lambda: not cl.status()["models"], what="the last model forgotten")
    pub = cl.register("publisher", "kept", client_id="pub")["client_id"]
    cl.publish(pub, "kept", b"m")
    cl.deregister(pub)
    for i in range(4):
        cl.register("subscriber", f"x{i}", client_id=f"c{i}")
    with pytest.raises(CoordinatorError, match=r"already has 5 models \(limit 5\)") as ei:
        cl.register("subscriber", "one-too-many", client_id="c9")
    assert ei.value.code == "too_many_models"
    assert "kept" in cl.status()["models"]  # a model with a version keeps its history


def test_meta_and_handle_payloads_are_checked(hm):
    c, cl, pub, subs = _setup(hm, n_subs=1)
    with pytest.raises(CoordinatorError, match=r"'meta'=.*expected a map of at most 65536 packed"):
        cl.publish(pub, "m", b"m", meta={"blob": b"x" * (100 << 10)})
    with pytest.raises(CoordinatorError, match=r"its 'payload' is None, expected a map"):
        cl.publish(pub, "m", b"m", handles=[{"consumers": subs}])


def test_one_connection_cannot_park_every_long_poll(hm):
    c, cl, pub, subs = _setup(hm, n_subs=1)
    with raw_socket(c.endpoint) as s:
        poll = request_bytes("events", {"model": "nothing", "wait_ms": 30_000})
        for _ in range(64):  # parked: model "nothing" has no events for 30 s
            s.send_multipart([poll])
        r = raw_call(s, poll)
        assert r["error"]["code"] == "busy" and "limit per connection" in r["error"]["message"]
        # another connection still parks, and is answered at its deadline
        assert cl.get_handles(subs[0], "m", wait_ms=300)["handles"] == []
