# SPDX-License-Identifier: Apache-2.0
"""The replication pipeline with real processes: bit-identical updates, deltas, no torn reads,
killed subscribers and publishers, corrupted slots, late joiners, mismatched models."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

import hotweights
from hotweights import UpdateError, config
from hotweights.coordinator import Client, start_embedded
from hotweights.plan import Plan

from coord_helpers import wait_until
from replicate_children import make_model, publisher, subscriber, unpack
from utils import children, cpu_and_cuda, get_message, hotweights_fds

FAST = {"HOTWEIGHTS_HEARTBEAT_S": "0.2", "HOTWEIGHTS_DEAD_AFTER_S": "1.5",
        "HOTWEIGHTS_HANDLE_TTL": "3", "HOTWEIGHTS_VERSION_TIMEOUT_S": "60"}


@pytest.fixture
def fast_env(monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    config.reset()


@pytest.fixture
def coord(fast_env):
    c = start_embedded()
    yield c.endpoint
    c.stop()


def get(q, kind, timeout=120):
    """The next message of a kind, with children's packed states and outputs unpacked."""
    msg = get_message(q, kind, timeout)
    if kind in ("applied", "published"):
        msg = (*msg[:3], unpack(msg[3]), *msg[4:])
    if kind == "outputs":
        msg = (msg[0], msg[1], [torch.from_numpy(o) for o in msg[2]], msg[3])
    return msg


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].cpu().view(-1).view(torch.uint8), b[k].cpu().view(-1).view(torch.uint8))
        for k in a)


def snapshot(model):
    return {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_two_subscribers_bit_identical_delta_and_late_joiner(coord, device):
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    src = make_model(7, device=device)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, slots=3)
    specs = [{"swap": "storage", "versions": 3, "device": device},
             {"swap": "inplace", "versions": 3, "device": device}]
    try:
        with children(subscriber, coord, specs, q, stop):
            for _ in specs:
                get(q, "ready")
            # v1: everything
            r1 = pub.publish("full")
            total = sum(t.numel() * t.element_size() for t in src.state_dict().values())
            assert r1.bytes == total and r1.buckets > 3
            # same-node CPU subscribers read the source in place (Note [Direct reads])
            assert pub.stats["direct_buckets"] == (r1.buckets if device == "cpu" else 0)
            for _ in specs:
                _, i, v, state, nbytes, _t = get(q, "applied")
                assert v == r1.version and nbytes == total
                assert same_state(state, snapshot(src)), f"subscriber {i} differs after v1"
            # v2: one tensor changed -> exactly its bytes move
            with torch.no_grad():
                src[2].weight.mul_(-1.5)
            r2 = pub.publish("delta")
            changed = src[2].weight.numel() * 4
            assert r2.bytes == changed and r2.tensors == 1
            for _ in specs:
                _, i, v, state, nbytes, _t = get(q, "applied")
                assert v == r2.version and nbytes == changed
                assert same_state(state, snapshot(src))
            # a late subscriber receives the current version (a catch-up version)
            q2, stop2 = ctx.Queue(), ctx.Event()
            with children(subscriber, coord, [{"seed": 999, "versions": 1, "device": device}], q2, stop2):
                get(q2, "ready")
                _, _, v, state, nbytes, _t = get(q2, "applied", timeout=60)
                assert v > r2.version and nbytes == total
                assert same_state(state, snapshot(src))
            # the first two were served the catch-up too: an empty delta for them
            for _ in specs:
                _, i, v, state, nbytes, _t = get(q, "applied")
                assert nbytes == 0 and same_state(state, snapshot(src))
    finally:
        pub.close()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_no_torn_reads_under_repeated_updates(coord, device):
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    src = make_model(1, device=device)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=2048, slots=2)
    x = torch.linspace(-1, 1, 4 * 32, device=device).reshape(4, 32)
    expected = []
    loop = {"commit": "on_forward", "forward_loop": True, "device": device}
    try:
        with children(subscriber, coord, [{**loop, "swap": "storage"}, {**loop, "swap": "inplace"}],
                      q, stop):
            get(q, "ready"), get(q, "ready")
            for k in range(6):
                fresh = make_model(1000 + k)
                src.load_state_dict(fresh.state_dict())
                with torch.no_grad():
                    expected.append(src(x).cpu())
                pub.publish(f"v{k}")
                time.sleep(0.3)
            stop.set()
            for _ in range(2):
                _, i, outs, last = get(q, "outputs")
                assert len(outs) > 20
                versions_seen = set()
                for o in outs:
                    hits = [j for j, e in enumerate(expected) if torch.allclose(o, e, atol=1e-5, rtol=0)]
                    if not hits:  # the initial weights, before any update
                        assert torch.allclose(o, outs[0], atol=1e-5, rtol=0), \
                            f"subscriber {i}: an output matches no published version (torn read)"
                        assert not versions_seen, "initial-weight output after an update"
                        continue
                    assert len(hits) == 1
                    versions_seen.add(hits[0])
                assert len(versions_seen) >= 3  # it really saw several versions switch under it
    finally:
        pub.close()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("direct", ["auto", "off"])
