# SPDX-License-Identifier: Apache-2.0
"""Checkpoint sources: publish a safetensors checkpoint straight from disk.

A :class:`Checkpoint` is one ``.safetensors`` file, a directory of them (with or without a
``*.safetensors.index.json`` weight map) or a list of files. Opening it validates every file
before anything is published: the header (8-byte little-endian length + JSON) is parsed for the
tensors' ``data_offsets`` (the one thing the safetensors package does not expose), checked
(dtype known, sizes agree with dtype x shape, offsets inside the data and not overlapping, file
not truncated), and cross-checked against what the ``safetensors`` package reports (names,
dtypes, shapes). A bad file is a :class:`CheckpointError` naming the file and the tensor.

A :class:`CheckpointSource` is what ``Publisher.from_checkpoint`` publishes from (Note [Bucket
sources] in replicate.py): its manifest comes from a stored manifest beside the checkpoint
(``hotweights.manifest.msgpack`` or ``.json``, written by ``hotweights publish --checkpoint DIR
--store``) when it is fresh, else from one hashing pass over the files through bounded bounce
buffers; the bytes of each bucket are read straight into the publisher's slot, so a delta reads
only the changed tensors.

Note [Storage readers]
Every read goes through one :class:`StorageReader` interface (``read``/``submit`` of
:class:`ReadRequest` batches, ``read_into`` for one range), chosen at runtime by
:func:`select_reader` and reported (a log line and the ``reader_selected`` hook):

- ``gds``: GPUDirect Storage through KvikIO (``kvikio.CuFile``, compat mode AUTO unless
  ``KVIKIO_COMPAT_MODE`` is set), for CUDA destinations when HOTWEIGHTS_USE_GDS=1 or require.
  Reads land in device bounce buffers; every ``pread`` future is ``.get()``-ed before its bytes
  are used, and on error every outstanding one is still awaited before the buffers can go.
  A failed GDS setup (kvikio missing, kvikio in POSIX compatibility mode, a file that cannot
  be registered) falls back with a logged reason; with HOTWEIGHTS_USE_GDS=require it is an
  error that says why.
- ``posix_pinned``: bounce buffers, two per reader thread (HOTWEIGHTS_STORAGE_THREADS; pinned
  host memory when the destination is CUDA, page-aligned host memory otherwise), filled with
  ``preadv`` while the caller copies the previous ones into their destinations (H2D or memcpy,
  hashing on the way).
  O_DIRECT with 4 KiB-aligned offsets, lengths and buffers where the filesystem allows it; a
  filesystem that refuses it (EINVAL at open or at the first read) gets buffered reads, and
  the fallback is logged and reported (``o_direct_off`` hook).
- ``mmap``: the files mapped privately (never written, so never copied) and copied from the
  mapping, read ahead one 64 MiB group at a time. The last resort (or
  HOTWEIGHTS_STORAGE_READER=mmap).

Reads are planned in chunks of at most one bounce buffer: ranges of one file that are adjacent
(gaps up to 4 KiB) share a chunk, larger ranges are split at multiples of 8 bytes inside their
tensor so that hashing stays keyed by the tensor offset (Note [hw64 checksum]).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import json
import logging
import mmap
import os
import signal
import struct
import sys
import threading
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from . import config as _config
from . import ops
from .manifest import _ST_DTYPES, Manifest, ManifestError, dtype_from_name
from .replicate import BucketSource

__all__ = ["Checkpoint", "CheckpointError", "CheckpointSource", "TensorInfo", "StorageError",
           "StorageReader", "ReadRequest", "ReadHandle", "PosixReader", "MmapReader", "GdsReader",
           "select_reader", "add_hook", "write_manifest", "read_header", "MANIFEST_NAMES", "ALIGN"]

log = logging.getLogger("hotweights")

ALIGN = 4096                      # O_DIRECT and GDS alignment (offsets, lengths, buffers)
MAX_HEADER = 100_000_000          # the safetensors format's own limit on the JSON header
MANIFEST_NAMES = ("hotweights.manifest.msgpack", "hotweights.manifest.json")


class CheckpointError(ValueError):
    """A checkpoint file or index is malformed, inconsistent or missing; names file and tensor."""


class StorageError(RuntimeError):
    """A read failed, or a required reader (HOTWEIGHTS_USE_GDS=require) is unavailable."""


# --------------------------------------------------------------------------- hooks

# Note [Storage hooks]: observability without a dependency on hotweights.metrics. Events:
#   "reader_selected" (backend: str, detail: dict)  once per reader chosen by select_reader
#   "o_direct_off"    (backend: str, detail: dict)  a file got buffered reads (path, reason)
#   "bytes_read"      (backend: str, nbytes: int)   after every batch: bytes read from storage
# The metrics module wires them to hotweights_storage_backend_info{backend} and
# hotweights_storage_read_bytes_total{backend}. A hook that raises is logged, never propagated.
_HOOK_EVENTS = ("reader_selected", "o_direct_off", "bytes_read")
_hooks: dict[str, list[Callable]] = {e: [] for e in _HOOK_EVENTS}
_hooks_lock = threading.Lock()


def add_hook(event: str, fn: Callable[[str, Any], None]) -> Callable[[], None]:
    """Calls ``fn(backend, payload)`` on each storage ``event`` (see Note [Storage hooks]);
    returns a function that removes the hook."""
    if event not in _hooks:
        raise ValueError(f"add_hook: unknown event {event!r}, expected one of {', '.join(_HOOK_EVENTS)}")
    with _hooks_lock:
        _hooks[event].append(fn)

    def remove() -> None:
        with _hooks_lock:
            if fn in _hooks[event]:
                _hooks[event].remove(fn)

    return remove


def _emit(event: str, backend: str, payload: Any) -> None:
    with _hooks_lock:
        fns = list(_hooks[event])
    for fn in fns:
        try:
            fn(backend, payload)
        except Exception as e:  # observability must never break a read
            log.warning("storage hook %s for %s failed: %s: %s", event, backend, type(e).__name__, e)


# --------------------------------------------------------------------------- checkpoint layout


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives: ``offset`` is absolute in ``file``."""

    name: str
    file: str
    dtype: str              # manifest dtype name ("bfloat16", ...)
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str) -> tuple[int, dict]:
    """Parses and validates a safetensors header; returns (data start, {name: TensorInfo}).

    Checks: the length prefix fits the file, the JSON is an object of entries with a known
    dtype, a shape of non-negative ints and ``data_offsets`` whose size equals dtype x shape,
    inside the data section (a shorter file is truncated) and not overlapping each other.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, a safetensors file starts "
                                      "with an 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} exceeds the safetensors limit "
                                      f"of {MAX_HEADER} bytes (not a safetensors file?)")
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file "
                                      f"({size} bytes): truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    start = 8 + n
    data_size = size - start
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in _ST_DTYPES:
            raise CheckpointError(f"{where}: dtype {code!r} is unknown to hotweights "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in offs)):
            raise CheckpointError(f"{where}: data_offsets {offs!r} is not a [begin, end] pair")
        b, end = offs
        dtype = _ST_DTYPES[code]
        want = int(np.prod(shape, dtype=object)) * dtype_from_name(dtype).itemsize
        if b < 0 or end < b:
            raise CheckpointError(f"{where}: data_offsets [{b}, {end}] are not an increasing pair")
        if end - b != want:
            raise CheckpointError(f"{where}: data_offsets [{b}, {end}] hold {end - b} bytes, but "
                                  f"{code}{shape} needs {want}")
        out[name] = TensorInfo(name, path, dtype, tuple(shape), start + b, end - b)
        spans.append((b, end, name))
    spans.sort()
    past = [s for s in spans if s[1] > data_size]
    if past:  # name the first tensor affected, in file order
        b, end, name = past[0]
        more = f" (and {len(past) - 1} tensor(s) after it)" if len(past) > 1 else ""
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{b}, {end}] run past the end "
                              f"of the data ({data_size} bytes){more}: the file is truncated or its "
                              "header lies")
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensor {n1!r} at data_offsets [{b1}, {e1}] overlaps "
                                  f"tensor {n0!r} at [{b0}, {e0}]")
    return start, out


def _cross_check(path: str, infos: dict[str, TensorInfo]) -> None:
    """What the safetensors package exposes (names, dtypes, shapes) must match the header we
    parsed; it also applies its own validation (coverage of the data section, ...)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("reading safetensors checkpoints needs the safetensors package: "
                              "pip install hotweights[checkpoint]") from None
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            meta = {}
            for k in keys:
                sl = f.get_slice(k)
                meta[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except Exception as e:
        raise CheckpointError(f"{path}: rejected by the safetensors package: {e}") from None
    if set(keys) != set(infos):
        extra = sorted(set(keys) ^ set(infos))[:3]
        raise CheckpointError(f"{path}: the safetensors package lists other tensors than the "
                              f"header: {extra}")
    inv = {v: k for k, v in _ST_DTYPES.items()}
    for k, (code, shape) in meta.items():
        t = infos[k]
        if inv[t.dtype] != code or t.shape != shape:
            raise CheckpointError(f"{path}: tensor {k!r}: the header says {inv[t.dtype]}{list(t.shape)}, "
                                  f"the safetensors package {code}{list(shape)}")


def _file_signature(paths: Iterable[str]) -> tuple:
    sig = []
    for p in paths:
        st = os.stat(p)
        sig.append((p, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sig)


class Checkpoint:
    """A validated safetensors checkpoint: ``tensors`` (name -> TensorInfo, in file and offset
    order), ``files``, ``index`` (the weight-map file, if any), ``directory``."""

    def __init__(self, files: list[str], tensors: dict[str, TensorInfo], index: str | None,
                 directory: str, origin: Any = None):
        self.files = files
        self.tensors = tensors
        self.index = index
        self.directory = directory
        self.origin = origin if origin is not None else (index or files)  # what open() was given
        self.signature = _file_signature(files)

    @classmethod
    def open(cls, path: str | os.PathLike | Sequence[str | os.PathLike]) -> "Checkpoint":
        """Opens and validates a file, a directory (with an index when it has one), an index
        JSON, or a list of files (see module docstring)."""
        index = None
        origin = path
        if isinstance(path, (str, os.PathLike)):
            p = os.path.abspath(os.fspath(path))
            if os.path.isdir(p):
                idx = sorted(f for f in os.listdir(p) if f.endswith(".safetensors.index.json"))
                if len(idx) > 1:
                    raise CheckpointError(f"{p}: several index files ({', '.join(idx)}): pass the "
                                          "one to publish")
                if idx:
                    index = os.path.join(p, idx[0])
                else:
                    files = sorted(os.path.join(p, f) for f in os.listdir(p)
                                   if f.endswith(".safetensors"))
                    if not files:
                        raise CheckpointError(f"{p}: no .safetensors files in this directory")
            elif os.path.isfile(p):
                if p.endswith(".json"):
                    index = p
                else:
                    files = [p]
            else:
                raise CheckpointError(f"{p}: no such file or directory")
        else:
            files = [os.path.abspath(os.fspath(x)) for x in path]
            if not files:
                raise CheckpointError("Checkpoint.open: empty list of files")
            for f in files:
                if not os.path.isfile(f):
                    raise CheckpointError(f"{f}: no such file")
        if index is not None:
            weight_map = _read_index(index)
            files = sorted({_beside(index, f) for f in weight_map.values()})
            for name, f in weight_map.items():
                if not os.path.isfile(_beside(index, f)):
                    raise CheckpointError(f"{index}: tensor {name!r} is mapped to {f}, which does "
                                          "not exist")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            _, infos = read_header(f)
            _cross_check(f, infos)
            for name in sorted(infos, key=lambda k: infos[k].offset):
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} "
                                          f"and {f}")
                tensors[name] = infos[name]
        if index is not None:
            for name, f in weight_map.items():
                t = tensors.get(name)
                if t is None or t.file != _beside(index, f):
                    raise CheckpointError(f"{index}: tensor {name!r} is mapped to {f}, but {f} does "
                                          "not hold it" + (f" ({t.file} does)" if t else ""))
            unlisted = [n for n in tensors if n not in weight_map]
            if unlisted:
                raise CheckpointError(f"{index}: {tensors[unlisted[0]].file} holds tensor "
                                      f"{unlisted[0]!r}, which the index does not list")
        directory = os.path.dirname(index or files[0])
        return cls(files, tensors, index, directory, origin)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def changed_on_disk(self) -> bool:
        """True when a file was replaced, resized or touched since it was validated."""
        try:
            return _file_signature(self.files) != self.signature
        except OSError:
            return True

    def stored_manifest(self) -> str | None:
        """The stored manifest beside the checkpoint, if one exists (MANIFEST_NAMES)."""
        for n in MANIFEST_NAMES:
            p = os.path.join(self.directory, n)
            if os.path.isfile(p):
                return p
        return None

    def __repr__(self) -> str:
        return (f"Checkpoint({self.directory!r}, {len(self.files)} file(s), {len(self.tensors)} "
                f"tensors, {self.total_bytes / 2**20:.1f} MiB{', indexed' if self.index else ''})")


