# SPDX-License-Identifier: Apache-2.0
"""Slot rings: staging buffers exported once per publisher session and imported once per
subscriber process, on CPU (POSIX shared memory) and CUDA (CUDA IPC).

A ring is ``slots`` buffers of ``slot_bytes`` each in ONE allocation with ONE handle (never one
handle per tensor). The handle is plain bytes (msgpack), versioned and validated on import; a
truncated, foreign or stale handle is a clear error. See Note [Shared-memory lifetime]
(csrc/core/shm.h) and Note [CUDA IPC lifetime] (csrc/cuda/cuda_api.h).
"""

from __future__ import annotations

import mmap
import operator
import os
import resource
import threading
import weakref
import warnings
from typing import Any

import msgpack
import numpy as np
import torch

from . import _C
from .ops import HAS_CUDA_BUILD, require_cuda_build

__all__ = ["SlotRing", "RingImport", "HandleError", "open_ring", "ring_info", "DirectUnavailable",
           "share_host_tensors", "SourceMaps", "CudaSourceExport", "CudaSourceMaps"]

HANDLE_VERSION = 1
_MAGIC = "hotweights.ring"


class HandleError(ValueError):
    """A ring handle is truncated, foreign, stale or not a ring handle."""


class _CudaArray:
    """Exposes raw device memory to torch through __cuda_array_interface__; the tensor made
    from it keeps this object (and so the owner of the mapping) alive."""

    def __init__(self, ptr: int, nbytes: int, owner: Any):
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,  # ordering is explicit: wait(slot) makes the stream wait
        }


def _check_slot(i: int, slots: int) -> int:
    if isinstance(i, bool):
        raise TypeError(f"slot {i!r}: expected an integer index")
    try:
        i = operator.index(i)  # numpy integers too
    except TypeError:
        raise TypeError(f"slot {i!r}: expected an integer index") from None
    if not 0 <= i < slots:
        raise IndexError(f"slot {i} out of range for a ring of {slots} slots")
    return i