def test_subscriber_killed_mid_transfer_others_commit(coord, monkeypatch, device, direct):
    """direct="off": through the ring, whose buckets go through the doorbell only (Note
    [Doorbell]): the dead subscriber's lane must not hold the slots."""
    if device != "cpu" and direct == "off":
        pytest.skip("a CUDA publisher streams through the ring by default already")
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    src = make_model(3, width=128, device=device)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, slots=3,
                               direct=direct)
    mid = ctx.Event()
    try:
        with children(subscriber, coord, [{"versions": 1, "width": 128, "device": device},
                                          {"versions": 1, "width": 128, "sleep_at_bucket": 3,
                                           "mid_event": mid, "device": device}],
                      q, stop) as procs:
            pids = dict(get(q, "ready")[1::2] for _ in range(2))
            t0 = time.monotonic()
            import threading

            result = {}
            th = threading.Thread(target=lambda: result.update(r=pub.publish("v1")))
            th.start()
            assert mid.wait(60)
            os.kill(pids[1], signal.SIGKILL)
            th.join(60)
            assert "r" in result, "publish did not finish after a subscriber died"
            assert result["r"].state == "committed"
            _, i, v, state, *_ = get(q, "applied")
            assert i == 0 and same_state(state, snapshot(src))
            assert procs[1].exitcode == -signal.SIGKILL or not procs[1].is_alive()
            # the dead subscriber's handles expire and every slot comes back
            end = time.monotonic() + 15
            while len(pub._free) != pub.slots and time.monotonic() < end:
                time.sleep(0.1)
            assert sorted(pub._free) == list(range(pub.slots))
            assert time.monotonic() - t0 < 60
            if direct == "off" and device == "cpu":  # the ring went through the doorbell
                assert pub.stats["doorbell_acks"] > 0 and not pub._rung
    finally:
        pub.close()
    gc.collect()
    assert hotweights_fds() == []  # the ring's memfd is gone with the publisher
    assert "hotweights:pub-m" not in open("/proc/self/maps").read()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("direct", ["auto", "off"])
