# SPDX-License-Identifier: Apache-2.0
"""UCX transport (ucxx): tagged send/recv over endpoints, driven by an asyncio loop thread.

Each transport listens on a port ("host:port") and has an *identity*: its listener address, or a
name given at creation (a node leader uses its coordinator client id, so the publisher can send
to it without knowing a port). One endpoint per pair, made by exactly one side: the side whose
peer is a listener address connects, unless both are listener addresses and its own sorts lower
(then it waits); the connecting side introduces itself with its identity. ucxx is asyncio-based:
transfers are coroutines on the transport's loop, and a Pending polls their futures.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading

from .. import config as _config
from .base import Transport, TransportError

log = logging.getLogger("hotweights")


def _host(coord_endpoint: str | None = None) -> str:
    """The address other nodes reach this listener at: HOTWEIGHTS_UCX_HOST, else the hostname's
    address, unless that is a loopback (/etc/hosts often maps the hostname to 127.0.x.1): then
    the address of the interface that routes to the coordinator (``coord_endpoint``, default
    HOTWEIGHTS_COORD_ENDPOINT; a UDP connect sends nothing)."""
    cfg = _config.get()
    if cfg.ucx_host:
        return cfg.ucx_host
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if not addr.startswith("127."):
        return addr
    ep = coord_endpoint or cfg.coord_endpoint or ""
    m = re.match(r"tcp://\[?([^\]/]+?)\]?:\d+$", ep.split(",")[0].strip())
    coord = m.group(1) if m else None
    if coord is None or coord in ("localhost", "*", "0.0.0.0") or coord.startswith("127."):
        return addr  # the coordinator is on this host too: one node, loopback is right
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((coord, 9))
            out = s.getsockname()[0]
        if not out.startswith("127."):
            return out
    except OSError:
        pass
    log.warning("UCX transport: this host's name resolves to %s, a loopback address; other "
                "nodes cannot reach it there: set HOTWEIGHTS_UCX_HOST to this node's address", addr)
    return addr


class UCXTransport(Transport):
    """Point to point over UCX; peers are "host:port" listener addresses."""

    name = "ucx"

    def __init__(self, host: str | None = None, port: int = 0, chunk_bytes: int | None = None,
                 connect_timeout: float | None = None, identity: str | None = None,
                 coord_endpoint: str | None = None):
        super().__init__(chunk_bytes)
        try:
            import ucxx
        except ImportError as e:
            raise TransportError(f"UCX transport needs ucxx ({e}); pip install hotweights[ucx]") from None
        self.ucxx = ucxx
        self.connect_timeout = connect_timeout or _config.get().request_timeout_s
        self._eps: dict[str, object] = {}
        self._ep_ready: dict[str, asyncio.Event] = {}
        self._connecting: dict[str, asyncio.Lock] = {}  # one endpoint per peer, made once
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hw-ucx", daemon=True)
        self._thread.start()
        self._listener = self._run(self._listen(port), 30)
        self._host = host or _host(coord_endpoint)
        self._address = identity or f"{self._host}:{self._listener.port}"
        self.listen_address = f"{self._host}:{self._listener.port}"
        # CUDA buffers are staged through pinned host memory: whether this UCX build moves
        # device memory (cuda_copy/cuda_ipc transports) is not reliably discoverable.
        self.cuda_direct = False
        log.info("UCX transport listening on %s (UCX %s)", self._address,
                 ".".join(map(str, ucxx.get_ucx_version())))

    @property
    def address(self) -> str:
        return self._address

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self, port: int):
        return self.ucxx.create_listener(self._accept, port)

    async def _accept(self, ep) -> None:
        peer = bytes(await ep.recv_obj()).decode()
        self._eps.setdefault(peer, ep)
        self._event(peer).set()

    def _event(self, peer: str) -> asyncio.Event:
        ev = self._ep_ready.get(peer)
        if ev is None:
            ev = self._ep_ready[peer] = asyncio.Event()
        return ev

    def _connects_to(self, peer: str) -> bool:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            return False  # a named peer connects to us
        mine_is_listener = self._address == self.listen_address
        return not mine_is_listener or self._address > peer

    async def _endpoint(self, peer: str, connect: bool):
        if peer in self._eps:
            return self._eps[peer]
        if self._connects_to(peer):
            host, _, port = peer.rpartition(":")
            lock = self._connecting.setdefault(peer, asyncio.Lock())
            async with lock:  # concurrent first sends share one connection
                if peer not in self._eps:
                    ep = await self.ucxx.create_endpoint(host, int(port))
                    await ep.send_obj(self._address.encode())
                    self._eps[peer] = ep
                    self._event(peer).set()
            return self._eps[peer]
        # the peer connects and introduces itself
        try:
            await asyncio.wait_for(self._event(peer).wait(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"UCX transport: peer {peer!r} did not connect within "
                                 f"{self.connect_timeout} s") from None
        return self._eps[peer]

    async def _xfer(self, chunks, peer, tag, send: bool) -> None:
        ep = await self._endpoint(peer, connect=send)
        if not chunks:
            return
        for c in chunks:
            arr = c.numpy() if not c.is_cuda else c
            if send:
                await ep.send(arr, tag=tag)
            else:
                await ep.recv(arr, tag=tag)

    def _start(self, chunks, peer, tag, send: bool):
        fut = asyncio.run_coroutine_threadsafe(self._xfer(chunks, str(peer), tag, send), self._loop)

        def test() -> bool:
            if not fut.done():
                return False
            exc = fut.exception()
            if exc is not None:
                raise TransportError(f"UCX {'send to' if send else 'receive from'} {peer} failed: "
                                     f"{type(exc).__name__}: {exc}")
            return True

        return test

    def _isend_chunks(self, chunks, peer, tag):
        return self._start(chunks, peer, tag, True)

    def _irecv_chunks(self, chunks, peer, tag):
        return self._start(chunks, peer, tag, False)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown():
            for ep in list(self._eps.values()):
                try:
                    await ep.close()
                except Exception as e:  # a peer that is gone already
                    log.debug("UCX endpoint close: %s", e)
            self._listener.close()

        try:
            self._run(shutdown(), 10)
        except Exception as e:
            log.debug("UCX shutdown: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
