# SPDX-License-Identifier: Apache-2.0
"""Op-level microbenchmarks (pytest-benchmark), kept out of the default test run:

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

from hotweights import _C, ops

MB = 1 << 20


@pytest.fixture(scope="module")
def big():
    return torch.randint(0, 255, (64 * MB,), dtype=torch.uint8)


def test_checksum_64mib(benchmark, big):
    benchmark(ops.checksum, big)


def test_memcpy_64mib_baseline(benchmark, big):
    out = torch.empty_like(big)
    benchmark(out.copy_, big)


def test_engine_copy_64mib(benchmark, big):
    out = torch.empty_like(big)
    benchmark(ops.copy_, [out], [big])


def test_engine_copy_10k_small(benchmark):
    src = [torch.randn(256) for _ in range(10_000)]
    dst = [torch.empty_like(s) for s in src]
    benchmark(ops.copy_, dst, src)


def test_loop_copy_10k_small_baseline(benchmark):
    src = [torch.randn(256) for _ in range(10_000)]
    dst = [torch.empty_like(s) for s in src]

    def loop():
        for d, s in zip(dst, src):
            d.copy_(s)

    benchmark(loop)


def test_gather_hash_bucket(benchmark):
    ts = [torch.randn(64 * 1024) for _ in range(64)]  # 16 MiB in 64 tensors
    buf = torch.empty(17 * MB, dtype=torch.uint8)
    offs = [i * 256 * 1024 for i in range(64)]
    benchmark(lambda: ops.gather(buf, ts, offs, hash=True).digest())


def test_window_controller_decisions(benchmark):
    ctl = _C.WindowController()

    def feed():
        for i in range(1000):
            ctl.on_complete(i * 0.001, 0.01, MB)

    benchmark(feed)