def test_publisher_killed_mid_version_then_new_session(coord, device, direct):
    """direct="off": the subscriber waits on the dead publisher's doorbell (Note [Doorbell])
    when it dies; it still learns of the abort and drops the doorbell with the ring."""
    if device != "cpu" and direct == "off":
        pytest.skip("a CUDA publisher streams through the ring by default already")
    ctx = mp.get_context("spawn")
    q, stop, mid = ctx.Queue(), ctx.Event(), ctx.Event()
    model = make_model(55, device=device)
    h = model.register_hotweights(name="m", endpoint=coord, commit="manual", swap="storage")
    try:
        with children(publisher, coord, [{"sleep_at_bucket": 2, "mid_event": mid,
                                          "device": device, "direct": direct}],
                      q, stop) as procs:
            _, _, v1, pub_state = get(q, "published")
            h.wait(v1, timeout=30)
            assert same_state(snapshot(model), pub_state)
            if direct == "off" and device == "cpu":
                assert h._sub.stats["doorbell_takes"] > 0 and h._sub._doorbells
            stop.set()  # let the child start v2
            assert mid.wait(60)
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].join(10)
        client = Client(coord)
        end = time.monotonic() + 20
        while client.version("m")["state"] == "transferring" and time.monotonic() < end:
            time.sleep(0.1)
        info = client.version("m")
        assert info["state"] == "aborted" and "publisher" in info["reason"]
        time.sleep(0.5)
        assert h.version == v1 and h.staged_version is None
        assert same_state(snapshot(model), pub_state)  # the old version stays live
        end = time.monotonic() + 10
        while (h._sub._rings or len(h._sub._sources)) and time.monotonic() < end:
            # the dead publisher's ring (or storages it read directly) are unmapped
            time.sleep(0.1)
        assert not h._sub._rings and not len(h._sub._sources)  # nor its storages
        assert not h._sub._doorbells  # nor its doorbell
        # a new publisher session works (on CUDA: a ring this process exported itself)
        src = make_model(77, device=device)
        with hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096) as pub:
            r = pub.publish("new session")
            h.wait(r.version, timeout=30)
            assert same_state(snapshot(model), snapshot(src))
        client.close()
    finally:
        h.close()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_corrupted_slot_is_resent_never_applied(coord, device):
    src = make_model(11, device=device)
    dst = make_model(12, device=device)
    before = snapshot(dst)
    # the slots are what this test corrupts: the ring, not direct reads
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, slots=2,
                               direct="off")
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        def corrupt_once(b, slot, attempt):
            if b == 1 and attempt == 1:
                slot[100] ^= 0xFF

        pub.after_gather = corrupt_once
        r = pub.publish("v1")
        assert r.retries == 1
        h.wait(r.version, timeout=30)
        assert h._sub.stats["nacks"] == 1
        assert same_state(snapshot(dst), snapshot(src))
        # persistent corruption: the version aborts, the subscriber keeps what it had
        good = snapshot(dst)
        with torch.no_grad():
            src[0].weight.add_(1)

        def corrupt_always(b, slot, attempt):
            slot[0] ^= 0x01

        pub.after_gather = corrupt_always
        with pytest.raises(hotweights.PublishError, match="failed 3 times.*checksum mismatch"):
            pub.publish("v2")
        time.sleep(0.3)
        assert h.version == r.version and same_state(snapshot(dst), good)
        assert not same_state(snapshot(dst), before)
    finally:
        h.close()
        pub.close()


def test_mismatched_model_refuses_and_stays_untouched(coord):
    src = make_model(5)
    good = make_model(6)
    bad = make_model(6, width=48)  # different shapes
    bad_before = snapshot(bad)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    hg = good.register_hotweights(name="m", endpoint=coord, commit="manual")
    hb = bad.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        r = pub.publish("v1")
        assert r.state == "committed"
        hg.wait(r.version, timeout=30)
        assert same_state(snapshot(good), snapshot(src))
        with pytest.raises(UpdateError, match=r"model does not match the version: '0.weight': "
                                              r"the model has float32\(48, 32\), the version has float32\(64, 32\)"):
            hb.wait(r.version, timeout=10)
        assert same_state(snapshot(bad), bad_before) and hb.version is None
        info = Client(coord).version("m", r.version)
        assert hb.client_id in info["rejected"]
    finally:
        hg.close()
        hb.close()
        pub.close()


def test_a_failed_receive_refuses_that_version_only(coord):
    """An unexpected error while receiving (here a hook that raises once) refuses that version
    and leaves the subscriber's weights untouched; its receiver keeps serving the next one."""
    src = make_model(5)
    m = make_model(6)
    before = snapshot(m)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    calls = []

    def boom(b):
        calls.append(b)
        if len(calls) == 1:
            raise RuntimeError("injected receive failure")

    h._sub.before_scatter = boom
    try:
        with pytest.raises(hotweights.PublishError, match="rejected by every live"):
            pub.publish("v1", timeout=30)
        assert same_state(snapshot(m), before) and h.version is None
        assert "injected receive failure" in Client(coord).version("m", 1)["rejected"][h.client_id]
        r = pub.publish("v2", timeout=30)
        assert r.state == "committed"
        assert h.wait(r.version, timeout=30) == r.version
        assert same_state(snapshot(m), snapshot(src))
    finally:
        h.close()
        pub.close()


