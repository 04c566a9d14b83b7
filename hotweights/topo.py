# SPDX-License-Identifier: Apache-2.0
"""Topology: which link joins each pair of GPUs, and where each GPU sits on the host.

Sources, best first; the first that answers wins and the result names it:

1. ``nvml``: NVML through ``pynvml`` (package nvidia-ml-py, optional) when it imports and a
   driver answers. NVLink link counts per pair (direct links, or links into NVSwitches for
   GPUs that both reach the switch fabric and report NVLink P2P), PCIe common ancestor,
   NUMA node and CPU affinity.
2. ``nvidia-smi``: parses ``nvidia-smi topo -m`` (NV#, PIX, PXB, PHB, NODE, SYS/SOC, X), plus
   ``nvidia-smi --query-gpu`` for names and PCI bus ids.
3. ``peer-probe``: ``cudaDeviceCanAccessPeer`` from a CUDA build of ``_C``. Peer access is
   granted over NVLink and over PCIe alike, so these pairs are labelled "PCIe or better,
   unknown" and are never called NVLink.
4. ``none``: no GPU visible; the result describes the host only (cores, NUMA nodes).

Note [Topology indices]: NVML and nvidia-smi number GPUs in PCI order; CUDA numbers the
devices it sees (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER). The link classifier that the copy
engine uses maps CUDA indices to topology indices by PCI bus id when the CUDA build can tell
them, else through CUDA_VISIBLE_DEVICES, else one to one (and says so in ``notes``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from typing import Any, Callable, Sequence

__all__ = [
    "Link", "GPU", "Topology", "TopologyError", "discover", "get", "reset", "from_nvml",
    "parse_nvidia_smi", "from_peer_matrix", "host_info", "install_classifier", "add_cli",
]


class TopologyError(RuntimeError):
    """A topology source answered with something that cannot be read."""


# PCIe path codes of `nvidia-smi topo -m`, nearest first; SOC is the pre-2017 name of SYS.
PCIE_PATHS = ("PIX", "PXB", "PHB", "NODE", "SYS")
_PATH_MEANING = {
    "PIX": "at most one PCIe bridge",
    "PXB": "several PCIe bridges, no host bridge",
    "PHB": "through a PCIe host bridge (the CPU)",
    "NODE": "across PCIe host bridges within one NUMA node",
    "SYS": "across NUMA nodes (QPI/UPI/xGMI)",
}
LINK_KINDS = ("same_device", "nvlink", "pcie", "pcie_or_better", "none", "unknown")


@dataclasses.dataclass(frozen=True)
class Link:
    """How two GPUs are joined.

    ``kind``: ``same_device``; ``nvlink`` (``nvlinks`` bonded links, None when the source could
    not count them); ``pcie`` (``path`` is the nvidia-smi code PIX/PXB/PHB/NODE/SYS);
    ``pcie_or_better`` (peer access works, the link is unknown: peer probe only); ``none`` (no
    peer access: copies are staged through host memory); ``unknown`` (``path`` holds what the
    source said).
    """

    kind: str
    nvlinks: int | None = None
    path: str | None = None

    def __post_init__(self):
        if self.kind not in LINK_KINDS:
            raise ValueError(f"Link: kind={self.kind!r}, expected one of {', '.join(LINK_KINDS)}")

    def label(self) -> str:
        """Short cell text: X, NV18, NV?, PIX..SYS, P2P?, -, ?raw."""
        if self.kind == "same_device":
            return "X"
        if self.kind == "nvlink":
            return f"NV{self.nvlinks}" if self.nvlinks else "NV?"
        if self.kind == "pcie":
            return self.path or "PCIe"
        if self.kind == "pcie_or_better":
            return "P2P?"
        if self.kind == "none":
            return "-"
        return f"?{self.path or ''}"

    def describe(self) -> str:
        """Long text for one pair."""
        if self.kind == "same_device":
            return "same device"
        if self.kind == "nvlink":
            return f"NVLink x{self.nvlinks}" if self.nvlinks else "NVLink (link count unknown)"
        if self.kind == "pcie":
            return f"PCIe {self.path} ({_PATH_MEANING.get(self.path or '', 'path unknown')})"
        if self.kind == "pcie_or_better":
            return "PCIe or better, unknown (peer access granted; NVLink not confirmed)"
        if self.kind == "none":
            return "no peer access (copies staged through host memory)"
        return f"unknown ({self.path!r})"

    def ops_kind(self) -> str:
        """The link kind hotweights.ops keys its autotune seeds by."""
        if self.kind == "same_device":
            return "same_device"
        if self.kind == "nvlink":
            return "peer_nvlink"
        if self.kind in ("pcie", "none"):
            # Without peer access the copy crosses PCIe twice through host memory: the PCIe
            # seed (small chunks, few streams) fits it as well.
            return "peer_pcie"
        return "peer"  # pcie_or_better, unknown: neither seed is justified

    def to_dict(self) -> dict:
        return {"kind": self.kind, "nvlinks": self.nvlinks, "path": self.path,
                "label": self.label()}


@dataclasses.dataclass
class GPU:
    """One GPU as the topology source numbers it (Note [Topology indices])."""

    index: int
    name: str | None = None
    bus_id: str | None = None          # 0000:18:00.0 (sysfs form), lower case
    numa_node: int | None = None
    cpu_affinity: str | None = None    # cpulist, e.g. 0-55,112-167
    nvlinks: int | None = None         # active NVLink links of this GPU (NVML only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Topology:
    """GPU-pair link matrix, per-GPU placement, host CPUs; ``source`` says who answered."""

    source: str                        # nvml | nvidia-smi | peer-probe | none | file
    gpus: list[GPU]
    links: list[list[Link]]
    host: dict[str, Any]
    indexing: str = "pci"              # pci (NVML, nvidia-smi) or cuda (peer probe)
    nics: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        n = len(self.gpus)
        if len(self.links) != n or any(len(r) != n for r in self.links):
            raise TopologyError(f"link matrix is {len(self.links)}x"
                                f"{[len(r) for r in self.links]} for {n} GPUs")

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    def link(self, i: int, j: int) -> Link:
        """The link between GPUs i and j (topology indices)."""
        n = self.num_gpus
        if not (0 <= i < n and 0 <= j < n):
            raise IndexError(f"GPU pair ({i}, {j}) out of range for {n} GPU(s)")
        return self.links[i][j]

    def pairs(self) -> list[tuple[int, int, Link]]:
        """Every unordered pair of distinct GPUs with its link."""
        return [(i, j, self.links[i][j]) for i in range(self.num_gpus)
                for j in range(i + 1, self.num_gpus)]

    def summary(self) -> dict[str, Any]:
        """Counts of pair kinds (the preset detector's input)."""
        kinds = Counter(lk.kind for _, _, lk in self.pairs())
        nv = [lk.nvlinks for _, _, lk in self.pairs() if lk.kind == "nvlink" and lk.nvlinks]
        return {"gpus": self.num_gpus, "pairs": len(self.pairs()), "kinds": dict(kinds),
                "min_nvlinks": min(nv) if nv else None}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "indexing": self.indexing,
                "gpus": [g.to_dict() for g in self.gpus],
                "links": [[lk.to_dict() for lk in row] for row in self.links],
                "matrix": [[lk.label() for lk in row] for row in self.links],
                "host": self.host, "nics": self.nics, "notes": self.notes,
                "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Topology":
        """Inverse of to_dict (``hotweights topo --json`` output)."""
        try:
            gpus = [GPU(**{k: g.get(k) for k in ("index", "name", "bus_id", "numa_node",
                                                   "cpu_affinity", "nvlinks")}) for g in d["gpus"]]
            links = [[Link(c["kind"], c.get("nvlinks"), c.get("path")) for c in row]
                     for row in d["links"]]
        except (KeyError, TypeError) as e:
            raise TopologyError(f"not a topology dict (missing {e})") from None
        return cls(d.get("source", "file"), gpus, links, d.get("host", {}),
                   d.get("indexing", "pci"), d.get("nics", []), d.get("notes", []))

    def render(self) -> str:
        """The human-readable matrix, placement, host and notes."""
        out = [f"topology source: {self.source}"]
        if not self.gpus:
            out.append("no GPU visible: CPU-only topology")
        else:
            names = Counter(g.name for g in self.gpus if g.name)
            what = ", ".join(f"{c}x {n}" for n, c in names.items()) or "names unknown"
            out.append(f"{self.num_gpus} GPU(s): {what}")
            cols = [f"GPU{g.index}" for g in self.gpus]
            head = ["", *cols, "NUMA", "CPU affinity", "bus id"]
            rows = [head]
            for g, row in zip(self.gpus, self.links):
                rows.append([f"GPU{g.index}", *(lk.label() for lk in row),
                             "-" if g.numa_node is None else str(g.numa_node),
                             g.cpu_affinity or "-", g.bus_id or "-"])
            w = [max(len(r[c]) for r in rows) for c in range(len(head))]
            out += ["  ".join(x.ljust(w[c]) for c, x in enumerate(r)).rstrip() for r in rows]
            used = sorted({lk.kind for row in self.links for lk in row})
            legend = {"same_device": "X same device", "nvlink": "NV# NVLink, # bonded links",
                      "pcie": "PIX/PXB/PHB/NODE/SYS PCIe path, nearest first",
                      "pcie_or_better": "P2P? peer access, link unknown (PCIe or better)",
                      "none": "- no peer access", "unknown": "?x unrecognised cell"}
            out.append("legend: " + "; ".join(legend[k] for k in used))
        for nic in self.nics:
            near = [f"GPU{k}({c})" for k, c in enumerate(nic["to_gpu"]) if c in ("PIX", "PXB")]
            dev = f" ({nic['device']})" if nic.get("device") else ""
            out.append(f"NIC {nic['name']}{dev}: near {', '.join(near) or 'no GPU (all PHB or farther)'}")
        h = self.host
        if h.get("cores"):
            out.append(f"host: {h.get('cpu') or 'CPU'}, {h.get('cores')} core(s) "
                       f"({h.get('usable_cores')} usable)")
        for node in h.get("numa_nodes", []):
            out.append(f"  NUMA node {node['node']}: cpus {node['cpus']}"
                       + (f", {node['mem_gib']} GiB" if node.get("mem_gib") is not None else ""))
        for note in self.notes:
            out.append(f"note: {note}")
        return "\n".join(out)


# --------------------------------------------------------------------------- helpers


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v)


