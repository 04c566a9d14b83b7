# SPDX-License-Identifier: Apache-2.0
"""The same-node doorbell (Note [Doorbell], hotweights/doorbell.py): its atomics and futex
waits, lanes, post records and acks across real processes, and a ring update through it
against the coordinator-only path."""

import gc
import multiprocessing as mp
import os
import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import torch

import hotweights
from hotweights import _C, config
from hotweights.coordinator import start_embedded
from hotweights.doorbell import LANES, NACK, Doorbell, DoorbellError

from utils import hotweights_fds, spawned


def _post(db, slot, seq, version=3, bucket=None, mask=1, coordinated=False, hid=None):
    db.post(slot, seq, version=version, bucket=slot if bucket is None else bucket, attempt=1,
            used=100 + slot, digest=(0xF0 << 56) | slot, mask=mask,
            handle_id=hid or f"{seq:032x}", coordinated=coordinated)


# --------------------------------------------------------------------------- atomics


def test_region_atomics_check_offsets_and_timeouts():
    r = _C.ShmRegion.create(4096, "atomics")
    assert r.load64(8) == 0
    assert r.add64(8, 5) == 0 and r.add64(8, 2) == 5 and r.load64(8) == 7
    assert r.cas64(8, 7, 11) and not r.cas64(8, 7, 12) and r.load64(8) == 11
    r.store64(16, 2**64 - 1)
    assert r.load64(16) == 2**64 - 1  # the whole u64 range (digests, NACK)
    assert r.add32(64, 1) == 0 and r.load32(64) == 1
    assert r.wait32(64, 0, 1.0)  # the word differs already: returns at once
    assert not r.wait32(64, 1, 0.05)  # nobody rings: a timeout
    assert r.wake32(64) == 0
    for bad in (3, 4095, 4096, 1 << 40):
        with pytest.raises(ValueError, match=f"offset {bad}: expected a multiple of 8"):
            r.load64(bad)
    with pytest.raises(ValueError, match="offset 2: expected a multiple of 4"):
        r.add32(2, 1)
    with pytest.raises(ValueError, match="timeout_s=-1.*expected seconds"):
        r.wait32(64, 1, -1.0)


def test_a_spinning_wait_polls_then_sleeps_and_keeps_its_timeout():
    r = _C.ShmRegion.create(4096, "spin")
    assert r.wait32(64, 5, 1.0, 0.5)  # changed already: returns at once, spin or not
    t0 = time.monotonic()
    assert not r.wait32(64, 0, 0.05, 0.02)  # spins 20 ms, sleeps the rest: a timeout
    assert 0.045 <= time.monotonic() - t0 < 5.0
    t0 = time.monotonic()
    assert not r.wait32(64, 0, 0.01, 0.5)  # a spin longer than the timeout stops at it
    assert time.monotonic() - t0 < 5.0
    # a store during the spin, with no wake call until 10 s later, is seen by the polling
    # waiter (the late wake only keeps a waiter that slept from hanging the test)
    store = threading.Timer(0.01, lambda: r.add32(64, 1))
    wake = threading.Timer(10.0, lambda: r.wake32(64))
    store.start()
    wake.start()
    try:
        t0 = time.monotonic()
        assert r.wait32(64, 0, 30.0, 1.0) and r.load32(64) == 1
        assert time.monotonic() - t0 < 9.0
    finally:
        store.cancel()
        wake.cancel()
    for bad in (-1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="spin_s=.*expected seconds in \\[0, 1\\]"):
            r.wait32(64, 1, 0.1, bad)


def _waiter(i, handle, q):
    db = Doorbell.open(handle)
    seen = db.posted_count()
    q.put("waiting")
    q.put(("woken", db.wait_posted(seen, 60.0), db.posted_count()))
    db.close()


