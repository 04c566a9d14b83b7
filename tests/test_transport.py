# SPDX-License-Identifier: Apache-2.0
"""Inter-node transports between real processes: MPI (mpirun), torch.distributed (gloo), UCX."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from hotweights import config
from hotweights.transport import create_transport, not_ready, select_transport
from transport_worker import SIZES, torch_child, ucx_child

from utils import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.mark.mpi
def test_mpi_transport_two_ranks():
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(["mpirun", "-n", "2", sys.executable, os.path.join(HERE, "transport_worker.py")],
                         capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 1 ok=True" in out.stdout
    assert f"rank 0 ok=True sent={sum(SIZES)}" in out.stdout


def _run_pair(target, args_for, timeout=120):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(r, ctx), q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = dict((r, (ok, s, rcv)) for r, ok, s, rcv in (q.get(timeout=timeout) for _ in procs))
        for p in procs:
            p.join(30)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return res
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_torch_transport_gloo_two_ranks():
    port = free_port()
    res = _run_pair(torch_child, lambda r, ctx: (r, port))
    assert res[1][0] == [True] * len(SIZES)
    assert res[0][1] == sum(SIZES) and res[1][2] == sum(SIZES)


@pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed")
def test_ucx_transport_two_ranks():
    ctx = mp.get_context("spawn")
    qa = ctx.Queue()
    qp = [ctx.Queue(), ctx.Queue()]
    q = ctx.Queue()
    procs = [ctx.Process(target=ucx_child, args=(r, qa, qp[r], q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        addrs = dict(qa.get(timeout=60) for _ in procs)
        for r in range(2):
            qp[r].put(addrs[1 - r])
        res = {}
        for _ in procs:
            r, ok, s, rcv = q.get(timeout=120)
            res[r] = (ok, s, rcv)
        for r in range(2):
            qp[r].put("done")
        for p in procs:
            p.join(30)
        assert res[1][0] == [True] * len(SIZES)
        assert res[0][1] == sum(SIZES)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_selection_order_and_forcing(monkeypatch):
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MASTER_ADDR",
              "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    has_ucx = importlib.util.find_spec("ucxx") is not None
    info = select_transport(explain=True)
    assert info["selected"] == ("ucx" if has_ucx else "local")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    # a torchrun environment without a process group: starting one inside a publish would wait
    # for every rank, so torch is passed over, and the reason says what to call
    info = select_transport(explain=True)
    assert info["selected"] == ("ucx" if has_ucx else "local")
    assert "call torch.distributed.init_process_group() at start-up" in info["candidates"]["torch"]
    assert "init_process_group" in not_ready("torch")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    if importlib.util.find_spec("mpi4py") and "mpi4py.MPI" not in sys.modules:
        info = select_transport(explain=True)
        assert "`from mpi4py import MPI` at start-up in every rank" in info["candidates"]["mpi"]
        assert info["selected"] != "mpi"
    monkeypatch.setenv("HOTWEIGHTS_TRANSPORT", "local")
    config.reset()
    info = select_transport(explain=True)
    assert info["selected"] == "local" and "forced" in info["reason"]
    assert create_transport("local") is None
    with pytest.raises(Exception, match="unknown transport 'carrier-pigeon'"):
        create_transport("carrier-pigeon")


def test_ucx_advertises_an_address_other_nodes_can_reach(monkeypatch):
    import socket

    from hotweights.transport import ucx

    monkeypatch.setenv("HOTWEIGHTS_UCX_HOST", "10.9.9.9")
    config.reset()
    assert ucx._host() == "10.9.9.9"
    monkeypatch.delenv("HOTWEIGHTS_UCX_HOST")
    # /etc/hosts maps the hostname to a loopback address: the coordinator's route decides
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    monkeypatch.setenv("HOTWEIGHTS_COORD_ENDPOINT", "tcp://192.0.2.77:5555")
    config.reset()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.77", 9))
            routed = s.getsockname()[0]
    except OSError:
        routed = "127.0.0.1"
    if routed.startswith("127."):
        pytest.skip("no route off this host")
    assert ucx._host() == routed
    monkeypatch.delenv("HOTWEIGHTS_COORD_ENDPOINT")  # an endpoint given to the Publisher
    config.reset()
    assert ucx._host("tcp://192.0.2.77:5555") == routed
    monkeypatch.setenv("HOTWEIGHTS_COORD_ENDPOINT", "tcp://192.0.2.77:5555")
    monkeypatch.setenv("HOTWEIGHTS_COORD_ENDPOINT", "tcp://127.0.0.1:5555")  # one host: loopback
    config.reset()
    assert ucx._host() == "127.0.1.1"