def _beside(index: str, name: str) -> str:
    return os.path.normpath(os.path.join(os.path.dirname(index), name))


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index, "rb") as f:
            d = json.loads(f.read())
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: no \"weight_map\" object (name -> file)")
    for name, f in wm.items():
        if not isinstance(f, str) or not f.endswith(".safetensors"):
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {f!r}, expected a "
                                  ".safetensors file name")
        if os.path.isabs(f) or os.path.normpath(f).startswith(".."):
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {f!r}, outside the "
                                  "index's directory")
    return wm


# --------------------------------------------------------------------------- readers


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    """Read ``nbytes`` at ``offset`` of ``path`` into ``dest`` (a 1-D uint8 view of nbytes on
    the reader's device; None: only hash them). ``hash_offset``: where the range starts inside
    its tensor (a multiple of 8), which keys its hash (Note [hw64 checksum])."""

    path: str
    offset: int
    nbytes: int
    dest: torch.Tensor | None = None
    hash_offset: int = 0


class ReadHandle:
    """A batch submitted with :meth:`StorageReader.submit`; ``wait()`` returns its result."""

    def __init__(self, fut: concurrent.futures.Future):
        self._fut = fut

    def done(self) -> bool:
        """True when the batch finished (or failed)."""
        return self._fut.done()

    def wait(self, timeout: float | None = None) -> np.ndarray | None:
        """Blocks until the batch is done; returns the partials (hash=True) or None."""
        try:
            return self._fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"read batch not finished after {timeout} s") from None