@pytest.mark.parametrize("spin_us", ["0", "2000"])
def test_a_post_wakes_a_waiter_in_another_process(spin_us, monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_SPIN_US", spin_us)  # the child polls 2 ms before it sleeps
    db = Doorbell.create(2)
    q = mp.get_context("spawn").Queue()
    with spawned(_waiter, db.handle(), q, timeout=60):
        assert q.get(timeout=60) == "waiting"
        time.sleep(0.2)  # (the child may or may not be asleep yet: both must work)
        _post(db, 0, db.next_seq())
        kind, woken, count = q.get(timeout=60)
    assert kind == "woken" and woken and count == 1
    # a publish is announced before its version exists, and the version rings when it starts
    assert not db.ring_next() and db.ring_version() == 0
    db.announce(ring=True)
    db.set_ring_version(7)
    assert db.ring_next() and db.ring_version() == 7 and db.posted_count() == 2
    db.announce(ring=False)
    assert not db.ring_next() and db.ring_version() == 7
    db.close()


# --------------------------------------------------------------------------- records


def _taker(i, handle, q, answers):
    """Claims a lane, then answers the posts of version 3 as ``answers`` says (by bucket)."""
    db = Doorbell.open(handle)
    lane = db.claim(f"sub-{i}")
    q.put(("lane", i, lane))
    taken, deadline = {}, time.monotonic() + 60
    while len(taken) < len(answers) and time.monotonic() < deadline:
        seen = db.posted_count()
        for r in db.take(3, set(taken)):
            taken[r["handle_id"]] = r
            db.ack(r["slot"], r["seq"], ok=answers[r["bucket"]])
        if len(taken) < len(answers):
            db.wait_posted(seen, 1.0)
    q.put(("taken", i, sorted((r["bucket"], r["slot"], r["used"], r["digest"], r["attempt"],
                               r["coordinated"]) for r in taken.values())))
    db.close()


def test_posts_reach_their_lanes_and_acks_come_back():
    """Two subscriber processes; each post is for one lane or both; acks and nacks come back
    as the publisher reads them (plain-Python reference: what each child was told to do)."""
    db = Doorbell.create(4)
    q = mp.get_context("spawn").Queue()
    answers = {0: True, 1: False, 2: True}
    with spawned(_taker, db.handle(), q, answers, n=2, timeout=60):
        lanes = dict(q.get(timeout=60)[1:] for _ in range(2))
        assert sorted(lanes.values()) == [0, 1]
        mask, have, every = db.lanes_of(["sub-0", "sub-1"])
        assert every and mask == 0b11 and sorted(have.tolist()) == [0, 1]
        mask1, have1, every1 = db.lanes_of(["sub-0", "nobody"])
        assert not every1 and mask1 == 1 << lanes[0] and have1.tolist() == [lanes[0]]
        _post(db, 3, 99, version=2)  # another version: nobody takes it
        seqs = {}
        for b in answers:
            seqs[b] = db.next_seq()
            _post(db, b, seqs[b], mask=mask, coordinated=(b == 2))
        got = {}
        for _ in range(2):
            _, i, recs = q.get(timeout=60)
            got[i] = recs
    want = [(b, b, 100 + b, (0xF0 << 56) | b, 1, b == 2) for b in answers]
    assert got == {0: want, 1: want}
    for b, ok in answers.items():
        words = db.answers(b, have).tolist()
        assert words == [seqs[b] if ok else seqs[b] | NACK] * 2
    db.close()


def test_only_a_posts_last_answer_rings_the_publisher():
    """With two lanes, the first verified answer does not wake the publisher, the second
    does; a nack always does (the publisher re-sends at once)."""
    db = Doorbell.create(2)
    a, b = Doorbell.open(db.handle()), Doorbell.open(db.handle())
    assert (a.claim("a"), b.claim("b")) == (0, 1)
    _post(db, 0, 5, mask=0b11)
    before = db.acked_count()
    assert not a.ack(0, 5) and db.acked_count() == before
    assert b.ack(0, 5) and db.acked_count() == before + 1
    assert db.answers(0, np.array([0, 1])).tolist() == [5, 5]
    _post(db, 1, 6, mask=0b11)
    assert a.ack(1, 6, ok=False)  # a nack rings at once
    assert b.ack(1, 6)  # the last answer (the other one a nack)
    _post(db, 0, 7, mask=0b01)
    assert a.ack(0, 7)  # the only lane of its post
    assert b.ack(0, 99)  # not its post's record any more: rings rather than guess
    for d in (a, b, db):
        d.close()


def test_take_skips_records_being_written_other_versions_and_taken_handles():
    db = Doorbell.create(3)
    sub = Doorbell.open(db.handle())
    assert sub.take(3, set()) == []  # no lane: nothing is for it
    assert sub.claim("me") == 0 and sub.claim("me") == 0  # claimed once
    _post(db, 0, 5, hid="aa" * 16)
    _post(db, 1, 4, hid="bb" * 16)  # an older post in a later slot: still first
    _post(db, 2, 6, version=4)
    assert [r["seq"] for r in sub.take(3, set())] == [4, 5]
    assert [r["handle_id"] for r in sub.take(3, {"aa" * 16})] == ["bb" * 16]
    # a record whose seqlock says "being written" is left for the next look
    rec_at = db._records_at
    db._r.store64(rec_at, 0)
    assert [r["seq"] for r in sub.take(3, set())] == [4]
    _post(db, 0, 7, mask=0b10)  # rewritten for another lane
    assert [r["seq"] for r in sub.take(3, set())] == [4]
    sub.close()
    db.close()


class _Racy:
    """A region whose first load64 comes after the publisher rewrote slot 0 for another lane
    (between a subscriber's unlocked scan and its seqlock read)."""

    def __init__(self, region, rewrite):
        self._region, self._rewrite, self._n = region, rewrite, 0

    def load64(self, off):
        self._n += 1
        if self._n == 1:
            self._rewrite()
        return self._region.load64(off)

    def __getattr__(self, name):
        return getattr(self._region, name)


def test_take_rechecks_the_lane_after_its_seqlock_read():
    db = Doorbell.create(1)
    sub = Doorbell.open(db.handle())
    assert sub.claim("me") == 0
    _post(db, 0, 5, mask=0b01)
    sub._r = _Racy(sub._r, lambda: _post(db, 0, 6, mask=0b10))  # now for lane 1 only
    assert sub.take(3, set()) == []
    sub._r = sub._r._region
    assert sub.take(3, set()) == []  # (and on the next look too)
    _post(db, 0, 7, mask=0b11)
    assert [r["seq"] for r in sub.take(3, set())] == [7]
    db.clear(0, 6)  # a settled post is withdrawn only if it is still the slot's record
    assert [r["seq"] for r in sub.take(3, set())] == [7]
    db.clear(0, 7)
    assert sub.take(3, set()) == []
    sub.close()
    db.close()


def _claim_and_die(i, handle, q):
    db = Doorbell.open(handle)
    q.put(("lane", db.claim("doomed")))
    time.sleep(3600)


def test_lanes_run_out_then_a_dead_holders_lane_is_taken_over():
    db = Doorbell.create(1)
    q = mp.get_context("spawn").Queue()
    with pytest.raises(AssertionError):  # the child is killed on purpose
        with spawned(_claim_and_die, db.handle(), q, timeout=1) as procs:
            assert q.get(timeout=60) == ("lane", 0)
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].join(30)
    subs = [Doorbell.open(db.handle()) for _ in range(LANES)]
    lanes = [s.claim(f"s{i}") for i, s in enumerate(subs)]
    # 63 free lanes, then lane 0 of the dead process
    assert lanes == list(range(1, LANES)) + [0]
    extra = Doorbell.open(db.handle())
    assert extra.claim("one too many") is None  # all held by live processes
    subs[5].close()  # gives its lane back
    assert extra.claim("one too many") == lanes[5]
    mask, have, every = db.lanes_of(["one too many", "s0"])
    assert every and mask == (1 << lanes[5]) | (1 << lanes[0])
    for s in subs + [extra]:
        s.close()
    assert db.lanes_of(["s0"])[2] is False
    db.close()


