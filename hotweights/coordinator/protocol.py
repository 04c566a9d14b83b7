# SPDX-License-Identifier: Apache-2.0
"""The coordinator wire protocol: msgpack messages, HMAC authentication, argument validation.

Requests travel client DEALER -> server ROUTER as one frame (a REQ client's empty delimiter is
accepted too)::

    {"v": 1, "id": str, "method": str, "args": map, "client": str|None,
     "ts": float, "nonce": bytes|None, "mac": bytes|None}

Replies are ``{"v", "id", "ok": true, "result"}`` or ``{"v", "id", "ok": false,
"error": {"code", "message"}}``. Notifications go out on PUB as ``[model bytes, event map]``.

Note [Authentication]: when a token is configured, a request carries
``mac = HMAC-SHA256(token, canonical([v, id, method, args, client, ts, nonce]))`` where
``canonical`` is msgpack with every map's keys sorted by their own packed bytes, so that two
encoders that order keys differently still agree. The server rejects a mac that does not verify,
a ``ts`` more than ``MAX_SKEW_S`` away from its clock, and a nonce it has already seen inside that
window (replay). The token itself never travels. Retries of one call keep the request ``id`` but
are signed afresh (new ts and nonce); idempotency comes from client-chosen keys (client_id,
idempotency_key, handle_id), not from replaying a signed message. Methods in ``PUBLIC_METHODS``
only reveal coordination state (versions, events, status without capabilities or payloads) and
are served without a mac; every other method, reads of capabilities, handle payloads,
manifests and plans included, needs one.

msgpack only, never pickle: unknown ext types are refused at decode time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import os
import re
import reprlib
import time
import uuid
from typing import Any, Callable

import msgpack

__all__ = [
    "PROTOCOL_VERSION", "MAX_REQUEST_BYTES", "MAX_SKEW_S", "MAX_WAIT_MS", "METHODS",
    "PUBLIC_METHODS", "MUTATING_METHODS", "LONG_POLL_METHODS", "RETRYABLE_CODES",
    "CoordinatorError", "CoordinatorUnavailable", "ProtocolError", "Request", "MethodSpec",
    "pack", "unpack", "canonical", "compute_mac", "sign_event", "verify_event",
    "encode_request", "decode_request", "encode_reply", "encode_error", "decode_reply",
    "validate_args", "new_id",
]

PROTOCOL_VERSION = 1
# Manifests of large models are megabytes; 64 MiB leaves room and still bounds memory.
MAX_REQUEST_BYTES = 64 << 20
MAX_SKEW_S = 60.0
MAX_WAIT_MS = 60_000
MAX_NAME_LEN = 200
MAX_ID_LEN = 128
MAX_TEXT_LEN = 4096
MAX_DEPTH = 32  # maps and arrays inside one request; the deepest legitimate one is ~6
MAX_META_BYTES = 64 << 10  # a version's free-form meta (kept with its record, re-written per vote)


class CoordinatorError(RuntimeError):
    """The coordinator answered with an error (``code`` says which kind, ``message`` why)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class CoordinatorUnavailable(ConnectionError):
    """No coordinator answered within the timeout and retries (or none is the leader)."""


class ProtocolError(CoordinatorError):
    """A message that cannot be served: malformed, oversized, unauthenticated, bad arguments."""

    def __init__(self, code: str, message: str, req_id: Any = None):
        super().__init__(code, message)
        self.req_id = req_id


# Error codes a client may retry (on the same or the next endpoint) within its time budget.
RETRYABLE_CODES = frozenset({"not_leader", "unavailable"})


# --- msgpack ---------------------------------------------------------------------------------

def _no_ext(code: int, data: bytes):
    raise ValueError(f"msgpack ext type {code} is not accepted")


def pack(obj: Any) -> bytes:
    """msgpack-encodes ``obj`` (bytes stay bytes, str stays str)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decodes one msgpack object; refuses ext types, non str/bytes map keys and trailing data.

    Lengths inside the message are bounded by the message itself (unpackb derives its limits
    from ``len(data)``), so a forged huge length cannot make it allocate more.
    """
    return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext,
                           use_list=True)