@dataclasses.dataclass
class _Seg:
    req: int        # request index (and hash accumulator)
    file_off: int   # absolute file offset of the segment
    length: int
    req_off: int    # offset inside the request's range


@dataclasses.dataclass
class _Chunk:
    path: str
    start: int      # aligned file offset the read starts at
    end: int        # end of the last byte needed
    segs: list


def _down(x: int) -> int:
    return x - x % ALIGN


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def _plan_chunks(requests: Sequence[ReadRequest], cap: int) -> list[_Chunk]:
    """Chunks of at most ``cap`` aligned bytes covering every request (see module docstring)."""
    seg_max = cap - 2 * ALIGN  # room for the alignment slack at both ends; a multiple of 8
    segs = []
    for i, r in enumerate(requests):
        off = 0
        while off < r.nbytes:
            n = min(seg_max, r.nbytes - off)
            segs.append((r.path, r.offset + off, n, i, off))
            off += n
    segs.sort(key=lambda s: (s[0], s[1]))
    chunks: list[_Chunk] = []
    for path, fo, n, i, ro in segs:
        c = chunks[-1] if chunks else None
        if c is not None and c.path == path and fo <= c.end + ALIGN and _up(max(c.end, fo + n)) - c.start <= cap:
            c.end = max(c.end, fo + n)
            c.segs.append(_Seg(i, fo, n, ro))
        else:
            chunks.append(_Chunk(path, _down(fo), fo + n, [_Seg(i, fo, n, ro)]))
    return chunks