def test_an_error_after_staging_does_not_refuse_a_committed_version(coord):
    """Once a version is staged (committed) a later error in the receiver's housekeeping is
    logged, not turned into a rejection of a version that will still be applied."""
    src, m = make_model(7), make_model(8)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")

    def housekeeping(alive=None):
        raise ConnectionError("injected: coordinator unreachable after the commit")

    h._sub._drop_dead_rings = housekeeping
    try:
        r = pub.publish("v1", timeout=30)
        assert h.wait(r.version, timeout=30) == r.version
        assert same_state(snapshot(m), snapshot(src))
        assert Client(coord).version("m", r.version)["rejected"] == {}
        r = pub.publish("v2", timeout=30)  # and the receiver goes on
        assert h.wait(r.version, timeout=30) == r.version
    finally:
        h.close()
        pub.close()


def test_a_version_applied_during_a_receive_never_leaves_a_wrong_delta(coord):
    """Note [Delta base]: v3 puts back v1's value of a tensor that v2 changed, while the
    subscriber (at v1, v2 staged) applies v2 during v3's receive. v3 is planned from v2, the
    version the subscriber holds, so it carries that tensor, and applied on top of v2 it
    gives the publisher's exact state. (Planned from the applied v1 it would not carry it.)"""
    src, m = make_model(21), make_model(22)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, serve_late=False)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        w1 = src[0].weight.detach().clone()
        with torch.no_grad():
            src[0].weight.add_(1.0)  # v2 changes 0.weight
        r2 = pub.publish("v2")
        h.wait(r2.version, timeout=30, apply=False)  # staged, not applied: still at v1
        assert h.version == 1
        assert Client(coord).get_client(h.client_id)["holds"] == 2
        applied_during = []

        def apply_v2_now(b):  # the subscriber's forward applies v2 while v3 is received
            if not applied_during:
                applied_during.append(h.commit())

        h._sub.before_scatter = apply_v2_now
        with torch.no_grad():
            src[0].weight.copy_(w1)  # v3: 0.weight back to v1's value
            src[4].bias.add_(1.0)
        r3 = pub.publish("v3")
        assert r3.state == "committed" and applied_during == [2]
        assert Plan.from_bytes(Client(coord).plan("m", r3.version)).bases[h.client_id] == 2
        assert h.wait(r3.version, timeout=30) == r3.version
        assert sorted(h.last_commit.changed) == ["0.weight", "4.bias"]
        assert same_state(snapshot(m), snapshot(src))
    finally:
        h.close()
        pub.close()


def test_staged_versions_merge_until_applied(coord):
    """A subscriber that applies nothing for three versions holds a chain of deltas, each
    planned from the one before (the version it holds); staging merges them tensor by
    tensor, and one commit applies the merged set: the publisher's exact state, with every
    tensor that changed since the applied version (a tensor changed and changed back
    included), and every byte that moved for them."""
    src, m = make_model(41), make_model(42)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, serve_late=False)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual", swap="storage")
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        w1 = src[0].weight.detach().clone()
        moved = 0
        for label, change in (("v2", lambda: src[0].weight.add_(1.0)),
                              ("v3", lambda: src[2].bias.add_(1.0)),
                              ("v4", lambda: (src[0].weight.copy_(w1), src[4].weight.mul_(2)))):
            with torch.no_grad():
                change()
            r = pub.publish(label)
            moved += r.bytes
            assert h.wait(r.version, timeout=30, apply=False) == r.version
        assert h.version == 1 and h.staged_version == 4
        bases = [Plan.from_bytes(Client(coord).plan("m", v)).bases[h.client_id] for v in (2, 3, 4)]
        assert bases == [1, 2, 3]
        assert h.commit() == 4
        assert sorted(h.last_commit.changed) == ["0.weight", "2.bias", "4.weight"]
        assert h.last_commit.bytes == moved
        assert same_state(snapshot(m), snapshot(src))
        assert Client(coord).get_client(h.client_id)["version"] == 4
    finally:
        h.close()
        pub.close()


def _lose_first_staging(h) -> list:
    """Makes the subscriber lose the next version it stages (a failure after its precommit);
    returns the list that gets that version."""
    real, lost = h._sub.on_staged, []

    def lose_once(staged):
        if not lost:
            lost.append(staged.version)
            raise RuntimeError("injected: the staging was lost")
        real(staged)

    h._sub.on_staged = lose_once
    return lost


