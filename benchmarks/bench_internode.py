# SPDX-License-Identifier: Apache-2.0
"""Inter-node update: 2 simulated nodes x 2 ranks (node = rank // 2), rank 0 publishes.

Runs one `mpirun -n 4` job that measures, on the same bytes (N MiB in 200 fp32 tensors):
  - hotweights: publish -> all 3 subscribers committed; bytes cross to node1 once, to its
    leader, and fan out there through shared memory (MPI transport between nodes)
  - MPI.Bcast of the same 200 arrays from rank 0 to every rank
  - torch.distributed.broadcast (gloo) of the same 200 tensors from rank 0 to every rank
and reports times, ratios and the bytes that crossed from node0 to node1.

    python benchmarks/bench_internode.py [--mib 1024] [--quick] [--out results.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

N = 200


def worker(mib: int, out: str) -> None:
    """Runs under mpirun: every rank executes this."""
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    os.environ["HOTWEIGHTS_NODE_ID"] = f"node{rank // 2}"
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="4",
                      GLOO_SOCKET_IFNAME="lo")
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import hotweights
    from hotweights.coordinator import start_embedded

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    numel = mib * 2**20 // 4 // N
    res = {}

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(N):
                self.register_parameter(f"w{i:03d}", torch.nn.Parameter(torch.full((numel,), float(rank)),
                                                                          requires_grad=False))

    coord = start_embedded() if rank == 0 else None
    endpoint = comm.bcast(coord.endpoint if coord else None, root=0)
    m = Bag()
    if rank == 0:
        pub = hotweights.Publisher(m, name="big", endpoint=endpoint, serve_late=False)
    else:
        h = m.register_hotweights(name="big", endpoint=endpoint, commit="manual", swap="storage")
    comm.Barrier()
    times = []
    for k in range(3):  # the first moves everything; later ones change every tensor too
        if rank == 0:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1)
        comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            r = pub.publish(f"v{k}")
            v = r.version
        v = comm.bcast(v if rank == 0 else None, root=0)
        if rank != 0:
            h.wait(v, timeout=600)
        comm.Barrier()
        times.append(time.perf_counter() - t0)
    res["hotweights_s"] = min(times[1:])
    if rank == 0:
        res["crossed_bytes_per_update"] = pub.stats["relayed_bytes"] / 3
        res["transport"] = pub._transport.name
        pub.close()
    else:
        h.close()
    del m
    # baseline 1: MPI.Bcast to every rank
    arrs = [np.full(numel, rank, np.float32) for _ in range(N)]
    best = 1e9
    for _ in range(3):
        comm.Barrier()
        t0 = time.perf_counter()
        for a in arrs:
            comm.Bcast(a, root=0)
        comm.Barrier()
        best = min(best, time.perf_counter() - t0)
    res["mpi_bcast_s"] = best
    del arrs
    # baseline 2: torch.distributed.broadcast over gloo
    port = comm.bcast(_free_port() if rank == 0 else None, root=0)
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo")
    ts = [torch.full((numel,), float(rank)) for _ in range(N)]
    best = 1e9
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for t in ts:
            dist.broadcast(t, 0)
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
    res["gloo_broadcast_s"] = best
    dist.destroy_process_group()
    all_res = comm.gather(res, root=0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(all_res, f)
        coord.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from common import finish, parser

    p = parser(__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=None)
    args = p.parse_args()
    mib = args.mib or (128 if args.quick else 1024)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        tmp = f.name
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONPATH": os.path.dirname(HERE)}
    try:
        out = subprocess.run(["mpirun", "--oversubscribe", "-n", "4", sys.executable, __file__,
                              "--worker", str(mib), tmp], env=env, capture_output=True, text=True,
                             timeout=1800, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            sys.exit(f"bench_internode: mpirun failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        with open(tmp) as f:
            res = json.load(f)
    finally:
        os.unlink(tmp)
    r0 = res[0]
    hw = max(r["hotweights_s"] for r in res)
    mpi = max(r["mpi_bcast_s"] for r in res)
    gloo = max(r["gloo_broadcast_s"] for r in res)
    rows = [
        {"case": f"{mib} MiB, 2 nodes x 2 ranks", "method": f"hotweights ({r0['transport']} + relay)",
         "s": hw, "GB/s per subscriber": mib * 2**20 / hw / 1e9,
         "bytes to node1": int(r0["crossed_bytes_per_update"]), "ratio vs this": 1.0},
        {"case": "", "method": "MPI.Bcast to every rank", "s": mpi,
         "GB/s per subscriber": mib * 2**20 / mpi / 1e9,
         "bytes to node1": "algorithm-dependent", "ratio vs this": mpi / hw},
        {"case": "", "method": "torch.distributed.broadcast (gloo)", "s": gloo,
         "GB/s per subscriber": mib * 2**20 / gloo / 1e9,
         "bytes to node1": "algorithm-dependent", "ratio vs this": gloo / hw},
    ]
    finish("bench_internode", rows, ["case", "method", "s", "GB/s per subscriber", "bytes to node1",
                                     "ratio vs this"], args.out, mib=mib)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
