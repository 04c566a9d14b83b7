# SPDX-License-Identifier: Apache-2.0
"""KV-cache ops and plan: head remap, GQA head maps, RoPE re-rotation, FP8 requantization,
the keep/transform/invalidate plan and `hotweights kv-check`. Every op is compared with a
plain-torch reference; CUDA parameters skip (with the reason) where there is no GPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hotweights import config, kv, ops
from hotweights.cli import main as cli_main

from utils import cpu_and_cuda

DEVICES = cpu_and_cuda()
LAYOUT_SHAPES = {
    "vllm_flash": (2, 5, 4, 8, 16),
    "flashinfer": (5, 2, 4, 8, 16),
    "hf": (2, 8, 7, 16),
}
PERM8 = (3, 1, 0, 2, 7, 6, 5, 4)


def _rand(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    return x.to(dtype).to(device)


def _perm(n, seed):
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())


# --------------------------------------------------------------------------- remap op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUT_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.uint8])
def test_remap_matches_index_select(device, layout, dtype):
    shape = LAYOUT_SHAPES[layout]
    x = _rand(shape, torch.float32, "cpu").to(dtype).to(device)
    axis = kv.LAYOUTS[layout].head_axis
    ref = x.cpu().view(torch.uint8).index_select(axis, torch.tensor(PERM8))  # bytes: fp8-safe
    out = kv.remap_kv_heads(x, PERM8, layout=layout)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.cpu().view(torch.uint8), ref)
    y = x.clone()
    assert kv.remap_kv_heads(y, PERM8, layout=layout, inplace=True) is y
    assert torch.equal(y.cpu().view(torch.uint8), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_remap_follows_strides(device):
    # vLLM HND stride order: logical (2, B, S, H, D), memory (2, B, H, S, D).
    phys = _rand((2, 6, 8, 5, 16), torch.bfloat16, device)
    x = phys.permute(0, 1, 3, 2, 4)
    assert not x.is_contiguous()
    m = torch.tensor(PERM8)
    out = kv.remap_kv_heads(x, PERM8, layout="vllm_flash")
    assert out.stride() == x.stride()  # same physical order, like empty_like
    assert torch.equal(out, x.index_select(3, m.to(device)))
    ref = x.index_select(3, m.to(device))
    kv.remap_kv_heads(x, PERM8, layout="vllm_flash", inplace=True)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_remap_non_dense_and_long_rows(device):
    big = _rand((2, 8, 40, 16), torch.float32, device)
    x = big[:, :, 3:33]  # a slice: not dense
    m = torch.tensor(PERM8, device=device)
    ref = x.index_select(1, m)
    assert torch.equal(kv.remap_kv_heads(x, PERM8, head_axis=1), ref)
    before = big.clone()
    kv.remap_kv_heads(x, PERM8, head_axis=1, inplace=True)
    assert torch.equal(x, ref)
    assert torch.equal(big[:, :, :3], before[:, :, :3]) and torch.equal(big[:, :, 33:], before[:, :, 33:])
    # HF rows longer than one CPU tile (64 KiB) and an odd element size.
    long = _rand((1, 8, 700, 32), torch.float32, device)
    ref = long.index_select(1, m)
    kv.remap_kv_heads(long, PERM8, layout="hf", inplace=True)
    assert torch.equal(long, ref)
    odd = torch.arange(2 * 8 * 3 * 3, dtype=torch.uint8, device=device).reshape(2, 8, 3, 3)
    assert torch.equal(kv.remap_kv_heads(odd, PERM8, layout="hf"), odd.index_select(1, m))


@pytest.mark.parametrize("device", DEVICES)
def test_remap_gather_identity_single_head_empty(device):
    x = _rand(LAYOUT_SHAPES["vllm_flash"], torch.float32, device)
    dup = (0, 0, 1, 1, 2, 2, 7, 7)
    out = kv.remap_kv_heads(x, dup, layout="vllm_flash", allow_gather=True)
    assert torch.equal(out, x.index_select(3, torch.tensor(dup, device=device)))
    ident = tuple(range(8))
    assert torch.equal(kv.remap_kv_heads(x, ident, layout="vllm_flash"), x)
    one = _rand((2, 3, 4, 1, 16), torch.float32, device)
    assert torch.equal(kv.remap_kv_heads(one, (0,), layout="vllm_flash"), one)
    empty = torch.empty((2, 0, 4, 8, 16), device=device)
    assert kv.remap_kv_heads(empty, PERM8, layout="vllm_flash").shape == empty.shape
    # A map tensor on the cache's device is accepted as is.
    mt = torch.tensor(PERM8, device=device)
    assert torch.equal(ops.remap_kv_heads(x, mt, 3), x.index_select(3, mt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [300, 2100])  # CUDA: map in device memory; > 2048: staged
def test_remap_many_heads(device, heads):
    x = _rand((3, heads, 4), torch.float32, device)  # 16-byte rows
    m = _perm(heads, heads)
    ref = x.index_select(1, torch.tensor(m, device=device))
    assert torch.equal(kv.remap_kv_heads(x, m, head_axis=1), ref)
    kv.remap_kv_heads(x, m, head_axis=1, inplace=True)
    assert torch.equal(x, ref)


def test_remap_errors_name_values():
    x = torch.zeros(LAYOUT_SHAPES["vllm_flash"])
    with pytest.raises(ValueError, match=r"head_map has 6 entries, expected num_kv_heads=8 "
                       r"\(axis 3 of a vllm_flash cache of shape \(2, 5, 4, 8, 16\)\)"):
        kv.remap_kv_heads(x, (0, 1, 2, 3, 4, 5), layout="vllm_flash")
    with pytest.raises(ValueError, match="head 1 appears at entries 1 and 2"):
        kv.remap_kv_heads(x, (0, 1, 1, 3, 4, 5, 6, 7), layout="vllm_flash")
    with pytest.raises(ValueError, match=r"head_map\[3\] = 8 is out of range"):
        kv.remap_kv_heads(x, (0, 1, 2, 8, 4, 5, 6, 7), layout="vllm_flash")
    with pytest.raises(ValueError, match="must be int64"):
        kv.remap_kv_heads(x, torch.tensor(PERM8, dtype=torch.int32), layout="vllm_flash")
    with pytest.raises(ValueError, match="exactly one of layout="):
        kv.remap_kv_heads(x, PERM8)
    with pytest.raises(ValueError, match="exactly one of layout="):
        kv.remap_kv_heads(x, PERM8, layout="vllm_flash", head_axis=3)
    with pytest.raises(ValueError, match=r"a hf cache has 4 dims"):
        kv.remap_kv_heads(x, PERM8, layout="hf")
    with pytest.raises(ValueError, match="axis 1 of a flashinfer cache .* holds K and V"):
        kv.remap_kv_heads(x.transpose(0, 2), PERM8, layout="flashinfer")
    with pytest.raises(ValueError, match="unknown layout 'vllm'"):
        kv.remap_kv_heads(x, PERM8, layout="vllm")
    with pytest.raises(ValueError, match=r"head_axis=5 is out of range"):
        kv.remap_kv_heads(x, PERM8, head_axis=5)
    with pytest.raises(ValueError, match="needs the out-of-place op"):
        kv.remap_kv_heads(x, PERM8, head_axis=3, inplace=True, allow_gather=True)


def test_remap_op_checks_in_cpp():
    """The dispatcher op validates on its own (callers may bypass hotweights.kv)."""
    x = torch.zeros(LAYOUT_SHAPES["vllm_flash"])
    m = torch.tensor(PERM8)
    with pytest.raises(RuntimeError, match="head_map must be int64"):
        torch.ops.hotweights.remap_kv_heads(x, m.int(), 3)
    with pytest.raises(RuntimeError, match=r"head_map has 7 entries, expected num_kv_heads=8"):
        torch.ops.hotweights.remap_kv_heads(x, m[:7], 3)
    with pytest.raises(RuntimeError, match=r"head_map must be 1-D"):
        torch.ops.hotweights.remap_kv_heads(x, m.view(2, 4), 3)
    with pytest.raises(RuntimeError, match=r"head_map\[0\] = -1 is out of range"):
        torch.ops.hotweights.remap_kv_heads(x, torch.tensor([-1, 1, 2, 3, 4, 5, 6, 7]), 3)
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.hotweights.remap_kv_heads_(x, torch.tensor([0, 0, 2, 3, 4, 5, 6, 7]), 3)
    with pytest.raises(RuntimeError, match=r"head_axis=7 is out of range"):
        torch.ops.hotweights.remap_kv_heads(x, m, 7)
    with pytest.raises(RuntimeError, match="overlapping memory"):
        torch.ops.hotweights.remap_kv_heads_(torch.zeros(2, 1, 4).expand(2, 8, 4), m, 1)


# --------------------------------------------------------------------------- head maps


def test_kv_head_of_orders():
    assert kv.kv_head_of(8, 2, "grouped") == (0, 0, 0, 0, 1, 1, 1, 1)
    assert kv.kv_head_of(8, 2, "interleaved") == (0, 1, 0, 1, 0, 1, 0, 1)
    s = kv.query_head_map(8, 2, "grouped", "interleaved")
    assert s == (0, 4, 1, 5, 2, 6, 3, 7)
    # With the query heads re-ordered by s, every query head keeps its KV head.
    g, i = kv.kv_head_of(8, 2, "grouped"), kv.kv_head_of(8, 2, "interleaved")
    assert all(i[h] == g[s[h]] for h in range(8))
    assert kv.query_head_map(8, 2, "interleaved", "grouped") == kv.invert_head_map(s)


def test_derive_head_map_conversions():
    assert kv.derive_head_map(32, 8, "grouped") == tuple(range(8))
    assert kv.derive_head_map(32, 8, "grouped", "interleaved", query_map="canonical") == tuple(range(8))
    # Only MHA (G = 1) and MQA (KvH = 1) convert with the query heads in place.
    assert kv.derive_head_map(8, 8, "grouped", "interleaved") == tuple(range(8))
    assert kv.derive_head_map(8, 1, "interleaved", "grouped") == (0,)
    with pytest.raises(kv.KVMapError, match=r"no KV-head permutation .* query heads 0 and 8 "
                       r"share new KV head 0 but read old KV heads 0 and 2.*query_head_map"):
        kv.derive_head_map(32, 8, "grouped", "interleaved")
    with pytest.raises(kv.KVMapError, match="splits the query groups|share new KV head"):
        kv.derive_head_map(8, 2, "grouped", query_map=(0, 4, 1, 5, 2, 6, 3, 7))
    with pytest.raises(kv.KVMapError, match="not a multiple of num_kv_heads=3"):
        kv.derive_head_map(8, 3)
    with pytest.raises(kv.KVMapError, match="order='blocked'"):
        kv.derive_head_map(8, 2, "blocked")


def test_derive_head_map_default_order_from_env(monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_KV_HEAD_ORDER", "interleaved")
    config.reset()
    s = kv.query_head_map(8, 2, "interleaved", "grouped")
    assert kv.derive_head_map(8, 2, to="grouped", query_map=s) == (0, 1)
    with pytest.raises(kv.KVMapError, match="cache of a model in interleaved order"):
        kv.derive_head_map(8, 2, to="grouped")


@pytest.mark.parametrize("bad, match", [
    ((0, 1, 2), "has 3 entries, expected num_kv_heads=4"),
    ((0, 1, 1, 3), r"not a permutation of 0..3: head 1 appears at entries 1 and 2, head\(s\) \[2\]"),
    ((0, 1, 2, 4), r"\[3\] = 4 is out of range"),
    ((0, 1, 2, -1), r"\[3\] = -1 is out of range"),
    ((0, 1, 2, 3.0), r"\[3\] = 3.0 is not an int"),
    (torch.tensor([0, 1, 2, 3], dtype=torch.int32), "must be int64"),
    (torch.tensor([[0, 1], [2, 3]]), "must be 1-D"),
    ("0123", "must be a sequence of ints"),
])
def test_validate_head_map_errors(bad, match):
    with pytest.raises(kv.KVMapError, match=match):
        kv.validate_head_map(bad, 4)


def test_invert_head_map_round_trip():
    m = _perm(16, 3)
    inv = kv.invert_head_map(m)
    assert tuple(m[i] for i in inv) == tuple(range(16))
    x = _rand((2, 16, 5, 8), torch.float32, "cpu")
    assert torch.equal(kv.remap_kv_heads(kv.remap_kv_heads(x, m, layout="hf"), inv, layout="hf"), x)


def test_head_map_from_config(monkeypatch, tmp_path):
    assert kv.head_map_from_config(4) is None
    monkeypatch.setenv("HOTWEIGHTS_KV_HEAD_MAP", "[1, 0, 3, 2]")
    config.reset()
    assert kv.head_map_from_config(4) == (1, 0, 3, 2)
    with pytest.raises(kv.KVMapError, match="HOTWEIGHTS_KV_HEAD_MAP has 4 entries, expected num_kv_heads=8"):
        kv.head_map_from_config(8)
    monkeypatch.delenv("HOTWEIGHTS_KV_HEAD_MAP")
    f = tmp_path / "map.json"
    f.write_text("[2, 0, 1]")
    monkeypatch.setenv("HOTWEIGHTS_KV_HEAD_MAP_FILE", str(f))
    config.reset()
    assert kv.head_map_from_config(3) == (2, 0, 1)
    f.write_text("[2, 0,")
    with pytest.raises(kv.KVMapError, match="HOTWEIGHTS_KV_HEAD_MAP_FILE=.*not JSON"):
        kv.head_map_from_config(3)
    f.write_text("[0, 0, 1]")
    with pytest.raises(kv.KVMapError, match="HOTWEIGHTS_KV_HEAD_MAP_FILE=.*not a permutation"):
        kv.head_map_from_config(3)


def test_tp_maps_and_reshard():
    assert kv.tp_kv_heads(8, 2, 1) == (4, 5, 6, 7)
    assert kv.tp_kv_heads(8, 8, 5) == (5,)
    assert [kv.tp_kv_heads(2, 8, r) for r in range(8)] == [(0,)] * 4 + [(1,)] * 4
    with pytest.raises(kv.KVMapError, match="num_kv_heads=8 and tp_size=3"):
        kv.tp_kv_heads(8, 3, 0)
    with pytest.raises(kv.KVMapError, match="rank=2 is out of range for tp_size=2"):
        kv.tp_kv_heads(8, 2, 2)
    full = _rand(LAYOUT_SHAPES["vllm_flash"], torch.float32, "cpu")
    tp2 = [full.narrow(3, 4 * r, 4) for r in range(2)]
    tp4 = kv.reshard_kv_heads(tp2, 8, 4, layout="vllm_flash")
    assert [t.shape[3] for t in tp4] == [2, 2, 2, 2]
    tp16 = kv.reshard_kv_heads(tp4, 8, 16, layout="vllm_flash")  # replicated: 2 ranks per head
    assert all(torch.equal(t, full.narrow(3, r // 2, 1)) for r, t in enumerate(tp16))
    (back,) = kv.reshard_kv_heads(tp16, 8, 1, layout="vllm_flash")
    assert torch.equal(back, full)
    with pytest.raises(ValueError, match="shard 0 has 4 KV heads on axis 3, expected 2"):
        kv.reshard_kv_heads(tp2 * 2, 8, 2, layout="vllm_flash")


# --------------------------------------------------------------------------- attention block


def _repeat_kv(x, n_rep):
    """transformers' repeat_kv: (b, KvH, s, D) -> (b, KvH * n_rep, s, D), grouped."""
    b, kvh, s, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


