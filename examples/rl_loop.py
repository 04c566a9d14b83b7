# SPDX-License-Identifier: Apache-2.0
"""An RL loop under torchrun: rank 0 learns, the other ranks act with the newest policy.

    torchrun --nproc-per-node 3 examples/rl_loop.py --iterations 20

Actors generate rollouts on a toy contextual bandit with their current weights (applied at a
safe point between rollouts: ``commit="on_forward"``), send them to the learner with their
weight version, and the learner runs a REINFORCE step on everything it got and publishes the
new policy. The learner prints the mean reward and each actor's version lag (how many versions
behind the newest the rollout's weights were) — the off-policyness an RL system must correct.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import hotweights
from hotweights.coordinator import start_embedded

STATE, ACTIONS, BATCH = 16, 4, 256


def policy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(STATE, 64), torch.nn.Tanh(), torch.nn.Linear(64, ACTIONS))


def share(obj, rank):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("rl_loop: needs at least 2 ranks (a learner and an actor)")
    torch.manual_seed(rank)
    env_w = torch.randn(STATE, ACTIONS, generator=torch.Generator().manual_seed(42))  # the task
    coord = start_embedded(endpoint=f"tcp://{args.host}:0") if rank == 0 else None
    endpoint = share(coord.endpoint if coord else None, rank)
    net = policy()
    if rank == 0:
        pub = hotweights.Publisher(net, name="policy", endpoint=endpoint)
        opt = torch.optim.Adam(net.parameters(), lr=3e-2)
        dist.barrier()
        version = pub.publish("init").version
        dist.broadcast(torch.tensor([version]), src=0)
        for it in range(1, args.iterations + 1):
            rewards, lags, loss = [], [], 0.0
            for actor in range(1, world):
                states = torch.empty(BATCH, STATE)
                actions = torch.empty(BATCH, dtype=torch.int64)
                meta = torch.empty(2, dtype=torch.int64)  # [weight version, reward sum * 1000]
                dist.recv(states, src=actor)
                dist.recv(actions, src=actor)
                dist.recv(meta, src=actor)
                r = (actions == (states @ env_w).argmax(1)).float()
                logp = torch.log_softmax(net(states), 1).gather(1, actions[:, None])[:, 0]
                loss = loss - ((r - r.mean()) * logp).mean()
                rewards.append(r.mean().item())
                lags.append(version - int(meta[0]))
            opt.zero_grad()
            (loss / (world - 1)).backward()
            opt.step()
            version = pub.publish(f"it-{it}").version
            go = torch.tensor([version if it < args.iterations else -1])
            for actor in range(1, world):
                dist.send(go, dst=actor)
            print(f"[learner] it {it:3d} reward {sum(rewards) / len(rewards):.3f} -> v{version}; "
                  f"actor version lag {lags}", flush=True)
        pub.close()
    else:
        h = net.register_hotweights(name="policy", endpoint=endpoint, commit="on_forward")
        dist.barrier()
        first = torch.empty(1, dtype=torch.int64)
        dist.broadcast(first, src=0)
        h.wait(int(first), timeout=120)
        while True:
            states = torch.randn(BATCH, STATE)
            with torch.no_grad():  # the pre-hook applies the newest committed policy first
                actions = torch.distributions.Categorical(logits=net(states)).sample()
            dist.send(states, dst=0)
            dist.send(actions, dst=0)
            dist.send(torch.tensor([h.version or 0, 0]), dst=0)
            go = torch.empty(1, dtype=torch.int64)
            dist.recv(go, src=0)
            if int(go) < 0:
                break
        h.close()
    dist.barrier()
    if coord is not None:
        coord.stop()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
