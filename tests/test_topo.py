# SPDX-License-Identifier: Apache-2.0
"""Topology discovery (NVML, nvidia-smi, peer probe, CPU-only) and the autotune classifier.

This machine has no GPU and no NVML driver. The nvidia-smi parser runs on captured
``nvidia-smi topo -m`` outputs (tests/fixtures/nvidia_smi: NV18/NV12/NV4, PIX/PXB/PHB/NODE/SYS,
legacy SOC, ANSI underlines, tabs turned into spaces, empty cells). The NVML path runs against
a stand-in ``pynvml`` module injected through ``sys.modules``: that is the legitimate way to
exercise code that needs hardware we do not have, and it checks our use of the NVML calls
(link states, remote device types, P2P status, common ancestors), not NVML itself.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from hotweights import config, ops, topo
from hotweights.topo import GPU, Link, Topology, TopologyError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "nvidia_smi")


def smi(name: str, **kw) -> Topology:
    with open(os.path.join(FIX, name)) as f:
        return topo.parse_nvidia_smi(f.read(), sysfs="/nonexistent", **kw)


def kinds(t: Topology) -> set:
    return {lk.kind for _, _, lk in t.pairs()}


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k in [k for k in os.environ if k.startswith("HOTWEIGHTS_")]:
        monkeypatch.delenv(k)
    config.reset()
    topo.reset()
    ops.set_link_classifier(None)
    yield
    config.reset()
    topo.reset()
    ops.set_link_classifier(None)


# --------------------------------------------------------------------------- nvidia-smi


def test_hgx_h100_nv18_with_nics():
    t = smi("hgx_h100_nv18.txt")
    assert t.source == "nvidia-smi" and t.num_gpus == 8 and not t.notes
    assert all(lk == Link("nvlink", 18) for _, _, lk in t.pairs())
    assert [t.link(i, i).kind for i in range(8)] == ["same_device"] * 8
    assert [g.numa_node for g in t.gpus] == [0] * 4 + [1] * 4
    assert t.gpus[0].cpu_affinity == "0-55,112-167" and t.gpus[7].cpu_affinity == "56-111,168-223"
    assert [n["name"] for n in t.nics] == [f"NIC{i}" for i in range(8)]
    assert t.nics[0]["device"] == "mlx5_0" and t.nics[0]["to_gpu"][0] == "PIX"
    assert t.nics[0]["to_gpu"][5] == "SYS"
    assert t.summary() == {"gpus": 8, "pairs": 28, "kinds": {"nvlink": 28}, "min_nvlinks": 18}
    out = t.render()
    assert "NV18" in out and "NIC NIC0 (mlx5_0): near GPU0(PIX)" in out


def test_dgx_a100_old_mlx5_columns_and_numa():
    t = smi("dgx_a100_nv12_mlx5.txt")
    assert t.num_gpus == 8 and kinds(t) == {"nvlink"}
    assert {lk.nvlinks for _, _, lk in t.pairs()} == {12}
    assert [g.numa_node for g in t.gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
    assert [n["name"] for n in t.nics] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert t.nics[1]["to_gpu"][2:4] == ["PXB", "PXB"]


def test_ansi_underlined_header_is_stripped():
    t = smi("a100_4gpu_ansi.txt")
    assert t.num_gpus == 4 and kinds(t) == {"nvlink"} and t.gpus[3].numa_node == 1
    assert t.nics == [{"name": "NIC0", "to_gpu": ["SYS"] * 4, "device": "rocep49s0"}]


@pytest.mark.parametrize("name,expect", [
    ("pcie_l40s_4gpu.txt", {(0, 1): "PIX", (0, 2): "NODE", (2, 3): "PIX", (1, 3): "NODE"}),
    ("pcie_6gpu_2socket.txt", {(0, 1): "PIX", (1, 2): "NODE", (0, 4): "SYS", (4, 5): "PIX"}),
    ("p40_legacy_soc.txt", {(0, 1): "PIX", (0, 4): "PXB", (4, 7): "PIX"}),
    ("pasted_spaces_8gpu.txt", {(0, 1): "PIX", (0, 2): "PHB", (2, 3): "PIX", (3, 4): "SYS",
                                (6, 7): "PIX", (5, 6): "PHB"}),
])
def test_pcie_only_paths(name, expect):
    t = smi(name)
    assert kinds(t) == {"pcie"}, t.render()
    for (i, j), path in expect.items():
        assert t.link(i, j) == Link("pcie", path=path) == t.link(j, i)
    assert not [n for n in t.notes if "asymmetric" in n or "unrecognised" in n]


def test_legacy_soc_nic_and_affinity_without_numa_column():
    t = smi("p40_legacy_soc.txt")
    assert t.nics[0]["name"] == "mlx5_0" and set(t.nics[0]["to_gpu"]) == {"SOC"}
    assert all(g.cpu_affinity == "0-13" and g.numa_node is None for g in t.gpus)
    assert topo._parse_cell("SOC") == Link("pcie", path="SYS")


def test_nvlink_bridge_pair_and_single_gpu():
    t = smi("rtx3090_nvlink_bridge.txt")
    assert t.link(0, 1) == Link("nvlink", 4) and t.link(0, 1).label() == "NV4"
    one = smi("single_gpu.txt")
    assert one.num_gpus == 1 and one.pairs() == [] and one.gpus[0].numa_node == 0
    assert one.gpus[0].cpu_affinity == "0-19"


def test_empty_cells_keep_their_positions():
    t = smi("h100_empty_affinity.txt")
    assert [g.cpu_affinity for g in t.gpus] == [None, None, "52-103", "52-103"]
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]
    assert kinds(t) == {"nvlink"}


def test_names_and_bus_ids_from_query_gpu(tmp_path):
    # sysfs numa_node of the GPU's PCI function fills in when the matrix has no NUMA column
    dev = tmp_path / "bus/pci/devices/0000:18:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("1\n")
    text = open(os.path.join(FIX, "p40_legacy_soc.txt")).read()
    t = topo.parse_nvidia_smi(text, {0: ("Tesla P40", "00000000:18:00.0")}, sysfs=str(tmp_path))
    assert t.gpus[0].name == "Tesla P40" and t.gpus[0].bus_id == "0000:18:00.0"
    assert t.gpus[0].numa_node == 1 and t.gpus[1].numa_node is None


def test_from_nvidia_smi_runs_both_queries():
    calls = []
    text = open(os.path.join(FIX, "rtx3090_nvlink_bridge.txt")).read()

    def run(cmd):
        calls.append(cmd)
        if cmd[1] == "topo":
            return text
        return "0, NVIDIA GeForce RTX 3090, 00000000:01:00.0\n1, NVIDIA GeForce RTX 3090, 00000000:21:00.0\n"

    t = topo.from_nvidia_smi(run, sysfs="/nonexistent")
    assert calls[0] == ["nvidia-smi", "topo", "-m"] and "--query-gpu" in calls[1][1]
    assert [g.bus_id for g in t.gpus] == ["0000:01:00.0", "0000:21:00.0"]
    assert t.gpus[1].name == "NVIDIA GeForce RTX 3090"


def test_unreadable_outputs_are_clear_errors_or_notes():
    with pytest.raises(TopologyError, match="no header line starting with GPU0.*NVIDIA-SMI has failed"):
        topo.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    text = open(os.path.join(FIX, "pcie_l40s_4gpu.txt")).read()
    with pytest.raises(TopologyError, match=r"rows \['GPU3'\] are missing"):
        topo.parse_nvidia_smi("\n".join(text.splitlines()[:-1]))
    # a glued cell (seen in pasted outputs) stays unknown, with a note; never NVLink
    bad = text.replace("GPU1\tPIX\t X \tNODE", "GPU1\tPIXNODE\t X \tNODE")
    t = topo.parse_nvidia_smi(bad)
    assert t.link(1, 0) == Link("unknown", path="PIXNODE") and t.link(1, 0).ops_kind() == "peer"
    assert any("unrecognised cell 'PIXNODE'" in n for n in t.notes)
    assert any("asymmetric" in n for n in t.notes)


def test_bus_id_normalisation():
    assert topo.normalize_bus_id("00000000:18:00.0") == "0000:18:00.0"
    assert topo.normalize_bus_id("0000:AF:00.0") == "0000:af:00.0"
    assert topo.normalize_bus_id("3B:00.0") == "0000:3b:00.0"
    assert topo.normalize_bus_id("N/A") is None and topo.normalize_bus_id(None) is None


def test_json_round_trip():
    t = smi("pcie_6gpu_2socket.txt")
    d = t.to_dict()
    assert d["matrix"][0][4] == "SYS" and d["summary"]["kinds"] == {"pcie": 15}
    back = Topology.from_dict(d)
    assert back.links == t.links and back.gpus == t.gpus
    with pytest.raises(TopologyError, match="not a topology dict"):
        Topology.from_dict({"links": []})


# --------------------------------------------------------------------------- NVML (stand-in)


class FakeNVMLError(Exception):
    pass


def fake_nvml(buses, links=None, switch_links=None, levels=None, p2p_nvlink=None,
              init_error=None, numa=None):
    """A stand-in for pynvml: ``links[(i, j)]`` direct NVLinks from i to j, ``switch_links[i]``
    links from GPU i into NVSwitches, ``levels[(i, j)]`` NVML topology levels."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.NVML_FEATURE_ENABLED = 1
    m.NVML_NVLINK_MAX_LINKS = 18
    m.NVML_NVLINK_DEVICE_TYPE_GPU = 0
    m.NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    m.NVML_P2P_CAPS_INDEX_NVLINK = 2
    m.NVML_P2P_STATUS_OK = 0
    links = links or {}
    switch_links = switch_links or {}
    remote: dict[int, list[tuple[int, str]]] = {}  # gpu -> [(type, bus)] per link
    for i in range(len(buses)):
        lst = []
        for (a, b), cnt in links.items():
            if a == i:
                lst += [(0, buses[b])] * cnt
            elif b == i:
                lst += [(0, buses[a])] * cnt
        lst += [(2, f"0000:{0xc0 + k:02x}:00.0") for k in range(switch_links.get(i, 0))]
        remote[i] = lst
    calls = {"init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1
        if init_error:
            raise FakeNVMLError(init_error)

    def link_of(h, link):
        if link >= len(remote[h]):
            raise FakeNVMLError("Not Supported")
        return remote[h][link]

    def pci(bus):
        return types.SimpleNamespace(busId=("0000" + bus).encode())  # NVML: 8-digit domain, bytes

    m.nvmlInit = init
    m.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    m.nvmlDeviceGetCount = lambda: len(buses)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetPciInfo = lambda h: pci(buses[h])
    m.nvmlDeviceGetNumaNodeId = lambda h: (numa or {}).get(h, -1)
    m.nvmlDeviceGetCpuAffinity = lambda h, n: [0xFF if h < 2 else 0xFF00]
    m.nvmlDeviceGetNvLinkState = lambda h, link: (link_of(h, link), 1)[1]
    m.nvmlDeviceGetNvLinkRemoteDeviceType = lambda h, link: link_of(h, link)[0]
    m.nvmlDeviceGetNvLinkRemotePciInfo = lambda h, link: pci(link_of(h, link)[1])

    def p2p(a, b, cap):
        assert cap == 2
        if p2p_nvlink is None:
            raise FakeNVMLError("Not Supported")
        return 0 if p2p_nvlink(a, b) else 4

    m.nvmlDeviceGetP2PStatus = p2p
    m.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: (levels or {}).get((min(a, b), max(a, b)), 50)
    m.calls = calls
    return m


BUSES = ["0000:18:00.0", "0000:2a:00.0", "0000:9a:00.0", "0000:ab:00.0"]


def test_nvml_nvswitch_fabric(monkeypatch):
    nv = fake_nvml(BUSES, switch_links={i: 18 for i in range(4)}, p2p_nvlink=lambda a, b: True,
                   numa={0: 0, 1: 0, 2: 1, 3: 1})
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    t = topo.discover(sysfs="/nonexistent")
    assert t.source == "nvml" and t.num_gpus == 4
    assert all(lk == Link("nvlink", 18) for _, _, lk in t.pairs())
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1] and [g.nvlinks for g in t.gpus] == [18] * 4
    assert t.gpus[0].bus_id == "0000:18:00.0" and t.gpus[2].cpu_affinity == "8-15"
    assert nv.calls == {"init": 1, "shutdown": 1}


