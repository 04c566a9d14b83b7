# SPDX-License-Identifier: Apache-2.0
"""MPI transport (mpi4py): non-blocking point-to-point on COMM_WORLD in a private tag band.

No collective is called (not even a communicator Dup), so one rank may create its transport
on its own when it first has to relay; our tags sit at the top of MPI_TAG_UB, away from an
application's usual small tags."""

from __future__ import annotations

import logging
import subprocess
import threading

import numpy as np
import torch

from .base import Transport, TransportError

log = logging.getLogger("hotweights")


def _cuda_aware(MPI) -> tuple[bool, str]:
    """Whether this MPI library takes CUDA device pointers, and how we know."""
    q = getattr(MPI, "Query_cuda_support", None)
    if q is not None:
        try:
            return bool(q()), "MPIX_Query_cuda_support"
        except Exception as e:  # not every library implements it
            log.debug("Query_cuda_support failed: %s", e)
    lib = MPI.Get_library_version()
    if "Open MPI" in lib:
        try:
            out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True,
                                 text=True, timeout=30).stdout
            return "mpi_built_with_cuda_support:value:true" in out, "ompi_info"
        except (OSError, subprocess.SubprocessError):
            pass
    return False, "unknown (assumed not CUDA-aware)"


class MPITransport(Transport):
    """Point to point over MPI (Isend/Irecv in chunks); peers are COMM_WORLD ranks."""

    name = "mpi"

    def __init__(self, comm=None, chunk_bytes: int | None = None):
        super().__init__(chunk_bytes)
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise TransportError(f"MPI transport needs mpi4py ({e}); pip install hotweights[mpi]") from None
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        ub = self.comm.Get_attr(MPI.TAG_UB) or 32767
        self._tag_base = max(0, int(ub) - 40000)  # our band: [ub - 40000, ub - 10000)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        level = MPI.Query_thread()
        # Without MPI_THREAD_MULTIPLE every MPI call goes through one lock.
        self._lock = threading.Lock() if level < MPI.THREAD_MULTIPLE else None
        self.cuda_direct, self.cuda_how = _cuda_aware(MPI)
        log.info("MPI transport: rank %d/%d, thread level %d, CUDA-aware %s (%s)", self.rank,
                 self.size, level, self.cuda_direct, self.cuda_how)

    @property
    def address(self) -> int:
        return self.rank

    def _buf(self, t: torch.Tensor):
        if t.is_cuda:  # CUDA-aware MPI: mpi4py takes __cuda_array_interface__ objects
            return [t, self.MPI.BYTE]
        return [t.numpy(), self.MPI.BYTE]

    def _call(self, fn, *args, **kw):
        if self._lock is None:
            return fn(*args, **kw)
        with self._lock:
            return fn(*args, **kw)

    def _check_peer(self, peer) -> int:
        if not isinstance(peer, (int, np.integer)) or not 0 <= int(peer) < self.size:
            raise TransportError(f"MPI transport: peer {peer!r} is not a rank in [0, {self.size})")
        return int(peer)

    def _isend_chunks(self, chunks, peer, tag):
        peer = self._check_peer(peer)
        reqs = [self._call(self.comm.Isend, self._buf(c), dest=peer, tag=self._tag_base + tag)
                for c in chunks]
        return lambda: self._call(self.MPI.Request.Testall, reqs)

    def _irecv_chunks(self, chunks, peer, tag):
        peer = self._check_peer(peer)
        reqs = [self._call(self.comm.Irecv, self._buf(c), source=peer, tag=self._tag_base + tag)
                for c in chunks]
        return lambda: self._call(self.MPI.Request.Testall, reqs)

    def close(self) -> None:
        self.comm = None  # COMM_WORLD is the application's: nothing to free