class SlotRing:
    """A publisher's ring: created once, exported once, slots reused for many buckets.

    ``device`` is "cpu" or a CUDA device. CPU rings live in an anonymous memfd (freed by the
    kernel when the last process unmaps it: nothing can leak in /dev/shm). CUDA rings are one
    cudaMalloc allocation (legacy-IPC exportable whatever the caching allocator's settings)
    with one interprocess event per slot.
    """

    def __init__(self, slot_bytes: int, slots: int, device: str | torch.device = "cpu",
                 name: str = "ring"):
        if slot_bytes <= 0 or slot_bytes % 256:
            raise ValueError(f"SlotRing: slot_bytes={slot_bytes}, expected a positive multiple of 256")
        if not 1 <= slots <= 1024:
            raise ValueError(f"SlotRing: slots={slots}, expected 1..1024")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.slot_bytes = int(slot_bytes)
        self.slots = int(slots)
        if self.device.type == "cpu":
            self._impl = _C.ShmRegion.create(self.slot_bytes * self.slots, name)
            self._buf = torch.frombuffer(self._impl, dtype=torch.uint8)
            self.id = self._impl.id
        elif self.device.type == "cuda":
            require_cuda_build("a CUDA slot ring")
            self._impl = _C.cuda.CudaRing(self.device.index, self.slot_bytes, self.slots)
            arr = _CudaArray(self._impl.ptr, self.slot_bytes * self.slots, self._impl)
            self._buf = torch.as_tensor(arr, device=self.device)
            self.id = self._impl.id
            _own_rings[self.id] = self  # CUDA IPC cannot import in the exporting process
        else:
            raise ValueError(f"SlotRing: device {self.device} is not supported (cpu or cuda)")
        self._handle = msgpack.packb({
            "magic": _MAGIC, "v": HANDLE_VERSION, "kind": self.device.type, "id": self.id,
            "slots": self.slots, "slot_bytes": self.slot_bytes, "raw": self._impl.handle(),
        })

    @property
    def buffer(self) -> torch.Tensor:
        """The whole ring as one uint8 tensor."""
        return self._buf

    def slot(self, i: int) -> torch.Tensor:
        """uint8 view of slot i."""
        i = _check_slot(i, self.slots)
        return self._buf[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def handle(self) -> bytes:
        """The exportable handle (msgpack bytes); the same bytes for the ring's whole life."""
        return self._handle

    def record(self, i: int) -> None:
        """Marks slot i written: on CUDA, records its interprocess event on the current stream
        (importers' streams wait on it); on CPU the writes are complete when gather returns."""
        i = _check_slot(i, self.slots)
        if self.device.type == "cuda":
            self._impl.record(i, torch.cuda.current_stream(self.device).cuda_stream)

    @property
    def source_device(self) -> torch.device:
        """Where the ring's memory lives (a relay reading its own ring)."""
        return self.device

    def wait(self, i: int) -> None:
        """The owner reads its own slots in stream order: nothing to wait for."""
        _check_slot(i, self.slots)

    def invalidate(self) -> None:
        """CPU: bumps the region's generation so that outstanding handles are refused as stale."""
        if self.device.type == "cpu":
            self._impl.bump_generation()
            self._handle = msgpack.packb({**msgpack.unpackb(self._handle), "raw": self._impl.handle()})

    def __repr__(self) -> str:
        return f"SlotRing({self.slots}x{self.slot_bytes} B on {self.device}, id={self.id[:8]})"


class RingImport:
    """A subscriber's mapping of a publisher's ring (opened once, closed exactly once)."""

    def __init__(self, handle: bytes, device: str | torch.device | None = None):
        info = ring_info(handle)
        self.id = info["id"]
        self.slots = info["slots"]
        self.slot_bytes = info["slot_bytes"]
        self.kind = info["kind"]
        try:
            if self.kind == "cpu":
                self._impl = _C.ShmRegion.import_handle(info["raw"])
                self.device = torch.device("cpu")
                self._buf = torch.frombuffer(self._impl, dtype=torch.uint8)
            else:
                require_cuda_build("importing a CUDA slot ring")
                dev = torch.device(device) if device is not None else torch.device(
                    "cuda", torch.cuda.current_device())
                if dev.type != "cuda":
                    raise HandleError(f"a CUDA ring must be imported on a CUDA device, not {dev}")
                if dev.index is None:
                    dev = torch.device("cuda", torch.cuda.current_device())
                self._impl = _C.cuda.CudaRingImport(info["raw"], dev.index)
                self.device = dev  # where this process works (its stream waits on slot events)
                arr = _CudaArray(self._impl.ptr, self.slot_bytes * self.slots, self._impl)
                # The view lives on the GPU that holds the memory (the exporter's, found by
                # UUID): asking torch for another device would silently copy the ring.
                self._buf = torch.as_tensor(arr, device=torch.device("cuda", self._impl.ring_device))
        except ValueError as e:  # _C validation errors: corrupted/foreign handles
            raise HandleError(str(e)) from None
        if self._impl is not None and self.kind == "cpu" and self._impl.size != self.slots * self.slot_bytes:
            raise HandleError(f"ring {self.id}: region holds {self._impl.size} bytes, the handle "
                              f"describes {self.slots}x{self.slot_bytes}")

    @property
    def source_device(self) -> torch.device:
        """Where the ring's memory lives, in this process's device numbering (the exporter's
        GPU is found by UUID, so CUDA_VISIBLE_DEVICES may differ between the processes)."""
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", self._impl.ring_device)

    def slot(self, i: int) -> torch.Tensor:
        """uint8 view of slot i (read it only after wait(i) on CUDA)."""
        i = _check_slot(i, self.slots)
        return self._buf[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def wait(self, i: int) -> None:
        """CUDA: the current stream waits for the exporter's writes into slot i."""
        i = _check_slot(i, self.slots)
        if self.kind == "cuda":
            self._impl.wait(i, torch.cuda.current_stream(self.device).cuda_stream)

    def stale(self) -> bool:
        """CPU: True when the owner reset the ring after this import."""
        return self.kind == "cpu" and self._impl.stale()

    def close(self) -> None:
        """Drops this mapping; the memory is unmapped when the last slot view is gone."""
        self._buf = None
        self._impl = None
        _forget(self)


def ring_info(handle: bytes) -> dict[str, Any]:
    """Decodes and validates a ring handle's envelope (without mapping anything)."""
    if not isinstance(handle, (bytes, bytearray, memoryview)):
        raise HandleError(f"ring handle must be bytes, got {type(handle).__name__}")
    try:
        info = msgpack.unpackb(bytes(handle), raw=False)
    except Exception as e:
        raise HandleError(f"ring handle is not valid msgpack ({type(e).__name__}: {e}); "
                          "truncated or corrupted?") from None
    if not isinstance(info, dict) or info.get("magic") != _MAGIC:
        raise HandleError("not a hotweights ring handle")
    if info.get("v") != HANDLE_VERSION:
        raise HandleError(f"ring handle version {info.get('v')!r}, this build reads {HANDLE_VERSION}")
    kinds = ("cpu", "cuda")
    if info.get("kind") not in kinds:
        raise HandleError(f"ring handle kind {info.get('kind')!r}, expected one of {kinds}")
    for key, typ in (("id", str), ("slots", int), ("slot_bytes", int), ("raw", bytes)):
        if not isinstance(info.get(key), typ):
            raise HandleError(f"ring handle field {key!r} is missing or not {typ.__name__}")
    if info["kind"] == "cuda" and not HAS_CUDA_BUILD:
        raise HandleError("ring handle is a CUDA ring, but hotweights._C was built without CUDA")
    return info


# One import per ring per process: repeated opens return the same mapping (a CUDA IPC
# mapping can be opened only once per process anyway).
_cache: dict[tuple[str, str], RingImport] = {}
_cache_lock = threading.Lock()
_own_rings: "weakref.WeakValueDictionary[str, SlotRing]" = weakref.WeakValueDictionary()


class _OwnRing:
    """A subscriber's view of a CUDA ring that its own process exported (a publisher and a
    subscriber in one process): CUDA IPC cannot open a mapping in the exporting process, and
    needs none. The publisher synchronizes its stream before it posts a slot's handle, so
    there is nothing to wait for."""

    kind = "cuda"

    def __init__(self, ring: SlotRing, device: str | torch.device | None):
        self._ring = ring
        self._impl = ring._impl
        self.id, self.slots, self.slot_bytes = ring.id, ring.slots, ring.slot_bytes
        dev = torch.device(device) if device is not None else ring.device
        self.device = dev if dev.type == "cuda" else ring.device

    @property
    def source_device(self) -> torch.device:
        return self._ring.device

    def slot(self, i: int) -> torch.Tensor:
        return self._ring.slot(i)

    def wait(self, i: int) -> None:
        _check_slot(i, self.slots)

    def stale(self) -> bool:
        return False

    def close(self) -> None:
        self._ring = self._impl = None


def open_ring(handle: bytes, device: str | torch.device | None = None) -> RingImport | _OwnRing:
    """Imports a ring, or returns this process's existing import of it (or, for a CUDA ring
    this process exported, a view of the ring itself)."""
    info = ring_info(handle)
    own = _own_rings.get(info["id"]) if info["kind"] == "cuda" else None
    if own is not None:
        return _OwnRing(own, device)
    key = (info["id"], str(device))
    with _cache_lock:
        imp = _cache.get(key)
        if imp is not None and imp._impl is not None and not imp.stale():
            return imp
        imp = RingImport(handle, device)
        _cache[key] = imp
        return imp


def _forget(imp: RingImport) -> None:
    with _cache_lock:
        for k, v in list(_cache.items()):
            if v is imp:
                del _cache[k]


# --------------------------------------------------------------------------- direct reads
# Note [Direct reads] (hotweights/replicate.py) explains when and why; these are the two ends.

class DirectUnavailable(RuntimeError):
    """The source cannot be read directly by other processes (the ring is used instead)."""


# An fd per shared storage stays open in the publisher and each subscriber maps every one:
# above this many storages the ring is the better tool (and fd / map-count limits loom).
MAX_DIRECT_STORAGES = 4096


def share_host_tensors(tensors: list[torch.Tensor]) -> dict[str, Any]:
    """Moves the storages of CPU tensors into POSIX shared memory *in place* (torch's own
    ``share_memory_`` mechanism: every tensor, view or alias of a storage, in or outside
    ``tensors``, keeps pointing at it) and describes where each tensor lives:
    ``{"pid", "st": [[fd, inode, nbytes], ...], "sidx": int32[n], "soff": int64[n],
    "moved": bytes copied now}``. Storages already in shared memory are not copied again; a
    tensor with no bytes has no storage to share (``sidx`` -1: nothing ever reads it).
    Raises DirectUnavailable."""
    storages: dict[int, int] = {}  # StorageImpl address -> index in st
    st, sidx, soff = [], np.empty(len(tensors), np.int32), np.empty(len(tensors), np.int64)
    pending = []
    for i, t in enumerate(tensors):
        if t.device.type != "cpu":
            raise DirectUnavailable(f"tensor {i} is on {t.device}, direct reads are for CPU tensors")
        if not t.is_contiguous():
            raise DirectUnavailable(f"tensor {i} of shape {tuple(t.shape)} is not contiguous")
        if _pinned(t):
            raise DirectUnavailable(f"tensor {i} is in pinned memory (moving it would unpin it)")
        s = t.untyped_storage()
        if not s.nbytes():
            sidx[i] = -1
            continue
        if s._cdata not in storages:
            storages[s._cdata] = len(pending)
            pending.append(s)
        sidx[i] = storages[s._cdata]
    if len(pending) > MAX_DIRECT_STORAGES:
        raise DirectUnavailable(f"{len(pending)} storages, direct reads map at most "
                                f"{MAX_DIRECT_STORAGES}")
    unshared = [s for s in pending if not s.is_shared()]
    moved = sum(s.nbytes() for s in unshared)
    _check_fd_room(len(unshared))
    _check_shm_room(moved)
    for s in pending:
        try:
            fd, nbytes = s._share_fd_cpu_()  # in place; a no-op when already shared
            st.append([int(fd), int(os.fstat(fd).st_ino), int(nbytes)])
        except Exception as e:  # e.g. file-backed (mmap-loaded) storages, fd limits
            raise DirectUnavailable(f"a storage of {s.nbytes()} bytes cannot move to shared "
                                    f"memory: {type(e).__name__}: {e}") from None
    for i, t in enumerate(tensors):  # offsets after the move: the storage's address changed
        soff[i] = t.data_ptr() - pending[sidx[i]].data_ptr() if sidx[i] >= 0 else 0
    return {"pid": os.getpid(), "st": st, "sidx": sidx, "soff": soff, "moved": moved}


def _pinned(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_pinned())
    except RuntimeError:  # no accelerator runtime: nothing is pinned
        return False


def _check_fd_room(new: int) -> None:
    """Each shared storage keeps a file descriptor open: refuse up front rather than run the
    process out of descriptors halfway (sockets and files would fail next)."""
    if not new:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    open_now = len(os.listdir("/proc/self/fd"))
    need = open_now + new + 256
    if need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:  # the soft limit may rise to the hard one
        try:
            target = 2 * need if hard == resource.RLIM_INFINITY else min(2 * need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            pass
    raise DirectUnavailable(f"{new} storages need a file descriptor each, {open_now} are "
                            f"open and the limit is {soft} (hard {hard}; raise it with "
                            "`ulimit -n`)")


def _check_shm_room(need: int) -> None:
    """Refuses up front when /dev/shm cannot hold the bytes that still have to move (a full
    tmpfs would otherwise surface as SIGBUS on first touch, e.g. Docker's 64 MiB)."""
    if not need:
        return
    try:
        v = os.statvfs("/dev/shm")
    except OSError as e:
        raise DirectUnavailable(f"/dev/shm is not usable: {e}") from None
    free = v.f_bavail * v.f_frsize
    if need + (64 << 20) > free:
        raise DirectUnavailable(f"/dev/shm has {free >> 20} MiB free, the source needs "
                                f"{need >> 20} MiB (+64 MiB headroom)")


class SourceMaps:
    """A subscriber's read-only mappings of publishers' shared storages, opened through
    /proc/<pid>/fd once and reused by every later version (keyed by pid, fd and inode, so a
    reused fd number is never mistaken for the storage it replaced)."""

    def __init__(self):
        self._maps: dict[tuple[int, int, int], torch.Tensor] = {}

    def region(self, pid: int, fd: int, ino: int, nbytes: int) -> torch.Tensor:
        key = (int(pid), int(fd), int(ino))
        view = self._maps.get(key)
        if view is not None and view.numel() >= nbytes:
            return view
        for k in [k for k in self._maps if k[:2] == key[:2]]:
            del self._maps[k]  # that fd now holds another storage: the old one is gone
        path = f"/proc/{pid}/fd/{fd}"
        try:
            f = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise HandleError(f"cannot open {path}: {e.strerror}") from None
        try:
            stt = os.fstat(f)
            if stt.st_ino != ino or stt.st_size < nbytes:
                raise HandleError(f"{path} is inode {stt.st_ino} of {stt.st_size} bytes, the "
                                  f"publisher announced inode {ino} of {nbytes} bytes")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            m = mmap.mmap(f, int(nbytes), flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(f)
        with warnings.catch_warnings():  # read-only by design: nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(m, dtype=torch.uint8)
        self._maps[key] = view
        return view

    def prune(self) -> int:
        """Unmaps storages the publisher has freed (its fd is closed or now names another
        file), so a trainer that replaces parameters does not pin their old memory here.
        Returns how many went."""
        gone = []
        for k in self._maps:
            try:
                alive = os.stat(f"/proc/{k[0]}/fd/{k[1]}").st_ino == k[2]
            except OSError:
                alive = False
            if not alive:
                gone.append(k)
        for k in gone:
            del self._maps[k]
        return len(gone)

    def drop(self, pid: int | None = None) -> None:
        """Unmaps the storages of one publisher process (all with None); the memory goes when
        the last view of it is gone."""
        for k in [k for k in self._maps if pid is None or k[0] == pid]:
            del self._maps[k]

    def __len__(self) -> int:
        return len(self._maps)


# CUDA direct reads (Note [Direct reads], opt-in: direct="on" with a CUDA source). Tested on one
# H200 with one subscriber (session 5); not across GPUs.

class CudaSourceExport:
    """Publisher side: CUDA IPC descriptors of the source's storages through torch's own
    mechanism (``UntypedStorage._share_cuda_``: the caching allocator block's IPC handle, the
    storage's offset in it, a producer-side reference counter). Each storage is exported
    once and cached: exporting again would add a reference that no importer releases."""

    def __init__(self):
        self._desc: dict[tuple[int, int], list] = {}

    def layout(self, tensors: list[torch.Tensor]) -> dict[str, Any]:
        """Like share_host_tensors; ``tensors`` must be all the source uses (descriptors of
        storages missing from it are forgotten)."""
        storages: dict[tuple[int, int], int] = {}
        st = []
        sidx = np.empty(len(tensors), np.int32)
        soff = np.empty(len(tensors), np.int64)
        for i, t in enumerate(tensors):
            if t.device.type != "cuda":
                raise DirectUnavailable(f"tensor {i} is on {t.device}, expected a CUDA device")
            if not t.is_contiguous():
                raise DirectUnavailable(f"tensor {i} of shape {tuple(t.shape)} is not contiguous")
            s = t.untyped_storage()
            key = (s._cdata, s.data_ptr())
            if key not in storages:
                desc = self._desc.get(key)
                if desc is None:
                    try:
                        desc = _cuda_descriptor(s._share_cuda_())
                    except Exception as e:  # e.g. expandable segments (VMM) allocations
                        raise DirectUnavailable(f"storage of tensor {i} cannot be exported over "
                                                f"CUDA IPC: {type(e).__name__}: {e}") from None
                    self._desc[key] = desc
                storages[key] = len(st)
                st.append(desc)
            sidx[i] = storages[key]
            soff[i] = t.data_ptr() - s.data_ptr()
        for key in [k for k in self._desc if k not in storages]:
            del self._desc[key]  # storages the source no longer uses
        return {"kind": "cuda", "pid": os.getpid(), "st": st, "sidx": sidx, "soff": soff}


def _cuda_descriptor(shared: tuple) -> list:
    """torch's _share_cuda_ tuple as msgpack-able values (bytes stay bytes)."""
    (device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = shared
    return [int(device), bytes(handle), int(size), int(offset), bytes(rc_handle),
            int(rc_offset), bytes(ev_handle) if ev_handle is not None else b"", bool(ev_sync)]


class CudaSourceMaps:
    """Subscriber side: the publisher's CUDA storages opened once per (handle, offset) with
    ``UntypedStorage._new_shared_cuda`` (torch caches the IPC mapping of each block)."""

    def __init__(self):
        self._maps: dict[tuple[bytes, int], torch.Tensor] = {}
        self._by_pid: dict[int, set] = {}

    def region(self, pid: int, desc: list) -> torch.Tensor:
        device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = desc
        key = (bytes(handle), int(offset))
        view = self._maps.get(key)
        if view is None:
            try:
                torch.cuda._lazy_init()
                s = torch.UntypedStorage._new_shared_cuda(
                    int(device), bytes(handle), int(size), int(offset), bytes(rc_handle),
                    int(rc_offset), bytes(ev_handle) or None, bool(ev_sync))
            except Exception as e:
                raise HandleError(f"cannot open the CUDA IPC handle of a {size}-byte storage "
                                  f"of process {pid}: {type(e).__name__}: {e}") from None
            view = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", int(device)))
            view.set_(s, 0, (int(size),), (1,))
            self._maps[key] = view
            self._by_pid.setdefault(int(pid), set()).add(key)
        return view

    def drop(self, pid: int | None = None) -> None:
        for p in [p for p in self._by_pid if pid is None or p == pid]:
            for key in self._by_pid.pop(p):
                self._maps.pop(key, None)

    def __len__(self) -> int:
        return len(self._maps)
