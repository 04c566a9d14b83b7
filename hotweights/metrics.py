# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of every hotweights component, and the per-process exporter.

Note [Metrics]
* One module holds every metric (``SPECS``: name, type, labels, unit, meaning); docs/metrics.md
  documents each one and ``dashboards/hotweights.json`` queries them (tests/test_metrics.py
  keeps the three in step). Components do not touch prometheus_client: they call the helpers
  here (``PublisherMetrics``, ``SubscriberMetrics``, ``coordinator_hook``), so a missing
  prometheus_client turns every metric into a no-op (``AVAILABLE`` False, ``UNAVAILABLE_REASON``
  says why) and the library still works.
* Everything is measured where it happens: byte counters add the bytes a copy moved, durations
  come from ``time.perf_counter`` around the work, the window gauges and adjustment counters
  are read from the window controller after each completed bucket (its estimates come from
  measured service times, see docs/design/window.md). Nothing is derived from a nominal link
  speed.
* Naming follows prometheus.io/docs/practices/naming: a ``hotweights_`` prefix, base units
  (``_seconds``, ``_bytes``, ``_ratio`` in [0, 1]), ``_total`` only on counters (declared
  without it: prometheus_client appends it), histograms for durations with buckets around the
  control range (the default bucket budget is 250 ms).
* Labels are bounded: ``rank`` (this process's local rank, or its role: ``coordinator``),
  ``model`` (model names: a deployment has a handful), and small fixed sets (``stage``,
  ``path``, ``direction``, ``reason``, ...). Values outside a fixed set are reported as
  ``other``; a free label (model, method, code) that reaches 100 distinct values in one metric
  maps the rest to ``other`` too. Never a bucket id, handle id or request id.
* Coordinator metrics belong to the group "coordinator": they are registered (served) only once
  a coordinator reports through its hook (``activate``), so processes without one do not show
  a coordinator at 0.
* Multiprocess: one exporter per process, on its own port (``HOTWEIGHTS_METRICS_PORT`` + local
  rank), serving prometheus_client's default registry (so an application that already serves
  that registry, such as vLLM, exposes hotweights' metrics too). Prometheus scrapes each port;
  the ``rank`` label and Prometheus' ``instance`` label tell processes apart. No shared
  directory, no cleanup of dead processes' files, and every metric type works (prometheus'
  multiprocess mode does not support custom collectors or Info). If the host application runs
  prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), the gauges here use
  ``liveall`` so its MultiProcessCollector keeps one series per live process.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import threading
import time
from typing import Any, Iterable

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "MetricsError", "MetricSpec", "SPECS",
           "start_exporter", "stop_exporter", "autostart", "exporter_url", "local_rank",
           "rank", "set_rank", "PublisherMetrics", "SubscriberMetrics", "coordinator_hook",
           "path_label", "abort_reason", "counter", "gauge", "histogram", "activate", "status"]

log = logging.getLogger("hotweights")

try:
    import prometheus_client as _prom

    AVAILABLE = True
    UNAVAILABLE_REASON: str | None = None
except ImportError as _e:  # the library works without it; metrics are no-ops
    _prom = None
    AVAILABLE = False
    UNAVAILABLE_REASON = (f"prometheus_client is not installed ({_e}); install it with "
                          "`pip install 'hotweights[metrics]'`")


class MetricsError(RuntimeError):
    """The exporter cannot start (port in use, bad port or LOCAL_RANK)."""


# --------------------------------------------------------------------------- definitions

OTHER = "other"
MAX_FREE_VALUES = 100  # distinct values of a free label (model, method, code) per metric

# Duration buckets (s). Bucket stages sit around the window's service-time budget
# (HOTWEIGHTS_IPC_TARGET_BUCKET_MS, 250 ms by default) and reach down to the sub-millisecond
# buckets of small models on one host.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)
VERSION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0)

# Fixed label value sets.
STAGES = ("gather", "transfer", "scatter", "verify")
DIRECTIONS = ("up", "down", "probe")
PATHS = ("cpu->cpu", "host->cuda", "cuda->host", "cuda->cuda", "cuda->peer", "node->node")
CHECKS = ("bucket", "tensor", "source")
RETRY_REASONS = ("nacked", "expired", "aborted")
VERSION_RESULTS = ("committed", "aborted")
PHASES = ("manifest", "plan", "stream", "commit_wait")
ABORT_REASONS = ("timeout", "publisher_died", "publisher_left", "subscriber_died",
                 "subscriber_left", "rejected", "checksum", "source_changed", "superseded",
                 "retries_exhausted", "send_failed", "requested", OTHER)