def test_bad_doorbell_handles_are_refused_by_name():
    db = Doorbell.create(2)
    with pytest.raises(DoorbellError, match="not valid msgpack"):
        Doorbell.open(b"\xc1garbage")
    with pytest.raises(DoorbellError, match="not a hotweights doorbell handle"):
        Doorbell.open(msgpack.packb({"magic": "hotweights.ring"}))
    info = msgpack.unpackb(db.handle())
    with pytest.raises(DoorbellError, match="does not match its handle"):
        Doorbell.open(msgpack.packb({**info, "slots": 3}))
    with pytest.raises(DoorbellError):
        Doorbell.open(msgpack.packb({**info, "raw": info["raw"][:20]}))
    with pytest.raises(ValueError, match="slots=0, expected 1..1024"):
        Doorbell.create(0)
    db.close()


# --------------------------------------------------------------------------- pipeline


@pytest.fixture
def fast(monkeypatch):
    for k, v in {"HOTWEIGHTS_HEARTBEAT_S": "0.2", "HOTWEIGHTS_DEAD_AFTER_S": "1.5",
                 "HOTWEIGHTS_HANDLE_TTL": "3"}.items():
        monkeypatch.setenv(k, v)
    config.reset()
    c = start_embedded()
    yield c.endpoint, monkeypatch
    c.stop()
    config.reset()


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])


