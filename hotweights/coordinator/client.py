# SPDX-License-Identifier: Apache-2.0
"""The coordinator client: typed methods over the wire protocol, safe to share between threads.

Note [Client sockets and retries]: each thread that calls the client gets its own DEALER socket
(sockets are not thread-safe; one per thread avoids a lock around every round trip, which would
serialise a data plane's long-polls behind each other). An attempt waits ``timeout_s`` (plus the
long-poll's ``wait_ms``); on a timeout the socket is closed with linger 0 (so nothing stale is
delivered later) and the next attempt goes to the next endpoint of the list, with the *same*
request id, signed afresh. ``not_leader`` and ``unavailable`` answers are retried with a short
backoff, rotating endpoints, for as long as the call's time budget lasts (``(retries + 1) x``
attempt timeout): a standby takes over within a lease, which is longer than a few quick
attempts. When the budget or the attempts run out, :class:`CoordinatorUnavailable` says which
endpoints did not answer. Every mutating method is idempotent through client-chosen ids
(client_id, idempotency_key, handle_id), so a retry after a lost reply is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable, Literal, TypedDict

import zmq

from .. import config as _config
from . import protocol as P
from .protocol import CoordinatorError, CoordinatorUnavailable

__all__ = ["Client", "EventSubscriber", "CoordinatorError", "CoordinatorUnavailable"]

log = logging.getLogger("hotweights.coordinator")

Role = Literal["publisher", "subscriber", "observer"]
Quorum = Literal["all"] | int | float


class Registration(TypedDict):
    client_id: str
    current_version: int | None
    heartbeat_s: float
    dead_after_s: float


class VersionInfo(TypedDict, total=False):
    version: int
    state: Literal["transferring", "committed", "aborted"]
    label: str | None
    parent: int | None
    created: float
    expected: list[str]
    precommitted: list[str]
    rejected: dict[str, str]
    applied: list[str]
    required: list[str]
    reason: str | None
    meta: dict
    publisher: str
    quorum: Any
    progress: dict
    event_seq: int


class Handle(TypedDict):
    handle_id: str
    owner: str
    version: int
    payload: dict
    seq: int
    expires_in: float


class _Slot:
    """One thread's socket."""

    __slots__ = ("sock", "endpoint")

    def __init__(self):
        self.sock = None
        self.endpoint = None