def _attention(x, w, H, K, D, order, cache=None):
    """A GQA attention block with an HF-layout cache (b, KvH, s, D); returns output and cache."""
    b, s, _ = x.shape
    q = (x @ w["q"].T).view(b, s, H, D).transpose(1, 2)
    k = (x @ w["k"].T).view(b, s, K, D).transpose(1, 2)
    v = (x @ w["v"].T).view(b, s, K, D).transpose(1, 2)
    if cache is not None:  # decode against cached keys/values
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
    G = H // K
    if order == "grouped":
        kk, vv = _repeat_kv(k, G), _repeat_kv(v, G)
    else:  # query head h reads KV head h % K
        kk, vv = k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1)
    t = k.shape[2]
    scores = q @ kk.transpose(-1, -2) / math.sqrt(D)
    mask = torch.ones(s, t, dtype=torch.bool).tril(t - s)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    return out.transpose(1, 2).reshape(b, s, H * D) @ w["o"].T, (k, v)


def _permuted_weights(w, H, K, D, s, m):
    """New weights whose query head h is old head s[h] and KV head j is old KV head m[j]."""
    hid = w["q"].shape[1]
    return {
        "q": w["q"].view(H, D, hid)[list(s)].reshape(H * D, hid),
        "k": w["k"].view(K, D, hid)[list(m)].reshape(K * D, hid),
        "v": w["v"].view(K, D, hid)[list(m)].reshape(K * D, hid),
        "o": w["o"].view(hid, H, D)[:, list(s)].reshape(hid, H * D),
    }


