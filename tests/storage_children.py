# SPDX-License-Identifier: Apache-2.0
"""Child-process bodies for the checkpoint-source tests (spawned; importable by name)."""

from __future__ import annotations

import os

import torch

from replicate_children import pack


def module_from(tensors: dict) -> torch.nn.Module:
    """A module whose state_dict has exactly these names (dotted names become submodules),
    dtypes and shapes, all zeros: ``tensors`` maps name -> (dtype name, shape)."""
    root = torch.nn.Module()
    for name, (dtype, shape) in tensors.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, torch.zeros(tuple(shape), dtype=getattr(torch, dtype)))
    return root


def subscriber(i: int, endpoint: str, spec: dict, q, stop) -> None:
    """Registers a module shaped like spec['tensors'], then for spec['versions'] versions waits,
    applies and reports its state (as bytes)."""
    import hotweights  # noqa: F401  (adds nn.Module.register_hotweights)

    torch.set_num_threads(1)
    model = module_from(spec["tensors"])
    h = model.register_hotweights(name=spec.get("name", "ck"), endpoint=endpoint,
                                  commit="manual", swap=spec.get("swap", "storage"))
    q.put(("ready", i, h.client_id, os.getpid()))
    try:
        for _ in range(spec.get("versions", 1)):
            v = h.wait(timeout=spec.get("timeout", 120))
            q.put(("applied", i, v, pack(model.state_dict()), h.last_commit.bytes))
        stop.wait(120)
    except Exception as e:  # report instead of dying silently
        q.put(("error", i, f"{type(e).__name__}: {e}"))
    finally:
        h.close()
