# SPDX-License-Identifier: Apache-2.0
"""Training loops: the optimizer policy applied at commit, and the torchrun examples (the DDP
safe barrier included), run briefly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import hotweights
from hotweights import config
from hotweights.coordinator import start_embedded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def coord(monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("HOTWEIGHTS_DEAD_AFTER_S", "1.5")
    config.reset()
    c = start_embedded()
    yield c.endpoint
    c.stop()


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


@pytest.mark.parametrize("policy", ["attenuate", "reset_step", "reset", "preserve"])
def test_optimizer_policy_applies_to_exactly_the_changed_parameters(coord, policy):
    src, dst = _net(1), _net(2)
    opt = torch.optim.AdamW(dst.parameters(), lr=1e-2)
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual", optimizer=opt,
                                opt_policy=policy, opt_attenuation=0.5)
    with hotweights.Publisher(src, name="m", endpoint=coord, serve_late=False) as pub:
        h.wait(pub.publish("v1").version, timeout=30)  # the first version: everything
        for _ in range(3):  # the replica trains: its optimizer has state
            dst(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        before = {n: {k: v.clone() for k, v in opt.state[p].items()}
                  for n, p in dst.named_parameters()}
        with torch.no_grad():  # the trainer moves one tensor; deltas are against v1
            src[0].weight.add_(0.1)
        r = pub.publish("v2")
        h.wait(r.version, timeout=30)
    changed = set(h.last_commit.changed)
    assert changed == {"0.weight"}
    params = dict(dst.named_parameters())
    for n, p in params.items():
        st, old = opt.state[p], before[n]
        if n not in changed or policy == "preserve":
            assert all(torch.equal(st[k], old[k]) for k in old), n  # untouched
        elif policy == "attenuate":
            torch.testing.assert_close(st["exp_avg"], old["exp_avg"] * 0.5)
            assert torch.equal(st["exp_avg_sq"], old["exp_avg_sq"]) and torch.equal(st["step"], old["step"])
        elif policy == "reset_step":
            assert float(st["step"]) == 0.0 and st["step"].dtype == old["step"].dtype
            assert torch.equal(st["exp_avg"], old["exp_avg"])
    rep = h.last_commit.optimizer
    if policy == "preserve":
        assert rep is None
    else:
        assert rep["policy"] == policy and sum(rep["params"].values()) == 1
    # training continues without error after the policy
    dst(torch.randn(4, 8)).sum().backward()
    opt.step()
    h.close()


def _torchrun(script, n, *args, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(n), os.path.join(ROOT, "examples", script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, cwd=ROOT)


@pytest.mark.slow
def test_example_torchrun_update():
    out = _torchrun("torchrun_update.py", 3, "--steps", "20", "--publish-every", "10")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("published v") == 2
    for r in (1, 2):
        assert re.search(rf"\[server {r}\] now serving v2 \(final\)", out.stdout)


@pytest.mark.slow
def test_example_rl_loop():
    out = _torchrun("rl_loop.py", 3, "--iterations", "6")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = re.findall(r"\[learner\] it +(\d+) reward ([\d.]+) -> v(\d+); actor version lag \[(.*?)\]", out.stdout)
    assert len(lines) == 6
    assert all(int(v) == int(it) + 1 for it, _, v, _ in lines)  # one version per iteration
    assert all(len(l.split(",")) == 2 for *_, l in lines)       # a lag for each actor


@pytest.mark.slow
def test_example_trainer_replicas_ddp_safe_barrier():
    out = _torchrun("trainer_replicas.py", 4, "--steps", "21", "--sync-every", "10")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "DIVERGED" not in out.stdout
    took = re.findall(r"\[B rank (\d)\] step (\d+|final): took teacher v(\d+)", out.stdout)
    by_version = {}
    for rank, step, v in took:
        by_version.setdefault(v, set()).add((rank, step))
    assert set(by_version) == {"1", "2"}
    for v, entries in by_version.items():
        assert {r for r, _ in entries} == {"2", "3"}  # both replicas ...
        assert len({s for _, s in entries}) == 1       # ... at the same step
    assert out.stdout.count("replicas identical: True") == 2
