# SPDX-License-Identifier: Apache-2.0
"""Typed facade over ``hotweights._C`` and ``torch.ops.hotweights``: nothing else imports them.

The tensors' device picks the backend: CPU tensors go to the threaded host engine, CUDA
tensors to the multi-stream CUDA engine (streams, events, one batched kernel launch for many
small or hashed copies). Checksums are hw64 (Note [hw64 checksum] in csrc/core/checksum.h):
the same bytes give the same 64-bit value on CPU and CUDA.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import functools
import threading
from typing import Sequence

import numpy as np
import torch

from . import _C
from . import config as _config

__all__ = [
    "HAS_CUDA_BUILD",
    "CopyHandle",
    "checksum",
    "checksum_batch",
    "copy_",
    "gather",
    "scatter",
    "scatter_regions",
    "hash_pieces",
    "bucket_digest",
    "tensor_digest",
    "finalize_many",
    "mismatched",
    "digest_host",
    "hw64_partial",
    "hw64_finalize",
    "copy_settings",
    "require_cuda_build",
    "copy_hashed",
    "hash_ranges",
]

HAS_CUDA_BUILD: bool = bool(_C.with_cuda)
_U64 = (1 << 64) - 1


def require_cuda_build(what: str) -> None:
    """Raises a RuntimeError naming HOTWEIGHTS_CUDA when this _C has no CUDA half."""
    if not HAS_CUDA_BUILD:
        raise RuntimeError(
            f"{what} needs CUDA, but hotweights._C was built without it "
            f"({_C.build_info()['cuda_decision']}). Rebuild against a CUDA build of torch with "
            "HOTWEIGHTS_CUDA=1 pip install --no-build-isolation -e ."
        )


# --------------------------------------------------------------------------- checksums


@torch.library.register_fake("hotweights::checksum")
def _checksum_fake(self):
    return self.new_empty((), dtype=torch.long)


@torch.library.register_fake("hotweights::checksum_batch")
def _checksum_batch_fake(tensors):
    return tensors[0].new_empty((len(tensors),), dtype=torch.long)


def checksum(t: torch.Tensor) -> int:
    """hw64 digest (unsigned 64-bit int) of a contiguous tensor's bytes, computed where it lives."""
    return int(torch.ops.hotweights.checksum(_contig(t, "checksum")).item()) & _U64


