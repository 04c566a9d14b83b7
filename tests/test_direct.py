# SPDX-License-Identifier: Apache-2.0
"""Direct reads (Note [Direct reads] in hotweights/replicate.py): same-node CPU subscribers copy
straight from the publisher's tensors, moved once into shared memory in place."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import time

import pytest
import torch

import hotweights
from hotweights import config, ipc, ops

from replicate_children import make_model, subscriber, unpack
from utils import children, get_message


@pytest.fixture
def coord(monkeypatch):
    for k, v in {"HOTWEIGHTS_HEARTBEAT_S": "0.2", "HOTWEIGHTS_DEAD_AFTER_S": "1.5",
                 "HOTWEIGHTS_HANDLE_TTL": "3", "HOTWEIGHTS_VERSION_TIMEOUT_S": "60"}.items():
        monkeypatch.setenv(k, v)
    config.reset()
    c = hotweights.coordinator.start_embedded()
    yield c.endpoint
    c.stop()
    config.reset()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].detach().reshape(-1).view(torch.uint8), b[k].detach().reshape(-1).view(torch.uint8))
        for k in a)


def snap(model) -> dict:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


# ------------------------------------------------------------------ the two ends


def test_share_keeps_aliases_and_maps_read_only():
    flat = torch.arange(3000, dtype=torch.float32)
    lin = torch.nn.Linear(40, 30)
    ts = [lin.weight.data, lin.bias.data, flat[:1000], flat[1000:2500]]
    ref = [t.clone() for t in ts]
    lay = ipc.share_host_tensors(ts)
    assert len(lay["st"]) == 3 and lay["sidx"].tolist() == [0, 1, 2, 2]
    assert lay["soff"].tolist() == [0, 0, 0, 4000]
    assert all(torch.equal(a, b) for a, b in zip(ts, ref))  # moved, not changed
    assert lin.weight.untyped_storage().is_shared() and flat.is_shared()
    flat[1200] = -1.0  # an alias outside the shared list still writes the shared storage
    assert ts[3][200].item() == -1.0
    again = ipc.share_host_tensors(ts)  # already shared: same descriptors, nothing copied
    assert again["st"] == lay["st"]

    maps = ipc.SourceMaps()
    regions = [maps.region(lay["pid"], *st) for st in lay["st"]]
    dst = [torch.empty_like(t) for t in ts]
    ln = [t.numel() * 4 for t in ts]
    h = ops.scatter_regions(regions, lay["sidx"], lay["soff"], dst, lengths=ln,
                            tensor_offsets=[0] * 4, hash=True)
    assert all(torch.equal(a, b) for a, b in zip(dst, ts))
    assert [ops.tensor_digest([p], n) for p, n in zip(h.partials(), ln)] == [ops.checksum(t) for t in ts]
    # read-only: a subscriber can never write the trainer's weights (a write faults)
    code = ("import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "  # no core file
            "import torch; from hotweights import ipc; t = torch.zeros(1000); "
            "lay = ipc.share_host_tensors([t]); "
            "r = ipc.SourceMaps().region(lay['pid'], *lay['st'][0]); "
            "assert r[0].item() == 0; r.fill_(1)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGSEGV, res.stderr.decode()[-2000:]
    # a wrong inode (the fd now holds something else) is refused, not read
    fd, ino, n = lay["st"][0]
    with pytest.raises(ipc.HandleError, match="inode"):
        ipc.SourceMaps().region(lay["pid"], fd, ino + 12345, n)
    with pytest.raises(ipc.HandleError, match="cannot open"):
        ipc.SourceMaps().region(lay["pid"], 10**6, ino, n)
    maps.drop()
    assert len(maps) == 0


def test_share_refuses_what_it_cannot_move(monkeypatch):
    with pytest.raises(ipc.DirectUnavailable, match="not contiguous"):
        ipc.share_host_tensors([torch.zeros(4, 4).t()])
    import resource

    real = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit", lambda what: (300, 300) if what == resource.RLIMIT_NOFILE else real(what))
    with pytest.raises(ipc.DirectUnavailable, match="ulimit -n"):
        ipc.share_host_tensors([torch.zeros(2) for _ in range(200)])
    # a soft limit below the need is raised towards the hard limit instead
    raised = []
    monkeypatch.setattr(resource, "getrlimit", lambda what: (300, 20000) if what == resource.RLIMIT_NOFILE else real(what))
    monkeypatch.setattr(resource, "setrlimit", lambda what, lim: raised.append(lim))
    ipc.share_host_tensors([torch.zeros(2) for _ in range(200)])
    assert raised and 456 <= raised[0][0] <= 20000 and raised[0][1] == 20000
    monkeypatch.setattr(resource, "getrlimit", real)
    monkeypatch.setattr(ipc, "MAX_DIRECT_STORAGES", 2)
    with pytest.raises(ipc.DirectUnavailable, match="3 storages"):
        ipc.share_host_tensors([torch.zeros(2) for _ in range(3)])


def test_scatter_regions_pieces_and_errors():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (4096,), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 255, (1024,), dtype=torch.uint8, generator=g)
    t = torch.zeros(628, dtype=torch.float64)  # 5024 bytes: 2 pieces from 2 regions
    h = ops.scatter_regions([a, b], [1, 0], [0, 96], [t, t], lengths=[1024, 4000],
                            tensor_offsets=[0, 1024], hash=True)
    raw = t.view(torch.uint8)
    assert torch.equal(raw[:1024], b) and torch.equal(raw[1024:], a[96:])
    assert ops.tensor_digest(h.partials(), 5024) == ops.checksum(t)
    with pytest.raises(ValueError, match="names region 2"):
        ops.scatter_regions([a, b], [2], [0], [t], lengths=[8], tensor_offsets=[0])
    with pytest.raises(ValueError, match="runs past region 1"):
        ops.scatter_regions([a, b], [1], [1000], [t], lengths=[100], tensor_offsets=[0])
    with pytest.raises(ValueError, match="outside its tensor"):
        ops.scatter_regions([a], [0], [0], [t], lengths=[16], tensor_offsets=[5112])
    with pytest.raises(ValueError, match="not a multiple of 8"):
        ops.scatter_regions([a], [0], [0], [t], lengths=[8], tensor_offsets=[4], hash=True)


# ------------------------------------------------------------------ the pipeline


def test_an_error_starting_a_read_ahead_fails_the_version_at_its_turn(coord):
    """Note [Read-ahead]: the reads behind the current handle start early; an error in
    starting one (here the test hook, raising for the third bucket) refuses the version
    when that bucket's turn comes, after the reads before it were finished, and no read of
    the abandoned version outlives it: the next version arrives whole."""
    src, dst = make_model(3), make_model(4)
    before = snap(dst)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, direct="on")
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    order = []

    def hook(b):
        order.append(b)
        if b == 2 and len(order) <= 3:
            raise RuntimeError("injected start failure")

    h._sub.before_scatter = hook
    try:
        with pytest.raises(hotweights.PublishError, match="rejected by every live"):
            pub.publish("v1", timeout=30)
        assert order[:3] == [0, 1, 2]  # started ahead of bucket 0's check
        assert h._sub.stats["read_ahead"] >= 2 and h.version is None
        assert same(snap(dst), before)
        reason = hotweights.coordinator.Client(coord).version("m", 1)["rejected"][h.client_id]
        assert "injected start failure" in reason
        r = pub.publish("v2", timeout=30)
        assert h.wait(r.version, timeout=30) == r.version
        assert same(snap(dst), snap(src)) and not h._sub._stuck
    finally:
        h.close()
        pub.close()


def test_direct_updates_follow_aliases_and_replaced_parameters(coord):
    src, dst = make_model(1), make_model(2)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, direct="on")
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        assert pub.direct and all(p.untyped_storage().is_shared() for p in src.parameters())
        r = pub.publish("v1")
        h.wait(r.version, timeout=30)
        assert same(snap(dst), snap(src)) and pub.stats["direct_buckets"] == r.buckets
        assert h._sub.stats["direct_buckets"] == r.buckets and not h._sub._rings
        # the handles come with the version: the reads behind the first start before it is
        # checked (Note [Read-ahead]), and every one of them is checked
        assert r.buckets > 2 and h._sub.stats["read_ahead"] >= 1
        # a replaced parameter (new, unshared storage) is moved at the next publish
        with torch.no_grad():
            src[0].weight = torch.nn.Parameter(torch.randn_like(src[0].weight))
        assert not src[0].weight.untyped_storage().is_shared()
        r = pub.publish("v2")
        h.wait(r.version, timeout=30)
        assert same(snap(dst), snap(src)) and src[0].weight.untyped_storage().is_shared()
        assert r.tensors == 1
        # the replaced storage is freed by the publisher: the subscriber unmaps it
        live = len({p.untyped_storage()._cdata for p in src.parameters()})
        end = time.monotonic() + 10
        while len(h._sub._sources) != live and time.monotonic() < end:
            time.sleep(0.05)
        assert len(h._sub._sources) == live
    finally:
        h.close()
        pub.close()


def test_a_new_publisher_in_the_same_process_keeps_the_mappings(coord):
    """Publisher sessions one after another in one process share its pid: when a subscriber
    learns the first is gone it must not unmap what the second one is serving."""
    src, dst = make_model(11), make_model(12)
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    first = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096, direct="on")
    try:
        h.wait(first.publish("v1").version, timeout=30)
        first_id = first.client_id
        first.close()
        second = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096,
                                      direct="on")
        try:
            with torch.no_grad():
                src[0].weight.add_(1.0)
            r = second.publish("v2")
            h.wait(r.version, timeout=30)
            assert same(snap(dst), snap(src))
            end = time.monotonic() + 10  # the liveness check runs after the version is staged
            while first_id in h._sub._source_pids and time.monotonic() < end:
                time.sleep(0.05)
            assert first_id not in h._sub._source_pids
            live = len({p.untyped_storage()._cdata for p in src.parameters()})
            assert len(h._sub._sources) == live  # still mapped: nothing to open again
            with torch.no_grad():
                src[0].bias.add_(1.0)
            h.wait(second.publish("v3").version, timeout=30)
            assert same(snap(dst), snap(src))
        finally:
            second.close()
    finally:
        h.close()


def test_source_modified_during_direct_read_aborts_never_applies(coord):
    src, dst = make_model(3), make_model(4)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096)
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        r = pub.publish("v1")
        h.wait(r.version, timeout=30)
        good = snap(dst)
        with torch.no_grad():
            src[0].weight.add_(1.0)
            src[0].bias.add_(1.0)

        def tamper(b, slot, attempt):  # the trainer writes after the manifest was hashed
            assert slot is None  # a direct read: no slot
            with torch.no_grad():
                victim.view(-1)[0] += 1.0

        pub.after_gather = tamper
        # a tensor whole in one bucket: that bucket's read fails, is re-sent, then aborts
        victim = src[0].bias
        with pytest.raises(hotweights.PublishError, match="failed 3 times.*does not match its manifest"):
            pub.publish("torn")
        time.sleep(0.3)
        assert h.version == r.version and same(snap(dst), good)  # nothing applied
        # a tensor split over buckets: caught end to end, the subscriber refuses the version
        victim = src[0].weight
        assert src[0].weight.numel() * 4 > 4096
        with pytest.raises(hotweights.PublishError, match="rejected"):
            pub.publish("torn, split")
        time.sleep(0.3)
        assert h.version == r.version and same(snap(dst), good)
        assert any("arrived with checksum" in why for _, why in h._sub.errors)
        pub.after_gather = None
        r3 = pub.publish("v3")
        h.wait(r3.version, timeout=30)
        assert same(snap(dst), snap(src))
    finally:
        h.close()
        pub.close()


def test_unmappable_subscriber_falls_back_to_the_ring(coord):
    src, dst = make_model(5), make_model(6)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=4096)
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")

    def refuse(pid, fd, ino, nbytes):  # as from another pid namespace
        raise ipc.HandleError(f"cannot open /proc/{pid}/fd/{fd}: No such file or directory")

    h._sub._sources.region = refuse
    try:
        r = pub.publish("v1")  # aborted after the nack, published again through the ring
        h.wait(r.version, timeout=30)
        assert same(snap(dst), snap(src))
        first = hotweights.coordinator.Client(coord).version("m", r.version - 1)
        assert first["state"] == "aborted" and "direct read unavailable" in first["reason"]
        assert r.retries == 0 and h._sub.stats["nacks"] >= 1
        assert h._sub.stats["direct_buckets"] == 0
        assert pub._no_direct == {h._sub.client_id}
        with torch.no_grad():
            src[2].bias.add_(1)
        direct_before = pub.stats["direct_buckets"]
        r2 = pub.publish("v2")  # straight through the ring now: no failed attempt first
        h.wait(r2.version, timeout=30)
        assert r2.version == r.version + 1 and pub.stats["direct_buckets"] == direct_before
        assert same(snap(dst), snap(src))
    finally:
        h.close()
        pub.close()


def test_direct_setting_is_validated(coord, monkeypatch):
    src = make_model(1)
    with pytest.raises(ValueError, match="direct='sometimes'"):
        hotweights.Publisher(src, name="m", endpoint=coord, direct="sometimes")
    monkeypatch.setattr(ipc, "MAX_DIRECT_STORAGES", 1)
    with pytest.raises(ValueError, match="direct='on' but .*storages"):
        hotweights.Publisher(src, name="m", endpoint=coord, direct="on")
    with hotweights.Publisher(src, name="m", endpoint=coord) as pub:  # auto: the ring
        assert not pub.direct
    monkeypatch.setenv("HOTWEIGHTS_DIRECT_READ", "maybe")
    config.reset()
    with pytest.raises(ValueError, match="HOTWEIGHTS_DIRECT_READ"):
        config.get()


def test_spawned_subscribers_read_directly(coord):
    """Across processes: two subscribers (storage swap and in-place) map the publisher's
    storages once and read two full versions from them."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    src = make_model(9, width=96)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192)
    specs = [{"swap": "storage", "versions": 2, "width": 96},
             {"swap": "inplace", "versions": 2, "width": 96}]
    try:
        with children(subscriber, coord, specs, q, stop):
            for _ in specs:
                get_message(q, "ready", 120)
            for label in ("v1", "v2"):
                with torch.no_grad():
                    for p in src.parameters():
                        p.mul_(1.5)
                r = pub.publish(label)
                for _ in specs:
                    msg = get_message(q, "applied", 120)
                    assert msg[2] == r.version and same(unpack(msg[3]), snap(src))
            assert pub.stats["direct_buckets"] == 2 * r.buckets
    finally:
        pub.close()


