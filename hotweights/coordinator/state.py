# SPDX-License-Identifier: Apache-2.0
"""The coordinator's state machine: clients, versions and their votes, handles and their leases,
event logs. Pure Python, no sockets: the server feeds it validated requests and timer ticks,
and writes :attr:`State.batch` to the backend after each (Note [Persistence model]).

Note [Version states]::

    publish ──> transferring ──(quorum of precommits)──> committed   (current(model) = version)
                     │
                     └──(abort | publisher died | timeout | on_dead=abort and an expected
                         subscriber died | every live expected subscriber rejected |
                         a newer version committed)──> aborted

The *required* set of a transferring version is expected ∩ alive subscribers of the model −
rejected. Quorum "all" needs every required subscriber precommitted, an int n needs
min(n, |required|), a float f needs ceil(f·|required|). An empty required set commits at once
(nobody to wait for) unless it is empty because subscribers rejected the version: then it aborts.

Note [Handle leases]: a handle is delivered to each of its consumers until that consumer acks
(or nacks) it; one consumer's ack never hides it from the others. It is released (deleted, and
its owner told through ``released``) when every consumer that is still alive has answered
("acked", or "nacked" when one reported an error), when its TTL runs out ("expired"), or when its
version aborts ("aborted"). Handles of an owner that dies or leaves are dropped: there is nobody
left to tell.

Handlers validate everything before they change anything, so a request that fails leaves the
state as it was. Times that are persisted (created, deadlines, expiries) are wall-clock seconds;
liveness uses this process's monotonic clock and starts afresh on load, which gives every
client a grace of dead_after_s after a coordinator (re)starts.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from typing import Any, Callable

from .backends import Backend, WriteBatch
from .protocol import CoordinatorError, new_id, pack

__all__ = ["State", "StateSettings"]

MAX_BATCH_ITEMS = 1024  # events / handles / released entries per long-poll reply


# Plans up to this size travel inside the "version" event as well (Note [One update]).
INLINE_PLAN_BYTES = 16 << 10
INLINE_HANDLE_BYTES = 16 << 10  # handles posted with a version ride in its event up to this


@dataclasses.dataclass
class StateSettings:
    """Tunables of the state machine (from hotweights.config plus server arguments)."""

    heartbeat_s: float = 1.0
    dead_after_s: float = 5.0
    quorum: Any = "all"
    on_dead: str = "commit"
    handle_ttl: float = 45.0
    version_timeout_s: float = 300.0
    event_log_len: int = 4096
    released_log_len: int = 4096
    keep_versions: int = 256
    keep_manifests: int = 16
    max_clients: int = 100_000
    max_handles: int = 100_000
    max_models: int = 10_000
    # versions of one model in flight at once; a publish past it aborts the oldest
    max_transferring: int = 16
    purge_dead_after_s: float = 3600.0
    # small plans and handles ride in version events; off with a token: events are public
    # reads, plans and handle payloads are not (docs/coordinator.md, Security)
    inline_payloads: bool = True


def _err(code: str, msg: str) -> CoordinatorError:
    return CoordinatorError(code, msg)


class State:
    """All coordinator state of the leader, mirrored to the backend through :attr:`batch`."""

    def __init__(self, settings: StateSettings, backend: Backend,
                 hook: Callable[[str, float, str], None] | None = None):
        self.s = settings
        self.backend = backend
        self.hook = hook
        self.clients: dict[str, dict] = {}
        self.seen: dict[str, float] = {}          # client id -> monotonic time of last sign of life
        self.models: dict[str, dict] = {}
        self.versions: dict[str, dict[int, dict]] = {}
        self.idem: dict[tuple[str, str], int] = {}
        self.handles: dict[str, dict] = {}
        self.handles_by_model: dict[str, dict[str, dict]] = {}
        self.events: dict[str, collections.deque] = {}
        self.released_log: dict[str, collections.deque] = {}
        self.rseq: dict[str, int] = {}
        self.counters: collections.Counter = collections.Counter()
        self._counters_dirty = False
        self.batch = WriteBatch()
        self.outbox: list[tuple[str, dict]] = []   # events to publish once the batch is written
        self.woken_models: set[str] = set()        # long-polls to re-evaluate
        self.woken_owners: set[str] = set()
        self.left_models: set[str] = set()         # a client of these left: maybe unused now

    # --- plumbing ----------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Adds ``n`` to counter ``name`` and tells the metrics hook."""
        self.counters[name] += n
        self._counters_dirty = True
        if self.hook is not None:
            try:
                self.hook(name, n, "counter")
            except Exception:  # a broken metrics exporter must not break the control plane
                pass

    def take(self) -> tuple[WriteBatch, list]:
        """The pending writes and events; starts a new batch."""
        b, out = self.batch, self.outbox
        self.batch, self.outbox = WriteBatch(), []
        return b, out

    def _put_client(self, rec):
        self.batch.put("client", rec["client_id"], rec)

    def _put_model(self, m):
        self.batch.put("model", m["name"], m)

    def _put_version(self, rec):
        self.batch.put("version", f"{rec['version']}:{rec['model']}", rec)

    def _put_handle(self, h):
        self.batch.put("handle", h["handle_id"], h)

    def _model(self, name: str) -> dict:
        m = self.models.get(name)
        if m is None:
            m = {"name": name, "vseq": 0, "hseq": 0, "eseq": 0, "current": None,
                 "created": time.time()}
            self.models[name] = m
            self.versions[name] = {}
            self.handles_by_model[name] = {}
            self.events[name] = collections.deque(maxlen=self.s.event_log_len)
            self._put_model(m)
        return m

    def _event(self, model: str, type_: str, **fields) -> None:
        m = self._model(model)
        m["eseq"] += 1
        ev = {**fields, "seq": m["eseq"], "type": type_, "model": model, "ts": time.time()}
        self.events[model].append(ev)
        self.batch.append("events", model, ev, self.s.event_log_len)
        self._put_model(m)
        self.outbox.append((model, ev))
        self.woken_models.add(model)

    # --- load ----------------------------------------------------------------------------------

    def load(self, snap: dict) -> None:
        """Rebuilds the dicts from a backend snapshot (a new leader, or recovery after an error).
        What only this process knew survives a reload in place: when each client was last
        heard from (a reload must not make a silent client look alive again), and counters
        not flushed yet. A new leader starts from an empty State: every client gets the grace
        period."""
        now = time.monotonic()
        old_seen, old_counters = self.seen, self.counters
        self.__init__(self.s, self.backend, self.hook)
        self.clients = dict(snap.get("client", {}))
        # grace period for clients this process never heard from: see the module note
        self.seen = {cid: old_seen.get(cid, now) for cid in self.clients}
        for name, m in snap.get("model", {}).items():
            self.models[name] = m
            self.versions[name] = {}
            self.handles_by_model[name] = {}
            self.events[name] = collections.deque(maxlen=self.s.event_log_len)
        for rec in sorted(snap.get("version", {}).values(), key=lambda r: r["version"]):
            self._model(rec["model"])
            self.versions[rec["model"]][rec["version"]] = rec
            if rec.get("idempotency_key"):
                self.idem[(rec["model"], rec["idempotency_key"])] = rec["version"]
        for h in sorted(snap.get("handle", {}).values(), key=lambda h: h["seq"]):
            self._model(h["model"])
            self.handles[h["handle_id"]] = h
            self.handles_by_model[h["model"]][h["handle_id"]] = h
        for (ns, key), items in snap.get("lists", {}).items():
            if ns == "events":
                self._model(key)
                self.events[key].extend(items)
            elif ns == "released":
                self.released_log[key] = collections.deque(items, maxlen=self.s.released_log_len)
        meta = snap.get("meta", {})
        for k, v in meta.items():
            if k.startswith("rseq:"):
                self.rseq[k[5:]] = v
        self.counters.update(meta.get("counters", {}))
        for k, n in old_counters.items():  # monotonic: the larger is the newer
            if n > self.counters[k]:
                self.counters[k] = n
                self._counters_dirty = True
        # _model() may have queued writes for models missing from a damaged snapshot: keep them.

    def flush_counters(self) -> None:
        """Queues the counters for persistence when they changed."""
        if self._counters_dirty:
            self.batch.put("meta", "counters", dict(self.counters))
            self._counters_dirty = False

    # --- lookups -------------------------------------------------------------------------------

    def _client(self, cid: str) -> dict:
        rec = self.clients.get(cid)
        if rec is None:
            raise _err("unknown_client", f"client {cid!r} is not registered (register it again)")
        return rec

    def _member(self, cid: str, model: str, role: str, what: str) -> dict:
        rec = self._client(cid)
        if rec["role"] != role or rec["model"] != model:
            raise _err("forbidden", f"{what}: client {cid!r} is a {rec['role']} of model "
                                    f"{rec['model']!r}; expected a {role} of model {model!r}")
        return rec

    def _version(self, model: str, v: int | None) -> dict:
        m = self.models.get(model)
        if m is None:
            raise _err("unknown_model", f"model {model!r} is unknown (no client registered it)")
        if v is None:
            v = m["vseq"]
            if v == 0:
                raise _err("unknown_version", f"model {model!r} has no versions yet")
        rec = self.versions[model].get(v)
        if rec is None:
            if 1 <= v <= m["vseq"]:
                raise _err("unknown_version", f"version {v} of model {model!r} was trimmed (the "
                                              f"coordinator keeps the last {self.s.keep_versions})")
            raise _err("unknown_version", f"model {model!r} has no version {v} (latest is "
                                          f"{m['vseq'] or 'none'})")
        return rec

    def _live(self, cid: str, model: str) -> bool:
        """Whether ``cid`` is a live subscriber of ``model`` (counts for quorums and handles)."""
        rec = self.clients.get(cid)
        return (rec is not None and rec["alive"] and rec["role"] == "subscriber"
                and rec["model"] == model)

    def required(self, vrec: dict) -> list[str]:
        """Subscribers a transferring version waits for: expected ∩ alive − rejected."""
        return [c for c in vrec["expected"]
                if c not in vrec["rejected"] and self._live(c, vrec["model"])]

    def _view_client(self, rec: dict, now: float) -> dict:
        cid = rec["client_id"]
        return {**{k: rec[k] for k in ("client_id", "role", "model", "node", "device", "consumer",
                                       "capabilities", "alive", "version", "state", "registered",
                                       "progress")},
                "behind": bool(rec.get("behind", False)),
                "holds": rec["version"] if rec.get("holds") is None else rec["holds"],
                "last_seen_ago_s": round(now - self.seen.get(cid, now), 3)}

    def _view_version(self, rec: dict) -> dict:
        out = {k: rec[k] for k in ("version", "state", "label", "parent", "created", "expected",
                                   "precommitted", "rejected", "applied", "reason", "meta",
                                   "publisher", "quorum", "committed_at", "ended_at")}
        out["required"] = self.required(rec) if rec["state"] == "transferring" else []
        out["progress"] = {cid: {"buckets": c["progress"]["buckets"],
                                 "bytes": c["progress"]["bytes"]}
                           for cid, c in self.clients.items()
                           if c.get("progress") and c["model"] == rec["model"]
                           and c["progress"]["version"] == rec["version"]}
        out["event_seq"] = self.models[rec["model"]]["eseq"]
        return out

    # --- clients -------------------------------------------------------------------------------

    def register(self, a: dict) -> dict:
        """Adds or updates a client; returns its id and the model's current version."""
        cid = a["client_id"] or new_id()
        old = self.clients.get(cid)
        if old is None and len(self.clients) >= self.s.max_clients:
            raise _err("too_many_clients", f"the coordinator already has {len(self.clients)} "
                                           f"clients (limit {self.s.max_clients})")
        if a["model"] not in self.models and len(self.models) >= self.s.max_models:
            raise _err("too_many_models", f"the coordinator already has {len(self.models)} "
                                          f"models (limit {self.s.max_models})")
        m = self._model(a["model"])
        same = old is not None and old["model"] == a["model"] and old["role"] == a["role"]
        rec = {"client_id": cid, "role": a["role"], "model": a["model"], "node": a["node"],
               "device": a["device"], "consumer": a["consumer"],
               "capabilities": a["capabilities"], "alive": True,
               "registered": old["registered"] if old else time.time(),
               "version": old["version"] if same else None,
               "state": old["state"] if same and old["alive"] else "registered",
               "progress": old["progress"] if same else None,
               "holds": old.get("holds") if same else None,
               "behind": bool(old.get("behind")) if same else False}
        if old is not None and not same:
            # A new model or role: settle what the old registration leaves behind first.
            self._leave(old, "left", replaced=True)
        self.clients[cid] = rec
        self.seen[cid] = time.monotonic()
        self._put_client(rec)
        action = "joined" if old is None else ("rejoined" if not old["alive"] else "updated")
        self._event(a["model"], "client", action=action, client_id=cid, role=a["role"],
                    node=a["node"], device=a["device"])
        self.count("clients.registered")
        return {"client_id": cid, "current_version": m["current"],
                "heartbeat_s": self.s.heartbeat_s, "dead_after_s": self.s.dead_after_s}

    def heartbeat(self, a: dict) -> dict:
        """Marks a client alive; ``known`` False tells it to register again."""
        rec = self.clients.get(a["client_id"])
        if rec is None:
            return {"known": False}
        self.seen[rec["client_id"]] = time.monotonic()
        if not rec["alive"]:  # it came back before being purged: serve it again
            rec["alive"], rec["state"] = True, "registered"
            rec.pop("dead_at", None)
            self._put_client(rec)
            self._event(rec["model"], "client", action="alive", client_id=rec["client_id"],
                        role=rec["role"], node=rec["node"], device=rec["device"])
        return {"known": True}

    def deregister(self, a: dict) -> dict:
        """Removes a client; its in-flight duties are settled as if it had left."""
        rec = self.clients.get(a["client_id"])
        if rec is None:
            return {"known": False}
        self._leave(rec, "left")
        return {"known": True}

    def _leave(self, rec: dict, action: str, replaced: bool = False) -> None:
        cid = rec["client_id"]
        self.left_models.add(rec["model"])
        if not replaced:
            del self.clients[cid]
            self.seen.pop(cid, None)
            self.batch.delete("client", cid)
            self.released_log.pop(cid, None)
            self.batch.drop_list("released", cid)
            if self.rseq.pop(cid, None) is not None:
                self.batch.delete("meta", f"rseq:{cid}")
        else:
            rec["alive"] = False  # the old record, so that it stops counting in its old role
        self._event(rec["model"], "client", action=action, client_id=cid, role=rec["role"],
                    node=rec["node"], device=rec["device"])
        self._settle_departure(rec, "publisher left", f"subscriber {cid} left", abort_on_dead=False)

    def _settle_departure(self, rec: dict, pub_reason: str, sub_reason: str,
                          abort_on_dead: bool) -> None:
        """What a client that died or left leaves behind: its versions, handles and votes."""
        cid, model = rec["client_id"], rec["model"]
        for h in [h for h in self.handles.values() if h["owner"] == cid]:
            self._drop_handle(h)
        if rec["role"] == "publisher":
            for v in list(self.versions.get(model, {}).values()):
                if v["state"] == "transferring" and v["publisher"] == cid:
                    self._abort(v, pub_reason)
        elif rec["role"] == "subscriber":
            for v in list(self.versions.get(model, {}).values()):
                if v["state"] != "transferring" or cid not in v["expected"]:
                    continue
                if abort_on_dead and cid not in v["rejected"]:
                    self._abort(v, sub_reason)
                else:
                    self._evaluate(v)
        for h in list(self.handles_by_model.get(model, {}).values()):
            if cid in h["consumers"]:
                self._maybe_release(h)

    def clients_list(self, a: dict) -> list:
        """Every client (of one model, or all)."""
        now = time.monotonic()
        return [self._view_client(r, now) for r in self.clients.values()
                if a["model"] is None or r["model"] == a["model"]]

    def get_client(self, a: dict) -> dict:
        """One client."""
        return self._view_client(self._client(a["client_id"]), time.monotonic())

    # --- versions ------------------------------------------------------------------------------

    def publish(self, a: dict) -> dict:
        """Creates the next version of a model (state transferring)."""
        model = a["model"]
        self._member(a["client_id"], model, "publisher", "publish")
        key = a["idempotency_key"]
        if key is not None and (model, key) in self.idem:
            return {"version": self.idem[(model, key)], "duplicate": True}
        m = self.models[model]
        if a["parent"] is not None and a["parent"] > m["vseq"]:
            raise _err("bad_args", f"publish: parent={a['parent']} does not exist (model "
                                   f"{model!r} has {m['vseq']} versions)")
        if a["expected"] is None:
            expected = [c for c, r in self.clients.items() if self._live(c, model)]
        else:
            expected = list(dict.fromkeys(a["expected"]))
            for c in expected:
                if not self._live(c, model):
                    r = self.clients.get(c)
                    why = ("not registered" if r is None else "dead" if not r["alive"] else
                           f"a {r['role']} of model {r['model']!r}")
                    raise _err("bad_args", f"publish: expected subscriber {c!r} is {why}; "
                                           f"expected live subscribers of model {model!r}")
        quorum = a["quorum"] if a["quorum"] is not None else self.s.quorum
        handles = a.get("handles") or ()
        ids = [h["handle_id"] for h in handles if h["handle_id"] is not None]
        if len(set(ids)) != len(ids):
            raise _err("bad_args", "publish: two handles with the same handle_id")
        for h in handles:  # checked before anything changes: all of it or nothing
            unknown = [c for c in h["consumers"] or () if c not in self.clients]
            if unknown:
                raise _err("bad_args", f"publish: handle consumer {unknown[0]!r} is not registered")
            if h["handle_id"] is not None and h["handle_id"] in self.handles:
                raise _err("conflict", f"publish: handle {h['handle_id']!r} already exists")
        if handles and len(self.handles) + len(handles) > self.s.max_handles:
            raise _err("too_many_handles", f"{len(self.handles)} handles are live, {len(handles)} "
                                           f"more would pass the limit {self.s.max_handles}")
        # a bounded number in flight (each holds its manifest): the oldest give way
        flying = sorted(r["version"] for r in self.versions[model].values()
                        if r["state"] == "transferring")
        for old_v in flying[:max(0, len(flying) - self.s.max_transferring + 1)]:
            self._abort(self.versions[model][old_v], f"superseded: more than "
                        f"{self.s.max_transferring} versions of {model!r} were in flight")
        now = time.time()
        v = m["vseq"] + 1
        m["vseq"] = v
        self._put_model(m)
        rec = {"version": v, "model": model, "state": "transferring", "label": a["label"],
               "parent": a["parent"], "created": now,
               "deadline": now + self.s.version_timeout_s, "publisher": a["client_id"],
               "expected": expected, "quorum": quorum, "precommitted": [], "rejected": {},
               "applied": [], "reason": None, "meta": a["meta"], "idempotency_key": key,
               "has_plan": a["plan"] is not None, "manifest_bytes": len(a["manifest"]),
               "manifest_trimmed": False, "committed_at": None, "ended_at": None}
        self.versions[model][v] = rec
        if key is not None:
            self.idem[(model, key)] = v
        self._put_version(rec)
        self.batch.put_blob(f"manifest:{v}:{model}", a["manifest"])
        if a["plan"] is not None:
            self.batch.put_blob(f"plan:{v}:{model}", a["plan"])
        # handles posted with their version: one request less before the first bucket moves
        hids = [self.post_handle({"client_id": a["client_id"], "model": model, "version": v,
                                  "payload": h["payload"], "consumers": h["consumers"],
                                  "ttl": None, "handle_id": h["handle_id"]})["handle_id"]
                for h in handles]
        # A small plan (a delta's) and small handles ride in the version event: subscribers
        # skip the requests for them (Note [One update] in hotweights/replicate.py).
        inline = {}
        if (self.s.inline_payloads and a["plan"] is not None
                and len(a["plan"]) <= INLINE_PLAN_BYTES):
            inline["plan"] = a["plan"]
        if hids and self.s.inline_payloads:
            views = [{**self._view_handle(self.handles[hid], now),
                      "consumers": self.handles[hid]["consumers"]}
                     for hid in hids if hid in self.handles]
            if views and len(pack(views)) <= INLINE_HANDLE_BYTES:
                inline["handles"] = views
        self._event(model, "version", version=v, label=a["label"], parent=a["parent"],
                    publisher=a["client_id"], expected=expected, **inline)
        self.count("versions.published")
        self._trim(model)
        self._evaluate(rec)
        return {"version": v, "handles": hids} if hids else {"version": v}

    def _trim(self, model: str) -> None:
        """Bounds history: old version records and, sooner, their manifests and plans."""
        m, vs = self.models[model], self.versions[model]
        for v in list(vs):
            rec = vs[v]
            if rec["state"] == "transferring" or v == m["current"]:
                continue
            if v <= m["vseq"] - self.s.keep_versions:
                del vs[v]
                self.batch.delete("version", f"{v}:{model}")
                if rec.get("idempotency_key"):
                    self.idem.pop((model, rec["idempotency_key"]), None)
                if not rec["manifest_trimmed"]:
                    self.batch.put_blob(f"manifest:{v}:{model}", None)
                    self.batch.put_blob(f"plan:{v}:{model}", None)
            elif v <= m["vseq"] - self.s.keep_manifests and not rec["manifest_trimmed"]:
                rec["manifest_trimmed"] = True
                self.batch.put_blob(f"manifest:{v}:{model}", None)
                self.batch.put_blob(f"plan:{v}:{model}", None)
                self._put_version(rec)

    def version(self, a: dict) -> dict:
        """A version's record (latest when ``version`` is None)."""
        return self._view_version(self._version(a["model"], a["version"]))

    def current(self, a: dict) -> int | None:
        """The latest committed version of a model, or None."""
        m = self.models.get(a["model"])
        return None if m is None else m["current"]

    def _blob(self, kind: str, a: dict) -> bytes | None:
        rec = self._version(a["model"], a["version"])
        if kind == "plan" and not rec["has_plan"]:
            return None
        if rec["manifest_trimmed"]:
            raise _err("unknown_version", f"the {kind} of version {rec['version']} of model "
                                          f"{a['model']!r} was dropped (the coordinator keeps the "
                                          f"last {self.s.keep_manifests} and the current one)")
        data = self.backend.get_blob(f"{kind}:{rec['version']}:{a['model']}")
        if data is None:
            raise _err("internal", f"the {kind} of version {rec['version']} of model "
                                   f"{a['model']!r} is missing from {self.backend.describe()}")
        return data

    def manifest(self, a: dict) -> bytes:
        """The manifest bytes of a version."""
        return self._blob("manifest", a)

    def plan(self, a: dict) -> bytes | None:
        """The plan bytes of a version, or None when it has none."""
        return self._blob("plan", a)

    def progress(self, a: dict) -> dict:
        """Records a client's transfer progress (informational)."""
        rec = self._client(a["client_id"])
        vrec = self._version(a["model"], a["version"])
        rec["progress"] = {"version": vrec["version"], "buckets": a["buckets"],
                           "bytes": a["bytes"], "at": time.time()}
        if vrec["state"] == "transferring" and rec["role"] == "subscriber":
            rec["state"] = "receiving"
        self._put_client(rec)
        return {"state": vrec["state"]}

    def precommit(self, a: dict) -> dict:
        """A subscriber holds every bucket of the version, verified."""
        rec = self._member(a["client_id"], a["model"], "subscriber", "precommit")
        vrec = self._version(a["model"], a["version"])
        cid = rec["client_id"]
        self._check_precommit(vrec, cid)
        if cid not in vrec["precommitted"]:
            vrec["precommitted"].append(cid)
            self._put_version(vrec)
            rec["state"] = "precommitted"  # (behind clears when it commits: _hold)
            self._put_client(rec)
            self._event(a["model"], "precommit", version=vrec["version"], client_id=cid)
            self._evaluate(vrec)
            if vrec["state"] == "committed":  # (a late vote on a committed version)
                self._hold(vrec, cid)
        return {"state": vrec["state"]}

    @staticmethod
    def _check_precommit(vrec: dict, cid: str) -> None:
        if vrec["state"] == "aborted":
            raise _err("bad_state", f"precommit: version {vrec['version']} of model "
                                    f"{vrec['model']!r} was aborted ({vrec['reason']})")
        if cid in vrec["rejected"]:
            raise _err("bad_state", f"precommit: client {cid!r} rejected version "
                                    f"{vrec['version']} earlier")
        if cid not in vrec["expected"]:  # its vote would count for a quorum it is not in
            raise _err("bad_state", f"precommit: client {cid!r} is not expected for version "
                                    f"{vrec['version']} of model {vrec['model']!r} (it "
                                    "registered after the publish; a catch-up serves it)")

    def reject(self, a: dict) -> dict:
        """A subscriber refuses the version; it leaves the quorum and keeps its old version."""
        rec = self._member(a["client_id"], a["model"], "subscriber", "reject")
        vrec = self._version(a["model"], a["version"])
        cid = rec["client_id"]
        if cid not in vrec["rejected"]:
            vrec["rejected"][cid] = a["reason"]
            if cid in vrec["precommitted"]:
                vrec["precommitted"].remove(cid)
            self._put_version(vrec)
            rec["state"], rec["behind"] = "rejected", False  # refusals are not retried
            if rec.get("holds") == vrec["version"]:  # refused after its vote: not held
                rec["holds"] = rec["version"]
            self._put_client(rec)
            self._event(a["model"], "reject", version=vrec["version"], client_id=cid,
                        reason=a["reason"])
            self._evaluate(vrec)
            for h in list(self.handles_by_model[a["model"]].values()):
                if h["version"] == vrec["version"] and cid in h["consumers"]:
                    self._maybe_release(h)
        return {"state": vrec["state"]}

    def abort(self, a: dict) -> dict:
        """Aborts a transferring version (publishers of the model only)."""
        self._member(a["client_id"], a["model"], "publisher", "abort")
        vrec = self._version(a["model"], a["version"])
        if vrec["state"] == "committed":
            raise _err("bad_state", f"abort: version {vrec['version']} of model {a['model']!r} "
                                    "is already committed")
        if vrec["state"] == "transferring":
            self._abort(vrec, a["reason"] or f"aborted by {a['client_id']}")
        return {"state": vrec["state"]}

    def applied(self, a: dict) -> dict:
        """A subscriber swapped to this (committed) version; ``behind``: it holds nothing newer
        (it dropped or lost what it had staged) and asks for a catch-up - also with no version
        applied at all (``version`` None: the catch-up is a full send)."""
        rec = self._member(a["client_id"], a["model"], "subscriber", "applied")
        cid = rec["client_id"]
        if a["version"] is None:
            if not a["behind"]:
                raise _err("bad_args", "applied: version is required unless behind=True")
            if rec["version"] is not None:
                raise _err("bad_state", f"applied: client {cid!r} has applied version "
                                        f"{rec['version']}; behind=True needs that version")
            vrec, v = None, None
        else:
            vrec = self._version(a["model"], a["version"])
            if vrec["state"] != "committed":
                raise _err("bad_state", f"applied: version {vrec['version']} of model "
                                        f"{a['model']!r} is {vrec['state']}, not committed")
            v = vrec["version"]
            rec["version"], rec["state"] = v, "applied"
        held = rec.get("holds")
        if a["behind"]:
            rec["behind"], rec["holds"] = True, v
        else:
            # an older staged version applied late keeps the request (it cannot cover a newer
            # one); holds never goes back
            current = self.models[a["model"]]["current"]
            rec["behind"] = bool(rec.get("behind")) and (current is None or v < current)
            rec["holds"] = v if held is None or held < v else held
        self._put_client(rec)
        if vrec is not None and cid not in vrec["applied"]:
            vrec["applied"].append(cid)
            self._put_version(vrec)
            self._event(a["model"], "applied", version=v, client_id=cid)
        if a["behind"]:  # publishers serve it a catch-up (replicate.py, Note [Delta base])
            self._event(a["model"], "client", action="behind", client_id=cid, role=rec["role"],
                        node=rec["node"], device=rec["device"], version=v)
        return {"state": vrec["state"] if vrec is not None else None}

    def _evaluate(self, vrec: dict) -> None:
        """Commits (or aborts) a transferring version whose quorum question is settled."""
        if vrec["state"] != "transferring":
            return
        req = self.required(vrec)
        if not req:
            if vrec["rejected"] and not any(self._live(c, vrec["model"])
                                            for c in vrec["precommitted"]):
                self._abort(vrec, "rejected by every live expected subscriber")
            else:
                self._commit(vrec)
            return
        q = vrec["quorum"]
        if q == "all":
            need = len(req)
        elif isinstance(q, int):
            need = min(q, len(req))
        else:  # the epsilon keeps ceil(0.7 * 10) at 7 despite binary floating point
            need = max(1, math.ceil(q * len(req) - 1e-9))
        req_set = set(req)
        have = sum(1 for c in vrec["precommitted"] if c in req_set)
        if have >= need:
            self._commit(vrec)

    def _commit(self, vrec: dict) -> None:
        model, v = vrec["model"], vrec["version"]
        m = self.models[model]
        vrec["state"], vrec["committed_at"] = "committed", time.time()
        self._put_version(vrec)
        m["current"] = v if m["current"] is None else max(m["current"], v)
        self._put_model(m)
        self._event(model, "commit", version=v, precommitted=list(vrec["precommitted"]))
        self.count("versions.committed")
        for cid in vrec["precommitted"]:
            self._hold(vrec, cid)
        # An older version still in flight can never become current any more.
        for older in list(self.versions[model].values()):
            if older["version"] < v and older["state"] == "transferring":
                self._abort(older, f"superseded by version {v}")

    def _hold(self, vrec: dict, cid: str) -> None:
        """A subscriber whose precommitted version committed holds it (staged or applied): the
        next delta for it is planned from it (Note [Delta base] in replicate.py), and a
        catch-up it asked for is served."""
        rec = self.clients.get(cid)
        v = vrec["version"]
        if rec is None or rec["model"] != vrec["model"] or rec["role"] != "subscriber":
            return  # (re-registered for another model meanwhile)
        if rec.get("holds") is None or rec["holds"] < v:
            rec["holds"], rec["behind"] = v, False
            self._put_client(rec)

    def _abort(self, vrec: dict, reason: str) -> None:
        vrec["state"], vrec["reason"], vrec["ended_at"] = "aborted", reason, time.time()
        self._put_version(vrec)
        self._event(vrec["model"], "abort", version=vrec["version"], reason=reason)
        self.count("versions.aborted")
        for h in list(self.handles_by_model[vrec["model"]].values()):
            if h["version"] == vrec["version"]:
                self._release(h, "aborted")

    # --- handles -------------------------------------------------------------------------------

    def post_handle(self, a: dict) -> dict:
        """Posts a handle for the consumers of a version, with a lease."""
        owner = self._client(a["client_id"])
        vrec = self._version(a["model"], a["version"])
        if vrec["state"] == "aborted":
            raise _err("bad_state", f"post_handle: version {vrec['version']} of model "
                                    f"{a['model']!r} was aborted ({vrec['reason']})")
        hid = a["handle_id"] or new_id()
        old = self.handles.get(hid)
        if old is not None:
            if old["owner"] != owner["client_id"]:
                raise _err("conflict", f"post_handle: handle {hid!r} is held by "
                                       f"{old['owner']!r}")
            return {"handle_id": hid, "seq": old["seq"], "duplicate": True,
                    "expires_in": round(old["expires_at"] - time.time(), 3)}
        if len(self.handles) >= self.s.max_handles:
            raise _err("too_many_handles", f"{len(self.handles)} handles are live (limit "
                                           f"{self.s.max_handles})")
        if a["consumers"] is None:
            consumers = self.required(vrec) if vrec["state"] == "transferring" else [
                c for c, r in self.clients.items() if self._live(c, a["model"])]
        else:
            consumers = list(dict.fromkeys(a["consumers"]))
            unknown = [c for c in consumers if c not in self.clients]
            if unknown:
                raise _err("bad_args", f"post_handle: consumer {unknown[0]!r} is not registered")
        ttl = a["ttl"] if a["ttl"] is not None else self.s.handle_ttl
        m = self.models[a["model"]]
        m["hseq"] += 1
        self._put_model(m)
        now = time.time()
        h = {"handle_id": hid, "owner": owner["client_id"], "model": a["model"],
             "version": vrec["version"], "payload": a["payload"], "consumers": consumers,
             "acked": [], "errors": {}, "seq": m["hseq"], "created": now, "ttl": ttl,
             "expires_at": now + ttl}
        self.handles[hid] = h
        self.handles_by_model[a["model"]][hid] = h
        self._put_handle(h)
        self._event(a["model"], "handle", action="posted", handle_id=hid, owner=h["owner"],
                    version=h["version"], handle_seq=h["seq"], consumers=consumers)
        self.count("handles.posted")
        self.woken_models.add(a["model"])
        self._maybe_release(h)
        return {"handle_id": hid, "seq": h["seq"], "expires_in": ttl}

    def get_handles(self, a: dict) -> dict:
        """Handles for this consumer, not yet answered by it, not expired, after ``after``."""
        cid = self._client(a["client_id"])["client_id"]
        m = self.models.get(a["model"])
        if m is None:
            return {"handles": [], "last": a["after"]}
        after, truncated = a["after"], False
        if after > m["hseq"]:  # a cursor from a previous coordinator without persistent state
            after, truncated = 0, True
        now = time.time()
        out = []
        for h in self.handles_by_model[a["model"]].values():
            if (h["seq"] > after and cid in h["consumers"] and cid not in h["acked"]
                    and cid not in h["errors"] and h["expires_at"] > now
                    and (a["version"] is None or h["version"] == a["version"])):
                out.append(h)
        out.sort(key=lambda h: h["seq"])
        last = m["hseq"]
        if len(out) > MAX_BATCH_ITEMS:
            out = out[:MAX_BATCH_ITEMS]
            last = out[-1]["seq"]
        if out:
            self.count("handles.fetched", len(out))
        res = {"handles": [self._view_handle(h, now) for h in out], "last": last}
        if truncated:
            res["truncated"] = True
        return res

    @staticmethod
    def _view_handle(h: dict, now: float) -> dict:
        return {"handle_id": h["handle_id"], "owner": h["owner"], "version": h["version"],
                "payload": h["payload"], "seq": h["seq"],
                "expires_in": round(h["expires_at"] - now, 3)}

    def ack_handle(self, a: dict) -> dict:
        """A consumer is done with a handle (``ok`` False: it failed, ``error`` says why).
        ``precommit``: and it now holds every bucket of the handle's version, verified (the
        precommit request folded into the last ack); the result then carries the version's
        ``state``, or ``precommit_error`` when the version can no longer be precommitted."""
        cid = self._client(a["client_id"])["client_id"]
        h = self.handles.get(a["handle_id"])
        if h is None:
            return {"known": False, "released": True}
        if cid not in h["consumers"]:
            raise _err("forbidden", f"ack_handle: client {cid!r} is not a consumer of handle "
                                    f"{a['handle_id']!r}")
        precommit, refused = a["precommit"] and a["ok"], None
        if precommit:  # validated before anything changes
            self._member(cid, h["model"], "subscriber", "ack_handle with precommit")
            try:
                self._check_precommit(self._version(h["model"], h["version"]), cid)
            except CoordinatorError as e:
                if e.code != "bad_state":
                    raise
                refused = e.message
        if a["ok"]:
            if cid not in h["acked"]:
                h["acked"].append(cid)
                h["errors"].pop(cid, None)
                self.count("handles.acked")
        elif cid not in h["errors"]:
            h["errors"][cid] = a["error"] or "nack"
            if cid in h["acked"]:
                h["acked"].remove(cid)
            self.count("handles.nacked")
        self._put_handle(h)
        self.woken_models.add(h["model"])
        out = {"known": True, "released": self._maybe_release(h)}
        if refused is not None:
            out["precommit_error"] = refused
        elif precommit:
            out.update(self.precommit({"client_id": cid, "model": h["model"],
                                       "version": h["version"]}))
        return out

    def _refused(self, h: dict) -> dict:
        """Consumers that rejected the handle's version: they will never take the handle."""
        vrec = self.versions.get(h["model"], {}).get(h["version"])
        return vrec["rejected"] if vrec is not None else {}

    def _maybe_release(self, h: dict) -> bool:
        if h["handle_id"] not in self.handles:
            return True
        answered = set(h["acked"])
        answered.update(h["errors"])
        answered.update(self._refused(h))  # consumers that rejected the version never answer
        if any(c not in answered and self._alive(c) for c in h["consumers"]):
            return False
        self._release(h, "nacked" if h["errors"] else "acked")
        return True

    def _alive(self, cid: str) -> bool:
        rec = self.clients.get(cid)
        return rec is not None and rec["alive"]

    def _remove_handle(self, h: dict) -> None:
        del self.handles[h["handle_id"]]
        del self.handles_by_model[h["model"]][h["handle_id"]]
        self.batch.delete("handle", h["handle_id"])
        self.woken_models.add(h["model"])

    def _release(self, h: dict, reason: str) -> None:
        self._remove_handle(h)
        owner = h["owner"]
        entry = {"handle_id": h["handle_id"], "model": h["model"], "version": h["version"],
                 "reason": reason, "acked": list(h["acked"]),
                 "missing": [c for c in h["consumers"] if c not in h["acked"]
                             and c not in h["errors"] and c not in self._refused(h)],
                 "errors": dict(h["errors"]), "ts": time.time()}
        if owner in self.clients:
            seq = self.rseq.get(owner, 0) + 1
            self.rseq[owner] = seq
            entry["seq"] = seq
            log = self.released_log.setdefault(
                owner, collections.deque(maxlen=self.s.released_log_len))
            log.append(entry)
            self.batch.append("released", owner, entry, self.s.released_log_len)
            self.batch.put("meta", f"rseq:{owner}", seq)
            self.woken_owners.add(owner)
        self._event(h["model"], "handle", action="released", handle_id=h["handle_id"],
                    owner=owner, version=h["version"], reason=reason)
        self.count("handles.released")
        if reason == "expired":
            self.count("handles.expired")

    def _drop_handle(self, h: dict) -> None:
        self._remove_handle(h)
        self._event(h["model"], "handle", action="dropped", handle_id=h["handle_id"],
                    owner=h["owner"], version=h["version"])
        self.count("handles.dropped")

    def released(self, a: dict) -> dict:
        """The owner's released handles after ``after`` (it may reuse their memory)."""
        owner = self._client(a["client_id"])["client_id"]
        log = self.released_log.get(owner)
        last = self.rseq.get(owner, 0)
        after, truncated = a["after"], False
        if after > last:
            after, truncated = 0, True
        items: list = []
        if log:
            first = log[0]["seq"]
            if after < first - 1:
                truncated = True
            start = max(after - first + 1, 0)
            items = list(itertools.islice(log, start, start + MAX_BATCH_ITEMS))
        # each with its version's state now: an owner that sees "committed" with its last
        # release needs no version() request (Note [One update] in hotweights/replicate.py)
        items = [{**it, "version_state": self.versions.get(it["model"], {}).get(
            it["version"], {}).get("state")} for it in items]
        res = {"released": items, "last": items[-1]["seq"] if items else last}
        if truncated:
            res["truncated"] = True
        return res

    # --- events --------------------------------------------------------------------------------

    def events_since(self, a: dict) -> dict:
        """Events of a model after ``after`` (``truncated`` when older ones were trimmed)."""
        m = self.models.get(a["model"])
        if m is None:
            return {"events": [], "last": 0}
        log = self.events[a["model"]]
        after, truncated = a["after"], False
        if after > m["eseq"]:
            after, truncated = 0, True
        items: list = []
        if log:
            first = log[0]["seq"]
            if after < first - 1:
                truncated = True
            start = max(after - first + 1, 0)
            items = list(itertools.islice(log, start, start + MAX_BATCH_ITEMS))
        res = {"events": items, "last": items[-1]["seq"] if items else m["eseq"]}
        if truncated:
            res["truncated"] = True
        return res

    # --- timers --------------------------------------------------------------------------------

    def tick(self) -> None:
        """Deaths, purges, handle expiries, version timeouts, quorum re-evaluation."""
        mono, wall = time.monotonic(), time.time()
        for cid, rec in list(self.clients.items()):
            if cid not in self.clients:
                continue
            if rec["alive"] and mono - self.seen.get(cid, mono) > self.s.dead_after_s:
                self._mark_dead(rec)
            elif (not rec["alive"] and rec.get("dead_at") is not None
                  and wall - rec["dead_at"] > self.s.purge_dead_after_s):
                self._leave(rec, "purged")
        for h in [h for h in self.handles.values() if h["expires_at"] <= wall]:
            if h["handle_id"] in self.handles:
                self._release(h, "expired")
        for vs in self.versions.values():
            for vrec in list(vs.values()):
                if vrec["state"] != "transferring":
                    continue
                if wall > vrec["deadline"]:
                    self._abort(vrec, "timeout")
                else:
                    self._evaluate(vrec)
        if self.left_models:
            self._forget_empty_models()
        self.flush_counters()

    def _forget_empty_models(self) -> None:
        """Drops models nobody uses and nothing was ever published to (registrations under
        names that are gone): their records and event logs would otherwise grow forever.
        A model with a version keeps its history (a later publisher continues from it). Only
        models a client left since the last pass are looked at."""
        left, self.left_models = self.left_models, set()
        used = {c["model"] for c in self.clients.values()}
        for name in [n for n in left if n in self.models and not self.models[n]["vseq"]
                     and n not in used and not self.handles_by_model.get(n)]:
            for d in (self.models, self.versions, self.handles_by_model, self.events):
                d.pop(name, None)
            self.batch.delete("model", name)
            self.batch.drop_list("events", name)

    def _mark_dead(self, rec: dict) -> None:
        rec["alive"], rec["state"], rec["dead_at"] = False, "dead", time.time()
        self._put_client(rec)
        self._event(rec["model"], "client", action="dead", client_id=rec["client_id"],
                    role=rec["role"], node=rec["node"], device=rec["device"])
        self.count("clients.dead")
        self._settle_departure(rec, "publisher died", f"subscriber {rec['client_id']} died",
                               abort_on_dead=self.s.on_dead == "abort")

    # --- status --------------------------------------------------------------------------------

    def gauges(self) -> dict:
        """Current levels (not counters)."""
        return {"clients": len(self.clients),
                "subscribers_live": sum(1 for r in self.clients.values()
                                        if r["alive"] and r["role"] == "subscriber"),
                "handles_active": len(self.handles),
                "versions_transferring": sum(1 for vs in self.versions.values()
                                             for r in vs.values()
                                             if r["state"] == "transferring")}

    def status(self, a: dict, recent_versions: int = 10) -> dict:
        """Models, versions, subscribers with lag, handles with remaining lease, counters."""
        mono, wall = time.monotonic(), time.time()
        models = {}
        for name, m in self.models.items():
            if a["model"] is not None and name != a["model"]:
                continue
            cur = m["current"]
            vs = list(self.versions[name].values())[-recent_versions:]
            clients = []
            for r in self.clients.values():
                if r["model"] != name:
                    continue
                lag = None
                if r["role"] == "subscriber" and cur is not None:
                    lag = cur - (r["version"] or 0)
                clients.append({
                    "client_id": r["client_id"], "role": r["role"], "node": r["node"],
                    "device": r["device"], "alive": r["alive"], "state": r["state"],
                    "version": r["version"], "lag": lag,
                    "last_seen_ago_s": round(mono - self.seen.get(r["client_id"], mono), 3),
                    "progress": r["progress"],
                    # Capabilities may hold IPC handles: status shows only their names.
                    "capabilities": sorted(map(str, r["capabilities"]))})
            handles = [{"handle_id": h["handle_id"], "owner": h["owner"], "version": h["version"],
                        "seq": h["seq"], "consumers": len(h["consumers"]),
                        "acked": len(h["acked"]), "nacked": len(h["errors"]),
                        "expires_in": round(h["expires_at"] - wall, 3)}
                       for h in self.handles_by_model[name].values()]
            models[name] = {
                "current": cur, "latest": m["vseq"] or None, "event_seq": m["eseq"],
                "versions": [{"version": r["version"], "state": r["state"], "label": r["label"],
                              "age_s": round(wall - r["created"], 3),
                              "expected": len(r["expected"]),
                              "required": len(self.required(r))
                              if r["state"] == "transferring" else None,
                              "precommitted": len(r["precommitted"]),
                              "rejected": len(r["rejected"]), "applied": len(r["applied"]),
                              "reason": r["reason"]} for r in vs],
                "clients": clients, "handles": handles}
        return {"models": models, "counters": dict(sorted(self.counters.items())),
                "gauges": self.gauges()}
