# SPDX-License-Identifier: Apache-2.0
"""``hotweights info``: what this installation was built with and what it can reach.

Works on a machine with no GPU and no driver: every probe reports its reason instead of
failing, and nothing here initialises MPI or starts CUDA work beyond device queries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from typing import Any

import torch

from . import _C
from . import config as _config
from .ops import HAS_CUDA_BUILD

__all__ = ["collect", "render", "build_info"]


def build_info() -> dict[str, Any]:
    """The build record compiled into _C (torch version, CUDA on/off, arch list, ...)."""
    return dict(_C.build_info())


def _cuda() -> dict[str, Any]:
    out: dict[str, Any] = {
        "compiled": HAS_CUDA_BUILD,
        "torch_cuda_version": torch.version.cuda,
        "runtime_version": None,
        "driver_version": None,
        "device_count": 0,
        "devices": [],
        "peer_access": [],
        "status": "",
    }
    if HAS_CUDA_BUILD:
        out["runtime_version"] = _C.cuda.runtime_version()
        out["driver_version"] = _C.cuda.driver_version() or None
        n, err = _C.cuda.device_count()
        out["device_count"] = n
        if n:
            out["devices"] = [dict(d) | {"capability": list(d["capability"]), "pci": list(d["pci"])}
                              for d in _C.cuda.devices()]
            out["peer_access"] = [list(r) for r in _C.cuda.peer_access_matrix()]
            out["status"] = f"{n} device(s) usable"
        else:
            out["status"] = err or "no CUDA device"
    else:
        out["status"] = "hotweights._C built without CUDA"
        if torch.version.cuda is None:
            out["status"] += f" (torch {torch.__version__} is a CPU build)"
    return out


def _mpi() -> dict[str, Any]:
    spec = importlib.util.find_spec("mpi4py")
    launcher = next((x for x in ("mpirun", "mpiexec") if shutil.which(x)), None)
    under = next((k for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
                  if k in os.environ), None)
    out = {"mpi4py": spec is not None, "launcher": launcher, "under_launcher": under is not None}
    if spec is not None:
        import mpi4py  # importing the package does not initialise MPI (mpi4py.MPI would)

        out["mpi4py_version"] = mpi4py.__version__
    out["available"] = bool(spec is not None and (launcher or under))
    return out


def _ucx() -> dict[str, Any]:
    for mod in ("ucxx", "ucp"):
        if importlib.util.find_spec(mod) is not None:
            return {"available": True, "module": mod}
    return {"available": False, "reason": "neither ucxx nor ucx-py is installed (pip install hotweights[ucx])"}


def _redis(url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"url": url, "client": importlib.util.find_spec("redis") is not None}
    if not out["client"]:
        out.update(reachable=False, reason="redis-py not installed (pip install redis)")
        return out
    import redis

    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        out["server_version"] = r.info("server").get("redis_version")
        out["reachable"] = True
        r.close()
    except Exception as e:  # any connection failure is a "no", with its reason
        out.update(reachable=False, reason=f"{type(e).__name__}: {e}")
    return out


def _zmq() -> dict[str, Any]:
    try:
        import zmq
    except ImportError:
        return {"available": False, "reason": "pyzmq not installed"}
    return {"available": True, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def _gds() -> dict[str, Any]:
    if importlib.util.find_spec("kvikio") is None:
        return {"available": False, "reason": "kvikio not installed (pip install hotweights[gds])"}
    try:
        import kvikio
        import kvikio.defaults

        mode = str(kvikio.defaults.get("compat_mode")) if hasattr(kvikio.defaults, "get") else "?"
        return {"available": True, "kvikio": kvikio.__version__, "compat_mode": mode}
    except Exception as e:
        return {"available": False, "reason": f"kvikio import failed: {type(e).__name__}: {e}"}


def _metrics(cfg) -> dict[str, Any]:
    from . import metrics

    return {**metrics.status(), "port": cfg.metrics_port, "addr": cfg.metrics_addr}


def collect() -> dict[str, Any]:
    """Everything ``hotweights info --json`` prints."""
    cfg = _config.get()
    from .transport import select_transport  # late: transports import more of the package

    return {
        "version": _C.build_info()["version"],
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "build": build_info(),
        "cuda": _cuda(),
        "mpi": _mpi(),
        "ucx": _ucx(),
        "redis": _redis(cfg.redis_url),
        "zmq": _zmq(),
        "gds": _gds(),
        "metrics": _metrics(cfg),
        "transport": select_transport(explain=True),
    }


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def render(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`collect`'s result."""
    b, c = info["build"], info["cuda"]
    lines = [
        f"hotweights {info['version']} (git {b['git_sha']}, built {b['build_time']})",
        f"python {info['python']}  torch {info['torch']}  host {info['host']}",
        f"built against torch {b['torch_version']} with {b['compiler']}",
        f"CUDA compiled:   {_yn(c['compiled'])}"
        + (f" (nvcc {b['nvcc_version']}, arch {b['cuda_arch_list']})" if c["compiled"] else
           f" ({b['cuda_decision']})"),
        f"CUDA runtime:    {c['runtime_version'] or '-'}   driver: {c['driver_version'] or '-'}",
        f"CUDA status:     {c['status']}",
        f"GPUs:            {c['device_count']}",
    ]
    for d in c["devices"]:
        lines.append(f"  [{d['index']}] {d['name']}  {d['uuid']}  sm_{d['capability'][0]}{d['capability'][1]}"
                     f"  {d['total_memory'] / 2**30:.1f} GiB")
    if c["peer_access"]:
        lines.append("peer access (row can read column):")
        for i, row in enumerate(c["peer_access"]):
            lines.append(f"  {i}: " + " ".join("Y" if x else "." for x in row))
    m = info["mpi"]
    lines.append(f"MPI:             {_yn(m['available'])} (mpi4py {m.get('mpi4py_version', 'missing')},"
                 f" launcher {m['launcher'] or 'none'}, under launcher {_yn(m['under_launcher'])})")
    u = info["ucx"]
    lines.append(f"UCX:             {_yn(u['available'])}" + (f" ({u.get('module')})" if u["available"] else f" ({u['reason']})"))
    r = info["redis"]
    lines.append(f"Redis:           {_yn(r['reachable'])} at {r['url']}"
                 + (f" (server {r['server_version']})" if r["reachable"] else f" ({r['reason']})"))
    z = info["zmq"]
    lines.append(f"ZeroMQ:          {_yn(z['available'])}" + (f" (pyzmq {z['pyzmq']}, libzmq {z['libzmq']})" if z["available"] else f" ({z['reason']})"))
    g = info["gds"]
    lines.append(f"GPUDirect Storage: {_yn(g['available'])}" + (f" (kvikio {g['kvikio']}, compat {g['compat_mode']})" if g["available"] else f" ({g['reason']})"))
    mt = info["metrics"]
    if mt["available"]:
        where = (f"library processes export on {mt['addr']}:{mt['port']} + local rank"
                 if mt["port"] else "exporter off (HOTWEIGHTS_METRICS_PORT=0)")
        lines.append(f"Prometheus metrics: yes (prometheus_client {mt['prometheus_client']}; "
                     f"{where})")
    else:
        lines.append(f"Prometheus metrics: no ({mt['reason']})")
    t = info["transport"]
    lines.append(f"transport:       {t['selected']} ({t['reason']})")
    return "\n".join(lines)