def _aligned_buffer(nbytes: int, device: torch.device, pinned: bool) -> torch.Tensor:
    """A uint8 buffer of nbytes whose address is a multiple of ALIGN."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=device, pin_memory=pinned)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + nbytes]


class StorageReader:
    """Reads byte ranges of files into destination tensors (Note [Storage readers]).

    ``name`` is the backend ("gds", "posix_pinned", "mmap"); ``detail`` says how it runs;
    ``stats`` counts ``bytes_requested`` (what callers asked for), ``bytes_read`` (what came
    from storage, alignment included), ``requests`` and ``batches``. One batch runs at a time;
    ``close()`` releases threads, descriptors, mappings and buffers.
    """

    name = "reader"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = _normalize_device(device)
        self.detail: dict[str, Any] = {}
        self.stats = {"bytes_requested": 0, "bytes_read": 0, "requests": 0, "batches": 0}
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._ids: dict[str, tuple] = {}  # path -> identity of the file its cached handle holds

    # -- public API

    def read(self, requests: Sequence[ReadRequest], *, hash: bool = False,
             progress: Callable[[int], None] | None = None) -> np.ndarray | None:
        """Reads a batch (blocking). With ``hash=True`` returns the hw64 partial sum of every
        request (keyed by its ``hash_offset``); ``progress(bytes_done)`` after each chunk."""
        requests = list(requests)
        for i, r in enumerate(requests):
            self._check(i, r)
        with self._lock:
            if self._closed:
                raise StorageError(f"{self.name} reader is closed")
            before = self.stats["bytes_read"]
            self._revalidate({r.path for r in requests})
            out = self._run(requests, hash, progress)
            self.stats["requests"] += len(requests)
            self.stats["batches"] += 1
            self.stats["bytes_requested"] += sum(r.nbytes for r in requests)
            _emit("bytes_read", self.name, self.stats["bytes_read"] - before)
            return out

    def submit(self, requests: Sequence[ReadRequest], *, hash: bool = False) -> ReadHandle:
        """Starts a batch in the background; the returned handle's ``wait()`` gives the result
        (keep the destinations untouched until then)."""
        with self._lock:
            if self._closed:
                raise StorageError(f"{self.name} reader is closed")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"hw-{self.name}")
            return ReadHandle(self._pool.submit(self.read, list(requests), hash=hash))

    def read_into(self, path: str, file_offset: int, nbytes: int, dest: torch.Tensor) -> None:
        """Reads ``nbytes`` at ``file_offset`` of ``path`` into the uint8 view ``dest``."""
        self.read([ReadRequest(os.fspath(path), int(file_offset), int(nbytes), dest)])

    def forget(self) -> None:
        """Closes the cached descriptors and mappings (the next read reopens them), so that
        nothing of this reader keeps the files' pages mapped."""
        with self._lock:
            for p in list(self._ids):
                del self._ids[p]
                self._drop(p)

    def close(self) -> None:
        """Waits for a running batch, then frees everything the reader holds."""
        pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pool = None
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name} on {self.device}, {self.detail})"

    # -- for subclasses

    def _run(self, requests: list[ReadRequest], hash: bool, progress) -> np.ndarray | None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _drop(self, path: str) -> None:
        """Closes the cached handle of one file (it was replaced or changed on disk)."""

    def _remember(self, path: str, st: os.stat_result) -> None:
        self._ids[path] = _identity(st)

    def _revalidate(self, paths: Iterable[str]) -> None:
        """Cached descriptors and mappings follow the file a path named when it was opened: a
        checkpoint rewritten or replaced since must be reopened, never read through the old
        handle (which would return the old bytes, or SIGBUS past a mapping's new end)."""
        for p in paths:
            old = self._ids.get(p)
            if old is None:
                continue
            try:
                now = _identity(os.stat(p))
            except OSError:
                now = None
            if now != old:
                log.info("storage: %s changed on disk since it was opened: reopening it", p)
                del self._ids[p]
                self._drop(p)

    def _check(self, i: int, r: ReadRequest) -> None:
        if r.offset < 0 or r.nbytes < 0:
            raise ValueError(f"{self.name} reader: request {i} ({r.path}) has offset {r.offset} "
                             f"and nbytes {r.nbytes}; expected non-negative values")
        if r.hash_offset % 8:
            raise ValueError(f"{self.name} reader: request {i} ({r.path}) has hash_offset "
                             f"{r.hash_offset}, expected a multiple of 8")
        d = r.dest
        if d is not None:
            if d.dtype != torch.uint8 or d.dim() != 1 or not d.is_contiguous() or d.numel() != r.nbytes:
                raise ValueError(f"{self.name} reader: request {i} ({r.path}) needs a contiguous "
                                 f"1-D uint8 destination of {r.nbytes} bytes, got "
                                 f"{d.dtype}{tuple(d.shape)}")
            if d.device != self.device:
                raise ValueError(f"{self.name} reader: request {i} ({r.path}) has its destination "
                                 f"on {d.device}; this reader serves {self.device}")

    def _deliver(self, requests: list[ReadRequest], pieces: list[tuple[int, torch.Tensor, int]],
                 hash: bool, partials: np.ndarray | None, scratch: torch.Tensor | None = None) -> None:
        """Copies (and/or hashes) source views into their requests' destinations.

        ``pieces``: (request index, source view, offset inside the request). Same-kind copies
        hash while copying; host bytes bound for CUDA are hashed on the host first; hash-only
        pieces on a device are hashed by copying them into ``scratch``."""
        if not pieces:
            return
        srcs = [p[1] for p in pieces]
        idx = np.fromiter((p[0] for p in pieces), np.int64, len(pieces))
        hoff = [requests[p[0]].hash_offset + p[2] for p in pieces]
        with_dest = [requests[p[0]].dest is not None for p in pieces]
        if all(with_dest):
            dsts = [requests[k].dest[o:o + s.numel()] for (k, s, o) in pieces]
            same = srcs[0].device.type == dsts[0].device.type
            if hash and same:
                h = ops.copy_hashed(dsts, srcs, hoff, hash_index=idx)
                _accumulate(partials, h.partials())
                return
            if hash:  # host bounce -> CUDA: hash where the bytes are, then copy
                _accumulate(partials, ops.hash_ranges(srcs, hoff, hash_index=idx))
            ops.copy_(dsts, srcs)
            return
        if any(with_dest):
            keep = [i for i, w in enumerate(with_dest) if w]
            only = [i for i, w in enumerate(with_dest) if not w]
            self._deliver(requests, [pieces[i] for i in keep], hash, partials, scratch)
            self._deliver(requests, [pieces[i] for i in only], hash, partials, scratch)
            return
        if not hash:
            return  # nothing to deliver and nothing to hash
        if srcs[0].device.type == "cpu":
            _accumulate(partials, ops.hash_ranges(srcs, hoff, hash_index=idx))
            return
        # Device bytes are hashed by the copy kernel: copy them into the scratch buffer, as
        # many at a time as it holds (pieces of one chunk may overlap, so they can exceed it).
        cap, k = scratch.numel(), 0
        while k < len(srcs):
            used, group = 0, []
            while k < len(srcs) and (not group or used + srcs[k].numel() <= cap):
                group.append(k)
                used += srcs[k].numel()
                k += 1
            offs = np.cumsum([0] + [srcs[j].numel() for j in group])
            h = ops.copy_hashed([scratch[int(offs[i]):int(offs[i + 1])] for i in range(len(group))],
                                [srcs[j] for j in group], [hoff[j] for j in group],
                                hash_index=idx[group])
            _accumulate(partials, h.partials())


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _accumulate(total: np.ndarray, part: np.ndarray) -> None:
    n = len(part)
    with np.errstate(over="ignore"):
        total[:n] += part  # mod 2^64, like the partial sums themselves


def _normalize_device(device) -> torch.device:
    d = torch.device(device)
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"storage: device {d} is not supported (cpu or cuda)")
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class _BounceReader(StorageReader):
    """The double-buffered chunk pipeline shared by the posix and GDS readers: ``buffers``
    bounce buffers of ``bounce_bytes``; reads of the next chunks run while the current one is
    delivered. Subclasses start a read into a buffer and finish (await) it."""

    def __init__(self, device, bounce_bytes: int, buffers: int):
        super().__init__(device)
        if bounce_bytes < 4 * ALIGN or bounce_bytes % ALIGN:
            raise ValueError(f"{self.name} reader: bounce_bytes={bounce_bytes}, expected a multiple "
                             f"of {ALIGN} of at least {4 * ALIGN}")
        if buffers < 2:
            raise ValueError(f"{self.name} reader: buffers={buffers}, expected at least 2")
        self.bounce_bytes = int(bounce_bytes)
        self.nbuf = int(buffers)
        self._bufs: list[torch.Tensor] = []
        self._scratch: torch.Tensor | None = None
        self._sizes: dict[str, int] = {}

    def _buffers(self) -> list[torch.Tensor]:
        if not self._bufs:
            self._bufs = [self._alloc(self.bounce_bytes) for _ in range(self.nbuf)]
        return self._bufs

    def _alloc(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, chunk: _Chunk, length: int, buf: torch.Tensor):
        raise NotImplementedError

    def _finish(self, pending, chunk: _Chunk) -> int:
        raise NotImplementedError

    def _file_size(self, path: str) -> int:
        s = self._sizes.get(path)
        if s is None:
            s = self._sizes[path] = os.path.getsize(path)
        return s

    def _run(self, requests, hash, progress):
        chunks = _plan_chunks(requests, self.bounce_bytes)
        partials = np.zeros(len(requests), np.uint64) if hash else None
        if not chunks:
            return partials
        bufs = self._buffers()
        if hash and bufs[0].device.type == "cuda" and any(r.dest is None for r in requests) \
                and self._scratch is None:
            self._scratch = self._alloc(self.bounce_bytes)
        pending: collections.deque = collections.deque()
        done_bytes = 0

        def start(k: int) -> None:
            ch = chunks[k]
            length = self._length(ch)
            pending.append((k, self._start(ch, length, bufs[k % self.nbuf])))

        try:
            for k in range(min(self.nbuf, len(chunks))):
                start(k)
            for k in range(len(chunks)):
                _, p = pending.popleft()
                ch = chunks[k]
                got = self._finish(p, ch)  # awaited before the bytes are used
                self.stats["bytes_read"] += got
                if got < ch.end - ch.start:
                    raise StorageError(f"{ch.path}: read {got} bytes at offset {ch.start}, needed "
                                       f"{ch.end - ch.start}: the file is shorter than its header "
                                       "says (truncated while publishing?)")
                buf = bufs[k % self.nbuf]
                pieces = [(s.req, buf[s.file_off - ch.start:s.file_off - ch.start + s.length], s.req_off)
                          for s in ch.segs]
                self._deliver(requests, pieces, hash, partials, self._scratch)
                done_bytes += sum(s.length for s in ch.segs)
                if progress is not None:
                    progress(done_bytes)
                if k + self.nbuf < len(chunks):
                    start(k + self.nbuf)  # its buffer is free: the delivery above completed
        finally:
            # Never leave a read in flight into a buffer we may free or reuse.
            while pending:
                _, p = pending.popleft()
                try:
                    self._finish(p, None)
                except Exception:
                    pass
        return partials

    def _length(self, ch: _Chunk) -> int:
        return _up(ch.end) - ch.start

    def _release(self) -> None:
        self._bufs = []
        self._scratch = None