def test_a_source_of_fresh_tensors_goes_back_to_the_ring(coord):
    """A callable that builds new tensors at every publish would make each direct version
    copy its source into shared memory first: after two such versions, the ring."""
    base, dst = make_model(8), make_model(9)
    pub = hotweights.Publisher(lambda: {k: v.clone() for k, v in base.state_dict().items()},
                               name="m", endpoint=coord, bucket_bytes=4096)
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        assert pub.direct
        counts = []
        for k in range(4):
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(1.0)
            r = pub.publish(f"v{k}")
            h.wait(r.version, timeout=30)
            assert same(snap(dst), snap(base))
            counts.append(pub.stats["direct_buckets"])
        assert not pub.direct and counts[1] > counts[0] > 0 and counts[1] == counts[2] == counts[3]
    finally:
        h.close()
        pub.close()


@pytest.mark.cuda
def test_cuda_direct_reads_same_gpu(coord):
    """CUDA direct reads (opt-in: direct="on"): a subscriber process on the publisher's GPU
    opens its storages over CUDA IPC once and reads two versions from them."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    src = make_model(21, width=96, device="cuda")
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, direct="on")
    try:
        with children(subscriber, coord, [{"device": "cuda", "versions": 2, "width": 96}], q, stop):
            get_message(q, "ready", 120)
            r1 = pub.publish("v1")
            msg = get_message(q, "applied", 120)
            assert msg[2] == r1.version and same(unpack(msg[3]), {k: v.cpu() for k, v in snap(src).items()})
            assert pub.stats["direct_buckets"] == r1.buckets
            with torch.no_grad():
                src[2].weight.mul_(-2.0)
            r2 = pub.publish("v2")
            msg = get_message(q, "applied", 120)
            assert msg[2] == r2.version and r2.tensors == 1
            assert same(unpack(msg[3]), {k: v.cpu() for k, v in snap(src).items()})
    finally:
        pub.close()


@pytest.mark.cuda
def test_cuda_bucket_defaults_for_large_models(coord, monkeypatch):
    """A CUDA source of 1 GB or more gets 256 MiB buckets in a ring of at most 4 slots and
    1 GiB direct buckets; an explicit bucket size (setting or argument) keeps its own; a small
    CUDA model and any CPU model keep the configured defaults."""
    from hotweights import replicate

    big = {"w": torch.empty(1 << 28, device="cuda")}  # 1 GiB of fp32
    with hotweights.Publisher(big, name="big", endpoint=coord) as pub:
        assert (pub.bucket_bytes, pub.slots) == (replicate.CUDA_BUCKET_BYTES, replicate.CUDA_SLOTS)
        assert pub._direct_bucket_bytes == replicate.CUDA_DIRECT_BUCKET_BYTES
        assert pub.ring.slot_bytes == replicate.CUDA_BUCKET_BYTES
    with hotweights.Publisher(big, name="big2", endpoint=coord, bucket_bytes=64 << 20) as pub:
        assert pub.bucket_bytes == 64 << 20 and pub.slots == config.get().ipc_max_inflight
    monkeypatch.setenv("HOTWEIGHTS_BUCKET_MB", "32")
    config.reset()
    try:
        with hotweights.Publisher(big, name="big3", endpoint=coord) as pub:
            assert pub.bucket_bytes == 32 << 20
    finally:
        monkeypatch.delenv("HOTWEIGHTS_BUCKET_MB")
        config.reset()
    small = {"w": torch.empty(1024, device="cuda")}
    with hotweights.Publisher(small, name="small", endpoint=coord) as pub:
        assert pub.bucket_bytes == config.get().bucket_bytes
    with hotweights.Publisher({"w": torch.empty(1 << 28)}, name="cpu", endpoint=coord,
                              direct="off") as pub:
        assert pub.bucket_bytes == config.get().bucket_bytes


@pytest.mark.cuda
def test_cuda_direct_is_opt_in(coord):
    """CUDA direct reads stay opt-in: "auto" does not pick them."""
    src = make_model(1, device="cuda")
    with hotweights.Publisher(src, name="m", endpoint=coord) as pub:
        assert not pub.direct
