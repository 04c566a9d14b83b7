# SPDX-License-Identifier: Apache-2.0
"""The transport interface (Note [Transports] in __init__.py) and what every transport shares:
chunking, completion handles with timeouts, and pinned-host staging for CUDA buffers."""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from .. import config as _config

__all__ = ["Transport", "Pending", "TransportError"]

TAG_MOD = 30000  # tags stay below MPI's guaranteed upper bound (32767)


class TransportError(RuntimeError):
    """A transfer failed (peer gone, transport misconfigured); the message names the peer."""


class Pending:
    """Completion of one isend/irecv (all its chunks). ``wait`` raises TimeoutError when not
    done in time and TransportError when a chunk failed; ``on_done`` callbacks run once, in
    the thread that observes completion (e.g. the device copy of a staged receive)."""

    def __init__(self, test: Callable[[], bool], what: str,
                 on_done: list[Callable[[], None]] | None = None):
        self._test = test
        self.what = what
        self._on_done = on_done or []
        self._done = False
        self._lock = threading.Lock()

    def done(self) -> bool:
        """True once every chunk completed (runs the callbacks the first time)."""
        with self._lock:
            if self._done:
                return True
            try:
                if not self._test():
                    return False
            except TransportError:
                raise
            except Exception as e:
                raise TransportError(f"{self.what} failed: {type(e).__name__}: {e}") from None
            for cb in self._on_done:
                cb()
            self._done = True
            return True

    def wait(self, timeout: float | None = None) -> "Pending":
        end = None if timeout is None else time.monotonic() + timeout
        sleep = 20e-6
        while not self.done():
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"{self.what} not complete after {timeout} s")
            time.sleep(sleep)
            sleep = min(sleep * 2, 2e-3)
        return self


class Transport:
    """Point-to-point bucket transport between a publisher and node leaders."""

    name = "base"
    #: True when CUDA tensors go to the wire directly (CUDA-aware MPI, NCCL, UCX with CUDA)
    cuda_direct = False

    def __init__(self, chunk_bytes: int | None = None):
        self.chunk_bytes = chunk_bytes or _config.get().copy_chunk_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        self._stats_lock = threading.Lock()

    # --- to implement -------------------------------------------------------------------

    @property
    def address(self):
        """How peers name this process (msgpack-able)."""
        raise NotImplementedError

    def _isend_chunks(self, chunks: list[torch.Tensor], peer, tag: int) -> Callable[[], bool]:
        """Starts sending contiguous chunks to peer; returns a test() for their completion."""
        raise NotImplementedError

    def _irecv_chunks(self, chunks: list[torch.Tensor], peer, tag: int) -> Callable[[], bool]:
        raise NotImplementedError

    def close(self) -> None:
        """Releases the transport's resources."""

    def describe(self) -> dict:
        return {"transport": self.name, "address": self.address, "cuda_direct": self.cuda_direct,
                "chunk_bytes": self.chunk_bytes}

    # --- shared ---------------------------------------------------------------------------

    def _chunks(self, buf: torch.Tensor) -> list[torch.Tensor]:
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(f"{self.name} transport: buffers are contiguous 1-D uint8 tensors, got "
                             f"{buf.dtype}{tuple(buf.shape)}")
        n = buf.numel()
        # An empty buffer sends no message at all: both sides know its size.
        return [buf[o:o + self.chunk_bytes] for o in range(0, n, self.chunk_bytes)]

    def isend(self, buf: torch.Tensor, peer, tag: int) -> Pending:
        """Sends ``buf`` to ``peer`` (its address) under ``tag``; the buffer must not change
        until the returned Pending is done."""
        on_done = []
        src = buf
        if buf.is_cuda and not self.cuda_direct:  # stage through pinned host memory
            src = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=True)
            src.copy_(buf)  # synchronous D2H: the bytes are on the host when isend starts
        test = self._isend_chunks(self._chunks(src), peer, tag % TAG_MOD)
        with self._stats_lock:
            self.bytes_sent += buf.numel()
        return Pending(test, f"{self.name} send of {buf.numel()} bytes to {peer} (tag {tag})", on_done)

    def irecv(self, buf: torch.Tensor, peer, tag: int) -> Pending:
        """Receives into ``buf`` from ``peer`` under ``tag``; read it after the Pending is done."""
        on_done = []
        dst = buf
        if buf.is_cuda and not self.cuda_direct:
            dst = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=True)
            on_done.append(lambda: buf.copy_(dst))
        test = self._irecv_chunks(self._chunks(dst), peer, tag % TAG_MOD)

        def count():
            with self._stats_lock:
                self.bytes_received += buf.numel()

        on_done.append(count)
        return Pending(test, f"{self.name} receive of {buf.numel()} bytes from {peer} (tag {tag})",
                       on_done)