def checksum_batch(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """hw64 digests of many tensors as a uint64 array; CUDA tensors are hashed on their GPU.

    Tensors may live on different devices: one batched call per device, one sync per device.
    """
    out = np.zeros(len(tensors), dtype=np.uint64)
    by_dev: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checksum_batch: expected a torch.Tensor, got {type(t).__name__}")
        by_dev.setdefault(t.device, []).append(i)
    for dev, idx in by_dev.items():
        if dev.type == "cpu":  # one C++ pass for pointers, sizes and the checks
            tab = _table([tensors[i] for i in idx], "checksum_batch")
            out[idx] = _C.hw64_digest_many(tab[:, _PTR].astype(np.uint64),
                                           tab[:, _NBYTES].astype(np.uint64))
        else:
            res = torch.ops.hotweights.checksum_batch(
                [_contig(tensors[i], "checksum_batch") for i in idx])
            out[idx] = res.cpu().numpy().view(np.uint64)
    return out


def digest_host(ptr: int, nbytes: int) -> int:
    """hw64 digest of host memory at a raw address (multi-threaded)."""
    return _C.hw64_digest(ptr, nbytes)


def hw64_partial(ptr: int, nbytes: int, word_base: int = 0) -> int:
    """Partial hw64 sum of host memory whose first word has index ``word_base``."""
    return _C.hw64_partial(ptr, nbytes, word_base)


def hw64_finalize(partial_sum: int, nbytes: int) -> int:
    """Turns a (combined) partial sum over ``nbytes`` into the hw64 digest."""
    return _C.hw64_finalize(partial_sum & _U64, nbytes)


# --------------------------------------------------------------------------- copy engine


@dataclasses.dataclass(frozen=True)
class CopySettings:
    """Chunk size and stream (thread) count the engine uses for one link."""

    chunk_bytes: int
    streams: int
    source: str  # "env", "default" or "autotune:<link>"


# Seed values per link kind, used when HOTWEIGHTS_IPC_COPY_AUTOTUNE=1 (hotweights.topo refines
# "peer" into NVLink or PCIe when it can tell them apart).
_AUTOTUNE = {
    "host": (16 << 20, 2),
    "same_device": (64 << 20, 2),
    "host_to_device": (8 << 20, 2),
    "device_to_host": (8 << 20, 2),
    "peer_nvlink": (64 << 20, 4),
    "peer_pcie": (8 << 20, 2),
    "peer": (16 << 20, 2),
}

_link_classifier = None  # set by hotweights.topo: (src_device, dst_device) -> link kind


def set_link_classifier(fn) -> None:
    """Lets the topology module say whether a peer pair is NVLink or PCIe."""
    global _link_classifier
    _link_classifier = fn
    _engine.cache_clear()


def _install_topology_classifier() -> None:
    # Topology discovery (NVML, nvidia-smi) lives above this facade: imported lazily, once,
    # when autotune first meets a peer pair. A failed discovery leaves plain "peer".
    from . import topo

    try:
        topo.install_classifier()
    except Exception as e:  # discovery must never break a copy
        import logging

        logging.getLogger("hotweights").warning("copy autotune: topology discovery failed (%s: %s); "
                                                "peer pairs use the generic seed", type(e).__name__, e)
        set_link_classifier(lambda a, b: "peer")


def link_kind(src: torch.device, dst: torch.device) -> str:
    """Kind of link a copy from src to dst uses (host, same_device, peer, ...)."""
    if src.type == "cpu" and dst.type == "cpu":
        return "host"
    if src.type == "cpu":
        return "host_to_device"
    if dst.type == "cpu":
        return "device_to_host"
    if src.index == dst.index:
        return "same_device"
    if _link_classifier is not None:
        return _link_classifier(src.index, dst.index)
    return "peer"


def copy_settings(src: torch.device, dst: torch.device, cfg=None) -> CopySettings:
    """Chunk size and streams for a copy from src to dst (explicit settings beat autotune)."""
    cfg = cfg or _config.get()
    chunk, streams, source = cfg.copy_chunk_bytes, cfg.ipc_copy_streams, "default"
    if cfg.ipc_copy_autotune:
        if _link_classifier is None and src.type == dst.type == "cuda" and src.index != dst.index:
            _install_topology_classifier()
        kind = link_kind(src, dst)
        chunk, streams = _AUTOTUNE.get(kind, _AUTOTUNE["peer"])
        source = f"autotune:{kind}"
    if "ipc_copy_chunk_mb" in cfg.explicit:
        chunk, source = cfg.copy_chunk_bytes, "env"
    if "ipc_copy_streams" in cfg.explicit:
        streams, source = cfg.ipc_copy_streams, "env"
    return CopySettings(chunk, streams, source)


@functools.lru_cache(maxsize=None)
def _peer_ok(device: int, peer: int) -> bool:
    """Peer access from device to peer, enabled once per pair."""
    return bool(_C.cuda.enable_peer_access(device, peer))


@functools.lru_cache(maxsize=None)
def _engine(kind: str, device: int, chunk_bytes: int, streams: int, spin_ns: int = 0):
    # Engines live for the process: their streams/threads are reused by every batch.
    if kind == "cpu":
        return _C.CpuCopyEngine(streams, chunk_bytes)
    require_cuda_build("a copy between CUDA tensors")
    return _C.cuda.CudaCopyEngine(device, streams, chunk_bytes, spin_ns)


def _cuda_engine(device: int, st: CopySettings):
    """The CUDA engine for ``device`` with these settings; its batches poll for
    HOTWEIGHTS_SPIN_US before they sleep (Note [Batch completion] in csrc/cuda/cuda_api.h)."""
    return _engine("cuda", device, st.chunk_bytes, st.streams, round(_config.get().spin_s * 1e9))


# Batches whose handle went away before they finished (dropped unwaited, or a synchronous call
# that timed out): their completion and tensors stay referenced until they are done, so the
# engine never writes into freed memory. Pruned whenever a new batch starts.
# A deque and no lock: __del__ may run inside any allocation (a GC pass), also in the middle
# of a prune on the same thread; append and popleft are atomic.
_UNFINISHED: collections.deque = collections.deque()


def _prune_unfinished() -> None:
    for _ in range(len(_UNFINISHED)):
        try:
            u = _UNFINISHED.popleft()
        except IndexError:
            return
        if not u[0].done():
            _UNFINISHED.append(u)


def _wait_arg(timeout: float | None) -> float:
    """A wait's timeout for the engine: -1 waits without limit (None, inf, or beyond what a
    clock converts without overflowing)."""
    if timeout is None:
        return -1.0
    t = float(timeout)
    if math.isnan(t) or t < 0:
        raise ValueError(f"wait: timeout={timeout!r}, expected None or a number of seconds >= 0")
    return -1.0 if t > 1e9 else t


class CopyHandle:
    """Completion of an asynchronous batch: keeps its tensors alive until it is done (also
    after the handle itself is dropped unwaited).

    ``wait(timeout)`` raises TimeoutError when the batch is not done in time (the batch keeps
    running and may be waited on again), and re-raises a copy error. On CUDA, ``wait`` blocks
    the host; the caller's stream is already ordered after the batch (Note [Stream ordering]).
    """

    def __init__(self, completion, keepalive, hashed_nbytes: np.ndarray | None):
        _prune_unfinished()
        self._c = completion
        self._keep = keepalive
        self._hashed = hashed_nbytes  # bytes of each hashed piece
        self._lock = threading.Lock()

    def __del__(self):
        keep = getattr(self, "_keep", None)
        c = getattr(self, "_c", None)
        if keep is not None and c is not None:
            try:
                running = not c.done()
            except Exception:
                return
            if running:
                _UNFINISHED.append((c, keep))

    def done(self) -> bool:
        """True when every copy of the batch finished."""
        return self._c.done()

    def wait(self, timeout: float | None = None) -> "CopyHandle":
        """Blocks until done (or ``timeout`` seconds); raises TimeoutError or the copy error."""
        if not self._c.wait(_wait_arg(timeout)):
            raise TimeoutError(f"copy batch not finished after {timeout} s")
        self._c.rethrow()
        with self._lock:
            self._keep = None
        return self

    def partials(self) -> np.ndarray:
        """hw64 partial sum of every piece (after wait), keyed by the piece's offset inside
        its tensor: a whole-tensor piece's partial is its tensor's checksum before
        finalisation, and the partials of a split tensor's pieces add up to it."""
        self.wait()
        if self._hashed is None:
            raise RuntimeError("this copy batch was not asked to hash (pass hash=True)")
        return np.asarray(self._c.hashes(), dtype=np.uint64)

    def digest(self) -> int:
        """The bucket digest: hw64 of all pieces together (see :func:`bucket_digest`)."""
        return bucket_digest(self.partials(), self._hashed)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _contig(t: torch.Tensor, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_conj() or t.is_neg():  # its bytes are not its values
        raise ValueError(f"{op}: tensor of shape {tuple(t.shape)} is a lazy "
                         f"{'conjugate' if t.is_conj() else 'negative'} view; call "
                         f"{'.resolve_conj()' if t.is_conj() else '.resolve_neg()'} first")
    if t.device.type == "meta":
        raise ValueError(f"{op}: tensor of shape {tuple(t.shape)} is on the meta device (no data)")
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: tensor of shape {tuple(t.shape)} with strides {t.stride()} is not contiguous"
        )
    return t


# Columns of torch.ops.hotweights.tensor_table; device codes are type * 65536 + index + 1.
_PTR, _NBYTES, _DTYPE, _DEVICE, _CONTIG, _SHAPE = range(6)
_CPU_CODE = 0  # c10::DeviceType::CPU (index -1 -> +0)


def _table(tensors: Sequence[torch.Tensor], op: str) -> np.ndarray:
    """Per-tensor metadata in one C++ pass; raises for non-tensors and non-contiguous ones."""
    try:
        tab = torch.ops.hotweights.tensor_table(tensors).numpy()
    except (TypeError, RuntimeError):
        for t in tensors:
            _contig(t, op)  # names the offending element
        raise
    if not tab[:, _CONTIG].all():
        _contig(tensors[int(np.flatnonzero(tab[:, _CONTIG] == 0)[0])], op)
    return tab


def _device_of(code: int) -> torch.device:
    typ, idx = divmod(int(code), 65536)
    if typ == 0:
        return torch.device("cpu")
    if typ == 1:
        return torch.device("cuda", idx - 1)
    raise ValueError(f"unsupported device type code {typ} (hotweights copies cpu and cuda tensors)")


def bucket_digest(partials: np.ndarray, lengths: np.ndarray) -> int:
    """Digest of a bucket from its pieces' partial sums and lengths (order-independent)."""
    total = int(np.sum(np.asarray(partials, dtype=np.uint64), dtype=np.uint64))
    return hw64_finalize(total, int(np.sum(lengths, dtype=np.int64)))


def tensor_digest(partials: np.ndarray, nbytes: int) -> int:
    """Checksum of a tensor from the partials of all its pieces (equals checksum(tensor))."""
    return hw64_finalize(int(np.sum(np.asarray(partials, dtype=np.uint64), dtype=np.uint64)), nbytes)


# hw_finalize's constants (csrc/core/checksum.h), for the vectorized form below
_K3, _SEED = np.uint64(0xD6E8FEB86659FD93), np.uint64(0x68777765696768)
_M1, _M2, _S33 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)


