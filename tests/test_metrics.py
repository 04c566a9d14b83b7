# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics: real replication runs scraped over HTTP, the dashboard's queries checked
against what the exporters serve (so the two cannot drift), coord-serve's exporter, naming
rules, bounded labels, the exporter's lifecycle and life without prometheus_client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid

import pytest
import torch

import hotweights
from hotweights import metrics
from hotweights.coordinator import Coordinator, start_embedded

from coord_helpers import REPO, Harness, raw_call, raw_socket, wait_until
from utils import free_port

prom = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

DASHBOARD = os.path.join(REPO, "dashboards", "hotweights.json")
DOCS = os.path.join(REPO, "docs", "metrics.md")
METRIC_RE = re.compile(r"\bhotweights_[a-z0-9_]+")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def exporter_reset():
    """Each test starts without an exporter and with the default rank label."""
    metrics.stop_exporter()
    metrics._rank = None
    yield
    metrics.stop_exporter()
    metrics._rank = None


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """Sample name -> [(labels, value)] from http://127.0.0.1:port/metrics, and the types."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
            types[s.name] = fam.type
    out["__types__"] = types  # type: ignore[assignment]
    return out


def value(sc, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for lb, v in sc.get(name, []) if all(lb.get(k) == w for k, w in labels.items()))


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_queries(d: dict) -> list[str]:
    """Every PromQL the dashboard runs: panel targets and variable queries."""
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def query_needs(expr: str) -> list[tuple[str, set[str], dict[str, str]]]:
    """(sample name, label names, label=value equalities) that ``expr`` needs to exist: each
    metric must carry every label the expression selects, groups by or asks values of."""
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr.strip())
    if m:
        return [(m.group(1), {m.group(2)}, {})]
    labels: set[str] = set()
    equal: dict[str, str] = {}
    for sel in re.findall(r"\{([^}]*)\}", expr):
        for name, op, val in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', sel):
            labels.add(name)
            if op == "=":
                equal[name] = val
    for grp in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in grp.split(",") if x.strip())
    return [(name, labels, equal) for name in sorted(set(METRIC_RE.findall(expr)))]


def check_dashboard_metrics(sc, only=None) -> int:
    """Asserts that every metric the dashboard queries (those ``only`` accepts) is served with
    the labels (and fixed label values) its queries use; returns how many were checked."""
    n = 0
    for expr in dashboard_queries(dashboard()):
        for name, labels, equal in query_needs(expr):
            if only is not None and not only(name):
                continue
            n += 1
            samples = sc.get(name)
            assert samples, f"the dashboard queries {name} ({expr!r}) but the exporter serves none"
            assert any(labels <= lb.keys() and all(lb.get(k) == v for k, v in equal.items())
                       for lb, _ in samples), (
                f"{name}: no sample carries labels {sorted(labels)} with {equal} "
                f"(query {expr!r}); served: {[lb for lb, _ in samples][:5]}")
    return n


def assert_monotonic(before, after) -> int:
    """Every counter (and histogram count/sum/bucket) in ``before`` is >= in ``after``."""
    n = 0
    types = before["__types__"]
    for name, samples in before.items():
        if name == "__types__" or types.get(name) not in ("counter", "histogram"):
            continue
        if name.endswith("_created"):
            continue
        later = {tuple(sorted(lb.items())): v for lb, v in after.get(name, [])}
        for lb, v in samples:
            key = tuple(sorted(lb.items()))
            assert key in later, f"{name}{lb} vanished between scrapes"
            assert later[key] >= v, f"{name}{lb} went down: {v} -> {later[key]}"
            n += 1
    return n


class Net(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)
        self.c = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _bump(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def free_port_pair() -> int:
    """A port p with p + 1 also free (base + local rank)."""
    for _ in range(50):
        p = free_port()
        if p >= 65535:
            continue
        with contextlib.closing(socket.socket()) as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two adjacent free ports")


# --------------------------------------------------------------------------- in-process run


def test_replication_run_serves_every_dashboard_metric(monkeypatch, exporter_reset):
    """Publisher + register_hotweights + embedded coordinator in one process, the exporter
    started by the library from HOTWEIGHTS_METRICS_PORT; two scrapes around real versions,
    one bucket corrupted once (re-sent), one version corrupted until it aborts."""
    port = free_port()
    monkeypatch.setenv("HOTWEIGHTS_METRICS_PORT", str(port))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    hotweights.config.reset()
    model = f"m-{uuid.uuid4().hex[:8]}"
    coord = start_embedded()
    src, dst = Net(0), Net(1)
    h = dst.register_hotweights(name=model, endpoint=coord.endpoint, commit="manual")
    pub = hotweights.Publisher(src, name=model, endpoint=coord.endpoint, bucket_bytes=8192,
                               slots=4, direct="off")  # the hook below corrupts ring slots
    try:
        assert metrics.exporter_url() == f"http://127.0.0.1:{port}/metrics"
        r1 = pub.publish("v1")
        h.wait(r1.version, timeout=60)
        with raw_socket(coord.endpoint) as s:  # a malformed message for the rejected counter
            assert raw_call(s, b"\xc1 not msgpack")["error"]["code"] == "bad_message"
        wait_until(lambda: value(scrape(port), "hotweights_coordinator_live_subscribers") == 1,
                   what="the coordinator's gauges")
        first = scrape(port)

        corrupt_attempts: set[int] = {1}

        def after_gather(b, slot, attempt):
            if b == 0 and attempt in corrupt_attempts:
                slot[:1].bitwise_not_()  # flips the first payload byte after it was hashed

        pub.after_gather = after_gather
        _bump(src)
        r2 = pub.publish("v2: one corrupted bucket, re-sent")
        h.wait(r2.version, timeout=60)
        assert r2.retries == 1
        _bump(src)
        corrupt_attempts.update({2, 3})
        with pytest.raises(hotweights.PublishError, match="failed 3 times"):
            pub.publish("v3: corrupted until it aborts")
        pub.after_gather = None
        r4 = pub.publish("v4")
        h.wait(r4.version, timeout=60)
        assert torch.equal(dst.a.weight, src.a.weight)
        wait_until(lambda: value(scrape(port), "hotweights_coordinator_versions_aborted_total")
                   >= 1, what="the abort to reach the metrics")
        second = scrape(port)
    finally:
        pub.close()
        h.close()
        coord.stop()

    # The dashboard and the exporter agree: every queried metric, with its labels.
    assert check_dashboard_metrics(second) > 40
    assert assert_monotonic(first, second) > 50
    mine = {"model": model, "rank": "0"}

    # Transfers: what moved is what the plans said (the subscriber verified every byte).
    committed = r1.bytes + r2.bytes + r4.bytes
    received = value(second, "hotweights_received_bytes_total", path="cpu->cpu", **mine)
    sent = value(second, "hotweights_sent_bytes_total", **mine)
    assert committed <= received <= sent
    assert value(first, "hotweights_received_bytes_total", **mine) == r1.bytes
    assert value(first, "hotweights_sent_buckets_total", **mine) == r1.buckets
    assert value(second, "hotweights_checksum_failures_total", check="bucket", **mine) == 4
    assert value(second, "hotweights_checksum_failures_total", check="tensor", **mine) == 0
    assert value(second, "hotweights_bucket_retries_total", reason="nacked", **mine) == 3

    # Durations: every stage observed, positive.
    for stage in ("gather", "transfer", "scatter", "verify"):
        n = value(second, "hotweights_bucket_duration_seconds_count", stage=stage, **mine)
        total = value(second, "hotweights_bucket_duration_seconds_sum", stage=stage, **mine)
        assert n > 0 and total > 0, (stage, n, total)
    for name in ("hotweights_version_commit_duration_seconds", "hotweights_commit_pause_seconds"):
        assert value(second, name + "_count", **mine) == 3
        assert value(second, name + "_sum", **mine) > 0
    for phase in ("manifest", "plan", "stream", "commit_wait"):
        assert value(second, "hotweights_publish_phase_duration_seconds_count", phase=phase,
                     **mine) == 4

    # Versions: 3 committed, 1 aborted because of checksums; nobody lags.
    assert value(second, "hotweights_versions_total", result="committed", **mine) == 3
    assert value(second, "hotweights_versions_total", result="aborted", **mine) == 1
    assert value(second, "hotweights_version_aborts_total", reason="checksum", **mine) == 1
    assert value(second, "hotweights_publisher_version", **mine) == r4.version
    assert value(second, "hotweights_subscriber_version", **mine) == r4.version
    assert value(second, "hotweights_subscriber_lag_versions", **mine) == 0

    # Window: from the controller, within bounds; adjustments only count up.
    cur = value(second, "hotweights_window_current_buckets", **mine)
    rec = value(second, "hotweights_window_recommended_buckets", **mine)
    top = value(second, "hotweights_window_max_buckets", **mine)
    assert 1 <= cur <= top == 4 and 1 <= rec <= top
    assert 0 <= value(second, "hotweights_window_congestion_ratio", **mine) <= 1
    assert value(second, "hotweights_window_min_latency_seconds", **mine) > 0
    assert value(second, "hotweights_window_bandwidth_bytes_per_second", **mine) > 0
    assert value(second, "hotweights_window_target_seconds", **mine) == 0.25
    assert value(second, "hotweights_inflight_buckets", **mine) == 0
    assert value(second, "hotweights_window_rounds_total", **mine) >= 1

    # Path utilization: shares of this rank sum to 1.
    shares = [v for lb, v in second["hotweights_path_utilization_ratio"] if lb["rank"] == "0"]
    assert shares and abs(sum(shares) - 1.0) < 1e-9

    # Coordinator (embedded, through its hook).
    assert value(second, "hotweights_coordinator_requests_total", method="publish",
                 result="ok") >= 4
    assert value(second, "hotweights_coordinator_rejected_messages_total",
                 code="bad_message") >= 1
    # every sent bucket went to the coordinator or only to the same-node doorbell (the
    # coordinator's counter is the process's: other tests' coordinators add to it)
    rung = value(second, "hotweights_doorbell_buckets_total", **mine)
    sent = value(second, "hotweights_sent_buckets_total", **mine)
    assert 0 < rung < sent  # the subscriber shares the publisher's node (Note [Doorbell])
    assert value(second, "hotweights_coordinator_handles_posted_total") >= sent - rung
    assert value(second, "hotweights_coordinator_leader") == 1
    assert value(second, "hotweights_build_info", version=hotweights.__version__) == 1

    # Every label value is bounded: fixed sets hold, no ids.
    for spec in metrics.SPECS.values():
        for lb, _ in second.get(spec.exposed if spec.kind != "histogram" else spec.name + "_count",
                                []):
            for label, allowed in zip(spec.labels, spec.values):
                if allowed is not None:
                    assert lb[label] in allowed, (spec.name, lb)


def test_publisher_close_removes_its_gauges(exporter_reset):
    coord = start_embedded()
    port = metrics.start_exporter(0)
    model = f"g-{uuid.uuid4().hex[:8]}"
    pub = hotweights.Publisher(Net(), name=model, endpoint=coord.endpoint, bucket_bytes=8192)
    other = hotweights.Publisher(Net(), name=model, endpoint=coord.endpoint, bucket_bytes=8192)
    try:
        assert value(scrape(port), "hotweights_window_max_buckets", model=model) == 8
        other.close()  # the series are shared by (rank, model): the last one to close removes
        assert value(scrape(port), "hotweights_window_max_buckets", model=model) == 8
    finally:
        other.close()
        pub.close()
        coord.stop()
    sc = scrape(port)
    assert not [lb for lb, _ in sc.get("hotweights_window_max_buckets", []) if lb["model"] == model]
    # counters stay (they only ever increase)
    assert any(lb["model"] == model for lb, _ in sc["hotweights_versions_total"])


# --------------------------------------------------------------------------- child process


SUBSCRIBER_CHILD = r"""
import sys, torch, hotweights
endpoint, model = sys.argv[1], sys.argv[2]
torch.manual_seed(7)
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
h = net.register_hotweights(name=model, endpoint=endpoint, commit="manual")
print("ready", hotweights.metrics.exporter_url(), flush=True)
print("applied", h.wait(None, timeout=60), flush=True)
sys.stdin.read()  # until the test closes our stdin
h.close()
"""


def test_child_process_exports_on_port_plus_local_rank(exporter_reset):
    """A subscriber process with LOCAL_RANK=1 exports on HOTWEIGHTS_METRICS_PORT + 1 by itself."""
    base = free_port_pair()
    model = f"c-{uuid.uuid4().hex[:8]}"
    coord = start_embedded()
    env = dict(os.environ, LOCAL_RANK="1", HOTWEIGHTS_METRICS_PORT=str(base),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", SUBSCRIBER_CHILD, coord.endpoint, model],
                             cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    pub = None
    try:
        line = child.stdout.readline()
        assert line.split() == ["ready", f"http://127.0.0.1:{base + 1}/metrics"], line
        pub = hotweights.Publisher(
            torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
                                torch.nn.Linear(64, 32)),
            name=model, endpoint=coord.endpoint, bucket_bytes=8192)
        res = pub.publish("to the child")
        line = child.stdout.readline()
        assert line.split() == ["applied", str(res.version)], line
        sc = scrape(base + 1)
        mine = {"rank": "1", "model": model}
        assert value(sc, "hotweights_received_bytes_total", path="cpu->cpu", **mine) == res.bytes
        assert value(sc, "hotweights_received_buckets_total", **mine) == res.buckets
        assert value(sc, "hotweights_commit_pause_seconds_count", **mine) == 1
        assert value(sc, "hotweights_subscriber_version", **mine) == res.version
        assert value(sc, "hotweights_subscriber_lag_versions", **mine) == 0
        assert value(sc, "hotweights_path_utilization_ratio", rank="1", path="cpu->cpu") == 1.0
        # the child serves only its own process: no publisher or coordinator metrics there
        assert not sc.get("hotweights_window_current_buckets")
        assert not sc.get("hotweights_coordinator_live_subscribers")
        assert not sc.get("hotweights_coordinator_handles_posted_total")
    finally:
        if pub is not None:
            pub.close()
        try:
            child.communicate("", timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        coord.stop()
    assert child.returncode == 0


# --------------------------------------------------------------------------- coord-serve


def test_coord_serve_exports_coordinator_metrics():
    port = free_port()
    h = Harness("memory", None)
    try:
        p = h.coord_serve("tcp://127.0.0.1:0", {"HOTWEIGHTS_HEARTBEAT_S": "0.2",
                                                "HOTWEIGHTS_DEAD_AFTER_S": "2"},
                          "--metrics-port", str(port))
        line = next(ln for ln in p.output if "serving" in ln)
        assert f"metrics http://127.0.0.1:{port}/metrics" in line, line
        endpoint = re.search(r"serving (tcp://\S+)", line).group(1)
        c = h.client(endpoint)
        cid = c.register("subscriber", "served-model")["client_id"]
        c.status()
        with raw_socket(endpoint) as s:
            assert raw_call(s, b"\x81\xa1v\x09")["error"]["code"] in ("bad_message", "bad_version")
        sc = wait_until(lambda: (lambda x: x if value(
            x, "hotweights_coordinator_live_subscribers") == 1 else None)(scrape(port)),
            what="coord-serve's gauges")
        assert check_dashboard_metrics(
            sc, only=lambda n: n.startswith(("hotweights_coordinator_", "hotweights_build_info"))
        ) >= 15
        assert value(sc, "hotweights_coordinator_requests_total", method="register",
                     result="ok") == 1
        assert value(sc, "hotweights_coordinator_requests_total", method="status",
                     result="ok") == 1
        assert value(sc, "hotweights_coordinator_rejected_messages_total") >= 1
        assert value(sc, "hotweights_coordinator_registrations_total") == 1
        assert value(sc, "hotweights_coordinator_leader") == 1
        assert value(sc, "hotweights_build_info") == 1
        # only the coordinator's own series: no publisher/subscriber metrics with samples
        assert not sc.get("hotweights_window_current_buckets")
        c.heartbeat(cid)
        later = wait_until(lambda: (lambda x: x if value(
            x, "hotweights_coordinator_requests_total", method="heartbeat") >= 1 else None)(
            scrape(port)), what="a later scrape")
        assert_monotonic(sc, later)
    finally:
        h.close()


def test_coord_serve_metrics_port_in_use_is_a_clear_error(capsys, exporter_reset):
    from hotweights import cli

    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        rc = cli.main(["coord-serve", "--endpoint", "tcp://127.0.0.1:0", "--metrics-port",
                       str(busy)])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"port {busy} (--metrics-port) on 127.0.0.1 is already in use" in err, err


# --------------------------------------------------------------------------- exporter


def test_exporter_is_idempotent_and_names_a_busy_port(exporter_reset, caplog):
    port = metrics.start_exporter(0)
    assert port and metrics.exporter_url() == f"http://127.0.0.1:{port}/metrics"
    assert metrics.start_exporter(port) == port     # twice: the same exporter, no crash
    assert metrics.start_exporter(0) == port
    other = free_port()
    assert metrics.start_exporter(other) == port    # another port: warned, still one exporter
    assert f"not starting another on 127.0.0.1:{other}" in caplog.text
    assert "hotweights_build_info" in urllib.request.urlopen(metrics.exporter_url()).read().decode()
    metrics.stop_exporter()
    assert metrics.exporter_url() is None
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        with pytest.raises(metrics.MetricsError, match=f"port {busy} .*already in use"):
            metrics.start_exporter(busy)
    with pytest.raises(metrics.MetricsError, match="port=70000"):
        metrics.start_exporter(70000)


def test_autostart_uses_port_plus_local_rank(monkeypatch, exporter_reset):
    base = free_port_pair()
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = hotweights.config.load({"HOTWEIGHTS_METRICS_PORT": str(base)})
    assert metrics.autostart(cfg) == base + 1
    assert metrics.rank() == "1"
    metrics.stop_exporter()
    assert metrics.autostart(hotweights.config.load({})) is None  # 0 = off in library use
    monkeypatch.setenv("LOCAL_RANK", "two")
    with pytest.raises(metrics.MetricsError, match="LOCAL_RANK='two'"):
        metrics.autostart(cfg)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(metrics.MetricsError,
                       match=r"HOTWEIGHTS_METRICS_PORT=65534 \+ LOCAL_RANK=3"):
        metrics.autostart(hotweights.config.load({"HOTWEIGHTS_METRICS_PORT": "65534"}))


def test_local_rank_under_mpirun_and_srun(monkeypatch):
    """Open MPI's mpirun sets no LOCAL_RANK: without its own variable every rank after the
    first on a host would collide on the base port."""
    for v in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        monkeypatch.delenv(v, raising=False)
    assert metrics.local_rank() == 0
    for var in ("SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK"):
        monkeypatch.setenv(var, "2")
        assert metrics.local_rank() == 2
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's wins
    assert metrics.local_rank() == 1
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "x")
    with pytest.raises(metrics.MetricsError, match="OMPI_COMM_WORLD_LOCAL_RANK='x'"):
        metrics.local_rank()


# --------------------------------------------------------------------------- definitions


def test_names_follow_prometheus_conventions():
    assert len(metrics.SPECS) > 40
    for spec in metrics.SPECS.values():
        assert re.fullmatch(r"hotweights(_[a-z0-9]+)+", spec.name), spec.name
        assert not spec.name.endswith("_total"), spec.name
        assert spec.doc and spec.doc[0].isupper(), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and spec.buckets, spec.name
        if spec.name.endswith("_seconds"):
            assert spec.unit == "seconds", spec.name
        if spec.name.endswith("_ratio"):
            assert spec.kind == "gauge", spec.name
        assert "le" not in spec.labels and "instance" not in spec.labels
        for label in spec.labels:
            assert label in ("rank", "model", "stage", "direction", "path", "check", "reason",
                             "result", "phase", "method", "code", "version", "torch", "cuda"), \
                (spec.name, label)
    with pytest.raises(ValueError, match="without _total"):
        metrics.counter("hotweights_bad_total", "Bad.")
    with pytest.raises(ValueError, match="suffix"):
        metrics.gauge("hotweights_bad_ms", "Bad.", unit="seconds")
    assert "hotweights_bad_total" not in metrics.SPECS and "hotweights_bad_ms" not in metrics.SPECS


def test_dashboard_is_grafana_timeseries_with_variables():
    d = dashboard()
    assert d["panels"] and all(p["type"] == "timeseries" for p in d["panels"])
    ds = {"type": "prometheus", "uid": "${datasource}"}
    assert all(p["datasource"] == ds for p in d["panels"])
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource"
    assert names["datasource"]["query"] == "prometheus"
    assert names["rank"]["type"] == "query" and names["rank"]["datasource"] == ds
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_queries(d)
    # every metric it names is defined; histograms through histogram_quantile over rate()
    for expr in exprs:
        for name in METRIC_RE.findall(expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in metrics.SPECS or name in metrics.SPECS, f"{name} in {expr!r}"
        if "_bucket{" in expr:
            assert "histogram_quantile(" in expr and "[$__rate_interval]" in expr, expr
        for counter in re.findall(r"hotweights_\w+_total", expr):
            assert re.search(rf"(rate|increase)\({counter}", expr), expr
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for topic in ("window", "in flight", "p50 / p95 vs target", "congestion", "path utilization",
                  "bandwidth", "versions", "pause", "coordinator"):
        assert topic in titles, topic
    assert any("rate(hotweights_sent_bytes_total" in e for e in exprs)


def test_docs_describe_every_metric():
    with open(DOCS) as f:
        doc = f.read()
    for spec in metrics.SPECS.values():
        assert f"`{spec.exposed}`" in doc, f"docs/metrics.md lacks {spec.exposed}"
    for name in set(METRIC_RE.findall(doc)):
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert base in metrics.SPECS or name in metrics.SPECS, f"docs name unknown {name}"


def test_every_coordinator_counter_and_gauge_has_a_metric():
    src = ""
    for f in ("state.py", "server.py"):
        with open(os.path.join(REPO, "hotweights", "coordinator", f)) as fh:
            src += fh.read()
    literal = set(re.findall(r'count\("([^"]+)"', src))
    assert {"handles.posted", "versions.aborted", "rejected.bad_message"} <= literal
    for name in literal:
        assert metrics.coordinator_metric(name, "counter") is not None, name
    for pattern in re.findall(r'count\(f"([^"]+)"', src):
        name = pattern.replace("{method}", "publish").replace("{e.code}", "bad_args")
        assert "{" not in name, pattern
        assert metrics.coordinator_metric(name, "counter") is not None, name
    seen: set = set()
    c = Coordinator(hook=lambda n, v, k: seen.add((n, k)), heartbeat_s=0.1, dead_after_s=1.0)
    c.start()
    try:
        wait_until(lambda: ("leader", "gauge") in seen and ("parked", "gauge") in seen,
                   what="gauges")
    finally:
        c.stop()
    for name, kind in seen:
        assert metrics.coordinator_metric(name, kind) is not None, (name, kind)


@pytest.mark.parametrize("reason,cls", [
    ("publisher died", "publisher_died"),
    ("publisher left", "publisher_left"),
    ("subscriber c1 died", "subscriber_died"),
    ("subscriber c1 left", "subscriber_left"),
    ("superseded by version 7", "superseded"),
    ("timeout", "timeout"),
    ("timeout while streaming buckets", "timeout"),
    ("timeout after 5.0 s", "timeout"),
    ("rejected by every live expected subscriber", "rejected"),
    ("tensor 'w' changed while version 3 was being published; publish again", "source_changed"),
    ("bucket 0 failed 3 times (c1: checksum mismatch in bucket 0: got 1, expected 2)", "checksum"),
    ("bucket 0 failed 3 times (expired)", "retries_exhausted"),
    ("sending bucket 2 failed: RuntimeError: boom", "send_failed"),
    ("aborted by pub-1", "requested"),
    ("the operator said so", "other"),
    (None, "other"),
])
def test_abort_reasons_are_a_bounded_set(reason, cls):
    assert metrics.abort_reason(reason) == cls
    assert cls in metrics.ABORT_REASONS


def test_label_values_stay_bounded(caplog):
    spec = metrics.SPECS["hotweights_bucket_duration_seconds"]
    metrics._strangers.pop((spec.name, "stage"), None)  # warned once per value and process
    assert metrics._value(spec, spec.labels.index("stage"), "bogus") == "other"
    assert "not one of" in caplog.text
    free = metrics.SPECS["hotweights_coordinator_rejected_messages"]
    metrics._free_seen.pop((free.name, "code"), None)
    got = {metrics._value(free, 0, f"code{i}") for i in range(metrics.MAX_FREE_VALUES + 20)}
    assert len(got) == metrics.MAX_FREE_VALUES + 1 and "other" in got
    metrics._free_seen.pop((free.name, "code"), None)
    assert metrics.path_label("cpu", "cpu") == "cpu->cpu"
    assert metrics.path_label(torch.device("cpu"), "cuda:0") == "host->cuda"
    assert metrics.path_label("cuda:1", "cpu") == "cuda->host"
    assert metrics.path_label("cuda:0", "cuda:0") == "cuda->cuda"
    assert metrics.path_label("cuda:0", "cuda:1") == "cuda->peer"


# --------------------------------------------------------------------------- no prometheus_client


NO_PROM = r"""
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
import torch, hotweights
from hotweights import metrics, info
from hotweights.coordinator import start_embedded
assert not metrics.AVAILABLE and "prometheus_client is not installed" in metrics.UNAVAILABLE_REASON
assert metrics.start_exporter(0) is None
c = start_embedded()
src, dst = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
h = dst.register_hotweights(name="np", endpoint=c.endpoint, commit="manual")
pub = hotweights.Publisher(src, name="np", endpoint=c.endpoint, bucket_bytes=4096)
r = pub.publish()
h.wait(r.version, timeout=60)
assert torch.equal(dst.weight, src.weight)
pub.close(); h.close(); c.stop()
print(info.render(info.collect()).splitlines()[-2])
print("OK")
"""


def test_library_works_without_prometheus_client():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HOTWEIGHTS_METRICS_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "-c", NO_PROM], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("OK"), p.stdout
    assert "Prometheus metrics: no (prometheus_client is not installed" in p.stdout, p.stdout
    assert "metrics exporter not started: prometheus_client is not installed" in p.stderr