@contextlib.contextmanager
def _held_forward(h):
    """A forward that runs until the block ends (it holds the forward lock)."""
    in_forward, leave = threading.Event(), threading.Event()

    def long_forward():
        h._lock.acquire_read()
        in_forward.set()
        leave.wait(30)
        h._lock.release_read()

    fwd = threading.Thread(target=long_forward, daemon=True)
    fwd.start()
    try:
        assert in_forward.wait(10)
        yield
    finally:
        leave.set()
        fwd.join(10)


def _commit_in_background(h, timeout: float):
    """Starts h.commit(timeout) in a thread and returns once it has taken the staged version:
    (the thread, a list that gets its result or its TimeoutError)."""
    outcome = []

    def commit():
        try:
            outcome.append(h.commit(timeout=timeout))
        except TimeoutError as e:
            outcome.append(e)

    c = threading.Thread(target=commit, daemon=True)
    c.start()
    end = time.monotonic() + 10
    while h.staged_version is not None and time.monotonic() < end:
        time.sleep(0.01)
    return c, outcome


@contextlib.contextmanager
def _reshapable():
    """A two-tensor dict source and a ParameterDict subscriber that accepts reshapes (manual
    commits, storage swaps) on their own embedded coordinator: (state, model, pub, h)."""
    state = {"x": torch.randn(4, 8), "y": torch.randn(3)}
    coord = hotweights.coordinator.start_embedded()
    model = torch.nn.ParameterDict({"x": torch.nn.Parameter(torch.zeros(4, 8)),
                                    "y": torch.nn.Parameter(torch.zeros(3))})
    pub = hotweights.Publisher(lambda: state, name="r", endpoint=coord.endpoint, serve_late=False)
    h = model.register_hotweights(name="r", endpoint=coord.endpoint, commit="manual",
                                  swap="storage", accept_reshape=True)
    try:
        yield state, model, pub, h
    finally:
        h.close()
        pub.close()
        coord.stop()


def test_a_lost_staging_is_followed_by_a_catch_up(coord):
    """Note [Delta base]: a subscriber whose staging of v2 was lost (a failure after its
    precommit) reports itself behind at once (applied(behind=True)); the publisher publishes a
    catch-up from v1 for it with no new publish from the trainer (before session 9 it waited
    for the next delta, refused it, and only then asked), and the subscriber reaches the
    publisher's exact state. The other subscriber, already current, receives nothing in it;
    the next delta reaches both."""
    src, m, other = make_model(23), make_model(24), make_model(25)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    h2 = other.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        v1 = pub.publish("v1").version
        h.wait(v1, timeout=30)
        h2.wait(v1, timeout=30)
        lost = _lose_first_staging(h)
        with torch.no_grad():
            src[0].weight.add_(1.0)
            src[4].bias.add_(1.0)
        r2 = pub.publish("v2")
        h2.wait(r2.version, timeout=30)
        wait_until(lambda: lost == [r2.version], what="v2's staging to be lost")
        catch_up = r2.version + 1  # published by the publisher's own thread
        assert h.wait(catch_up, timeout=30) == catch_up
        assert sorted(h.last_commit.changed) == ["0.weight", "4.bias"]
        assert same_state(snapshot(m), snapshot(src))
        assert h2.wait(catch_up, timeout=30) == catch_up
        assert h2.last_commit.bytes == 0
        assert same_state(snapshot(other), snapshot(src))
        assert not Client(coord).get_client(h.client_id)["behind"]
        with torch.no_grad():
            src[2].weight.add_(1.0)
        r4 = pub.publish("v4")
        assert h.wait(r4.version, timeout=30) == r4.version
        assert h2.wait(r4.version, timeout=30) == r4.version
        assert same_state(snapshot(m), snapshot(src)) and same_state(snapshot(other), snapshot(src))
    finally:
        h.close()
        h2.close()
        pub.close()


def test_a_delta_on_a_base_no_longer_held_is_dropped_when_applied(coord):
    """The last line of Note [Delta base]: a staged delta whose base is not the version
    applied (its predecessor's staging was lost) is dropped at the commit, never applied,
    and the subscriber asks for a catch-up."""
    from hotweights.replicate import StagedVersion

    src, m = make_model(43), make_model(44)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, serve_late=False)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        before = snapshot(m)
        bogus = {"0.weight": torch.full_like(m[0].weight, 7.0)}
        h._on_staged(StagedVersion(version=3, label=None, names=list(bogus), shadows=bogus,
                                   reshaped=[], timings={}, bytes=0, base=2))
        assert h.commit() is None and h.version == 1 and "planned as a delta" in h.refused[3]
        assert same_state(snapshot(m), before)
        assert Client(coord).get_client(h.client_id)["behind"]
    finally:
        h.close()
        pub.close()


