# SPDX-License-Identifier: Apache-2.0
"""Two-rank transport exchange used by tests/test_transport.py (run under mpirun or spawned)."""

from __future__ import annotations

import os
import sys

import torch

SIZES = [0, 1, 4097, (3 << 20) + 5]  # the last spans several 1 MiB chunks


def payload(i: int, n: int) -> torch.Tensor:
    return ((torch.arange(n, dtype=torch.int64) * 7 + i * 13) % 251).to(torch.uint8)


def exchange(t, rank: int, peer) -> list[bool]:
    """Rank 0 sends every payload to rank 1 (several in flight); rank 1 checks them."""
    if rank == 0:
        pend = [t.isend(payload(i, n), peer, tag=100 + i) for i, n in enumerate(SIZES)]
        for p in pend:
            p.wait(60)
        return [True]
    bufs = [torch.full((n,), 0, dtype=torch.uint8) for n in SIZES]
    pend = [t.irecv(b, peer, tag=100 + i) for i, b in enumerate(bufs)]
    for p in pend:
        p.wait(60)
    return [bool(torch.equal(b, payload(i, n))) for i, (b, n) in enumerate(zip(bufs, SIZES))]


def torch_child(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo", HOTWEIGHTS_IPC_COPY_CHUNK_MB="1")
    from hotweights.transport import create_transport

    t = create_transport("torch")
    res = exchange(t, rank, 1 - rank)
    q.put((rank, res, t.bytes_sent, t.bytes_received))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def ucx_child(rank: int, q_addr, q_peer, q) -> None:
    os.environ["HOTWEIGHTS_IPC_COPY_CHUNK_MB"] = "1"
    from hotweights.transport import create_transport

    t = create_transport("ucx")
    q_addr.put((rank, t.address))
    peer = q_peer.get(timeout=60)
    res = exchange(t, rank, peer)
    q.put((rank, res, t.bytes_sent, t.bytes_received))
    q_peer.get(timeout=60)  # keep the endpoint open until the other side is done
    t.close()


if __name__ == "__main__":  # under mpirun -n 2
    os.environ["HOTWEIGHTS_IPC_COPY_CHUNK_MB"] = "1"
    from hotweights.transport import create_transport

    t = create_transport("mpi")
    res = exchange(t, t.rank, 1 - t.rank)
    print(f"rank {t.rank} ok={all(res)} sent={t.bytes_sent} received={t.bytes_received}", flush=True)
    t.close()
    sys.exit(0 if all(res) else 1)