class PosixReader(_BounceReader):
    """Double-buffered ``preadv`` into bounce buffers (pinned when the destination is CUDA),
    O_DIRECT where the filesystem allows it (Note [Storage readers])."""

    name = "posix_pinned"

    def __init__(self, device="cpu", *, bounce_bytes: int | None = None, threads: int | None = None,
                 direct: bool | None = None, config=None):
        cfg = config or _config.get()
        threads = int(threads or cfg.storage_threads)
        super().__init__(device, int(bounce_bytes or cfg.storage_bounce_mb << 20), 2 * threads)
        self.direct = cfg.storage_odirect if direct is None else bool(direct)
        self.pinned = self.device.type == "cuda"
        self.threads = threads
        self._fds: dict[str, tuple[int, bool]] = {}
        self._fd_lock = threading.Lock()
        self._retired: list[int] = []  # refused O_DIRECT descriptors, closed after the batch
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        self.detail = {"pinned": self.pinned, "o_direct": "on" if self.direct else "off (setting)",
                       "buffers": self.nbuf, "bounce_bytes": self.bounce_bytes,
                       "threads": self.threads}
        self._buffers()  # allocate now: a failure (no pinned memory) shows at selection

    def _alloc(self, nbytes):
        return _aligned_buffer(nbytes, torch.device("cpu"), self.pinned)

    def _fd(self, path: str) -> tuple[int, bool]:
        with self._fd_lock:  # reader threads share the descriptors
            e = self._fds.get(path)
            if e is None:
                e = self._open(path, self.direct)
                self._fds[path] = e
                self._remember(path, os.fstat(e[0]))
            return e

    def _buffered_instead(self, path: str, fd: int) -> tuple[int, bool]:
        """Replaces a refused O_DIRECT descriptor by a buffered one (once, whichever thread
        sees the refusal first); the old one is closed after the batch, as another thread may
        still be reading through it."""
        with self._fd_lock:
            cur = self._fds.get(path)
            if cur == (fd, True):
                self._retired.append(fd)
                self._direct_off(path, "the filesystem refuses O_DIRECT reads (EINVAL)")
                cur = self._fds[path] = self._open(path, False)
        return cur if cur is not None else self._fd(path)

    def _drop(self, path):
        # Called between batches only (no read in flight).
        with self._fd_lock:
            e = self._fds.pop(path, None)
            if e is not None:
                os.close(e[0])
            self._sizes.pop(path, None)

    def _open(self, path: str, direct: bool) -> tuple[int, bool]:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(path, flags | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise StorageError(f"{path}: cannot open: {e.strerror}") from None
                self._direct_off(path, "the filesystem refuses O_DIRECT at open (EINVAL)")
        try:
            return os.open(path, flags), False
        except OSError as e:
            raise StorageError(f"{path}: cannot open: {e.strerror}") from None

    def _direct_off(self, path: str, reason: str) -> None:
        log.info("storage: %s: buffered reads (%s)", path, reason)
        self.detail["o_direct"] = f"off for some files ({reason})"
        _emit("o_direct_off", self.name, {"path": path, "reason": reason})

    def _pread(self, path: str, view: memoryview, offset: int) -> int:
        fd, direct = self._fd(path)
        got = 0
        while got < len(view):
            try:
                n = os.preadv(fd, [view[got:]], offset + got)
            except OSError as e:
                if direct and e.errno == errno.EINVAL and got == 0:
                    # Some filesystems accept O_DIRECT at open and refuse the reads.
                    fd, direct = self._buffered_instead(path, fd)
                    continue
                raise StorageError(f"{path}: read of {len(view) - got} bytes at offset "
                                   f"{offset + got} failed: {e.strerror}") from None
            if n == 0:
                break  # end of file
            got += n
            if direct and n % ALIGN:
                break  # a short O_DIRECT read ends at the end of the file
        return got

    def _run(self, requests, hash, progress):
        try:
            return super()._run(requests, hash, progress)
        finally:  # no read is in flight now: refused O_DIRECT descriptors can go
            with self._fd_lock:
                retired, self._retired = self._retired, []
            for fd in retired:
                os.close(fd)

    def _start(self, chunk, length, buf):
        if self._io is None:
            self._io = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="hw-read")
        view = memoryview(buf.numpy())[:length]
        return self._io.submit(self._pread, chunk.path, view, chunk.start)

    def _finish(self, pending, chunk):
        return pending.result()

    def _release(self):
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        for fd in [e[0] for e in self._fds.values()] + self._retired:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._retired.clear()
        super()._release()