def normalize_bus_id(bus: str | None) -> str | None:
    """NVML/nvidia-smi bus ids (00000000:18:00.0) in sysfs form (0000:18:00.0), lower case."""
    if not bus:
        return None
    m = re.match(r"^\s*(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])\s*$", bus)
    if not m:
        return None
    dom = int(m.group(1) or "0", 16)
    return f"{dom:04x}:{int(m.group(2), 16):02x}:{int(m.group(3), 16):02x}.{m.group(4)}"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def numa_of_bus(bus_id: str | None, sysfs: str = "/sys") -> int | None:
    """NUMA node of a PCI device from sysfs (None when unknown or -1)."""
    if not bus_id:
        return None
    v = _read(os.path.join(sysfs, "bus/pci/devices", bus_id, "numa_node"))
    try:
        n = int(v) if v is not None else -1
    except ValueError:
        return None
    return n if n >= 0 else None


def _cpulist(mask_words: Sequence[int], word_bits: int = 64) -> str:
    cpus = [w * word_bits + b for w, word in enumerate(mask_words) for b in range(word_bits)
            if (int(word) >> b) & 1]
    if not cpus:
        return ""
    parts, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo (None when it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def host_info(sysfs: str = "/sys") -> dict[str, Any]:
    """Cores, the usable ones, CPU model and NUMA nodes (from sysfs) of this host."""
    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    nodes = []
    for d in sorted(glob.glob(os.path.join(sysfs, "devices/system/node/node[0-9]*")),
                    key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)))):
        node = {"node": int(re.sub(r"\D", "", os.path.basename(d))),
                "cpus": _read(os.path.join(d, "cpulist")) or "", "mem_gib": None}
        mem = _read(os.path.join(d, "meminfo")) or ""
        m = re.search(r"MemTotal:\s+(\d+)\s+kB", mem)
        if m:
            node["mem_gib"] = round(int(m.group(1)) / 2**20, 1)
        nodes.append(node)
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "numa_nodes": nodes}


