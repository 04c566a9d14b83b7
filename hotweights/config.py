# SPDX-License-Identifier: Apache-2.0
"""Every ``HOTWEIGHTS_*`` setting, read once into one typed, validated :class:`Config`.

Explicit arguments beat environment variables: ``load(ipc_copy_streams=4)`` overrides
``HOTWEIGHTS_IPC_COPY_STREAMS``. A bad value raises :class:`ConfigError` naming the variable,
the value and what was expected. ``settings()`` lists them all (the README table and
``hotweights config`` are generated from it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import socket
import threading
from typing import Any, Callable, Mapping

__all__ = ["Config", "ConfigError", "Setting", "load", "get", "reset", "settings"]


class ConfigError(ValueError):
    """A HOTWEIGHTS_* setting (or an explicit override) has a bad value."""


# --- parsers: each takes the raw string and returns the typed value or raises ValueError ---

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s.strip(), 10)  # "010" is ten; "0x40" is not an integer here
        except ValueError:
            raise ValueError("expected an integer (decimal digits)") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"expected an integer in [{lo}, {hi if hi is not None else 'inf'}]")
        return v

    parse.__doc__ = f"int in [{lo}, {hi}]"
    return parse


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.I)
_SIZE_MULT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(s: str) -> int:
    m = _SIZE_RE.match(s)
    if not m:
        raise ValueError("expected a byte count such as 0, 1048576, 512MiB or 2GiB")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _SIZE_MULT[unit]


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s.strip())
        except ValueError:
            raise ValueError("expected a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ValueError(f"expected a number {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise ValueError(f"expected a number <= {hi}")
        return v

    return parse


def _spin(s: str) -> int | str:
    v = s.strip().lower()
    if v == "auto":
        return v
    try:
        n = int(v, 0)
    except ValueError:
        raise ValueError("expected auto or microseconds in [0, 100000]") from None
    if not 0 <= n <= 100000:
        raise ValueError("expected auto or microseconds in [0, 100000]")
    return n


# HOTWEIGHTS_SPIN_US=auto: spin this long where the host has cores to spare (a 2-core VM has
# none: a spinning waiter there takes the core the copy it waits for needs)
SPIN_AUTO_US, SPIN_AUTO_MIN_CORES = 100, 8


@functools.lru_cache(maxsize=1)
def _cores() -> int:
    """Cores this process may use: its affinity, lowered by a cgroup v2 CPU quota (a container
    limited to 2 CPUs on a 128-core host has 2), read once."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def _choice(*options: str) -> Callable[[str], str]:
    def parse(s: str) -> str:
        v = s.strip().lower()
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v

    return parse


def _str(s: str) -> str:
    return s


def _opt_str(s: str) -> str | None:
    return s if s.strip() else None


def _redis_url(s: str) -> str:
    if not re.match(r"^(redis|rediss|unix)://", s.strip()):
        raise ValueError("expected a redis:// URL such as redis://127.0.0.1:6379/0")
    return s.strip()


def _endpoint(s: str) -> str | None:
    s = s.strip()
    if not s:
        return None
    for ep in s.split(","):
        if not re.match(r"^(tcp|ipc|inproc)://\S+$", ep.strip()):
            raise ValueError(
                "expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555 "
                "(several, comma-separated, for failover)"
            )
    return s


def _quorum(s: str) -> str | int | float:
    v = s.strip().lower()
    if v == "all":
        return "all"
    try:
        if re.fullmatch(r"\d+", v):
            n = int(v)
            if n >= 1:
                return n
        else:
            f = float(v)
            if 0.0 < f <= 1.0:
                return f
    except ValueError:
        pass
    raise ValueError("expected 'all', a count >= 1, or a fraction in (0, 1]")


def _head_map(s: str) -> tuple[int, ...] | None:
    if not s.strip():
        return None
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected a JSON list of KV-head indices ({e.msg})") from None
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError("expected a JSON list of integers, e.g. [1, 0, 3, 2]")
    return tuple(v)


def _gds(s: str) -> str:
    v = s.strip().lower()
    if v in _TRUE:
        return "on"
    if v in _FALSE:
        return "off"
    if v == "require":
        return "require"
    raise ValueError("expected 0, 1 or require")


