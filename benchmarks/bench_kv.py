# SPDX-License-Identifier: Apache-2.0
"""KV-cache op bandwidth against plain-torch baselines measured in the same run.

remap_kv_heads on a vLLM-flash cache (2, num_blocks, block_size, KvH, head_dim) and an HF
cache (batch, KvH, seq, head_dim): out of place vs ``index_select``, in place vs
``copy_(index_select(...))``; rerotate_rope vs the same math in torch ops; requantize_fp8 vs
torch ops. GB/s counts bytes read + written once (2x the cache for a remap); "clone GB/s" is
the floor of any out-of-place op (a fresh allocation, first-touched, and one copy).

    python benchmarks/bench_kv.py [--device cuda] [--quick] [--out results.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parser, time_fn  # noqa: E402

from hotweights import kv, ops  # noqa: E402

GB = 1e9


def _row(case, shape, dtype, nbytes, t, base_t, base_name):
    return {"case": case, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
            "GB/s": nbytes / t / GB, "ms": t * 1e3, "baseline": base_name,
            "baseline GB/s": nbytes / base_t / GB, "ratio": base_t / t}


def _torch_rerotate(k, pos, w0, w1, scale):
    """Reference: the same fp32 composition in torch ops (neox pairs)."""
    a0, a1 = pos.float()[..., None] * w0, pos.float()[..., None] * w1
    c0, s0, c1, s1 = a0.cos(), a0.sin(), a1.cos(), a1.sin()
    cd, sd = c1 * c0 + s1 * s0, s1 * c0 - c1 * s0
    h = w0.numel()
    x1, x2 = k[..., :h].float(), k[..., h:2 * h].float()
    out = torch.cat(((x1 * cd - x2 * sd) * scale, (x2 * cd + x1 * sd) * scale), dim=-1)
    return torch.cat((out.to(k.dtype), k[..., 2 * h:]), dim=-1)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=None, help="num_blocks of the vLLM cache")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        ops.require_cuda_build("bench_kv --device cuda")
    blocks = args.blocks or (512 if args.quick else (32768 if cuda else 2048))
    reps = args.reps or (20 if cuda else 5)
    bs, kvh, d = 16, 8, 128
    dtype = torch.bfloat16
    m = tuple((j + 3) % kvh for j in range(kvh))  # one 8-cycle: the in-place worst case
    mt = torch.tensor(m, dtype=torch.long, device=dev)
    rows = []

    shape = (2, blocks, bs, kvh, d)
    cache = torch.randn(shape, device=dev).to(dtype)
    nbytes = 2 * cache.numel() * cache.element_size()
    t = time_fn(lambda: ops.remap_kv_heads(cache, mt, 3), reps=reps, device=args.device)
    tb = time_fn(lambda: cache.index_select(3, mt), reps=reps, device=args.device)
    rows.append(_row("remap vllm_flash", shape, dtype, nbytes, t, tb, "index_select"))
    # The floor of any out-of-place op: allocate (first touch) and copy the cache once.
    rows[-1]["clone GB/s"] = nbytes / time_fn(cache.clone, reps=reps, device=args.device) / GB
    work = cache.clone()
    t = time_fn(lambda: ops.remap_kv_heads_(work, mt, 3), reps=reps, device=args.device)
    tb = time_fn(lambda: work.copy_(work.index_select(3, mt)), reps=reps, device=args.device)
    rows.append(_row("remap_ in place vllm_flash", shape, dtype, nbytes, t, tb,
                     "copy_(index_select)"))
    del work

    hf_shape = (4, kvh, blocks * bs // 4, d)  # the same bytes as one K or V half, HF layout
    hf = torch.randn(hf_shape, device=dev).to(dtype)
    nb = 2 * hf.numel() * hf.element_size()
    t = time_fn(lambda: ops.remap_kv_heads(hf, mt, 1), reps=reps, device=args.device)
    tb = time_fn(lambda: hf.index_select(1, mt), reps=reps, device=args.device)
    rows.append(_row("remap hf", hf_shape, dtype, nb, t, tb, "index_select"))
    rows[-1]["clone GB/s"] = nb / time_fn(hf.clone, reps=reps, device=args.device) / GB
    del hf

    k = cache[0]  # (blocks, bs, KvH, D)
    pos = torch.arange(blocks * bs, device=dev).view(blocks, bs, 1)
    r0, r1 = kv.RopeConfig(theta=10000.0), kv.RopeConfig(theta=500000.0, scaling="llama3",
                                                        factor=8.0,
                                                        original_max_position_embeddings=8192)
    w0, w1 = r0.inv_freq(dev), r1.inv_freq(dev)
    nb = 2 * k.numel() * k.element_size()
    t = time_fn(lambda: ops.rerotate_rope(k, pos, w0, w1, 1.0, True), reps=reps, device=args.device)
    tb = time_fn(lambda: _torch_rerotate(k, pos, w0, w1, 1.0), reps=max(2, reps // 2),
                 device=args.device)
    rows.append(_row("rerotate_rope K", tuple(k.shape), dtype, nb, t, tb, "torch ops"))

    q = (cache.float() * 10).clamp(-448, 448).to(torch.float8_e4m3fn)
    s0 = torch.linspace(0.5, 1.5, kvh, device=dev)
    s1 = torch.linspace(1.5, 0.5, kvh, device=dev)
    nb = 2 * q.numel()
    t = time_fn(lambda: ops.requantize_fp8(q, s0, s1, 3), reps=reps, device=args.device)
    sv0, sv1 = s0.view(1, 1, 1, kvh, 1), s1.view(1, 1, 1, kvh, 1)
    tb = time_fn(lambda: ((q.float() * sv0) / sv1).clamp(-448, 448).to(torch.float8_e4m3fn),
                 reps=max(2, reps // 2), device=args.device)
    rows.append(_row("requantize_fp8 per-head", shape, "float8_e4m3fn", nb, t, tb, "torch ops"))

    finish("bench_kv", rows, ["case", "shape", "dtype", "GB/s", "ms", "baseline",
                              "baseline GB/s", "ratio", "clone GB/s"], args.out, device=args.device,
           threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
