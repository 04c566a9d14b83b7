# SPDX-License-Identifier: Apache-2.0
"""The ``hotweights`` command. Each subcommand lives beside the code it drives; this file
only wires them up (imports stay lazy so that ``hotweights --help`` is quick)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _cmd_info(args) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2, default=str) if args.json else info.render(data))
    return 0


def _cmd_config(args) -> int:
    from . import config

    cfg = config.get()
    if args.markdown:
        print("| setting | default | meaning |\n|---|---|---|")
        for s in config.settings():
            d = s.default
            d = "unset" if d is None else ("1" if d is True else "0" if d is False else d)
            print(f"| `{s.env}` | `{d}` | {s.doc} |")
        return 0
    for k, v in cfg.as_env().items():
        print(f"{k}={v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hotweights",
        description="Push new model weights into running processes: publish versions, serve "
                    "them, inspect the coordinator, plan, check and benchmark.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    s = sub.add_parser("info", help="build record, CUDA, GPUs, MPI/UCX/Redis/ZeroMQ/GDS availability")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)
    s = sub.add_parser("config", help="print the effective HOTWEIGHTS_* settings")
    s.add_argument("--markdown", action="store_true", help="print the settings table (README)")
    s.set_defaults(fn=_cmd_config)
    for mod in _SUBCOMMAND_MODULES:
        __import__(f"hotweights.{mod}", fromlist=["add_cli"]).add_cli(sub)
    return p


# Modules that contribute subcommands through add_cli(subparsers).
_SUBCOMMAND_MODULES: list[str] = ["coordinator.cli", "storage", "plan", "kv", "optim", "demo",
                                   "topo", "presets", "simulate", "bench"]


def main(argv=None) -> int:
    from .config import ConfigError

    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "fn", None):
        p.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, ValueError, RuntimeError, TimeoutError, OSError) as e:
        print(f"hotweights {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
