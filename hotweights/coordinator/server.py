# SPDX-License-Identifier: Apache-2.0
"""The coordinator server: one thread, one ZeroMQ ROUTER for requests, an optional PUB for
notifications, a poller whose timeout is the nearest deadline (timer tick, lease renewal, or a
parked long-poll).

Note [Long-polls]: ``events``, ``get_handles`` and ``released`` take ``wait_ms``. When there is
nothing to return, the request is *parked* (its ROUTER identity kept) and answered as soon as a
state change touches its model (or owner), or with an empty result when ``wait_ms`` runs out.
Correctness never depends on PUB/SUB: every notification is also in a per-model event log that
these long-polls read, so a slow joiner or a dropped PUB message loses nothing.

Note [Leadership]: a coordinator serves only while it leads. With the memory backend it always
does. With Redis it takes a lease (renewed every lease/3), reloads the whole state when it gets
it, and steps down (answering ``not_leader`` so clients fail over) when a renewal says another
coordinator holds the lease, or when it could not renew for a whole lease period. Every write is
fenced by the lease (Note [Fencing] in backends.py).
"""

from __future__ import annotations

import atexit
import collections
import heapq
import hmac
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable

import zmq

from .. import config as _config
from . import protocol as P
from .backends import Backend, BackendError, NotLeader, make_backend
from .state import State, StateSettings

__all__ = ["Coordinator", "embedded", "start_embedded"]

log = logging.getLogger("hotweights.coordinator")

_BURST = 256  # requests read per poll wake-up before timers get a turn
MAX_PARKED_PER_PEER = 64  # long-polls one connection may park (a client thread parks one)


class _Parked:
    __slots__ = ("deadline", "ident", "env", "req_id", "method", "args", "done", "key")

    def __init__(self, deadline, ident, env, req_id, method, args, key):
        self.deadline, self.ident, self.env = deadline, ident, env
        self.req_id, self.method, self.args, self.key = req_id, method, args, key
        self.done = False