def test_a_lost_ack_costs_a_lease_not_the_version(coord):
    """Acks of all but the last bucket go out from a helper thread; one that fails is counted
    and its handle runs out its lease (the publisher's slot comes back); the version commits
    and the weights are exact."""
    from hotweights.coordinator import CoordinatorError

    src, m = make_model(31), make_model(32)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, direct="off")
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    real, lost = h._sub.client.ack_handle, []

    def flaky(cid, hid, ok=True, error=None, precommit=False):
        if not precommit and not lost:
            lost.append(hid)
            raise CoordinatorError("unavailable", "injected: the ack was lost")
        return real(cid, hid, ok, error, precommit=precommit)

    h._sub.client.ack_handle = flaky
    try:
        r = pub.publish("v1", timeout=30)
        assert r.state == "committed" and r.buckets > 2 and len(lost) == 1
        assert h.wait(r.version, timeout=30) == r.version
        assert same_state(snapshot(m), snapshot(src))
        assert h._sub.stats["ack_failures"] == 1
        end = time.monotonic() + 10  # the lease (3 s here) gives the slot back
        while len(pub._free) < pub.slots and time.monotonic() < end:
            time.sleep(0.05)
        assert len(pub._free) == pub.slots
    finally:
        h.close()
        pub.close()


def test_consumer_sets_receive_only_their_tensors(coord):
    src = make_model(8)
    a, b = make_model(9), make_model(10)
    b_before = snapshot(b)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096)
    ha = a.register_hotweights(name="m", endpoint=coord, commit="manual", consumer=["0.*"])
    hb = b.register_hotweights(name="m", endpoint=coord, commit="manual", consumer=["4.weight"])
    try:
        r = pub.publish("v1")
        ha.wait(r.version, timeout=30)
        hb.wait(r.version, timeout=30)
        assert ha.last_commit.changed == ["0.weight", "0.bias"]
        assert hb.last_commit.changed == ["4.weight"]
        assert hb.last_commit.bytes == src[4].weight.numel() * 4
        sb = snapshot(b)
        assert torch.equal(sb["4.weight"], src[4].weight) and torch.equal(sb["4.bias"], b_before["4.bias"])
    finally:
        ha.close()
        hb.close()
        pub.close()


def test_version_change_tracking_sees_optimizer_steps_and_skips_the_rest(coord):
    src = make_model(21)
    dst = make_model(22)
    opt = torch.optim.AdamW(src[0].parameters(), lr=0.1, fused=True)  # fused: no version bump
    pub = hotweights.Publisher(src, name="m", endpoint=coord, change_tracking="version",
                               optimizers=[opt])
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        src(torch.randn(2, 32)).sum().backward()
        opt.step()
        with torch.no_grad():
            src[4].bias.add_(1)  # an in-place op bumps the version counter
        r = pub.publish("v2")
        assert r.tensors == 3  # 0.weight, 0.bias (optimizer), 4.bias (version counter)
        h.wait(r.version, timeout=30)
        assert same_state(snapshot(dst), snapshot(src))
        # nothing touched: nothing re-hashed, nothing sent
        r = pub.publish("v3")
        assert r.tensors == 0 and r.bytes == 0
        with pytest.raises(ValueError, match="change_tracking='magic'"):
            hotweights.Publisher(src, name="m2", endpoint=coord, change_tracking="magic")
    finally:
        h.close()
        pub.close()


