# SPDX-License-Identifier: Apache-2.0
"""The path harness (python -m hotweights.bench): a --quick CPU run writes its JSON, and its
link table drives the simulator. Nothing here asserts a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hotweights import bench
from hotweights import simulate as sim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_cpu_run_writes_json_and_a_link_table(tmp_path):
    out = tmp_path / "paths.json"
    r = subprocess.run([sys.executable, "-m", "hotweights.bench", "--quick", "--paths",
                        "cpu_shm,cpu_shm_xproc,h2d_pinned", "--out", str(out)], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cpu_shm_xproc" in r.stdout and "ratio" in r.stdout
    d = json.loads(out.read_text())
    assert d["device"] == "cpu" and d["quick"] is True and d["machine"]["cores"] == os.cpu_count()
    paths = {row["path"] for row in d["rows"]}
    assert paths == {"cpu_shm", "cpu_shm_xproc"}
    sweep = d["sweep"]
    assert len(d["rows"]) == 2 * len(sweep["buckets"]) * len(sweep["windows"])
    for row in d["rows"]:
        assert row["GB/s"] > 0 and row["latency_ms"] > 0 and row["ceiling GB/s"] > 0
        assert row["ratio"] == pytest.approx(row["GB/s"] / row["ceiling GB/s"])
        assert row["link"]
    assert set(d["skipped"]) == {"h2d_pinned"}  # a CUDA path on a CPU run: named, with the reason
    assert "--device cuda" in d["skipped"]["h2d_pinned"]
    t = d["simulator"]
    assert t["path"] == "cpu_shm_xproc" and t["kind"] == "cpu"
    for key in ("hash_Bps", "gather_Bps", "scatter_Bps", "coord_rtt_s", "bucket0_latency_s",
                "bucket0_interval_s", "bucket0_cpu_s", "parallel_copy_Bps"):
        assert key in t and t["sources"][key].startswith("measured: ")
    p = sim.simulate(sim.load_table(str(out)), 1 << 30, 64 << 20, subscribers=2, tensors=200)
    assert p.measured_table and p.stages["total"] > 0


def test_fit_recovers_fixed_cost_and_bandwidth():
    pts = [(b, 0.002 + b / 4e9) for b in (1 << 20, 4 << 20, 16 << 20, 64 << 20)]
    f = bench._fit(pts)
    assert f["fixed_s"] == pytest.approx(0.002, rel=1e-6) and f["Bps"] == pytest.approx(4e9, rel=1e-6)
    assert bench._fit(pts[:1]) is None


def test_unknown_path_and_missing_matplotlib(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"unknown path\(s\) \['nvlink'\]"):
        bench.run("cpu", quick=True, paths=["nvlink"], log=lambda s: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench.main(["--quick", "--plot", "x.png"]) == 1
    assert "--plot needs matplotlib, which is not installed: pip install matplotlib" in capsys.readouterr().err


def test_table_formats_rows():
    s = bench.table([{"a": "x", "b": 1.23456}, {"a": "yy", "b": None}], ["a", "b"])
    assert s.splitlines()[2].split() == ["x", "1.23"] and s.splitlines()[3].strip() == "yy"


def test_gpu_link_table_falls_back_to_the_bucket_latency_fit():
    # On a GPU the stage fits often find no slope (launch and sync dominate a 64 MiB copy):
    # each of the two copies then gets twice the rate of the whole bucket's latency fit.
    res = {"machine": {"host": "h", "cpu": "c", "cores": 16, "mem_gib": 1, "torch": "t"},
           "fits": {"ipc_same_gpu": {"latency": {"fixed_s": 8e-4, "Bps": 2e11, "points": 2},
                                     "gather": {"fixed_s": 5e-4, "Bps": 3e12, "points": 2},
                                     "scatter": {"fixed_s": 7e-4, "Bps": None, "points": 2}}},
           "host": {"hash_Bps": 1e10, "gpu_hash_Bps": 1e12}, "ceilings_s": {"same_device": 0.5},
           "control": {"rtt_s": 1e-4, "bucket_overhead_cuda": {"latency_s": {"1": 2e-3},
                                                               "interval_s": {"1": 1.5e-3}}},
           "sweep": {"total_bytes": 1 << 30},
           "rows": [{"path": "ipc_same_gpu", "window": w, "scatter_s": t}
                    for w, t in ((1, 9e-4), (1, 6e-4), (4, None))]}
    t = bench.link_table(res)
    assert t["kind"] == "gpu" and t["hash_Bps"] == 1e12
    assert t["gather_Bps"] == 3e12  # its own fit had a slope
    assert t["scatter_Bps"] == 4e11 and t["scatter_fixed_s"] == 6e-4  # the fastest at window 1
    assert "twice the per-bucket latency" in t["sources"]["scatter_Bps"]
    assert t["shared_device_Bps"] == pytest.approx((1 << 30) / 0.5)
    sim.load_table_dict({"simulator": t})  # a complete table


def test_a_device_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match=r"--device 'bogus': expected 'cpu', 'cuda' or 'cuda:N'"):
        bench.run("bogus", quick=True)
