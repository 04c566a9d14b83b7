# SPDX-License-Identifier: Apache-2.0
"""Copy engine and checksum bandwidth against baselines measured in the same run.

CPU: one large tensor (engine vs torch copy_ vs one memcpy), 10,000 small tensors (engine
batch vs a Python loop of copy_), hw64 checksum vs memcpy (one thread, and all threads).
CUDA (--device cuda): large batched copy vs one copy_, 10,000 small vs a loop of copy_,
checksum vs device copy, and a cross-process IPC read of a slot ring vs a same-process
device copy (spawned child on the same GPU).

    python benchmarks/bench_copy.py [--device cuda] [--quick] [--out results.json]
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parser, time_fn  # noqa: E402

from hotweights import ipc, ops  # noqa: E402

GB = 1e9


def _row(case, what, nbytes, t, base_t, base_name):
    return {"case": case, "method": what, "GB/s": nbytes / t / GB, "baseline": base_name,
            "baseline GB/s": nbytes / base_t / GB, "ratio": base_t / t, "ms": t * 1e3}


def cpu_rows(quick: bool) -> list[dict]:
    rows = []
    n = (64 if quick else 512) << 20
    src, dst = torch.randint(0, 255, (n,), dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    dst.fill_(1)  # fault the pages in
    t_mem = time_fn(lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), n), reps=5)
    t_torch = time_fn(lambda: dst.copy_(src), reps=5)
    t_eng = time_fn(lambda: ops.copy_([dst], [src]), reps=5)
    rows.append(_row("1 large", "engine copy_", n, t_eng, t_mem, "memcpy"))
    rows.append(_row("1 large", "torch copy_", n, t_torch, t_mem, "memcpy"))
    k = 10_000
    small = [torch.randn(256) for _ in range(k)]  # 1 KiB each
    outs = [torch.empty_like(s) for s in small]
    nb = k * 1024

    def loop():
        for o, s in zip(outs, small):
            o.copy_(s)

    t_loop = time_fn(loop, reps=5)
    t_batch = time_fn(lambda: ops.copy_(outs, small), reps=5)
    rows.append(_row("10k x 1 KiB", "engine batch", nb, t_batch, t_loop, "loop of copy_"))
    # checksum: single-threaded partial sum and the multi-threaded digest vs one memcpy
    t_h1 = time_fn(lambda: ops.hw64_partial(src.data_ptr(), n), reps=5)
    t_hn = time_fn(lambda: ops.digest_host(src.data_ptr(), n), reps=5)
    rows.append(_row("checksum", "hw64 1 thread", n, t_h1, t_mem, "memcpy"))
    rows.append(_row("checksum", f"hw64 {os.cpu_count()} threads", n, t_hn, t_mem, "memcpy"))
    return rows


def _ipc_child(i, handle, nbytes, q):
    torch.cuda.set_device(0)
    r = ipc.open_ring(handle, "cuda:0")
    r.wait(0)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src = r.slot(0)[:nbytes]
    t = time_fn(lambda: dst.copy_(src), reps=10, device="cuda")
    q.put(t)
    r.close()


def cuda_rows(quick: bool) -> list[dict]:
    rows = []
    n = (256 if quick else 2048) << 20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), reps=10, device="cuda")
    parts = 8
    srcs, dsts = list(src.chunk(parts)), list(dst.chunk(parts))
    t_eng = time_fn(lambda: ops.copy_(dsts, srcs), reps=10, device="cuda")
    rows.append(_row(f"{n >> 20} MiB in {parts}", "engine batch", n, t_eng, t_copy, "one copy_"))
    k = 10_000
    small = [torch.randn(256, device="cuda") for _ in range(k)]
    outs = [torch.empty_like(s) for s in small]

    def loop():
        for o, s in zip(outs, small):
            o.copy_(s)

    t_loop = time_fn(loop, reps=5, device="cuda")
    t_batch = time_fn(lambda: ops.copy_(outs, small), reps=5, device="cuda")
    rows.append(_row("10k x 1 KiB", "engine batch", k * 1024, t_batch, t_loop, "loop of copy_"))
    t_hash = time_fn(lambda: torch.ops.hotweights.checksum(src), reps=10, device="cuda")
    rows.append(_row("checksum", "hw64 kernel", n, t_hash, t_copy, "device copy"))
    # A pipeline bucket: 64 MiB gathered+hashed from 13 tensors into a slot (a 1 GiB model in
    # 200 tensors), on the GPU's clock and as the publisher's thread sees it (submit, kernel,
    # partials() read back), against a plain copy_ of the same bytes.
    b = 64 << 20
    sizes = [b // 13 // 256 * 256] * 12
    sizes.append(b - sum(sizes))
    pieces = list(src[:b].split(sizes))
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    slot = torch.empty(b, dtype=torch.uint8, device="cuda")
    t_b = time_fn(lambda: slot.copy_(src[:b]), reps=20, device="cuda")
    t_gd = time_fn(lambda: ops.gather(slot, pieces, offs, hash=True, async_op=True), reps=20,
                   device="cuda")
    t_gh = time_fn(lambda: ops.gather(slot, pieces, offs, hash=True).partials(), reps=20)
    rows.append(_row("64 MiB bucket", "gather+hash (GPU time)", b, t_gd, t_b, "copy_"))
    rows.append(_row("64 MiB bucket", "gather+hash+partials (host)", b, t_gh, t_b, "copy_"))
    # cross-process IPC read (same GPU) vs same-process device copy
    m = (256 if quick else 1024) << 20
    ring = ipc.SlotRing(m, 1, "cuda:0")
    ring.slot(0).random_(0, 255)
    ring.record(0)
    torch.cuda.synchronize()
    local_src = torch.empty(m, dtype=torch.uint8, device="cuda")
    local_dst = torch.empty_like(local_src)
    t_local = time_fn(lambda: local_dst.copy_(local_src), reps=10, device="cuda")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_ipc_child, args=(0, ring.handle(), m, q), daemon=True)
    p.start()
    try:
        t_ipc = q.get(timeout=300)
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
    rows.append(_row("IPC read", "other process", m, t_ipc, t_local, "same-process copy"))
    return rows


def main():
    args = parser(__doc__.split("\n")[0]).parse_args()
    rows = cuda_rows(args.quick) if args.device.startswith("cuda") else cpu_rows(args.quick)
    finish("bench_copy", rows, ["case", "method", "GB/s", "baseline", "baseline GB/s", "ratio", "ms"],
           args.out, device=args.device)


if __name__ == "__main__":
    main()
