# SPDX-License-Identifier: Apache-2.0
"""torch.distributed transport: isend/irecv on the default group (gloo on CPU, NCCL for CUDA
buffers when the group's backend is NCCL; otherwise CUDA buffers are staged through host)."""

from __future__ import annotations

import concurrent.futures
import logging
import os

import torch.distributed as dist

from .base import Transport, TransportError

log = logging.getLogger("hotweights")

# Our tags live in their own range so they never match the application's p2p messages.
_TAG_BASE = 7 << 20


class TorchTransport(Transport):
    """Point to point over torch.distributed; peers are global ranks."""

    name = "torch"

    def __init__(self, group=None, chunk_bytes: int | None = None, backend: str | None = None):
        super().__init__(chunk_bytes)
        if not dist.is_available():
            raise TransportError("torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            if not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
                raise TransportError("torch transport: no process group and no MASTER_ADDR/"
                                     "MASTER_PORT/RANK/WORLD_SIZE in the environment (use torchrun)")
            dist.init_process_group(backend or "gloo")
        self.group = group
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.backend = str(dist.get_backend(group))
        self.cuda_direct = self.backend == "nccl"
        # gloo's p2p work completes only inside wait(), so waits run here and Pending polls
        # their futures (Note [Transports]).
        self._waiter = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                             thread_name_prefix="hw-torch-wait")
        log.info("torch transport: rank %d/%d, backend %s, CUDA direct %s", self.rank, self.size,
                 self.backend, self.cuda_direct)

    @property
    def address(self) -> int:
        return self.rank

    def _check_peer(self, peer) -> int:
        if not isinstance(peer, int) or not 0 <= peer < self.size:
            raise TransportError(f"torch transport: peer {peer!r} is not a rank in [0, {self.size})")
        return peer

    def _watch(self, works, what: str):
        fut = self._waiter.submit(lambda: [w.wait() for w in works])

        def test() -> bool:
            if not fut.done():
                return False
            exc = fut.exception()
            if exc is not None:
                raise TransportError(f"torch.distributed {what} failed: {type(exc).__name__}: {exc}")
            return True

        return test

    def _isend_chunks(self, chunks, peer, tag):
        peer = self._check_peer(peer)
        works = [dist.isend(c, dst=peer, group=self.group, tag=_TAG_BASE + tag) for c in chunks]
        return self._watch(works, f"send to rank {peer}")

    def _irecv_chunks(self, chunks, peer, tag):
        peer = self._check_peer(peer)
        works = [dist.irecv(c, src=peer, group=self.group, tag=_TAG_BASE + tag) for c in chunks]
        return self._watch(works, f"receive from rank {peer}")

    def close(self) -> None:
        self._waiter.shutdown(wait=False, cancel_futures=True)
