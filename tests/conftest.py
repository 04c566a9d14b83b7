# SPDX-License-Identifier: Apache-2.0
"""Markers with probe-based skips (each skip says why), and shared fixtures.

Nothing here touches CUDA at import time: probes run once, at collection.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest

REDIS_URL_ENV = "HOTWEIGHTS_TEST_REDIS_URL"


@functools.lru_cache(maxsize=None)
def cuda_reason() -> str | None:
    """None when CUDA tests can run, else why not."""
    from hotweights import ops

    if not ops.HAS_CUDA_BUILD:
        return "hotweights._C was built without CUDA"
    import torch

    if not torch.cuda.is_available():
        return "no visible CUDA device"
    return None


@functools.lru_cache(maxsize=None)
def multigpu_reason() -> str | None:
    r = cuda_reason()
    if r:
        return r
    import torch

    n = torch.cuda.device_count()
    return None if n >= 2 else f"needs 2 GPUs, {n} visible"


@functools.lru_cache(maxsize=None)
def mpi_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    if not shutil.which("mpirun"):
        return "mpirun is not on PATH"
    return None


@functools.lru_cache(maxsize=None)
def redis_reason() -> str | None:
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        return f"{REDIS_URL_ENV} is not set (.ci/run starts a Redis server and sets it)"
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as e:
        return f"no Redis server at {url}: {type(e).__name__}: {e}"
    return None


PROBES = {
    "cuda": cuda_reason,
    "multigpu": multigpu_reason,
    "mpi": mpi_reason,
    "redis": redis_reason,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name, probe in PROBES.items():
            if name in item.keywords:
                reason = probe()
                if reason:
                    item.add_marker(pytest.mark.skip(reason=f"[{name}] {reason}"))


@pytest.fixture(autouse=True)
def _fresh_config(monkeypatch):
    """Each test sees the settings of its own environment (monkeypatched vars included)."""
    from hotweights import config

    config.reset()
    yield
    config.reset()


@pytest.fixture
def redis_url():
    """URL of the real Redis server started by .ci/run (the test is marked redis)."""
    return os.environ[REDIS_URL_ENV]