# --------------------------------------------------------------------------- NVML


_NVML_LEVEL = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def from_nvml(nvml, sysfs: str = "/sys") -> Topology:
    """Topology from an NVML binding (the ``pynvml`` module of nvidia-ml-py, or a stand-in
    with the same functions). Raises the binding's NVMLError when the driver does not answer."""
    err = getattr(nvml, "NVMLError", Exception)
    enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
    switch_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    gpu_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_GPU", 0)
    cap_nvlink = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
    p2p_ok = getattr(nvml, "NVML_P2P_STATUS_OK", 0)
    max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
    notes: list[str] = []
    nvml.nvmlInit()
    try:
        n = int(nvml.nvmlDeviceGetCount())
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        gpus: list[GPU] = []
        for i, h in enumerate(handles):
            bus = normalize_bus_id(_text(nvml.nvmlDeviceGetPciInfo(h).busId))
            numa = None
            fn = getattr(nvml, "nvmlDeviceGetNumaNodeId", None)
            if fn is not None:
                try:
                    numa = int(fn(h))
                    numa = numa if numa >= 0 else None
                except err:
                    numa = None
            if numa is None:
                numa = numa_of_bus(bus, sysfs)
            aff = None
            fn = getattr(nvml, "nvmlDeviceGetCpuAffinity", None)
            if fn is not None:
                try:
                    aff = _cpulist(fn(h, max(1, ((os.cpu_count() or 64) + 63) // 64))) or None
                except err:
                    aff = None
            gpus.append(GPU(i, _text(nvml.nvmlDeviceGetName(h)), bus, numa, aff))
        by_bus = {g.bus_id: g.index for g in gpus if g.bus_id}
        direct: list[Counter] = []
        to_switch: list[int] = []
        for i, h in enumerate(handles):
            d, sw, active = Counter(), 0, 0
            for link in range(max_links):
                try:
                    if nvml.nvmlDeviceGetNvLinkState(h, link) != enabled:
                        continue
                except err:
                    continue  # no such link on this GPU, or NVLink not supported
                active += 1
                rtype = None
                fn = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
                if fn is not None:
                    try:
                        rtype = int(fn(h, link))
                    except err:
                        rtype = None
                try:
                    rbus = normalize_bus_id(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
                except err:
                    rbus = None
                if rtype == switch_type or (rtype != gpu_type and rbus not in by_bus):
                    sw += 1
                elif rbus in by_bus:
                    d[by_bus[rbus]] += 1
            gpus[i].nvlinks = active
            direct.append(d)
            to_switch.append(sw)

        def nvlink_p2p(i: int, j: int) -> bool | None:
            try:
                return nvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], cap_nvlink) == p2p_ok
            except (err, AttributeError):
                return None

        links = [[Link("same_device")] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                cnt = direct[i][j] or direct[j][i]
                p2p = nvlink_p2p(i, j)
                if cnt:
                    links[i][j] = Link("nvlink", cnt)
                elif to_switch[i] and to_switch[j] and p2p is not False:
                    # NVSwitch fabric: the pair's bandwidth is what the thinner side brings in
                    # (this is how nvidia-smi reports NV18 on HGX H100).
                    links[i][j] = Link("nvlink", min(to_switch[i], to_switch[j]))
                elif p2p:
                    links[i][j] = Link("nvlink", None)
                else:
                    try:
                        level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]))
                        links[i][j] = Link("pcie", path=_NVML_LEVEL.get(level, f"level{level}"))
                    except err as e:
                        links[i][j] = Link("unknown", path=f"NVML: {e}")
    finally:
        try:
            nvml.nvmlShutdown()
        except err:
            pass
    return Topology("nvml", gpus, links, host_info(sysfs), "pci", [], notes)


