# SPDX-License-Identifier: Apache-2.0
"""The publisher against what users do to it: Ctrl-C in the middle of a publish, sources that
build fresh tensors at every publish under change_tracking="version", empty tensors, a
publisher process killed while idle, and bad arguments. Real subscriber handles on an
embedded coordinator; results compared with the source bit for bit."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest
import torch

import hotweights
from hotweights import PublishError
from hotweights.coordinator import Client

from coord_helpers import wait_until
from replicate_children import make_model
from utils import FAST_ENV, fast_coord, same_state  # noqa: F401 (fast_coord: the coord fixture)

@pytest.mark.parametrize("direct", ["auto", "off"])
def test_ctrl_c_during_publish_aborts_the_version_and_gives_the_slots_back(coord, direct):
    src, dst = make_model(1), make_model(2)
    pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192, slots=2,
                               direct=direct)
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        free = sorted(pub._free)

        def interrupt(b, slot, attempt):
            if b == 1:
                raise KeyboardInterrupt

        pub.after_gather = interrupt
        with torch.no_grad():  # every tensor: several buckets, the second interrupted
            for q in src.parameters():
                q.add_(1.0)
        with pytest.raises(KeyboardInterrupt):
            pub.publish("v2")
        pub.after_gather = None
        info = Client(coord).version("m", 2)
        assert info["state"] == "aborted" and "publish interrupted: KeyboardInterrupt" in info["reason"]
        wait_until(lambda: sorted(pub._free) == free and not pub._inflight, 10, "slots back")
        v3 = pub.publish("v3", timeout=30).version  # the next publish works
        assert h.wait(v3, timeout=30) == v3 and same_state(dst, src)
    finally:
        h.close()
        pub.close()


@pytest.mark.parametrize("direct", ["auto", "off"])
def test_version_tracking_sees_fresh_tensors_at_a_reused_address(coord, direct):
    """A callable source building new tensors at every publish gets addresses the allocator
    just freed, with version counters at 0 again: the storage, not its address, decides."""
    box = {"v": 0.0}

    def source():
        box["v"] += 1.0
        return {"w": torch.full((1000,), box["v"]), "b": torch.full((3,), -box["v"])}

    pub = hotweights.Publisher(source, name="m", endpoint=coord, change_tracking="version",
                               direct=direct)
    dst = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(1000)),
                                  "b": torch.nn.Parameter(torch.zeros(3))})
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        for _ in range(12):
            r = pub.publish()
            assert r.bytes > 0
            h.wait(r.version, timeout=30)
            assert torch.equal(dst["w"].detach(), torch.full((1000,), box["v"]))
            assert torch.equal(dst["b"].detach(), torch.full((3,), -box["v"]))
    finally:
        h.close()
        pub.close()


def test_a_source_with_an_empty_tensor_publishes_with_direct_reads(coord):
    src = {"w": torch.ones(4), "e": torch.zeros(0, 16)}
    pub = hotweights.Publisher(src, name="m", endpoint=coord, direct="on")
    dst = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(4)),
                                  "e": torch.nn.Parameter(torch.zeros(0, 16))})
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        h.wait(pub.publish().version, timeout=30)
        assert torch.equal(dst["w"].detach(), src["w"])
    finally:
        h.close()
        pub.close()


def _idle_publisher(endpoint: str, direct: str, q) -> None:
    for k, v in FAST_ENV.items():
        os.environ[k] = v
    import time

    import torch as t

    import hotweights as hw

    sd = {f"w{i}": t.full((1 << 16,), float(i)) for i in range(4)}
    p = hw.Publisher(sd, name="m", endpoint=endpoint, bucket_bytes=64 << 10, direct=direct)
    q.put(p.publish("v1", timeout=60).version)
    time.sleep(600)


@pytest.mark.parametrize("direct", ["auto", "off"])
def test_a_publisher_killed_while_idle_is_unmapped_by_idle_subscribers(coord, direct):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_idle_publisher, args=(coord, direct, q), daemon=True)
    p.start()
    dst = torch.nn.ParameterDict({f"w{i}": torch.nn.Parameter(torch.zeros(1 << 16))
                                  for i in range(4)})
    h = dst.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        v = q.get(timeout=120)
        h.wait(v, timeout=30)
        sub = h._sub
        assert sub._rings or sub._source_pids  # it holds the publisher's memory
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        wait_until(lambda: not sub._rings and not sub._source_pids and not sub._doorbells
                   and not len(sub._sources), 20, "the dead publisher unmapped")
        assert torch.equal(dst["w3"].detach(), torch.full((1 << 16,), 3.0))  # the weights stay
    finally:
        h.close()
        if p.is_alive():
            p.kill()


def test_bad_publisher_arguments_name_the_value(coord):
    src = make_model(3)
    for kw, exc, msg in (
            (dict(bucket_bytes=0), ValueError, r"bucket_bytes=0, expected None \(the setting\) or an integer >= 256"),
            (dict(bucket_bytes="4096"), ValueError, r"bucket_bytes='4096'"),
            (dict(slots=0), ValueError, r"slots=0, expected None"),
            (dict(optimizers=torch.optim.SGD(src.parameters(), lr=0.1)), TypeError,
             r"optimizers is a SGD, expected a list of torch.optim.Optimizer"),
            (dict(name=""), ValueError, r"name='', expected a non-empty string")):
        with pytest.raises(exc, match=msg):
            hotweights.Publisher(src, **{"name": "m", "endpoint": coord, **kw})
    import numpy as np

    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    gen = hotweights.Publisher(src, name="m", endpoint=coord, optimizers=(o for o in [opt]),
                               bucket_bytes=np.int64(8192), change_tracking="version")
    assert len(gen._hooks) == 1 and gen.bucket_bytes == 8192  # a generator is read once
    gen.close()
    with pytest.raises(TypeError, match=r"source entry 'a' is a float, expected a tensor"):
        hotweights.Publisher({"a": 1.0}, name="m", endpoint=coord)
    pub = hotweights.Publisher(src, name="m", endpoint=coord)
    try:
        for kw, msg in ((dict(timeout=0), r"timeout=0, expected a number of seconds > 0"),
                        (dict(timeout=float("nan")), r"timeout=nan"),
                        (dict(label=5), r"label=5, expected a str")):
            with pytest.raises(ValueError, match=msg):
                pub.publish(**kw)
        assert Client(coord).current("m") is None  # nothing was registered for them
    finally:
        pub.close()
    with pytest.raises(PublishError, match="publisher is closed"):
        pub.publish()