class GdsReader(_BounceReader):
    """GPUDirect Storage through KvikIO: ``CuFile.pread`` into device bounce buffers, every
    future awaited before the bytes are used (Note [Storage readers]). ``kvikio`` is the
    imported module (tests inject a fake); ``device`` is normally CUDA (KvikIO also reads host
    memory, through POSIX, which the tests use)."""

    name = "gds"

    def __init__(self, device, kvikio, *, bounce_bytes: int | None = None, config=None,
                 detail: dict | None = None):
        cfg = config or _config.get()
        super().__init__(device, int(bounce_bytes or cfg.storage_bounce_mb << 20), 2)
        self.kvikio = kvikio
        self._files: dict[str, Any] = {}
        self.detail = dict(detail or {})
        self.detail.update(buffers=self.nbuf, bounce_bytes=self.bounce_bytes)

    def _alloc(self, nbytes):
        # Allocated on first use, so that selecting this reader touches no device memory.
        return _aligned_buffer(nbytes, self.device, False)

    def _file(self, path: str):
        f = self._files.get(path)
        if f is None:
            try:
                st = os.stat(path)
                f = self.kvikio.CuFile(path, "r")
            except Exception as e:
                raise StorageError(f"{path}: kvikio cannot open it: {type(e).__name__}: {e}") from None
            self._files[path] = f
            self._remember(path, st)
        return f

    def _drop(self, path):
        f = self._files.pop(path, None)
        if f is not None:
            f.close()
        self._sizes.pop(path, None)

    def _length(self, ch):
        # Whole pages, but never past the end of the file (KvikIO's POSIX path treats a read
        # past EOF as an error).
        return min(_up(ch.end), self._file_size(ch.path)) - ch.start

    def _start(self, chunk, length, buf):
        view = buf[:length]
        target = view if view.device.type == "cuda" else view.numpy()
        return self._file(chunk.path).pread(target, length, chunk.start)

    def _finish(self, pending, chunk):
        try:
            return int(pending.get())
        except Exception as e:
            where = chunk.path if chunk is not None else "a file"
            raise StorageError(f"{where}: kvikio read failed: {type(e).__name__}: {e}") from None

    def _release(self):
        for f in self._files.values():
            try:
                f.close()
            except Exception as e:
                log.warning("storage: closing a kvikio file failed: %s", e)
        self._files.clear()
        super()._release()


