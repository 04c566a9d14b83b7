# SPDX-License-Identifier: Apache-2.0
"""Child-process bodies for the replication tests (spawned; importable by name)."""

from __future__ import annotations

import os
import signal
import time

import torch


def make_model(seed: int = 0, width: int = 64, layers: int = 3, device: str = "cpu") -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    mods = []
    d = 32
    for i in range(layers):
        lin = torch.nn.Linear(d, width if i < layers - 1 else 16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        mods += [lin, torch.nn.Tanh()]
        d = width
    return torch.nn.Sequential(*mods).to(device)


def pack(state: dict) -> dict:
    """State dict as plain bytes: tensors put on an mp.Queue would be shared by descriptor and
    vanish with the child that sent them."""
    return {k: (str(t.dtype), tuple(t.shape), t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            for k, t in state.items()}


def unpack(packed: dict) -> dict:
    out = {}
    for k, (dt, shape, raw) in packed.items():
        dtype = getattr(torch, dt.removeprefix("torch."))
        out[k] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    return out


def subscriber(i: int, endpoint: str, spec: dict, q, stop) -> None:
    """Registers a model, then for spec['versions'] versions: waits, applies, reports its state.

    spec: seed, swap, commit, device, versions, consumer, width, layers, sleep_at_bucket,
    forward_loop (report outputs of forwards run continuously until `stop`).
    """
    import hotweights

    torch.set_num_threads(1)
    dev = spec.get("device", "cpu")
    if dev.startswith("cuda"):
        torch.cuda.set_device(0)
    model = make_model(spec.get("seed", 100 + i), spec.get("width", 64), spec.get("layers", 3), dev)
    h = model.register_hotweights(name=spec.get("name", "m"), endpoint=endpoint,
                                  commit=spec.get("commit", "manual"), swap=spec.get("swap", "storage"),
                                  consumer=spec.get("consumer"))
    if spec.get("sleep_at_bucket") is not None:
        target, mid = spec["sleep_at_bucket"], spec["mid_event"]

        def hold(b):
            if b == target:
                # Not through q: a child killed while its queue feeder still holds the queue's
                # writer lock would block every other child's reports.
                mid.set()
                time.sleep(3600)  # the parent kills us here, mid-transfer

        h._sub.before_scatter = hold
    q.put(("ready", i, h.client_id, os.getpid()))
    try:
        if spec.get("forward_loop"):
            x = torch.linspace(-1, 1, 4 * 32, device=dev).reshape(4, 32)
            outs = []
            while not stop.is_set():
                with torch.no_grad():
                    outs.append(model(x).cpu())
                time.sleep(0.001)
            q.put(("outputs", i, [o.numpy() for o in outs], h.version))
        else:
            for _ in range(spec.get("versions", 1)):
                v = h.wait(timeout=spec.get("timeout", 120))
                q.put(("applied", i, v, pack(model.state_dict()), h.last_commit.bytes,
                       h.last_commit.timings))
            stop.wait(120)
    except Exception as e:  # report instead of dying silently
        q.put(("error", i, f"{type(e).__name__}: {e}"))
    finally:
        h.close()


def publisher(i: int, endpoint: str, spec: dict, q, stop) -> None:
    """Publishes a full version, then a second one that stops mid-stream (the parent kills it)."""
    import hotweights

    torch.set_num_threads(1)
    dev = spec.get("device", "cpu")
    if dev.startswith("cuda"):
        torch.cuda.set_device(0)
    model = make_model(spec.get("seed", 7), spec.get("width", 64), spec.get("layers", 3), dev)
    pub = hotweights.Publisher(model, name=spec.get("name", "m"), endpoint=endpoint,
                               bucket_bytes=spec.get("bucket_bytes", 4096), slots=2,
                               serve_late=False, direct=spec.get("direct"))
    r = pub.publish("v1")
    q.put(("published", i, r.version, pack(model.state_dict())))
    stop.wait(60)  # until the parent saw the subscriber apply v1

    def hold(b, slot, attempt):
        if b == spec.get("sleep_at_bucket", 2):
            spec["mid_event"].set()  # see subscriber(): never signal a kill through q
            time.sleep(3600)

    pub.after_gather = hold
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pub.publish("v2")  # never returns: killed mid-stream
    os.kill(os.getpid(), signal.SIGKILL)
