# SPDX-License-Identifier: Apache-2.0
"""Two simulated nodes x two ranks: rank 0 publishes, ranks 1-3 subscribe; node = rank // 2.

Run under `mpirun -n 4`, `torchrun --nproc-per-node 4`, or spawned with torch.distributed
variables. Prints one RESULT line per rank; rank 0 checks that every subscriber is
bit-identical and that bytes crossed to node1 once per version, not once per subscriber.
"""

from __future__ import annotations

import os
import sys


def main(kill_leader: bool = False) -> int:
    launcher = "mpi" if "OMPI_COMM_WORLD_RANK" in os.environ else "torch"
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    os.environ["HOTWEIGHTS_NODE_ID"] = f"node{rank // 2}"
    import torch

    torch.set_num_threads(1)
    import hotweights
    from hotweights.manifest import Manifest

    if launcher == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        bcast = lambda x: comm.bcast(x, root=0)  # noqa: E731
        gather = lambda x: comm.gather(x, root=0)  # noqa: E731
        barrier = comm.Barrier
    else:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")

        def bcast(x):
            box = [x]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def gather(x):
            out = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(x, out, dst=0)
            return out

        barrier = dist.barrier

    def model():
        torch.manual_seed(1000 + rank)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))

    coord = None
    if rank == 0:
        from hotweights.coordinator import start_embedded

        coord = start_embedded()
    endpoint = bcast(coord.endpoint if coord else None)
    m = model()
    if rank == 0:
        pub = hotweights.Publisher(m, name="net", endpoint=endpoint, bucket_bytes=16384, slots=4,
                                   serve_late=False)
    else:
        h = m.register_hotweights(name="net", endpoint=endpoint, commit="manual")
    barrier()  # everyone registered before the first publish
    results = []
    for step in range(2):
        if rank == 0:
            with torch.no_grad():
                if step:
                    m[2].weight.add_(1.0)  # v2: one tensor
            r = pub.publish(f"v{step + 1}")
            digest = Manifest.from_state_dict(m).digest
            results.append({"version": r.version, "bytes": r.bytes, "digest": digest,
                            "relayed": pub.stats["relayed_bytes"],
                            "transport": pub._transport.name if pub._transport else None})
            bcast(r.version)
        else:
            v = bcast(None)
            h.wait(v, timeout=120)
            results.append({"version": v, "digest": Manifest.from_state_dict(m).digest,
                            "relay": h._sub._relay is not None})
        barrier()  # v2 is a delta against the version every subscriber applied
    allres = gather(results)
    barrier()
    ok = True
    if rank == 0:
        for step, mine in enumerate(results):
            subs = [allres[r][step] for r in range(1, len(allres))]
            same = all(s["digest"] == mine["digest"] for s in subs)
            ok &= same
            print(f"RESULT step={step} version={mine['version']} bytes={mine['bytes']} "
                  f"relayed_total={mine['relayed']} transport={mine['transport']} "
                  f"identical={same} relays={[s['relay'] for s in subs]}", flush=True)
        total = sum(x["bytes"] for x in results)
        print(f"RESULT crossed={results[-1]['relayed']} expected_once_per_node={total}", flush=True)
        ok &= results[-1]["relayed"] == total
        ok &= results[1]["bytes"] == 64 * 256 * 4  # the delta moved only the changed tensor
        pub.close()
    else:
        h.close()
    barrier()
    if coord is not None:
        coord.stop()
    print(f"RANK {rank} done ok={ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
