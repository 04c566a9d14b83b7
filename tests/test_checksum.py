# SPDX-License-Identifier: Apache-2.0
"""hw64 checksum: a NumPy reference, single-bit sensitivity, split invariance, CPU == CUDA."""

import numpy as np
import pytest
import torch

from hotweights import ops

from utils import cpu_and_cuda

K0, K1, K2, K3 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93
SEED = 0x68777765696768
M = (1 << 64) - 1


def ref_partial(data: bytes, base: int = 0) -> int:
    """Plain NumPy hw64 partial sum (Note [hw64 checksum])."""
    pad = (-len(data)) % 8
    w = np.frombuffer(data + b"\0" * pad, dtype="<u8")
    idx = np.arange(base, base + len(w), dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = w ^ (idx * np.uint64(K0))
        x = x * np.uint64(K1)
        x ^= x >> np.uint64(32)
        x = x * np.uint64(K2)
        x ^= x >> np.uint64(29)
    return int(x.sum(dtype=np.uint64))


def fmix(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M
    return h ^ (h >> 33)


def ref_digest(data: bytes) -> int:
    return fmix(ref_partial(data) ^ ((len(data) * K3) & M) ^ SEED)


SIZES = [0, 1, 7, 8, 9, 255, 4096, 4099, (4 << 20) + 3, (9 << 20) + 17]


@pytest.mark.parametrize("n", SIZES)
def test_matches_numpy_reference(n):
    g = torch.Generator().manual_seed(n)
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    want = ref_digest(t.numpy().tobytes())
    assert ops.checksum(t) == want
    assert ops.digest_host(t.data_ptr(), n) == want
    assert int(ops.checksum_batch([t])[0]) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_any_dtype_hashes_its_bytes(dtype):
    t = torch.zeros(1001, dtype=dtype)
    raw = t.view(torch.uint8)
    assert ops.checksum(t) == ops.checksum(raw) == ref_digest(raw.numpy().tobytes())


def test_every_single_bit_flip_changes_the_digest():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 256, (37,), dtype=torch.uint8, generator=g)
    d0 = ops.checksum(t)
    seen = {d0}
    for byte in range(t.numel()):
        for bit in range(8):
            u = t.clone()
            u[byte] ^= 1 << bit
            d = ops.checksum(u)
            assert d != d0, (byte, bit)
            seen.add(d)
    assert len(seen) == 37 * 8 + 1  # all distinct too


def test_swapped_words_and_length_matter():
    a = torch.arange(16, dtype=torch.int64)
    b = a.clone()
    b[[3, 4]] = b[[4, 3]]
    assert ops.checksum(a) != ops.checksum(b)
    z1, z2 = torch.zeros(8, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    assert ops.checksum(z1) != ops.checksum(z2)


def test_partial_sums_add_up_across_any_word_aligned_split():
    t = torch.randint(0, 256, (10007,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = ops.checksum(t)
    for cut in (8, 800, 8000, 10000):
        p = ops.hw64_partial(t.data_ptr(), cut, 0) + ops.hw64_partial(t.data_ptr() + cut, t.numel() - cut, cut // 8)
        assert ops.hw64_finalize(p, t.numel()) == whole


def test_batch_matches_singles_and_needs_contiguous():
    ts = [torch.randn(n) for n in (0, 1, 100, 70000)]
    got = ops.checksum_batch(ts)
    assert [int(x) for x in got] == [ops.checksum(t) for t in ts]
    with pytest.raises(ValueError, match="not contiguous"):
        ops.checksum(torch.randn(4, 4).t())


def test_batch_of_large_and_small_tensors_matches_the_reference():
    """hw64_digest_many cuts tensors into 1 MiB pieces and groups small ones per task: a mix
    of multi-MiB tensors (odd sizes) and small ones must still give each its own digest."""
    g = torch.Generator().manual_seed(7)
    sizes = [(5 << 20) + 13, 3, (1 << 20) - 8, 0, 4096, (2 << 20) + 1] + [100] * 70
    ts = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    got = ops.checksum_batch(ts)
    assert [int(x) for x in got] == [ref_digest(t.numpy().tobytes()) for t in ts]


@pytest.mark.cuda
def test_cpu_and_cuda_agree():
    g = torch.Generator().manual_seed(2)
    for n in SIZES:
        t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        assert ops.checksum(t.cuda()) == ops.checksum(t), n
    ts = [torch.randn(n, generator=g) for n in (3, 1000, 1 << 20)]
    assert list(ops.checksum_batch([t.cuda() for t in ts])) == list(ops.checksum_batch(ts))
    # unaligned views are hashed by their bytes too
    u = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g)
    assert ops.checksum(u[3:900].cuda()) == ops.checksum(u[3:900].contiguous())


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    t = torch.randn(33, device=device)
    torch.library.opcheck(torch.ops.hotweights.checksum.default, (t,))
    torch.library.opcheck(torch.ops.hotweights.checksum_batch.default, ([t, t[:5].clone()],))


def test_finalize_many_matches_the_scalar_finalize():
    rng = np.random.default_rng(5)
    sums = rng.integers(0, 2**64 - 1, size=500, dtype=np.uint64, endpoint=True)
    sums[:3] = [0, 2**64 - 1, 1]
    nbytes = rng.integers(0, 2**40, size=500)
    nbytes[:3] = [0, 1, 2**40]
    got = ops.finalize_many(sums, nbytes)
    want = [ops.hw64_finalize(int(s), int(n)) for s, n in zip(sums, nbytes)]
    assert got.dtype == np.uint64 and got.tolist() == want
    # whole tensors checked against a manifest: the mismatching indices, nothing else
    ts = [torch.randn(n) for n in (1, 7, 1000)]
    partials = np.array([ops.hw64_partial(t.data_ptr(), t.nbytes) for t in ts], np.uint64)
    sizes = np.array([t.nbytes for t in ts])
    sums_ok = np.array([ops.checksum(t) for t in ts], np.uint64)
    assert ops.mismatched(partials, sizes, sums_ok).size == 0
    sums_ok[1] ^= np.uint64(1)
    assert ops.mismatched(partials, sizes, sums_ok).tolist() == [1]
