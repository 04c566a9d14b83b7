# SPDX-License-Identifier: Apache-2.0
"""Named settings for common node types (``hotweights preset``); docs/PRESETS.md explains every
value and when to deviate from it.

A preset is only environment: ``HOTWEIGHTS_*`` variables, each validated by
:func:`hotweights.config.load` like any other setting. Apply one with
``eval "$(hotweights preset nvlink --shell)"`` or ``env $(hotweights preset pcie) python ...``;
explicit arguments in code still win over it. ``hotweights preset --detect`` recommends one
from :mod:`hotweights.topo`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from typing import Mapping

from . import config as _config

__all__ = ["Preset", "PRESETS", "get", "config_for", "detect", "add_cli"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named environment: variables in order, what the preset is for, why each value."""

    name: str
    summary: str
    env: Mapping[str, str]
    why: Mapping[str, str]

    def shell(self) -> str:
        """``export K=V`` lines (values shell-quoted)."""
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.env.items())


def _p(name: str, summary: str, *items: tuple[str, str, str]) -> Preset:
    return Preset(name, summary, {k: v for k, v, _ in items}, {k: w for k, _, w in items})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _p("nvlink", "GPUs joined by NVLink/NVSwitch (HGX/DGX): big chunks on several streams, a deep window",
       ("HOTWEIGHTS_IPC_COPY_CHUNK_MB", "64", "64 MiB chunks keep each copy engine busy long enough to hide launch and event overhead on a 300-450 GB/s link"),
       ("HOTWEIGHTS_IPC_COPY_STREAMS", "4", "4 streams spread chunks over several copy engines; NVLink has the bandwidth to feed them"),
       ("HOTWEIGHTS_IPC_INFLIGHT_BUCKETS", "6", "start with 6 buckets in flight: a bucket crosses NVLink in well under a control round trip plus scatter, so more are needed to fill the pipe"),
       ("HOTWEIGHTS_IPC_MIN_INFLIGHT", "2", "never fewer than 2: double buffering is the floor for overlap"),
       ("HOTWEIGHTS_IPC_MAX_INFLIGHT", "12", "up to 12 (also the ring's slot count: 12 x HOTWEIGHTS_BUCKET_MB of GPU staging)"),
       ("HOTWEIGHTS_IPC_TARGET_BUCKET_MS", "200", "a bucket slower than ~200 ms means queueing on a fast link: shrink the window"),
       ("HOTWEIGHTS_USE_GDS", "1", "prefer GPUDirect Storage for checkpoint reads (falls back to host reads when kvikio/GDS is absent; 'require' makes that an error)")),
    _p("pcie", "GPUs without NVLink (PCIe peer-to-peer or host-staged): small chunks, few streams, a shallow window",
       ("HOTWEIGHTS_IPC_COPY_CHUNK_MB", "8", "8 MiB chunks: PCIe (25-55 GB/s) is saturated by small transfers and big ones only add latency"),
       ("HOTWEIGHTS_IPC_COPY_STREAMS", "2", "2 streams: one copy engine per direction is what PCIe can feed"),
       ("HOTWEIGHTS_IPC_COPY_AUTOTUNE", "0", "autotune off: the explicit PCIe values apply to every path"),
       ("HOTWEIGHTS_IPC_INFLIGHT_BUCKETS", "3", "start with 3 buckets in flight: the link, not the round trip, is the bottleneck"),
       ("HOTWEIGHTS_IPC_MIN_INFLIGHT", "1", "may drop to 1 when the link is shared and buckets queue"),
       ("HOTWEIGHTS_IPC_MAX_INFLIGHT", "6", "at most 6 (and 6 ring slots): deeper windows only queue on PCIe"),
       ("HOTWEIGHTS_IPC_TARGET_BUCKET_MS", "350", "a 64 MiB bucket takes ~1-3 ms of PCIe time; allow 350 ms of service time before shrinking")),
    _p("redis-ha", "A coordinator whose state survives restarts and fails over (Redis backend)",
       ("HOTWEIGHTS_COORD_BACKEND", "redis", "keep versions, handles and votes in Redis so a restarted or standby coordinator takes over"),
       ("HOTWEIGHTS_REDIS_URL", "redis://127.0.0.1:6379/0", "where Redis is: replace with your server (hotweights preset redis-ha --redis-url URL)"),
       ("HOTWEIGHTS_HANDLE_TTL", "45", "a handle lease of 45 s outlives a leader takeover (HOTWEIGHTS_LEADER_LEASE_S, 5 s) with margin")),
    _p("kv-safe", "Keep KV caches across weight updates with conservative transforms (GQA head remap, RoPE, FP8 requant)",
       ("HOTWEIGHTS_KV_ALLOW_TRANSFORMS", "1", "transform cached K/V when a change is representable exactly (head permutation, RoPE re-rotation, FP8 rescale) instead of invalidating"),
       ("HOTWEIGHTS_KV_HEAD_ORDER", "grouped", "query heads map to KV heads in contiguous groups (Llama, Qwen, Mistral); set interleaved for models that stripe them")),
    _p("opt-attenuate", "Trainer replicas: scale the first Adam moment of parameters a commit changed",
       ("HOTWEIGHTS_OPT_POLICY", "attenuate", "keep the second moment, shrink the first: the next step is not driven by momentum of the replaced weights"),
       ("HOTWEIGHTS_OPT_ATTENUATION", "0.5", "halve it: 0.61x the next update size at k=1 vs preserve in our measurement (docs/optim.md)")),
)}


