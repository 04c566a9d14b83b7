# SPDX-License-Identifier: Apache-2.0
"""Where coordinator state is kept: in this process (:class:`MemoryBackend`) or in Redis
(:class:`RedisBackend`), behind one interface (:class:`Backend`).

Note [Persistence model]: the serving coordinator (the *leader*) keeps the working state in
Python dicts and, before it answers a request, writes every record that request changed to the
backend as one atomic :class:`WriteBatch`. The backend therefore always holds the whole state
(clients, versions with their votes, handles with their acks, event logs, released logs,
counters); a coordinator that starts, restarts after SIGKILL or takes over from another one
rebuilds its dicts from :meth:`Backend.load` and continues where the state stood. Reads are served
from the dicts, so long-polls and timers cost no backend round trip. Manifests and plans (blobs,
possibly megabytes) are not loaded; they are read on demand.

Note [Fencing]: with Redis, only the holder of the leader lease (``SET <prefix>:leader <token> NX
PX <lease>``, renewed every lease/3) may write: every batch runs in one Lua script that first
checks the lease still holds this coordinator's token, so a deposed leader (paused, partitioned)
cannot overwrite its successor's state. A batch is applied whole or not at all (the script checks
before its first write, and its writes are plain HSET/HDEL/RPUSH/LTRIM/DEL/SADD/SREM on keys of
the right type). Replay nonces are kept in Redis too (``SET NX PX``), so a restarted coordinator
still refuses a replayed request.
"""

from __future__ import annotations

import abc
import re
import threading
import time
import uuid
from typing import Any

from .protocol import pack, unpack

__all__ = ["Backend", "BackendError", "NotLeader", "WriteBatch", "MemoryBackend", "RedisBackend",
           "make_backend", "redact_url"]

# Record namespaces (hash-like) and list namespaces of the persisted layout.
RECORD_NS = ("client", "model", "version", "handle", "meta")
LIST_NS = ("events", "released")


class BackendError(RuntimeError):
    """The backend cannot be reached or refused an operation (message names the backend)."""


class NotLeader(BackendError):
    """This coordinator does not hold the leader lease (another one serves)."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


class WriteBatch:
    """The records one request (or one timer pass) changed, written atomically.

    Records are kept by reference and encoded when the batch is written, so several changes to
    one record in one request collapse into one write of its final form.
    """

    __slots__ = ("records", "appends", "drop_lists", "blobs", "ops")

    def __init__(self):
        self.records: dict[tuple[str, str], Any] = {}      # (ns, key) -> record | None (delete)
        self.appends: list[tuple[str, str, Any, int]] = []  # (ns, key, record, keep)
        self.drop_lists: set[tuple[str, str]] = set()
        self.blobs: dict[str, bytes | None] = {}
        self.ops = 0  # changes queued so far (tells whether one request changed anything)

    def put(self, ns: str, key: str, record: Any) -> None:
        """Writes (or overwrites) one record."""
        self.records[(ns, key)] = record
        self.ops += 1

    def delete(self, ns: str, key: str) -> None:
        """Deletes one record."""
        self.records[(ns, key)] = None
        self.ops += 1

    def append(self, ns: str, key: str, record: Any, keep: int) -> None:
        """Appends to a list, keeping its last ``keep`` items."""
        # After a drop_list of the same list in this batch, this survives: drops are written
        # before appends.
        self.appends.append((ns, key, record, keep))
        self.ops += 1

    def drop_list(self, ns: str, key: str) -> None:
        """Deletes a whole list (and what this batch appended to it so far)."""
        self.drop_lists.add((ns, key))
        self.appends = [a for a in self.appends if (a[0], a[1]) != (ns, key)]
        self.ops += 1

    def put_blob(self, key: str, data: bytes | None) -> None:
        """Writes (or, with None, deletes) a blob (manifest, plan)."""
        self.blobs[key] = data
        self.ops += 1

    def __bool__(self) -> bool:
        return bool(self.records or self.appends or self.drop_lists or self.blobs)

    def encoded(self):
        """(records, appends) with every record msgpack-encoded."""
        recs = {k: (None if r is None else pack(r)) for k, r in self.records.items()}
        apps = [(ns, key, pack(r), keep) for ns, key, r, keep in self.appends]
        return recs, apps


class Backend(abc.ABC):
    """Persistent state of a coordinator and, with several coordinators, who leads."""

    name = "abstract"
    # How long the server may gather requests into one write (Note [Group commit]): 0 writes
    # after every request (cheap writes); a round trip to Redis is worth amortising.
    group_commit_s = 0.0

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the state lives, for status and messages (never a secret)."""

    def open(self) -> None:
        """Connects; raises :class:`BackendError` naming the backend when it cannot."""

    def close(self) -> None:
        """Releases connections (and the leader lease, when held)."""

    def acquire(self) -> bool:
        """Takes or renews the leader lease; True while this coordinator may serve."""
        return True

    @property
    def epoch(self) -> int:
        """How many times leadership changed hands (a fencing generation, for status)."""
        return 1

    @abc.abstractmethod
    def load(self) -> dict:
        """Everything but blobs: ``{ns: {key: record}}`` for RECORD_NS and
        ``{"lists": {(ns, key): [record, ...]}}``."""

    @abc.abstractmethod
    def write(self, batch: WriteBatch) -> None:
        """Applies a batch atomically; raises :class:`NotLeader` or :class:`BackendError`."""

    @abc.abstractmethod
    def get_blob(self, key: str) -> bytes | None:
        """One blob, or None."""

    @abc.abstractmethod
    def check_nonce(self, nonce: bytes, ttl_s: float) -> bool:
        """Remembers ``nonce`` for ``ttl_s``; False when it was already seen (a replay)."""