@pytest.mark.parametrize("to", ["grouped", "interleaved"])
def test_remapped_cache_equals_recomputed_cache(to):
    H, K, D, hid = 8, 4, 16, 32
    G = H // K
    g = torch.Generator().manual_seed(1)
    w = {n: torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(hid)
         for n, shape in (("q", (H * D, hid)), ("k", (K * D, hid)), ("v", (K * D, hid)),
                          ("o", (hid, H * D)))}
    x = torch.randn(2, 6, hid, generator=g, dtype=torch.float64)
    x_new = torch.randn(2, 1, hid, generator=g, dtype=torch.float64)
    pi = (2, 0, 3, 1)  # the new checkpoint stores old KV head pi[j] as KV head j
    # Each new query head keeps its old partner: new head h in KV group a_to(h) with rank r is
    # old head (pi[a_to(h)], rank r) of the grouped model.
    a_to = kv.kv_head_of(H, K, to)
    rank = [h % G if to == "grouped" else h // K for h in range(H)]
    s = tuple(pi[a_to[h]] * G + rank[h] for h in range(H))
    w_new = _permuted_weights(w, H, K, D, s, pi)

    m = kv.derive_head_map(H, K, "grouped", to, query_map=s)
    assert m == pi
    assert kv.find_head_permutation(w["k"], w_new["k"], K, (w["v"], w_new["v"])) == pi

    out_old, (k_old, v_old) = _attention(x, w, H, K, D, "grouped")
    out_new, (k_new, v_new) = _attention(x, w_new, H, K, D, to)
    k_remap = kv.remap_kv_heads(k_old, m, layout="hf")
    v_remap = kv.remap_kv_heads(v_old, m, layout="hf")
    # (equal up to BLAS summation order: the permuted rows may take another kernel path)
    assert_close(k_remap, k_new, rtol=1e-12, atol=1e-12)
    assert_close(v_remap, v_new, rtol=1e-12, atol=1e-12)
    assert_close(out_new, out_old)
    # Decoding a new token against the remapped cache matches the old model with its cache.
    dec_old, _ = _attention(x_new, w, H, K, D, "grouped", cache=(k_old, v_old))
    dec_new, _ = _attention(x_new, w_new, H, K, D, to, cache=(k_remap, v_remap))
    assert_close(dec_new, dec_old)
    # Reusing the cache without the remap would be wrong.
    dec_bad, _ = _attention(x_new, w_new, H, K, D, to, cache=(k_old, v_old))
    assert not torch.allclose(dec_bad, dec_old)


def test_find_head_permutation_rejects_non_permutations():
    w = torch.randn(4 * 8, 16)
    assert kv.find_head_permutation(w, w, 4) == (0, 1, 2, 3)
    w2 = w.clone()
    w2[0, 0] += 1
    assert kv.find_head_permutation(w, w2, 4) is None
    with pytest.raises(ValueError, match="multiple of num_kv_heads=5"):
        kv.find_head_permutation(w, w, 5)


# --------------------------------------------------------------------------- RoPE


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _apply_rope(k, positions, rope: kv.RopeConfig, style):
    """A fresh RoPE the way transformers computes it (fp32 cos/sin times the attention factor)."""
    rd = rope.rotary_dim
    freqs = positions.float()[..., None] * rope.inv_freq()  # (..., rd/2)
    if style == "neox":
        emb = torch.cat((freqs, freqs), dim=-1)
        rot = _rotate_half
    else:
        emb = freqs.repeat_interleave(2, dim=-1)
        rot = _rotate_every_two
    af = rope.attention_scaling()
    cos, sin = emb.cos() * af, emb.sin() * af
    kr, kp = k[..., :rd].float(), k[..., rd:]
    out = kr * cos + rot(kr) * sin
    return torch.cat((out.to(k.dtype), kp), dim=-1)


ROPES = {
    "default": kv.RopeConfig(theta=500000.0, rotary_dim=64),
    "linear": kv.RopeConfig(theta=10000.0, rotary_dim=64, scaling="linear", factor=4.0),
    "ntk": kv.RopeConfig(theta=10000.0, rotary_dim=64, scaling="ntk", factor=4.0),
    "dynamic": kv.RopeConfig(theta=10000.0, rotary_dim=64, scaling="dynamic", factor=2.0,
                             original_max_position_embeddings=2048, seq_len=6000),
    "llama3": kv.RopeConfig(theta=500000.0, rotary_dim=64, scaling="llama3", factor=8.0,
                            original_max_position_embeddings=8192),
    "yarn": kv.RopeConfig(theta=10000.0, rotary_dim=64, scaling="yarn", factor=4.0,
                          original_max_position_embeddings=4096),
}
BASE_ROPE = kv.RopeConfig(theta=10000.0, rotary_dim=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("target", list(ROPES))
@pytest.mark.parametrize("head_dim", [64, 96])  # 96: partial rotary dim (64 of 96)
def test_rerotate_equals_fresh_rope(device, style, target, head_dim):
    g = torch.Generator().manual_seed(2)
    k_pre = torch.randn(2, 4, 33, head_dim, generator=g)  # hf layout, pre-RoPE keys
    pos = torch.randint(0, 32768, (2, 1, 33), generator=g)
    old, new = BASE_ROPE, ROPES[target]
    cached = _apply_rope(k_pre, pos, old, style)
    fresh = _apply_rope(k_pre, pos, new, style)
    out = kv.rerotate_rope(cached.to(device), pos.to(device), old, new, style)
    assert out.device.type == torch.device(device).type
    assert_close(out.cpu(), fresh, rtol=1e-5, atol=2e-5)
    if head_dim > 64:  # the pass-through dims are untouched, bit for bit
        assert torch.equal(out.cpu()[..., 64:], cached[..., 64:])
    # And back.
    back = kv.rerotate_rope(out, pos.to(device), new, old, style)
    assert_close(back.cpu(), cached, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rerotate_half_precision_and_axis(device, dtype):
    g = torch.Generator().manual_seed(3)
    k_pre = torch.randn(3, 17, 2, 64, generator=g)
    pos = torch.arange(3 * 17).view(3, 17, 1)
    old, new = BASE_ROPE, ROPES["llama3"]
    cached = _apply_rope(k_pre, pos, old, "neox").to(dtype)
    fresh = _apply_rope(k_pre, pos, new, "neox")
    # head_dim on axis 1: positions broadcast to k's shape without that axis, (3, 17, 2).
    out = kv.rerotate_rope(cached.movedim(-1, 1).to(device), pos.to(device), old, new, "neox",
                           head_dim_axis=1)
    assert out.dtype == dtype
    assert_close(out.movedim(1, -1).float().cpu(), fresh, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["vllm_flash", "flashinfer", "hf"])
def test_rerotate_cache_layouts(layout):
    g = torch.Generator().manual_seed(4)
    old, new = BASE_ROPE, ROPES["yarn"]
    if layout == "hf":
        k_pre = torch.randn(2, 4, 9, 64, generator=g)
        pos = torch.arange(9)
        cached = _apply_rope(k_pre, pos, old, "gptj")
        out = kv.rerotate_cache(cached, pos, old, new, "hf", "gptj")
        assert_close(out, _apply_rope(k_pre, pos, new, "gptj"), rtol=1e-5, atol=2e-5)
        return
    nb, bs, kvh, d = 3, 4, 2, 64
    k_pre = torch.randn(nb, bs, kvh, d, generator=g)
    v = torch.randn(nb, bs, kvh, d, generator=g)
    pos = torch.randperm(nb * bs, generator=g).view(nb, bs)  # slot -> absolute position
    k_old = _apply_rope(k_pre, pos[..., None], old, "neox")
    k_new = _apply_rope(k_pre, pos[..., None], new, "neox")
    axis = kv.LAYOUTS[layout].kv_axis
    cache = torch.stack((k_old, v), dim=axis)
    out = kv.rerotate_cache(cache, pos, old, new, layout)
    assert_close(out.select(axis, 0), k_new, rtol=1e-5, atol=2e-5)
    assert torch.equal(out.select(axis, 1), v)
    # FP8 cache with per-head k_scale: dequantize, rotate in fp32, quantize once.
    ks = torch.tensor([0.05, 0.08])
    q_old = (k_old / ks.view(1, 1, 2, 1)).to(torch.float8_e4m3fn)
    q_cache = torch.stack((q_old, (v / 0.05).to(torch.float8_e4m3fn)), dim=axis)
    out8 = kv.rerotate_cache(q_cache, pos, old, new, layout, k_scale=ks)
    deq = out8.select(axis, 0).float() * ks.view(1, 1, 2, 1)
    assert_close(deq, k_new, rtol=0.15, atol=0.1)
    with pytest.raises(ValueError, match="needs k_scale"):
        kv.rerotate_cache(q_cache, pos, old, new, layout)


def test_rope_inv_freq_matches_formulas():
    """inv_freq against the formulas of transformers' ROPE_INIT_FUNCTIONS, in float64."""
    d = 64
    i = np.arange(0, d, 2) / d

    def close(rope, ref):
        assert_close(rope.inv_freq().double(), torch.from_numpy(ref), rtol=2e-6, atol=0)

    close(ROPES["default"], 1 / 500000.0 ** i)
    close(ROPES["linear"], 1 / 10000.0 ** i / 4)
    close(ROPES["ntk"], 1 / (10000.0 * 4 ** (d / (d - 2))) ** i)
    close(ROPES["dynamic"], 1 / (10000.0 * (2 * 6000 / 2048 - 1) ** (d / (d - 2))) ** i)
    w = 1 / 500000.0 ** i
    wl = 2 * np.pi / w
    smooth = (8192 / wl - 1) / (4 - 1)
    ref = np.where(wl < 8192 / 4, w, np.where(wl > 8192, w / 8, (1 - smooth) * w / 8 + smooth * w))
    close(ROPES["llama3"], ref)
    lo = math.floor(d * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(10000)))
    hi = math.ceil(d * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(10000)))
    ramp = np.clip((np.arange(d // 2) - lo) / (hi - lo), 0, 1)
    base = 1 / 10000.0 ** i
    close(ROPES["yarn"], base / 4 * ramp + base * (1 - ramp))
    assert ROPES["yarn"].attention_scaling() == pytest.approx(0.1 * math.log(4) + 1)
    ds = kv.RopeConfig(scaling="yarn", factor=40, mscale=1.0, mscale_all_dim=1.0,
                       original_max_position_embeddings=4096)
    assert ds.attention_scaling() == pytest.approx(1.0)
    assert BASE_ROPE.attention_scaling() == 1.0


def test_rope_from_hf_config():
    cfg = {"rope_theta": 500000.0, "hidden_size": 4096, "num_attention_heads": 32,
           "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    r = kv.RopeConfig.from_hf(cfg)
    assert (r.theta, r.rotary_dim, r.scaling, r.factor) == (500000.0, 128, "llama3", 8.0)
    p = kv.RopeConfig.from_hf({"rope_theta": 10000, "head_dim": 80, "partial_rotary_factor": 0.5,
                               "max_position_embeddings": 4096,
                               "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert (p.rotary_dim, p.scaling, p.original_max_position_embeddings) == (40, "dynamic", 4096)


def test_rerotate_errors():
    k = torch.zeros(2, 3, 64)
    pos = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="style='llama'"):
        kv.rerotate_rope(k, pos, BASE_ROPE, BASE_ROPE, "llama")
    with pytest.raises(ValueError, match="rotary_dim changes from 64 to 32"):
        kv.rerotate_rope(k, pos, BASE_ROPE, kv.RopeConfig(rotary_dim=32), "neox")
    with pytest.raises(ValueError, match="rotary_dim=128 exceeds head_dim=64"):
        kv.rerotate_rope(k, pos, kv.RopeConfig(), kv.RopeConfig(theta=1e6), "neox")
    with pytest.raises(RuntimeError, match="does not broadcast"):
        kv.rerotate_rope(k, torch.zeros(4, dtype=torch.long), BASE_ROPE, BASE_ROPE)
    with pytest.raises(TypeError, match="positions must be int64 or int32"):
        kv.rerotate_rope(k, pos.float(), BASE_ROPE, BASE_ROPE)
    with pytest.raises(RuntimeError, match="k must be float32, float16 or bfloat16"):
        kv.rerotate_rope(k.to(torch.float8_e4m3fn), pos, BASE_ROPE, BASE_ROPE)
    w = BASE_ROPE.inv_freq()
    with pytest.raises(RuntimeError, match="old_inv_freq must be float32"):
        ops.rerotate_rope(k, pos, w.double(), w)
    with pytest.raises(RuntimeError, match="old_inv_freq has 32 entries but new_inv_freq has 16"):
        ops.rerotate_rope(k, pos, w, w[:16])
    with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
        kv.RopeConfig(scaling="llama3")
    with pytest.raises(ValueError, match="scaling='longrope'"):
        kv.RopeConfig(scaling="longrope")


# --------------------------------------------------------------------------- FP8


def _fp8_step(x: torch.Tensor, dtype) -> torch.Tensor:
    """The gap between the FP8 values around |x| (one step), at least the subnormal step."""
    fi = torch.finfo(dtype)
    mant = 3 if dtype == torch.float8_e4m3fn else 2
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.smallest_normal)))
    return torch.pow(2.0, e - mant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("per_head", [False, True])
def test_requantize_within_one_step(device, dtype, per_head):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 4, 8, 16, generator=g) * 2
    s_old = torch.rand(8, generator=g) * 0.5 + 0.01 if per_head else torch.tensor(0.02)
    s_new = torch.rand(8, generator=g) * 0.5 + 0.01 if per_head else torch.tensor(0.05)
    bshape = (1, 1, 1, 8, 1) if per_head else ()
    fmax = torch.finfo(dtype).max
    q = (x / s_old.reshape(bshape)).clamp(-fmax, fmax).to(dtype)
    out = kv.requantize_fp8(q.to(device), s_old, s_new, layout="vllm_flash").cpu()
    assert out.dtype == dtype
    exact = (q.double() * s_old.double().reshape(bshape) / s_new.double().reshape(bshape))
    sat = exact.clamp(-fmax, fmax)
    err = (out.double() - sat).abs()
    assert bool((err <= _fp8_step(sat, dtype) + 1e-12).all()), float((err / _fp8_step(sat, dtype)).max())
    # Same bits as the plain-torch reference (fp32 math, saturate, round to nearest even).
    ref = ((q.float() * s_old.reshape(bshape)) / s_new.reshape(bshape)).clamp(-fmax, fmax).to(dtype)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_requantize_saturates_and_follows_strides(device):
    q = torch.tensor([448.0, -448.0, 1.0, float("nan")]).to(torch.float8_e4m3fn)
    out = kv.requantize_fp8(q.to(device), 1.0, 0.25).cpu().float()
    assert out[:3].tolist() == [448.0, -448.0, 4.0] and math.isnan(out[3])
    # NaNs keep their sign bit, as torch's own conversion does (CPU and CUDA alike)
    for dtype, nans in ((torch.float8_e4m3fn, [0x7F, 0xFF]),
                        (torch.float8_e5m2, [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF])):
        qn = torch.tensor(nans, dtype=torch.uint8).view(dtype)
        got = kv.requantize_fp8(qn.to(device), 1.0, 2.0).cpu().view(torch.uint8)
        ref = (qn.float() / 2.0).to(dtype).view(torch.uint8)
        assert got.tolist() == ref.tolist() == [0x7F | (b & 0x80) for b in nans]
    # HND physical order with per-head scales along logical axis 3.
    phys = _rand((2, 3, 8, 4, 16), torch.float32, "cpu").to(torch.float8_e4m3fn)
    x = phys.permute(0, 1, 3, 2, 4)
    s_old, s_new = torch.linspace(0.5, 2.0, 8), torch.linspace(2.0, 0.5, 8)
    out = kv.requantize_fp8(x.to(device), s_old, s_new, layout="vllm_flash")
    ref = (x.float() * s_old.view(1, 1, 1, 8, 1) / s_new.view(1, 1, 1, 8, 1)).clamp(-448, 448)
    assert torch.equal(out.cpu().view(torch.uint8), ref.to(torch.float8_e4m3fn).view(torch.uint8))
    assert out.stride() == x.stride()


def test_requantize_errors():
    q = torch.zeros(2, 5, 4, 8, 16, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="q must be float8_e4m3fn or float8_e5m2, got torch.bfloat16"):
        kv.requantize_fp8(q.bfloat16(), 1.0, 1.0)
    with pytest.raises(ValueError, match="per-head scales need layout= or head_axis="):
        kv.requantize_fp8(q, torch.ones(8), 1.0)
    with pytest.raises(ValueError, match=r"s_new\[0\] = 0.0; expected a finite scale > 0"):
        kv.requantize_fp8(q, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"s_old has shape \[6\], expected a per-tensor scale .* "
                       r"num_kv_heads=8"):
        kv.requantize_fp8(q, torch.ones(6), 1.0, layout="vllm_flash")
    with pytest.raises(RuntimeError, match=r"s_new\[2\] = -1"):
        ops.requantize_fp8(q, torch.ones(8), torch.tensor([1.0, 1, -1, 1, 1, 1, 1, 1]), 3)
    with pytest.raises(RuntimeError, match="head_axis=-9 is out of range"):
        ops.requantize_fp8(q, torch.tensor(1.0), torch.tensor(1.0), -9)


def test_convert_kv_dtype():
    x = _rand((2, 4, 5, 16), torch.bfloat16, "cpu")  # |x| < 15: no saturation below
    s = torch.tensor([0.05, 0.06, 0.07, 0.08])
    q = kv.convert_kv_dtype(x, torch.float8_e4m3fn, new_scale=s, layout="hf")
    back = kv.convert_kv_dtype(q, torch.float32, scale=s, layout="hf")
    assert_close(back, x.float(), rtol=0.07, atol=0.01)
    q5 = kv.convert_kv_dtype(q, torch.float8_e5m2, scale=s, new_scale=s, layout="hf")
    assert q5.dtype == torch.float8_e5m2
    same = kv.convert_kv_dtype(q, torch.float8_e4m3fn, scale=s, new_scale=s, layout="hf")
    assert torch.equal(same.view(torch.uint8), q.view(torch.uint8))
    assert kv.convert_kv_dtype(x, torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="pass new_scale="):
        kv.convert_kv_dtype(x, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="pass scale="):
        kv.convert_kv_dtype(q, torch.float32)
    with pytest.raises(ValueError, match="exactly one of layout="):
        kv.convert_kv_dtype(x, torch.float8_e4m3fn, new_scale=s)


def test_convert_layout():
    x = _rand(LAYOUT_SHAPES["vllm_flash"], torch.float32, "cpu")
    y = kv.convert_layout(x, "vllm_flash", "flashinfer")
    assert torch.equal(y[:, 0], x[0]) and torch.equal(kv.convert_layout(y, "flashinfer", "vllm_flash"), x)
    with pytest.raises(ValueError, match="needs the block tables"):
        kv.convert_layout(x, "vllm_flash", "hf")


# --------------------------------------------------------------------------- opcheck, compile


def _opcheck_cases(device):
    x = _rand(LAYOUT_SHAPES["vllm_flash"], torch.bfloat16, device)
    m = torch.tensor(PERM8, device=device)
    k = _rand((2, 3, 4, 64), torch.float32, device)
    pos = torch.arange(3, device=device).view(1, 3, 1)
    w0, w1 = BASE_ROPE.inv_freq(device), ROPES["llama3"].inv_freq(device)
    q = _rand((2, 3, 4, 8, 16), torch.float32, device).to(torch.float8_e4m3fn)
    s = torch.linspace(0.5, 1.5, 8, device=device)
    return [
        (torch.ops.hotweights.remap_kv_heads.default, (x, m, 3)),
        (torch.ops.hotweights.remap_kv_heads.default, (x.permute(0, 1, 3, 2, 4), m, 2)),
        (torch.ops.hotweights.remap_kv_heads_.default, (x.clone(), m, 3)),
        (torch.ops.hotweights.rerotate_rope.default, (k, pos, w0, w1, 1.25, True)),
        (torch.ops.hotweights.rerotate_rope.default, (k.bfloat16(), pos, w0, w1, 1.0, False)),
        (torch.ops.hotweights.requantize_fp8.default, (q, s, torch.tensor(0.7, device=device), 3)),
    ]


# opcheck's test_schema compares inputs with arithmetic that has no FP8 kernels ("mul_cpu_
# reduced_float" not implemented for 'Float8_e4m3fn'): FP8 cases run the other checks.
_FP8_OPCHECK = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        fp8 = any(isinstance(a, torch.Tensor) and a.dtype in ops._FP8_DTYPES for a in args)
        if fp8:
            torch.library.opcheck(op, args, test_utils=_FP8_OPCHECK)
        else:
            torch.library.opcheck(op, args)


def test_compile_fullgraph_remap():
    import shutil

    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("torch.compile (inductor, CPU) needs a C++ compiler and none is on PATH")
    m = torch.tensor(PERM8)

    def f(x):
        return ops.remap_kv_heads(x * 2, m, 3) + 1

    x = _rand(LAYOUT_SHAPES["vllm_flash"], torch.float32, "cpu")
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    assert_close(compiled(x), f(x))


# --------------------------------------------------------------------------- plan


def _manifest(num_layers=16, **changes):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  *(p + f"self_attn.{x}_proj.weight" for x in "qkvo"),
                  p + "self_attn.k_norm.weight", p + "self_attn.q_norm.weight",
                  *(p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down"))]
    return {n: hash(n) & 0xFFFF for n in names}


def _changed(base, *names):
    new = dict(base)
    for n in names:
        new[n] = base.get(n, 0) + 1
    return new


def test_plan_core_cases():
    old = _manifest(16)
    p = kv.plan(old, _changed(old, "lm_head.weight", "model.norm.weight"), 16)
    assert p.keep == list(range(16)) and not p.invalidate and p.ignored == ("lm_head.weight", "model.norm.weight")
    p = kv.plan(old, _changed(old, "model.layers.10.mlp.up_proj.weight"), 16)
    assert p.keep == list(range(11)) and p.invalidate == list(range(11, 16))
    assert p.first_stale_layer == 11 and "layers.10.mlp.up_proj" in p.actions[11].reasons[0]
    p = kv.plan(old, _changed(old, "model.embed_tokens.weight"), 16)
    assert p.invalidate == list(range(16))
    p = kv.plan(old, _changed(old, "model.layers.3.self_attn.k_proj.weight"), 16)
    assert p.keep == [0, 1, 2] and p.invalidate == list(range(3, 16))
    for name in ("model.layers.3.input_layernorm.weight", "model.layers.3.self_attn.k_norm.weight",
                 "model.layers.3.self_attn.v_proj.weight"):
        assert kv.plan(old, _changed(old, name), 16).first_stale_layer == 3, name
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight",
                 "model.layers.3.post_attention_layernorm.weight", "model.layers.3.self_attn.q_norm.weight"):
        assert kv.plan(old, _changed(old, name), 16).first_stale_layer == 4, name
    p = kv.plan(old, _changed(old, "vision_tower.patch_embed.weight"), 16)
    assert p.invalidate == list(range(16)) and p.unrecognized == ("vision_tower.patch_embed.weight",)
    assert "no name rule recognises it" in p.actions[0].reasons[0]
    # Added and removed tensors count as changed.
    new = dict(old)
    del new["model.layers.7.mlp.down_proj.weight"]
    assert kv.plan(old, new, 16).first_stale_layer == 8
    # Nothing changed: all keep.
    assert kv.plan(old, dict(old), 16).keep == list(range(16))


def test_plan_manifest_objects_and_json():
    class Manifest:
        def __init__(self, d):
            self.d = d

        def checksums(self):
            return self.d

    old = _manifest(4)
    p = kv.plan(Manifest(old), Manifest(_changed(old, "model.layers.1.mlp.gate_proj.weight")), 4)
    d = json.loads(p.to_json())
    assert d["keep"] == [0, 1] and d["invalidate"] == [2, 3] and d["first_stale_layer"] == 2
    assert kv.KVPlan.from_dict(d) == p
    assert "keep 0-1" in p.summary() and "invalidate 2-3" in p.summary()
    with pytest.raises(TypeError, match="checksums"):
        kv.plan([1, 2], old, 4)
    with pytest.raises(ValueError, match=r"names layer 9, but num_layers=4"):
        kv.plan(old, _changed(old, "model.layers.9.mlp.up_proj.weight"), 4)


def test_plan_custom_name_rules():
    old = {"transformer.wte.weight": 1, "transformer.h.0.attn.c_attn.weight": 1,
           "transformer.h.1.mlp.c_fc.weight": 1, "transformer.h.2.attn.c_attn.weight": 1}
    rules = [kv.NameRule(r"^transformer\.wte\.", "all"),
             kv.NameRule(r"^transformer\.h\.(?P<layer>\d+)\.attn\.", "from_layer"),
             kv.NameRule(r"^transformer\.h\.(?P<layer>\d+)\.mlp\.", "after_layer")]
    p = kv.plan(old, _changed(old, "transformer.h.1.mlp.c_fc.weight"), 3, rules)
    assert p.keep == [0, 1] and p.invalidate == [2]
    p = kv.plan(old, _changed(old, "transformer.h.1.mlp.c_fc.weight"), 3,
                [(r"^transformer\.h\.(?P<layer>\d+)\.", "from_layer")])
    assert p.keep == [0] and p.invalidate == [1, 2]
    with pytest.raises(ValueError, match="needs a \\(\\?P<layer>"):
        kv.NameRule(r"^x\.(\d+)", "from_layer")
    with pytest.raises(ValueError, match="effect='sometimes'"):
        kv.NameRule(r"^x", "sometimes")


def test_plan_transforms_rope_scales_layout_heads(monkeypatch):
    old = _manifest(4)
    r0, r1 = BASE_ROPE, ROPES["llama3"]
    # RoPE-only change: exact in layer 0 only; the layers above read attention outputs that
    # saw the old rotation.
    p = kv.plan(old, old, 4, old_rope=r0, new_rope=r1, allow_transforms=True)
    assert p.transform == [0] and p.invalidate == [1, 2, 3]
    (t,) = p.transforms()
    assert t["op"] == "rerotate_rope" and t["exact"] and t["new_rope"]["scaling"] == "llama3"
    p = kv.plan(old, old, 4, old_rope=r0, new_rope=r1, allow_transforms=True, approximate=True)
    assert p.transform == [0, 1, 2, 3] and [t["exact"] for t in p.transforms()] == [True, False, False, False]
    # Transforms off (default from HOTWEIGHTS_KV_ALLOW_TRANSFORMS): invalidate, with the reason.
    p = kv.plan(old, old, 4, old_rope=r0, new_rope=r1)
    assert p.invalidate == [0, 1, 2, 3] and "HOTWEIGHTS_KV_ALLOW_TRANSFORMS" in p.actions[0].reasons[0]
    monkeypatch.setenv("HOTWEIGHTS_KV_ALLOW_TRANSFORMS", "1")
    config.reset()
    assert kv.plan(old, old, 4, old_rope=r0, new_rope=r1).transform == [0]
    # FP8 scale of layer 1: requantize layer 1, layers above stale, below kept.
    sc = dict(old, **{"model.layers.1.self_attn.k_scale": 1})
    p = kv.plan(sc, _changed(sc, "model.layers.1.self_attn.k_scale"), 4)
    assert p.keep == [0] and p.transform == [1] and p.invalidate == [2, 3]
    assert p.transforms()[0]["op"] == "requantize_fp8" and not p.transforms()[0]["exact"]
    # A weight change above wins over an approximate transform.
    p = kv.plan(sc, _changed(sc, "model.layers.1.self_attn.k_scale",
                             "model.layers.1.mlp.up_proj.weight"), 4, approximate=True)
    assert p.transform == [1] and p.invalidate == [2, 3]
    # Layout change: exact data movement everywhere.
    p = kv.plan(old, old, 4, old_layout="vllm_flash", new_layout="flashinfer")
    assert p.transform == [0, 1, 2, 3] and all(t["exact"] for t in p.transforms())
    # A declared KV-head permutation of layer 2's attention: remap layer 2, keep the rest.
    names = [f"model.layers.2.self_attn.{x}_proj.weight" for x in "qkvo"]
    p = kv.plan(old, _changed(old, *names), 4, head_maps={2: (1, 0, 3, 2)})
    assert p.keep == [0, 1, 3] and p.transform == [2]
    assert p.transforms()[0]["head_map"] == [1, 0, 3, 2]
    with pytest.raises(ValueError, match="none of its q/k/v/o projections changed"):
        kv.plan(old, old, 4, head_maps={2: (1, 0, 3, 2)})
    with pytest.raises(ValueError, match="pass both old_rope and new_rope"):
        kv.plan(old, old, 4, old_rope=r0)


def test_plan_judges_what_changes_not_how_it_is_spelled():
    """Equal things spelled differently keep the cache; changes the ops cannot undo invalidate
    it (session 9 review)."""
    old = _manifest(4)
    # one dtype, two spellings (and vLLM's name for FP8)
    p = kv.plan(old, old, 4, old_kv_dtype=torch.bfloat16, new_kv_dtype="bfloat16",
                allow_transforms=True)
    assert p.keep == [0, 1, 2, 3]
    p = kv.plan(old, old, 4, old_kv_dtype="fp8", new_kv_dtype=torch.float8_e4m3fn)
    assert p.keep == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"new_kv_dtype='banana': expected a torch dtype"):
        kv.plan(old, old, 4, old_kv_dtype=torch.bfloat16, new_kv_dtype="banana")
    # vLLM's default on both sides is no change; against a dtype it cannot be judged
    assert kv.plan(old, old, 4, old_kv_dtype="auto", new_kv_dtype="auto").keep == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"old_kv_dtype='auto' \(vLLM's kv_cache_dtype default\)"):
        kv.plan(old, old, 4, old_kv_dtype="auto", new_kv_dtype="fp8")
    # one rotation, two spellings: None and "default", an unused factor
    a = kv.RopeConfig(theta=10000.0, rotary_dim=64)
    for b in (kv.RopeConfig(theta=10000.0, rotary_dim=64, scaling="default"),
              kv.RopeConfig(theta=10000.0, rotary_dim=64, factor=8.0)):
        assert a.same_rotation(b)
        assert kv.plan(old, old, 4, old_rope=a, new_rope=b, allow_transforms=True).keep == [0, 1, 2, 3]
    # a layout change convert_layout cannot make without the block tables
    p = kv.plan(old, old, 4, old_layout="hf", new_layout="vllm_flash", allow_transforms=True)
    assert p.invalidate == [0, 1, 2, 3] and "only vllm_flash <-> flashinfer" in p.actions[0].reasons[0]
    # an identity head map explains no change: a retrained k_proj still invalidates
    new = _changed(old, "model.layers.1.self_attn.k_proj.weight")
    p = kv.plan(old, new, 4, head_maps=[0, 1, 2, 3], allow_transforms=True)
    assert p.keep == [0] and p.invalidate == [1, 2, 3]
    assert p.actions == kv.plan(old, new, 4, allow_transforms=True).actions


def test_rope_and_remap_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match=r"scaling='ntk' with rotary_dim=2: .* expected rotary_dim >= 4"):
        kv.RopeConfig(rotary_dim=2, scaling="ntk", factor=2.0)
    x = torch.randn(1, 4, 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad and the op has no backward"):
        kv.remap_kv_heads(x, [1, 0, 3, 2], head_axis=1)
    with torch.no_grad():  # what a server does
        out = kv.remap_kv_heads(x, [1, 0, 3, 2], head_axis=1)
    assert torch.equal(out, x.detach().index_select(1, torch.tensor([1, 0, 3, 2])))
    with torch.inference_mode():
        inf = torch.randn(1, 4, 3, 8)
    with pytest.raises(RuntimeError, match="inference tensor outside torch.inference_mode"):
        kv.remap_kv_heads(inf, [1, 0, 3, 2], head_axis=1, inplace=True)


# --------------------------------------------------------------------------- CLI


def test_kv_check_cli(capsys):
    assert cli_main(["kv-check", "--heads", "32", "--kv-heads", "8", "--order", "grouped"]) == 0
    out = capsys.readouterr().out
    assert "KV-head map (derived" in out and "[0, 1, 2, 3, 4, 5, 6, 7]" in out
    assert cli_main(["kv-check", "--heads", "32", "--kv-heads", "8", "--order", "grouped",
                     "--to", "interleaved", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kv_head_map"] == list(range(8)) and d["query_map"][:4] == [0, 4, 8, 12]
    rc = cli_main(["kv-check", "--heads", "32", "--kv-heads", "8", "--order", "grouped",
                   "--to", "interleaved", "--query-map", "keep"])
    assert rc == 1 and "no KV-head permutation" in capsys.readouterr().err
    rc = cli_main(["kv-check", "--heads", "8", "--kv-heads", "4", "--map", "[0, 0, 1, 2]"])
    assert rc == 1 and "not a permutation" in capsys.readouterr().err


def test_kv_check_simulate(capsys):
    rc = cli_main(["kv-check", "--heads", "16", "--kv-heads", "4", "--map", "[2, 0, 3, 1]",
                   "--simulate", "--json", "--blocks", "8", "--seq", "32", "--head-dim", "32"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["valid"] and {r["layout"] for r in d["simulation"]} == set(kv.LAYOUTS)
    assert all(r["round_trip"] and r["inplace_round_trip"] and r["gbps"] > 0 for r in d["simulation"])


# --- the plan reaches subscribers through the commit callback ------------------------------


class _Layer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.input_layernorm = torch.nn.LayerNorm(d)
        self.self_attn = torch.nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, n, torch.nn.Linear(d, d, bias=False))
        self.post_attention_layernorm = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Module()
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.mlp, n, torch.nn.Linear(d, d, bias=False))


class _TinyLlama(torch.nn.Module):
    def __init__(self, layers=4, d=8):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(16, d)
        self.model.layers = torch.nn.ModuleList(_Layer(d) for _ in range(layers))
        self.model.norm = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, 16, bias=False)


def test_commit_info_carries_the_kv_plan(monkeypatch):
    import hotweights
    from hotweights.coordinator import start_embedded

    coord = start_embedded()
    torch.manual_seed(0)
    src, dst = _TinyLlama(), _TinyLlama()
    seen = []
    try:
        h = dst.register_hotweights(name="llm", endpoint=coord.endpoint, commit="manual", kv_layers=4)
        h.on_commit(seen.append)
        with hotweights.Publisher(src, name="llm", endpoint=coord.endpoint, serve_late=False) as pub:
            h.wait(pub.publish("v1").version, timeout=30)       # everything: all invalidate
            assert seen[-1].kv_plan.keep == []
            with torch.no_grad():
                src.lm_head.weight.add_(1)
            h.wait(pub.publish("head").version, timeout=30)     # only the LM head: all keep
            assert seen[-1].kv_plan.keep == [0, 1, 2, 3] and seen[-1].changed == ["lm_head.weight"]
            with torch.no_grad():
                src.model.layers[1].mlp.up_proj.weight.add_(1)
            h.wait(pub.publish("mlp1").version, timeout=30)     # layer 1's MLP: layers > 1 stale
            assert seen[-1].kv_plan.keep == [0, 1] and seen[-1].kv_plan.invalidate == [2, 3]
        h.close()
    finally:
        coord.stop()


def test_kv_check_checks_a_given_map_against_the_query_map(capsys):
    base = ["kv-check", "--heads", "8", "--kv-heads", "4", "--order", "grouped"]
    assert cli_main(base + ["--query-map", "[2,3,0,1,4,5,6,7]", "--map", "[1,0,2,3]"]) == 0
    capsys.readouterr()
    assert cli_main(base + ["--query-map", "[2,3,0,1,4,5,6,7]", "--map", "[0,1,2,3]"]) == 1
    assert "they imply KV-head map [1, 0, 2, 3]" in capsys.readouterr().err
    assert cli_main(base + ["--map", "[0,1,"]) == 1
    assert "--map '[0,1,': expected a JSON list permuting the 4 KV heads" in capsys.readouterr().err
    assert cli_main(base + ["--query-map", "[0,1]"]) == 1
    assert "expected num_heads=8" in capsys.readouterr().err