def finalize_many(sums: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """hw64_finalize of each (partial sum, byte count) pair, vectorized: the digests of many
    whole tensors at once (uint64 arithmetic wraps like the C++ one)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(sums, dtype=np.uint64) ^ (np.asarray(nbytes).astype(np.uint64) * _K3)) ^ _SEED
        h ^= h >> _S33
        h *= _M1
        h ^= h >> _S33
        h *= _M2
        h ^= h >> _S33
    return h


def mismatched(partials: np.ndarray, nbytes: np.ndarray, checksums: np.ndarray) -> np.ndarray:
    """Indices k where finalize(partials[k], nbytes[k]) differs from checksums[k] (each a
    whole tensor's partial sum): the vectorized check of many tensors against a manifest."""
    got = finalize_many(partials, nbytes)
    return np.flatnonzero(got != np.asarray(checksums).astype(np.uint64))


def _devices(codes: np.ndarray) -> set[torch.device]:
    """The devices of a batch side's device codes (one, almost always: checked without a sort)."""
    if len(codes) and (codes == codes[0]).all():
        return {_device_of(codes[0])}
    return {_device_of(c) for c in np.unique(codes)}


def _submit(dst_codes: np.ndarray, src_codes: np.ndarray, sizes: np.ndarray,
            dst_ptrs: np.ndarray, src_ptrs: np.ndarray, hash_base: np.ndarray | None,
            keepalive, op: str, hash_index: np.ndarray | None = None,
            num_hashes: int | None = None) -> CopyHandle:
    dst_devs, src_devs = _devices(dst_codes), _devices(src_codes)
    devs = dst_devs | src_devs
    u64 = lambda a: np.ascontiguousarray(a, dtype=np.uint64)  # noqa: E731
    hidx = hbase = None
    nh = 0
    hashed = None
    if hash_base is not None:  # default: one accumulator per piece
        hidx = (np.arange(len(sizes), dtype=np.int64) if hash_index is None
                else np.ascontiguousarray(hash_index, dtype=np.int64))
        hbase = u64(hash_base)
        nh = len(sizes) if num_hashes is None else int(num_hashes)
        hashed = np.zeros(nh, np.int64)  # bytes hashed into each accumulator
        np.add.at(hashed, hidx, np.asarray(sizes, np.int64))
    if all(d.type == "cpu" for d in devs):
        st = copy_settings(torch.device("cpu"), torch.device("cpu"))
        eng = _engine("cpu", -1, st.chunk_bytes, st.streams)
        c = eng.submit(u64(dst_ptrs), u64(src_ptrs), u64(sizes), hidx, hbase, nh)
    else:
        if len(dst_devs) > 1 or len(src_devs) > 1:
            raise ValueError(f"{op}: one batch copies between one source device and one destination "
                             f"device, got sources on {sorted(map(str, src_devs))} and destinations on "
                             f"{sorted(map(str, dst_devs))}")
        (src_dev,), (dst_dev,) = src_devs, dst_devs
        device = dst_dev.index if dst_dev.type == "cuda" else src_dev.index
        # The batched kernel runs on `device` and reads the other side directly: across two
        # GPUs that needs peer access (else cudaMemcpyAsync copies, without hashing).
        kernel_ok = all(d.type == "cuda" for d in devs) and (
            src_dev == dst_dev or _peer_ok(dst_dev.index, src_dev.index))
        if nh and not kernel_ok:
            raise ValueError(f"{op}: hashing needs both sides on CUDA devices, got {sorted(map(str, devs))}")
        st = copy_settings(src_dev, dst_dev)
        eng = _cuda_engine(device, st)
        stream = torch.cuda.current_stream(device).cuda_stream
        c = eng.submit(u64(dst_ptrs), u64(src_ptrs), u64(sizes), hidx, hbase, nh, stream,
                       kernel_ok)
    return CopyHandle(c, keepalive, hashed)


def copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], *,
          async_op: bool = False, timeout: float | None = None) -> CopyHandle:
    """Copies each src into its dst (same dtype and shape, contiguous, no overlaps), chunked
    over the engine's streams/threads. Returns a completed handle, or a pending one with
    ``async_op=True`` (keep the tensors unmodified until it is done).

    Per-tensor work happens in C++ (one tensor_table call per side), so a batch of 10,000
    small tensors costs about a microsecond of Python per tensor.
    """
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_: {len(dsts)} destinations but {len(srcs)} sources")
    td, ts = _table(dsts, "copy_"), _table(srcs, "copy_")
    bad = np.flatnonzero((td[:, _DTYPE] != ts[:, _DTYPE]) | (td[:, _SHAPE] != ts[:, _SHAPE]))
    if bad.size:
        i = int(bad[0])
        d, s = dsts[i], srcs[i]
        raise ValueError(f"copy_: pair {i}: destination {d.dtype}{tuple(d.shape)} does not match "
                         f"source {s.dtype}{tuple(s.shape)}")
    h = _submit(td[:, _DEVICE], ts[:, _DEVICE], ts[:, _NBYTES], td[:, _PTR], ts[:, _PTR], None,
                (dsts, srcs), "copy_")
    return h if async_op else h.wait(timeout)