# --------------------------------------------------------------------------- nvidia-smi


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CELL = re.compile(r"^(X|NV\d+|PIX|PXB|PHB|NODE|SYS|SOC|N/A)$")
_TRAILING_WORDS = {"CPU", "NUMA", "GPU"}


def _parse_cell(raw: str) -> Link:
    c = raw.strip()
    if c == "X":
        return Link("same_device")
    m = re.fullmatch(r"NV(\d+)", c)
    if m:
        return Link("nvlink", int(m.group(1)))
    if c in PCIE_PATHS:
        return Link("pcie", path=c)
    if c == "SOC":
        return Link("pcie", path="SYS")
    return Link("unknown", path=c)


def parse_nvidia_smi(text: str, names: dict[int, tuple[str, str]] | None = None,
                     sysfs: str = "/sys") -> Topology:
    """Topology from the text of ``nvidia-smi topo -m`` (tab-separated as printed, or with the
    tabs turned into spaces as pasted). ``names``: GPU index -> (name, bus id) from
    ``nvidia-smi --query-gpu=index,name,pci.bus_id``. Raises TopologyError when the text holds
    no matrix."""
    lines = [_ANSI.sub("", ln).rstrip("\r\n") for ln in text.splitlines()]
    head_at = next((k for k, ln in enumerate(lines) if ln.split()[:1] == ["GPU0"]), None)
    if head_at is None:
        first = next((ln.strip() for ln in lines if ln.strip()), "")
        raise TopologyError("nvidia-smi topo -m: no header line starting with GPU0 "
                            f"(first line: {first[:80]!r})")
    header = lines[head_at]
    toks = header.split()
    cols: list[str] = []
    for t in toks:
        if t in _TRAILING_WORDS:
            break
        cols.append(t)
    gpu_cols = [c for c in cols if re.fullmatch(r"GPU\d+", c)]
    if [int(c[3:]) for c in gpu_cols] != list(range(len(gpu_cols))):
        raise TopologyError(f"nvidia-smi topo -m: GPU columns {gpu_cols} are not GPU0..GPU{len(gpu_cols) - 1}")
    has_numa_id = "GPU NUMA ID" in " ".join(toks[len(cols):])
    ncol = len(cols)
    rows: dict[str, tuple[list[str], list[str]]] = {}
    for ln in lines[head_at + 1:]:
        s = ln.strip()
        if not s or s.startswith("Legend"):
            break
        label = s.split()[0]
        if label not in cols:
            continue
        cells = [c.strip() for c in s.split("\t")] if "\t" in s else []
        if len(cells) >= 1 + ncol and all(_CELL.match(c) for c in cells[1:1 + ncol]):
            dev, trailing = cells[1:1 + ncol], cells[1 + ncol:]
        else:  # spaces instead of tabs (or mixed): positions of empty cells are lost
            parts = s.split()
            dev, trailing = parts[1:1 + ncol], parts[1 + ncol:]
        if len(dev) < ncol:
            if label in gpu_cols:
                raise TopologyError(f"nvidia-smi topo -m: row {label} has {len(dev)} cells, "
                                    f"the header names {ncol} columns")
            dev = dev + [""] * (ncol - len(dev))
        rows[label] = (dev, trailing)
    missing = [c for c in gpu_cols if c not in rows]
    if missing:
        raise TopologyError(f"nvidia-smi topo -m: the header names {len(gpu_cols)} GPUs but "
                            f"rows {missing} are missing")
    notes: list[str] = []
    gpus, links = [], []
    gidx = [cols.index(c) for c in gpu_cols]
    for k, c in enumerate(gpu_cols):
        dev, trailing = rows[c]
        row = [_parse_cell(dev[x]) for x in gidx]
        for j, lk in enumerate(row):
            if lk.kind == "unknown":
                notes.append(f"GPU{k}-GPU{j}: unrecognised cell {lk.path!r} (kept as unknown)")
            if (j == k) != (lk.kind == "same_device"):
                notes.append(f"GPU{k}-GPU{j}: cell {dev[gidx[j]]!r} on the "
                             f"{'diagonal' if j == k else 'off-diagonal'}")
        links.append(row)
        cpu = trailing[0] if trailing and trailing[0] not in ("", "N/A") else None
        numa = None
        if len(trailing) > 1 and re.fullmatch(r"\d+", trailing[1] or ""):
            numa = int(trailing[1])
        if has_numa_id and len(trailing) > 2 and numa is None:
            last = trailing[-1]
            numa = int(last) if re.fullmatch(r"\d+", last) else None
        name, bus = (names or {}).get(k, (None, None))
        bus = normalize_bus_id(bus)
        if numa is None:
            numa = numa_of_bus(bus, sysfs)
        gpus.append(GPU(k, name, bus, numa, cpu))
    for i in range(len(gpus)):
        for j in range(i + 1, len(gpus)):
            if links[i][j] != links[j][i]:
                notes.append(f"GPU{i}-GPU{j}: asymmetric cells {links[i][j].label()} / "
                             f"{links[j][i].label()}")
    nics = []
    for c in cols:
        if c in gpu_cols or c not in rows:
            continue
        dev, _ = rows[c]
        nics.append({"name": c, "to_gpu": [dev[x] for x in gidx]})
    # NIC legend ("NIC0: mlx5_0") names the NIC columns of newer drivers.
    legend = dict(re.findall(r"^\s*(NIC\d+):\s*(\S+)\s*$", "\n".join(lines), re.M))
    for nic in nics:
        if nic["name"] in legend:
            nic["device"] = legend[nic["name"]]
    return Topology("nvidia-smi", gpus, links, host_info(sysfs), "pci", nics, notes)