def _canon(o: Any) -> Any:
    if isinstance(o, dict):
        items = sorted(((pack(k), k, v) for k, v in o.items()), key=lambda t: t[0])
        return {k: _canon(v) for _, k, v in items}
    if isinstance(o, (list, tuple)):
        return [_canon(x) for x in o]
    return o


def canonical(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` with map keys sorted by their packed form (the HMAC input)."""
    return pack(_canon(obj))


def compute_mac(token: str | bytes, v, req_id, method, args, client, ts, nonce) -> bytes:
    """HMAC-SHA256 of a request's signed fields (Note [Authentication])."""
    key = token.encode() if isinstance(token, str) else token
    return hmac.new(key, canonical([v, req_id, method, args, client, ts, nonce]),
                    hashlib.sha256).digest()


def sign_event(token: str | bytes, event: dict) -> bytes:
    """HMAC-SHA256 of a notification (without its ``mac`` field), so SUB observers can trust it."""
    key = token.encode() if isinstance(token, str) else token
    body = {k: v for k, v in event.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).digest()


def verify_event(token: str | bytes, event: dict) -> bool:
    """Whether a PUB notification carries a valid ``mac`` for ``token``."""
    mac = event.get("mac")
    return isinstance(mac, bytes) and hmac.compare_digest(mac, sign_event(token, event))


def new_id() -> str:
    """A fresh random identifier (request ids, client ids, handle ids, idempotency keys)."""
    return uuid.uuid4().hex


# --- requests and replies --------------------------------------------------------------------

@dataclasses.dataclass
class Request:
    """A decoded, structurally valid request (arguments not yet validated)."""

    v: int
    id: str
    method: str
    args: dict
    client: str | None
    ts: float
    nonce: bytes | None
    mac: bytes | None


def encode_request(method: str, args: dict, *, req_id: str | None = None, client: str | None = None,
                   token: str | bytes | None = None, ts: float | None = None,
                   nonce: bytes | None = None) -> tuple[str, bytes]:
    """Builds (and signs, when ``token`` is given) a request; returns ``(id, bytes)``."""
    req_id = req_id or new_id()
    ts = time.time() if ts is None else ts
    mac = None
    if token:
        nonce = nonce or os.urandom(16)
        mac = compute_mac(token, PROTOCOL_VERSION, req_id, method, args, client, ts, nonce)
    msg = {"v": PROTOCOL_VERSION, "id": req_id, "method": method, "args": args,
           "client": client, "ts": ts, "nonce": nonce, "mac": mac}
    return req_id, pack(msg)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _shown(x: Any, limit: int = 40) -> str:
    r = _REPR.repr(x)  # bounded however deep or large x is
    return r if len(r) <= limit else r[:limit] + "..."


def _tree_problem(obj: Any, limit: int) -> str | None:
    """What is wrong with the shape of a decoded message, or None: maps and arrays nested
    more than ``limit`` levels deep (checked iteratively: a hostile message cannot exhaust the
    Python stack here, nor later in repr or the mac), or a msgpack timestamp (ext type -1,
    which msgpack decodes without calling the ext hook that refuses every other ext type)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            if d > limit:
                return f"request nests maps or arrays more than {limit} levels deep"
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            if d > limit:
                return f"request nests maps or arrays more than {limit} levels deep"
            stack.extend((v, d + 1) for v in o)
        elif isinstance(o, msgpack.Timestamp):
            return "msgpack ext type -1 (timestamp) is not accepted"
    return None


def decode_request(data: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """Decodes and checks the envelope of a request; raises :class:`ProtocolError`."""
    if len(data) > max_bytes:
        raise ProtocolError("too_large", f"request of {len(data)} bytes exceeds the limit of "
                                         f"{max_bytes} bytes")
    try:
        msg = unpack(data)
    except Exception as e:  # msgpack raises several types (ValueError, ExtraData, FormatError...)
        raise ProtocolError("bad_message", f"request is not valid msgpack: "
                                           f"{type(e).__name__}: {_shown(str(e), 80)}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"request must be a msgpack map, got "
                                           f"{type(msg).__name__}")
    bad = _tree_problem(msg, MAX_DEPTH)
    if bad is not None:
        raise ProtocolError("bad_message", bad)
    req_id = msg.get("id")
    if not isinstance(req_id, str) or not (0 < len(req_id) <= MAX_ID_LEN):
        raise ProtocolError("bad_message", f"request 'id' must be a non-empty str of at most "
                                           f"{MAX_ID_LEN} chars, got {_shown(req_id)}")
    v = msg.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError("bad_version", f"protocol version {_shown(v)} is not supported: this "
                                           f"coordinator speaks v={PROTOCOL_VERSION}", req_id)
    unknown = set(msg) - {"v", "id", "method", "args", "client", "ts", "nonce", "mac"}
    if unknown:
        raise ProtocolError("bad_message", f"unknown request fields {sorted(map(str, unknown))}",
                            req_id)
    method, args = msg.get("method"), msg.get("args", {})
    client, ts = msg.get("client"), msg.get("ts")
    nonce, mac = msg.get("nonce"), msg.get("mac")
    if not isinstance(method, str) or not method:
        raise ProtocolError("bad_message", f"request 'method' must be a str, got {_shown(method)}",
                            req_id)
    if not isinstance(args, dict):
        raise ProtocolError("bad_message", f"request 'args' must be a map, got "
                                           f"{type(args).__name__}", req_id)
    if client is not None and (not isinstance(client, str) or len(client) > MAX_ID_LEN):
        raise ProtocolError("bad_message", f"request 'client' must be a str or nil, got "
                                           f"{_shown(client)}", req_id)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise ProtocolError("bad_message", f"request 'ts' must be a number, got {_shown(ts)}",
                            req_id)
    for name, val in (("nonce", nonce), ("mac", mac)):
        if val is not None and (not isinstance(val, bytes) or len(val) > 64):
            raise ProtocolError("bad_message", f"request '{name}' must be bytes (at most 64) or "
                                               f"nil, got {_shown(val)}", req_id)
    # ts keeps its wire type (int or float): the mac is computed over it as sent.
    return Request(v, req_id, method, args, client, ts, nonce, mac)


def encode_reply(req_id: Any, result: Any) -> bytes:
    """A success reply."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result})


def encode_error(req_id: Any, code: str, message: str) -> bytes:
    """An error reply."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "ok": False,
                 "error": {"code": code, "message": message}})


def decode_reply(data: bytes) -> dict:
    """Decodes a reply (client side); raises :class:`ProtocolError` when it is not one."""
    try:
        msg = unpack(data)
    except Exception as e:
        raise ProtocolError("bad_reply", f"reply is not valid msgpack: {e}") from None
    if not isinstance(msg, dict) or "ok" not in msg or "id" not in msg:
        raise ProtocolError("bad_reply", f"reply is not a coordinator reply: {_shown(msg)}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"coordinator speaks protocol v={_shown(msg.get('v'))},"
                                           f" this client v={PROTOCOL_VERSION}")
    return msg


# --- argument validation ---------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,%d}$" % MAX_NAME_LEN)
_ID_RE = re.compile(r"^[A-Za-z0-9._:@+=-]{1,%d}$" % MAX_ID_LEN)
_MISSING = object()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _t_name(x):
    if not isinstance(x, str) or not _NAME_RE.match(x):
        raise ValueError(f"expected a name of 1-{MAX_NAME_LEN} chars from [A-Za-z0-9._:/@+=-]")
    return x


def _t_id(x):
    if not isinstance(x, str) or not _ID_RE.match(x):
        raise ValueError(f"expected an id of 1-{MAX_ID_LEN} chars from [A-Za-z0-9._:@+=-]")
    return x


def _t_text(x):
    if not isinstance(x, str) or len(x) > MAX_TEXT_LEN:
        raise ValueError(f"expected a str of at most {MAX_TEXT_LEN} chars")
    return x


def _t_short(x):
    if not isinstance(x, str) or len(x) > MAX_NAME_LEN:
        raise ValueError(f"expected a str of at most {MAX_NAME_LEN} chars")
    return x


def _t_version(x):
    if not _is_int(x) or not (1 <= x < 1 << 62):
        raise ValueError("expected a version number >= 1")
    return x


def _t_count(x):
    if not _is_int(x) or not (0 <= x < 1 << 62):
        raise ValueError("expected an integer >= 0")
    return x


def _t_wait(x):
    if not _is_int(x) or x < 0:
        raise ValueError(f"expected milliseconds >= 0 (at most {MAX_WAIT_MS} are honoured)")
    return min(x, MAX_WAIT_MS)


def _t_ttl(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError("expected seconds > 0")
    return float(x)


def _t_bool(x):
    if not isinstance(x, bool):
        raise ValueError("expected true or false")
    return x


def _t_bytes(x):
    if not isinstance(x, bytes):
        raise ValueError("expected bytes (msgpack bin)")
    return x


def _t_dict(x):
    if not isinstance(x, dict):
        raise ValueError("expected a map")
    return x


def _t_meta(x):
    _t_dict(x)
    n = len(pack(x))
    if n > MAX_META_BYTES:
        raise ValueError(f"expected a map of at most {MAX_META_BYTES} packed bytes, got {n}")
    return x


def _t_role(x):
    if x not in ("publisher", "subscriber", "observer"):
        raise ValueError("expected one of publisher, subscriber, observer")
    return x


def _t_quorum(x):
    if x == "all":
        return x
    if _is_int(x) and x >= 1:
        return x
    if isinstance(x, float) and 0.0 < x <= 1.0:
        return x
    raise ValueError("expected 'all', a count >= 1 or a fraction in (0, 1]")


def _list_of(item: Callable, max_len: int = 100_000):
    def check(x):
        if not isinstance(x, list) or len(x) > max_len:
            raise ValueError(f"expected a list (at most {max_len} items)")
        out = []
        for i, e in enumerate(x):
            try:
                out.append(item(e))
            except ValueError as err:
                raise ValueError(f"item {i} ({_shown(e)}): {err}") from None
        return out
    return check


def _opt(check: Callable):
    def f(x):
        return None if x is None else check(x)
    return f


def _t_handle(x):
    """A handle posted with its version (publish's ``handles``): payload, consumers, id."""
    if not isinstance(x, dict) or set(x) - {"payload", "consumers", "handle_id"}:
        raise ValueError("expected a map with payload, consumers and handle_id")
    if not isinstance(x.get("payload"), dict):
        raise ValueError(f"its 'payload' is {_shown(x.get('payload'))}, expected a map")
    return {"payload": x["payload"],
            "consumers": _opt(_list_of(_t_id))(x.get("consumers")),
            "handle_id": _opt(_t_id)(x.get("handle_id"))}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method's arguments (name -> (checker, default or required)) and its access class."""

    name: str
    args: dict
    mutating: bool
    public: bool = False
    long_poll: bool = False


def _m(name, mutating, public=False, long_poll=False, **args):
    return MethodSpec(name, args, mutating, public, long_poll)


R = _MISSING  # marks a required argument
METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    _m("ping", False, public=True),
    _m("status", False, public=True, model=(_opt(_t_name), None)),
    _m("version", False, public=True, model=(_t_name, R), version=(_opt(_t_version), None)),
    _m("current", False, public=True, model=(_t_name, R)),
    _m("events", False, public=True, long_poll=True, model=(_t_name, R),
       after=(_t_count, 0), wait_ms=(_t_wait, 0)),
    _m("register", True, role=(_t_role, R), model=(_t_name, R), node=(_t_short, ""),
       device=(_t_short, ""), consumer=(_list_of(_t_text, 10_000), []),
       capabilities=(_t_dict, {}), client_id=(_opt(_t_id), None)),
    _m("heartbeat", True, client_id=(_t_id, R)),
    _m("deregister", True, client_id=(_t_id, R)),
    _m("clients", False, model=(_opt(_t_name), None)),
    _m("get_client", False, client_id=(_t_id, R)),
    _m("publish", True, client_id=(_t_id, R), model=(_t_name, R), manifest=(_t_bytes, R),
       label=(_opt(_t_short), None), parent=(_opt(_t_version), None), plan=(_opt(_t_bytes), None),
       expected=(_opt(_list_of(_t_id)), None), quorum=(_opt(_t_quorum), None),
       meta=(_t_meta, {}), idempotency_key=(_opt(_t_id), None),
       handles=(_opt(_list_of(_t_handle, 256)), None)),
    _m("manifest", False, model=(_t_name, R), version=(_t_version, R)),
    _m("plan", False, model=(_t_name, R), version=(_t_version, R)),
    _m("progress", True, client_id=(_t_id, R), model=(_t_name, R), version=(_t_version, R),
       buckets=(_t_count, 0), bytes=(_t_count, 0)),
    _m("precommit", True, client_id=(_t_id, R), model=(_t_name, R), version=(_t_version, R)),
    _m("reject", True, client_id=(_t_id, R), model=(_t_name, R), version=(_t_version, R),
       reason=(_t_text, "")),
    _m("abort", True, client_id=(_t_id, R), model=(_t_name, R), version=(_t_version, R),
       reason=(_t_text, "")),
    _m("applied", True, client_id=(_t_id, R), model=(_t_name, R),
       version=(_opt(_t_version), None), behind=(_t_bool, False)),
    _m("post_handle", True, client_id=(_t_id, R), model=(_t_name, R), version=(_t_version, R),
       payload=(_t_dict, R), consumers=(_opt(_list_of(_t_id)), None), ttl=(_opt(_t_ttl), None),
       handle_id=(_opt(_t_id), None)),
    _m("get_handles", False, long_poll=True, client_id=(_t_id, R), model=(_t_name, R),
       version=(_opt(_t_version), None), after=(_t_count, 0), wait_ms=(_t_wait, 0)),
    _m("ack_handle", True, client_id=(_t_id, R), handle_id=(_t_id, R), ok=(_t_bool, True),
       error=(_opt(_t_text), None), precommit=(_t_bool, False)),
    _m("released", False, long_poll=True, client_id=(_t_id, R), after=(_t_count, 0),
       wait_ms=(_t_wait, 0)),
)}
del R

PUBLIC_METHODS = frozenset(n for n, s in METHODS.items() if s.public)
MUTATING_METHODS = frozenset(n for n, s in METHODS.items() if s.mutating)
LONG_POLL_METHODS = frozenset(n for n, s in METHODS.items() if s.long_poll)


def validate_args(method: str, args: dict) -> dict:
    """Checks ``args`` against ``METHODS[method]``; returns them with defaults filled in.

    Raises :class:`ProtocolError` ``bad_args`` naming the argument and the bad value.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise ProtocolError("unknown_method", f"unknown method {_shown(method)}; expected one of "
                                              f"{', '.join(sorted(METHODS))}")
    extra = [k for k in args if k not in spec.args]
    if extra:
        raise ProtocolError("bad_args", f"{method}: unknown argument {_shown(extra[0])}; expected "
                                        f"{', '.join(spec.args) or 'none'}")
    out = {}
    for name, (check, default) in spec.args.items():
        if name not in args:
            if default is _MISSING:
                raise ProtocolError("bad_args", f"{method}: missing argument '{name}'")
            # Fresh copies of mutable defaults: handlers may keep them in records.
            out[name] = type(default)() if isinstance(default, (list, dict)) else default
            continue
        try:
            out[name] = check(args[name])
        except ValueError as e:
            raise ProtocolError("bad_args", f"{method}: argument '{name}'={_shown(args[name])}: "
                                            f"{e}") from None
    return out
