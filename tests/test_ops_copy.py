# SPDX-License-Identifier: Apache-2.0
"""The chunked multi-stream copy engine against plain torch, on CPU and CUDA."""

import pytest
import torch

from hotweights import config, ops

from utils import cpu_and_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64,
          torch.bool, torch.complex64, torch.uint8]
SIZES = [0, 1, 7, 13, 4097, (1 << 20) + 5]


def same(a, b):
    """Bitwise equality (random bytes viewed as floats include NaNs)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _rand(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=g)
    return raw.view(dtype).to(device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_copy_any_dtype_and_size(device, dtype):
    srcs = [_rand(n, dtype, device, seed=i) for i, n in enumerate(SIZES)]
    dsts = [torch.empty_like(s) for s in srcs]
    ops.copy_(dsts, srcs)
    for s, d in zip(srcs, dsts):
        assert same(s, d)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_larger_than_chunk_and_many_small(device, monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_IPC_COPY_CHUNK_MB", "1")
    monkeypatch.setenv("HOTWEIGHTS_IPC_COPY_STREAMS", "3")
    config.reset()
    big = _rand((5 << 20) + 3, torch.uint8, device)
    small = [_rand(i % 97, torch.float32, device, seed=i) for i in range(10_000)]
    dsts = [torch.empty_like(big)] + [torch.empty_like(s) for s in small]
    ops.copy_(dsts, [big] + small)
    assert torch.equal(dsts[0], big)
    assert all(same(a, b) for a, b in zip(dsts[1:], small))
    st = ops.copy_settings(big.device, big.device)
    assert (st.chunk_bytes, st.streams, st.source) == (1 << 20, 3, "env")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_async_handle_keeps_tensors_alive(device):
    src = _rand(3 << 20, torch.uint8, device)
    dst = torch.empty_like(src)
    h = ops.copy_([dst], [src], async_op=True)
    expected = src.clone()
    del src  # the handle holds a reference until the copy is done
    h.wait(timeout=60)
    assert h.done()
    assert same(dst, expected)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gather_scatter_roundtrip_with_digest(device):
    ts = [_rand(n, torch.float32, device, seed=n) for n in (5, 1000, 3, 70000, 0)]
    offsets, off = [], 0
    for t in ts:
        offsets.append(off)
        off += (t.numel() * 4 + 255) // 256 * 256
    buf = torch.zeros(off, dtype=torch.uint8, device=device)
    dg = ops.gather(buf, ts, offsets, hash=True).digest()
    for t, o in zip(ts, offsets):  # bytes landed where asked
        assert same(buf[o:o + t.numel() * 4], t.view(torch.uint8))
    out = [torch.empty_like(t) for t in ts]
    ds = ops.scatter(buf, out, offsets, hash=True).digest()
    assert dg == ds
    assert all(same(a, b) for a, b in zip(ts, out))
    # whole-tensor pieces: each partial is its tensor's checksum before finalisation
    h = ops.scatter(buf, out, offsets, hash=True)
    for p, t in zip(h.partials(), ts):
        assert ops.tensor_digest([p], t.numel() * 4) == ops.checksum(t)
    assert dg == ops.bucket_digest(h.partials(), [t.numel() * 4 for t in ts])
    # a corrupted byte in the buffer changes the receiver's digest
    buf[offsets[1] + 17] ^= 0x40
    assert ops.scatter(buf, out, offsets, hash=True).digest() != dg


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_hashed_batches_in_flight_read_back_in_any_order(device):
    """A subscriber's read-ahead (Note [Read-ahead]) has several hashed batches in flight and
    reads the first one's partial sums while later ones still run: every batch's partials are
    its own, whichever is read first, and match the checksums of plain torch copies."""
    srcs = [[_rand(n, torch.float32, device, seed=10 * j + n) for n in (3, 4099, 1 << 20)]
            for j in range(4)]
    outs = [[torch.empty_like(t) for t in ts] for ts in srcs]
    bufs = []
    for ts in srcs:
        buf = torch.empty(sum(t.numel() * 4 for t in ts), dtype=torch.uint8, device=device)
        off = 0
        for t in ts:
            buf[off:off + t.numel() * 4].copy_(t.view(torch.uint8))
            off += t.numel() * 4
        bufs.append(buf)
    offsets = [0, 12, 12 + 4099 * 4]
    handles = [ops.scatter(buf, out, offsets, hash=True, async_op=True)
               for buf, out in zip(bufs, outs)]
    for j in (0, 3, 1, 2):  # the first while the later ones may still be queued, then any order
        parts = handles[j].partials()
        assert [ops.tensor_digest([p], t.numel() * 4) for p, t in zip(parts, srcs[j])] == \
            [ops.checksum(t) for t in srcs[j]]
        assert all(same(a, b) for a, b in zip(outs[j], srcs[j]))


@pytest.mark.cuda
@pytest.mark.parametrize("spin_us", ["0", "5000"])
def test_cuda_batches_dropped_unread_leave_later_hashes_right(spin_us, monkeypatch):
    """Note [Batch completion]: a batch's partial sums reach a pinned host block before its
    event, and a batch dropped before it ended (an abandoned read-ahead) gives its block back
    at once: the batches that reuse the blocks still read their own sums, with the engine's
    wait polling first (5 ms) or sleeping at once (0)."""
    import gc

    monkeypatch.setenv("HOTWEIGHTS_SPIN_US", spin_us)
    config.reset()
    srcs = [_rand(n, torch.float32, "cuda", seed=n) for n in (5, 1 << 20, 3 << 20)]
    buf = torch.empty(sum(t.numel() * 4 for t in srcs), dtype=torch.uint8, device="cuda")
    offsets, off = [], 0
    for t in srcs:
        offsets.append(off)
        buf[off:off + t.numel() * 4].copy_(t.view(torch.uint8))
        off += t.numel() * 4
    want = [ops.checksum(t) for t in srcs]
    for round_ in range(3):
        outs = [[torch.empty_like(t) for t in srcs] for _ in range(6)]
        handles = [ops.scatter(buf, out, offsets, hash=True, async_op=True) for out in outs]
        del handles[::2]  # dropped while queued: their pinned blocks go back to the pool
        gc.collect()
        more = [ops.scatter(buf, out, offsets, hash=True, async_op=True) for out in outs[:3]]
        for h in handles + more:
            parts = h.partials()
            assert [ops.tensor_digest([p], t.numel() * 4) for p, t in zip(parts, srcs)] == want
        assert all(same(a, b) for a, b in zip(outs[1], srcs))
    with pytest.raises(ValueError, match="spin_ns=-1, expected 0..1e9"):
        from hotweights import _C
        _C.cuda.CudaCopyEngine(0, 2, 1 << 20, -1)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_a_batch_outlives_its_engine(device):
    """ops.set_link_classifier drops the cached engines while batches may be in flight: a
    batch keeps what it runs on (CUDA: its engine's streams) and still reads its hashes."""
    import gc

    src = [_rand(n, torch.float32, device, seed=n) for n in (7, 1 << 20)]
    buf = torch.empty(sum(t.numel() * 4 for t in src), dtype=torch.uint8, device=device)
    buf[:28].copy_(src[0].view(torch.uint8))
    buf[28:].copy_(src[1].view(torch.uint8))
    out = [torch.empty_like(t) for t in src]
    h = ops.scatter(buf, out, [0, 28], hash=True, async_op=True)
    old = ops._link_classifier
    ops.set_link_classifier(old)  # clears the engine cache
    gc.collect()
    parts = h.partials()
    assert [ops.tensor_digest([p], t.numel() * 4) for p, t in zip(parts, src)] == \
        [ops.checksum(t) for t in src]
    assert all(same(a, b) for a, b in zip(out, src))
    # and the next batch gets a fresh engine
    assert ops.scatter(buf, out, [0, 28], hash=True).digest() == h.digest()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_pieces_of_split_tensors(device):
    t = _rand(10_000, torch.uint8, device)
    buf = torch.zeros(8192, dtype=torch.uint8, device=device)
    ops.gather(buf, [t, t], [0, 4096], lengths=[4000, 4000], tensor_offsets=[0, 4000])
    assert torch.equal(buf[:4000], t[:4000]) and torch.equal(buf[4096:8096], t[4000:8000])
    out = torch.zeros_like(t)
    ops.scatter(buf, [out, out], [0, 4096], lengths=[4000, 4000], tensor_offsets=[0, 4000])
    assert torch.equal(out[:8000], t[:8000]) and not out[8000:].any()
    # the partials of a split tensor's pieces add up to the tensor's checksum
    buf2 = torch.zeros(12288, dtype=torch.uint8, device=device)
    h = ops.gather(buf2, [t, t, t], [0, 4096, 8192], lengths=[4000, 4000, 2000],
                   tensor_offsets=[0, 4000, 8000], hash=True)
    assert ops.tensor_digest(h.partials(), 10_000) == ops.checksum(t)


def test_errors_are_clear():
    a, b = torch.zeros(10), torch.zeros(10)
    with pytest.raises(ValueError, match="not contiguous"):
        ops.copy_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)])
    with pytest.raises(ValueError, match=r"pair 0: destination torch.float32\(10,\) does not match source torch.float16\(10,\)"):
        ops.copy_([a], [b.half()])
    with pytest.raises(ValueError, match="overlaps"):
        ops.copy_([a], [a])
    base = torch.zeros(100)
    with pytest.raises(ValueError, match="overlaps"):  # two destinations that overlap
        ops.copy_([base[0:10], base[5:15]], [a, b])
    with pytest.raises(ValueError, match="2 destinations but 1 sources"):
        ops.copy_([a, b], [a])
    buf = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="runs past the buffer of 64 bytes"):
        ops.gather(buf, [a], [32])
    with pytest.raises(ValueError, match="must be a contiguous 1-D uint8 tensor"):
        ops.gather(torch.zeros(16), [a], [0])
    with pytest.raises(ValueError, match="tensor offset 4 of piece 0 is not a multiple of 8"):
        ops.gather(buf, [torch.zeros(4)], [0], lengths=[4], tensor_offsets=[4], hash=True)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        ops.copy_([a], [[1.0] * 10])