def test_background_threads_survive_errors_in_callbacks_and_the_coordinator(coord):
    """A progress callback that raises does not stop the publisher's release thread (the
    version commits, the next publish works), and an error while serving late subscribers
    does not end the late-join thread: a subscriber that joins afterwards is still served."""
    src, m = make_model(51), make_model(52)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    late = None
    try:
        calls = []

        def progress(done, total):
            calls.append(done)
            raise RuntimeError("injected: a broken progress callback")

        r = pub.publish("v1", timeout=30, progress=progress)
        assert r.state == "committed" and calls
        assert h.wait(r.version, timeout=30) == r.version
        r = pub.publish("v2", timeout=30)
        assert h.wait(r.version, timeout=30) == r.version

        real, failed = pub._serve_laggards, []

        def flaky():
            if not failed:
                failed.append(1)
                raise ConnectionError("injected: coordinator unreachable")
            return real()

        pub._serve_laggards = flaky
        late_model = make_model(53)
        late = late_model.register_hotweights(name="m", endpoint=coord, commit="manual")
        got = late.wait(r.version + 1, timeout=30)  # the catch-up, after the failed attempt
        assert failed and got == r.version + 1
        assert same_state(snapshot(late_model), snapshot(src))
    finally:
        if late is not None:
            late.close()
        h.close()
        pub.close()


def test_rapid_deltas_with_forwards_at_any_time_never_drop_or_miss_a_tensor(coord):
    """Note [Delta base] under load: 12 deltas back to back (tensors changed, and changed back
    to older values), one subscriber applying on its forwards from another thread at any
    moment (during receives, between a staging and the next), another applying by hand only
    now and then (merging what it staged). In the end both hold the publisher's exact state,
    and no version was refused or dropped (planned from the applied version, as before the
    merge, the forward-applying subscriber dropped deltas here)."""
    import random

    src, fwd_model, manual_model = make_model(61), make_model(62), make_model(63)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, serve_late=False)
    fwd = fwd_model.register_hotweights(name="m", endpoint=coord, commit="on_forward")
    man = manual_model.register_hotweights(name="m", endpoint=coord, commit="manual",
                                           swap="storage")
    stop, errors = threading.Event(), []
    x = torch.randn(4, 32)

    def forwards():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    fwd_model(x)
                time.sleep(random.random() * 0.004)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=forwards, daemon=True)
    rng = random.Random(7)
    params = [p for p in src.parameters()]
    history = [[p.detach().clone() for p in params]]
    try:
        last = pub.publish("v1").version
        t.start()
        for i in range(12):
            with torch.no_grad():
                for p in rng.sample(params, 2):
                    p.add_(rng.choice([0.5, -0.25, 1.0]))
                if i % 3 == 2:  # one tensor back to an older version's value
                    j = rng.randrange(len(params))
                    params[j].copy_(history[rng.randrange(len(history))][j])
            history.append([p.detach().clone() for p in params])
            r = pub.publish(f"v{i + 2}", timeout=30)
            assert r.state == "committed"
            last = r.version
            if i % 4 == 3:
                man.commit()
        end = time.monotonic() + 30
        while fwd.version != last and time.monotonic() < end:
            time.sleep(0.01)
        stop.set()
        t.join(10)
        assert not errors and fwd.version == last
        assert man.wait(last, timeout=30) == last
        for model in (fwd_model, manual_model):
            assert same_state(snapshot(model), snapshot(src))
        assert fwd.refused == {} and man.refused == {}
    finally:
        stop.set()
        t.join(10)
        fwd.close()
        man.close()
        pub.close()


def test_on_commit_callbacks_may_run_forwards_that_apply_the_next_version(coord):
    """Callbacks run after the apply has finished (outside its lock): a callback whose
    forward finds the next version staged applies it (nested), instead of deadlocking."""
    src, m = make_model(71), make_model(72)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, serve_late=False)
    h = m.register_hotweights(name="m", endpoint=coord, commit="on_forward")
    seen, done = [], threading.Event()

    def on_commit(info):
        seen.append(info.version)
        if info.version == 1:
            with torch.no_grad():
                src[0].bias.add_(1.0)
            pub.publish("v2", timeout=30)  # staged while this callback runs
            with torch.no_grad():
                m(torch.randn(2, 32))  # its pre-hook applies v2

    h.on_commit(on_commit)

    def body():
        pub.publish("v1", timeout=30)
        h.wait(1, timeout=30, apply=False)
        with torch.no_grad():
            m(torch.randn(2, 32))  # applies v1; its callback applies v2
        done.set()

    t = threading.Thread(target=body, daemon=True)
    try:
        t.start()
        assert done.wait(60), "an on_commit callback's forward deadlocked the apply"
        assert seen == [1, 2] and h.version == 2
        assert same_state(snapshot(m), snapshot(src))
    finally:
        t.join(5)
        h.close()
        pub.close()