class MmapReader(StorageReader):
    """Copies from read-only (private, never written) mappings of the files."""

    name = "mmap"

    def __init__(self, device="cpu"):
        super().__init__(device)
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self.detail = {"readahead": f"WILLNEED {self.STEP >> 20} MiB ahead"}

    def _map(self, path: str) -> torch.Tensor:
        e = self._maps.get(path)
        if e is None:
            try:
                with open(path, "rb") as f:
                    # ACCESS_COPY: a private mapping that torch can wrap without a read-only
                    # warning; nothing writes to it, so no page is ever copied.
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    st = os.fstat(f.fileno())
            except (OSError, ValueError) as err:
                raise StorageError(f"{path}: cannot map: {err}") from None
            e = (m, torch.frombuffer(m, dtype=torch.uint8))
            self._maps[path] = e
            self._remember(path, st)
        return e[1]

    def _drop(self, path):
        e = self._maps.pop(path, None)
        if e is not None:
            m = e[0]
            del e  # the tensor holds a buffer export of the mapping
            try:
                m.close()
            except BufferError:  # a view escaped: the mapping goes when it does
                log.warning("storage: mapping of %s still referenced when dropped", path)

    STEP = 64 << 20  # bytes copied per group; the next group is read ahead meanwhile

    def _run(self, requests, hash, progress):
        partials = np.zeros(len(requests), np.uint64) if hash else None
        groups: list[list] = [[]]  # of (request, path, file offset, length, offset in request)
        size = 0
        for i, r in enumerate(requests):
            if not r.nbytes:
                continue
            t = self._map(r.path)
            if r.offset + r.nbytes > t.numel():
                raise StorageError(f"{r.path}: needed bytes [{r.offset}, {r.offset + r.nbytes}) "
                                   f"but the file has {t.numel()}: truncated while publishing?")
            for off in range(0, r.nbytes, self.STEP):
                n = min(self.STEP, r.nbytes - off)
                if size + n > self.STEP and groups[-1]:
                    groups.append([])
                    size = 0
                groups[-1].append((i, r.path, r.offset + off, n, off))
                size += n
        done = 0
        self._advise(groups[0])
        for k, g in enumerate(groups):
            if k + 1 < len(groups):
                self._advise(groups[k + 1])  # asynchronous: the disk works while we copy
            self._deliver(requests, [(i, self._maps[p][1][fo:fo + n], ro) for i, p, fo, n, ro in g],
                          hash, partials)
            done += sum(x[3] for x in g)
            if progress is not None:
                progress(done)
        self.stats["bytes_read"] += done
        return partials

    def _advise(self, group: list) -> None:
        """Starts reading a group's pages (readahead bounded to one group ahead)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for _, path, fo, n, _ in group:
            a = _down(fo)
            self._maps[path][0].madvise(mmap.MADV_WILLNEED, a, fo + n - a)

    def _release(self):
        for path in list(self._maps):
            self._drop(path)


# --------------------------------------------------------------------------- selection


def _gds_reader(device: torch.device, probe: str | None, cfg) -> tuple[GdsReader | None, str]:
    """A working GDS reader, or None and why not."""
    if device.type != "cuda":
        return None, f"the destination is {device}: GPUDirect Storage reads into CUDA memory"
    try:
        import kvikio  # optional extra: pip install kvikio-cu13 (hotweights[gds])
    except Exception as e:  # ImportError, or a broken install failing to load its library
        return None, f"kvikio is not importable ({type(e).__name__}: {e}); install kvikio-cu13"
    try:
        defaults = kvikio.defaults
        if "KVIKIO_COMPAT_MODE" not in os.environ:  # the user's explicit choice wins
            if hasattr(defaults, "set"):
                defaults.set("compat_mode", kvikio.CompatMode.AUTO)
            else:  # kvikio < 25.04
                defaults.compat_mode_reset(kvikio.CompatMode.AUTO)
        if hasattr(defaults, "is_compat_mode_preferred"):
            compat = bool(defaults.is_compat_mode_preferred())
            mode = defaults.get("compat_mode") if hasattr(defaults, "get") else defaults.compat_mode()
        else:
            mode = defaults.compat_mode()
            compat = mode == kvikio.CompatMode.ON
    except Exception as e:
        return None, f"kvikio setup failed ({type(e).__name__}: {e})"
    if compat:
        return None, (f"kvikio runs in POSIX compatibility mode (compat_mode={mode}): libcufile "
                      "not found, WSL, or /run/udev not readable (mount it in containers)")
    if probe is not None:
        try:
            kvikio.CuFile(probe, "r").close()
        except Exception as e:
            return None, f"kvikio cannot register {probe} ({type(e).__name__}: {e})"
    detail = {"compat_mode": str(mode), "kvikio": getattr(kvikio, "__version__", "?")}
    return GdsReader(device, kvikio, config=cfg, detail=detail), ""


def select_reader(device: str | torch.device = "cpu", kind: str | None = None, *,
                  probe: str | None = None, config=None) -> StorageReader:
    """The reader for ``device`` (Note [Storage readers]); logged and reported to the
    ``reader_selected`` hook. ``kind``: "auto" (default HOTWEIGHTS_STORAGE_READER), "gds",
    "posix" or "mmap" (explicit kinds beat the settings). ``probe``: a file GDS must be able
    to register. HOTWEIGHTS_USE_GDS=1 prefers GDS and falls back with a logged reason;
    ``require`` (or kind="gds") makes its absence an error."""
    cfg = config or _config.get()
    device = _normalize_device(device)
    kind = (kind or cfg.storage_reader).lower()
    if kind not in ("auto", "gds", "posix", "mmap"):
        raise ValueError(f"select_reader: kind={kind!r}, expected auto, gds, posix or mmap")
    notes = []
    reader: StorageReader | None = None
    gds = "require" if kind == "gds" else (cfg.use_gds if kind == "auto" else "off")
    if gds != "off":
        reader, why = _gds_reader(device, probe, cfg)
        if reader is None:
            if gds == "require":
                src = "reader='gds'" if kind == "gds" else "HOTWEIGHTS_USE_GDS=require"
                raise StorageError(f"{src}, but GPUDirect Storage is unavailable: {why}")
            notes.append(f"GDS unavailable: {why}")
            log.warning("storage: GPUDirect Storage requested (HOTWEIGHTS_USE_GDS=1) but "
                        "unavailable, falling back: %s", why)
    if reader is None and kind in ("auto", "posix"):
        try:
            reader = PosixReader(device, config=cfg)
        except (RuntimeError, OSError, ValueError) as e:
            if kind == "posix":
                raise StorageError(f"reader='posix' cannot be set up: {type(e).__name__}: {e}") from None
            notes.append(f"posix_pinned unavailable: {type(e).__name__}: {e}")
            log.warning("storage: posix_pinned reader unavailable (%s), falling back to mmap", e)
    if reader is None:
        reader = MmapReader(device)
    detail = dict(reader.detail, device=str(device))
    if notes:
        detail["fallback"] = "; ".join(notes)
    reader.detail = detail
    log.info("storage: reader %s (%s)", reader.name,
             ", ".join(f"{k}={v}" for k, v in detail.items()))
    _emit("reader_selected", reader.name, detail)
    return reader


# --------------------------------------------------------------------------- checkpoint source


class CheckpointSource(BucketSource):
    """A checkpoint as a Publisher source (Note [Bucket sources] in replicate.py).

    ``manifest``: "auto" uses the stored manifest beside the checkpoint when it matches the
    checkpoint and is not older than any of its files (else hashes, with a warning), a path
    uses that manifest (an error when it does not match or is older than the files), None
    always hashes. Hashing reads every byte once through the reader's bounded buffers; the
    result is kept until a file changes on disk. ``stats``: where the manifest came from
    ("stored" or "hashed") and the bytes hashed.
    """

    def __init__(self, checkpoint, device: str | torch.device = "cpu", *,
                 manifest: str | None = "auto", reader: Any = "auto",
                 progress: Callable[[int, int], None] | None = None, config=None):
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
        self.device = _normalize_device(device)
        self.cfg = config or _config.get()
        if manifest is not None and manifest != "auto" and not os.path.isfile(manifest):
            raise CheckpointError(f"manifest {manifest}: no such file")
        self._manifest_arg = manifest
        if isinstance(reader, StorageReader):
            self.reader, self._own_reader = reader, False
        else:
            probe = self.checkpoint.files[0] if self.checkpoint.files else None
            self.reader = select_reader(self.device, reader, probe=probe, config=self.cfg)
            self._own_reader = True
        self.progress = progress
        self._cached: Manifest | None = None
        self.stats: dict[str, Any] = {"manifest": None, "hashed_bytes": 0}
        if manifest is not None:  # a bad explicit manifest is an error now, before any publish
            try:
                self._cached = self._stored()
            except BaseException:
                self.close()
                raise

    def snapshot(self, model: str, label: str | None, parent: int | None) -> Manifest:
        """The checkpoint's manifest (stored or hashed once; re-validated if files changed)."""
        if self.checkpoint.changed_on_disk():
            log.warning("storage: checkpoint %s changed on disk: validating it again",
                        self.checkpoint.directory)
            self.checkpoint = Checkpoint.open(self.checkpoint.origin)
            self._cached = self._stored() if self._manifest_arg is not None else None
        if self._cached is None:
            self._cached = self._hash()
        m = self._cached
        return Manifest(m.names, m.dtypes, m.shapes, m.nbytes, m.hashes, model=model, label=label,
                        parent=parent)

    def fill(self, slot, names, slot_offsets, lengths, tensor_offsets) -> np.ndarray:
        """Reads the pieces straight into the slot; returns their partial sums."""
        reqs = []
        for name, so, ln, to in zip(names, slot_offsets.tolist(), lengths.tolist(),
                                    tensor_offsets.tolist()):
            t = self.checkpoint.tensors.get(name)
            if t is None:
                raise StorageError(f"tensor {name!r} is not in checkpoint {self.checkpoint.directory}")
            reqs.append(ReadRequest(t.file, t.offset + to, ln, slot[so:so + ln], to))
        return self.reader.read(reqs, hash=True)

    def close(self) -> None:
        """Closes the reader (when this source selected it)."""
        if self._own_reader:
            self.reader.close()

    # -- manifests

    def _hash(self) -> Manifest:
        ck = self.checkpoint
        infos = list(ck.tensors.values())
        total = ck.total_bytes
        progress = (lambda done: self.progress(done, total)) if self.progress else None
        reqs = [ReadRequest(t.file, t.offset, t.nbytes) for t in infos]
        partials = self.reader.read(reqs, hash=True, progress=progress)
        sums = np.fromiter((ops.hw64_finalize(int(p), t.nbytes) for p, t in zip(partials, infos)),
                           np.uint64, len(infos))
        self.stats.update(manifest="hashed", hashed_bytes=self.stats["hashed_bytes"] + total)
        if self.progress:
            self.progress(total, total)
        return Manifest([t.name for t in infos], [t.dtype for t in infos], [t.shape for t in infos],
                        np.fromiter((t.nbytes for t in infos), np.int64, len(infos)), sums)

    def _stored(self) -> Manifest | None:
        explicit = self._manifest_arg != "auto"
        path = self._manifest_arg if explicit else self.checkpoint.stored_manifest()
        if path is None:
            return None

        def reject(why: str) -> None:
            if explicit:
                raise CheckpointError(f"manifest {path}: {why}")
            log.warning("storage: ignoring stored manifest %s (%s): hashing the checkpoint", path, why)

        try:
            m = Manifest.load(path)
        except ManifestError as e:
            reject(str(e))
            return None
        ck = self.checkpoint
        if set(m.names) != set(ck.tensors):
            diff = sorted(set(m.names) ^ set(ck.tensors))
            reject(f"it lists other tensors than the checkpoint ({len(diff)} differ, e.g. {diff[0]!r})")
            return None
        for e in m:
            t = ck.tensors[e.name]
            if (e.dtype, e.shape, e.nbytes) != (t.dtype, t.shape, t.nbytes):
                reject(f"tensor {e.name!r} is {e.dtype}{list(e.shape)} there, {t.dtype}{list(t.shape)} "
                       f"in {t.file}")
                return None
        mtime = os.stat(path).st_mtime_ns
        newer = [f for f in ck.files if os.stat(f).st_mtime_ns > mtime]
        if newer:
            reject(f"{os.path.basename(newer[0])} was modified after it was written; regenerate it "
                   "with `hotweights publish --checkpoint DIR --store`")
            return None
        self.stats["manifest"] = "stored"
        return m