def _check_buffer(buf: torch.Tensor, op: str) -> None:
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 \
            or not buf.is_contiguous():
        raise ValueError(f"{op}: buffer must be a contiguous 1-D uint8 tensor, got "
                         f"{getattr(buf, 'dtype', type(buf).__name__)}{tuple(getattr(buf, 'shape', ()))}")


def _layout(buf: torch.Tensor, tensors: Sequence[torch.Tensor], offsets, lengths,
            tensor_offsets, op: str):
    """Validated (table, sizes, tensor pointers, buffer pointers) of a gather/scatter."""
    tab = _table(list(tensors), op)
    n = len(tab)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1)
    if len(offs) != n:
        raise ValueError(f"{op}: {n} tensors but {len(offs)} offsets")
    toff = np.zeros(n, np.int64) if tensor_offsets is None else np.asarray(tensor_offsets, np.int64)
    tn = tab[:, _NBYTES]
    ln = tn - toff if lengths is None else np.asarray(lengths, np.int64)
    cap = buf.numel()
    if len(toff) != n or len(ln) != n:
        raise ValueError(f"{op}: {n} tensors but {len(ln)} lengths and {len(toff)} tensor offsets")
    # compared without adding: offsets near 2^63 would wrap an int64 sum past the check
    outside = (toff < 0) | (ln < 0) | (toff > tn) | (ln > tn - np.minimum(toff, tn))
    past = (offs < 0) | (offs > cap) | (ln > cap - np.clip(offs, 0, cap))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{op}: piece {i} [{toff[i]}, {toff[i] + ln[i]}) is outside its tensor "
                         f"of {tn[i]} bytes")
    if past.any():
        i = int(np.flatnonzero(past)[0])
        raise ValueError(f"{op}: piece {i} at offset {offs[i]} with {ln[i]} bytes runs past the "
                         f"buffer of {cap} bytes")
    return tab, ln, tab[:, _PTR] + toff, buf.data_ptr() + offs, toff


