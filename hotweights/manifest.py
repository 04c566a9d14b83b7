# SPDX-License-Identifier: Apache-2.0
"""Manifests: what a version is made of.

A version is an immutable set of named tensors. Its manifest lists, per tensor, name, dtype,
shape, nbytes and the hw64 checksum of its bytes (computed where the tensor lives: a CUDA kernel
for CUDA tensors, threads for host ones), plus the version id (a monotonic sequence assigned by
the coordinator, and an optional label), the parent version, the creation time and a digest of
the entries. Entries are stored column-wise (NumPy arrays) so that a million tensors diff and
serialise in well under a second.

On disk a manifest is msgpack (default) or JSON (``.json``) with a schema version; loading an
older or newer schema, or a corrupt file, is a clear :class:`ManifestError`.
"""

from __future__ import annotations

import copy

import dataclasses
import json
import math
import os
import time
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import msgpack
import numpy as np
import torch

from . import _C, ops

__all__ = ["Manifest", "ManifestError", "TensorEntry", "Delta", "diff", "dtype_name",
           "dtype_from_name", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_KIND = "hotweights.manifest"


class ManifestError(ValueError):
    """A manifest is malformed, corrupt, or of a schema this build does not read."""


def dtype_name(dtype: torch.dtype) -> str:
    """Stable name of a torch dtype ("float32", "bfloat16", "float8_e4m3fn", ...)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; a clear error for unknown names."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ManifestError(f"unknown dtype {name!r} (expected a torch dtype name such as float32)")
    return dt


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int


class Manifest:
    """Immutable description of one version (see module docstring).

    Columns: ``names`` (list of str), ``dtypes`` (list of str, one per tensor), ``shapes``
    (list of tuples), ``nbytes`` (int64 array), ``hashes`` (uint64 array of hw64 checksums).
    """

    def __init__(self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[tuple],
                 nbytes: np.ndarray, checksums: np.ndarray, *, model: str = "model",
                 version: int | None = None, label: str | None = None,
                 parent: int | None = None, created: float | None = None):
        n = len(names)
        if not (len(dtypes) == len(shapes) == len(nbytes) == len(checksums) == n):
            raise ManifestError(
                f"manifest columns differ in length: names {n}, dtypes {len(dtypes)}, shapes "
                f"{len(shapes)}, nbytes {len(nbytes)}, checksums {len(checksums)}")
        self.names = list(names)
        self.dtypes = list(dtypes)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.nbytes = np.ascontiguousarray(nbytes, dtype=np.int64)
        self.hashes = np.ascontiguousarray(checksums, dtype=np.uint64)
        self.model = model
        self.version = version
        self.label = label
        self.parent = parent
        self.created = time.time() if created is None else float(created)
        self._index: dict[str, int] | None = None
        self._static: dict | None = None  # the encoded columns other than the checksums
        if len(set(self.names)) != n:
            seen, dup = set(), None
            for x in self.names:
                if x in seen:
                    dup = x
                    break
                seen.add(x)
            raise ManifestError(f"duplicate tensor name {dup!r} in manifest of {model!r}")
        self.digest = self._content_digest()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor] | torch.nn.Module, *,
                        model: str = "model", label: str | None = None,
                        parent: int | None = None) -> "Manifest":
        """Hashes every tensor where it lives (one batched call per device)."""
        if isinstance(state, torch.nn.Module):
            state = state.state_dict(keep_vars=False)
        names, tensors = [], []
        for name, t in state.items():
            if not isinstance(name, str):
                raise ManifestError(f"state entry {name!r} has a {type(name).__name__} name, "
                                    "expected a str")
            if not isinstance(t, torch.Tensor):
                raise ManifestError(f"state entry {name!r} is a {type(t).__name__}, expected a tensor")
            t = t.detach()
            if t.layout != torch.strided:
                raise ManifestError(f"tensor {name!r} is {t.layout}; publish dense tensors "
                                    "(call .to_dense())")
            if t.device.type == "meta":
                raise ManifestError(f"tensor {name!r} is on the meta device: it has no bytes to "
                                    "publish")
            if not t.is_contiguous():
                raise ManifestError(f"tensor {name!r} of shape {tuple(t.shape)} is not contiguous; "
                                    "publish contiguous tensors (call .contiguous())")
            names.append(name)
            tensors.append(t)
        sums = ops.checksum_batch(tensors) if tensors else np.zeros(0, np.uint64)
        return cls(names, [dtype_name(t.dtype) for t in tensors], [tuple(t.shape) for t in tensors],
                   np.fromiter((t.numel() * t.element_size() for t in tensors), np.int64, len(tensors)),
                   sums, model=model, label=label, parent=parent)

    @classmethod
    def from_safetensors(cls, paths: str | Sequence[str], *, model: str = "model",
                         label: str | None = None, parent: int | None = None,
                         progress: Callable[[int, int], None] | None = None) -> "Manifest":
        """Reads one or more .safetensors files (or a directory of them) through the
        safetensors package and hashes each tensor. ``progress(done_bytes, total_bytes)``."""
        from safetensors import safe_open

        files = _safetensors_files(paths)
        names, dtypes, shapes, sizes, sums = [], [], [], [], []
        metas = []
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    metas.append((f, k, sl.get_dtype(), tuple(sl.get_shape())))
        total = 0
        for f, k, dt, shape in metas:
            total += int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=_st_dtype(dt, f, k)).element_size()
        done = 0
        seen: dict[str, str] = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    if k in seen:
                        raise ManifestError(f"tensor {k!r} appears in both {seen[k]} and {f}")
                    seen[k] = f
                    t = h.get_tensor(k).contiguous()
                    names.append(k)
                    dtypes.append(dtype_name(t.dtype))
                    shapes.append(tuple(t.shape))
                    nb = t.numel() * t.element_size()
                    sizes.append(nb)
                    sums.append(ops.checksum(t))
                    done += nb
                    if progress:
                        progress(done, total)
        return cls(names, dtypes, shapes, np.asarray(sizes, np.int64), np.asarray(sums, np.uint64),
                   model=model, label=label, parent=parent)

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[TensorEntry]:
        for i in range(len(self.names)):
            yield self.entry(i)

    @property
    def index(self) -> dict[str, int]:
        """name -> row, built once on first use."""
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        return self._index

    def entry(self, key: int | str) -> TensorEntry:
        """The entry of a row or a name."""
        i = self.index[key] if isinstance(key, str) else int(key)
        return TensorEntry(self.names[i], self.dtypes[i], self.shapes[i], int(self.nbytes[i]),
                           int(self.hashes[i]))

    def checksums(self) -> dict[str, int]:
        """name -> checksum (the mapping :func:`hotweights.kv.plan` consumes)."""
        return dict(zip(self.names, (int(x) for x in self.hashes)))

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    def with_version(self, version: int) -> "Manifest":
        """A copy carrying the version id the coordinator assigned (the columns are shared:
        manifests are immutable; the content digest does not cover the version)."""
        m = copy.copy(self)
        m.version = version
        return m

    def with_checksums(self, checksums, *, label: str | None = None,
                       parent: int | None = None) -> "Manifest":
        """A new manifest of the same tensors (names, dtypes, shapes: the columns are shared)
        with new checksums, no version yet: the next snapshot of a source whose layout did
        not change, without re-validating and re-encoding what did not change."""
        sums = np.ascontiguousarray(checksums, dtype=np.uint64)
        if sums.shape != (len(self.names),):
            raise ManifestError(f"with_checksums: checksums of shape {sums.shape}, expected "
                                f"({len(self.names)},): one per tensor")
        m = copy.copy(self)
        m.hashes, m.label, m.parent, m.version, m.created = sums, label, parent, None, time.time()
        m.digest = m._content_digest()
        return m

    def __repr__(self) -> str:
        return (f"Manifest({self.model!r} v{self.version}, {len(self)} tensors, "
                f"{self.total_bytes / 2**20:.1f} MiB, digest {self.digest:016x})")

    # ------------------------------------------------------------------ serialisation

    def _columns(self) -> dict:
        if self._static is None:  # encoded once (and shared by with_checksums copies)
            table = sorted(set(self.dtypes))
            code = {d: i for i, d in enumerate(table)}
            ndim = np.fromiter((len(s) for s in self.shapes), np.uint8, len(self.shapes))
            dims = np.fromiter((d for s in self.shapes for d in s), np.int64)
            self._static = {
                "names": self.names,
                "dtype_table": table,
                "dtype_idx": np.fromiter((code[d] for d in self.dtypes), np.uint16,
                                         len(self.dtypes)).tobytes(),
                "ndim": ndim.tobytes(),
                "dims": dims.tobytes(),
                "nbytes": self.nbytes.astype("<i8").tobytes(),
            }
        return {**self._static, "checksums": self.hashes.astype("<u8").tobytes()}

    def _content_digest(self) -> int:
        cols = self._columns()
        blob = msgpack.packb([self.model, cols["names"], cols["dtype_table"], cols["dtype_idx"],
                              cols["ndim"], cols["dims"], cols["nbytes"], cols["checksums"]])
        return _C.hw64_bytes(blob)

    def to_dict(self) -> dict:
        """Header plus columns (bytes fields for msgpack)."""
        return {"kind": _KIND, "schema": SCHEMA_VERSION, "model": self.model,
                "version": self.version, "label": self.label, "parent": self.parent,
                "created": self.created, "digest": self.digest, **self._columns()}

    def to_bytes(self) -> bytes:
        """msgpack form (what travels to the coordinator and what ``save`` writes by default)."""
        return msgpack.packb(self.to_dict())

    def to_json(self) -> str:
        """Human-readable JSON form (same schema; checksums as hex strings)."""
        return json.dumps({"kind": _KIND, "schema": SCHEMA_VERSION, "model": self.model,
                           "version": self.version, "label": self.label, "parent": self.parent,
                           "created": self.created, "digest": f"{self.digest:016x}",
                           "tensors": [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape),
                                        "nbytes": e.nbytes, "checksum": f"{e.checksum:016x}"}
                                       for e in self]}, indent=1)

    def save(self, path: str) -> None:
        """Writes JSON when path ends in .json, else msgpack."""
        data = self.to_json().encode() if path.endswith(".json") else self.to_bytes()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """Reads a manifest written by :meth:`save` (either form)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ManifestError(f"cannot read manifest {path}: {e}") from None
        return cls.from_bytes(data, source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> "Manifest":
        """Parses either serialised form, validating schema, columns, every row (a name, a
        known dtype, dims >= 0, nbytes that match them) and the digest."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Manifest.from_bytes: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if data.lstrip(b" \t\r\n")[:1] == b"{" or data[:3] == b"\xef\xbb\xbf":  # JSON (BOM)
            return cls._from_json(data[3:] if data[:3] == b"\xef\xbb\xbf" else data, source)
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise ManifestError(f"{source}: not a valid manifest (msgpack: {type(e).__name__}: {e})") from None
        _check_header(d, source)
        try:
            table = d["dtype_table"]
            idx = np.frombuffer(d["dtype_idx"], np.uint16)
            ndim = np.frombuffer(d["ndim"], np.uint8)
            dims = np.frombuffer(d["dims"], "<i8")
            nb = np.frombuffer(d["nbytes"], "<i8")
            cs = np.frombuffer(d["checksums"], "<u8")
            names = d["names"]
            if int(ndim.sum()) != len(dims) or (len(idx) and int(idx.max()) >= len(table)):
                raise ValueError("shape or dtype columns are inconsistent")
            ends = np.cumsum(ndim, dtype=np.int64)
            starts = ends - ndim
            dl = dims.tolist()
            shapes = [tuple(dl[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
            dtypes = [table[i] for i in idx.tolist()]
            m = cls(names, dtypes, shapes, nb, cs, model=d["model"], version=d["version"],
                    label=d["label"], parent=d["parent"], created=d["created"])
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ManifestError(f"{source}: corrupt manifest ({type(e).__name__}: {e})") from None
        _check_rows(m, source)
        if m.digest != d.get("digest"):
            raise ManifestError(f"{source}: manifest digest mismatch (corrupted or edited)")
        return m

    @classmethod
    def _from_json(cls, data: bytes, source: str) -> "Manifest":
        try:
            d = json.loads(data)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}: not a valid manifest (JSON: {e.msg} at line {e.lineno})") from None
        _check_header(d, source)
        try:
            ts = d["tensors"]
            m = cls([t["name"] for t in ts], [t["dtype"] for t in ts],
                    [tuple(t["shape"]) for t in ts], np.asarray([t["nbytes"] for t in ts], np.int64),
                    np.asarray([int(t["checksum"], 16) for t in ts], np.uint64),
                    model=d["model"], version=d["version"], label=d["label"],
                    parent=d["parent"], created=d["created"])
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ManifestError(f"{source}: corrupt manifest ({type(e).__name__}: {e})") from None
        _check_rows(m, source)
        if f"{m.digest:016x}" != d.get("digest"):
            raise ManifestError(f"{source}: manifest digest mismatch (corrupted or edited)")
        return m


def _check_header(d, source: str) -> None:
    if not isinstance(d, dict) or d.get("kind") != _KIND:
        raise ManifestError(f"{source}: not a hotweights manifest")
    schema = d.get("schema")
    if not isinstance(schema, int):
        raise ManifestError(f"{source}: manifest has no schema version")
    if schema > SCHEMA_VERSION:
        raise ManifestError(f"{source}: manifest schema {schema} is newer than this hotweights "
                            f"reads ({SCHEMA_VERSION}); upgrade hotweights")
    if schema < SCHEMA_VERSION:
        raise ManifestError(f"{source}: manifest schema {schema} is older than this hotweights "
                            f"reads ({SCHEMA_VERSION}); regenerate it with `hotweights publish`")


# ---------------------------------------------------------------------- safetensors helpers

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64"}


def _st_dtype(code: str, file: str, name: str) -> torch.dtype:
    if code not in _ST_DTYPES:
        raise ManifestError(f"{file}: tensor {name!r} has dtype {code!r}, which hotweights does not "
                            f"support (supported: {', '.join(_ST_DTYPES)})")
    return dtype_from_name(_ST_DTYPES[code])


def _safetensors_files(paths: str | Sequence[str]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors"))
            if not found:
                raise ManifestError(f"{p}: no .safetensors files in this directory")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ManifestError(f"{p}: no such file or directory")
    return files


# ---------------------------------------------------------------------- delta


def _check_rows(m: Manifest, source: str) -> None:
    """Every row of a manifest read from bytes describes a tensor that can exist: a str name,
    a known dtype, dims >= 0, and nbytes = numel * itemsize (Python ints: no overflow)."""
    itemsize: dict[str, int] = {}
    for name, dt, shape, nb in zip(m.names, m.dtypes, m.shapes, m.nbytes.tolist()):
        if not isinstance(name, str):
            raise ManifestError(f"{source}: tensor name {name!r} is a {type(name).__name__}, "
                                "expected a str")
        size = itemsize.get(dt)
        if size is None:
            try:
                size = itemsize[dt] = dtype_from_name(dt).itemsize
            except (ManifestError, TypeError):
                raise ManifestError(f"{source}: tensor {name!r}: unknown dtype {dt!r}") from None
        if any(d < 0 for d in shape):
            raise ManifestError(f"{source}: tensor {name!r}: negative dimension in {shape}")
        if math.prod(shape) * size != nb:
            raise ManifestError(f"{source}: tensor {name!r} claims {nb} bytes, but {dt}"
                                f"{tuple(shape)} holds {math.prod(shape) * size}")


@dataclasses.dataclass
class Delta:
    """What differs between two manifests (names in the new manifest's order).

    ``changed`` includes ``added`` and ``reshaped`` names (everything whose bytes must move);
    ``reshaped`` holds (name, old (dtype, shape), new (dtype, shape)) for names whose dtype or
    shape changed; ``removed`` names are only in the old manifest. ``changed_mask`` is a bool
    array over the new manifest's rows.
    """

    changed: list[str]
    added: list[str]
    removed: list[str]
    reshaped: list[tuple[str, tuple, tuple]]
    unchanged: int
    changed_mask: np.ndarray

    @property
    def empty(self) -> bool:
        return not self.changed and not self.removed


def diff(old: Manifest | None, new: Manifest) -> Delta:
    """Delta from ``old`` (None: nothing yet, everything is added) to ``new``; vectorised."""
    n = len(new)
    if old is None or not len(old):
        return Delta(list(new.names), list(new.names), [], [], 0, np.ones(n, bool))
    if old.names == new.names:  # the common case: same model, same order
        oi = np.arange(n)
        present = np.ones(n, bool)
    else:
        idx = old.index
        oi = np.fromiter((idx.get(x, -1) for x in new.names), np.int64, n)
        present = oi >= 0
    safe = np.where(present, oi, 0)
    differs = ~present | (old.hashes[safe] != new.hashes) | (old.nbytes[safe] != new.nbytes)
    reshaped = []
    both = np.flatnonzero(present)
    # dtype and shape are not in the checksum (the same bytes reinterpreted or reshaped hash
    # alike): every row is compared, unless the columns are equal as a whole (one C-level
    # list comparison, the usual case)
    same_layout = (old.names == new.names and old.dtypes == new.dtypes
                   and old.shapes == new.shapes)
    cand = np.zeros(0, np.int64) if same_layout else both
    for i in cand.tolist():
        j = int(oi[i])
        if old.dtypes[j] != new.dtypes[i] or old.shapes[j] != new.shapes[i]:
            reshaped.append((new.names[i], (old.dtypes[j], old.shapes[j]), (new.dtypes[i], new.shapes[i])))
            differs[i] = True
    changed_idx = np.flatnonzero(differs)
    names = new.names
    added = [names[i] for i in np.flatnonzero(~present).tolist()]
    if len(old) == int(present.sum()):
        removed = []
    else:
        newset = new.index
        removed = [x for x in old.names if x not in newset]
    return Delta([names[i] for i in changed_idx.tolist()], added, removed, reshaped,
                 int(n - len(changed_idx)), differs)


def iter_entries(m: Manifest, rows: Iterable[int]) -> Iterator[TensorEntry]:
    """Entries of the given rows."""
    for i in rows:
        yield m.entry(int(i))
