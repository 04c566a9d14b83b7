# SPDX-License-Identifier: Apache-2.0
"""KV-cache ops for weight updates: GQA head maps, head remap, RoPE re-rotation, FP8
requantization, and the per-layer keep / transform / invalidate plan.

Everything here is explicit: cache layouts are named (``layout="vllm_flash"``) or the head
axis is given, never guessed from sizes; head maps are over the KV heads (length
``num_kv_heads``) and validated; a transform is only planned where it is exact (up to one
rounding) unless the caller opts into approximations, and every planned transform is reported.
docs/kv.md has the math.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import config as _config
from . import ops as _ops

__all__ = [
    "KVMapError",
    "KVLayout",
    "LAYOUTS",
    "head_axis_of",
    "kv_head_of",
    "query_head_map",
    "derive_head_map",
    "validate_head_map",
    "invert_head_map",
    "head_map_from_config",
    "find_head_permutation",
    "tp_kv_heads",
    "tp_reshard_sources",
    "reshard_kv_heads",
    "remap_kv_heads",
    "RopeConfig",
    "rerotate_rope",
    "rerotate_cache",
    "requantize_fp8",
    "convert_kv_dtype",
    "convert_layout",
    "NameRule",
    "DEFAULT_NAME_RULES",
    "KVAction",
    "KVPlan",
    "plan",
    "add_cli",
]

log = logging.getLogger("hotweights.kv")


class KVMapError(ValueError):
    """A head map is malformed, or the requested conversion is not a KV-head permutation."""


# --------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """A named cache layout: its logical dims, the KV-head axis and the K/V axis (None: K only)."""

    name: str
    dims: tuple[str, ...]
    head_axis: int
    kv_axis: int | None

    def describe(self) -> str:
        return f"({', '.join(self.dims)})"


# The logical shapes engines use (stride order may differ, e.g. vLLM HND; the ops follow the
# strides). "hf" is one of a layer's key or value tensors (transformers DynamicCache).
LAYOUTS: dict[str, KVLayout] = {
    "vllm_flash": KVLayout(
        "vllm_flash", ("2", "num_blocks", "block_size", "num_kv_heads", "head_dim"), 3, 0),
    "flashinfer": KVLayout(
        "flashinfer", ("num_blocks", "2", "block_size", "num_kv_heads", "head_dim"), 3, 1),
    "hf": KVLayout("hf", ("batch", "num_kv_heads", "seq", "head_dim"), 1, None),
}


def _layout(name: str, op: str) -> KVLayout:
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{op}: unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}") from None


def _check_layout_shape(t: torch.Tensor, lay: KVLayout, op: str) -> None:
    if t.dim() != len(lay.dims):
        raise ValueError(
            f"{op}: a {lay.name} cache has {len(lay.dims)} dims {lay.describe()}, got shape "
            f"{tuple(t.shape)}")
    if lay.kv_axis is not None and t.shape[lay.kv_axis] != 2:
        raise ValueError(
            f"{op}: axis {lay.kv_axis} of a {lay.name} cache {lay.describe()} holds K and V "
            f"(size 2), got shape {tuple(t.shape)}")


def head_axis_of(t: torch.Tensor, layout: str | None = None, head_axis: int | None = None,
                 op: str = "kv") -> tuple[int, str]:
    """The KV-head axis from exactly one of a named layout or an explicit axis, and a description."""
    if (layout is None) == (head_axis is None):
        raise ValueError(
            f"{op}: pass exactly one of layout= ({', '.join(LAYOUTS)}) or head_axis= "
            f"(got layout={layout!r}, head_axis={head_axis!r}); the axis is never guessed")
    if layout is not None:
        lay = _layout(layout, op)
        _check_layout_shape(t, lay, op)
        return lay.head_axis, f"axis {lay.head_axis} of a {lay.name} cache of shape {tuple(t.shape)}"
    if isinstance(head_axis, bool) or not isinstance(head_axis, int):
        raise TypeError(f"{op}: head_axis must be an int, got {type(head_axis).__name__}")
    d = t.dim()
    if not -d <= head_axis < d:
        raise ValueError(
            f"{op}: head_axis={head_axis} is out of range for a tensor of shape {tuple(t.shape)} "
            f"(expected {-d} <= head_axis < {d})")
    axis = head_axis % d
    return axis, f"axis {axis} of a cache of shape {tuple(t.shape)}"


# --------------------------------------------------------------------------- head maps
#
# Note [KV head maps]
# A head map m over the KV heads says where each head of the new cache comes from:
# new[..., j, ...] = old[..., m[j], ...] (the index_select convention), length num_kv_heads.
# The query -> KV assignment a(h) of a model with H query heads, KvH KV heads and G = H / KvH:
#   grouped:     a(h) = h // G   (HF repeat_kv: query heads kG..kG+G-1 read KV head k)
#   interleaved: a(h) = h % KvH  (query heads k, k+KvH, k+2KvH, ... read KV head k)
# A new model whose query head h is old query head s[h] (s: the query map, identity when the
# q_proj rows / o_proj columns keep their order) computes the same attention from a cache
# remapped by m iff m[a_new(h)] = a_old(s[h]) for every h, and m is a permutation. Keeping
# the query heads in place, grouped and interleaved agree only when KvH == 1 or G == 1 (then
# m is the identity); otherwise no KV-head permutation converts one into the other: the
# conversion is a query-head permutation (query_head_map) with the cache reused as is.

ORDERS = ("grouped", "interleaved")


def _group_size(num_heads: int, num_kv_heads: int, op: str) -> int:
    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KVMapError(f"{op}: {name} must be a positive int, got {v!r}")
    if num_heads % num_kv_heads:
        raise KVMapError(
            f"{op}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return num_heads // num_kv_heads


def _order(order: str | None, op: str) -> str:
    order = _config.get().kv_head_order if order is None else order
    if order not in ORDERS:
        raise KVMapError(f"{op}: order={order!r}: expected one of {', '.join(ORDERS)}")
    return order


def kv_head_of(num_heads: int, num_kv_heads: int, order: str | None = None) -> tuple[int, ...]:
    """a(h) for every query head h: the KV head it reads under ``order`` (Note [KV head maps])."""
    g = _group_size(num_heads, num_kv_heads, "kv_head_of")
    order = _order(order, "kv_head_of")
    if order == "grouped":
        return tuple(h // g for h in range(num_heads))
    return tuple(h % num_kv_heads for h in range(num_heads))


def _rank_in_group(h: int, g: int, kvh: int, order: str) -> int:
    return h % g if order == "grouped" else h // kvh


def _member(k: int, r: int, g: int, kvh: int, order: str) -> int:
    return k * g + r if order == "grouped" else k + r * kvh


def query_head_map(num_heads: int, num_kv_heads: int, order: str, to: str) -> tuple[int, ...]:
    """s with new query head h = old query head s[h], converting ``order`` to ``to`` while
    every KV head keeps its index (apply it to q_proj rows and o_proj columns)."""
    g = _group_size(num_heads, num_kv_heads, "query_head_map")
    order, to = _order(order, "query_head_map"), _order(to, "query_head_map")
    out = []
    for h in range(num_heads):
        k = h // g if to == "grouped" else h % num_kv_heads
        out.append(_member(k, _rank_in_group(h, g, num_kv_heads, to), g, num_kv_heads, order))
    return tuple(out)


def validate_head_map(head_map: Any, num_kv_heads: int, *, permutation: bool = True,
                      name: str = "head_map", context: str = "",
                      count: str = "num_kv_heads") -> tuple[int, ...]:
    """Checks a map over ``num_kv_heads`` heads (ints, length, range, and a permutation unless
    ``permutation=False``) and returns it as a tuple; errors name the value and the expectation."""
    where = f" ({context})" if context else ""
    if isinstance(head_map, torch.Tensor):
        if head_map.dtype != torch.long:
            raise KVMapError(f"{name} must be int64 (torch.long), got {head_map.dtype}{where}")
        if head_map.dim() != 1:
            raise KVMapError(f"{name} must be 1-D, got shape {tuple(head_map.shape)}{where}")
        values = head_map.tolist()
    elif isinstance(head_map, (str, bytes)) or not isinstance(head_map, Iterable):
        raise KVMapError(f"{name} must be a sequence of ints, got {type(head_map).__name__}{where}")
    else:
        values = list(head_map)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int):
                raise KVMapError(f"{name}[{i}] = {v!r} is not an int{where}")
    if len(values) != num_kv_heads:
        raise KVMapError(
            f"{name} has {len(values)} entries, expected {count}={num_kv_heads}{where}")
    first: dict[int, int] = {}
    for i, v in enumerate(values):
        if not 0 <= v < num_kv_heads:
            raise KVMapError(
                f"{name}[{i}] = {v} is out of range: expected 0 <= entry < "
                f"num_kv_heads={num_kv_heads}{where}")
        if permutation and v in first:
            missing = sorted(set(range(num_kv_heads)) - set(values))
            raise KVMapError(
                f"{name} is not a permutation of 0..{num_kv_heads - 1}: head {v} appears at "
                f"entries {first[v]} and {i}, head(s) {missing} are missing{where}")
        first.setdefault(v, i)
    return tuple(values)


def invert_head_map(head_map: Sequence[int]) -> tuple[int, ...]:
    """The inverse permutation: remapping by m then by invert_head_map(m) is the identity."""
    m = validate_head_map(head_map, len(head_map))
    inv = [0] * len(m)
    for j, src in enumerate(m):
        inv[src] = j
    return tuple(inv)


def derive_head_map(num_heads: int, num_kv_heads: int, order: str | None = None,
                    to: str | None = None, *, query_map: Sequence[int] | str | None = None,
                    ) -> tuple[int, ...]:
    """The KV-head map m (new[j] = old[m[j]]) that keeps attention unchanged when the model's
    query->KV assignment goes from ``order`` to ``to`` (default: the same) and its query heads
    are re-ordered by ``query_map`` (new query head h = old head query_map[h]; None keeps them
    in place; "canonical" = query_head_map(order, to)). Raises KVMapError, with the reason,
    when no KV-head permutation does it. ``order`` defaults to HOTWEIGHTS_KV_HEAD_ORDER."""
    op = "derive_head_map"
    g = _group_size(num_heads, num_kv_heads, op)
    order = _order(order, op)
    to = order if to is None else _order(to, op)
    if query_map is None:
        s = tuple(range(num_heads))
    elif query_map == "canonical":
        s = query_head_map(num_heads, num_kv_heads, order, to)
    else:
        s = validate_head_map(query_map, num_heads, name="query_map",
                              context=f"a permutation of the {num_heads} query heads",
                              count="num_heads")
    a_old = kv_head_of(num_heads, num_kv_heads, order)
    a_new = kv_head_of(num_heads, num_kv_heads, to)
    m: list[int | None] = [None] * num_kv_heads
    witness = [0] * num_kv_heads
    for h in range(num_heads):
        k_new, k_old = a_new[h], a_old[s[h]]
        if m[k_new] is None:
            m[k_new], witness[k_new] = k_old, h
        elif m[k_new] != k_old:
            h0 = witness[k_new]
            hint = ""
            if order != to and query_map is None:
                hint = (f" A change between {order} and {to} is a permutation of the query heads "
                        "(q_proj rows and o_proj columns) with the cache reused as is: pass "
                        f"query_map=query_head_map({num_heads}, {num_kv_heads}, {order!r}, "
                        f"{to!r}) (or \"canonical\"), which gives the identity KV-head map.")
            raise KVMapError(
                f"{op}: no KV-head permutation converts the cache of a model in {order} order "
                f"(num_heads={num_heads}, num_kv_heads={num_kv_heads}, group size {g}) into one "
                f"for a model in {to} order with "
                f"{'its query heads in place' if query_map is None else 'this query_map'}: "
                f"new query heads {h0} and {h} share new KV head {k_new} but read old KV heads "
                f"{m[k_new]} and {k_old}.{hint}")
    out = tuple(int(x) for x in m)  # every KV head has g >= 1 query heads: all set
    try:
        return validate_head_map(out, num_kv_heads, name="derived KV-head map")
    except KVMapError as e:
        raise KVMapError(
            f"{op}: query_map splits the query groups: {e}; a KV-head map exists only when "
            "query_map moves whole groups") from None


def head_map_from_config(num_kv_heads: int, cfg=None) -> tuple[int, ...] | None:
    """The permutation in HOTWEIGHTS_KV_HEAD_MAP or HOTWEIGHTS_KV_HEAD_MAP_FILE, validated
    against ``num_kv_heads``; None when neither is set."""
    cfg = cfg or _config.get()
    if cfg.kv_head_map is not None:
        return validate_head_map(cfg.kv_head_map, num_kv_heads, name="HOTWEIGHTS_KV_HEAD_MAP")
    if cfg.kv_head_map_file is None:
        return None
    path = cfg.kv_head_map_file
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as e:
        raise KVMapError(f"HOTWEIGHTS_KV_HEAD_MAP_FILE={path!r}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise KVMapError(
            f"HOTWEIGHTS_KV_HEAD_MAP_FILE={path!r}: not JSON ({e.msg} at line {e.lineno}); "
            "expected a list such as [1, 0, 3, 2]") from None
    return validate_head_map(value, num_kv_heads, name=f"HOTWEIGHTS_KV_HEAD_MAP_FILE={path!r}")


def find_head_permutation(old: torch.Tensor, new: torch.Tensor, num_kv_heads: int,
                          *more: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, ...] | None:
    """m with new row block j == old row block m[j] of a [num_kv_heads * head_dim, ...] weight
    (k_proj / v_proj; pass further (old, new) pairs, e.g. v_proj, to require the same m), or None
    when the new weights are not an exact KV-head permutation of the old ones."""
    pairs = [(old, new), *more]
    m: list[int] = []
    blocks = []
    for o, n in pairs:
        if o.shape != n.shape or o.shape[0] % num_kv_heads:
            raise ValueError(
                f"find_head_permutation: weights of shapes {tuple(o.shape)} and {tuple(n.shape)}: "
                f"expected equal shapes with dim 0 a multiple of num_kv_heads={num_kv_heads}")
        blocks.append((o.reshape(num_kv_heads, -1), n.reshape(num_kv_heads, -1)))
    for j in range(num_kv_heads):
        hit = next((i for i in range(num_kv_heads)
                    if all(torch.equal(nb[j], ob[i]) for ob, nb in blocks)), None)
        if hit is None:
            return None
        m.append(hit)
    return tuple(m) if len(set(m)) == num_kv_heads else None


def tp_kv_heads(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, ...]:
    """The global KV heads tensor-parallel ``rank`` of ``tp_size`` holds (vLLM's rule: a
    contiguous slice when tp_size divides num_kv_heads, else each head replicated on
    tp_size / num_kv_heads consecutive ranks)."""
    for name, v in (("num_kv_heads", num_kv_heads), ("tp_size", tp_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KVMapError(f"tp_kv_heads: {name} must be a positive int, got {v!r}")
    if not 0 <= rank < tp_size:
        raise KVMapError(f"tp_kv_heads: rank={rank} is out of range for tp_size={tp_size}")
    if num_kv_heads % tp_size == 0:
        per = num_kv_heads // tp_size
        return tuple(range(rank * per, (rank + 1) * per))
    if tp_size % num_kv_heads == 0:
        return (rank // (tp_size // num_kv_heads),)
    raise KVMapError(
        f"tp_kv_heads: num_kv_heads={num_kv_heads} and tp_size={tp_size}: one must divide the "
        "other to shard (or replicate) KV heads")


def tp_reshard_sources(num_kv_heads: int, old_tp: int, new_tp: int) -> list[list[tuple[int, int]]]:
    """For each new rank, for each of its KV heads: (old rank, local index there) to copy from.
    A replicated head is taken from the old rank of the same index when it holds it."""
    out = []
    for r in range(new_tp):
        srcs = []
        for g in tp_kv_heads(num_kv_heads, new_tp, r):
            holders = [o for o in range(old_tp) if g in tp_kv_heads(num_kv_heads, old_tp, o)]
            src = r if r in holders else holders[0]
            srcs.append((src, tp_kv_heads(num_kv_heads, old_tp, src).index(g)))
        out.append(srcs)
    return out


def reshard_kv_heads(shards: Sequence[torch.Tensor], num_kv_heads: int, new_tp: int, *,
                     layout: str | None = None, head_axis: int | None = None) -> list[torch.Tensor]:
    """Per-rank caches of TP degree len(shards) re-cut for ``new_tp`` ranks (in one process:
    the shards of a gathered cache); each new shard holds tp_kv_heads(num_kv_heads, new_tp, r)."""
    old_tp = len(shards)
    if old_tp == 0:
        raise ValueError("reshard_kv_heads: no shards")
    axis, _ = head_axis_of(shards[0], layout, head_axis, "reshard_kv_heads")
    for r, s in enumerate(shards):
        want = len(tp_kv_heads(num_kv_heads, old_tp, r))
        if s.shape[axis] != want:
            raise ValueError(
                f"reshard_kv_heads: shard {r} has {s.shape[axis]} KV heads on axis {axis}, "
                f"expected {want} (num_kv_heads={num_kv_heads}, tp={old_tp})")
    return [torch.cat([shards[o].narrow(axis, i, 1) for o, i in srcs], dim=axis)
            for srcs in tp_reshard_sources(num_kv_heads, old_tp, new_tp)]


def _map_tensor(head_map: Any, kv: torch.Tensor, num: int, context: str, op: str,
                permutation: bool) -> torch.Tensor:
    try:
        values = validate_head_map(head_map, num, permutation=permutation, context=context)
    except KVMapError as e:
        raise KVMapError(f"{op}: {e}") from None
    if isinstance(head_map, torch.Tensor) and head_map.device in (kv.device, torch.device("cpu")):
        return head_map
    return torch.tensor(values, dtype=torch.long)


def remap_kv_heads(kv: torch.Tensor, head_map: Sequence[int] | torch.Tensor,
                   layout: str | None = None, head_axis: int | None = None, *,
                   inplace: bool = False, allow_gather: bool = False) -> torch.Tensor:
    """Cache whose KV head j is ``kv``'s head ``head_map[j]`` (Note [KV head maps]), on the axis
    of the named ``layout`` or ``head_axis`` (exactly one). The map must be a permutation unless
    ``allow_gather`` (out of place only); ``inplace`` permutes ``kv`` itself and returns it."""
    op = "remap_kv_heads_" if inplace else "remap_kv_heads"
    axis, where = head_axis_of(kv, layout, head_axis, op)
    if inplace and allow_gather:
        raise ValueError(f"{op}: allow_gather needs the out-of-place op (inplace=False)")
    m = _map_tensor(head_map, kv, kv.shape[axis], where, op, permutation=not allow_gather)
    if kv.requires_grad and torch.is_grad_enabled():  # a cache, not a graph: no backward
        raise ValueError(f"{op}: the input requires grad and the op has no backward; remap "
                         "KV caches under torch.no_grad() (or pass kv.detach())")
    if inplace and kv.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{op}: in-place update of an inference tensor outside "
                           "torch.inference_mode()")
    if inplace:
        return _ops.remap_kv_heads_(kv, m, axis)
    return _ops.remap_kv_heads(kv, m, axis)


# --------------------------------------------------------------------------- RoPE

ROPE_SCALINGS = (None, "default", "linear", "ntk", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """A RoPE configuration; ``inv_freq()`` follows transformers' ROPE_INIT_FUNCTIONS.

    scaling: None/"default"; "linear" (position interpolation: w / factor); "ntk" (static
    NTK-aware: theta * factor^(d/(d-2))); "dynamic" (HF dynamic NTK frozen at ``seq_len``:
    theta * (factor*L/M - (factor-1))^(d/(d-2)), L = max(seq_len, M), M =
    original_max_position_embeddings); "llama3" (Llama 3.1 wavelength bands); "yarn" (YaRN
    ramp between interpolation and extrapolation, plus an attention factor). Dynamic NTK changes
    the frequencies with the sequence length, so cached keys were rotated with the ``seq_len``
    of their own forward pass: re-rotation is exact only if every cached key used the same one.
    """

    theta: float = 10000.0
    rotary_dim: int = 128
    scaling: str | None = None
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn (None: from factor / mscale)
    mscale: float | None = None  # yarn (DeepSeek style)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: floor/ceil the correction range
    seq_len: int | None = None  # dynamic

    def __post_init__(self):
        if self.scaling not in ROPE_SCALINGS:
            raise ValueError(f"RopeConfig: scaling={self.scaling!r}: expected one of "
                             f"{', '.join(str(s) for s in ROPE_SCALINGS)}")
        if not (isinstance(self.rotary_dim, int) and self.rotary_dim >= 2 and self.rotary_dim % 2 == 0):
            raise ValueError(f"RopeConfig: rotary_dim={self.rotary_dim!r}: expected an even int >= 2")
        if not self.theta > 0:
            raise ValueError(f"RopeConfig: theta={self.theta!r}: expected > 0")
        if self.scaling not in (None, "default") and not self.factor > 0:
            raise ValueError(f"RopeConfig: factor={self.factor!r}: expected > 0")
        if self.scaling in ("dynamic", "llama3") and not self.original_max_position_embeddings:
            raise ValueError(
                f"RopeConfig: scaling={self.scaling!r} needs original_max_position_embeddings")
        if self.scaling in ("ntk", "dynamic") and self.rotary_dim < 4:
            raise ValueError(f"RopeConfig: scaling={self.scaling!r} with rotary_dim="
                             f"{self.rotary_dim}: NTK scaling raises theta to d/(d-2), expected "
                             "rotary_dim >= 4")

    def same_rotation(self, other: "RopeConfig") -> bool:
        """Whether keys rotated under ``other`` are the keys rotated under this one: the
        same rotated dims, frequencies and attention scaling (None and "default" are one
        scaling; a factor that no scaling uses changes nothing)."""
        return (self.rotary_dim == other.rotary_dim
                and torch.equal(self.inv_freq(), other.inv_freq())
                and self.attention_scaling() == other.attention_scaling())

    @classmethod
    def from_hf(cls, config: Any, head_dim: int | None = None) -> "RopeConfig":
        """From a transformers config (object or dict): rope_theta, partial_rotary_factor,
        head_dim, rope_scaling (rope_type/type, factor, ...), max_position_embeddings."""
        get = (config.get if isinstance(config, Mapping)
               else lambda k, d=None: getattr(config, k, d))
        if head_dim is None:
            head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        rotary_dim = int(head_dim * (get("partial_rotary_factor") or 1.0))
        rs = dict(get("rope_scaling") or {})
        kind = rs.get("rope_type", rs.get("type"))
        kind = None if kind in (None, "default") else kind
        omax = rs.get("original_max_position_embeddings")
        if kind == "dynamic" and omax is None:
            omax = get("max_position_embeddings")  # HF dynamic NTK uses max_position_embeddings
        if kind == "yarn" and omax is None:
            omax = get("max_position_embeddings")
        kw = {k: rs[k] for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                 "attention_factor", "mscale", "mscale_all_dim", "truncate")
              if rs.get(k) is not None}
        return cls(theta=float(get("rope_theta") or 10000.0), rotary_dim=rotary_dim,
                   scaling=kind, factor=float(rs.get("factor", 1.0)),
                   original_max_position_embeddings=omax, **kw)

    def _pow_inv(self, base: float) -> torch.Tensor:
        # 1 / base^(2i/d) in fp32, the exact expression HF evaluates (same rounding).
        d = self.rotary_dim
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32[rotary_dim / 2] inverse frequencies (transformers modeling_rope_utils math)."""
        d, s = self.rotary_dim, self.scaling
        if s in (None, "default"):
            w = self._pow_inv(self.theta)
        elif s == "linear":  # _compute_linear_scaling_rope_parameters
            w = self._pow_inv(self.theta) / self.factor
        elif s == "ntk":  # static NTK-aware base change (bloc97)
            w = self._pow_inv(self.theta * self.factor ** (d / (d - 2)))
        elif s == "dynamic":  # _compute_dynamic_ntk_parameters at a fixed sequence length
            m = self.original_max_position_embeddings
            L = max(self.seq_len or m, m)
            w = self._pow_inv(self.theta * ((self.factor * L / m) - (self.factor - 1)) ** (d / (d - 2)))
        elif s == "llama3":  # _compute_llama3_parameters
            w0 = self._pow_inv(self.theta)
            old_ctx = self.original_max_position_embeddings
            low_wl, high_wl = old_ctx / self.low_freq_factor, old_ctx / self.high_freq_factor
            wavelen = 2 * math.pi / w0
            w = torch.where(wavelen > low_wl, w0 / self.factor, w0)
            smooth = (old_ctx / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * w / self.factor + smooth * w
            medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
            w = torch.where(medium, smoothed, w)
        else:  # yarn: _compute_yarn_parameters
            base, f = self.theta, self.factor
            omax = self.original_max_position_embeddings or 2048

            def corr_dim(rot):
                return (d * math.log(omax / (rot * 2 * math.pi))) / (2 * math.log(base))

            lo, hi = corr_dim(self.beta_fast), corr_dim(self.beta_slow)
            if self.truncate:
                lo, hi = math.floor(lo), math.ceil(hi)
            lo, hi = max(lo, 0), min(hi, d - 1)
            if lo == hi:
                hi += 0.001  # as HF: avoid a zero-width ramp
            ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
            pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
            extra = 1 - ramp  # weight of extrapolation (the unscaled frequency)
            w = (1.0 / (f * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        w = w.to(torch.float32)
        return w if device is None else w.to(device)

    def attention_scaling(self) -> float:
        """The factor HF folds into cos and sin (YaRN's mscale; 1.0 for the other types)."""
        if self.scaling != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_STYLES = ("neox", "gptj")


def _positions(positions: Any) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rerotate_rope: positions must be int64 or int32, got {positions.dtype}")
    return positions


def _rope_args(old: RopeConfig, new: RopeConfig, style: str, head_dim: int, op: str):
    if style not in _STYLES:
        raise ValueError(f"{op}: style={style!r}: expected 'neox' (half-split pairs, HF "
                         "rotate_half) or 'gptj' (interleaved pairs 2i, 2i+1)")
    if old.rotary_dim != new.rotary_dim:
        raise ValueError(
            f"{op}: rotary_dim changes from {old.rotary_dim} to {new.rotary_dim}; the rotary "
            "pairs depend on it, so the cache cannot be re-rotated (invalidate it)")
    if old.rotary_dim > head_dim:
        raise ValueError(f"{op}: rotary_dim={old.rotary_dim} exceeds head_dim={head_dim}")
    return old.inv_freq(), new.inv_freq(), new.attention_scaling() / old.attention_scaling()


def rerotate_rope(k: torch.Tensor, positions: Any, old_rope: RopeConfig, new_rope: RopeConfig,
                  style: str = "neox", head_dim_axis: int = -1) -> torch.Tensor:
    """Cached keys k (rotated with ``old_rope`` at ``positions``) as ``new_rope`` would have
    rotated them: k' = s'/s * R(p*w') R(p*w)^-1 k per rotary pair, fp32 math, dims beyond
    rotary_dim untouched. ``positions`` broadcasts to k's shape without the head-dim axis."""
    op = "rerotate_rope"
    d = k.dim()
    if not -d <= head_dim_axis < d:
        raise ValueError(f"{op}: head_dim_axis={head_dim_axis} is out of range for k of shape "
                         f"{tuple(k.shape)}")
    km = k.movedim(head_dim_axis, -1)
    w0, w1, scale = _rope_args(old_rope, new_rope, style, km.shape[-1], op)
    pos = _positions(positions)
    out = _ops.rerotate_rope(km, pos, w0, w1, scale, style == "neox")
    return out.movedim(-1, head_dim_axis)


def rerotate_cache(kv: torch.Tensor, positions: Any, old_rope: RopeConfig, new_rope: RopeConfig,
                   layout: str, style: str = "neox", *, k_scale: Any = None,
                   inplace: bool = False) -> torch.Tensor:
    """A cache with its K part re-rotated (V untouched). positions: the absolute position of
    every slot, (num_blocks, block_size) for paged layouts, (batch, seq) or (seq,) for "hf"
    (where ``kv`` is a layer's key tensor). An FP8 cache needs its ``k_scale`` (per tensor or
    per head): keys are dequantized, rotated in fp32 and quantized once with the same scale."""
    op = "rerotate_cache"
    lay = _layout(layout, op)
    _check_layout_shape(kv, lay, op)
    k = kv if lay.kv_axis is None else kv.select(lay.kv_axis, 0)  # [.., heads, head_dim]
    pos = _positions(positions)
    if lay.name == "hf":
        pos = pos.reshape(1, 1, -1) if pos.dim() == 1 else pos.unsqueeze(1)
    else:
        pos = pos.unsqueeze(-1)  # (num_blocks, block_size, 1) over the heads
    fp8 = kv.dtype in _ops._FP8_DTYPES
    if fp8:
        if k_scale is None:
            raise ValueError(f"{op}: an {kv.dtype} cache needs k_scale to dequantize the keys")
        s = _scale_view(k_scale, k, k.dim() - 2 if lay.name != "hf" else 1, op, "k_scale")
        rot = rerotate_rope(k.float() * s, pos, old_rope, new_rope, style)
        rot = _quantize(rot, s, kv.dtype)
    else:
        rot = rerotate_rope(k, pos, old_rope, new_rope, style)
    log.info("%s: re-rotating K of a %s cache %s (%s -> %s)", op, layout, tuple(kv.shape),
             old_rope, new_rope)
    out = kv if inplace else kv.clone()
    (out if lay.kv_axis is None else out.select(lay.kv_axis, 0)).copy_(rot)
    return out


# --------------------------------------------------------------------------- dtypes, FP8


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _scale_tensor(s: Any, name: str, op: str) -> torch.Tensor:
    t = s if isinstance(s, torch.Tensor) else torch.as_tensor(s, dtype=torch.float32)
    if not t.is_floating_point() or t.dtype in _ops._FP8_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating scale, got {t.dtype}")
    if t.dim() > 1:
        raise ValueError(f"{op}: {name} must be 0-d (per tensor) or 1-D (per head), got shape "
                         f"{tuple(t.shape)}")
    return t.to(torch.float32)


def _scale_view(s: Any, t: torch.Tensor, axis: int, op: str, name: str) -> torch.Tensor:
    """A float32 scale shaped to broadcast along ``axis`` of t (per head) or as a scalar."""
    st = _scale_tensor(s, name, op).to(t.device)
    if st.numel() == 1:
        return st.reshape(())
    if st.numel() != t.shape[axis]:
        raise ValueError(f"{op}: {name} has {st.numel()} entries, expected 1 (per tensor) or "
                         f"num_kv_heads={t.shape[axis]} (axis {axis} of shape {tuple(t.shape)})")
    shape = [1] * t.dim()
    shape[axis] = st.numel()
    return st.reshape(shape)


def _quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = _fp8_max(dtype)
    return (x.float() / scale).clamp(-m, m).to(dtype)  # clamp: saturate, NaN passes


def _check_scale_values(s: torch.Tensor, name: str, op: str, strict: bool) -> None:
    vals = s.detach().reshape(-1).cpu().tolist()
    for i, v in enumerate(vals):
        if not math.isfinite(v) or v < 0 or (strict and v == 0):
            raise ValueError(f"{op}: {name}[{i}] = {v}; expected a finite scale "
                             f"{'> 0' if strict else '>= 0'}")


def requantize_fp8(q: torch.Tensor, s_old: Any, s_new: Any, layout: str | None = None,
                   head_axis: int | None = None) -> torch.Tensor:
    """fp8(dequant(q) * s_old / s_new) in fp32 with saturation (e4m3fn and e5m2). Scales are
    per tensor (0-d or one element) or per head (length num_kv_heads along the named layout's
    head axis or ``head_axis``; an axis is required only then)."""
    op = "requantize_fp8"
    if q.dtype not in _ops._FP8_DTYPES:
        raise TypeError(f"{op}: q must be float8_e4m3fn or float8_e5m2, got {q.dtype} "
                        "(convert_kv_dtype handles the others)")
    so, sn = _scale_tensor(s_old, "s_old", op), _scale_tensor(s_new, "s_new", op)
    _check_scale_values(so, "s_old", op, strict=False)
    _check_scale_values(sn, "s_new", op, strict=True)
    if layout is None and head_axis is None:
        if so.numel() > 1 or sn.numel() > 1:
            raise ValueError(f"{op}: per-head scales need layout= or head_axis= to know the "
                             "KV-head axis (never guessed)")
        axis = 0
    else:
        axis, _ = head_axis_of(q, layout, head_axis, op)
    return _ops.requantize_fp8(q, so.to(q.device), sn.to(q.device), axis)


def convert_kv_dtype(kv: torch.Tensor, dtype: torch.dtype, *, scale: Any = None,
                     new_scale: Any = None, layout: str | None = None,
                     head_axis: int | None = None) -> torch.Tensor:
    """A cache in another dtype. FP8 sources are dequantized with ``scale``, FP8 targets
    quantized with ``new_scale`` (saturating); fp8 -> same fp8 is :func:`requantize_fp8`.
    Per-head scales need layout= or head_axis=."""
    op = "convert_kv_dtype"
    src8, dst8 = kv.dtype in _ops._FP8_DTYPES, dtype in _ops._FP8_DTYPES
    if src8 and scale is None:
        raise ValueError(f"{op}: the source is {kv.dtype}: pass scale= (its dequant scale)")
    if dst8 and new_scale is None:
        raise ValueError(f"{op}: the target is {dtype}: pass new_scale= (its quant scale)")
    if not src8 and scale is not None:
        raise ValueError(f"{op}: scale= only applies to an FP8 source, the cache is {kv.dtype}")
    if not dst8 and new_scale is not None:
        raise ValueError(f"{op}: new_scale= only applies to an FP8 target, got dtype {dtype}")
    if src8 and dst8 and kv.dtype == dtype:
        return requantize_fp8(kv, scale, new_scale, layout, head_axis)

    def view(s, name):
        st = _scale_tensor(s, name, op)
        _check_scale_values(st, name, op, strict=name == "new_scale")
        if st.numel() == 1:
            return st.to(kv.device).reshape(())
        axis, _ = head_axis_of(kv, layout, head_axis, op)
        return _scale_view(st, kv, axis, op, name)

    x = kv.float() * view(scale, "scale") if src8 else kv
    if dst8:
        return _quantize(x, view(new_scale, "new_scale"), dtype)
    return x.to(dtype)


def _kv_dtype(x: Any, what: str) -> torch.dtype:
    """A KV-cache dtype given as a torch.dtype or its name ("bfloat16", "torch.float8_e4m3fn")."""
    if isinstance(x, torch.dtype):
        return x
    if isinstance(x, str):  # vLLM's kv_cache_dtype names too
        if x == "auto":  # vLLM: the model's dtype, which this plan is not told
            raise ValueError(f"plan: {what}='auto' (vLLM's kv_cache_dtype default) differs from "
                             "the other side: pass the dtype it resolves to (the model's dtype)")
        x = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_inc": "float8_e4m3fn",
             "fp8_e5m2": "float8_e5m2"}.get(x, x)
    dt = getattr(torch, str(x).removeprefix("torch."), None) if isinstance(x, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"plan: {what}={x!r}: expected a torch dtype or its name (e.g. "
                         "'bfloat16', 'float8_e4m3fn', or vLLM's 'fp8', 'fp8_e5m2')")
    return dt


def convert_layout(kv: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """A paged cache moved between vllm_flash (2, B, S, H, D) and flashinfer (B, 2, S, H, D)."""
    op = "convert_layout"
    a, b = _layout(src, op), _layout(dst, op)
    _check_layout_shape(kv, a, op)
    if a.name == b.name:
        return kv
    if {a.name, b.name} != {"vllm_flash", "flashinfer"}:
        raise ValueError(f"{op}: {a.name} -> {b.name} needs the block tables (only vllm_flash "
                         "<-> flashinfer is a pure layout change)")
    return kv.transpose(0, 1).contiguous()


# --------------------------------------------------------------------------- the plan
#
# Note [KV exactness rule]
# Layer l's cached K/V for the old tokens are what a fresh prefill with the new weights would
# compute iff nothing that feeds them changed: the embeddings, any parameter of layers < l, and
# layer l's input norm and k/v projections (and k_norm). RoPE configuration and KV-cache
# representation (dtype, FP8 scales, layout, head order) are special: they change layer l's
# stored bytes by a known transform, but they also change the *attention* of every layer that
# reads the cache, hence the inputs of every later layer. So a RoPE or KV-dtype change can be
# fixed exactly only in layer 0; an FP8 scale change of layer l only in layer l (and only up to
# one FP8 step); layers above are stale. A consistent KV-head permutation of a layer's q/k/v/o
# projections leaves every layer's output unchanged, so the layer's cache is remapped exactly.
# approximate=True also transforms the stale layers (SinkCache/StreamingLLM-style reuse).

EFFECTS = ("all", "none", "from_layer", "after_layer", "kv_scale", "rope")


@dataclasses.dataclass(frozen=True)
class NameRule:
    """A regex over tensor names and what a change of such a tensor invalidates.

    effect: "all" (every layer), "none" (no layer's K/V), "from_layer" (layers >= the named
    layer: feeds its K/V), "after_layer" (layers > it), "kv_scale" (FP8 KV scale of the layer:
    requantize it, layers > it stale), "rope" (RoPE buffers: judged from old_rope/new_rope).
    The pattern needs a named group ``layer`` for the per-layer effects. ``head_permutable``
    marks q/k/v/o projections, whose change may be declared a KV-head permutation.
    """

    pattern: str
    effect: str
    what: str = ""
    head_permutable: bool = False

    def __post_init__(self):
        if self.effect not in EFFECTS:
            raise ValueError(f"NameRule: effect={self.effect!r}: expected one of {', '.join(EFFECTS)}")
        rx = re.compile(self.pattern)
        per_layer = self.effect in ("from_layer", "after_layer", "kv_scale")
        if per_layer and "layer" not in rx.groupindex:
            raise ValueError(f"NameRule: effect {self.effect!r} needs a (?P<layer>...) group in "
                             f"{self.pattern!r}")


_L = r"^model\.layers\.(?P<layer>\d+)\."
# HF Llama-style names (Llama, Mistral, Qwen2/3, Gemma). First match wins, so the FP8 KV-scale
# names (vLLM: self_attn.k_scale, self_attn.attn.k_scale, self_attn.k_proj.k_scale) precede
# the projections.
DEFAULT_NAME_RULES: tuple[NameRule, ...] = (
    NameRule(r"^model\.embed_tokens\.", "all", "token embeddings feed every layer"),
    NameRule(r"^model\.norm\.|^lm_head\.", "none", "final norm / LM head: after every layer's K/V"),
    NameRule(_L + r"self_attn\.(?:attn\.|k_proj\.|v_proj\.)?[kv]_scale$", "kv_scale",
             "FP8 KV-cache scale of this layer"),
    NameRule(_L + r"self_attn\.[kv]_proj\.", "from_layer", "k/v projection of this layer",
             head_permutable=True),
    NameRule(_L + r"(?:input_layernorm|self_attn\.k_norm)\.", "from_layer",
             "feeds this layer's K/V"),
    NameRule(_L + r"self_attn\.[qo]_proj\.", "after_layer", "q/o projection: this layer's output",
             head_permutable=True),
    NameRule(_L + r"(?:self_attn\.q_norm|mlp|block_sparse_moe|post_attention_layernorm|"
             r"pre_feedforward_layernorm|post_feedforward_layernorm)\.", "after_layer",
             "feeds only this layer's output"),
    NameRule(r"^model\.(?:layers\.\d+\.self_attn\.)?rotary_emb\.", "rope", "RoPE buffers"),
)

ACTIONS = ("keep", "transform", "invalidate")


@dataclasses.dataclass(frozen=True)
class KVAction:
    """What to do with one layer's cache, why, and the transforms to run (JSON-able dicts)."""

    layer: int
    action: str
    reasons: tuple[str, ...] = ()
    transforms: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"layer": self.layer, "action": self.action, "reasons": list(self.reasons),
                "transforms": [dict(t) for t in self.transforms]}


def _ranges(layers: Sequence[int]) -> str:
    out, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(out) or "-"


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """Per-layer keep / transform / invalidate decisions for one weight update."""

    actions: tuple[KVAction, ...]
    changed: tuple[str, ...] = ()
    unrecognized: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    allow_transforms: bool = False
    approximate: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.actions)

    def _layers(self, action: str) -> list[int]:
        return [a.layer for a in self.actions if a.action == action]

    @property
    def keep(self) -> list[int]:
        return self._layers("keep")

    @property
    def transform(self) -> list[int]:
        return self._layers("transform")

    @property
    def invalidate(self) -> list[int]:
        return self._layers("invalidate")

    @property
    def first_stale_layer(self) -> int | None:
        """The smallest invalidated layer (L0 of the exactness rule), None when none is."""
        inv = self.invalidate
        return inv[0] if inv else None

    def transforms(self) -> list[dict]:
        """Every planned transform, each with its layer (what the server must run)."""
        return [{"layer": a.layer, **t} for a in self.actions if a.action == "transform"
                for t in a.transforms]

    def summary(self) -> str:
        parts = [f"keep {_ranges(self.keep)}", f"transform {_ranges(self.transform)}",
                 f"invalidate {_ranges(self.invalidate)}"]
        s = f"KV plan over {self.num_layers} layers: " + "; ".join(parts)
        first = self.first_stale_layer
        if first is not None:
            s += f" (first stale layer {first}: {self.actions[first].reasons[0]})"
        ts = self.transforms()
        if ts:
            s += "; transforms: " + ", ".join(
                f"L{t['layer']} {t['op']}{'' if t.get('exact') else ' (approximate)'}" for t in ts)
        if self.unrecognized:
            s += f"; unrecognised changed tensors: {', '.join(self.unrecognized[:5])}"
            if len(self.unrecognized) > 5:
                s += f" (+{len(self.unrecognized) - 5} more)"
        return s

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "num_layers": self.num_layers,
            "allow_transforms": self.allow_transforms,
            "approximate": self.approximate,
            "first_stale_layer": self.first_stale_layer,
            "keep": self.keep, "transform": self.transform, "invalidate": self.invalidate,
            "actions": [a.to_dict() for a in self.actions],
            "changed": list(self.changed),
            "unrecognized": list(self.unrecognized),
            "ignored": list(self.ignored),
            "summary": self.summary(),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: Mapping) -> "KVPlan":
        if d.get("version") != 1:
            raise ValueError(f"KVPlan.from_dict: version {d.get('version')!r}, expected 1")
        acts = tuple(KVAction(a["layer"], a["action"], tuple(a["reasons"]),
                              tuple(a["transforms"])) for a in d["actions"])
        return cls(acts, tuple(d["changed"]), tuple(d["unrecognized"]), tuple(d["ignored"]),
                   bool(d["allow_transforms"]), bool(d["approximate"]))