class MemoryBackend(Backend):
    """State in this process. Holds the encoded records, so a new :class:`Coordinator` given the
    same instance (or a coordinator recovering from an error) reloads it like it would from
    Redis; nothing survives the process."""

    name = "memory"

    def __init__(self):
        self._lock = threading.Lock()  # a test may share one instance between coordinators
        self._records: dict[str, dict[str, bytes]] = {ns: {} for ns in RECORD_NS}
        self._lists: dict[tuple[str, str], list[bytes]] = {}
        self._blobs: dict[str, bytes] = {}
        self._nonces: dict[bytes, float] = {}
        self._next_nonce_sweep = 0.0

    def describe(self) -> str:
        return "memory"

    def load(self) -> dict:
        with self._lock:
            out: dict[str, Any] = {ns: {k: unpack(v) for k, v in d.items()}
                                   for ns, d in self._records.items()}
            out["lists"] = {k: [unpack(x) for x in v] for k, v in self._lists.items()}
            return out

    def write(self, batch: WriteBatch) -> None:
        recs, apps = batch.encoded()
        with self._lock:
            for (ns, key), data in recs.items():
                if data is None:
                    self._records[ns].pop(key, None)
                else:
                    self._records[ns][key] = data
            for lk in batch.drop_lists:
                self._lists.pop(lk, None)
            for ns, key, data, keep in apps:
                lst = self._lists.setdefault((ns, key), [])
                lst.append(data)
                if len(lst) > keep:
                    del lst[: len(lst) - keep]
            for key, data in batch.blobs.items():
                if data is None:
                    self._blobs.pop(key, None)
                else:
                    self._blobs[key] = data

    def get_blob(self, key: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(key)

    def check_nonce(self, nonce: bytes, ttl_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if now >= self._next_nonce_sweep:  # bounded memory: forget nonces past the window
                self._nonces = {n: t for n, t in self._nonces.items() if t > now}
                self._next_nonce_sweep = now + ttl_s / 4
            exp = self._nonces.get(nonce)
            if exp is not None and exp > now:
                return False
            self._nonces[nonce] = now + ttl_s
            return True


# Writes one batch if, and only if, KEYS[1] (the leader lease) still holds ARGV[1] (our token).
# ARGV[2:] is a flat list of commands, each as: argc, command, args...
_WRITE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('HWNOTLEADER lease lost')
end
local i = 2
local n = #ARGV
while i <= n do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
return 1
"""

# Takes the lease when free, renews it when ours. Returns {held, epoch, pttl of the holder}.
_ACQUIRE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0'), 0}
end
if cur then
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('INCR', KEYS[2]), 0}
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBackend(Backend):
    """All state in Redis under ``<prefix>:*`` keys, with a leader lease (Note [Fencing])."""

    name = "redis"
    group_commit_s = 0.002

    def __init__(self, url: str, prefix: str = "hotweights", lease_s: float = 5.0,
                 socket_timeout_s: float = 5.0):
        if not re.match(r"^[A-Za-z0-9._:-]{1,64}$", prefix):
            raise ValueError(f"RedisBackend: prefix={prefix!r}: expected 1-64 chars from "
                             "[A-Za-z0-9._:-]")
        self.url = url
        self.prefix = prefix
        self.lease_ms = max(int(lease_s * 1000), 100)
        self.token = uuid.uuid4().hex  # this coordinator's identity in the lease
        self._timeout = socket_timeout_s
        self._r = None
        self._epoch = 0
        self._held = False

    # keys
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    def _list_key(self, ns: str, key: str) -> str:
        return self._k("list", ns, key)

    def describe(self) -> str:
        return f"redis {redact_url(self.url)} prefix {self.prefix!r}"

    def _fail(self, what: str, e: Exception) -> BackendError:
        return BackendError(f"Redis at {redact_url(self.url)} failed during {what}: "
                            f"{type(e).__name__}: {e}")

    def open(self) -> None:
        try:
            import redis
        except ImportError as e:
            raise BackendError("the redis backend needs redis-py (`pip install redis`)") from e
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        try:
            # One immediate retry heals a pooled connection that Redis closed; more would stall
            # the single-threaded serving loop for many timeouts when Redis is really gone.
            self._r = redis.Redis.from_url(self.url, socket_timeout=self._timeout,
                                           socket_connect_timeout=min(self._timeout, 2.0),
                                           retry=Retry(NoBackoff(), 1))
            self._r.ping()
        except Exception as e:
            if self._r is not None:
                self._r.close()
                self._r = None
            raise BackendError(f"cannot reach Redis at {redact_url(self.url)}: "
                               f"{type(e).__name__}: {e}") from None
        self._write = self._r.register_script(_WRITE_LUA)
        self._acquire = self._r.register_script(_ACQUIRE_LUA)
        self._release = self._r.register_script(_RELEASE_LUA)

    def close(self) -> None:
        if self._r is None:
            return
        try:
            if self._held:
                self._release(keys=[self._k("leader")], args=[self.token])
        except Exception:
            pass  # the lease expires by itself
        self._held = False
        self._r.close()
        self._r.connection_pool.disconnect()
        self._r = None

    def acquire(self) -> bool:
        try:
            held, epoch, _ = self._acquire(keys=[self._k("leader"), self._k("epoch")],
                                           args=[self.token, self.lease_ms])
        except Exception as e:
            raise self._fail("leader lease", e) from None
        self._held = bool(held)
        if held:
            self._epoch = int(epoch)
        return self._held

    @property
    def epoch(self) -> int:
        return self._epoch

    def load(self) -> dict:
        try:
            pipe = self._r.pipeline(transaction=True)
            for ns in RECORD_NS:
                pipe.hgetall(self._k(ns))
            pipe.smembers(self._k("lists"))
            res = pipe.execute()
            out: dict[str, Any] = {}
            for ns, d in zip(RECORD_NS, res):
                out[ns] = {k.decode(): unpack(v) for k, v in d.items()}
            names = [unpack(m) for m in res[-1]]
            pipe = self._r.pipeline(transaction=True)
            for ns, key in names:
                pipe.lrange(self._list_key(ns, key), 0, -1)
            lists = pipe.execute() if names else []
            out["lists"] = {(ns, key): [unpack(x) for x in items]
                            for (ns, key), items in zip(names, lists)}
            return out
        except BackendError:
            raise
        except Exception as e:
            raise self._fail("load", e) from None

    def write(self, batch: WriteBatch) -> None:
        recs, apps = batch.encoded()
        argv: list[Any] = [self.token]

        def cmd(*a):
            argv.append(len(a))
            argv.extend(a)

        for (ns, key), data in recs.items():
            if data is None:
                cmd("HDEL", self._k(ns), key)
            else:
                cmd("HSET", self._k(ns), key, data)
        for ns, key in batch.drop_lists:
            cmd("DEL", self._list_key(ns, key))
            cmd("SREM", self._k("lists"), pack([ns, key]))
        for ns, key, data, keep in apps:
            lk = self._list_key(ns, key)
            cmd("RPUSH", lk, data)
            cmd("LTRIM", lk, -keep, -1)
            cmd("SADD", self._k("lists"), pack([ns, key]))
        for key, data in batch.blobs.items():
            if data is None:
                cmd("HDEL", self._k("blob"), key)
            else:
                cmd("HSET", self._k("blob"), key, data)
        try:
            self._write(keys=[self._k("leader")], args=argv)
        except Exception as e:
            if "HWNOTLEADER" in str(e):
                self._held = False
                raise NotLeader(f"lost the leader lease in {self.describe()}") from None
            raise self._fail("write", e) from None

    def get_blob(self, key: str) -> bytes | None:
        try:
            return self._r.hget(self._k("blob"), key)
        except Exception as e:
            raise self._fail("read", e) from None

    def check_nonce(self, nonce: bytes, ttl_s: float) -> bool:
        try:
            return bool(self._r.set(self._k("nonce", nonce.hex()), b"1", nx=True,
                                    px=max(int(ttl_s * 1000), 1)))
        except Exception as e:
            raise self._fail("nonce check", e) from None

    def wipe(self) -> None:
        """Deletes every key under this prefix (tests and `coord-serve --wipe`)."""
        cursor = 0
        while True:
            cursor, keys = self._r.scan(cursor, match=self.prefix + ":*", count=1000)
            if keys:
                self._r.delete(*keys)
            if cursor == 0:
                break


def make_backend(kind: str | Backend, redis_url: str | None = None, prefix: str = "hotweights",
                 lease_s: float = 5.0) -> Backend:
    """A backend from its name ("memory" | "redis") or an instance (returned as is)."""
    if isinstance(kind, Backend):
        return kind
    if kind == "memory":
        return MemoryBackend()
    if kind == "redis":
        if not redis_url:
            raise ValueError("backend='redis' needs a redis_url (HOTWEIGHTS_REDIS_URL)")
        return RedisBackend(redis_url, prefix=prefix, lease_s=lease_s)
    raise ValueError(f"backend={kind!r}: expected 'memory', 'redis' or a Backend instance")