def write_manifest(checkpoint, path: str | None = None, *, model: str = "model",
                   label: str | None = None, reader: Any = "auto",
                   progress: Callable[[int, int], None] | None = None) -> tuple[str, Manifest]:
    """Hashes a checkpoint and stores its manifest (default: ``hotweights.manifest.msgpack``
    beside it, where CheckpointSource finds it). For checkpoint writers and the CLI."""
    src = CheckpointSource(checkpoint, manifest=None, reader=reader, progress=progress)
    try:
        m = src.snapshot(model, label, None)
    finally:
        src.close()
    path = path or os.path.join(src.checkpoint.directory, MANIFEST_NAMES[0])
    m.save(path)
    return path, m


# --------------------------------------------------------------------------- CLI


def add_cli(sub) -> None:
    """``hotweights publish --checkpoint PATH [--output F | --store] [--serve ...]``."""
    p = sub.add_parser(
        "publish", help="manifest of a safetensors checkpoint; with --serve, publish it",
        description="Validate and hash a safetensors checkpoint (a file, a directory with or "
        "without model.safetensors.index.json, or an index). Without --serve, print its "
        "manifest or write it (--output, --store). With --serve, publish it as a version to "
        "every subscriber of --name and keep serving late joiners until SIGINT/SIGTERM.")
    p.add_argument("--checkpoint", required=True, help="safetensors file, directory or index")
    p.add_argument("--version", type=int, help="version number to record in a written manifest")
    p.add_argument("--label", help="free-form label, e.g. a step or a run name")
    p.add_argument("--name", "--model", dest="model", default="model",
                   help="model name (default: model)")
    p.add_argument("--output", help="write the manifest here (.json for JSON, else msgpack)")
    p.add_argument("--store", action="store_true",
                   help=f"write the manifest beside the checkpoint ({MANIFEST_NAMES[0]}), where "
                   "later publishes find it and read only changed tensors")
    p.add_argument("--serve", action="store_true", help="publish and serve until SIGINT/SIGTERM")
    p.add_argument("--endpoint", help="coordinator (default HOTWEIGHTS_COORD_ENDPOINT, else an "
                   "embedded one in this process, printed at start)")
    p.add_argument("--device", default="cpu", help="device of the slot ring (cpu, cuda:0)")
    p.add_argument("--reader", default=None, choices=("auto", "gds", "posix", "mmap"),
                   help="storage reader (default HOTWEIGHTS_STORAGE_READER)")
    p.add_argument("--manifest", default="auto",
                   help="with --serve: 'auto' (a fresh stored manifest), 'none' (hash), or a path")
    p.add_argument("--bucket-mb", type=int, help="bucket size (default HOTWEIGHTS_BUCKET_MB)")
    p.set_defaults(fn=_cmd_publish)


def _cmd_publish(args) -> int:
    from .progress import Progress

    if args.output and args.store:
        raise ValueError("--output and --store both given: pick one place for the manifest")
    if not args.serve:
        bar = Progress("hashing")
        try:
            path, m = None, None
            if args.output or args.store:
                path, m = write_manifest(args.checkpoint, args.output, model=args.model,
                                         label=args.label, reader=args.reader, progress=bar)
            else:
                src = CheckpointSource(args.checkpoint, manifest=None, reader=args.reader,
                                       progress=bar)
                try:
                    m = src.snapshot(args.model, args.label, None)
                finally:
                    src.close()
        finally:
            bar.close()
        if args.version is not None:
            m = m.with_version(args.version)
            if path:
                m.save(path)
        if path:
            print(f"wrote {path}: {len(m)} tensors, {m.total_bytes / 2**20:.1f} MiB, digest "
                  f"{m.digest:016x}")
        else:
            print(m.to_json())
        return 0
    if args.version is not None:
        raise ValueError("--version with --serve: the coordinator assigns version numbers")
    return _serve(args)


def _serve(args) -> int:
    from .progress import Progress
    from .replicate import Publisher

    cfg = _config.get()
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    endpoint = args.endpoint or cfg.coord_endpoint
    if endpoint is None:
        from .coordinator import embedded

        endpoint = embedded()
        print(f"hotweights publish: embedded coordinator at {endpoint}", flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    pub = None
    try:
        manifest = None if args.manifest == "none" else args.manifest
        hashing = Progress("hashing")
        try:
            pub = Publisher.from_checkpoint(
                args.checkpoint, args.model, endpoint, device=args.device, manifest=manifest,
                reader=args.reader, progress=hashing,
                bucket_bytes=(args.bucket_mb << 20) if args.bucket_mb else None)
            src = pub._source
            print(f"hotweights publish: {src.checkpoint!r}, reader {src.reader.name} "
                  f"({', '.join(f'{k}={v}' for k, v in src.reader.detail.items())})", flush=True)
            sending = Progress("publishing")
            res = pub.publish(args.label, progress=sending)
            sending.close()
        finally:
            hashing.close()
        print(f"hotweights publish: version {res.version} of {args.model!r} committed: "
              f"{res.bytes / 2**20:.1f} MiB in {res.buckets} bucket(s) to the current "
              f"subscribers (manifest {src.stats['manifest']}); serving late joiners until "
              "SIGINT/SIGTERM", flush=True)
        if args.output or args.store:
            path = args.output or os.path.join(src.checkpoint.directory, MANIFEST_NAMES[0])
            src._cached.save(path)
            print(f"hotweights publish: wrote {path}", flush=True)
        while not stop.wait(0.5):
            pass
        print("hotweights publish: stopping", flush=True)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if pub is not None:
            pub.close()
    return 0
