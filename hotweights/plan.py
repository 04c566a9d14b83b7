# SPDX-License-Identifier: Apache-2.0
"""Delta plans: which bytes each subscriber must receive, packed into buckets.

For each subscriber (its current manifest and its consumer set: glob patterns or exact names,
e.g. its tensor-parallel shard) the plan takes the tensors that changed since that subscriber's
version and that it asked for. Tensors are grouped by the exact set of subscribers that need
them, so every bucket has one set of expected consumers and no subscriber receives bytes it did
not ask for. Groups are packed (Note [Bucket packing], csrc/core/pack.h) into buckets of at most
``bucket_bytes`` at 256-byte aligned offsets; tensors larger than a bucket are split.

The plan is self-contained: it carries dtype, shape, nbytes and checksum of every tensor it
moves, so a subscriber can validate its model and verify what it receives without the manifest.
Bucket checksums are recorded when the publisher gathers each bucket (the bytes are not known
earlier): ``Plan.bucket_digests``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from typing import Sequence

import msgpack
import numpy as np

from . import _C
from .manifest import Manifest, diff

__all__ = ["Plan", "PlanError", "SubscriberSpec", "make_plan", "verify_plan", "consumer_mask",
           "auto_bucket_bytes", "free_memory", "ALIGN", "PLAN_SCHEMA"]

ALIGN = 256
PLAN_SCHEMA = 1
_KIND = "hotweights.plan"


class PlanError(ValueError):
    """A plan is inconsistent, or cannot be made from its inputs."""


@dataclasses.dataclass
class SubscriberSpec:
    """What one subscriber has (its manifest, None when it has nothing) and wants."""

    id: str
    base: Manifest | None = None
    consumer: Sequence[str] | None = None  # None or ["*"]: everything


_GLOB = re.compile(r"[*?\[]")


def consumer_mask(names: Sequence[str], patterns: Sequence[str] | None) -> np.ndarray:
    """Bool array: which names a consumer set selects (glob patterns and exact names)."""
    n = len(names)
    if isinstance(patterns, str):  # one pattern, not its characters
        patterns = [patterns]
    if patterns is None or any(p == "*" for p in patterns):
        return np.ones(n, bool)
    exact = {p for p in patterns if not _GLOB.search(p)}
    globs = [p for p in patterns if _GLOB.search(p)]
    if not globs:
        return np.fromiter((x in exact for x in names), bool, n)
    rx = re.compile("|".join(fnmatch.translate(g) for g in globs))
    return np.fromiter((x in exact or rx.match(x) is not None for x in names), bool, n)


class Plan:
    """A packed delta plan (see module docstring). Arrays are column-wise, one row per piece
    (``piece_*``) or per bucket (``bucket_*``); ``tensors`` lists the moved tensors."""

    def __init__(self, *, model: str, version: int | None, bucket_bytes: int, align: int,
                 names: list[str], dtypes: list[str], shapes: list[tuple], nbytes: np.ndarray,
                 checksums: np.ndarray, piece_tensor: np.ndarray, piece_tensor_offset: np.ndarray,
                 piece_length: np.ndarray, piece_bucket: np.ndarray, piece_slot_offset: np.ndarray,
                 bucket_used: np.ndarray, bucket_group: np.ndarray, groups: list[tuple[str, ...]],
                 bases: dict[str, int | None], reshaped: list, removed: list[str],
                 bucket_digests: list[int | None] | None = None):
        self.model, self.version = model, version
        self.bucket_bytes, self.align = int(bucket_bytes), int(align)
        self.names, self.dtypes, self.shapes = names, dtypes, [tuple(s) for s in shapes]
        self.nbytes = np.asarray(nbytes, np.int64)
        self.checksums = np.asarray(checksums, np.uint64)
        self.piece_tensor = np.asarray(piece_tensor, np.int64)
        self.piece_tensor_offset = np.asarray(piece_tensor_offset, np.int64)
        self.piece_length = np.asarray(piece_length, np.int64)
        self.piece_bucket = np.asarray(piece_bucket, np.int64)
        self.piece_slot_offset = np.asarray(piece_slot_offset, np.int64)
        self.bucket_used = np.asarray(bucket_used, np.int64)
        self.bucket_group = np.asarray(bucket_group, np.int64)
        self.groups = [tuple(g) for g in groups]
        self.bases = dict(bases)
        self.reshaped = [(r[0], tuple(r[1]), tuple(r[2])) for r in reshaped]
        self.removed = list(removed)
        self.bucket_digests = list(bucket_digests) if bucket_digests is not None else [None] * self.num_buckets
        # pieces come out of the packer in bucket order: bucket b is rows [start[b], start[b+1])
        self._starts = np.searchsorted(self.piece_bucket, np.arange(self.num_buckets + 1))

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_used)

    @property
    def total_bytes(self) -> int:
        return int(self.piece_length.sum())

    def pieces(self, b: int) -> slice:
        """Row range of bucket b's pieces."""
        if not 0 <= b < self.num_buckets:
            raise IndexError(f"bucket {b} out of range for a plan of {self.num_buckets} buckets")
        return slice(int(self._starts[b]), int(self._starts[b + 1]))

    def consumers(self, b: int) -> tuple[str, ...]:
        """Subscribers that expect bucket b."""
        return self.groups[int(self.bucket_group[b])]

    def buckets_for(self, subscriber: str) -> list[int]:
        """Buckets a subscriber must receive, in order."""
        gids = [i for i, g in enumerate(self.groups) if subscriber in g]
        return np.flatnonzero(np.isin(self.bucket_group, gids)).tolist()

    def tensors_for(self, subscriber: str) -> list[int]:
        """Rows of ``names`` a subscriber receives."""
        bs = self.buckets_for(subscriber)
        if not bs:
            return []
        mask = np.isin(self.piece_bucket, bs)
        return np.unique(self.piece_tensor[mask]).tolist()

    def bytes_for(self, subscriber: str) -> int:
        bs = self.buckets_for(subscriber)
        return int(self.piece_length[np.isin(self.piece_bucket, bs)].sum()) if bs else 0

    def summary(self) -> dict:
        """Numbers for `hotweights plan`: tensors, bytes and buckets, overall and per subscriber."""
        subs = sorted({s for g in self.groups for s in g} | set(self.bases))
        return {
            "model": self.model, "version": self.version, "tensors": len(self.names),
            "bytes": self.total_bytes, "buckets": self.num_buckets,
            "bucket_bytes": self.bucket_bytes, "split_tensors": int(
                (np.bincount(self.piece_tensor, minlength=len(self.names)) > 1).sum()),
            "reshaped": [r[0] for r in self.reshaped], "removed": self.removed,
            "subscribers": {s: {"base": self.bases.get(s), "tensors": len(self.tensors_for(s)),
                                "bytes": self.bytes_for(s), "buckets": len(self.buckets_for(s))}
                            for s in subs},
        }

    # ------------------------------------------------------------------ serialisation

    def to_bytes(self) -> bytes:
        """msgpack form with a schema version (what travels to the coordinator)."""
        a = lambda x, t: np.ascontiguousarray(x, dtype=t).tobytes()  # noqa: E731
        return msgpack.packb({
            "kind": _KIND, "schema": PLAN_SCHEMA, "model": self.model, "version": self.version,
            "bucket_bytes": self.bucket_bytes, "align": self.align, "names": self.names,
            "dtypes": self.dtypes, "shapes": [list(s) for s in self.shapes],
            "nbytes": a(self.nbytes, "<i8"), "checksums": a(self.checksums, "<u8"),
            "piece_tensor": a(self.piece_tensor, "<i8"),
            "piece_tensor_offset": a(self.piece_tensor_offset, "<i8"),
            "piece_length": a(self.piece_length, "<i8"), "piece_bucket": a(self.piece_bucket, "<i8"),
            "piece_slot_offset": a(self.piece_slot_offset, "<i8"),
            "bucket_used": a(self.bucket_used, "<i8"), "bucket_group": a(self.bucket_group, "<i8"),
            "groups": [list(g) for g in self.groups], "bases": self.bases,
            "reshaped": [[r[0], [r[1][0], list(r[1][1])], [r[2][0], list(r[2][1])]] for r in self.reshaped],
            "removed": self.removed, "bucket_digests": self.bucket_digests,
        })

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "plan") -> "Plan":
        """Parses :meth:`to_bytes` output (schema checked; run verify_plan for consistency)."""
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:
            raise PlanError(f"{source}: not a valid plan (msgpack: {type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or d.get("kind") != _KIND:
            raise PlanError(f"{source}: not a hotweights plan")
        if d.get("schema") != PLAN_SCHEMA:
            raise PlanError(f"{source}: plan schema {d.get('schema')!r}, this hotweights reads "
                            f"{PLAN_SCHEMA}")
        try:
            f = lambda k, t: np.frombuffer(d[k], t)  # noqa: E731
            plan = cls(model=d["model"], version=d["version"], bucket_bytes=d["bucket_bytes"],
                       align=d["align"], names=d["names"], dtypes=d["dtypes"],
                       shapes=[tuple(s) for s in d["shapes"]], nbytes=f("nbytes", "<i8"),
                       checksums=f("checksums", "<u8"), piece_tensor=f("piece_tensor", "<i8"),
                       piece_tensor_offset=f("piece_tensor_offset", "<i8"),
                       piece_length=f("piece_length", "<i8"), piece_bucket=f("piece_bucket", "<i8"),
                       piece_slot_offset=f("piece_slot_offset", "<i8"),
                       bucket_used=f("bucket_used", "<i8"), bucket_group=f("bucket_group", "<i8"),
                       groups=d["groups"], bases=d["bases"],
                       reshaped=[(r[0], (r[1][0], tuple(r[1][1])), (r[2][0], tuple(r[2][1])))
                                 for r in d["reshaped"]],
                       removed=d["removed"], bucket_digests=d["bucket_digests"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PlanError(f"{source}: corrupt plan ({type(e).__name__}: {e})") from None
        # it may come off a socket: what the receivers index with is checked before they do
        try:
            errs = _structure_errors(plan)
        except (TypeError, ValueError) as e:  # a column of the wrong kind altogether
            errs = [f"{type(e).__name__}: {e}"]
        if errs:
            raise PlanError(f"{source}: corrupt plan: " + "; ".join(errs))
        return plan

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path, "rb") as f:
                return cls.from_bytes(f.read(), source=path)
        except OSError as e:
            raise PlanError(f"cannot read plan {path}: {e}") from None


def make_plan(new: Manifest, subscribers: Sequence[SubscriberSpec], bucket_bytes: int,
              align: int = ALIGN) -> Plan:
    """The packed delta plan that brings every subscriber to ``new`` (see module docstring).

    Deterministic for the same inputs. Tensors whose dtype or shape changed are moved and
    listed in ``reshaped``: each subscriber decides whether it accepts them.
    """
    if bucket_bytes < align or bucket_bytes % align:
        raise PlanError(f"bucket_bytes={bucket_bytes}: expected a positive multiple of {align}")
    ids = [s.id for s in subscribers]
    if len(set(ids)) != len(ids):
        raise PlanError(f"subscriber ids must be unique, got {ids}")
    n = len(new)
    need = np.zeros((len(subscribers), n), bool)
    deltas: dict[int, object] = {}
    reshaped: dict[str, tuple] = {}
    removed: set[str] = set()
    for k, s in enumerate(subscribers):
        key = id(s.base)
        if key not in deltas:  # subscribers on the same version share one diff
            deltas[key] = diff(s.base, new)
        d = deltas[key]
        for r in d.reshaped:
            reshaped[r[0]] = r
        removed.update(d.removed)
        need[k] = d.changed_mask & consumer_mask(new.names, s.consumer)
    rows = np.flatnonzero(need.any(axis=0)) if len(subscribers) else np.zeros(0, np.int64)
    if len(rows):
        sig = np.packbits(need[:, rows].T, axis=1)  # one bit per subscriber
        sig_view = np.ascontiguousarray(sig).view(np.dtype((np.void, sig.shape[1])))[:, 0]
        _, first, inverse = np.unique(sig_view, return_index=True, return_inverse=True)
        # number groups by first appearance, then keep the manifest order inside a group
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        gid = rank[inverse.reshape(-1)]
        order = np.argsort(gid, kind="stable")
        rows, gid = rows[order], gid[order]
        groups = [None] * len(first)
        for g, r in zip(gid.tolist(), rows.tolist()):
            if groups[g] is None:
                groups[g] = tuple(ids[k] for k in np.flatnonzero(need[:, r]).tolist())
    else:
        gid, groups = np.zeros(0, np.int64), []
    packed = _C.pack_buckets(new.nbytes[rows], gid, int(bucket_bytes), int(align))
    # The packer skips zero-byte tensors; they still "change" but move no bytes.
    plan_rows = rows
    return Plan(
        model=new.model, version=new.version, bucket_bytes=bucket_bytes, align=align,
        names=[new.names[i] for i in plan_rows.tolist()],
        dtypes=[new.dtypes[i] for i in plan_rows.tolist()],
        shapes=[new.shapes[i] for i in plan_rows.tolist()],
        nbytes=new.nbytes[plan_rows], checksums=new.hashes[plan_rows],
        piece_tensor=packed["tensor"], piece_tensor_offset=packed["tensor_offset"],
        piece_length=packed["length"], piece_bucket=packed["bucket"],
        piece_slot_offset=packed["slot_offset"], bucket_used=packed["bucket_used"],
        bucket_group=packed["bucket_group"], groups=groups,
        bases={s.id: (s.base.version if s.base is not None else None) for s in subscribers},
        reshaped=[reshaped[k] for k in sorted(reshaped)], removed=sorted(removed))


def _structure_errors(plan: Plan) -> list[str]:
    """What makes a plan unusable as an index (column lengths, index ranges, types, piece
    order): checked for every plan read from bytes, and first by verify_plan."""
    errs: list[str] = []
    nt, nb = len(plan.names), plan.num_buckets
    P = len(plan.piece_length)
    if not all(isinstance(x, str) for x in plan.names):
        errs.append("tensor names must be strings")
    if not all(isinstance(g, tuple) and all(isinstance(c, str) for c in g) for g in plan.groups):
        errs.append("consumer groups must be lists of client ids")
    if plan.align < 1 or plan.bucket_bytes < 1:
        errs.append(f"align={plan.align} and bucket_bytes={plan.bucket_bytes} must be >= 1")
    arrays = (plan.piece_tensor, plan.piece_tensor_offset, plan.piece_bucket, plan.piece_slot_offset)
    if any(len(a) != P for a in arrays):
        errs.append("piece columns differ in length")
    if not (len(plan.dtypes) == len(plan.shapes) == len(plan.nbytes) == len(plan.checksums) == nt):
        errs.append("tensor columns differ in length")
    if len(plan.bucket_group) != nb or len(plan.bucket_digests) != nb:
        errs.append("bucket columns differ in length")
    if errs:
        return errs
    if P and (plan.piece_tensor.min() < 0 or plan.piece_tensor.max() >= nt):
        errs.append("a piece refers to a tensor outside the plan")
    if P and (plan.piece_bucket.min() < 0 or plan.piece_bucket.max() >= nb):
        errs.append("a piece refers to a bucket outside the plan")
    if P and (np.diff(plan.piece_bucket) < 0).any():  # pieces(b) is a row range
        errs.append("pieces are not in bucket order")
    if (plan.piece_length <= 0).any():
        errs.append(f"{int((plan.piece_length <= 0).sum())} piece(s) have no bytes")
    if (plan.piece_tensor_offset < 0).any():
        errs.append("a piece starts before its tensor")
    if len(plan.bucket_group) and (plan.bucket_group.min() < 0 or plan.bucket_group.max() >= len(plan.groups)):
        errs.append("a bucket refers to a consumer group outside the plan")
    return errs


def verify_plan(plan: Plan, new: Manifest | None = None,
                subscribers: Sequence[SubscriberSpec] | None = None) -> dict:
    """Checks a plan; raises PlanError listing every problem, else returns its summary.

    Always: every moved tensor's bytes are covered exactly once (no gap, no overlap), pieces
    sit inside their bucket at aligned offsets without overlapping, sizes are consistent, and
    every piece of a bucket belongs to its group. With ``new`` and ``subscribers``: each
    subscriber gets exactly the tensors it needs (changed since its base, in its consumer set)
    and nothing else, with the new manifest's sizes and checksums.
    """
    errs = _structure_errors(plan)
    if errs:
        raise PlanError("plan is inconsistent: " + "; ".join(errs))
    nt, nb = len(plan.names), plan.num_buckets
    P = len(plan.piece_length)
    # coverage: per tensor, pieces sorted by offset tile [0, nbytes) exactly
    o = np.lexsort((plan.piece_tensor_offset, plan.piece_tensor))
    t, off, ln = plan.piece_tensor[o], plan.piece_tensor_offset[o], plan.piece_length[o]
    first = np.r_[True, t[1:] != t[:-1]] if P else np.zeros(0, bool)
    prev_end = np.r_[0, (off + ln)[:-1]] if P else np.zeros(0, np.int64)
    expected_start = np.where(first, 0, prev_end)
    bad = np.flatnonzero(off != expected_start)
    for i in bad[:5].tolist():
        kind = "gap" if off[i] > expected_start[i] else "overlap"
        errs.append(f"tensor {plan.names[t[i]]!r}: {kind} at byte {int(min(off[i], expected_start[i]))}")
    last = np.r_[t[1:] != t[:-1], True] if P else np.zeros(0, bool)
    ends = np.zeros(nt, np.int64)
    ends[t[last]] = (off + ln)[last]
    covered = np.zeros(nt, bool)
    covered[t] = True
    short = np.flatnonzero((ends != plan.nbytes) & (plan.nbytes > 0))
    for i in short[:5].tolist():
        errs.append(f"tensor {plan.names[i]!r}: pieces cover {int(ends[i])} of {int(plan.nbytes[i])} bytes")
    # slots: aligned, inside the bucket, no overlaps, used bytes consistent, one group
    if (plan.piece_slot_offset % plan.align).any():
        errs.append(f"{int((plan.piece_slot_offset % plan.align != 0).sum())} piece(s) at unaligned slot offsets")
    if ((plan.piece_slot_offset + plan.piece_length) > plan.bucket_bytes).any() or (plan.piece_slot_offset < 0).any():
        errs.append("a piece runs outside its bucket")
    o = np.lexsort((plan.piece_slot_offset, plan.piece_bucket))
    b, so, sl = plan.piece_bucket[o], plan.piece_slot_offset[o], plan.piece_length[o]
    same = np.r_[False, b[1:] == b[:-1]] if P else np.zeros(0, bool)
    prev = np.r_[0, (so + sl)[:-1]] if P else np.zeros(0, np.int64)
    ov = np.flatnonzero(same & (so < prev))
    for i in ov[:5].tolist():
        errs.append(f"bucket {int(b[i])}: pieces overlap at slot offset {int(so[i])}")
    used = np.zeros(nb, np.int64)
    np.maximum.at(used, plan.piece_bucket, plan.piece_slot_offset + plan.piece_length)
    badu = np.flatnonzero(used != plan.bucket_used)
    for i in badu[:5].tolist():
        errs.append(f"bucket {i}: used_bytes {int(plan.bucket_used[i])} but pieces end at {int(used[i])}")
    if new is not None:
        idx = new.index
        for i, name in enumerate(plan.names):
            j = idx.get(name)
            if j is None:
                errs.append(f"tensor {name!r} is not in the new manifest")
            elif int(new.nbytes[j]) != int(plan.nbytes[i]) or int(new.hashes[j]) != int(plan.checksums[i]):
                errs.append(f"tensor {name!r}: size/checksum differ from the new manifest")
        if subscribers is not None:
            for s in subscribers:
                want_mask = diff(s.base, new).changed_mask & consumer_mask(new.names, s.consumer)
                want = {new.names[i] for i in np.flatnonzero(want_mask & (new.nbytes > 0)).tolist()}
                got = {plan.names[i] for i in plan.tensors_for(s.id)}
                if want - got:
                    errs.append(f"subscriber {s.id!r} misses {len(want - got)} tensor(s), e.g. {sorted(want - got)[:3]}")
                if got - want:
                    errs.append(f"subscriber {s.id!r} would receive {len(got - want)} tensor(s) it did not ask for, e.g. {sorted(got - want)[:3]}")
    if errs:
        raise PlanError(f"plan for {plan.model!r} has {len(errs)} problem(s): " + "; ".join(errs))
    return plan.summary()


def free_memory(device: str = "cpu") -> int:
    """Bytes available for staging on a device (CUDA: free device memory; CPU: MemAvailable)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PlanError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= n or not n:
            raise PlanError(f"device {device!r}: this machine has {n} CUDA device(s)")
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        raise PlanError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def auto_bucket_bytes(free_bytes: int, slots: int, largest: int, *, fraction: float = 0.9,
                      preferred: int = 512 << 20, align: int = ALIGN) -> int:
    """Bucket size from free staging memory and the window, as checkpoint-engine does:
    ``min(max(preferred, largest tensor), free * fraction / slots)``, aligned down, at least
    one alignment unit. A tensor larger than the result is split across buckets."""
    if slots < 1:
        raise PlanError(f"auto bucket size: slots={slots}, expected >= 1")
    if not 0 < fraction <= 1:
        raise PlanError(f"auto bucket size: fraction={fraction}, expected (0, 1]")
    cap = int(free_bytes * fraction) // slots
    b = min(max(preferred, int(largest)), cap)
    b -= b % align
    return max(b, align)


# ---------------------------------------------------------------------- CLI


def add_cli(sub) -> None:
    """``hotweights plan`` and ``hotweights verify-plan``."""
    p = sub.add_parser("plan", help="delta plan between two manifests")
    p.add_argument("--prev", help="manifest the subscriber has (omit: it has nothing)")
    p.add_argument("--next", required=True, help="manifest to move to")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bucket-mb", type=int, help="bucket size in MiB (default HOTWEIGHTS_BUCKET_MB)")
    g.add_argument("--auto", action="store_true", help="size buckets from free memory and the window")
    p.add_argument("--device", default="cpu", help="staging device for --auto (cpu or cuda:N)")
    p.add_argument("--consumer", nargs="*", help="tensor names or glob patterns the subscriber needs")
    p.add_argument("--verify", action="store_true", help="verify the plan against the manifests")
    p.add_argument("--output", help="write the plan (msgpack) here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(fn=_cmd_plan)
    v = sub.add_parser("verify-plan", help="check a saved plan's consistency")
    v.add_argument("plan")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=_cmd_verify)


def _print_summary(s: dict, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(s, indent=2))
        return
    print(f"model {s['model']}  version {s['version']}")
    print(f"  tensors to move  {s['tensors']}")
    print(f"  bytes to move    {s['bytes']:,} ({s['bytes'] / 2**20:.1f} MiB)")
    print(f"  buckets          {s['buckets']} x {s['bucket_bytes'] / 2**20:g} MiB"
          f" ({s['split_tensors']} tensor(s) split)")
    if s["reshaped"]:
        print(f"  reshaped         {len(s['reshaped'])}: {', '.join(s['reshaped'][:5])}")
    if s["removed"]:
        print(f"  removed          {len(s['removed'])}: {', '.join(s['removed'][:5])}")
    for sub, x in s["subscribers"].items():
        print(f"  subscriber {sub}: base {x['base']}, {x['tensors']} tensors, "
              f"{x['bytes']:,} bytes, {x['buckets']} buckets")


def _cmd_plan(args) -> int:
    from . import config

    new = Manifest.load(args.next)
    prev = Manifest.load(args.prev) if args.prev else None
    cfg = config.get()
    if args.auto:
        b = auto_bucket_bytes(free_memory(args.device), cfg.ipc_max_inflight,
                              int(new.nbytes.max()) if len(new) else ALIGN)
    else:
        if args.bucket_mb is not None and args.bucket_mb < 1:
            raise PlanError(f"--bucket-mb {args.bucket_mb}: expected a size in MiB >= 1")
        b = (args.bucket_mb << 20) if args.bucket_mb is not None else cfg.bucket_bytes
    subs = [SubscriberSpec("subscriber", prev, args.consumer or None)]
    plan = make_plan(new, subs, b)
    s = verify_plan(plan, new, subs) if args.verify else plan.summary()
    if args.output:
        plan.save(args.output)
    _print_summary(s, args.json)
    if args.verify and not args.json:
        print("plan verified: every needed byte covered exactly once, no overlaps, aligned")
    return 0


def _cmd_verify(args) -> int:
    s = verify_plan(Plan.load(args.plan))
    _print_summary(s, args.json)
    if not args.json:
        print("plan verified: every needed byte covered exactly once, no overlaps, aligned")
    return 0
