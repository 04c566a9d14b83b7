# SPDX-License-Identifier: Apache-2.0
"""A torchrun job where rank 0 trains and publishes and every other rank serves the newest weights.

    torchrun --nproc-per-node 3 examples/torchrun_update.py --steps 40 --publish-every 10

Rank 0 starts the coordinator (embedded, on this host; pass --host for multi-node jobs),
shares its address with the other ranks through torch.distributed, trains a small regression
model and publishes every --publish-every steps. The other ranks run forward passes in a loop
with ``commit="on_forward"``: each committed version is applied before the next forward, and
they print every switch with their lag. Ranks on other nodes (HOTWEIGHTS_NODE_ID or another
host) get the bytes once per node over the inter-node transport, through their node's leader.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import hotweights
from hotweights.coordinator import Client, start_embedded


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))


def share(obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--publish-every", type=int, default=10)
    p.add_argument("--host", default="127.0.0.1", help="address the coordinator binds and advertises")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    coord = start_embedded(endpoint=f"tcp://{args.host}:0") if rank == 0 else None
    endpoint = share(coord.endpoint if coord else None, rank)
    model = make_model()
    dist.barrier()
    if rank == 0:
        pub = hotweights.Publisher(model, name="regressor", endpoint=endpoint)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        w_true = torch.randn(32, 1)
        dist.barrier()  # the servers are registered
        for step in range(1, args.steps + 1):
            x = torch.randn(256, 32)
            loss = torch.nn.functional.mse_loss(model(x), x @ w_true)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.publish_every == 0 or step == args.steps:
                label = "final" if step == args.steps else f"step-{step}"
                r = pub.publish(label)
                print(f"[trainer] step {step:3d} loss {loss.item():.4f} -> published v{r.version} "
                      f"({r.tensors} tensors, {r.bytes / 1024:.0f} KiB, {r.timings['total_s'] * 1e3:.1f} ms)",
                      flush=True)
        pub.close()
    else:
        h = model.register_hotweights(name="regressor", endpoint=endpoint, commit="on_forward",
                                      swap="storage")
        client = Client(endpoint)
        h.on_commit(lambda info: print(
            f"[server {rank}] now serving v{info.version} ({info.label}), pause "
            f"{info.timings['pause_s'] * 1e3:.2f} ms, lag {(client.current('regressor') or 0) - info.version}",
            flush=True))
        dist.barrier()
        x = torch.randn(8, 32)
        deadline = time.monotonic() + 300
        while not (h.last_commit and h.last_commit.label == "final"):
            with torch.no_grad():
                model(x)  # the pre-hook applies a committed version before this forward
            time.sleep(0.005)
            if time.monotonic() > deadline:
                raise TimeoutError("the final version never arrived")
        h.close()
        client.close()
    dist.barrier()
    if coord is not None:
        coord.stop()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