def test_nvml_direct_links_and_pcie_fallback(monkeypatch):
    # A hybrid mesh: 0-1 two links, 0-2 one link, 0-3 and 2-3 none (PCIe), 1-2 one link.
    nv = fake_nvml(BUSES, links={(0, 1): 2, (0, 2): 1, (1, 2): 1, (1, 3): 2},
                   levels={(0, 3): 40, (2, 3): 20})
    t = topo.from_nvml(nv, sysfs="/nonexistent")
    assert t.link(0, 1) == Link("nvlink", 2) == t.link(1, 0)
    assert t.link(0, 2) == Link("nvlink", 1) and t.link(1, 3) == Link("nvlink", 2)
    assert t.link(0, 3) == Link("pcie", path="NODE") and t.link(2, 3) == Link("pcie", path="PXB")
    assert [g.nvlinks for g in t.gpus] == [3, 5, 2, 2]


def test_nvml_pcie_only_never_nvlink(monkeypatch):
    nv = fake_nvml(BUSES, levels={(0, 1): 10, (2, 3): 10, (0, 2): 50, (0, 3): 50, (1, 2): 50,
                                  (1, 3): 50}, p2p_nvlink=lambda a, b: False)
    t = topo.from_nvml(nv, sysfs="/nonexistent")
    assert kinds(t) == {"pcie"} and t.link(0, 1).path == "PIX" and t.link(1, 3).path == "SYS"
    assert all(g.nvlinks == 0 for g in t.gpus)