def get(name: str) -> Preset:
    """The preset called ``name``; a ValueError lists the valid names."""
    p = PRESETS.get(name)
    if p is None:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return p


def config_for(name: str, base: Mapping[str, str] | None = None, **overrides):
    """The validated Config a process would read with ``base`` (default: empty) plus the
    preset's environment (the preset wins over ``base``)."""
    return _config.load({**(base or {}), **get(name).env}, **overrides)


def detect(topology=None) -> tuple[str | None, str]:
    """(preset name or None, reason) for this machine's topology (hotweights.topo)."""
    if topology is None:
        from . import topo

        topology = topo.get()
    n = topology.num_gpus
    src = topology.source
    if n == 0:
        return None, (f"no GPU visible ({src}): no transport preset applies; the defaults suit CPU "
                      "shared memory")
    kinds = topology.summary()["kinds"]
    pairs = sum(kinds.values())
    nv = kinds.get("nvlink", 0)
    if n == 1:
        return "pcie", (f"one GPU ({src}): updates arrive host->device over PCIe or stay on the "
                        "device; the PCIe window and chunking fit")
    if nv == pairs:
        m = topology.summary()["min_nvlinks"]
        links = f" with >= {m} links each" if m else ""
        return "nvlink", f"all {pairs} GPU pairs are NVLink{links} (source: {src})"
    if kinds.get("pcie_or_better"):
        return "pcie", (f"{kinds['pcie_or_better']} of {pairs} GPU pairs have peer access but the "
                        f"link is unknown (source: {src}); NVLink is not assumed (install "
                        "nvidia-ml-py or nvidia-smi to check)")
    if nv:
        return "pcie", (f"only {nv} of {pairs} GPU pairs are NVLink (source: {src}): the PCIe pairs "
                        "set the pace; HOTWEIGHTS_IPC_COPY_AUTOTUNE=1 without explicit "
                        "chunk/streams would still give NVLink pairs 64 MiB x 4")
    return "pcie", f"no GPU pair is NVLink ({dict(kinds)}, source: {src})"


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("preset", help="print the environment of a named preset "
                              f"({', '.join(PRESETS)}), or recommend one (--detect)")
    s.add_argument("name", nargs="?", choices=list(PRESETS), help="preset to print")
    s.add_argument("--shell", action="store_true", help="print `export K=V` lines")
    s.add_argument("--json", action="store_true", help="print JSON (values and reasons)")
    s.add_argument("--detect", action="store_true", help="recommend a preset from the topology")
    s.add_argument("--list", action="store_true", help="list the presets")
    s.add_argument("--redis-url", help="redis-ha: the Redis URL to use (validated)")
    s.set_defaults(fn=_cmd_preset)


def _cmd_preset(args) -> int:
    if args.list and (args.detect or args.name):
        raise ValueError("--list lists every preset: it takes no name and no --detect")
    if args.shell and args.json:
        raise ValueError("--shell and --json: pick one output form")
    if args.redis_url is not None and not args.redis_url:
        raise ValueError("--redis-url '': expected a redis:// URL")
    if args.list:
        for p in PRESETS.values():
            print(f"{p.name:14s} {p.summary}")
        return 0
    reason = None
    name = args.name
    if args.detect:
        name, reason = detect()
        if name is None and args.name:
            raise ValueError(f"--detect recommends no preset ({reason}), but {args.name!r} "
                             "was named")
        if name is None:
            print(json.dumps({"preset": None, "reason": reason}) if args.json
                  else f"# no preset recommended: {reason}")
            return 0
        if args.name and args.name != name:
            raise ValueError(f"--detect recommends {name!r}, but {args.name!r} was named")
    if not name:
        raise ValueError(f"name a preset ({', '.join(PRESETS)}), or pass --detect or --list")
    p = get(name)
    if args.redis_url:
        if name != "redis-ha":
            raise ValueError(f"--redis-url applies to the redis-ha preset, not {name!r}")
        p = dataclasses.replace(p, env={**p.env, "HOTWEIGHTS_REDIS_URL": args.redis_url})
    _config.load(dict(p.env))  # a bad value (e.g. --redis-url) fails here, naming the variable
    if args.json:
        print(json.dumps({"preset": p.name, "summary": p.summary, "reason": reason,
                          "env": dict(p.env), "why": dict(p.why)}, indent=2))
        return 0
    if reason:  # a comment in shell output; stderr otherwise, so `env $(...)` stays clean
        print(f"# recommended preset: {p.name} ({reason})",
              file=None if args.shell else sys.stderr)
    if args.shell:
        print(f"# hotweights preset {p.name}: {p.summary}")
        print(p.shell())
    else:
        for k, v in p.env.items():
            print(f"{k}={v}")
    return 0
