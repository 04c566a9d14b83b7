# SPDX-License-Identifier: Apache-2.0
"""Slot rings across real processes: CPU shared memory always, CUDA IPC on one GPU when present."""

import gc
import multiprocessing as mp
import os
import signal

import msgpack
import pytest
import torch

from hotweights import ipc

from utils import cpu_and_cuda, hotweights_fds, spawned

SLOT = 1 << 16


def _pattern(slot: int, n: int = SLOT) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) * 31 + slot * 7).to(torch.uint8)


def _reader(i, handle, device, q):
    """Imports the ring, checks every slot the parent filled, writes an answer into slot 0."""
    if device == "cuda":
        torch.cuda.set_device(0)
    r = ipc.open_ring(handle, device)
    assert ipc.open_ring(handle, device) is r  # imported once per process
    for s in range(r.slots):
        r.wait(s)
        got = r.slot(s).cpu()
        q.put((s, bool(torch.equal(got, _pattern(s)))))
    r.slot(0)[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8, device=r.device)
    if device == "cuda":
        torch.cuda.synchronize()
    q.put("written")
    r.close()


def _filled_ring(device, slots: int) -> ipc.SlotRing:
    """A ring with each slot holding its _pattern, written and recorded."""
    ring = ipc.SlotRing(SLOT, slots, device)
    for s in range(slots):
        ring.slot(s).copy_(_pattern(s).to(ring.device))
        ring.record(s)
    if device == "cuda":
        torch.cuda.synchronize()
    return ring


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_export_once_fill_read_in_another_process(device):
    ring = _filled_ring(device, 3)
    q = mp.get_context("spawn").Queue()
    with spawned(_reader, ring.handle(), device, q, timeout=120):
        results = [q.get(timeout=120) for _ in range(3)]
        assert q.get(timeout=120) == "written"
    assert sorted(results) == [(0, True), (1, True), (2, True)]
    assert ring.slot(0)[:4].cpu().tolist() == [1, 2, 3, 4]  # the child's writes are visible


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_a_ring_opened_in_the_process_that_exported_it(device):
    """A publisher and a subscriber in one process: the import reads the ring's own bytes
    (CUDA IPC cannot open a mapping in the exporting process: a view of the ring itself;
    CPU maps the memfd a second time)."""
    ring = _filled_ring(device, 2)
    imp = ipc.open_ring(ring.handle(), device)
    try:
        assert imp.slots == 2 and imp.slot_bytes == SLOT and imp.source_device == ring.device
        for s in range(2):
            imp.wait(s)
            assert torch.equal(imp.slot(s).cpu(), _pattern(s))
        ring.slot(1)[:3] = 9  # the same memory
        assert imp.slot(1)[:3].cpu().tolist() == [9, 9, 9]
    finally:
        imp.close()


def _shm_entries():
    # multiprocessing's own semaphores (sem.mp-*) belong to the test harness, not to us
    return {e for e in os.listdir("/dev/shm") if not e.startswith("sem.")}


def _owner(i, q, hold):
    ring = ipc.SlotRing(SLOT, 2, "cpu", name="killme")
    ring.slot(1).fill_(0xAB)
    q.put(ring.handle())
    hold.wait(60)


def test_importer_survives_owner_kill_and_nothing_leaks():
    before = _shm_entries()
    ctx = mp.get_context("spawn")
    q, hold = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_owner, args=(0, q, hold), daemon=True)
    p.start()
    try:
        handle = q.get(timeout=60)
        r = ipc.open_ring(handle)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        # the mapping outlives its owner: the memory is kernel-refcounted
        assert bool((r.slot(1) == 0xAB).all())
        view = r.slot(1)
        r.close()
        assert hotweights_fds() == []  # the import keeps no descriptor open
        del view, r
        gc.collect()
        maps = open("/proc/self/maps").read()
        assert "hotweights:killme" not in maps  # unmapped once the last view died
        # a handle whose owner is gone is refused as stale, not mapped
        with pytest.raises(RuntimeError, match="stale shared-memory handle 'killme'"):
            ipc.open_ring(handle)
    finally:
        if p.is_alive():
            p.kill()
    assert _shm_entries() == before  # memfds never touch /dev/shm


def test_generation_bump_makes_handles_stale():
    ring = ipc.SlotRing(4096, 1)
    old = ring.handle()
    ring.invalidate()
    # importing in this process is allowed for CPU regions (it is another mapping)
    with pytest.raises(RuntimeError, match="generation 1, region is at generation 2"):
        ipc.RingImport(old)
    r = ipc.RingImport(ring.handle())
    assert not r.stale()
    ring.invalidate()
    assert r.stale()


def test_bad_handles_are_clear_errors():
    ring = ipc.SlotRing(4096, 2)
    h = ring.handle()
    with pytest.raises(ipc.HandleError, match="truncated or corrupted"):
        ipc.ring_info(h[: len(h) // 2])
    with pytest.raises(ipc.HandleError, match="not a hotweights ring handle"):
        ipc.ring_info(msgpack.packb({"magic": "x"}))
    info = msgpack.unpackb(h)
    with pytest.raises(ipc.HandleError, match="version 99"):
        ipc.ring_info(msgpack.packb({**info, "v": 99}))
    raw = bytearray(info["raw"])
    raw[20] ^= 1
    with pytest.raises(ipc.HandleError, match="checksum mismatch"):
        ipc.RingImport(msgpack.packb({**info, "raw": bytes(raw)}))
    with pytest.raises(ipc.HandleError, match="bytes, expected 96"):
        ipc.RingImport(msgpack.packb({**info, "raw": info["raw"][:50]}))
    with pytest.raises(ipc.HandleError, match="ring handle must be bytes"):
        ipc.ring_info("not bytes")
    with pytest.raises(ValueError, match="slot_bytes=100, expected a positive multiple of 256"):
        ipc.SlotRing(100, 2)
    with pytest.raises(IndexError, match="slot 2 out of range for a ring of 2 slots"):
        ring.slot(2)


def test_foreign_handle_refused():
    ring = ipc.SlotRing(4096, 1)
    info = msgpack.unpackb(ring.handle())
    raw = bytearray(info["raw"])
    raw[16:24] = (int.from_bytes(raw[16:24], "little") ^ 0xFFFF).to_bytes(8, "little")  # boot id
    # re-seal the handle's own checksum so only the boot id is wrong
    from hotweights import _C
    raw[88:96] = _C.hw64_bytes(bytes(raw[:88])).to_bytes(8, "little")
    with pytest.raises(ipc.HandleError, match="foreign handle from another machine"):
        ipc.RingImport(msgpack.packb({**info, "raw": bytes(raw)}))


def test_region_sizes_and_slot_indices_are_checked():
    from hotweights import _C

    with pytest.raises(ValueError, match=r"size=18446744073709551615, expected > 0 and below 2\^63"):
        _C.ShmRegion.create(2**64 - 1)
    import numpy as np

    ring = ipc.SlotRing(4096, 2, "cpu")
    assert ring.slot(np.int64(1)).numel() == 4096  # numpy integers index
    with pytest.raises(IndexError, match="slot 2 out of range for a ring of 2 slots"):
        ring.slot(np.int64(2))
    with pytest.raises(TypeError, match="slot True: expected an integer index"):
        ring.slot(True)