def _bump(model, scale=1.0, shift=1.0):
    """Changes every parameter (a new version's content)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale).add_(shift)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _bell_publisher(src, endpoint, **over):
    """A ring publisher of 4 KiB buckets in 3 slots (direct reads off, no late serving)."""
    kw = dict(name="bell", endpoint=endpoint, bucket_bytes=4096, slots=3, direct="off",
              serve_late=False)
    kw.update(over)
    return hotweights.Publisher(src, **kw)


@pytest.mark.parametrize("bell", ["1", "0"])
def test_ring_updates_through_the_doorbell_match_the_coordinator_path(fast, bell):
    """The same versions through the ring with and without the doorbell: bit-exact either
    way; with it, every bucket but each version's last is taken and acked in shared memory
    (none of them reaches the coordinator), and a corrupted one is nacked there and re-sent."""
    endpoint, mp_ = fast
    mp_.setenv("HOTWEIGHTS_DOORBELL", bell)
    config.reset()
    src, dst = _model(1), _model(2)
    pub = _bell_publisher(src, endpoint)
    h = dst.register_hotweights(name="bell", endpoint=endpoint, commit="manual")
    try:
        for i in range(3):
            _bump(src, 1.5, 0.25)
            if i == 2:  # corrupt bucket 2 once
                pub.after_gather = lambda b, slot, a: slot.__setitem__(7, slot[7] ^ 0xFF) \
                    if b == 2 and a == 1 else None
            r = pub.publish(f"v{i}", timeout=60)
            h.wait(r.version, timeout=60)
            assert _same(src, dst)
        assert r.retries == 1 and h._sub.stats["nacks"] == 1
        buckets = r.buckets
        if bell == "1":
            assert pub.doorbell is not None
            # versions 2 and 3: the lane was claimed during version 1
            assert pub.stats["doorbell_acks"] >= 2 * (buckets - 1) - 1
            assert h._sub.stats["doorbell_takes"] >= 2 * (buckets - 1)
        else:
            assert pub.doorbell is None and pub.stats["doorbell_acks"] == 0
            assert h._sub.stats["doorbell_takes"] == 0
        assert sorted(pub._free) == list(range(pub.slots)) and not pub._rung
        # a new publisher session: a new ring and doorbell, a new lane in it
        pub.close()
        pub = _bell_publisher(src, endpoint)
        takes = h._sub.stats["doorbell_takes"]
        for i in range(2):
            _bump(src)
            r = pub.publish(f"session 2 v{i}", timeout=60)
            h.wait(r.version, timeout=60)
            assert _same(src, dst)
        if bell == "1":
            assert h._sub.stats["doorbell_takes"] - takes >= r.buckets - 1
            assert len(h._sub._doorbells) == 1  # the closed session's doorbell was dropped
    finally:
        h.close()
        pub.close()
    gc.collect()
    assert hotweights_fds() == []  # ring and doorbell memfds are gone


def test_a_silent_lane_expires_and_the_bucket_is_sent_again(fast):
    """A subscriber that takes a bucket through the doorbell and stays silent past the lease
    (HOTWEIGHTS_HANDLE_TTL=3) gets it again, as the coordinator's lease did; a failure inside
    the publisher's doorbell thread is logged and the next pass goes on."""
    endpoint, _ = fast
    src, dst = _model(3), _model(4)
    pub = _bell_publisher(src, endpoint)
    h = dst.register_hotweights(name="bell", endpoint=endpoint, commit="manual")
    try:
        r = pub.publish("v1", timeout=60)  # maps the ring, claims the lane
        h.wait(r.version, timeout=60)
        answers, broke = pub.doorbell.answers, []

        def fails_once(*a):
            if not broke:
                broke.append(1)
                raise RuntimeError("injected")
            return answers(*a)

        pub.doorbell.answers = fails_once
        slept = []

        def stall(b):
            if b == 2 and not slept:
                slept.append(b)
                time.sleep(4.5)

        h._sub.before_scatter = stall
        _bump(src)
        r = pub.publish("v2", timeout=60)
        h.wait(r.version, timeout=60)
        assert r.state == "committed" and _same(src, dst)
        assert pub.stats["expired"] >= 1 and r.retries >= 1
        assert pub.stats["doorbell_errors"] == 1 and broke
    finally:
        h.close()
        pub.close()