def test_nvml_switch_links_without_p2p_are_not_nvlink():
    # both GPUs reach NVSwitches but NVML says no NVLink P2P between them (other partition)
    nv = fake_nvml(BUSES[:2], switch_links={0: 18, 1: 18}, p2p_nvlink=lambda a, b: False,
                   levels={(0, 1): 50})
    t = topo.from_nvml(nv, sysfs="/nonexistent")
    assert t.link(0, 1) == Link("pcie", path="SYS")


def test_nvml_without_driver_falls_back_with_reasons(monkeypatch):
    nv = fake_nvml(BUSES, init_error="Driver Not Loaded")
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(topo.shutil, "which", lambda name: None)
    monkeypatch.setattr(ops, "HAS_CUDA_BUILD", False)
    t = topo.discover(sysfs="/nonexistent")
    assert t.source == "none" and t.num_gpus == 0
    assert t.notes[0] == "NVML: FakeNVMLError: Driver Not Loaded"
    assert "nvidia-smi: not on PATH" in t.notes
    assert "peer probe: hotweights._C was built without CUDA" in t.notes


def test_discover_uses_nvidia_smi_when_nvml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    monkeypatch.setattr(topo.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    text = open(os.path.join(FIX, "hgx_h100_nv18.txt")).read()
    monkeypatch.setattr(topo, "_run", lambda cmd, timeout=15.0: text if cmd[1] == "topo" else "")
    t = topo.discover(sysfs="/nonexistent")
    assert t.source == "nvidia-smi" and t.num_gpus == 8
    assert t.notes[0] == "NVML: pynvml not installed (pip install nvidia-ml-py)"


# --------------------------------------------------------------------------- peer probe, CPU only


def test_peer_probe_is_never_nvlink():
    t = topo.from_peer_matrix([[1, 1, 0], [1, 1, 0], [0, 0, 1]],
                              [{"name": "GPU", "pci": (0, 0x18, 0)}] * 3, sysfs="/nonexistent")
    assert t.source == "peer-probe" and t.indexing == "cuda"
    lk = t.link(0, 1)
    assert lk.kind == "pcie_or_better" and lk.label() == "P2P?" and lk.ops_kind() == "peer"
    assert "PCIe or better, unknown" in lk.describe() and "NVLink not confirmed" in lk.describe()
    assert t.link(0, 2) == Link("none") and t.link(0, 2).ops_kind() == "peer_pcie"
    assert "nvlink" not in kinds(t)
    assert any("nvidia-ml-py" in n for n in t.notes)
    assert t.gpus[0].bus_id == "0000:18:00.0"
    with pytest.raises(TopologyError, match="not square"):
        topo.from_peer_matrix([[1, 1], [1]])


def test_cpu_only_machine(monkeypatch, tmp_path):
    for node, cpus in ((0, "0-7"), (1, "8-15")):
        d = tmp_path / f"devices/system/node/node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal:       16777216 kB\n")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(topo.shutil, "which", lambda name: None)
    monkeypatch.setattr(ops, "HAS_CUDA_BUILD", False)
    t = topo.discover(sysfs=str(tmp_path))
    assert t.source == "none" and t.gpus == [] and t.links == []
    assert t.host["numa_nodes"] == [{"node": 0, "cpus": "0-7", "mem_gib": 16.0},
                                    {"node": 1, "cpus": "8-15", "mem_gib": 16.0}]
    assert t.host["cores"] == os.cpu_count()
    out = t.render()
    assert "no GPU visible: CPU-only topology" in out and "NUMA node 1: cpus 8-15, 16.0 GiB" in out