REQUEST_RESULTS = ("ok", "error", "not_leader")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric: its declared name (counters without ``_total``), type, labels (with their
    fixed value sets, None = free), unit and meaning."""

    name: str
    kind: str
    labels: tuple[str, ...]
    values: tuple[tuple[str, ...] | None, ...]
    unit: str
    doc: str
    buckets: tuple[float, ...] | None = None

    @property
    def exposed(self) -> str:
        """The name Prometheus sees (counters get ``_total``)."""
        return self.name + "_total" if self.kind == "counter" else self.name


SPECS: dict[str, MetricSpec] = {}


class _Noop:
    """Stands in for a metric (and its children) when prometheus_client is missing."""

    def labels(self, *a, **k):
        return self

    def inc(self, *a, **k):
        pass

    def set(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass

    def remove(self, *a, **k):
        pass


_NOOP = _Noop()


_groups: dict[str, list] = {}      # group -> metrics registered when the group first reports
_active_groups: set[str] = set()
_groups_lock = threading.Lock()


def _define(kind: str, name: str, doc: str, labels: dict[str, Iterable[str] | None] | None,
            unit: str, buckets=None, group: str | None = None):
    """Declares a metric once; checks the naming rules (a violation is a bug, raised at
    import). A metric of a ``group`` is registered (served) only once ``activate(group)`` ran:
    a process that runs no coordinator does not serve coordinator metrics at 0."""
    labels = dict(labels or {})
    if kind not in ("counter", "gauge", "histogram"):
        raise ValueError(f"metric {name!r}: kind {kind!r}, expected counter, gauge or histogram")
    if not name.startswith("hotweights_") or not name.replace("_", "").isalnum() or \
            name != name.lower():
        raise ValueError(f"metric {name!r}: expected hotweights_<lowercase words>")
    if name.endswith("_total"):
        raise ValueError(f"metric {name!r}: declare counters without _total (prometheus_client "
                         "appends it) and never end another type's name with _total")
    if unit and not name.endswith("_" + unit):
        raise ValueError(f"metric {name!r}: unit {unit!r} must be the name's suffix")
    if kind == "histogram" and unit not in ("seconds", "bytes"):
        raise ValueError(f"metric {name!r}: histograms here measure seconds or bytes")
    if name in SPECS:
        raise ValueError(f"metric {name!r} is defined twice")
    spec = MetricSpec(name, kind, tuple(labels),
                      tuple(None if v is None else tuple(v) for v in labels.values()), unit, doc,
                      tuple(buckets) if buckets else None)
    SPECS[name] = spec
    if not AVAILABLE:
        obj = _NOOP
    else:
        reg = _prom.REGISTRY if group is None else None
        if kind == "counter":
            obj = _prom.Counter(name, doc, spec.labels, registry=reg)
        elif kind == "gauge":
            obj = _prom.Gauge(name, doc, spec.labels, registry=reg, multiprocess_mode="liveall")
        else:
            obj = _prom.Histogram(name, doc, spec.labels, registry=reg, buckets=spec.buckets)
        if group is not None:
            _groups.setdefault(group, []).append(obj)
    return obj


def activate(group: str) -> None:
    """Starts serving the metrics of ``group`` (idempotent)."""
    if group in _active_groups:
        return
    with _groups_lock:
        if group in _active_groups:
            return
        for obj in _groups.get(group, ()):
            _prom.REGISTRY.register(obj)
        _active_groups.add(group)


def counter(name: str, doc: str, labels=None, unit: str = "", group: str | None = None):
    """Declares a counter (name without ``_total``); returns the prometheus_client object."""
    return _define("counter", name, doc, labels, unit, group=group)


def gauge(name: str, doc: str, labels=None, unit: str = "", group: str | None = None):
    """Declares a gauge; returns the prometheus_client object."""
    return _define("gauge", name, doc, labels, unit, group=group)


def histogram(name: str, doc: str, labels=None, unit: str = "seconds", buckets=STAGE_BUCKETS,
              group: str | None = None):
    """Declares a histogram (durations in seconds by default); returns the object."""
    return _define("histogram", name, doc, labels, unit, buckets, group=group)


_R = {"rank": None}
_RM = {"rank": None, "model": None}

# --- window (publisher) ---
WINDOW_CURRENT = gauge(
    "hotweights_window_current_buckets", "Buckets the window controller lets be in flight now "
    "(the minimum window while probing).", _RM)
WINDOW_RECOMMENDED = gauge(
    "hotweights_window_recommended_buckets", "The controller's model window: bandwidth-delay "
    "product in buckets + 1 (ceil(bandwidth * min latency / mean bucket bytes) + 1), clipped to "
    "the bounds.", _RM)
WINDOW_MAX = gauge(
    "hotweights_window_max_buckets", "Upper bound of the window (HOTWEIGHTS_IPC_MAX_INFLIGHT, "
    "at most the ring's slots).", _RM)
WINDOW_TARGET = gauge(
    "hotweights_window_target_seconds", "Bucket service-time budget "
    "(HOTWEIGHTS_IPC_TARGET_BUCKET_MS): above it the window shrinks.", _RM, "seconds")
WINDOW_MIN_LATENCY = gauge(
    "hotweights_window_min_latency_seconds", "Controller estimate T_min: windowed minimum "
    "bucket service time (post to last ack), the no-load latency.", _RM, "seconds")
WINDOW_LATENCY = gauge(
    "hotweights_window_latency_seconds", "Controller estimate T_ewma: smoothed bucket service "
    "time (gain 1/8).", _RM, "seconds")
WINDOW_BANDWIDTH = gauge(
    "hotweights_window_bandwidth_bytes_per_second", "Controller estimate: windowed maximum "
    "delivery rate of a round (acked bytes / round wall time).", _RM, "bytes_per_second")
WINDOW_QUEUE = gauge(
    "hotweights_window_queue_buckets", "Controller estimate: buckets waiting rather than moving, "
    "W * (1 - (T_min + T_dev) / T_ewma).", _RM)
WINDOW_CONGESTION = gauge(
    "hotweights_window_congestion_ratio", "Congestion risk in [0, 1]: the queueing share of a "
    "bucket's latency, 1 - (T_min + T_dev) / T_ewma (0: buckets move at the no-load "
    "latency; T_dev: the service time's mean deviation).", _RM,
    "ratio")
WINDOW_ADJUSTMENTS = counter(
    "hotweights_window_adjustments", "Window decisions that changed it: up (+1), down "
    "(-1 or x0.75) and probe (a drain to the minimum window to re-measure T_min).",
    {**_RM, "direction": DIRECTIONS})
WINDOW_ROUNDS = counter(
    "hotweights_window_rounds", "Controller rounds (a window's worth of completed buckets).", _RM)
INFLIGHT_BUCKETS = gauge(
    "hotweights_inflight_buckets", "Buckets posted and not yet released by every consumer.", _RM)
INFLIGHT_BYTES = gauge(
    "hotweights_inflight_bytes", "Bytes of the buckets in flight.", _RM, "bytes")

# --- transfers ---
SENT_BYTES = counter(
    "hotweights_sent_bytes", "Bytes the publisher gathered into slots and announced (re-sends "
    "included).", _RM, "bytes")
SENT_BUCKETS = counter(
    "hotweights_sent_buckets", "Buckets the publisher announced (re-sends included).", _RM)
DOORBELL_BUCKETS = counter(
    "hotweights_doorbell_buckets", "Ring buckets the publisher posted only in its same-node "
    "doorbell, taken and acked there without a coordinator request (Note [Doorbell]).", _RM)
RECEIVED_BYTES = counter(
    "hotweights_received_bytes", "Bytes a subscriber copied out of a publisher's slots and "
    "verified, by path (bucket digest matched).", {**_RM, "path": PATHS}, "bytes")
RECEIVED_BUCKETS = counter(
    "hotweights_received_buckets", "Buckets a subscriber received and verified, by path.",
    {**_RM, "path": PATHS})
PATH_UTILIZATION = gauge(
    "hotweights_path_utilization_ratio", "Share of this process's received bytes that crossed "
    "each path since it started (the shares of a rank sum to 1).", {"rank": None, "path": PATHS},
    "ratio")
BUCKET_DURATION = histogram(
    "hotweights_bucket_duration_seconds", "Duration of one bucket's stage: gather (publisher: "
    "copy + hash into the slot), transfer (publisher: post to release by every consumer, the "
    "window controller's service time), scatter (subscriber: copy + hash out of the slot), "
    "verify (subscriber: digest comparison).", {**_RM, "stage": STAGES})
CHECKSUM_FAILURES = counter(
    "hotweights_checksum_failures", "Checksum mismatches: bucket (a subscriber's bucket digest, "
    "it nacks and the publisher re-sends), tensor (end-to-end against the manifest), source (the "
    "publisher's source changed while it was published).", {**_RM, "check": CHECKS})
RETRIES = counter(
    "hotweights_bucket_retries", "Buckets the publisher sends again, by the release that "
    "failed: nacked (a consumer failed it), expired (its lease ran out with consumers missing), "
    "aborted.",
    {**_RM, "reason": RETRY_REASONS})

# --- versions ---
VERSIONS = counter(
    "hotweights_versions", "Versions this publisher finished, by result.",
    {**_RM, "result": VERSION_RESULTS})
ABORTS = counter(
    "hotweights_version_aborts", "Versions of this publisher that were aborted, by reason "
    "(classified from the coordinator's reason text, see abort_reason()).",
    {**_RM, "reason": ABORT_REASONS})
COMMIT_DURATION = histogram(
    "hotweights_version_commit_duration_seconds", "Publish to commit: from publish() to the "
    "coordinator's commit of the version (committed versions).", _RM, buckets=VERSION_BUCKETS)
PUBLISH_PHASE = histogram(
    "hotweights_publish_phase_duration_seconds", "Phases of a publish: manifest (hashing), plan, "
    "stream (every bucket sent and released), commit_wait (until the quorum committed).",
    {**_RM, "phase": PHASES}, buckets=VERSION_BUCKETS)
PUBLISHER_VERSION = gauge(
    "hotweights_publisher_version", "Latest version this publisher saw committed.", _RM)
COMMIT_PAUSE = histogram(
    "hotweights_commit_pause_seconds", "How long an apply blocked forwards (storage swap or "
    "in-place copy of the changed tensors).", _RM, buckets=PAUSE_BUCKETS)
SUBSCRIBER_VERSION = gauge(
    "hotweights_subscriber_version", "Version this subscriber applied (0: none yet).", _RM)
SUBSCRIBER_LAG = gauge(
    "hotweights_subscriber_lag_versions", "Latest committed version this subscriber knows of "
    "minus the version it applied.", _RM, "versions")

# --- coordinator (fed by Coordinator(hook=coordinator_hook)) ---
C = "coordinator"  # served once a coordinator runs in this process
COORD_REQUESTS = counter(
    "hotweights_coordinator_requests", "Requests the coordinator answered, by method and result.",
    {"method": None, "result": REQUEST_RESULTS}, group=C)
COORD_REJECTED = counter(
    "hotweights_coordinator_rejected_messages", "Messages refused before running (malformed, "
    "too large, bad version or arguments, authentication), by error code.", {"code": None},
    group=C)
COORD_HANDLES_POSTED = counter(
    "hotweights_coordinator_handles_posted", "Handles (announced buckets) posted.", group=C)
COORD_HANDLES_FETCHED = counter(
    "hotweights_coordinator_handles_fetched", "Handles delivered to consumers.", group=C)
COORD_HANDLES_ACKED = counter(
    "hotweights_coordinator_handles_acked", "Consumer acknowledgements of handles.", group=C)
COORD_HANDLES_NACKED = counter(
    "hotweights_coordinator_handles_nacked", "Consumer failures reported on handles.", group=C)
COORD_HANDLES_RELEASED = counter(
    "hotweights_coordinator_handles_released", "Handles released to their owner (acked, nacked, "
    "expired or aborted).", group=C)
COORD_HANDLES_EXPIRED = counter(
    "hotweights_coordinator_handles_expired", "Handles released because their lease ran out.",
    group=C)
COORD_HANDLES_DROPPED = counter(
    "hotweights_coordinator_handles_dropped", "Handles dropped because their owner died or "
    "left.", group=C)
COORD_HANDLES_ACTIVE = gauge(
    "hotweights_coordinator_active_handles", "Handles posted and not released.", group=C)
COORD_VERSIONS_PUBLISHED = counter(
    "hotweights_coordinator_versions_published", "Versions registered by publishers.", group=C)
COORD_VERSIONS_COMMITTED = counter(
    "hotweights_coordinator_versions_committed", "Versions committed (quorum reached).", group=C)
COORD_VERSIONS_ABORTED = counter(
    "hotweights_coordinator_versions_aborted", "Versions aborted (any reason).", group=C)
COORD_VERSIONS_TRANSFERRING = gauge(
    "hotweights_coordinator_transferring_versions", "Versions being transferred now.", group=C)
COORD_REGISTRATIONS = counter(
    "hotweights_coordinator_registrations", "Register calls accepted (new clients, "
    "re-registrations, updates).", group=C)
COORD_DEATHS = counter(
    "hotweights_coordinator_client_deaths", "Clients declared dead (heartbeats stopped).", group=C)
COORD_CLIENTS = gauge("hotweights_coordinator_clients", "Clients known (alive or dead).", group=C)
COORD_LIVE_SUBSCRIBERS = gauge(
    "hotweights_coordinator_live_subscribers", "Subscribers whose heartbeats arrive.", group=C)
COORD_PARKED = gauge(
    "hotweights_coordinator_parked_requests", "Long-poll requests waiting for a change.", group=C)
COORD_LEADER = gauge(
    "hotweights_coordinator_leader", "Whether this coordinator holds the leader lease (1) or "
    "stands by (0).", group=C)
COORD_DROPPED_REPLIES = counter(
    "hotweights_coordinator_dropped_replies", "Replies that could not be sent (peer gone).",
    group=C)
COORD_DROPPED_NOTIFICATIONS = counter(
    "hotweights_coordinator_dropped_notifications", "PUB notifications that could not be "
    "sent.", group=C)
COORD_INTERNAL_ERRORS = counter(
    "hotweights_coordinator_internal_errors", "Bugs caught in the serving loop (logged).", group=C)

# --- process ---
BUILD_INFO = gauge(
    "hotweights_build_info", "Always 1, labelled with the hotweights version, the torch it was "
    "built against and its CUDA version (none: a CPU build).",
    {"version": None, "torch": None, "cuda": None})


# --------------------------------------------------------------------------- labels


_free_seen: dict[tuple[str, str], set] = {}
_strangers: dict[tuple[str, str], set] = {}  # values outside a fixed set, warned about once
_free_lock = threading.Lock()


def _value(spec: MetricSpec, i: int, v: Any) -> str:
    """A label value within bounds: fixed sets map strangers to ``other``; free labels keep at
    most MAX_FREE_VALUES distinct values per metric."""
    v = str(v)
    allowed = spec.values[i]
    key = (spec.name, spec.labels[i])
    if allowed is not None:
        if v in allowed:
            return v
        with _free_lock:
            strangers = _strangers.setdefault(key, set())
            if v not in strangers and len(strangers) < MAX_FREE_VALUES:
                strangers.add(v)
                log.warning("metric %s: label %s=%r is not one of %s; reported as %r", spec.name,
                            spec.labels[i], v, allowed, OTHER)
        return OTHER
    with _free_lock:
        seen = _free_seen.setdefault(key, set())
        if v in seen:
            return v
        if len(seen) >= MAX_FREE_VALUES:
            return OTHER
        seen.add(v)
        if len(seen) == MAX_FREE_VALUES:
            log.warning("metric %s: label %s reached %d distinct values; later ones are reported "
                        "as %r", spec.name, spec.labels[i], MAX_FREE_VALUES, OTHER)
        return v


def _child(metric, **labels):
    """The child of ``metric`` for ``labels`` (bounded values); the metric itself when it has
    no labels."""
    if metric is _NOOP:
        return _NOOP
    spec = SPECS[metric._name]
    if not spec.labels:
        return metric
    return metric.labels(*[_value(spec, i, labels[k]) for i, k in enumerate(spec.labels)])


def _remove(metric, **labels) -> None:
    if metric is _NOOP:
        return
    spec = SPECS[metric._name]
    try:
        metric.remove(*[str(labels[k]) for k in spec.labels])
    except KeyError:
        pass


# --------------------------------------------------------------------------- rank, exporter


_LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                    "SLURM_LOCALID")


def local_rank() -> int:
    """This process's local rank: the first of LOCAL_RANK (torchrun), OMPI_COMM_WORLD_LOCAL_RANK
    (Open MPI's mpirun), MPI_LOCALRANKID (MPICH, Intel MPI) and SLURM_LOCALID (srun) that is
    set, else 0."""
    for var in _LOCAL_RANK_VARS:
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        try:
            r = int(raw)
        except ValueError:
            raise MetricsError(f"{var}={raw!r}: expected a non-negative integer") from None
        if r < 0:
            raise MetricsError(f"{var}={raw!r}: expected a non-negative integer")
        return r
    return 0


_rank: str | None = None


def _rank_label() -> str:
    """The ``rank`` label of this process's metrics (set_rank, else LOCAL_RANK, else 0)."""
    global _rank
    if _rank is None:
        try:
            _rank = str(local_rank())
        except MetricsError as e:
            log.warning("metrics: %s; using rank 0", e)
            _rank = "0"
    return _rank


rank = _rank_label  # public name; start_exporter's ``rank`` argument shadows it there


def set_rank(value: int | str) -> None:
    """Sets the ``rank`` label (a local rank, or a role such as ``coordinator``). Call it
    before creating publishers or subscribers: they label their metrics when created."""
    global _rank
    _rank = str(value)


_lock = threading.Lock()
_server = None
_server_thread = None
_port: int | None = None
_addr: str | None = None


def start_exporter(port: int, addr: str | None = None, *, rank: int | str | None = None,
                   source: str | None = None) -> int | None:
    """Serves this process's metrics at ``http://addr:port/metrics`` (addr default
    HOTWEIGHTS_METRICS_ADDR; port 0 picks a free one) and returns the bound port.

    One exporter per process: a second call returns the running exporter's port (with a
    warning when it asked for another one). Raises MetricsError when the port is taken.
    Without prometheus_client it logs why and returns None. ``source`` names where the port
    came from, for the error message.
    """
    global _server, _server_thread, _port, _addr
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MetricsError(f"metrics exporter: port={port!r}: expected an integer in [0, 65535]")
    if not AVAILABLE:
        if rank is not None:
            set_rank(rank)
        log.warning("metrics exporter not started: %s", UNAVAILABLE_REASON)
        return None
    if addr is None:
        from . import config

        addr = config.get().metrics_addr
    with _lock:
        if _server is not None:
            if port not in (0, _port) or addr != _addr:
                log.warning("metrics exporter already serving on %s:%d; not starting another on "
                            "%s:%d (one exporter per process)", _addr, _port, addr, port)
            return _port  # its rank label stays
        try:
            server, thread = _prom.start_http_server(port, addr=addr)
        except OSError as e:
            where = f" ({source})" if source else ""
            if e.errno == errno.EADDRINUSE:
                raise MetricsError(
                    f"metrics exporter: port {port}{where} on {addr} is already in use; choose "
                    "another port (each process needs its own: base port + local rank)") from None
            raise MetricsError(f"metrics exporter: cannot listen on {addr}:{port}{where}: "
                               f"{e.strerror or e}") from None
        _server, _server_thread = server, thread
        _port, _addr = server.server_port, addr
        if rank is not None:
            set_rank(rank)
        log.info("metrics exporter serving http://%s:%d/metrics (rank %s)", addr, _port,
                 _rank_label())
        return _port


def stop_exporter() -> None:
    """Stops this process's exporter (tests, tools); the metrics keep their values."""
    global _server, _server_thread, _port, _addr
    with _lock:
        if _server is None:
            return
        _server.shutdown()
        _server.server_close()
        _server_thread.join(5)
        _server = _server_thread = _port = _addr = None


def exporter_url() -> str | None:
    """``http://addr:port/metrics`` of the running exporter, or None."""
    with _lock:
        return None if _port is None else f"http://{_addr}:{_port}/metrics"


def autostart(cfg=None) -> int | None:
    """Library use: starts the exporter on HOTWEIGHTS_METRICS_PORT + local rank when that
    setting is nonzero (off by default); returns the port or None."""
    from . import config

    cfg = cfg or config.get()
    if not cfg.metrics_port:
        return None
    r = local_rank()
    port = cfg.metrics_port + r
    var = next((v for v in _LOCAL_RANK_VARS if os.environ.get(v, "").strip()), "LOCAL_RANK")
    src = f"HOTWEIGHTS_METRICS_PORT={cfg.metrics_port} + {var}={r}"
    if port > 65535:
        raise MetricsError(f"metrics exporter: {src} = {port} is above 65535")
    return start_exporter(port, cfg.metrics_addr, rank=r, source=src)


def status() -> dict[str, Any]:
    """What ``hotweights info`` shows about metrics."""
    out: dict[str, Any] = {"available": AVAILABLE, "exporter": exporter_url()}
    if AVAILABLE:
        from importlib import metadata

        try:
            out["prometheus_client"] = metadata.version("prometheus_client")
        except metadata.PackageNotFoundError:
            out["prometheus_client"] = "unknown"
    else:
        out["reason"] = UNAVAILABLE_REASON
    return out


# --------------------------------------------------------------------------- classifiers


def path_label(src, dst) -> str:
    """The ``path`` label of a copy from device ``src`` to device ``dst`` (torch.device or
    str): cpu->cpu, host->cuda, cuda->host, cuda->cuda (one GPU), cuda->peer (two GPUs)."""
    return _path_label(str(src), str(dst))


@functools.lru_cache(maxsize=256)
def _path_label(src: str, dst: str) -> str:
    import torch

    from . import ops

    kind = ops.link_kind(torch.device(src), torch.device(dst))
    return {"host": "cpu->cpu", "host_to_device": "host->cuda", "device_to_host": "cuda->host",
            "same_device": "cuda->cuda"}.get(kind, "cuda->peer")


def abort_reason(reason: str | None) -> str:
    """Classifies an abort reason text (coordinator or publisher) into ABORT_REASONS."""
    r = (reason or "").lower()
    if "superseded" in r:
        return "superseded"
    if "checksum" in r:
        return "checksum"
    if "changed while version" in r:
        return "source_changed"
    if "failed 3 times" in r:
        return "retries_exhausted"
    if r.startswith("sending bucket"):
        return "send_failed"
    if "publisher died" in r:
        return "publisher_died"
    if "publisher left" in r:
        return "publisher_left"
    if r.startswith("subscriber") and r.endswith(" died"):
        return "subscriber_died"
    if r.startswith("subscriber") and r.endswith(" left"):
        return "subscriber_left"
    if "rejected by every" in r:
        return "rejected"
    if "timeout" in r or "timed out" in r:
        return "timeout"
    if r.startswith("aborted by"):
        return "requested"
    return OTHER


# --------------------------------------------------------------------------- components


_MODEL_SPEC = MetricSpec("model", "label", ("model",), (None,), "", "Model names in use.")
_owners_lock = threading.Lock()
_owners: dict[tuple, int] = {}  # (component, rank, model) -> live helpers using those series


class _Component:
    """Label children bound once per helper (the hot path only adds or sets), and gauge series
    shared by every live helper of the same (rank, model): the last one to close removes them."""

    _kind = ""
    _gauges: tuple = ()

    def __init__(self, model: str):
        # model names are bounded once per process (the same cap as any free label)
        self.labels = {"rank": _rank_label(), "model": _value(_MODEL_SPEC, 0, model)}
        self._cache: dict[tuple, Any] = {}
        self._key = (self._kind, self.labels["rank"], self.labels["model"])
        with _owners_lock:
            _owners[self._key] = _owners.get(self._key, 0) + 1

    def _c(self, metric, **extra):
        key = (metric._name if metric is not _NOOP else "", *extra.items())
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = _child(metric, **self.labels, **extra)
        return c

    def close(self) -> None:
        """Removes this component's gauges once no live helper of its (rank, model) uses them;
        counters and histograms stay (they only ever increase)."""
        with _owners_lock:
            n = _owners.get(self._key, 0) - 1
            if n > 0:
                _owners[self._key] = n
            else:
                _owners.pop(self._key, None)
                for g in self._gauges:
                    _remove(g, **self.labels)
        self._cache.clear()


class PublisherMetrics(_Component):
    """A publisher's metrics for one model."""

    _kind = "publisher"
    _gauges = (WINDOW_CURRENT, WINDOW_RECOMMENDED, WINDOW_MAX, WINDOW_TARGET, WINDOW_MIN_LATENCY,
               WINDOW_LATENCY, WINDOW_BANDWIDTH, WINDOW_QUEUE, WINDOW_CONGESTION,
               INFLIGHT_BUCKETS, INFLIGHT_BYTES, PUBLISHER_VERSION)

    def __init__(self, model: str, window, *, target_s: float, max_window: int):
        super().__init__(model)
        self._last = {"ups": 0, "downs": 0, "probes": 0, "rounds": 0}
        self._target_s = float(target_s)
        self._max_window = int(max_window)
        self.inflight(0, 0)
        # Known label sets start at 0, so that rate() and the dashboard see them before the
        # first event.
        for result in VERSION_RESULTS:
            self._c(VERSIONS, result=result)
        for reason in ABORT_REASONS:
            self._c(ABORTS, reason=reason)
        for reason in RETRY_REASONS:
            self._c(RETRIES, reason=reason)
        for direction in DIRECTIONS:
            self._c(WINDOW_ADJUSTMENTS, direction=direction)
        self._c(CHECKSUM_FAILURES, check="source")
        self.window(window)

    def window(self, w) -> None:
        """Reads the window controller (``_C.WindowController``) after a completion: gauges,
        and the adjustment counters by the increase of its own counts."""
        e = w.estimates()
        c = self._c
        c(WINDOW_TARGET).set(self._target_s)
        c(WINDOW_MAX).set(self._max_window)
        c(WINDOW_CURRENT).set(w.current)
        c(WINDOW_RECOMMENDED).set(w.recommended)
        c(WINDOW_MIN_LATENCY).set(e["t_min_s"])
        c(WINDOW_LATENCY).set(e["t_ewma_s"])
        c(WINDOW_BANDWIDTH).set(e["bandwidth_Bps"])
        c(WINDOW_QUEUE).set(e["queue_buckets"])
        c(WINDOW_CONGESTION).set(min(1.0, max(0.0, e["congestion"])))
        for key, direction in (("ups", "up"), ("downs", "down"), ("probes", "probe")):
            d = int(e[key]) - self._last[key]
            if d > 0:
                c(WINDOW_ADJUSTMENTS, direction=direction).inc(d)
            self._last[key] = int(e[key])
        d = int(e["rounds"]) - self._last["rounds"]
        if d > 0:
            c(WINDOW_ROUNDS).inc(d)
        self._last["rounds"] = int(e["rounds"])

    def inflight(self, buckets: int, nbytes: int) -> None:
        """Load in flight after a post or a release."""
        self._c(INFLIGHT_BUCKETS).set(buckets)
        self._c(INFLIGHT_BYTES).set(nbytes)

    def gathered(self, nbytes: int, seconds: float) -> None:
        """A bucket was gathered (copy + hash) into a slot and is about to be announced."""
        self._c(SENT_BYTES).inc(nbytes)
        self._c(SENT_BUCKETS).inc()
        self._c(BUCKET_DURATION, stage="gather").observe(seconds)

    def rung(self) -> None:
        """A bucket was posted only in the doorbell."""
        self._c(DOORBELL_BUCKETS).inc()

    def completed(self, seconds: float) -> None:
        """A bucket was released acked by every consumer ``seconds`` after its post."""
        self._c(BUCKET_DURATION, stage="transfer").observe(seconds)

    def retry(self, reason: str) -> None:
        """A bucket is sent again (``nacked``, ``expired`` or ``aborted``)."""
        self._c(RETRIES, reason=reason).inc()

    def source_changed(self) -> None:
        """A tensor no longer hashed to the manifest while it was gathered."""
        self._c(CHECKSUM_FAILURES, check="source").inc()

    def version(self, version: int, state: str, reason: str | None,
                timings: dict[str, float]) -> None:
        """A publish ended (``state`` committed or aborted) with PublishResult.timings."""
        committed = state == "committed"
        self._c(VERSIONS, result="committed" if committed else "aborted").inc()
        for phase in PHASES:
            t = timings.get(phase + "_s")
            if t is not None:
                self._c(PUBLISH_PHASE, phase=phase).observe(t)
        if committed:
            self._c(COMMIT_DURATION).observe(timings["total_s"])
            self._c(PUBLISHER_VERSION).set(version)
        else:
            self._c(ABORTS, reason=abort_reason(reason)).inc()


_paths_lock = threading.Lock()
_path_bytes: dict[str, int] = {}


_paths_refreshed = [0.0]


def _path_share(path: str, nbytes: int) -> None:
    """Adds received bytes to a path and refreshes every path's share of this process (at
    once for a new path, else at most every 50 ms: a gauge per path per bucket cost a fifth
    of a small bucket's receive)."""
    with _paths_lock:
        new = path not in _path_bytes
        _path_bytes[path] = _path_bytes.get(path, 0) + nbytes
        now = time.monotonic()
        if not new and now - _paths_refreshed[0] < 0.05:
            return
        _paths_refreshed[0] = now
        total = sum(_path_bytes.values())
        r = _rank_label()
        for p, b in _path_bytes.items():
            _child(PATH_UTILIZATION, rank=r, path=p).set(b / total)


class SubscriberMetrics(_Component):
    """A subscriber's metrics for one model."""

    _kind = "subscriber"
    _gauges = (SUBSCRIBER_VERSION, SUBSCRIBER_LAG)

    def __init__(self, model: str):
        super().__init__(model)
        self._last_lag: tuple | None = None
        for check in ("bucket", "tensor"):
            self._c(CHECKSUM_FAILURES, check=check)

    def bucket(self, path: str, nbytes: int, scatter_s: float, verify_s: float,
               ok: bool) -> None:
        """A bucket was scattered (``scatter_s``) and its digest compared (``verify_s``);
        ``ok``: it matched, its ``nbytes`` crossed ``path``."""
        self._c(BUCKET_DURATION, stage="scatter").observe(scatter_s)
        self._c(BUCKET_DURATION, stage="verify").observe(verify_s)
        if ok:
            self._c(RECEIVED_BYTES, path=path).inc(nbytes)
            self._c(RECEIVED_BUCKETS, path=path).inc()
            _path_share(path, nbytes)
        else:
            self._c(CHECKSUM_FAILURES, check="bucket").inc()

    def tensor_mismatch(self) -> None:
        """A tensor's pieces did not add up to its manifest checksum."""
        self._c(CHECKSUM_FAILURES, check="tensor").inc()

    def lag(self, current: int | None, applied: int | None) -> None:
        """Newest committed version known vs applied version (both may be None)."""
        if (current, applied) == self._last_lag:
            return
        self._last_lag = (current, applied)
        self._c(SUBSCRIBER_VERSION).set(applied or 0)
        self._c(SUBSCRIBER_LAG).set(max(0, (current or 0) - (applied or 0)))

    def applied(self, version: int, pause_s: float, current: int | None) -> None:
        """A version was applied after blocking forwards for ``pause_s``."""
        self._c(COMMIT_PAUSE).observe(pause_s)
        self.lag(max(current or 0, version), version)


# --------------------------------------------------------------------------- coordinator


_COORD_COUNTERS = {
    "handles.posted": COORD_HANDLES_POSTED, "handles.fetched": COORD_HANDLES_FETCHED,
    "handles.acked": COORD_HANDLES_ACKED, "handles.nacked": COORD_HANDLES_NACKED,
    "handles.released": COORD_HANDLES_RELEASED, "handles.expired": COORD_HANDLES_EXPIRED,
    "handles.dropped": COORD_HANDLES_DROPPED,
    "versions.published": COORD_VERSIONS_PUBLISHED,
    "versions.committed": COORD_VERSIONS_COMMITTED, "versions.aborted": COORD_VERSIONS_ABORTED,
    "clients.registered": COORD_REGISTRATIONS, "clients.dead": COORD_DEATHS,
    "replies.dropped": COORD_DROPPED_REPLIES, "pub.dropped": COORD_DROPPED_NOTIFICATIONS,
    "internal_errors": COORD_INTERNAL_ERRORS,
}
_COORD_GAUGES = {
    "clients": COORD_CLIENTS, "subscribers_live": COORD_LIVE_SUBSCRIBERS,
    "handles_active": COORD_HANDLES_ACTIVE, "versions_transferring": COORD_VERSIONS_TRANSFERRING,
    "parked": COORD_PARKED, "leader": COORD_LEADER,
}
_coord_children: dict[str, Any] = {}
_coord_unknown: set[str] = set()


def coordinator_metric(name: str, kind: str):
    """The metric child a coordinator counter or gauge name maps to, or None."""
    c = _coord_children.get(name)
    if c is not None:
        return c
    if kind == "gauge":
        m = _COORD_GAUGES.get(name)
        c = None if m is None else _child(m)
    elif name.startswith("requests."):
        parts = name.split(".")
        c = None if len(parts) != 3 else _child(COORD_REQUESTS, method=parts[1], result=parts[2])
    elif name.startswith("rejected."):
        c = _child(COORD_REJECTED, code=name[len("rejected."):])
    else:
        m = _COORD_COUNTERS.get(name)
        c = None if m is None else _child(m)
    if c is not None:
        _coord_children[name] = c
    return c


def coordinator_hook(name: str, value: float, kind: str) -> None:
    """``Coordinator(hook=...)``: counter increments (``kind="counter"``, value = delta) and
    gauge levels (``kind="gauge"``) of the coordinator, onto the metrics above."""
    if AVAILABLE:
        activate("coordinator")
    c = coordinator_metric(name, kind)
    if c is None:
        if name not in _coord_unknown:
            _coord_unknown.add(name)
            log.warning("metrics: coordinator %s %r has no metric", kind, name)
        return
    if kind == "gauge":
        c.set(value)
    elif value > 0:
        c.inc(value)


# --------------------------------------------------------------------------- build info


def _build_info() -> None:
    try:
        from .info import build_info

        b = build_info()
        labels = {"version": b["version"], "torch": b["torch_version"],
                  "cuda": b["nvcc_version"] if b.get("with_cuda") else "none"}
    except Exception as e:  # never break an import over a label
        log.warning("metrics: build record unavailable (%s: %s)", type(e).__name__, e)
        labels = {"version": "unknown", "torch": "unknown", "cuda": "unknown"}
    _child(BUILD_INFO, **labels).set(1)


_build_info()