def _buffer_code(buf: torch.Tensor, n: int) -> np.ndarray:
    d = buf.device
    code = 0 if d.type == "cpu" else 65536 + d.index + 1
    return np.full(n, code, dtype=np.int64)


def gather(buf: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int], *,
           lengths: Sequence[int] | None = None, tensor_offsets: Sequence[int] | None = None,
           hash: bool = False, async_op: bool = False, timeout: float | None = None) -> CopyHandle:
    """Packs tensors (or byte pieces of them) into a uint8 buffer at the given offsets.

    With ``hash=True`` the copy also hashes every piece (one pass over memory):
    ``partials()`` gives each piece's hw64 partial sum keyed by its offset inside its tensor
    (tensor_offsets must be multiples of 8) and ``digest()`` the bucket digest, which the
    receiver reproduces while scattering.
    """
    _check_buffer(buf, "gather")
    tab, ln, tptrs, bptrs, toff = _layout(buf, tensors, offsets, lengths, tensor_offsets, "gather")
    h = _submit(_buffer_code(buf, len(tab)), tab[:, _DEVICE], ln, bptrs, tptrs,
                _hash_base(toff, "gather") if hash else None, (buf, tensors), "gather")
    return h if async_op else h.wait(timeout)


def scatter(buf: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int], *,
            lengths: Sequence[int] | None = None, tensor_offsets: Sequence[int] | None = None,
            hash: bool = False, async_op: bool = False, timeout: float | None = None) -> CopyHandle:
    """Unpacks byte pieces of a uint8 buffer into tensors; the inverse of :func:`gather`.

    With ``hash=True`` the pieces are hashed as they are read, keyed like gather's.
    """
    _check_buffer(buf, "scatter")
    tab, ln, tptrs, bptrs, toff = _layout(buf, tensors, offsets, lengths, tensor_offsets, "scatter")
    h = _submit(tab[:, _DEVICE], _buffer_code(buf, len(tab)), ln, tptrs, bptrs,
                _hash_base(toff, "scatter") if hash else None, (buf, tensors), "scatter")
    return h if async_op else h.wait(timeout)