def test_this_machine_cli(capsys):
    from hotweights.cli import main

    assert main(["topo", "--json"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    assert d["source"] in ("nvml", "nvidia-smi", "peer-probe", "none")
    assert d["host"]["cores"] == os.cpu_count()
    assert main(["topo", "--smi-file", os.path.join(FIX, "dgx_a100_nv12_mlx5.txt")]) == 0
    out = capsys.readouterr().out
    assert "source: nvidia-smi (file" in out and "NV12" in out and "host:" not in out


# --------------------------------------------------------------------------- autotune classifier


CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def autotune_cfg(**env):
    return config.load({"HOTWEIGHTS_IPC_COPY_AUTOTUNE": "1", **env})


def test_autotune_picks_per_path_from_the_topology():
    cfg = autotune_cfg()
    topo.install_classifier(smi("hgx_h100_nv18.txt"))
    s = ops.copy_settings(CUDA0, CUDA1, cfg)
    assert (s.chunk_bytes, s.streams, s.source) == (64 << 20, 4, "autotune:peer_nvlink")
    assert ops.copy_settings(CUDA1, CUDA1, cfg).source == "autotune:same_device"
    assert ops.copy_settings(torch.device("cpu"), CUDA1, cfg).source == "autotune:host_to_device"
    topo.install_classifier(smi("pcie_l40s_4gpu.txt"))
    s = ops.copy_settings(CUDA0, CUDA1, cfg)
    assert (s.chunk_bytes, s.streams, s.source) == (8 << 20, 2, "autotune:peer_pcie")
    topo.install_classifier(topo.from_peer_matrix([[1, 1], [1, 1]], sysfs="/nonexistent"))
    s = ops.copy_settings(CUDA0, CUDA1, cfg)
    assert (s.chunk_bytes, s.streams, s.source) == (16 << 20, 2, "autotune:peer")


def test_explicit_chunk_and_streams_beat_autotune():
    topo.install_classifier(smi("hgx_h100_nv18.txt"))
    s = ops.copy_settings(CUDA0, CUDA1, autotune_cfg(HOTWEIGHTS_IPC_COPY_CHUNK_MB="32"))
    assert (s.chunk_bytes, s.streams, s.source) == (32 << 20, 4, "env")
    s = ops.copy_settings(CUDA0, CUDA1, autotune_cfg(HOTWEIGHTS_IPC_COPY_CHUNK_MB="32",
                                                     HOTWEIGHTS_IPC_COPY_STREAMS="3"))
    assert (s.chunk_bytes, s.streams, s.source) == (32 << 20, 3, "env")
    s = ops.copy_settings(CUDA0, CUDA1, config.load({}))  # autotune off: defaults
    assert (s.chunk_bytes, s.streams, s.source) == (16 << 20, 2, "default")


def test_cuda_indices_follow_visible_devices_and_bus_ids():
    t = smi("pcie_6gpu_2socket.txt")
    # CUDA 0 and 1 are GPUs 4 and 0 of the machine: SYS, so PCIe
    fn = topo.classifier(t, visible="4,0")
    assert fn(0, 1) == "peer_pcie" and fn(0, 7) == "peer"  # unknown device: no claim
    m, how = topo.cuda_index_map(t, visible="")
    assert m == {i: i for i in range(6)} and "one to one" in how
    t.gpus[0].bus_id, t.gpus[1].bus_id = "0000:18:00.0", "0000:2a:00.0"
    for g in t.gpus[2:]:
        g.bus_id = f"0000:{0x40 + g.index:02x}:00.0"
    devs = [{"index": 0, "pci": (0, 0x2a, 0)}, {"index": 1, "pci": (0, 0x18, 0)}]
    m, how = topo.cuda_index_map(t, devs)
    assert m == {0: 1, 1: 0} and how == "matched by PCI bus id"


def test_autotune_discovers_the_topology_lazily(monkeypatch):
    t = smi("rtx3090_nvlink_bridge.txt")
    monkeypatch.setattr(topo, "discover", lambda sysfs="/sys": t)
    assert ops._link_classifier is None
    s = ops.copy_settings(CUDA0, CUDA1, autotune_cfg())
    assert s.source == "autotune:peer_nvlink" and ops._link_classifier is not None


def test_failed_discovery_leaves_the_generic_seed(monkeypatch):
    def boom(sysfs="/sys"):
        raise OSError("sysfs unreadable")

    monkeypatch.setattr(topo, "discover", boom)
    s = ops.copy_settings(CUDA0, CUDA1, autotune_cfg())
    assert s.source == "autotune:peer"


def test_link_validation():
    with pytest.raises(ValueError, match="kind='fast'"):
        Link("fast")
    with pytest.raises(TopologyError, match="link matrix"):
        Topology("none", [GPU(0)], [], {})