@pytest.mark.cuda
def test_cuda_copy_refuses_overlaps_like_the_cpu_engine():
    a, b = torch.zeros(1000, device="cuda"), torch.ones(1000, device="cuda")
    with pytest.raises(ValueError, match="overlaps"):
        ops.copy_([a], [a])
    base = torch.zeros(4000, device="cuda")
    with pytest.raises(ValueError, match="overlaps"):
        ops.copy_([base[0:1000], base[500:1500]], [a, b])
    assert int(base.count_nonzero()) == 0  # nothing was copied


def test_sources_may_overlap_each_other():
    src = torch.arange(100, dtype=torch.float32)
    d1, d2 = torch.empty(60), torch.empty(60)
    ops.copy_([d1, d2], [src[:60], src[40:]])
    assert torch.equal(d1, src[:60]) and torch.equal(d2, src[40:])


def test_autotune_picks_per_link_and_env_wins(monkeypatch):
    cpu, d0, d1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    cfg = config.load({"HOTWEIGHTS_IPC_COPY_AUTOTUNE": "1"})
    assert ops.copy_settings(cpu, d0, cfg).source == "autotune:host_to_device"
    assert ops.copy_settings(d0, d0, cfg).chunk_bytes == 64 << 20
    assert ops.copy_settings(d0, d1, cfg).source == "autotune:peer"
    cfg = config.load({"HOTWEIGHTS_IPC_COPY_AUTOTUNE": "1", "HOTWEIGHTS_IPC_COPY_STREAMS": "5"})
    st = ops.copy_settings(d0, d1, cfg)
    assert st.streams == 5 and st.chunk_bytes == 16 << 20 and st.source == "env"
    ops.set_link_classifier(lambda a, b: "peer_nvlink")
    try:
        cfg = config.load({"HOTWEIGHTS_IPC_COPY_AUTOTUNE": "1"})
        assert ops.copy_settings(d0, d1, cfg) == ops.CopySettings(64 << 20, 4, "autotune:peer_nvlink")
    finally:
        ops.set_link_classifier(None)


