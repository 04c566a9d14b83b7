# SPDX-License-Identifier: Apache-2.0
"""Two data-parallel groups; group B periodically takes group A's weights, with an
optimizer-state policy, at a safe barrier.

    torchrun --nproc-per-node 4 examples/trainer_replicas.py --steps 30 --sync-every 10

Ranks 0-1 (group A) and 2-3 (group B) each train the same model with DDP on their own data.
Group A's rank 0 publishes every --sync-every steps. Group B's ranks subscribe with
``commit="manual"``, ``optimizer=opt`` and ``opt_policy="attenuate"`` and call
``commit_collective(group=B)`` at the top of every step: both B ranks apply a version at the
same step or neither does, so DDP never averages gradients across different weights. The
script checks that after every step both B ranks hold identical weights and the same version.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hotweights
from hotweights.coordinator import Client, start_embedded
from hotweights.manifest import Manifest


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # identical start inside a group (DDP broadcasts anyway)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--attenuation", type=float, default=0.5)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 4:
        raise SystemExit("trainer_replicas: run with --nproc-per-node 4")
    group_a = dist.new_group([0, 1])
    group_b = dist.new_group([2, 3])
    mine = group_a if rank < 2 else group_b
    coord = start_embedded() if rank == 0 else None
    box = [coord.endpoint if coord else None]
    dist.broadcast_object_list(box, src=0)
    endpoint = box[0]
    net = model()
    ddp = DDP(net, process_group=mine)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    pub = h = None
    if rank == 0:
        pub = hotweights.Publisher(net, name="teacher", endpoint=endpoint, serve_late=False)
    elif rank >= 2:
        h = net.register_hotweights(name="teacher", endpoint=endpoint, commit="manual",
                                    swap="inplace", optimizer=opt, opt_policy="attenuate",
                                    opt_attenuation=args.attenuation)
    dist.barrier()
    gen = torch.Generator().manual_seed(100 + rank)
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(7 if rank < 2 else 8))
    ok = True
    for step in range(1, args.steps + 1):
        if h is not None:
            v = h.commit_collective(group=group_b)  # the safe barrier
            if v is not None:
                rep = h.last_commit.optimizer or {}
                print(f"[B rank {rank}] step {step}: took teacher v{v}; optimizer policy "
                      f"{rep.get('policy')} on {rep.get('params')}", flush=True)
        x = torch.randn(64, 32, generator=gen)
        loss = torch.nn.functional.mse_loss(ddp(x), x @ w_true)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank >= 2:  # both B replicas must agree on weights and version, every step
            d = torch.tensor([Manifest.from_state_dict(net).digest % (1 << 62), h.version or 0])
            lo, hi = d.clone(), d.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group_b)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group_b)
            if not torch.equal(lo, hi):
                print(f"[B rank {rank}] step {step}: replicas DIVERGED {lo.tolist()} vs {hi.tolist()}",
                      flush=True)
                ok = False
        if rank == 0 and step % args.sync_every == 0:
            r = pub.publish(f"A-step-{step}")
            print(f"[A rank 0] step {step} loss {loss.item():.4f}: published v{r.version}", flush=True)
        dist.barrier()  # keeps the demo's steps in lockstep (not needed for correctness)
    # the last version reaches B before the end: a final collective commit
    if h is not None:
        deadline = time.monotonic() + 60
        client = Client(endpoint)
        last = client.current("teacher") or 0
        while True:  # every B rank runs the same number of collective rounds
            v = h.commit_collective(group=group_b)
            if v is not None:
                print(f"[B rank {rank}] step final: took teacher v{v}", flush=True)
            done = torch.tensor([int((h.version or 0) >= last or time.monotonic() > deadline)])
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=group_b)
            if int(done):
                break
            time.sleep(0.05)
        client.close()
        print(f"[B rank {rank}] done at teacher v{h.version}; replicas identical: {ok}", flush=True)
        h.close()
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if pub is not None:
        pub.close()
    dist.barrier()
    if coord is not None:
        coord.stop()
    dist.destroy_process_group()
    return 0 if int(flag) else 1


if __name__ == "__main__":
    raise SystemExit(main())