class Coordinator:
    """The control-plane server (see docs/coordinator.md).

    ``endpoint`` is where the ROUTER binds (``tcp://127.0.0.1:0`` picks a free port; the bound
    address is :attr:`endpoint` once started). ``pub_endpoint`` binds the notification PUB
    socket (None: no PUB). ``backend`` is "memory", "redis" or a :class:`Backend`. Unset
    arguments come from ``hotweights.config`` (HOTWEIGHTS_*); explicit ones win.
    """

    def __init__(self, endpoint: str | None = None, pub_endpoint: str | None = None,
                 backend: str | Backend | None = None, redis_url: str | None = None,
                 token: str | None = None, *, redis_prefix: str = "hotweights",
                 heartbeat_s: float | None = None, dead_after_s: float | None = None,
                 quorum: Any = None, on_dead: str | None = None, handle_ttl: float | None = None,
                 version_timeout_s: float | None = None, leader_lease_s: float | None = None,
                 max_request_bytes: int = P.MAX_REQUEST_BYTES, event_log_len: int = 4096,
                 keep_versions: int = 256, keep_manifests: int = 16, max_parked: int = 10_000,
                 max_models: int = 10_000, max_transferring: int = 16,
                 hook: Callable[[str, float, str], None] | None = None):
        cfg = _config.load(
            coord_backend=None if isinstance(backend, Backend) else backend,
            redis_url=redis_url, coord_token=token, heartbeat_s=heartbeat_s,
            dead_after_s=dead_after_s, quorum=quorum, on_dead=on_dead, handle_ttl=handle_ttl,
            version_timeout_s=version_timeout_s, leader_lease_s=leader_lease_s)
        endpoint = endpoint or "tcp://127.0.0.1:0"
        if "," in endpoint:
            raise ValueError(f"Coordinator: endpoint={endpoint!r}: a server binds one endpoint "
                             "(comma-separated lists are for clients)")
        for name, n in (("max_request_bytes", max_request_bytes), ("event_log_len", event_log_len),
                        ("keep_versions", keep_versions), ("keep_manifests", keep_manifests),
                        ("max_parked", max_parked), ("max_models", max_models),
                        ("max_transferring", max_transferring)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"Coordinator: {name}={n!r}: expected an integer >= 1")
        self.cfg = cfg
        self._bind, self._pub_bind = endpoint, pub_endpoint
        self.endpoint: str | None = None
        self.pub_endpoint: str | None = None
        self.backend = make_backend(backend if isinstance(backend, Backend) else cfg.coord_backend,
                                    cfg.redis_url, redis_prefix, cfg.leader_lease_s)
        self._token = cfg.coord_token.encode() if cfg.coord_token else None
        self.max_request_bytes = max_request_bytes
        self.max_parked = max_parked
        self.lease_s = cfg.leader_lease_s
        self.settings = StateSettings(
            heartbeat_s=cfg.heartbeat_s, dead_after_s=cfg.dead_after_s, quorum=cfg.quorum,
            on_dead=cfg.on_dead, handle_ttl=cfg.handle_ttl,
            version_timeout_s=cfg.version_timeout_s, event_log_len=event_log_len,
            keep_versions=keep_versions, keep_manifests=min(keep_manifests, keep_versions),
            max_models=max_models, max_transferring=max_transferring,
            inline_payloads=self._token is None)
        self.hook = hook
        self.state = State(self.settings, self.backend, hook)
        # Timers: fine enough to notice a death within ~10% of dead_after_s.
        self.tick_s = min(max(min(cfg.heartbeat_s, cfg.dead_after_s / 4) / 2, 0.02), 0.5)
        self._ctx: zmq.Context | None = None
        self._wake_addr = f"inproc://hotweights-coordinator-wake-{id(self):x}"
        self._router = self._pub = self._wake = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping = False
        self._in_run = False
        self._finished = threading.Event()
        self._leader = False
        self._leader_until = 0.0
        self._stale = True
        self._started_at = time.time()
        self._pending: list = []  # answered requests waiting for their group's write
        self._parked_heap: list = []
        self._parked_by_key: dict[tuple, list[_Parked]] = {}
        self._parked_n = 0
        self._parked_by_peer: collections.Counter = collections.Counter()  # ROUTER identity
        self._tie = itertools.count()
        self._last_backend_warning = 0.0
        self._gauges: dict = {}
        self._backend_error = ""

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "Coordinator":
        """Serves in a background (daemon) thread; returns once bound, raising startup errors."""
        if self._thread is not None:
            raise RuntimeError("Coordinator.start: already started")
        self._thread = threading.Thread(target=self._run, name="hotweights-coordinator",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"Coordinator did not start within {timeout} s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            raise self._startup_error
        return self

    def serve_forever(self) -> None:
        """Serves in the calling thread until :meth:`stop` (from another thread)."""
        self._run()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: float = 10.0) -> None:
        """Stops serving, answers parked long-polls, closes sockets and the backend."""
        self._stopping = True
        if self._ctx is not None and threading.current_thread() is not self._thread:
            s = None
            try:  # wake the poller now rather than at its next timeout
                s = self._ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(self._wake_addr)
                s.send(b"stop", zmq.NOBLOCK)
            except (zmq.ZMQError, AttributeError):
                pass  # already closing: the loop sees _stopping at its next wake-up
            finally:
                # Always closed: a socket left open would block the loop's ctx.term() forever.
                if s is not None:
                    s.close(0)
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"Coordinator thread did not stop within {timeout} s")
        elif self._thread is None and self._in_run:  # serve_forever() in another thread
            if not self._finished.wait(timeout):
                raise RuntimeError(f"Coordinator did not stop within {timeout} s")

    @property
    def running(self) -> bool:
        """Whether the serving loop runs."""
        return self._ready.is_set() and not self._finished.is_set() and not self._startup_error

    @property
    def is_leader(self) -> bool:
        """Whether this coordinator currently serves (holds the lease)."""
        return self._leader

    def __enter__(self):
        return self.start() if self._thread is None else self

    def __exit__(self, *exc):
        self.stop()

    @property
    def counters(self) -> dict:
        """A snapshot of the counters (requests by method and result, handles, rejections)."""
        for _ in range(10):
            try:
                return dict(self.state.counters)
            except RuntimeError:  # resized by the serving thread while copying
                time.sleep(0.001)
        return {}

    def _setup(self) -> None:
        self.backend.open()
        self._ctx = zmq.Context()
        r = self._ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        # Hard cap: beyond it zmq drops the connection; between the soft limit
        # (max_request_bytes) and this one the request gets a "too_large" error reply.
        r.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_request_bytes)
        try:
            r.bind(self._bind)
        except zmq.ZMQError as e:
            r.close()
            raise OSError(f"coordinator cannot bind {self._bind}: {e}") from None
        self._router = r
        self.endpoint = r.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self._pub_bind:
            p = self._ctx.socket(zmq.PUB)
            p.setsockopt(zmq.LINGER, 0)
            try:
                p.bind(self._pub_bind)
            except zmq.ZMQError as e:
                p.close()
                raise OSError(f"coordinator cannot bind PUB {self._pub_bind}: {e}") from None
            self._pub = p
            self.pub_endpoint = p.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._wake = self._ctx.socket(zmq.PULL)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(self._wake_addr)

    def _teardown(self) -> None:
        if self._pending:
            self._flush()
        for e in list(self._iter_parked()):
            self._reply_error(e.ident, e.env, e.req_id, "unavailable",
                              "the coordinator is shutting down")
        self._parked_heap.clear()
        self._parked_by_key.clear()
        for s in (self._router, self._pub, self._wake):
            if s is not None:
                s.close(0)
        self._router = self._pub = self._wake = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        try:
            self.backend.close()
        except Exception as e:  # closing must not mask the reason we stopped
            log.warning("closing %s: %s", self.backend.describe(), e)

    def _run(self) -> None:
        self._in_run = True
        try:
            try:
                self._setup()
                self._leadership(time.monotonic())
            except BaseException as e:
                self._startup_error = e
                self._teardown()
                return
            finally:
                self._ready.set()
            log.info("coordinator serving on %s (pub %s, %s, %s)", self.endpoint,
                     self.pub_endpoint, self.backend.describe(),
                     "leader" if self._leader else "standby")
            try:
                self._loop()
            finally:
                self._teardown()
        finally:
            self._finished.set()

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        now = time.monotonic()
        next_tick, next_lease = now + self.tick_s, now + self.lease_s / 3
        while not self._stopping:
            nearest = min(next_tick, next_lease)
            if self._parked_heap:
                nearest = min(nearest, self._parked_heap[0][0])
            timeout_ms = max(0, math.ceil((nearest - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if self._wake in ready:
                while True:
                    try:
                        self._wake.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            if self._router in ready:
                group_until = time.monotonic() + self.backend.group_commit_s
                for _ in range(_BURST):
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._guard(self._on_frames, frames)
                    if self._pending and time.monotonic() >= group_until:
                        self._guard(self._flush)
                        group_until = time.monotonic() + self.backend.group_commit_s
                self._guard(self._flush)
            now = time.monotonic()
            if self._leader and now > self._leader_until:
                self._guard(self._step_down,
                            f"could not renew the leader lease for {self.lease_s} s")
            if now >= next_lease:
                next_lease = now + self.lease_s / 3
                self._guard(self._leadership, now)
            if now >= next_tick:
                next_tick = now + self.tick_s
                self._guard(self._tick)
            self._guard(self._service_parked, time.monotonic())
            self._guard(self._flush)

    def _guard(self, fn, *args) -> None:
        """Runs one step of the loop; a bug in it is logged and counted, never fatal."""
        try:
            fn(*args)
        except Exception:
            log.exception("coordinator: %s failed", getattr(fn, "__name__", fn))
            self.state.count("internal_errors")
            # Memory may be half-changed: drop the group, rebuild from the backend.
            self._fail_group("unavailable", "the coordinator hit an internal error; retry")

    def _leadership(self, now: float) -> None:
        try:
            held = self.backend.acquire()
        except BackendError as e:
            self._warn_backend(e)
            return  # keep serving until _leader_until; the loop steps down after that
        if held:
            self._leader_until = now + self.lease_s
            if not self._leader:
                self._leader = True
                self._stale = True
                self._reload()
                log.info("coordinator %s leads (%s, epoch %d)", self.endpoint,
                         self.backend.describe(), self.backend.epoch)
        elif self._leader:
            self._step_down("another coordinator holds the leader lease")

    def _step_down(self, why: str) -> None:
        log.warning("coordinator %s steps down: %s", self.endpoint, why)
        self._leader = False
        self._fail_group("not_leader", f"coordinator {self.endpoint} stepped down: {why}")
        for e in list(self._iter_parked()):
            self._reply_error(e.ident, e.env, e.req_id, "not_leader",
                              f"coordinator {self.endpoint} stepped down: {why}")
        self._parked_heap.clear()
        self._parked_by_key.clear()
        self._parked_n = 0
        self._parked_by_peer.clear()
        self.state = State(self.settings, self.backend, self.hook)  # free memory; reload later
        self._stale = True

    def _reload(self) -> bool:
        try:
            snap = self.backend.load()
        except BackendError as e:
            self._backend_error = str(e)
            self._warn_backend(e)
            return False
        self.state.load(snap)
        self._stale = False
        self._commit()  # writes anything load() had to repair
        return not self._stale

    def _warn_backend(self, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last_backend_warning > 5.0:  # one line per 5 s, not one per request
            log.warning("coordinator backend trouble: %s", e)
            self._last_backend_warning = now

    def _commit(self) -> str | None:
        """Writes the pending batch; publishes its events. Returns an error message or None."""
        batch, outbox = self.state.take()
        if batch:
            try:
                self.backend.write(batch)
            except NotLeader as e:
                self._step_down(str(e))
                return str(e)
            except BackendError as e:
                # Memory now holds changes the backend lacks: rebuild from the backend before
                # serving again (Note [Persistence model]).
                self._stale = True
                self._backend_error = str(e)
                self._warn_backend(e)
                return str(e)
        for model, ev in outbox:
            self._publish(model, ev)
        return None

    def _publish(self, model: str, ev: dict) -> None:
        if self._pub is None:
            return
        if self._token:
            ev = {**ev, "mac": P.sign_event(self._token, ev)}
        try:
            self._pub.send_multipart([model.encode(), P.pack(ev)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.state.count("pub.dropped")

    def _tick(self) -> None:
        self._report_gauges({"leader": int(self._leader)})  # standbys report 0
        if not self._leader:
            return
        if self._stale and not self._reload():
            return
        try:
            self.state.tick()
        except Exception:
            log.exception("coordinator timer pass failed")
            self._stale = True
            self.state.take()
            return
        self._commit()
        if self.hook is not None:
            g = self.state.gauges()
            g["parked"] = self._parked_n
            self._report_gauges(g)

    def _report_gauges(self, g: dict) -> None:
        """Tells the metrics hook the gauges that changed since the last report."""
        if self.hook is None:
            return
        for k, v in g.items():
            if self._gauges.get(k) != v:
                try:
                    self.hook(k, v, "gauge")
                except Exception:  # a broken exporter must not break the control plane
                    pass
                self._gauges[k] = v

    # --- requests ------------------------------------------------------------------------------

    def _send(self, ident: bytes, env: list, data: bytes) -> None:
        try:
            self._router.send_multipart([ident, *env, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.state.count("replies.dropped")  # peer gone or its queue is full

    def _reply_error(self, ident, env, req_id, code: str, message: str) -> None:
        self._send(ident, env, P.encode_error(req_id, code, message))

    def _on_frames(self, frames: list) -> None:
        ident = frames[0]
        if len(frames) < 2 or len(frames) > 3 or (len(frames) == 3 and frames[1] != b""):
            self.state.count("rejected.bad_message")
            self._reply_error(ident, [], None, "bad_message",
                              f"expected [payload] or [empty delimiter, payload], got "
                              f"{len(frames) - 1} frames")
            return
        env, payload = frames[1:-1], frames[-1]
        req_id = method = None
        try:
            req = P.decode_request(payload, self.max_request_bytes)
            req_id = req.id
            spec = P.METHODS.get(req.method)
            if spec is None:
                raise P.ProtocolError("unknown_method", f"unknown method {req.method[:64]!r}; "
                                      f"expected one of {', '.join(sorted(P.METHODS))}", req_id)
            method = req.method
            if method == "ping":
                self._send(ident, env, P.encode_reply(req_id, self._ping()))
                self.state.count("requests.ping.ok")
                return
            if not self._leader:
                self.state.count(f"requests.{method}.not_leader")
                self._reply_error(ident, env, req_id, "not_leader",
                                  f"coordinator {self.endpoint} is a standby; ask the leader")
                return
            self._authenticate(req, spec)
            args = P.validate_args(method, req.args)
        except P.ProtocolError as e:
            self.state.count(f"rejected.{e.code}")
            if method is not None:
                self.state.count(f"requests.{method}.error")
            log.debug("rejected request (%s): %s", e.code, e.message)
            self._reply_error(ident, env, e.req_id if req_id is None else req_id, e.code,
                              e.message)
            return
        except BackendError as e:  # the nonce store is unreachable
            self._warn_backend(e)
            self.state.count(f"requests.{method}.error")
            self._reply_error(ident, env, req_id, "unavailable", str(e))
            return
        except Exception as e:  # a bug in checking a request: it is refused, nothing changed
            log.exception("coordinator: checking a request failed")
            self.state.count("internal_errors")
            self._reply_error(ident, env, req_id, "bad_message",
                              f"the request could not be checked: {type(e).__name__}")
            return
        self._execute(ident, env, req_id, method, args, fresh=True)

    def _authenticate(self, req: P.Request, spec: P.MethodSpec) -> None:
        if self._token is None:
            return
        if req.mac is None:
            if spec.public:
                return
            raise P.ProtocolError("unauthenticated", f"{req.method} needs a request signed with "
                                  "the shared token (HOTWEIGHTS_COORD_TOKEN)", req.id)
        if req.nonce is None or len(req.nonce) < 8:
            raise P.ProtocolError("unauthenticated", "a signed request needs a nonce of at least "
                                  "8 bytes", req.id)
        want = P.compute_mac(self._token, req.v, req.id, req.method, req.args, req.client,
                             req.ts, req.nonce)
        if not hmac.compare_digest(want, req.mac):
            raise P.ProtocolError("unauthenticated", "bad mac: the request was not signed with "
                                  "this coordinator's token", req.id)
        skew = time.time() - req.ts
        if abs(skew) > P.MAX_SKEW_S:
            raise P.ProtocolError("stale", f"request timestamp is {skew:+.1f} s off this "
                                  f"coordinator's clock (limit ±{P.MAX_SKEW_S:.0f} s)", req.id)
        if not self.backend.check_nonce(req.nonce, 2 * P.MAX_SKEW_S):
            raise P.ProtocolError("replay", "this request's nonce was already used (a replayed "
                                  "request); sign every attempt afresh", req.id)

    def _ping(self) -> dict:
        return {"protocol": P.PROTOCOL_VERSION, "leader": self._leader, "endpoint": self.endpoint,
                "pub_endpoint": self.pub_endpoint, "backend": self.backend.describe(),
                "epoch": self.backend.epoch, "auth": self._token is not None,
                "time": time.time()}

    def _dispatch(self, method: str, a: dict) -> Any:
        st = self.state
        if method == "status":
            out = st.status(a)
            out["gauges"]["parked"] = self._parked_n
            out["coordinator"] = {
                **self._ping(), "uptime_s": round(time.time() - self._started_at, 3),
                "settings": {"heartbeat_s": self.settings.heartbeat_s,
                             "dead_after_s": self.settings.dead_after_s,
                             "quorum": self.settings.quorum, "on_dead": self.settings.on_dead,
                             "handle_ttl": self.settings.handle_ttl,
                             "version_timeout_s": self.settings.version_timeout_s,
                             "leader_lease_s": self.lease_s}}
            return out
        if method == "clients":
            return st.clients_list(a)
        if method == "events":
            return st.events_since(a)
        return getattr(st, method)(a)

    @staticmethod
    def _ready_result(method: str, result: dict) -> bool:
        key = {"events": "events", "get_handles": "handles", "released": "released"}[method]
        return bool(result[key]) or bool(result.get("truncated"))

    def _execute(self, ident, env, req_id, method, args, fresh: bool) -> bool:
        """Runs one request; replies, or parks it (long-polls). Returns True when answered."""
        if self._stale and not self._reload():
            self.state.count(f"requests.{method}.error")
            self._reply_error(ident, env, req_id, "unavailable",
                              f"the coordinator cannot read its state: {self._backend_error}")
            return True
        ops = self.state.batch.ops
        try:
            result = self._dispatch(method, args)
        except P.CoordinatorError as e:
            if self.state.batch.ops != ops:  # failed half-way (handlers validate first: a bug)
                self._fail_group("unavailable", f"{method} failed half-way; retry")
            self.state.count(f"requests.{method}.error")
            self._reply_error(ident, env, req_id, e.code, e.message)
            return True
        except Exception as e:
            log.exception("coordinator: %s failed", method)
            self._fail_group("unavailable", f"{method} failed inside the coordinator; retry")
            self.state.count(f"requests.{method}.error")
            self._reply_error(ident, env, req_id, "internal",
                              f"{method} failed inside the coordinator: {type(e).__name__}")
            return True
        if (fresh and method in P.LONG_POLL_METHODS and args["wait_ms"] > 0
                and not self._ready_result(method, result)):
            if self._parked_n >= self.max_parked:
                self.state.count(f"requests.{method}.error")
                self._reply_error(ident, env, req_id, "busy",
                                  f"{self._parked_n} long-polls are parked (limit "
                                  f"{self.max_parked}); retry later")
                return True
            # one peer (a socket: one client process) cannot take the pool from the others
            if self._parked_by_peer[ident] >= MAX_PARKED_PER_PEER:
                self.state.count(f"requests.{method}.error")
                self._reply_error(ident, env, req_id, "busy",
                                  f"this connection has {MAX_PARKED_PER_PEER} long-polls parked "
                                  "already (the limit per connection); retry later")
                return True
            self._park(ident, env, req_id, method, args)
            return False
        # Encoded now (the state moves on), sent by _flush once the group is persisted.
        self._pending.append((ident, env, req_id, method, P.encode_reply(req_id, result)))
        return True

    def _flush(self) -> None:
        """Note [Group commit]: requests that arrive together (within the backend's
        ``group_commit_s`` of one poll wake-up) are written to the backend as one batch, and
        only then answered: with Redis a burst costs one round trip instead of one per request,
        and no client ever hears "ok" for a change the backend does not hold.
        """
        if not self._pending and not self.state.batch and not self.state.outbox:
            return
        err = self._commit()
        pending, self._pending = self._pending, []
        code = "not_leader" if not self._leader else "unavailable"
        for ident, env, req_id, method, data in pending:
            if err is None:
                self.state.count(f"requests.{method}.ok")
                self._send(ident, env, data)
            else:
                self.state.count(f"requests.{method}.error")
                self._reply_error(ident, env, req_id, code, err)

    def _fail_group(self, code: str, message: str) -> None:
        """Discards the unwritten group: its changes are dropped (reload) and its requests get
        an error instead of "ok" (they are idempotent: clients retry)."""
        self.state.take()
        self._stale = True
        pending, self._pending = self._pending, []
        for ident, env, req_id, method, _ in pending:
            self.state.count(f"requests.{method}.error")
            self._reply_error(ident, env, req_id, code, message)

    # --- parked long-polls -----------------------------------------------------------------------

    def _park(self, ident, env, req_id, method, args) -> None:
        key = ("owner", args["client_id"]) if method == "released" else ("model", args["model"])
        e = _Parked(time.monotonic() + args["wait_ms"] / 1000.0, ident, env, req_id, method,
                    args, key)
        heapq.heappush(self._parked_heap, (e.deadline, next(self._tie), e))
        self._parked_by_key.setdefault(key, []).append(e)
        self._parked_n += 1
        self._parked_by_peer[ident] += 1

    def _iter_parked(self):
        for _, _, e in self._parked_heap:
            if not e.done:
                yield e

    def _finish(self, e: _Parked) -> None:
        e.done = True
        self._parked_n -= 1
        self._parked_by_peer[e.ident] -= 1
        if self._parked_by_peer[e.ident] <= 0:
            del self._parked_by_peer[e.ident]

    def _retry(self, e: _Parked) -> None:
        """Re-evaluates a parked long-poll after a state change; answers it when ready."""
        if self._stale and not self._reload():
            return  # stays parked; its deadline still bounds the wait
        try:
            result = self._dispatch(e.method, e.args)
        except Exception:
            # Errors (the client left, a bug) are answered by running it once more for real.
            self._finish(e)
            self._execute(e.ident, e.env, e.req_id, e.method, e.args, fresh=False)
            return
        if self._ready_result(e.method, result):
            self._finish(e)
            self._pending.append((e.ident, e.env, e.req_id, e.method,
                                  P.encode_reply(e.req_id, result)))

    def _service_parked(self, now: float) -> None:
        st = self.state
        keys = [("model", m) for m in st.woken_models] + [("owner", o) for o in st.woken_owners]
        st.woken_models.clear()
        st.woken_owners.clear()
        for key in keys:
            waiting = self._parked_by_key.get(key)
            if not waiting:
                continue
            for e in waiting:
                if not e.done:
                    self._retry(e)
            self._parked_by_key[key] = [e for e in waiting if not e.done]
        heap, expired = self._parked_heap, set()
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, _, e = heapq.heappop(heap)
            if not e.done:  # wait_ms ran out: answer with whatever there is (usually nothing)
                self._finish(e)
                expired.add(e.key)
                self._execute(e.ident, e.env, e.req_id, e.method, e.args, fresh=False)
        for key in expired | set(keys):
            waiting = [e for e in self._parked_by_key.get(key, ()) if not e.done]
            if waiting:
                self._parked_by_key[key] = waiting
            else:
                self._parked_by_key.pop(key, None)


# --- embedded coordinator ----------------------------------------------------------------------

_embedded_lock = threading.Lock()
_embedded: Coordinator | None = None


def start_embedded(**kwargs) -> Coordinator:
    """Starts a new in-process coordinator (memory backend unless told otherwise) on a free
    loopback port, in a daemon thread; returns it (its address is ``.endpoint``)."""
    kwargs.setdefault("endpoint", "tcp://127.0.0.1:0")
    kwargs.setdefault("backend", "memory")
    if "hook" not in kwargs:  # its counters land in this process's metrics (metrics.py)
        from ..metrics import coordinator_hook

        kwargs["hook"] = coordinator_hook
    return Coordinator(**kwargs).start()


def embedded() -> str:
    """The endpoint of this process's shared embedded coordinator, started on first use.

    It is what a client without an endpoint (and without HOTWEIGHTS_COORD_ENDPOINT) talks to:
    one script, or a parent whose children are given this endpoint. State lives in memory and
    ends with the process; it is stopped at interpreter exit. A forked child does not inherit
    it (its serving thread stays in the parent): pass children the endpoint instead.
    """
    global _embedded
    with _embedded_lock:
        if _embedded is None or not _embedded.running:
            _embedded = start_embedded()
            atexit.register(_embedded.stop)
        return _embedded.endpoint
