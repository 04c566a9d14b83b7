# SPDX-License-Identifier: Apache-2.0
"""The build record, `hotweights info`, and the skip logic of every test marker."""

import json
import os
import subprocess
import sys

import pytest
import torch

import hotweights
from hotweights import info, ops


def test_build_record_matches_this_environment():
    b = info.build_info()
    assert b["torch_version"] == torch.__version__
    assert b["version"] == hotweights.__version__
    assert b["with_cuda"] == ops.HAS_CUDA_BUILD
    # A CUDA build records its toolkit and arch list; a CPU build records why it has none.
    if b["with_cuda"]:
        assert b["nvcc_version"] and b["cuda_arch_list"]
        assert b["torch_cuda_version"] == torch.version.cuda
    else:
        assert b["cuda_decision"]
        assert b["nvcc_version"] == ""
    for key in ("git_sha", "build_time", "compiler", "cuda_decision"):
        assert isinstance(b[key], str) and b[key]


def test_info_json_fields():
    out = subprocess.run([sys.executable, "-m", "hotweights", "info", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("version", "torch", "build", "cuda", "mpi", "ucx", "redis", "zmq", "gds",
                "transport"):
        assert key in data, key
    assert data["cuda"]["compiled"] == ops.HAS_CUDA_BUILD
    assert data["torch"] == torch.__version__
    assert data["build"]["with_cuda"] == ops.HAS_CUDA_BUILD
    assert isinstance(data["cuda"]["device_count"], int)
    assert len(data["cuda"]["peer_access"]) in (0, data["cuda"]["device_count"])
    assert data["zmq"]["available"] is True
    assert data["transport"]["selected"] in ("mpi", "ucx", "torch", "local")
    assert isinstance(data["redis"]["reachable"], bool)


def test_info_text_says_whether_cuda_is_compiled():
    out = subprocess.run([sys.executable, "-m", "hotweights", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    want = "CUDA compiled:   yes" if ops.HAS_CUDA_BUILD else "CUDA compiled:   no"
    assert want in out.stdout


def test_info_reports_reachable_redis(monkeypatch):
    url = os.environ.get("HOTWEIGHTS_TEST_REDIS_URL")
    if not url:
        pytest.skip("HOTWEIGHTS_TEST_REDIS_URL is not set")
    assert info._redis(url)["reachable"] is True
    bad = info._redis("redis://127.0.0.1:1/0")
    assert bad["reachable"] is False and "Error" in bad["reason"]


def test_missing_cuda_half_names_the_build_switch():
    if ops.HAS_CUDA_BUILD:
        pytest.skip("this build has CUDA")
    with pytest.raises(RuntimeError, match="HOTWEIGHTS_CUDA=1"):
        ops.require_cuda_build("a CUDA ring")


# --- marker skip logic -------------------------------------------------------------------

import conftest  # noqa: E402  (tests/ is on sys.path under pytest)


def _fresh(fn):
    fn.cache_clear()
    return fn


def test_cuda_probe_reason_matches_the_machine():
    r = _fresh(conftest.cuda_reason)()
    if not ops.HAS_CUDA_BUILD:
        assert r == "hotweights._C was built without CUDA"
    elif not torch.cuda.is_available():
        assert r == "no visible CUDA device"
    else:
        assert r is None
    m = _fresh(conftest.multigpu_reason)()
    if r:
        assert m == r
    else:
        assert (m is None) == (torch.cuda.device_count() >= 2)


def test_mpi_probe_without_launcher(monkeypatch):
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    try:
        r = _fresh(conftest.mpi_reason)()
        import importlib.util

        if importlib.util.find_spec("mpi4py") is None:
            assert r == "mpi4py is not installed"
        else:
            assert r == "mpirun is not on PATH"
    finally:
        conftest.mpi_reason.cache_clear()


def test_redis_probe_reasons(monkeypatch):
    try:
        monkeypatch.delenv(conftest.REDIS_URL_ENV, raising=False)
        assert "is not set" in _fresh(conftest.redis_reason)()
        monkeypatch.setenv(conftest.REDIS_URL_ENV, "redis://127.0.0.1:1/0")
        assert "no Redis server at redis://127.0.0.1:1/0" in _fresh(conftest.redis_reason)()
    finally:
        conftest.redis_reason.cache_clear()


def test_skip_marks_carry_the_reason(monkeypatch):
    class Item:
        def __init__(self, kw):
            self.keywords = {kw: True}
            self.marks = []

        def add_marker(self, m):
            self.marks.append(m)

    monkeypatch.setattr(conftest, "PROBES", {"redis": lambda: "no server", "mpi": lambda: None})
    items = [Item("redis"), Item("mpi"), Item("other")]
    conftest.pytest_collection_modifyitems(None, items)
    assert items[0].marks[0].kwargs["reason"] == "[redis] no server"
    assert items[1].marks == [] and items[2].marks == []