def test_a_late_voter_outside_a_smaller_quorum_still_reads_its_posts(fast):
    """quorum=1: the version commits when the fast subscriber precommits, while the slow one
    still holds back its second-to-last bucket; the slow one then finishes the committed
    version from the doorbell (a late vote) and applies it too."""
    endpoint, _ = fast
    src, fast_m, slow_m = _model(5), _model(6), _model(7)
    # a window and ring larger than the version: the slow one's read-ahead may hold back
    # the answers of the buckets before the one it stalls on, and a full window would stall
    # the fast one too
    cfg = config.load(ipc_max_inflight=64, ipc_inflight_buckets=64, ipc_adapt=False)
    pub = _bell_publisher(src, endpoint, slots=64, quorum=1, config=cfg)
    hf = fast_m.register_hotweights(name="bell", endpoint=endpoint, commit="manual")
    hs = slow_m.register_hotweights(name="bell", endpoint=endpoint, commit="manual")
    try:
        r = pub.publish("v1", timeout=60)  # both map the ring and claim lanes
        hf.wait(r.version, timeout=60)
        hs.wait(r.version, timeout=60)
        assert r.buckets < pub.slots
        stalled, released = [], threading.Event()

        def stall(b):
            if b == r.buckets - 2 and not stalled:
                stalled.append(b)
                released.wait(30)

        hs._sub.before_scatter = stall
        _bump(src)
        r2 = pub.publish("v2", timeout=60)  # committed by the fast one alone
        assert r2.state == "committed" and stalled and hs.version == r.version
        assert pub._rung  # the slow one's post is still held for it
        released.set()
        hf.wait(r2.version, timeout=60)
        hs.wait(r2.version, timeout=60)
        assert _same(src, fast_m) and _same(src, slow_m)
        assert hs._sub.stats["versions"] == 2 and not hs._sub.errors
        end = time.monotonic() + 30  # its answer frees the last slot
        while (pub._rung or len(pub._free) != pub.slots) and time.monotonic() < end:
            time.sleep(0.05)
        assert not pub._rung and sorted(pub._free) == list(range(pub.slots))
    finally:
        released.set()
        hs.close()
        hf.close()
        pub.close()


def test_a_decided_versions_leftover_posts(fast):
    """What the end of a version does with doorbell-only posts nobody answered yet: kept
    when it committed (answered, given up on or expired later, as the coordinator keeps its
    handles), freed and withdrawn when it aborted."""
    from hotweights.replicate import _Rung, _Transfer

    endpoint, _ = fast
    pub = _bell_publisher(_model(10), endpoint, slots=2)
    try:
        xfer = _Transfer(41, None)
        seq = pub.doorbell.next_seq()
        with pub._cv:
            pub._free.remove(1)
            pub._inflight["ab" * 16] = (1, 0, 100, time.perf_counter(), xfer, [])
            pub._rung["ab" * 16] = _Rung(1, seq, np.array([0]), ["someone"],
                                         time.perf_counter(), 41, 0)
        _post(pub.doorbell, 1, seq, version=41, hid="ab" * 16)
        pub._settle_rung(xfer, "committed")
        assert "ab" * 16 in pub._rung and 1 not in pub._free
        pub._settle_rung(xfer, "aborted")
        assert not pub._rung and sorted(pub._free) == [0, 1]
        assert pub.doorbell._r.load64(pub.doorbell._records_at + 128) == 0  # withdrawn
    finally:
        pub.close()


def test_an_aborted_version_frees_its_doorbell_slots(fast):
    """Persistent corruption aborts the version after three attempts; its posts still
    unanswered are freed at once (as the coordinator releases an aborted version's handles)
    and the next version goes through."""
    endpoint, _ = fast
    src, dst = _model(8), _model(9)
    pub = _bell_publisher(src, endpoint)
    h = dst.register_hotweights(name="bell", endpoint=endpoint, commit="manual")
    try:
        r = pub.publish("v1", timeout=60)
        h.wait(r.version, timeout=60)
        good = {k: v.clone() for k, v in dst.state_dict().items()}
        pub.after_gather = lambda b, slot, a: slot.__setitem__(0, slot[0] ^ 1) if b == 1 else None
        _bump(src)
        with pytest.raises(hotweights.PublishError, match="failed 3 times.*checksum mismatch"):
            pub.publish("v2", timeout=60)
        assert not pub._rung and sorted(pub._free) == list(range(pub.slots))
        assert all(torch.equal(good[k], v) for k, v in dst.state_dict().items())
        pub.after_gather = None
        r = pub.publish("v3", timeout=60)
        h.wait(r.version, timeout=60)
        assert _same(src, dst)
    finally:
        h.close()
        pub.close()