@pytest.mark.cuda
def test_cuda_copy_is_ordered_on_the_current_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        src = torch.randn(1 << 22, device="cuda")
        src.mul_(3)  # queued work the copy must see
        dst = torch.empty_like(src)
        ops.copy_([dst], [src], async_op=True)
        dst.add_(1)  # queued after the copy on the same stream
    s.synchronize()
    torch.testing.assert_close(dst, src + 1)


@pytest.mark.cuda
def test_cuda_host_device_copies():
    h = torch.randn(1 << 20).pin_memory()
    d = torch.empty(1 << 20, device="cuda")
    ops.copy_([d], [h])
    back = torch.empty(1 << 20).pin_memory()
    ops.copy_([back], [d])
    assert torch.equal(back, h)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_copy_hashed_ranges_add_up_to_the_tensor_checksum(device):
    """Ranges of one tensor, copied in any order and split at multiples of 8 bytes into shared
    accumulators, hash to its checksum (what the checkpoint readers rely on)."""
    a = _rand(1001, torch.float32, device, seed=1)  # 4004 bytes: a ragged tail
    b = _rand(77, torch.bfloat16, device, seed=2)
    ab, bb = a.view(torch.uint8), b.view(torch.uint8)
    cuts = [0, 1000, 3000, 4004]
    srcs = [ab[cuts[i]:cuts[i + 1]] for i in (2, 0, 1)] + [bb]
    dsts = [torch.empty_like(s) for s in srcs]
    h = ops.copy_hashed(dsts, srcs, [3000, 0, 1000, 0], hash_index=[0, 0, 0, 1])
    p = h.partials()
    assert len(p) == 2
    assert ops.tensor_digest(p[:1], 4004) == ops.checksum(a)
    assert ops.tensor_digest(p[1:], bb.numel()) == ops.checksum(b)
    assert all(same(s, d) for s, d in zip(srcs, dsts))
    if device == "cpu":
        q = ops.hash_ranges(srcs, [3000, 0, 1000, 0], hash_index=[0, 0, 0, 1])
        assert q.tolist() == p.tolist()