def _run(cmd: list[str], timeout: float = 15.0) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise TopologyError(f"{' '.join(cmd)} exited {r.returncode}: "
                            f"{(r.stderr or r.stdout).strip()[:200]}")
    return r.stdout


def from_nvidia_smi(run: Callable[[list[str]], str] | None = None, sysfs: str = "/sys") -> Topology:
    """Runs nvidia-smi (topo -m, then --query-gpu for names and bus ids) and parses it."""
    run = run or _run
    text = run(["nvidia-smi", "topo", "-m"])
    names: dict[int, tuple[str, str]] = {}
    try:
        q = run(["nvidia-smi", "--query-gpu=index,name,pci.bus_id", "--format=csv,noheader"])
        for line in q.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 3 and parts[0].isdigit():
                names[int(parts[0])] = (parts[1], parts[2])
    except (TopologyError, OSError, subprocess.SubprocessError):
        pass  # names and bus ids are extras
    return parse_nvidia_smi(text, names, sysfs)


# --------------------------------------------------------------------------- peer probe


def from_peer_matrix(matrix: Sequence[Sequence[int]], devices: Sequence[dict] | None = None,
                     sysfs: str = "/sys") -> Topology:
    """Topology from a CUDA peer-access matrix (``_C.cuda.peer_access_matrix()``), CUDA
    indices. Pairs with peer access are "PCIe or better, unknown": never NVLink."""
    n = len(matrix)
    if any(len(r) != n for r in matrix):
        raise TopologyError(f"peer-access matrix is not square: {[len(r) for r in matrix]}")
    gpus = []
    for i in range(n):
        d = devices[i] if devices and i < len(devices) else {}
        bus = None
        if d.get("pci"):
            dom, b, dv = d["pci"]
            bus = f"{int(dom):04x}:{int(b):02x}:{int(dv):02x}.0"
        gpus.append(GPU(i, d.get("name"), bus, numa_of_bus(bus, sysfs)))
    links = [[Link("same_device") if i == j else
              Link("pcie_or_better") if (matrix[i][j] or matrix[j][i]) else Link("none")
              for j in range(n)] for i in range(n)]
    notes = ["peer access is granted over NVLink and over PCIe alike: pairs are 'PCIe or better, "
             "unknown'; install nvidia-ml-py (pip install nvidia-ml-py) or put nvidia-smi on "
             "PATH to tell them apart"] if n > 1 else []
    return Topology("peer-probe", gpus, links, host_info(sysfs), "cuda", [], notes)