def scatter_regions(regions: Sequence[torch.Tensor], region_index, region_offsets,
                    tensors: Sequence[torch.Tensor], *, lengths, tensor_offsets,
                    hash: bool = False, async_op: bool = False,
                    timeout: float | None = None) -> CopyHandle:
    """Like :func:`scatter`, but piece i is read from ``regions[region_index[i]]`` (1-D uint8
    tensors, e.g. another process's storages mapped here) at byte ``region_offsets[i]``: the
    read side of a direct read (Note [Direct reads] in hotweights.replicate). Hash partials are
    keyed by ``tensor_offsets`` like gather/scatter's."""
    op = "scatter_regions"
    rtab = _byte_views(list(regions), op, "region")
    tab = _table(list(tensors), op)
    n = len(tab)
    ridx = np.asarray(region_index, np.int64).reshape(-1)
    roff = np.asarray(region_offsets, np.int64).reshape(-1)
    ln = np.asarray(lengths, np.int64).reshape(-1)
    toff = np.asarray(tensor_offsets, np.int64).reshape(-1)
    if not n == len(ridx) == len(roff) == len(ln) == len(toff):
        raise ValueError(f"{op}: {n} tensors, {len(ridx)} region indices, {len(roff)} region "
                         f"offsets, {len(ln)} lengths, {len(toff)} tensor offsets")
    bad = np.flatnonzero((ridx < 0) | (ridx >= len(rtab)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{op}: piece {i} names region {ridx[i]}, there are {len(rtab)}")
    tn = tab[:, _NBYTES]
    bad = np.flatnonzero((toff < 0) | (ln < 0) | (toff > tn) | (ln > tn - np.minimum(toff, tn)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{op}: piece {i} [{toff[i]}, {toff[i] + ln[i]}) is outside its tensor "
                         f"of {tn[i]} bytes")
    cap = rtab[ridx, _NBYTES] if n else np.zeros(0, np.int64)
    bad = np.flatnonzero((roff < 0) | (roff > cap) | (ln > cap - np.clip(roff, 0, cap)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{op}: piece {i} at offset {roff[i]} with {ln[i]} bytes runs past "
                         f"region {ridx[i]} of {cap[i]} bytes")
    h = _submit(tab[:, _DEVICE], rtab[ridx, _DEVICE] if n else np.zeros(0, np.int64), ln,
                tab[:, _PTR] + toff, (rtab[ridx, _PTR] if n else np.zeros(0, np.int64)) + roff,
                _hash_base(toff, op) if hash else None, (list(regions), list(tensors)), op)
    return h if async_op else h.wait(timeout)


def _byte_views(views: Sequence[torch.Tensor], op: str, what: str) -> np.ndarray:
    tab = _table(views, op)
    for i, v in enumerate(views):
        if v.dtype != torch.uint8 or v.dim() != 1:
            raise ValueError(f"{op}: {what} {i} must be a 1-D uint8 view, got "
                             f"{v.dtype}{tuple(v.shape)}")
    return tab


def _word_bases(byte_offsets, n: int, op: str) -> np.ndarray:
    offs = np.asarray(byte_offsets, dtype=np.int64).reshape(-1)
    if len(offs) != n:
        raise ValueError(f"{op}: {n} ranges but {len(offs)} hash offsets")
    if (offs < 0).any():
        i = int(np.flatnonzero(offs < 0)[0])
        raise ValueError(f"{op}: hash offset {offs[i]} of range {i} is negative")
    return _hash_base(offs, op)


def _hash_slots(hash_index, n: int, op: str) -> tuple[np.ndarray, int]:
    if hash_index is None:
        return np.arange(n, dtype=np.int64), n
    idx = np.asarray(hash_index, dtype=np.int64).reshape(-1)
    if len(idx) != n:
        raise ValueError(f"{op}: {n} ranges but {len(idx)} hash indices")
    if n and idx.min() < 0:
        raise ValueError(f"{op}: hash index {int(idx.min())} is negative")
    return idx, (int(idx.max()) + 1 if n else 0)


def copy_hashed(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
                hash_offsets: Sequence[int], *, hash_index: Sequence[int] | None = None,
                async_op: bool = False, timeout: float | None = None) -> CopyHandle:
    """Copies 1-D uint8 views ``srcs[i]`` into ``dsts[i]`` (same lengths) while hashing them.

    Range i holds the bytes at ``hash_offsets[i]`` (a multiple of 8) inside some tensor; its
    hw64 partial sum is keyed from there and added to accumulator ``hash_index[i]`` (default:
    one per range), so the ranges of one tensor, read in any number of pieces, add up to its
    checksum (``tensor_digest(partials[[k]], nbytes)``). Both sides on the CPU, or both on
    CUDA devices (the kernel hashes); ``partials()`` gives one value per accumulator.
    """
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_hashed: {len(dsts)} destinations but {len(srcs)} sources")
    td = _byte_views(dsts, "copy_hashed", "destination")
    ts = _byte_views(srcs, "copy_hashed", "source")
    bad = np.flatnonzero(td[:, _NBYTES] != ts[:, _NBYTES])
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"copy_hashed: range {i}: destination of {td[i, _NBYTES]} bytes, source "
                         f"of {ts[i, _NBYTES]} bytes")
    bases = _word_bases(hash_offsets, len(dsts), "copy_hashed")
    idx, nh = _hash_slots(hash_index, len(dsts), "copy_hashed")
    h = _submit(td[:, _DEVICE], ts[:, _DEVICE], ts[:, _NBYTES], td[:, _PTR], ts[:, _PTR], bases,
                (dsts, srcs), "copy_hashed", hash_index=idx, num_hashes=nh)
    return h if async_op else h.wait(timeout)


def hash_ranges(views: Sequence[torch.Tensor], hash_offsets: Sequence[int], *,
                hash_index: Sequence[int] | None = None) -> np.ndarray:
    """hw64 partial sums of 1-D uint8 host views, keyed like :func:`copy_hashed` (range i
    sits at byte ``hash_offsets[i]`` of its tensor) and summed per accumulator ``hash_index``.

    For bytes that are hashed where they are, without a copy (host memory only: on CUDA,
    hash while copying with :func:`copy_hashed`)."""
    views = list(views)
    tab = _byte_views(views, "hash_ranges", "view")
    if (tab[:, _DEVICE] != _CPU_CODE).any():
        i = int(np.flatnonzero(tab[:, _DEVICE] != _CPU_CODE)[0])
        raise ValueError(f"hash_ranges: view {i} is on {views[i].device}; host memory only "
                         "(hash CUDA bytes while copying them with copy_hashed)")
    bases = _word_bases(hash_offsets, len(views), "hash_ranges")
    idx, nh = _hash_slots(hash_index, len(views), "hash_ranges")
    out = np.zeros(nh, np.uint64)
    for k in range(len(views)):
        p = _C.hw64_partial(int(tab[k, _PTR]), int(tab[k, _NBYTES]), int(bases[k]))
        out[idx[k]] = (int(out[idx[k]]) + p) & _U64
    return out


def hash_pieces(buf: torch.Tensor, offsets, lengths, tensor_offsets) -> np.ndarray:
    """hw64 partial sums of byte pieces of a uint8 buffer, keyed like gather/scatter's (by the
    piece's offset inside its tensor), without copying them anywhere: what a relay uses to
    verify a bucket it only forwards."""
    _check_buffer(buf, "hash_pieces")
    offs = np.asarray(offsets, np.int64)
    ln = np.asarray(lengths, np.int64)
    toff = np.asarray(tensor_offsets, np.int64)
    if not len(offs) == len(ln) == len(toff):
        raise ValueError(f"hash_pieces: {len(offs)} offsets, {len(ln)} lengths, {len(toff)} tensor offsets")
    cap = buf.numel()
    bad = np.flatnonzero((offs < 0) | (ln < 0) | (offs > cap) | (ln > cap - np.clip(offs, 0, cap)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"hash_pieces: piece {i} at {offs[i]} with {ln[i]} bytes runs past the "
                         f"buffer of {buf.numel()} bytes")
    if buf.device.type == "cpu":
        return hash_ranges([buf[int(o):int(o) + int(n)] for o, n in zip(offs, ln)], toff)
    base = _hash_base(toff, "hash_pieces")
    ptr = buf.data_ptr()
    require_cuda_build("hashing CUDA memory")
    st = copy_settings(buf.device, buf.device)
    eng = _cuda_engine(buf.device.index, st)
    c = eng.submit(np.zeros(len(offs), np.uint64), np.asarray(ptr + offs, np.uint64),
                   np.asarray(ln, np.uint64), np.arange(len(offs), dtype=np.int64),
                   np.asarray(base, np.uint64), len(offs),
                   torch.cuda.current_stream(buf.device).cuda_stream, True)
    return np.asarray(CopyHandle(c, buf, ln).partials(), np.uint64)


def _hash_base(offsets: np.ndarray, op: str) -> np.ndarray:
    bad = np.flatnonzero(offsets % 8)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{op}: tensor offset {offsets[i]} of piece {i} is not a multiple of 8 "
                         "(needed to hash)")
    return offsets // 8


# --------------------------------------------------------------------------- KV-cache ops
# Thin typed doors to the ops of csrc/ops/kv_ops.cpp; hotweights.kv builds the API (named
# layouts, head maps, RoPE configs, the keep/transform/invalidate plan) on top of them.

__all__ += ["remap_kv_heads", "remap_kv_heads_", "rerotate_rope", "requantize_fp8"]

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _kv_axis(t: torch.Tensor, axis: int, op: str, arg: str, what: str) -> int:
    d = t.dim()
    torch._check(d > 0, lambda: f"hotweights::{op}: {what} is 0-d; expected a tensor with a {arg}")
    torch._check(
        -d <= axis < d,
        lambda: f"hotweights::{op}: {arg}={axis} is out of range for {what} of shape "
        f"{list(t.shape)} (expected {-d} <= {arg} < {d})",
    )
    return axis % d


def _check_head_map_meta(kv: torch.Tensor, head_map: torch.Tensor, head_axis: int, op: str):
    axis = _kv_axis(kv, head_axis, op, "head_axis", "the cache")
    torch._check(head_map.dtype == torch.long, lambda: f"hotweights::{op}: head_map must be "
                 f"int64 (torch.long), got {head_map.dtype}")
    torch._check(head_map.dim() == 1, lambda: f"hotweights::{op}: head_map must be 1-D, got "
                 f"shape {list(head_map.shape)}")
    torch._check(
        head_map.shape[0] == kv.shape[axis],
        lambda: f"hotweights::{op}: head_map has {head_map.shape[0]} entries, expected "
        f"num_kv_heads={kv.shape[axis]} (the size of axis {axis} of a cache of shape "
        f"{list(kv.shape)})",
    )


@torch.library.register_fake("hotweights::remap_kv_heads")
def _remap_kv_heads_fake(kv, head_map, head_axis):
    _check_head_map_meta(kv, head_map, head_axis, "remap_kv_heads")
    return torch.empty_like(kv)


@torch.library.register_fake("hotweights::remap_kv_heads_")
def _remap_kv_heads_inplace_fake(kv, head_map, head_axis):
    _check_head_map_meta(kv, head_map, head_axis, "remap_kv_heads_")
    return None


@torch.library.register_fake("hotweights::rerotate_rope")
def _rerotate_rope_fake(k, positions, old_inv_freq, new_inv_freq, scale, neox):
    torch._check(k.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: "hotweights::rerotate_rope: k must be float32, float16 or bfloat16, "
                 f"got {k.dtype}")
    torch._check(old_inv_freq.dtype == torch.float32 and new_inv_freq.dtype == torch.float32,
                 lambda: "hotweights::rerotate_rope: old_inv_freq and new_inv_freq must be float32")
    torch._check(old_inv_freq.shape == new_inv_freq.shape and old_inv_freq.dim() == 1,
                 lambda: "hotweights::rerotate_rope: old_inv_freq and new_inv_freq must be 1-D "
                 "of the same length")
    torch._check(2 * old_inv_freq.shape[0] <= k.shape[-1],
                 lambda: f"hotweights::rerotate_rope: rotary dim {2 * old_inv_freq.shape[0]} > "
                 f"head_dim={k.shape[-1]}")
    return k.new_empty(k.shape)


@torch.library.register_fake("hotweights::requantize_fp8")
def _requantize_fp8_fake(q, s_old, s_new, head_axis):
    torch._check(q.dtype in _FP8_DTYPES, lambda: "hotweights::requantize_fp8: q must be "
                 f"float8_e4m3fn or float8_e5m2, got {q.dtype}")
    axis = _kv_axis(q, head_axis, "requantize_fp8", "head_axis", "q")
    for name, s in (("s_old", s_old), ("s_new", s_new)):
        torch._check(s.numel() == 1 or (s.dim() == 1 and s.shape[0] == q.shape[axis]),
                     lambda: f"hotweights::requantize_fp8: {name} has shape {list(s.shape)}, "
                     f"expected a per-tensor or a per-head scale of length {q.shape[axis]}")
    return torch.empty_like(q)


def remap_kv_heads(kv: torch.Tensor, head_map: torch.Tensor, head_axis: int) -> torch.Tensor:
    """``out.select(head_axis, j) = kv.select(head_axis, head_map[j])`` (a gather; new tensor)."""
    return torch.ops.hotweights.remap_kv_heads(kv, head_map, int(head_axis))


def remap_kv_heads_(kv: torch.Tensor, head_map: torch.Tensor, head_axis: int) -> torch.Tensor:
    """In-place :func:`remap_kv_heads`; ``head_map`` must be a permutation. Returns ``kv``."""
    torch.ops.hotweights.remap_kv_heads_(kv, head_map, int(head_axis))
    return kv


def rerotate_rope(k: torch.Tensor, positions: torch.Tensor, old_inv_freq: torch.Tensor,
                  new_inv_freq: torch.Tensor, scale: float = 1.0,
                  neox: bool = True) -> torch.Tensor:
    """Re-rotates RoPE'd keys (last axis = head_dim) from old to new inverse frequencies (fp32)."""
    return torch.ops.hotweights.rerotate_rope(k, positions, old_inv_freq, new_inv_freq,
                                              float(scale), bool(neox))


def requantize_fp8(q: torch.Tensor, s_old: torch.Tensor, s_new: torch.Tensor,
                   head_axis: int = 0) -> torch.Tensor:
    """``fp8(dequant(q) * s_old / s_new)`` saturated; per-tensor or per-head scales (head_axis)."""
    return torch.ops.hotweights.requantize_fp8(q, s_old, s_new, int(head_axis))