def test_copy_hashed_errors_name_the_range():
    x = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"tensor offset 4 of piece 0 is not a multiple of 8"):
        ops.copy_hashed([torch.empty(8, dtype=torch.uint8)], [x[:8]], [4])
    with pytest.raises(ValueError, match=r"range 0: destination of 4 bytes, source of 8 bytes"):
        ops.copy_hashed([torch.empty(4, dtype=torch.uint8)], [x[:8]], [0])
    with pytest.raises(ValueError, match=r"destination 0 must be a 1-D uint8 view, got torch.float32"):
        ops.copy_hashed([torch.empty(2)], [x[:8]], [0])
    with pytest.raises(ValueError, match=r"1 ranges but 2 hash indices"):
        ops.hash_ranges([x], [0], hash_index=[0, 1])


# --- hostile arguments (session 9 review) ------------------------------------------------------

def test_a_handle_dropped_before_its_copy_ends_keeps_the_tensors_alive():
    """The engine holds raw pointers: a batch whose handle goes away unwaited (or a blocking
    call that timed out) must keep its tensors until it is done. Run in a child: the failure
    mode is a segfault."""
    import subprocess
    import sys

    code = """
import gc, torch
from hotweights import ops
n = 64 << 20
for _ in range(3):
    h = ops.copy_([torch.empty(n)], [torch.ones(n)], async_op=True)
    del h
    gc.collect()
    try:
        ops.copy_([torch.empty(n)], [torch.ones(n)], timeout=1e-6)
    except TimeoutError:
        pass
    gc.collect()
    junk = [torch.zeros(n) for _ in range(2)]  # reuse the freed memory meanwhile
ops.copy_([torch.empty(16)], [torch.ones(16)])  # a later batch prunes the finished ones
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_offsets_near_int64_max_are_refused_not_wrapped():
    buf = torch.zeros(64, dtype=torch.uint8)
    t = torch.zeros(8, dtype=torch.uint8)
    big = 2**63 - 4
    with pytest.raises(ValueError, match="runs past the buffer of 64 bytes"):
        ops.gather(buf, [t], [big], lengths=[8])
    with pytest.raises(ValueError, match="is outside its tensor of 8 bytes"):
        ops.gather(buf, [t], [0], lengths=[8], tensor_offsets=[big])
    with pytest.raises(ValueError, match="runs past the buffer of 64 bytes"):
        ops.scatter(buf, [t], [big], lengths=[8])
    with pytest.raises(ValueError, match="runs past region 0 of 64 bytes"):
        ops.scatter_regions([buf], [0], [big], [t], lengths=[8], tensor_offsets=[0])
    with pytest.raises(ValueError, match="runs past the buffer of 64 bytes"):
        ops.hash_pieces(buf, [8], [2**63 - 1], [8])
    with pytest.raises(ValueError, match="3 tensors but 3 lengths and 1 tensor offsets"):
        ops.gather(torch.zeros(64, dtype=torch.uint8), [t, t, t], [0, 8, 16], lengths=[8, 8, 8],
                   tensor_offsets=[0])


def test_wait_timeouts_mean_what_they_say():
    a = torch.ones(1 << 24)
    b = torch.empty_like(a)
    for t in (float("inf"), 1e30):  # wait without limit (they used to time out at once)
        ops.copy_([b], [a], async_op=True).wait(t)
        assert torch.equal(a, b)
    ops.copy_([b], [a], timeout=float("inf"))
    h = ops.copy_([b], [a], async_op=True)
    for bad in (float("nan"), -0.5):
        with pytest.raises(ValueError, match=r"timeout=.*expected None or a number of seconds >= 0"):
            h.wait(bad)
    h.wait()


def test_lazy_views_meta_tensors_and_non_tensors_are_refused_by_name():
    z = torch.randn(4, dtype=torch.complex64)
    for src, msg in ((z.conj(), r"lazy conjugate view; call .resolve_conj\(\)"),
                     (torch.randn(4)._neg_view(), r"lazy negative view; call .resolve_neg\(\)")):
        with pytest.raises(ValueError, match=msg):
            ops.copy_([torch.empty_like(src)], [src])
        with pytest.raises(ValueError, match=msg):
            ops.checksum_batch([src])
        with pytest.raises(ValueError, match=msg):
            ops.checksum(src)
    ok = z.conj().resolve_conj()
    d = torch.empty_like(ok)
    ops.copy_([d], [ok])
    assert torch.equal(d, z.conj())
    with pytest.raises(ValueError, match="is on the meta device"):
        ops.copy_([torch.empty(4)], [torch.empty(4, device="meta")])
    with pytest.raises(TypeError, match="checksum_batch: expected a torch.Tensor, got int"):
        ops.checksum_batch([1])