# --------------------------------------------------------------------------- discovery


def _import_nvml():
    import pynvml  # nvidia-ml-py; optional

    return pynvml


def discover(sysfs: str = "/sys") -> Topology:
    """Asks NVML, then nvidia-smi, then the CUDA peer probe; a CPU-only topology when none
    answers. Every source that did not answer leaves its reason in ``notes``."""
    tried: list[str] = []
    try:
        nvml = _import_nvml()
    except ImportError:
        tried.append("NVML: pynvml not installed (pip install nvidia-ml-py)")
    else:
        try:
            t = from_nvml(nvml, sysfs)
            if t.num_gpus:
                return t
            tried.append("NVML: driver answered with 0 GPUs")
        except Exception as e:  # NVMLError (no driver, no permission) or a broken binding
            tried.append(f"NVML: {type(e).__name__}: {e}")
    if shutil.which("nvidia-smi"):
        try:
            t = from_nvidia_smi(sysfs=sysfs)
            t.notes = tried + t.notes
            return t
        except (TopologyError, OSError, subprocess.SubprocessError) as e:
            tried.append(f"nvidia-smi: {e}")
    else:
        tried.append("nvidia-smi: not on PATH")
    from . import ops

    if not ops.HAS_CUDA_BUILD:
        tried.append("peer probe: hotweights._C was built without CUDA")
    else:
        from . import _C

        count, why = _C.cuda.device_count()
        if count:
            t = from_peer_matrix(_C.cuda.peer_access_matrix(), list(_C.cuda.devices()), sysfs)
            t.notes = tried + t.notes
            return t
        tried.append(f"peer probe: no CUDA device ({why or 'count 0'})")
    return Topology("none", [], [], host_info(sysfs), "pci", [], tried)