def _bind_addr(s: str) -> str:
    v = s.strip()
    if not v or not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]+", v):
        raise ValueError("expected an address to listen on, such as 127.0.0.1 or 0.0.0.0")
    return v


def _log_level(s: str) -> str:
    v = s.strip().upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return v


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its field name, environment variable, default, parser and meaning."""

    field: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    doc: str
    group: str
    secret: bool = False


def _s(field, default, parse, doc, group, secret=False):
    return Setting(field, "HOTWEIGHTS_" + field.upper(), default, parse, doc, group, secret)


_SETTINGS: tuple[Setting, ...] = (
    # copy engine
    _s("ipc_copy_chunk_mb", 16, _int(1, 4096), "Chunk size (MiB) of the multi-stream copy engine.", "copy"),
    _s("ipc_copy_streams", 2, _int(1, 32), "CUDA streams (CPU: worker threads) per copy engine.", "copy"),
    _s("spin_us", "auto", _spin, "How long (us) a thread waiting for a CUDA copy or a doorbell word polls before it sleeps; auto = 100 where the process may use 8 or more cores (affinity, cgroup quota), else 0.", "copy"),
    _s("ipc_copy_autotune", False, _bool, "Pick chunk size and streams from the link between source and destination; explicit CHUNK_MB/STREAMS win.", "copy"),
    # window
    _s("ipc_inflight_buckets", 4, _int(1, 1024), "Base in-flight window (buckets).", "window"),
    _s("ipc_inflight_bytes", 0, _bytes, "Cap on bytes in flight (0 = off); accepts 512MiB, 2GiB.", "window"),
    _s("ipc_adapt", True, _bool, "Adapt the window from measured bucket times (off: fixed base window).", "window"),
    _s("ipc_min_inflight", 1, _int(1, 1024), "Smallest window the controller may choose.", "window"),
    _s("ipc_max_inflight", 8, _int(1, 1024), "Largest window the controller may choose (also the slot count of a ring).", "window"),
    _s("ipc_target_bucket_ms", 250.0, _float(0, None, lo_open=True), "Bucket service-time budget (ms): above it the window shrinks.", "window"),
    _s("bucket_mb", 64, _int(1, 1 << 20), "Bucket (slot) size in MiB for plans and slot rings.", "window"),
    _s("direct_read", "auto", _choice("auto", "on", "off"), "Same-node CPU subscribers copy straight from the publisher's tensors (moved once into shared memory) instead of through the slot ring; on = require it, off = always the ring.", "window"),
    _s("doorbell", True, _bool, "Same-node subscribers of a ring take its buckets and ack them through a doorbell in shared memory instead of the coordinator (which keeps versions, votes and liveness); off = every bucket through the coordinator.", "window"),
    # coordinator
    _s("coord_endpoint", None, _endpoint, "Coordinator endpoint(s), e.g. tcp://127.0.0.1:5555; unset = embedded in-process coordinator.", "coordinator"),
    _s("coord_backend", "memory", _choice("memory", "redis"), "Coordinator state backend.", "coordinator"),
    _s("redis_url", "redis://127.0.0.1:6379/0", _redis_url, "Redis URL for the redis backend.", "coordinator"),
    _s("coord_token", None, _opt_str, "Shared secret: mutating requests carry an HMAC of it (the token never travels).", "coordinator", secret=True),
    _s("handle_ttl", 45.0, _float(0, None, lo_open=True), "Lease (s) of a posted handle; acks by every consumer release it early.", "coordinator"),
    _s("heartbeat_s", 1.0, _float(0, None, lo_open=True), "Client heartbeat period (s).", "coordinator"),
    _s("dead_after_s", 5.0, _float(0, None, lo_open=True), "A client whose heartbeats stop for this long is dead.", "coordinator"),
    _s("quorum", "all", _quorum, "Commit quorum: all live subscribers, a count, or a fraction.", "coordinator"),
    _s("on_dead", "commit", _choice("commit", "abort"), "When an expected subscriber dies mid-version: commit the rest, or abort.", "coordinator"),
    _s("version_timeout_s", 300.0, _float(0, None, lo_open=True), "A version not committed within this time is aborted.", "coordinator"),
    _s("request_timeout_s", 5.0, _float(0, None, lo_open=True), "Timeout (s) of one coordinator request attempt.", "coordinator"),
    _s("request_retries", 3, _int(0, 100), "Retries of a coordinator request before it fails.", "coordinator"),
    _s("leader_lease_s", 5.0, _float(0, None, lo_open=True), "Redis leader lease of a coordinator (HA takeover time).", "coordinator"),
    # transports
    _s("transport", "auto", _choice("auto", "mpi", "ucx", "torch", "local"), "Inter-node transport (auto: MPI > UCX > torch.distributed).", "transport"),
    _s("node_id", None, _opt_str, "Node identity for the hierarchy (default: the hostname).", "transport"),
    _s("ucx_host", None, _opt_str, "Address the UCX transport advertises to other nodes (default: the hostname's address, or the interface that reaches the coordinator when that is a loopback).", "transport"),
    # training
    _s("opt_policy", "preserve", _choice("preserve", "reset", "attenuate", "reset_step"), "Optimizer-state policy for changed parameters at commit.", "training"),
    _s("opt_attenuation", 0.5, _float(0, 1, lo_open=True), "Factor for opt_policy=attenuate (scales the first moment).", "training"),
    _s("opt_warmup_steps", 0, _int(0, 1_000_000), "LR ramp (steps) for parameters whose optimizer state a commit resets; 0 = none.", "training"),
    # KV cache
    _s("kv_head_order", "grouped", _choice("grouped", "interleaved"), "Query-to-KV head assignment of the model.", "kv"),
    _s("kv_head_map", None, _head_map, "Inline JSON KV-head permutation, e.g. [1,0,3,2].", "kv"),
    _s("kv_head_map_file", None, _opt_str, "File holding the JSON KV-head permutation.", "kv"),
    _s("kv_allow_transforms", False, _bool, "Allow conservative KV transforms (head remap, RoPE, FP8 requant) instead of invalidating.", "kv"),
    # storage
    _s("use_gds", "off", _gds, "GPUDirect Storage for checkpoint reads: 0, 1 (prefer), require.", "storage"),
    _s("storage_reader", "auto", _choice("auto", "posix", "mmap"), "Checkpoint reader when GDS is not used: auto (double-buffered posix_pinned, else mmap), posix or mmap.", "storage"),
    _s("storage_bounce_mb", 32, _int(1, 4096), "Size (MiB) of each checkpoint-reader bounce buffer.", "storage"),
    _s("storage_threads", 2, _int(1, 64), "Reader threads of the posix reader (two bounce buffers each).", "storage"),
    _s("storage_odirect", True, _bool, "O_DIRECT reads where the filesystem allows them (0: always buffered, e.g. network filesystems).", "storage"),
    # observability
    _s("metrics_port", 0, _int(0, 65535), "Prometheus exporter port (+ local rank); 0 = off in library use.", "observability"),
    _s("metrics_addr", "127.0.0.1", _bind_addr, "Address the Prometheus exporter listens on (0.0.0.0: every interface, for a remote Prometheus).", "observability"),
    _s("log_level", "WARNING", _log_level, "Log level of the hotweights logger.", "observability"),
)

_BY_FIELD = {s.field: s for s in _SETTINGS}


def settings() -> tuple[Setting, ...]:
    """All settings, in documentation order."""
    return _SETTINGS


def _make_config_class():
    fields = [(s.field, Any, dataclasses.field(default=s.default)) for s in _SETTINGS]
    fields.append(("explicit", frozenset, dataclasses.field(default=frozenset())))
    cls = dataclasses.make_dataclass("Config", fields, frozen=True)
    cls.__doc__ = "Validated hotweights settings (see hotweights.config.settings())."

    def __repr__(self):
        parts = []
        for s in _SETTINGS:
            v = getattr(self, s.field)
            parts.append(f"{s.field}={'***' if (s.secret and v) else v!r}")
        return "Config(" + ", ".join(parts) + ")"

    def as_env(self) -> dict[str, str]:
        """The settings as HOTWEIGHTS_* strings (secrets masked)."""
        out = {}
        for s in _SETTINGS:
            v = getattr(self, s.field)
            if v is None:
                continue
            if s.secret:
                v = "***"
            elif isinstance(v, bool):
                v = "1" if v else "0"
            elif isinstance(v, tuple):
                v = json.dumps(list(v))
            out[s.env] = str(v)
        return out

    cls.__repr__ = __repr__
    cls.as_env = as_env
    cls.bucket_bytes = property(lambda self: self.bucket_mb << 20)
    cls.copy_chunk_bytes = property(lambda self: self.ipc_copy_chunk_mb << 20)
    cls.spin_s = property(lambda self: (
        (SPIN_AUTO_US if _cores() >= SPIN_AUTO_MIN_CORES else 0)
        if self.spin_us == "auto" else self.spin_us) * 1e-6)
    cls.node = property(lambda self: self.node_id or socket.gethostname())
    return cls


Config = _make_config_class()


def _validate(cfg) -> None:
    if cfg.ipc_min_inflight > cfg.ipc_max_inflight:
        raise ConfigError(
            f"HOTWEIGHTS_IPC_MIN_INFLIGHT={cfg.ipc_min_inflight} is larger than "
            f"HOTWEIGHTS_IPC_MAX_INFLIGHT={cfg.ipc_max_inflight}: expected min <= max"
        )
    if cfg.dead_after_s <= cfg.heartbeat_s:
        raise ConfigError(
            f"HOTWEIGHTS_DEAD_AFTER_S={cfg.dead_after_s} must exceed "
            f"HOTWEIGHTS_HEARTBEAT_S={cfg.heartbeat_s} (a client would be dead between beats)"
        )
    if cfg.kv_head_map is not None and cfg.kv_head_map_file is not None:
        raise ConfigError(
            "HOTWEIGHTS_KV_HEAD_MAP and HOTWEIGHTS_KV_HEAD_MAP_FILE are both set: expected one"
        )


def load(env: Mapping[str, str] | None = None, **overrides: Any):
    """Reads settings from ``env`` (default ``os.environ``) and applies explicit overrides.

    Overrides may be typed values or strings; both are validated.
    """
    env = os.environ if env is None else env
    unknown = [k for k in env if k.startswith("HOTWEIGHTS_") and k not in _ENV_NAMES]
    # Build-time and test-only variables are not runtime settings.
    unknown = [k for k in unknown if k not in _NON_RUNTIME_ENV]
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]}={env[unknown[0]]!r}: expected one of "
            f"{', '.join(sorted(_ENV_NAMES))} (see `hotweights config`)"
        )
    values: dict[str, Any] = {}
    explicit = set()
    for s in _SETTINGS:
        raw = env.get(s.env)
        if raw is None:
            continue
        values[s.field] = _parse(s, raw, source=s.env)
        explicit.add(s.field)
    for name, value in overrides.items():
        s = _BY_FIELD.get(name)
        if s is None:
            raise ConfigError(f"unknown setting {name!r}: expected one of {', '.join(_BY_FIELD)}")
        if value is None:
            continue
        values[name] = _parse(s, value, source=f"{name} (argument)")
        explicit.add(name)
    cfg = Config(**values, explicit=frozenset(explicit))
    _validate(cfg)
    return cfg


def _parse(s: Setting, raw: Any, source: str):
    if not isinstance(raw, str):
        raw = json.dumps(list(raw)) if isinstance(raw, (list, tuple)) else (
            ("1" if raw else "0") if isinstance(raw, bool) else str(raw)
        )
    try:
        return s.parse(raw)
    except ValueError as e:
        shown = "***" if s.secret else repr(raw)
        raise ConfigError(f"{source}={shown}: {e}") from None


_ENV_NAMES = frozenset(s.env for s in _SETTINGS)
# Read elsewhere on purpose: the build (setup.py) and the test suite.
_NON_RUNTIME_ENV = frozenset({"HOTWEIGHTS_CUDA", "HOTWEIGHTS_TEST_REDIS_URL"})

_lock = threading.Lock()
_cached = None


def get():
    """The process-wide config from the environment, read once and cached."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = load()
        return _cached


def reset() -> None:
    """Forgets the cached config (tests and long-running tools that change the environment)."""
    global _cached
    with _lock:
        _cached = None