class Client:
    """A coordinator client (Note [Client sockets and retries]).

    ``endpoint``: one address or a comma-separated failover list; None reads
    HOTWEIGHTS_COORD_ENDPOINT and, when that is unset too, starts (once per process) the
    embedded in-process coordinator. ``token`` (default HOTWEIGHTS_COORD_TOKEN) signs requests.
    """

    def __init__(self, endpoint: str | None = None, *, token: str | None = None,
                 timeout_s: float | None = None, retries: int | None = None,
                 name: str | None = None, context: zmq.Context | None = None):
        cfg = _config.load(coord_endpoint=endpoint, coord_token=token,
                           request_timeout_s=timeout_s, request_retries=retries)
        ep = cfg.coord_endpoint
        if ep is None:
            from .server import embedded
            ep = embedded()
        self.endpoints = [e.strip() for e in ep.split(",") if e.strip()]
        self._token = cfg.coord_token.encode() if cfg.coord_token else None
        self.timeout_s = cfg.request_timeout_s
        self.retries = cfg.request_retries
        self.name = name
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._busy = 0
        self._preferred = 0
        self._closed = False
        self._registrations: dict[str, dict] = {}
        self._heartbeats: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._hb_period: dict[str, float] = {}

    # --- transport -------------------------------------------------------------------------------

    def _slot(self) -> _Slot:
        s = getattr(self._local, "slot", None)
        if s is None:
            s = _Slot()
            self._local.slot = s
            with self._lock:
                self._slots.append(s)
        return s

    def _socket(self, slot: _Slot, endpoint: str):
        if slot.sock is not None and slot.endpoint == endpoint:
            return slot.sock
        self._drop(slot)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        slot.sock, slot.endpoint = sock, endpoint
        return sock

    @staticmethod
    def _drop(slot: _Slot) -> None:
        if slot.sock is not None:
            slot.sock.close(0)
            slot.sock = slot.endpoint = None

    def call(self, method: str, args: dict | None = None, *, wait_ms: int = 0,
             retries: int | None = None) -> Any:
        """Sends one request (see the module note for timeouts and retries); returns its result."""
        if self._closed:
            raise CoordinatorUnavailable(f"{method}: this coordinator client is closed")
        args = dict(args or {})
        retries = self.retries if retries is None else retries
        per_attempt = self.timeout_s + wait_ms / 1000.0
        deadline = time.monotonic() + per_attempt * (retries + 1)
        req_id = P.new_id()
        slot = self._slot()
        timeouts, backoff, last_answer = 0, 0.02, None
        index = self._preferred
        with self._lock:
            self._busy += 1
        try:
            while True:
                endpoint = self.endpoints[index % len(self.endpoints)]
                sock = self._socket(slot, endpoint)
                try:
                    _, data = P.encode_request(method, args, req_id=req_id, client=self.name,
                                               token=self._token)
                except (TypeError, ValueError, OverflowError) as e:
                    raise ValueError(f"{method}: the arguments cannot be sent as msgpack: "
                                     f"{e}") from None
                reply = self._roundtrip(slot, sock, data, req_id,
                                        min(time.monotonic() + per_attempt, deadline))
                if reply is None:
                    timeouts += 1
                    self._drop(slot)  # a late reply must not reach a later call
                    index += 1
                    # Later calls (heartbeats included) start at the next endpoint too.
                    self._preferred = index % len(self.endpoints)
                elif reply["ok"]:
                    self._preferred = index % len(self.endpoints)
                    return reply["result"]
                else:
                    err = reply.get("error") or {}
                    code, msg = str(err.get("code", "error")), str(err.get("message", ""))
                    if code not in P.RETRYABLE_CODES:
                        raise CoordinatorError(code, msg)
                    last_answer = f"{endpoint} answered [{code}] {msg}"
                    index += 1
                    pause = min(backoff, max(deadline - time.monotonic(), 0))
                    backoff = min(backoff * 2, 0.5)
                    time.sleep(pause)
                if timeouts > retries or time.monotonic() >= deadline:
                    where = ", ".join(self.endpoints)
                    if timeouts:
                        msg = (f"coordinator at {where} did not answer {method}: "
                               f"{timeouts} attempt{'s' if timeouts != 1 else ''} of "
                               f"{per_attempt:.1f} s timed out")
                        if last_answer:
                            msg += f"; last answer: {last_answer}"
                    else:
                        msg = (f"coordinator at {where} could not serve {method} within "
                               f"{per_attempt * (retries + 1):.1f} s; last answer: "
                               f"{last_answer}")
                    raise CoordinatorUnavailable(msg)
                if self._closed:
                    raise CoordinatorUnavailable(f"{method}: the client was closed")
        finally:
            with self._lock:
                self._busy -= 1

    def _roundtrip(self, slot: _Slot, sock, data: bytes, req_id: str, until: float):
        """Sends and waits for the reply with ``req_id`` until ``until``; None on timeout."""
        try:
            sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return None  # the socket's queue is full (coordinator unreachable for a while)
        while True:
            left = until - time.monotonic()
            if left <= 0 or self._closed:
                return None
            # Short slices so that close() from another thread is noticed quickly.
            if not sock.poll(int(min(left, 0.1) * 1000) + 1, zmq.POLLIN):
                continue
            raw = sock.recv()
            try:
                reply = P.decode_reply(raw)
            except P.ProtocolError as e:
                raise CoordinatorError(e.code, e.message) from None
            if reply["id"] == req_id:
                return reply
            # A reply to an earlier request id that timed out on this socket: ignore it.

    def _as(self, client_id: str, method: str, args: dict, wait_ms: int = 0) -> Any:
        """A call made on behalf of a registered client: if the coordinator forgot it
        (restarted with the memory backend), register it again and retry once."""
        try:
            return self.call(method, args, wait_ms=wait_ms)
        except CoordinatorError as e:
            if e.code != "unknown_client" or client_id not in self._registrations:
                raise
            self._reregister(client_id)
            return self.call(method, args, wait_ms=wait_ms)

    def _reregister(self, client_id: str) -> None:
        reg = self._registrations.get(client_id)
        if reg is not None:
            log.info("coordinator forgot client %s: registering it again", client_id)
            self.call("register", reg)

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops heartbeat threads and closes every socket (and the context it created)."""
        if self._closed:
            return
        beats = list(self._heartbeats.values())
        self._heartbeats.clear()
        for _, stop in beats:
            stop.set()
        self._closed = True  # a beat waiting on a dead coordinator gives up within 0.1 s
        for t, _ in beats:
            t.join(self.timeout_s + 1.0)
        end = time.monotonic() + 2.0
        while self._busy and time.monotonic() < end:  # callers notice _closed within 0.1 s
            time.sleep(0.01)
        with self._lock:
            for s in self._slots:
                self._drop(s)
            self._slots.clear()
        if self._own_ctx:
            if self._busy:
                log.warning("coordinator client closed with %d calls in flight", self._busy)
            else:
                self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def release_thread(self) -> None:
        """Closes the calling thread's socket (for threads that are about to exit)."""
        s = getattr(self._local, "slot", None)
        if s is not None:
            self._drop(s)
            with self._lock:
                if s in self._slots:
                    self._slots.remove(s)
            self._local.slot = None

    # --- heartbeats -------------------------------------------------------------------------------

    def start_heartbeat(self, client_id: str, period_s: float | None = None) -> None:
        """Heartbeats ``client_id`` from a daemon thread every ``heartbeat_s`` (idempotent).

        When the coordinator answers that it does not know the client (it restarted without
        persistent state), the thread registers it again with the same id and details.
        """
        if client_id in self._heartbeats:
            return
        period = period_s or self._hb_period.get(client_id) or _config.get().heartbeat_s
        stop = threading.Event()
        t = threading.Thread(target=self._beat, args=(client_id, period, stop), daemon=True,
                             name=f"hotweights-heartbeat-{client_id[:16]}")
        self._heartbeats[client_id] = (t, stop)
        t.start()

    def stop_heartbeat(self, client_id: str) -> None:
        """Stops the heartbeat thread of ``client_id`` (and waits for it)."""
        entry = self._heartbeats.pop(client_id, None)
        if entry is not None:
            t, stop = entry
            stop.set()
            t.join(self.timeout_s + 1.0)

    def _beat(self, client_id: str, period: float, stop: threading.Event) -> None:
        try:
            while not stop.wait(period):
                try:
                    # One attempt per beat: the next beat is the retry.
                    r = self.call("heartbeat", {"client_id": client_id}, retries=0)
                    if not r.get("known") and client_id in self._registrations:
                        self._reregister(client_id)
                except Exception as e:  # keep beating through any failure; report it
                    if stop.is_set() or self._closed:
                        break
                    log.warning("heartbeat of %s failed: %s", client_id, e)
        finally:
            self.release_thread()

    # --- API -----------------------------------------------------------------------------------

    def ping(self) -> dict:
        """Protocol version, leadership, endpoints and backend of the coordinator answering."""
        return self.call("ping")

    def register(self, role: Role, model: str, node: str = "", device: str = "",
                 consumer: Iterable[str] = (), capabilities: dict | None = None,
                 client_id: str | None = None, *, heartbeat: bool = True) -> Registration:
        """Registers (or updates) a client; starts its heartbeat thread unless told not to."""
        args = {"role": role, "model": model, "node": node, "device": device,
                "consumer": list(consumer), "capabilities": dict(capabilities or {}),
                "client_id": client_id or P.new_id()}
        r = self.call("register", args)
        self._registrations[r["client_id"]] = args
        self._hb_period[r["client_id"]] = r["heartbeat_s"]
        if heartbeat:
            self.start_heartbeat(r["client_id"], r["heartbeat_s"])
        return r

    def heartbeat(self, client_id: str) -> dict:
        """One heartbeat; ``{"known": False}`` means the coordinator forgot the client."""
        return self.call("heartbeat", {"client_id": client_id})

    def deregister(self, client_id: str) -> dict:
        """Stops heartbeats and removes the client from the coordinator."""
        self.stop_heartbeat(client_id)
        self._registrations.pop(client_id, None)
        return self.call("deregister", {"client_id": client_id})

    def clients(self, model: str | None = None) -> list[dict]:
        """Registered clients (of one model, or all), with liveness, state and version."""
        return self.call("clients", {"model": model})

    def get_client(self, client_id: str) -> dict:
        """One client's record."""
        return self.call("get_client", {"client_id": client_id})

    def publish(self, client_id: str, model: str, manifest: bytes, label: str | None = None,
                parent: int | None = None, plan: bytes | None = None,
                expected: list[str] | None = None, quorum: Quorum | None = None,
                meta: dict | None = None, idempotency_key: str | None = None,
                handles: list[dict] | None = None) -> dict:
        """Publishes the next version of ``model``; returns ``{"version": n}``. ``handles``
        (up to 256 maps of payload, consumers, handle_id) are posted with it, atomically."""
        args = {"client_id": client_id, "model": model, "manifest": bytes(manifest),
                "label": label, "parent": parent, "plan": None if plan is None else bytes(plan),
                "expected": None if expected is None else list(expected), "quorum": quorum,
                "meta": dict(meta or {}), "idempotency_key": idempotency_key or P.new_id()}
        if handles:
            args["handles"] = list(handles)
        return self._as(client_id, "publish", args)

    def version(self, model: str, version: int | None = None) -> VersionInfo:
        """A version's state and votes (the latest when ``version`` is None)."""
        return self.call("version", {"model": model, "version": version})

    def current(self, model: str) -> int | None:
        """The latest committed version of ``model``, or None."""
        return self.call("current", {"model": model})

    def manifest(self, model: str, version: int) -> bytes:
        """The manifest bytes of a version."""
        return self.call("manifest", {"model": model, "version": version})

    def plan(self, model: str, version: int) -> bytes | None:
        """The plan bytes of a version (None when it was published without one)."""
        return self.call("plan", {"model": model, "version": version})

    def progress(self, client_id: str, model: str, version: int, buckets: int,
                 bytes: int) -> dict:  # noqa: A002 - the protocol's argument name
        """Reports transfer progress (informational; shown in status)."""
        return self._as(client_id, "progress", {"client_id": client_id, "model": model,
                                                "version": version, "buckets": buckets,
                                                "bytes": bytes})

    def precommit(self, client_id: str, model: str, version: int) -> dict:
        """This subscriber holds every bucket of ``version``, verified."""
        return self._as(client_id, "precommit", {"client_id": client_id, "model": model,
                                                 "version": version})

    def reject(self, client_id: str, model: str, version: int, reason: str = "") -> dict:
        """This subscriber refuses ``version`` (it stays on its old one)."""
        return self._as(client_id, "reject", {"client_id": client_id, "model": model,
                                              "version": version, "reason": reason})

    def abort(self, client_id: str, model: str, version: int, reason: str = "") -> dict:
        """Aborts a transferring version (publisher)."""
        return self._as(client_id, "abort", {"client_id": client_id, "model": model,
                                             "version": version, "reason": reason})

    def applied(self, client_id: str, model: str, version: int | None,
                behind: bool = False) -> dict:
        """This subscriber now serves ``version``. ``behind``: it dropped, lost or refused a
        newer committed version it cannot apply on top of this one (Note [Delta base]) and
        asks the publisher for a catch-up (``version`` None: it has applied nothing yet)."""
        return self._as(client_id, "applied", {"client_id": client_id, "model": model,
                                               "version": version, "behind": behind})

    def events(self, model: str, after: int = 0, wait_ms: int = 0) -> dict:
        """Events of ``model`` with seq > ``after``; waits up to ``wait_ms`` for the first."""
        return self.call("events", {"model": model, "after": after, "wait_ms": wait_ms},
                         wait_ms=wait_ms)

    def post_handle(self, client_id: str, model: str, version: int, payload: dict,
                    consumers: list[str] | None = None, ttl: float | None = None,
                    handle_id: str | None = None) -> dict:
        """Posts a handle with a lease for the consumers of ``version``."""
        return self._as(client_id, "post_handle", {
            "client_id": client_id, "model": model, "version": version, "payload": payload,
            "consumers": None if consumers is None else list(consumers), "ttl": ttl,
            "handle_id": handle_id or P.new_id()})

    def get_handles(self, client_id: str, model: str, version: int | None = None,
                    after: int = 0, wait_ms: int = 0) -> dict:
        """Handles for this consumer that it has not answered yet (long-poll)."""
        return self._as(client_id, "get_handles", {"client_id": client_id, "model": model,
                                                   "version": version, "after": after,
                                                   "wait_ms": wait_ms}, wait_ms=wait_ms)

    def ack_handle(self, client_id: str, handle_id: str, ok: bool = True,
                   error: str | None = None, precommit: bool = False) -> dict:
        """This consumer is done with a handle (``ok=False``: it failed, ``error`` says why).
        ``precommit=True`` (with ``ok``): and it holds every bucket of the handle's version,
        verified; the result carries the version's ``state``, or ``precommit_error``."""
        return self._as(client_id, "ack_handle", {"client_id": client_id, "handle_id": handle_id,
                                                  "ok": ok, "error": error,
                                                  "precommit": precommit})

    def released(self, client_id: str, after: int = 0, wait_ms: int = 0) -> dict:
        """The owner's released handles after ``after`` (long-poll)."""
        return self._as(client_id, "released", {"client_id": client_id, "after": after,
                                                "wait_ms": wait_ms}, wait_ms=wait_ms)

    def status(self, model: str | None = None) -> dict:
        """Models, versions, clients with lag, handles with leases, counters."""
        return self.call("status", {"model": model})

    def wait_version(self, model: str, version: int, timeout_s: float,
                     states: Iterable[str] = ("committed", "aborted")) -> VersionInfo:
        """Waits (long-polling the event log) until ``version`` reaches one of ``states``.

        Raises TimeoutError naming the version and its last state when ``timeout_s`` passes.
        """
        states = tuple(states)
        end = time.monotonic() + timeout_s
        while True:
            info = self.version(model, version)
            if info["state"] in states:
                return info
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"version {version} of model {model!r} is still "
                                   f"{info['state']} after {timeout_s} s (waiting for "
                                   f"{'/'.join(states)})")
            # event_seq was read with the state, so no transition can slip between the two.
            self.events(model, after=info["event_seq"],
                        wait_ms=max(1, min(int(left * 1000), 10_000)))


class EventSubscriber:
    """Receives PUB notifications (observers only: the library itself long-polls ``events``).

    ``models``: topics to subscribe to (empty: all). With a token, events whose mac does not
    verify are dropped.
    """

    def __init__(self, pub_endpoint: str, models: Iterable[str] = (), *,
                 token: str | None = None):
        cfg = _config.load(coord_token=token)
        self._token = cfg.coord_token.encode() if cfg.coord_token else None
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(pub_endpoint)
        for m in list(models) or [""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, m.encode())

    def recv(self, timeout_s: float) -> dict | None:
        """The next event, or None after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                return None
            _topic, payload = self._sock.recv_multipart()
            try:
                ev = P.unpack(payload)
            except Exception:
                continue
            if self._token is not None and not (isinstance(ev, dict)
                                                and P.verify_event(self._token, ev)):
                continue
            return ev

    def close(self) -> None:
        """Closes the socket and its context."""
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