_lock = threading.Lock()
_cached: Topology | None = None


def get() -> Topology:
    """This process's topology, discovered once."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = discover()
        return _cached


def reset() -> None:
    """Forgets the cached topology (tests, or after CUDA_VISIBLE_DEVICES changed)."""
    global _cached
    with _lock:
        _cached = None


# --------------------------------------------------------------------------- classifier


def cuda_index_map(topology: Topology, cuda_devices: Sequence[dict] | None = None,
                   visible: str | None = None) -> tuple[dict[int, int], str]:
    """CUDA device index -> topology index, and how it was decided (Note [Topology indices])."""
    if topology.indexing == "cuda":
        return {g.index: g.index for g in topology.gpus}, "peer probe numbers CUDA devices"
    by_bus = {g.bus_id: g.index for g in topology.gpus if g.bus_id}
    if cuda_devices and by_bus:
        out = {}
        for d in cuda_devices:
            dom, b, dv = d["pci"]
            bus = f"{int(dom):04x}:{int(b):02x}:{int(dv):02x}.0"
            if bus in by_bus:
                out[int(d["index"])] = by_bus[bus]
        if len(out) == len(cuda_devices):
            return out, "matched by PCI bus id"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", visible):
        ids = [int(x) for x in visible.split(",")]
        return {i: v for i, v in enumerate(ids)}, "from CUDA_VISIBLE_DEVICES (PCI order assumed)"
    return ({g.index: g.index for g in topology.gpus},
            "one to one (no bus ids to match; CUDA_DEVICE_ORDER=PCI_BUS_ID makes this exact)")


def classifier(topology: Topology, cuda_devices: Sequence[dict] | None = None,
               visible: str | None = None) -> Callable[[int, int], str]:
    """A function (src CUDA index, dst CUDA index) -> ops link kind, for ops.set_link_classifier."""
    mapping, _ = cuda_index_map(topology, cuda_devices, visible)

    def classify(src: int, dst: int) -> str:
        a, b = mapping.get(src), mapping.get(dst)
        if a is None or b is None:
            return "peer"  # a device the topology does not know: no claim either way
        return topology.link(a, b).ops_kind()

    return classify


def install_classifier(topology: Topology | None = None) -> Callable[[int, int], str]:
    """Tells hotweights.ops how each CUDA device pair is linked (NVLink vs PCIe), so that
    HOTWEIGHTS_IPC_COPY_AUTOTUNE=1 picks chunk size and streams per path."""
    from . import ops

    topology = topology or get()
    devs = None
    if topology.indexing != "cuda" and ops.HAS_CUDA_BUILD:
        from . import _C

        try:
            if _C.cuda.device_count()[0]:
                devs = list(_C.cuda.devices())
        except RuntimeError:
            devs = None
    fn = classifier(topology, devs)
    ops.set_link_classifier(fn)
    return fn


# --------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("topo", help="GPU-pair link matrix (NVLink/PCIe), NUMA placement, host CPUs")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--smi-file", metavar="FILE",
                   help="parse a saved `nvidia-smi topo -m` output instead of asking this machine")
    s.set_defaults(fn=_cmd_topo)


def _cmd_topo(args) -> int:
    if args.smi_file:
        with open(args.smi_file) as f:
            t = parse_nvidia_smi(f.read())
        t.source = f"nvidia-smi (file {args.smi_file})"
        t.host = {}  # the file describes another machine: this host's CPUs are not its
        t.notes.append("parsed from a file: host CPUs and sysfs NUMA lookups are not included")
    else:
        t = discover()
    print(json.dumps(t.to_dict(), indent=2) if args.json else t.render())
    return 0