_MISSING = object()


def _checksums(m: Any, which: str) -> Mapping[str, Any]:
    if hasattr(m, "checksums") and callable(m.checksums):
        m = m.checksums()
    if not isinstance(m, Mapping):
        raise TypeError(f"plan: {which} must be a Mapping[str, int] of checksums or have a "
                        f"checksums() method returning one, got {type(m).__name__}")
    return m


def _compile_rules(rules: Sequence[NameRule | tuple] | None) -> list[tuple[re.Pattern, NameRule]]:
    out = []
    for r in DEFAULT_NAME_RULES if rules is None else rules:
        r = r if isinstance(r, NameRule) else NameRule(*r)
        out.append((re.compile(r.pattern), r))
    return out


def plan(old_manifest: Any, new_manifest: Any, num_layers: int,
         name_rules: Sequence[NameRule | tuple] | None = None, *,
         old_rope: RopeConfig | None = None, new_rope: RopeConfig | None = None,
         old_layout: str | None = None, new_layout: str | None = None,
         old_kv_dtype: torch.dtype | str | None = None, new_kv_dtype: torch.dtype | str | None = None,
         head_maps: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
         allow_transforms: bool | None = None, approximate: bool = False) -> KVPlan:
    """Decides, per layer, whether its KV cache is kept, transformed or invalidated after the
    update from ``old_manifest`` to ``new_manifest`` (Note [KV exactness rule]).

    Manifests map tensor name -> checksum (or have ``checksums()``). ``name_rules`` (default
    DEFAULT_NAME_RULES, HF Llama names) classify changed tensors; a changed tensor no rule
    matches invalidates every layer. Optional RoPE configs, layouts and KV dtypes describe a
    change of the cache representation. ``head_maps`` declares that the changed q/k/v/o
    projections of a layer (a {layer: map} dict, or one map for all layers) are exactly that
    KV-head permutation of the old ones (check it with find_head_permutation). Transforms need
    ``allow_transforms`` (default HOTWEIGHTS_KV_ALLOW_TRANSFORMS); without it they become
    invalidations, with the reason. ``approximate`` also transforms layers whose inputs changed
    only through an earlier layer's RoPE / KV representation (not exact).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"plan: num_layers must be an int >= 0, got {num_layers!r}")
    if (old_rope is None) != (new_rope is None):
        raise ValueError("plan: pass both old_rope and new_rope, or neither")
    if (old_layout is None) != (new_layout is None):
        raise ValueError("plan: pass both old_layout and new_layout, or neither")
    if (old_kv_dtype is None) != (new_kv_dtype is None):
        raise ValueError("plan: pass both old_kv_dtype and new_kv_dtype, or neither")
    if old_kv_dtype is not None:
        if isinstance(old_kv_dtype, str) and old_kv_dtype == new_kv_dtype:
            old_kv_dtype = new_kv_dtype = None  # the same name ("auto" too): no change
        else:  # torch.bfloat16 and "bfloat16" are one dtype
            old_kv_dtype = _kv_dtype(old_kv_dtype, "old_kv_dtype")
            new_kv_dtype = _kv_dtype(new_kv_dtype, "new_kv_dtype")
    for lay in (old_layout, new_layout):
        if lay is not None:
            _layout(lay, "plan")
    allow = _config.get().kv_allow_transforms if allow_transforms is None else bool(allow_transforms)
    old, new = _checksums(old_manifest, "old_manifest"), _checksums(new_manifest, "new_manifest")
    changed = sorted(n for n in set(old) | set(new) if old.get(n, _MISSING) != new.get(n, _MISSING))
    rules = _compile_rules(name_rules)
    if head_maps is None:
        hmaps: dict[int, tuple[int, ...]] = {}
    elif isinstance(head_maps, Mapping):
        hmaps = {int(k): tuple(v) for k, v in head_maps.items()}
    else:
        hmaps = {i: tuple(head_maps) for i in range(num_layers)}
    for i, m in hmaps.items():
        if not 0 <= i < num_layers:
            raise ValueError(f"plan: head_maps names layer {i}, outside 0..{num_layers - 1}")
        validate_head_map(m, len(m), name=f"head_maps[{i}]")

    # hard: stale because something feeding the layer's K/V changed (never reused);
    # soft: stale only through an earlier layer's RoPE / KV representation (approximate=True).
    hard: dict[int, str] = {}
    soft: dict[int, str] = {}
    transforms: dict[int, list[dict]] = {}

    def mark(reasons: dict[int, str], first: int, reason: str) -> None:
        for layer in range(max(first, 0), num_layers):
            reasons.setdefault(layer, reason)

    def add_transform(layer: int, t: dict) -> None:
        transforms.setdefault(layer, []).append(t)

    unrecognized, ignored, rope_buffers = [], [], []
    permuted: dict[int, list[str]] = {}
    for name in changed:
        hit = next(((rx, r) for rx, r in rules if rx.search(name)), None)
        if hit is None:
            unrecognized.append(name)
            mark(hard, 0, f"{name} changed and no name rule recognises it: every layer is "
                          "conservatively invalidated")
            continue
        rx, rule = hit
        what = f" ({rule.what})" if rule.what else ""
        if rule.effect == "none":
            ignored.append(name)
            continue
        if rule.effect == "all":
            mark(hard, 0, f"{name} changed{what}")
            continue
        if rule.effect == "rope":
            rope_buffers.append(name)
            continue
        layer = int(rx.search(name).group("layer"))
        if not 0 <= layer < num_layers:
            raise ValueError(f"plan: {name} names layer {layer}, but num_layers={num_layers}")
        # an identity "permutation" explains no change: such a tensor is judged by its rule
        if (rule.head_permutable and layer in hmaps
                and hmaps[layer] != tuple(range(len(hmaps[layer])))):
            permuted.setdefault(layer, []).append(name)
        elif rule.effect == "from_layer":
            mark(hard, layer, f"{name} changed{what}")
        elif rule.effect == "after_layer":
            mark(hard, layer + 1, f"{name} changed{what}")
        else:  # kv_scale
            add_transform(layer, {"op": "requantize_fp8", "tensor": name, "exact": False,
                                  "note": "within one FP8 step of a fresh quantization"})
            mark(soft, layer + 1, f"{name} changed: layer {layer}'s attention read its K/V "
                                  "through the old scale, so this layer's inputs differ")

    for layer, m in sorted(hmaps.items()):
        if layer in permuted:
            add_transform(layer, {"op": "remap_kv_heads", "head_map": list(m), "exact": True,
                                  "tensors": permuted[layer]})
        elif m != tuple(range(len(m))):
            raise ValueError(f"plan: head_maps declares KV-head permutation {list(m)} for layer "
                             f"{layer}, but none of its q/k/v/o projections changed")

    # Representation changes: exact in layer 0, approximate above (Note [KV exactness rule]).
    def representation(op: str, t: dict, exact0: bool, why: str) -> None:
        add_transform(0, {"op": op, **t, "exact": exact0})
        for layer in range(1, num_layers):
            add_transform(layer, {"op": op, **t, "exact": False})
        mark(soft, 1, why)

    if old_rope is not None and not old_rope.same_rotation(new_rope):
        representation("rerotate_rope", {"old_rope": old_rope.to_dict(),
                                         "new_rope": new_rope.to_dict()}, True,
                       "the RoPE configuration changed: attention in the layers below saw the "
                       "old rotation, so this layer's pre-RoPE keys differ")
    elif rope_buffers:
        mark(hard, 0, f"{rope_buffers[0]} changed (RoPE buffers) and no old_rope/new_rope were "
                      "given to re-rotate the keys")
    if old_kv_dtype is not None and old_kv_dtype != new_kv_dtype:
        representation("convert_kv_dtype", {"from": str(old_kv_dtype), "to": str(new_kv_dtype)},
                       False, f"the KV dtype changed ({old_kv_dtype} -> {new_kv_dtype}): "
                       "attention in the layers below read differently rounded K/V")
    if old_layout is not None and old_layout != new_layout:
        if {_layout(old_layout, "plan").name, _layout(new_layout, "plan").name} == {
                "vllm_flash", "flashinfer"}:
            for layer in range(num_layers):  # pure data movement: exact everywhere
                add_transform(layer, {"op": "convert_layout", "from": old_layout,
                                      "to": new_layout, "exact": True})
        else:  # what convert_layout cannot do without the block tables
            mark(hard, 0, f"the KV layout changed ({old_layout} -> {new_layout}): only "
                          "vllm_flash <-> flashinfer is converted in place")

    actions = []
    for layer in range(num_layers):
        ts = tuple(transforms.get(layer, ()))
        if layer in hard:
            act = KVAction(layer, "invalidate", (hard[layer],))
        elif layer in soft and not approximate:
            act = KVAction(layer, "invalidate", (soft[layer],))
        elif ts and not allow:
            act = KVAction(layer, "invalidate", (
                "needs " + ", ".join(t["op"] for t in ts) +
                " but transforms are off (HOTWEIGHTS_KV_ALLOW_TRANSFORMS=0)",))
        elif ts:
            why = [f"{t['op']}{'' if t['exact'] else ' (approximate)'}" for t in ts]
            if layer in soft:
                why.append("approximate=True, stale otherwise: " + soft[layer])
            act = KVAction(layer, "transform", tuple(why), ts)
        elif layer in soft:
            act = KVAction(layer, "keep", ("approximate=True, kept although stale: "
                                           + soft[layer],))
        else:
            act = KVAction(layer, "keep", ("nothing feeding this layer's K/V changed",))
        actions.append(act)
    result = KVPlan(tuple(actions), tuple(changed), tuple(unrecognized), tuple(ignored), allow,
                    bool(approximate))
    if result.transform or result.invalidate:
        log.info("%s", result.summary())
    return result


# --------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """Registers ``hotweights kv-check``."""
    p = subparsers.add_parser(
        "kv-check", help="derive and validate a KV-head map (GQA order conversion), optionally "
        "simulate it on random caches")
    p.add_argument("--heads", type=int, required=True, help="query heads (num_attention_heads)")
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads (num_key_value_heads)")
    p.add_argument("--order", choices=ORDERS, default=None,
                   help="query->KV order of the cached model (default HOTWEIGHTS_KV_HEAD_ORDER)")
    p.add_argument("--to", choices=ORDERS, default=None, help="order of the new model")
    p.add_argument("--query-map", default=None,
                   help="'keep' (query heads in place), 'canonical' (default when --to differs: "
                   "the query permutation that keeps KV heads), or a JSON list")
    p.add_argument("--map", default=None,
                   help="JSON KV-head map to validate instead of deriving one (else "
                   "HOTWEIGHTS_KV_HEAD_MAP[_FILE] when set)")
    p.add_argument("--simulate", action="store_true",
                   help="apply the map to random caches of every layout and check the round trip")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--blocks", type=int, default=256, help="paged layouts: num_blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="hf layout: batch")
    p.add_argument("--seq", type=int, default=1024, help="hf layout: sequence length")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=_cmd_kv_check)


def _time(fn, device: torch.device, reps: int = 5) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _simulate(m: tuple[int, ...], args) -> list[dict]:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"kv-check: --dtype {args.dtype!r} is not a torch dtype")
    kvh, d = args.kv_heads, args.head_dim
    shapes = {
        "vllm_flash": (2, args.blocks, args.block_size, kvh, d),
        "flashinfer": (args.blocks, 2, args.block_size, kvh, d),
        "hf": (args.batch, kvh, args.seq, d),
    }
    gen = torch.Generator().manual_seed(0)
    inv = invert_head_map(m)
    mt = torch.tensor(m, dtype=torch.long, device=dev)
    rows = []
    for name, shape in shapes.items():
        kv = torch.randn(shape, generator=gen).to(dtype).to(dev)
        axis = LAYOUTS[name].head_axis
        out = remap_kv_heads(kv, m, layout=name)
        ok_ref = torch.equal(out, kv.index_select(axis, mt))
        ok_round = torch.equal(remap_kv_heads(out, inv, layout=name), kv)
        work = kv.clone()
        remap_kv_heads(work, m, layout=name, inplace=True)
        ok_inplace = torch.equal(work, out)
        remap_kv_heads(work, inv, layout=name, inplace=True)
        ok_inplace = ok_inplace and torch.equal(work, kv)
        t_op = _time(lambda: remap_kv_heads(kv, m, layout=name), dev)
        t_ref = _time(lambda: kv.index_select(axis, mt), dev)
        nbytes = 2 * kv.numel() * kv.element_size()  # read + write
        rows.append({"layout": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "device": str(dev), "matches_index_select": ok_ref, "round_trip": ok_round,
                     "inplace_round_trip": ok_inplace, "ms": t_op * 1e3,
                     "gbps": nbytes / t_op / 1e9, "index_select_ms": t_ref * 1e3,
                     "speedup_vs_index_select": t_ref / t_op})
    return rows


def _cmd_kv_check(args) -> int:
    H, K = args.heads, args.kv_heads
    G = _group_size(H, K, "kv-check")
    order = _order(args.order, "kv-check")
    to = order if args.to is None else args.to
    report: dict[str, Any] = {"num_heads": H, "num_kv_heads": K, "group_size": G,
                              "order": order, "to": to}
    def parsed(flag: str, text: str, allowed: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise KVMapError(f"{flag} {text!r}: {allowed} ({e.msg} at column {e.colno})") from None

    qm: Any
    if args.query_map in (None, "canonical"):
        qm = "canonical" if (args.query_map == "canonical" or to != order) else None
    elif args.query_map == "keep":
        qm = None
    else:
        qm = parsed("--query-map", args.query_map,
                    f"expected 'keep', 'canonical' or a JSON list permuting the {H} query heads")
    if args.map is not None:
        m = validate_head_map(parsed("--map", args.map,
                                     f"expected a JSON list permuting the {K} KV heads"),
                              K, name="--map")
        report["source"] = "--map"
        if args.query_map is not None or to != order:  # then the map is implied: check it
            try:
                want = derive_head_map(H, K, order, to, query_map=qm)
            except KVMapError as e:
                raise KVMapError(f"--map {list(m)} cannot keep attention unchanged: {e}") from None
            if m != want:
                raise KVMapError(f"--map {list(m)} disagrees with the query-head map and orders "
                                 f"given ({order} -> {to}): they imply KV-head map {list(want)}")
    else:
        env_map = head_map_from_config(K)
        if env_map is not None:
            m, report["source"] = env_map, "HOTWEIGHTS_KV_HEAD_MAP" + (
                "" if _config.get().kv_head_map is not None else "_FILE")
        else:
            m = derive_head_map(H, K, order, to, query_map=qm)
            report["source"] = "derived"
            report["query_map"] = list(range(H)) if qm is None else list(
                query_head_map(H, K, order, to) if qm == "canonical" else qm)
    report["kv_head_map"] = list(m)
    report["identity"] = m == tuple(range(K))
    report["inverse"] = list(invert_head_map(m))
    report["valid"] = True
    if args.simulate:
        report["simulation"] = _simulate(m, args)
        report["valid"] = all(r["matches_index_select"] and r["round_trip"] and
                              r["inplace_round_trip"] for r in report["simulation"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["valid"] else 1
    print(f"KV-head check: {H} query heads, {K} KV heads (group size {G}), {order} -> {to}")
    print(f"  query -> KV, grouped:     a(h) = h // {G}")
    print(f"  query -> KV, interleaved: a(h) = h % {K}")
    if "query_map" in report and report["query_map"] != list(range(H)):
        print("  query-head map (new query head h = old head s[h]; permute q_proj rows and o_proj "
              f"columns): {report['query_map']}")
    print(f"  KV-head map ({report['source']}; new head j = old head m[j]): {list(m)}"
          + ("  [identity: the cache is reused as is]" if report["identity"] else ""))
    print(f"  inverse: {report['inverse']}")
    print(f"  valid: a permutation of 0..{K - 1}")
    for r in report.get("simulation", ()):
        status = "ok" if (r["matches_index_select"] and r["round_trip"] and
                          r["inplace_round_trip"]) else "FAILED"
        print(f"  simulate {r['layout']:<10} {str(tuple(r['shape'])):<26} {r['dtype']} "
              f"{r['device']}: {status}  remap {r['ms']:.3f} ms ({r['gbps']:.1f} GB/s), "
              f"index_select {r['index_select_ms']:.3f} ms (x{r['speedup_vs_index_select']:.2f})")
    return 0 if report["valid"] else 1
