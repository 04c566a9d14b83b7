# SPDX-License-Identifier: Apache-2.0
"""Inter-node transports (MPI > UCX > torch.distributed) and their auto-selection.

Note [Transports]
A transport moves one bucket (a uint8 tensor) point to point between a publisher and a node
leader: ``isend(buf, peer, tag)`` / ``irecv(buf, peer, tag)`` return a :class:`Pending`, the
bytes travel in chunks of ``HOTWEIGHTS_IPC_COPY_CHUNK_MB`` (so several buckets interleave under
the window), and ``Pending.wait(timeout)`` completes them. Peers are named by the transport's
own ``address`` (an MPI rank, a torch.distributed rank, a UCX host:port), which each client
publishes in its coordinator registration. A transport that cannot take CUDA memory directly
stages through pinned host buffers; ``cuda_direct`` says which, decided at run time and
reported. Tags are private: each transport uses its own communicator/tag range so it never
matches the application's messages.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from .. import config as _config
from .base import Pending, Transport, TransportError

__all__ = ["select_transport", "create_transport", "not_ready", "Transport", "Pending",
           "TransportError"]

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_TORCH_ENV = ("MASTER_ADDR", "RANK", "WORLD_SIZE")


def _under_mpi() -> str | None:
    return next((k for k in _MPI_ENV if k in os.environ), None)


def not_ready(name: str) -> str | None:
    """Why transport ``name`` cannot be started here by this process alone, or None.

    MPI and torch.distributed start with a step every rank of the job must take (Open MPI's
    MPI_Init exchanges addresses with every rank; init_process_group waits for WORLD_SIZE
    ranks). hotweights creates its transport inside ``publish`` or a relay, in the processes
    that need one: starting MPI or a process group there would hang until every other rank did
    the same, which they never do. So both must already be running (the application starts
    them in every rank at start-up); UCX connects point to point and starts alone."""
    if name == "mpi":
        mod = sys.modules.get("mpi4py.MPI")
        if mod is not None and mod.Is_initialized() and not mod.Is_finalized():
            return None
        if _under_mpi():
            return ("launched by mpirun, but MPI is not initialised in this process: `from "
                    "mpi4py import MPI` at start-up in every rank (MPI_Init waits for every rank)")
        return None  # a singleton (no launcher): MPI_Init involves this process only
    if name == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return None
        return ("no torch.distributed process group in this process: call "
                "torch.distributed.init_process_group() at start-up in every rank (it waits "
                "for every rank)")
    return None


def select_transport(forced: str | None = None, explain: bool = False) -> Any:
    """Which inter-node transport this process would use, and why.

    Order: MPI when launched by an MPI launcher and mpi4py is installed; else UCX when ucxx is
    installed; else torch.distributed when a process group is initialised or the torchrun
    variables are set; else ``local`` (one node, IPC only). HOTWEIGHTS_TRANSPORT forces one.
    Returns the name, or ``{"selected", "reason", "candidates"}`` with ``explain=True``.
    """
    cfg = _config.get()
    want = forced or cfg.transport
    cands: dict[str, str] = {}
    env = _under_mpi()
    has_mpi4py = importlib.util.find_spec("mpi4py") is not None
    cands["mpi"] = ("mpi4py not installed" if not has_mpi4py else
                    "not launched by mpirun/mpiexec" if not env else not_ready("mpi") or "ok")
    has_ucx = importlib.util.find_spec("ucxx") is not None
    cands["ucx"] = "ok" if has_ucx else "ucxx not installed"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        cands["torch"] = "ok (process group initialised)"
    elif dist.is_available() and all(k in os.environ for k in _TORCH_ENV):
        cands["torch"] = "torchrun environment, but " + not_ready("torch")
    else:
        cands["torch"] = "no process group and no MASTER_ADDR/RANK/WORLD_SIZE"
    cands["local"] = "ok (single node)"
    if want != "auto":
        sel, reason = want, f"forced by HOTWEIGHTS_TRANSPORT={want}"
        if not cands[want].startswith("ok"):
            reason += f" (warning: {cands[want]})"
    else:
        sel = next(k for k in ("mpi", "ucx", "torch", "local") if cands[k].startswith("ok"))
        reason = f"auto: {cands[sel]}"
    if explain:
        return {"selected": sel, "reason": reason, "candidates": cands}
    return sel


def create_transport(name: str | None = None, **kwargs) -> Transport | None:
    """The transport ``name`` (default: :func:`select_transport`), or None for ``local``."""
    sel = name or select_transport()
    if sel == "local":
        return None
    if sel == "mpi":
        from .mpi import MPITransport

        return MPITransport(**kwargs)
    if sel == "torch":
        from .torchdist import TorchTransport

        return TorchTransport(**kwargs)
    if sel == "ucx":
        from .ucx import UCXTransport

        return UCXTransport(**kwargs)
    raise TransportError(f"unknown transport {sel!r}: expected mpi, ucx, torch or local")
