# SPDX-License-Identifier: Apache-2.0
"""Where this process sits in a launched job (mpirun, torchrun, or none) and its node identity."""

from __future__ import annotations

import dataclasses
import os

from . import config as _config

__all__ = ["LaunchInfo", "launch_info"]


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """Rank, local rank and world size from the launcher's environment (None when not launched),
    the launcher ("mpi", "torch" or None), and the node identity (HOTWEIGHTS_NODE_ID or the
    hostname)."""

    rank: int | None
    local_rank: int | None
    world: int | None
    launcher: str | None
    node: str


def _int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip().lstrip("-").isdigit():
            return int(v)
    return None


def launch_info() -> LaunchInfo:
    """Reads the launcher's variables (Open MPI, PMI/PMIx, torchrun)."""
    node = _config.get().node
    mpi_rank = _int("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    if mpi_rank is not None:
        return LaunchInfo(mpi_rank, _int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
                          _int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), "mpi", node)
    rank = _int("RANK")
    if rank is not None:
        return LaunchInfo(rank, _int("LOCAL_RANK"), _int("WORLD_SIZE"), "torch", node)
    return LaunchInfo(None, None, None, None, node)