def test_a_subscriber_that_lost_its_first_staging_is_caught_up_in_full(coord):
    """Note [Delta base] with nothing applied yet: the staging of v1 (a full send) is lost;
    the request for a catch-up goes out at once without an applied version, and the catch-up
    is a full send; the next delta follows it."""
    src, m = make_model(81), make_model(82)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    lost = _lose_first_staging(h)
    try:
        assert pub.publish("v1").state == "committed"
        # staged in the receive thread after the commit: maybe just after publish() returned
        wait_until(lambda: lost == [1], what="the first staging to be lost")
        assert h.wait(2, timeout=30) == 2  # the catch-up, from nothing: in full
        assert same_state(snapshot(m), snapshot(src))
        assert h.last_commit.bytes == sum(t.numel() * 4 for t in src.state_dict().values())
        with torch.no_grad():
            src[2].bias.add_(1.0)
        r3 = pub.publish("v3")
        assert h.wait(r3.version, timeout=30) == r3.version
        assert same_state(snapshot(m), snapshot(src))
    finally:
        h.close()
        pub.close()


def test_a_reshape_staged_and_not_applied_takes_the_next_delta():
    """accept_reshape with a version staged and not applied: the next delta is checked
    against the staged shape, not the live one, merges, and one commit applies both."""
    with _reshapable() as (state, model, pub, h):
        h.wait(pub.publish("v1").version, timeout=30)
        state["x"] = torch.randn(6, 8)  # v2 reshapes x
        h.wait(pub.publish("v2").version, timeout=30, apply=False)
        assert tuple(model["x"].shape) == (4, 8)
        state["x"] = state["x"] + 1  # v3: new values, the staged shape
        state["y"] = state["y"] * 2
        r3 = pub.publish("v3")
        assert h.wait(r3.version, timeout=30, apply=False) == r3.version and h.refused == {}
        assert h.commit() == r3.version
        assert tuple(model["x"].shape) == (6, 8)
        assert torch.equal(model["x"].detach(), state["x"]) and torch.equal(model["y"].detach(), state["y"])
        assert [r[0] for r in h.last_commit.reshaped] == ["x"]


def test_an_apply_that_times_out_keeps_its_version_under_a_newer_one(coord):
    """commit(timeout) takes v2 and waits for a running forward; v3 (planned from v2) is
    staged meanwhile; the timed-out apply merges v2 back under v3 instead of losing it, and
    the next commit applies both exactly."""
    src, m = make_model(91), make_model(92)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, serve_late=False)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        with torch.no_grad():
            src[0].weight.add_(1.0)
        h.wait(pub.publish("v2").version, timeout=30, apply=False)
        with _held_forward(h):
            c, outcome = _commit_in_background(h, 2.0)  # it has taken v2
            with torch.no_grad():
                src[4].bias.add_(1.0)
            r3 = pub.publish("v3")
            assert Plan.from_bytes(Client(coord).plan("m", r3.version)).bases[h.client_id] == 2
            c.join(10)
            assert isinstance(outcome[0], TimeoutError) and h.version == 1
            assert h.staged_version == 3
        assert h.commit(timeout=10) == 3 and h.refused == {}
        assert sorted(h.last_commit.changed) == ["0.weight", "4.bias"]
        assert same_state(snapshot(m), snapshot(src))
    finally:
        h.close()
        pub.close()


def test_a_reshape_being_applied_still_takes_the_next_delta():
    """While an apply holds a staged reshape (waiting for a running forward), the next delta
    is checked against that held shape, not the live one."""
    with _reshapable() as (state, model, pub, h):
        h.wait(pub.publish("v1").version, timeout=30)
        state["x"] = torch.randn(6, 8)
        h.wait(pub.publish("v2").version, timeout=30, apply=False)
        with _held_forward(h):
            c, _ = _commit_in_background(h, 20)  # it has taken v2, waits for the forward
            state["x"] = state["x"] + 1
            r3 = pub.publish("v3")
            assert r3.state == "committed" and h.wait(r3.version, timeout=30, apply=False) == 3
        c.join(20)
        assert h.version == 2 and h.commit() == 3 and h.refused == {}
        assert torch.equal(model["x"].detach(), state["x"])

