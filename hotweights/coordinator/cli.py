# SPDX-License-Identifier: Apache-2.0
"""``hotweights coord-serve`` and ``hotweights status``."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

__all__ = ["add_cli", "render_status", "DEFAULT_METRICS_PORT"]

DEFAULT_METRICS_PORT = 9464  # coord-serve exports metrics unless --metrics-port 0


def add_cli(sub) -> None:
    """Adds the coordinator's subcommands to the ``hotweights`` parser."""
    s = sub.add_parser("coord-serve", help="run the coordinator (ZeroMQ; memory or Redis state)",
                       description="Run the coordinator until SIGTERM/SIGINT. Unset options "
                       "come from HOTWEIGHTS_* (the token only from HOTWEIGHTS_COORD_TOKEN, "
                       "never from the command line, where `ps` would show it).")
    s.add_argument("--endpoint", help="ROUTER bind address (default: the first of "
                   "HOTWEIGHTS_COORD_ENDPOINT, else tcp://127.0.0.1:5555; port 0 picks one)")
    s.add_argument("--pub-endpoint", help="PUB bind address for notifications (default: none)")
    s.add_argument("--backend", choices=("memory", "redis"),
                   help="state backend (default HOTWEIGHTS_COORD_BACKEND)")
    s.add_argument("--redis-url", help="Redis URL (default HOTWEIGHTS_REDIS_URL)")
    s.add_argument("--redis-prefix", default="hotweights",
                   help="key prefix in Redis; coordinators of one deployment share it")
    s.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"Prometheus exporter port (default {DEFAULT_METRICS_PORT}; 0 = off); "
                   "see docs/metrics.md")
    s.add_argument("--metrics-addr", help="address the exporter listens on (default "
                   "HOTWEIGHTS_METRICS_ADDR, 127.0.0.1; 0.0.0.0 for a remote Prometheus)")
    s.set_defaults(fn=_cmd_serve)
    s = sub.add_parser("status", help="models, versions, subscribers and lag, handles, counters")
    s.add_argument("--endpoint", help="coordinator address(es) (default "
                   "HOTWEIGHTS_COORD_ENDPOINT)")
    s.add_argument("--model", help="only this model")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_status)


def _cmd_serve(args) -> int:
    from .. import config
    from .server import Coordinator

    cfg = config.get()
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    endpoint = args.endpoint or (cfg.coord_endpoint or "tcp://127.0.0.1:5555").split(",")[0]
    hook, metrics_url = None, "off"
    if args.metrics_port:
        from .. import metrics

        metrics.set_rank("coordinator")
        port = metrics.start_exporter(args.metrics_port, args.metrics_addr,
                                      source="--metrics-port")
        if port is not None:
            metrics.activate("coordinator")  # served from the first scrape
            hook, metrics_url = metrics.coordinator_hook, metrics.exporter_url()
        else:
            metrics_url = f"off ({metrics.UNAVAILABLE_REASON})"
    coord = Coordinator(endpoint=endpoint.strip(), pub_endpoint=args.pub_endpoint,
                        backend=args.backend, redis_url=args.redis_url,
                        redis_prefix=args.redis_prefix, hook=hook)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        coord.start()
        print(f"hotweights coordinator serving {coord.endpoint} (pub {coord.pub_endpoint}, "
              f"{coord.backend.describe()}, {'leader' if coord.is_leader else 'standby'}; "
              f"metrics {metrics_url})", flush=True)
        while not stop.wait(0.5):
            if not coord.running:
                print("hotweights coordinator: the serving loop ended", file=sys.stderr)
                return 1
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if coord.running:
            coord.stop()
    return 0


def _cmd_status(args) -> int:
    from .. import config
    from .client import Client

    endpoint = args.endpoint or config.get().coord_endpoint
    if not endpoint:
        raise ValueError("no coordinator to ask: pass --endpoint or set "
                         "HOTWEIGHTS_COORD_ENDPOINT")
    with Client(endpoint) as c:
        st = c.status(args.model)
    print(json.dumps(st, indent=2, default=repr) if args.json else render_status(st))
    return 0


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join("  " + ln for ln in lines)


def _ago(s) -> str:
    return "-" if s is None else f"{s:.1f}s"


def render_status(st: dict) -> str:
    """The status reply as readable tables."""
    c = st.get("coordinator", {})
    out = [f"coordinator {c.get('endpoint')}  {'leader' if c.get('leader') else 'standby'}  "
           f"epoch {c.get('epoch')}  {c.get('backend')}  auth {'on' if c.get('auth') else 'off'}"
           f"  up {_ago(c.get('uptime_s'))}  pub {c.get('pub_endpoint') or '-'}"]
    for name, m in st.get("models", {}).items():
        out.append(f"\nmodel {name}: current {m['current'] if m['current'] is not None else '-'}"
                   f", latest {m['latest'] or '-'}")
        if m["versions"]:
            out.append(_table(
                ["version", "state", "label", "age", "expected", "required", "precommit",
                 "rejected", "applied", "reason"],
                [[v["version"], v["state"], v["label"], _ago(v["age_s"]), v["expected"],
                  v["required"], v["precommitted"], v["rejected"], v["applied"], v["reason"]]
                 for v in m["versions"]]))
        if m["clients"]:
            out.append(_table(
                ["client", "role", "node", "device", "alive", "state", "version", "lag", "seen",
                 "progress"],
                [[x["client_id"], x["role"], x["node"], x["device"],
                  "yes" if x["alive"] else "DEAD", x["state"], x["version"], x["lag"],
                  _ago(x["last_seen_ago_s"]),
                  (f"v{x['progress']['version']} {x['progress']['buckets']}b "
                   f"{x['progress']['bytes']}B") if x.get("progress") else None]
                 for x in m["clients"]]))
        if m["handles"]:
            out.append(_table(
                ["handle", "owner", "version", "seq", "consumers", "acked", "nacked", "lease"],
                [[h["handle_id"], h["owner"], h["version"], h["seq"], h["consumers"], h["acked"],
                  h["nacked"], _ago(h["expires_in"])] for h in m["handles"]]))
    g = st.get("gauges", {})
    out.append("\n" + "  ".join(f"{k} {v}" for k, v in g.items()))
    if st.get("counters"):
        out.append(_table(["counter", "value"], [[k, v] for k, v in st["counters"].items()]))
    out.append(f"(as of {time.strftime('%H:%M:%S')})")
    return "\n".join(out)
