# SPDX-License-Identifier: Apache-2.0
"""Checkpoint sources: safetensors checkpoints published straight from disk.

Round trips (sharded, indexed, many dtypes, bf16 and fp8 included) to in-process and spawned
subscribers, bit for bit; delta publishes that read only the changed tensors (bytes counted
through the reader); every reader producing the same bytes and hashes; the GDS selection,
fallback and ``require`` logic and its futures; corrupt checkpoints rejected with the file and
tensor named and nothing published; the ``hotweights publish`` CLI (``--store``, ``--serve``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hotweights
from hotweights import config, ops, storage
from hotweights.coordinator import Client
from hotweights.manifest import Manifest, dtype_name
from hotweights.storage import ALIGN, CheckpointError, ReadRequest, StorageError

import storage_children
from storage_children import module_from
from utils import FAST_ENV, children, fast_coord, get_message  # noqa: F401 (fast_coord: the coord fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def disk_dir():
    """A directory on a real disk filesystem (not tmpfs), where O_DIRECT works."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else ROOT
    d = tempfile.mkdtemp(prefix="hw-storage-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding path (from /proc/self/mounts)."""
    best, typ = "", "?"
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, t, *_ = line.split()
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, typ = mnt, t
    return typ


def open_under(directory: str) -> list[str]:
    """Descriptors and mappings of this process that refer to files under directory."""
    directory = os.path.realpath(directory) + "/"
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(directory):
                found.append(f"fd {fd}")
    with open("/proc/self/maps") as f:
        found += [ln.split()[-1] for ln in f if directory in ln]
    return found


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of many dtypes and awkward sizes (odd byte counts shift the next tensor's file
    offset off alignment; one tensor is larger than the test buckets)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "embed.weight": r(300, 77),
        "layers.0.attn.q": r(129, 65).to(torch.bfloat16),
        "layers.0.attn.k": r(33, 17).to(torch.float16),
        "layers.0.norm": r(77),
        "layers.1.mlp.w": r(100_003).to(torch.bfloat16),
        "layers.1.mlp.b": r(3).to(torch.float64),
        "tok.ids": torch.randint(-1000, 1000, (513,), generator=g),
        "tok.mask": torch.rand(13, generator=g) > 0.5,
        "q8.w": r(31).clamp(-4, 4).to(torch.float8_e4m3fn),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "i32": torch.randint(-5, 5, (9,), generator=g, dtype=torch.int32),
        "scale": r(()),
        "empty": torch.zeros(0),
    }


def spec_of(state: dict) -> dict:
    return {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in state.items()}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_sharded(d, state: dict, shards: int = 3) -> str:
    """A sharded checkpoint with a model.safetensors.index.json, like transformers writes."""
    d = str(d)
    os.makedirs(d, exist_ok=True)
    names = list(state)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[k::shards]}
        save_file(part, os.path.join(d, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes(t) for t in state.values())},
                   "weight_map": weight_map}, f)
    return d


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def unpack(packed: dict) -> dict:
    """A child's state (replicate_children.pack) back as tensors; empty tensors included."""
    out = {}
    for k, (dt, shape, raw) in packed.items():
        t = torch.empty(shape, dtype=getattr(torch, dt.removeprefix("torch.")))
        if raw:
            t.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        out[k] = t
    return out


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a)


def versions(endpoint: str, model: str) -> list:
    with Client(endpoint) as c:
        return c.status(model)["models"].get(model, {}).get("versions", [])


get = get_message


# --------------------------------------------------------------------------- round trips


def test_round_trip_sharded_checkpoint_to_subscribers(coord, tmp_path):
    state = make_state(0)
    ck = write_sharded(tmp_path / "ck", state, shards=3)
    spec = spec_of(state)
    total = sum(nbytes(t) for t in state.values())
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    local = module_from(spec)
    h = local.register_hotweights(name="ck", endpoint=coord, commit="manual", swap="inplace")
    try:
        with children(storage_children.subscriber, coord, [{"tensors": spec}], q, stop):
            get(q, "ready")
            with hotweights.Publisher.from_checkpoint(ck, name="ck", endpoint=coord,
                                                      bucket_bytes=64 << 10, slots=3) as pub:
                r = pub.publish("v1")
                assert r.bytes == total and r.tensors == len(state) and r.buckets > 3
                _, _, v, packed, got_bytes = get(q, "applied")
                assert v == r.version and got_bytes == total
                assert same_state(unpack(packed), state), "spawned subscriber differs"
                assert h.wait(r.version, timeout=60) == r.version
                assert same_state(local.state_dict(), state), "in-process subscriber differs"
                # The manifest agrees with an independent hash through the safetensors package.
                with Client(coord) as c:
                    m = Manifest.from_bytes(c.manifest("ck", r.version))
                ref = Manifest.from_safetensors(pub._source.checkpoint.files)
                assert m.checksums() == ref.checksums()
                assert pub._source.stats["manifest"] == "hashed"
            assert not open_under(ck), "closing the publisher must close its reader"
    finally:
        h.close()


def test_delta_publishes_read_only_changed_tensors(coord, tmp_path, caplog):
    state = make_state(1)
    spec = spec_of(state)
    total = sum(nbytes(t) for t in state.values())
    v1 = write_sharded(tmp_path / "v1", state)
    path, _ = storage.write_manifest(v1)  # what a checkpoint writer does
    assert os.path.basename(path) == storage.MANIFEST_NAMES[0]
    local = module_from(spec)
    h = local.register_hotweights(name="ck", endpoint=coord, commit="manual", swap="storage")
    try:
        with hotweights.Publisher.from_checkpoint(v1, name="ck", endpoint=coord,
                                                  bucket_bytes=64 << 10) as pub:
            r1 = pub.publish("v1")
            h.wait(r1.version, timeout=60)
            src = pub._source
            # a stored manifest: no hashing pass, every byte read once, to be sent
            assert src.stats == {"manifest": "stored", "hashed_bytes": 0}
            assert src.reader.stats["bytes_requested"] == total
        assert same_state(local.state_dict(), state)

        # v2: a new checkpoint (with its stored manifest) where two tensors changed
        state2 = dict(state)
        state2["layers.0.attn.q"] = state["layers.0.attn.q"] * 2
        state2["tok.ids"] = state["tok.ids"] + 1
        changed = nbytes(state2["layers.0.attn.q"]) + nbytes(state2["tok.ids"])
        v2 = write_sharded(tmp_path / "v2", state2)
        storage.write_manifest(v2)
        with hotweights.Publisher.from_checkpoint(v2, name="ck", endpoint=coord,
                                                  bucket_bytes=64 << 10) as pub:
            r2 = pub.publish("v2")
            st = pub._source.reader.stats
            assert r2.bytes == changed and r2.tensors == 2
            assert st["bytes_requested"] == changed, st
            # what came from storage: the changed bytes plus at most two pages per range
            assert changed <= st["bytes_read"] <= changed + 2 * 2 * ALIGN, st
            h.wait(r2.version, timeout=60)
            assert same_state(local.state_dict(), state2)

            # v3: the checkpoint is rewritten in place, its stored manifest is now stale: the
            # source notices, ignores it (warning), hashes once and still sends only the delta
            state3 = dict(state2)
            state3["embed.weight"] = -state2["embed.weight"]
            write_sharded(v2, state3)
            before = dict(st)
            with caplog.at_level(logging.WARNING, logger="hotweights"):
                r3 = pub.publish("v3")
            assert "ignoring stored manifest" in caplog.text and "was modified after" in caplog.text
            d3 = nbytes(state3["embed.weight"])
            assert r3.bytes == d3
            assert st["bytes_requested"] - before["bytes_requested"] == total + d3
            assert pub._source.stats["manifest"] == "hashed"
            h.wait(r3.version, timeout=60)
            assert same_state(local.state_dict(), state3)
    finally:
        h.close()


def test_stored_manifest_given_explicitly_must_match(tmp_path):
    state = make_state(2)
    ck = write_sharded(tmp_path / "ck", state, shards=2)
    path, _ = storage.write_manifest(ck, str(tmp_path / "m.json"))
    src = storage.CheckpointSource(ck, manifest=path)
    assert src.stats["manifest"] == "stored"
    src.close()
    time.sleep(0.01)
    write_sharded(ck, state, shards=2)  # files newer than the manifest
    with pytest.raises(CheckpointError, match=r"m\.json: .*was modified after it was written"):
        storage.CheckpointSource(ck, manifest=path)
    other = write_sharded(tmp_path / "other", {"x": torch.zeros(3)}, shards=1)
    with pytest.raises(CheckpointError, match=r"lists other tensors than the checkpoint"):
        storage.CheckpointSource(other, manifest=path)
    with pytest.raises(CheckpointError, match=r"no-such\.json: no such file"):
        storage.CheckpointSource(ck, manifest=str(tmp_path / "no-such.json"))


# --------------------------------------------------------------------------- readers


def _refuse_direct_open(monkeypatch):
    real = os.open

    def fake_open(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)


def _refuse_direct_reads(monkeypatch):
    real = os.preadv

    def fake_preadv(fd, bufs, offset, *a):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "preadv", fake_preadv)


READER_CASES = ["posix-disk", "posix-tmpfs", "posix-refused-open", "posix-refused-read",
                "posix-buffered-setting", "mmap"]


@pytest.mark.parametrize("case", READER_CASES)
def test_each_reader_reads_identical_bytes(case, disk_dir, monkeypatch):
    """Full tensors, random sub-ranges (unaligned in the file, across many small bounce
    buffers), hash-only ranges, async batches: the same bytes and hashes from every reader."""
    base = disk_dir
    if case == "posix-tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm (tmpfs) on this machine")
        base = tempfile.mkdtemp(prefix="hw-storage-", dir="/dev/shm")
    try:
        state = make_state(3)
        ck = storage.Checkpoint.open(write_sharded(os.path.join(base, "ck"), state, shards=2))
        events = []
        removers = [storage.add_hook(e, lambda b, p, e=e: events.append((e, b, p)))
                    for e in ("o_direct_off", "bytes_read")]
        if case == "posix-refused-open":
            _refuse_direct_open(monkeypatch)
        if case == "posix-refused-read":
            _refuse_direct_reads(monkeypatch)
        cfg = config.load({}, storage_odirect=(case != "posix-buffered-setting"))
        if case == "mmap":
            reader = storage.MmapReader("cpu")
        else:
            reader = storage.PosixReader("cpu", bounce_bytes=16 << 10, config=cfg)
        try:
            _exercise_reader(reader, ck, state)
            _, direct = next(iter(reader._fds.values())) if case != "mmap" else (None, None)
            reader.forget()  # closes descriptors and mappings; the next read reopens them
            assert not open_under(base)
            t = ck.tensors["tok.ids"]
            out = torch.empty(t.nbytes, dtype=torch.uint8)
            reader.read_into(t.file, t.offset, t.nbytes, out)
            assert torch.equal(out, as_bytes(state["tok.ids"]))
        finally:
            reader.close()
            for r in removers:
                r()
        assert not open_under(base), "the reader left descriptors or mappings open"
        assert not [t for t in threading.enumerate() if t.name.startswith(("hw-read", "hw-posix"))]
        read_events = sum(p for e, _, p in events if e == "bytes_read")
        assert read_events == reader.stats["bytes_read"] > 0
        off = [p for e, _, p in events if e == "o_direct_off"]
        if case == "posix-disk":
            assert fs_type(base) != "tmpfs"
            assert direct is True and reader.detail["o_direct"] == "on" and not off
        elif case == "posix-tmpfs":
            # tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since: either way the
            # reader works, and a refusal is reported.
            assert direct is (not off)
        elif case in ("posix-refused-open", "posix-refused-read"):
            assert direct is False and "off" in reader.detail["o_direct"]
            assert off and all("EINVAL" in p["reason"] for p in off)
            assert {p["path"] for p in off} <= set(ck.files)
        elif case == "posix-buffered-setting":
            assert direct is False and reader.detail["o_direct"] == "off (setting)" and not off
    finally:
        if base != disk_dir:
            shutil.rmtree(base, ignore_errors=True)


def _exercise_reader(reader, ck, state, device="cpu"):
    rng = np.random.default_rng(0)
    ref = {n: as_bytes(t) for n, t in state.items()}
    # 1. every tensor in full, hashed, in one batch
    dests = {n: torch.full((t.nbytes,), 0xAB, dtype=torch.uint8, device=device)
             for n, t in ck.tensors.items()}
    reqs = [ReadRequest(t.file, t.offset, t.nbytes, dests[n]) for n, t in ck.tensors.items()]
    partials = reader.read(reqs, hash=True)
    for (n, t), p in zip(ck.tensors.items(), partials):
        assert torch.equal(dests[n].cpu(), ref[n]), n
        assert ops.hw64_finalize(int(p), t.nbytes) == ops.checksum(state[n].contiguous()), n
    # 2. random sub-ranges starting at multiples of 8 inside their tensor, some hash-only
    reqs, want = [], []
    for _ in range(60):
        n = rng.choice([k for k, t in ck.tensors.items() if t.nbytes >= 16])
        t = ck.tensors[n]
        a = int(rng.integers(0, t.nbytes // 8)) * 8
        b = int(rng.integers(a + 1, t.nbytes + 1))
        dest = None if rng.random() < 0.3 else torch.empty(b - a, dtype=torch.uint8, device=device)
        reqs.append(ReadRequest(t.file, t.offset + a, b - a, dest, a))
        want.append(ref[n][a:b])
    partials = reader.read(reqs, hash=True)
    for r, w, p in zip(reqs, want, partials):
        if r.dest is not None:
            assert torch.equal(r.dest.cpu(), w)
        assert int(p) == int(ops.hash_ranges([w], [r.hash_offset])[0])
    # 3. the async form and read_into
    t = ck.tensors["layers.1.mlp.w"]
    d1 = torch.empty(t.nbytes, dtype=torch.uint8, device=device)
    handle = reader.submit([ReadRequest(t.file, t.offset, t.nbytes, d1)])
    assert handle.wait(timeout=60) is None and handle.done()
    assert torch.equal(d1.cpu(), ref["layers.1.mlp.w"])
    d2 = torch.empty(100, dtype=torch.uint8, device=device)
    reader.read_into(t.file, t.offset + 7, 100, d2)
    assert torch.equal(d2.cpu(), ref["layers.1.mlp.w"][7:107])
    st = reader.stats
    assert st["batches"] == 4 and st["bytes_requested"] > 0 and st["bytes_read"] > 0


@pytest.mark.parametrize("kind", ["posix", "mmap", "gds-fake"])
def test_readers_reopen_files_replaced_on_disk(kind, tmp_path):
    """A cached descriptor or mapping must not serve the bytes of a file since replaced (or,
    for a mapping, fault past a truncated end)."""
    d = str(tmp_path / "ck")
    os.makedirs(d)
    f = os.path.join(d, "model.safetensors")
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, f)
    reader = {"posix": lambda: storage.PosixReader("cpu", bounce_bytes=16 << 10),
              "mmap": lambda: storage.MmapReader("cpu"),
              "gds-fake": lambda: storage.GdsReader("cpu", fake_kvikio(), bounce_bytes=16 << 10)}[kind]()
    try:
        t = storage.Checkpoint.open(d).tensors["w"]
        out = torch.empty(t.nbytes, dtype=torch.uint8)
        reader.read_into(t.file, t.offset, t.nbytes, out)
        assert torch.equal(out.view(torch.float32), torch.arange(1000, dtype=torch.float32))
        time.sleep(0.01)
        tmp = f + ".new"  # replaced atomically, as checkpoint writers do
        save_file({"w": -torch.arange(1000, dtype=torch.float32)}, tmp)
        os.replace(tmp, f)
        reader.read_into(t.file, t.offset, t.nbytes, out)
        assert torch.equal(out.view(torch.float32), -torch.arange(1000, dtype=torch.float32))
    finally:
        reader.close()
    assert not open_under(d)


def test_reader_errors_are_clear(tmp_path):
    state = make_state(4)
    ck = storage.Checkpoint.open(write_sharded(tmp_path / "ck", state, shards=1))
    t = ck.tensors["embed.weight"]
    with storage.PosixReader("cpu", bounce_bytes=16 << 10) as r:
        with pytest.raises(ValueError, match=r"needs a contiguous 1-D uint8 destination of 10 bytes"):
            r.read([ReadRequest(t.file, t.offset, 10, torch.empty(3, dtype=torch.uint8))])
        with pytest.raises(ValueError, match=r"hash_offset 4, expected a multiple of 8"):
            r.read([ReadRequest(t.file, t.offset, 8, None, 4)], hash=True)
        size = os.path.getsize(t.file)
        with pytest.raises(StorageError, match=r"read \d+ bytes at offset .* the file is shorter"):
            r.read([ReadRequest(t.file, size - 4, 100, torch.empty(100, dtype=torch.uint8))])
    with pytest.raises(StorageError, match="reader is closed"):
        r.read([])


# --------------------------------------------------------------------------- GDS (fake kvikio)


class _CompatMode(enum.Enum):
    OFF = 0
    ON = 1
    AUTO = 2


def fake_kvikio(*, compat: bool = False, fail_open: bool = False, fail_get_at: int | None = None):
    """A stand-in for the kvikio module. Its futures do the read only when ``.get()`` is
    called, so a reader that used bytes before awaiting would see garbage; every future
    records whether it was awaited."""
    kv = types.ModuleType("kvikio")
    kv.__version__ = "fake"
    kv.CompatMode = _CompatMode
    kv.futures, kv.opened, kv.settings = [], [], {}

    class Future:
        def __init__(self, fn):
            self._fn, self.awaited, self._res = fn, False, None

        def get(self):
            if not self.awaited:
                self.awaited = True
                self._res = self._fn()
            return self._res

        def done(self):
            return self.awaited

    class CuFile:
        def __init__(self, path, flags="r"):
            if fail_open:
                raise RuntimeError("cuFileHandleRegister failed: filesystem not supported")
            self.path, self.fd = path, os.open(path, os.O_RDONLY)
            kv.opened.append(self)
            self.closed = False

        def pread(self, buf, size=None, file_offset=0, task_size=None):
            # host memory arrives as a NumPy array, device memory as a CUDA tensor
            assert isinstance(buf, np.ndarray) or buf.device.type == "cuda"
            assert size <= (buf.nbytes if isinstance(buf, np.ndarray) else buf.numel())
            k = len(kv.futures)

            def do():
                if fail_get_at is not None and k == fail_get_at:
                    raise OSError(errno.EIO, "cuFileRead failed")
                if isinstance(buf, np.ndarray):
                    return os.preadv(self.fd, [memoryview(buf)[:size]], file_offset)
                host = np.empty(size, np.uint8)
                n = os.preadv(self.fd, [memoryview(host)], file_offset)
                buf[:n].copy_(torch.from_numpy(host[:n]))
                return n

            f = Future(do)
            kv.futures.append(f)
            return f

        def close(self):
            if not self.closed:
                os.close(self.fd)
                self.closed = True

    def set_(key, value):
        kv.settings[key] = value

    kv.CuFile = CuFile
    kv.defaults = types.SimpleNamespace(
        set=set_, get=lambda key: kv.settings.get(key, _CompatMode.AUTO),
        is_compat_mode_preferred=lambda: compat)
    return kv


@pytest.fixture
def gds_env(monkeypatch):
    """HOTWEIGHTS_USE_GDS as a parameter; KVIKIO_COMPAT_MODE unset (we set AUTO)."""
    monkeypatch.delenv("KVIKIO_COMPAT_MODE", raising=False)

    def make(value, kv):
        monkeypatch.setitem(sys.modules, "kvikio", kv)
        return config.load({"HOTWEIGHTS_USE_GDS": value})

    return make


def _selected():
    events = []
    remove = storage.add_hook("reader_selected", lambda b, d: events.append((b, d)))
    return events, remove


def test_gds_selected_when_it_works(gds_env, tmp_path):
    """Real GPUDirect Storage needs an NVIDIA GPU, libcufile and a GDS-capable filesystem,
    which this machine lacks: the selection logic runs against an injected fake kvikio."""
    ck = write_sharded(tmp_path / "ck", make_state(5), shards=1)
    f = storage.Checkpoint.open(ck).files[0]
    kv = fake_kvikio()
    cfg = gds_env("1", kv)
    events, remove = _selected()
    try:
        r = storage.select_reader("cuda:0", probe=f, config=cfg)
        assert r.name == "gds" and isinstance(r, storage.GdsReader)
        assert kv.settings["compat_mode"] is _CompatMode.AUTO  # compat mode AUTO, set by us
        assert events == [("gds", r.detail)] and r.detail["kvikio"] == "fake"
        assert [o.path for o in kv.opened] == [f] and all(o.closed for o in kv.opened)  # probe
        assert not r._bufs  # nothing allocated on the device before the first read
        r.close()
    finally:
        remove()


@pytest.mark.parametrize("why,kv_kwargs,needle", [
    ("compat", {"compat": True}, "POSIX compatibility mode"),
    ("register", {"fail_open": True}, "cannot register"),
    ("missing", None, "kvikio is not importable"),
])
def test_gds_falls_back_with_a_reason_or_fails_when_required(gds_env, tmp_path, caplog, why,
                                                             kv_kwargs, needle):
    """The fallback path against a fake (or absent) kvikio; real GDS needs hardware we lack."""
    ck = write_sharded(tmp_path / "ck", make_state(5), shards=1)
    f = storage.Checkpoint.open(ck).files[0]
    kv = fake_kvikio(**kv_kwargs) if kv_kwargs is not None else None  # None: import fails
    cfg = gds_env("1", kv)
    events, remove = _selected()
    try:
        with caplog.at_level(logging.WARNING, logger="hotweights"):
            r = storage.select_reader("cuda:0", probe=f, config=cfg)
        # without CUDA, pinned bounce buffers cannot be allocated either: mmap is last
        assert r.name == ("posix_pinned" if torch.cuda.is_available() else "mmap")
        assert needle in r.detail["fallback"] and needle in caplog.text
        assert events and events[-1][0] == r.name and needle in events[-1][1]["fallback"]
        r.close()
        cfg = gds_env("require", kv)
        with pytest.raises(StorageError, match=f"HOTWEIGHTS_USE_GDS=require, but GPUDirect "
                           f"Storage is unavailable: .*{needle}"):
            storage.select_reader("cuda:0", probe=f, config=cfg)
        with pytest.raises(StorageError, match=f"reader='gds', but .*{needle}"):
            storage.select_reader("cuda:0", "gds", probe=f, config=config.load({}))
    finally:
        remove()


def test_gds_needs_a_cuda_destination(gds_env, tmp_path):
    kv = fake_kvikio()
    r = storage.select_reader("cpu", config=gds_env("1", kv))
    assert r.name == "posix_pinned" and "reads into CUDA memory" in r.detail["fallback"]
    r.close()
    with pytest.raises(StorageError, match="the destination is cpu"):
        storage.select_reader("cpu", config=gds_env("require", kv))
    assert not kv.opened


def test_gds_respects_an_explicit_kvikio_compat_mode(gds_env, monkeypatch, tmp_path):
    kv = fake_kvikio()
    cfg = gds_env("1", kv)
    monkeypatch.setenv("KVIKIO_COMPAT_MODE", "OFF")
    storage.select_reader("cuda:0", config=cfg).close()
    assert "compat_mode" not in kv.settings  # the user's KVIKIO_COMPAT_MODE wins


def test_gds_reader_awaits_every_future(tmp_path):
    """The GDS data path (bounce buffers, futures, delivery, hashing) with a fake kvikio on
    host memory, since real GDS needs an NVIDIA GPU we do not have. The fake reads only when a
    future is awaited: correct bytes prove each one was awaited before use."""
    state = make_state(6)
    ck = storage.Checkpoint.open(write_sharded(tmp_path / "ck", state, shards=2))
    kv = fake_kvikio()
    r = storage.GdsReader("cpu", kv, bounce_bytes=16 << 10)
    _exercise_reader(r, ck, state)
    assert kv.futures and all(f.awaited for f in kv.futures)
    r.close()
    assert all(o.closed for o in kv.opened)

    # a failing read: a clear error, and every future issued before it is still awaited
    kv = fake_kvikio(fail_get_at=3)
    r = storage.GdsReader("cpu", kv, bounce_bytes=16 << 10)
    t = ck.tensors["layers.1.mlp.w"]
    with pytest.raises(StorageError, match=r"kvikio read failed: OSError"):
        r.read([ReadRequest(t.file, t.offset, t.nbytes, torch.empty(t.nbytes, dtype=torch.uint8))])
    assert len(kv.futures) >= 4 and all(f.awaited for f in kv.futures)
    r.close()


def test_checkpoint_source_through_fake_gds(tmp_path, coord):
    """Publisher -> subscriber through the GDS reader (fake kvikio, host memory)."""
    state = make_state(7)
    ck = write_sharded(tmp_path / "ck", state)
    kv = fake_kvikio()
    reader = storage.GdsReader("cpu", kv, bounce_bytes=32 << 10)
    local = module_from(spec_of(state))
    h = local.register_hotweights(name="g", endpoint=coord, commit="manual")
    try:
        src = storage.CheckpointSource(ck, reader=reader)
        with hotweights.Publisher(src, name="g", endpoint=coord, bucket_bytes=64 << 10) as pub:
            h.wait(pub.publish().version, timeout=60)
        assert same_state(local.state_dict(), state)
        assert all(f.awaited for f in kv.futures)
    finally:
        h.close()
        reader.close()


# --------------------------------------------------------------------------- corrupt files


def _rewrite_header(path: str, edit) -> None:
    """Rewrites a safetensors file's JSON header through ``edit(header)``, keeping the data."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def _shard_of(d: str, name: str) -> str:
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return os.path.join(d, json.load(f)["weight_map"][name])


def _truncate(path: str, cut: int) -> str:
    """Cuts the file's last bytes; returns the first tensor (in file order) that loses bytes."""
    _, infos = storage.read_header(path)
    size = os.path.getsize(path) - cut
    with open(path, "r+b") as fh:
        fh.truncate(size)
    return min((t for t in infos.values() if t.offset + t.nbytes > size),
               key=lambda t: t.offset).name


def corrupt_truncated(d):
    f = _shard_of(d, "embed.weight")
    return f, _truncate(f, 10), "run past the end of the data"


def corrupt_header_length(d):
    f = _shard_of(d, "embed.weight")
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", os.path.getsize(f)))
    return f, None, "runs past the end of the file"


def corrupt_size_lie(d):
    f = _shard_of(d, "layers.0.attn.q")

    def edit(h):
        h["layers.0.attn.q"]["shape"] = [129, 66]  # the offsets hold 129x65 bf16
    _rewrite_header(f, edit)
    return f, "layers.0.attn.q", "needs 17028"


def corrupt_overlap(d):
    f = _shard_of(d, "embed.weight")

    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = names[0], names[1]
        nb = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][1] - 8
        h[b]["data_offsets"] = [start, start + nb]
    _rewrite_header(f, edit)
    return f, None, "overlaps tensor"


def corrupt_out_of_range(d):
    f = _shard_of(d, "layers.0.norm")

    def edit(h):
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h["layers.0.norm"]["data_offsets"] = [end, end + 77 * 4]
    _rewrite_header(f, edit)
    return f, "layers.0.norm", "run past the end of the data"


def corrupt_dtype(d):
    f = _shard_of(d, "u8")

    def edit(h):
        h["u8"]["dtype"] = "F7"
    _rewrite_header(f, edit)
    return f, "u8", "dtype 'F7' is unknown"


def corrupt_json(d):
    f = _shard_of(d, "u8")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"{{{")
    return f, None, "header is not valid JSON"


def corrupt_gap(d):
    """Our parser accepts a gap between tensors; the safetensors package does not."""
    f = _shard_of(d, "layers.0.norm")

    def edit(h):
        h["__metadata__"] = {"format": "pt"}
        for k, v in h.items():
            if k != "__metadata__" and v["data_offsets"][0] == 0:
                del h[k]  # leaves the first bytes of the data uncovered
                return
    _rewrite_header(f, edit)
    return f, None, "rejected by the safetensors package"


def corrupt_duplicate(d):
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    extra = os.path.join(d, "model-extra.safetensors")
    save_file({"u8": torch.zeros(5, dtype=torch.uint8)}, extra)
    return extra, "u8", "appears in both"


def corrupt_index_missing_file(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    with open(idx) as fh:
        j = json.load(fh)
    j["weight_map"]["u8"] = "model-00009-of-00009.safetensors"
    with open(idx, "w") as fh:
        json.dump(j, fh)
    return idx, "u8", "model-00009-of-00009.safetensors, which does not exist"


def corrupt_index_wrong_file(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    with open(idx) as fh:
        j = json.load(fh)
    wm = j["weight_map"]
    other = next(f for f in sorted(set(wm.values())) if f != wm["u8"])
    wm["u8"] = other
    with open(idx, "w") as fh:
        json.dump(j, fh)
    return idx, "u8", f"mapped to {other}, but {other} does not hold it"


def corrupt_index_unlisted(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    with open(idx) as fh:
        j = json.load(fh)
    del j["weight_map"]["tok.mask"]
    with open(idx, "w") as fh:
        json.dump(j, fh)
    return idx, "tok.mask", "which the index does not list"


CORRUPTIONS = [corrupt_truncated, corrupt_header_length, corrupt_size_lie, corrupt_overlap,
               corrupt_out_of_range, corrupt_dtype, corrupt_json, corrupt_gap, corrupt_duplicate,
               corrupt_index_missing_file, corrupt_index_wrong_file, corrupt_index_unlisted]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_corrupt_checkpoints_are_rejected_and_nothing_is_published(corrupt, coord, tmp_path):
    d = write_sharded(tmp_path / "ck", make_state(8), shards=3)
    path, tensor, needle = corrupt(d)
    with pytest.raises(CheckpointError) as ei:
        hotweights.Publisher.from_checkpoint(d, name="bad", endpoint=coord)
    msg = str(ei.value)
    assert path in msg and needle in msg, msg
    if tensor is not None:
        assert repr(tensor) in msg, msg
    assert versions(coord, "bad") == []
    with Client(coord) as c:
        assert c.clients("bad") == []  # not even registered
    # the CLI says the same and fails
    from hotweights.cli import main

    assert main(["publish", "--checkpoint", d, "--serve", "--endpoint", coord,
                 "--name", "bad"]) == 1
    assert versions(coord, "bad") == []


def test_checkpoint_corrupted_after_validation_publishes_nothing(coord, tmp_path):
    state = make_state(9)
    d = write_sharded(tmp_path / "ck", state, shards=2)
    with hotweights.Publisher.from_checkpoint(d, name="late", endpoint=coord) as pub:
        f = pub._source.checkpoint.files[0]
        name = _truncate(f, 3)
        with pytest.raises(CheckpointError, match=f"{name!r}.*run past the end of the data"):
            pub.publish()
    assert versions(coord, "late") == []


# --------------------------------------------------------------------------- CLI


def _env():
    env = dict(os.environ, **FAST_ENV, PYTHONPATH=ROOT)
    env.pop("HOTWEIGHTS_COORD_ENDPOINT", None)
    return env


def test_cli_store_then_serve_until_sigterm(coord, tmp_path):
    state = make_state(10)
    spec = spec_of(state)
    d = write_sharded(tmp_path / "ck", state)
    cmd = [sys.executable, "-m", "hotweights", "publish", "--checkpoint", d]
    p = subprocess.run(cmd + ["--store"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert "wrote " in p.stdout and "hashing [" in p.stderr
    assert os.path.isfile(os.path.join(d, storage.MANIFEST_NAMES[0]))

    local = module_from(spec)
    h = local.register_hotweights(name="cli", endpoint=coord, commit="manual")
    late = None
    serve = subprocess.Popen(cmd + ["--serve", "--endpoint", coord, "--name", "cli",
                                    "--bucket-mb", "1"],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        v = h.wait(timeout=120)
        assert same_state(local.state_dict(), state)
        # a late joiner is served by the running publisher (a catch-up version)
        late_model = module_from(spec)
        late = late_model.register_hotweights(name="cli", endpoint=coord, commit="manual")
        assert late.wait(timeout=60) > v
        assert same_state(late_model.state_dict(), state)
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=60)
        assert serve.returncode == 0, err
        assert "reader posix_pinned" in out and "manifest stored" in out and "stopping" in out
        assert "publishing [" in err
        with Client(coord) as c:
            assert not [x for x in c.clients("cli") if x["role"] == "publisher"]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate(timeout=10)
        h.close()
        if late is not None:
            late.close()


def test_cli_prints_manifest_and_refuses_bad_flags(tmp_path, capsys):
    from hotweights.cli import main

    state = make_state(11)
    d = write_sharded(tmp_path / "ck", state, shards=1)
    assert main(["publish", "--checkpoint", d, "--name", "x", "--version", "7"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["model"] == "x" and j["version"] == 7 and len(j["tensors"]) == len(state)
    out = str(tmp_path / "m.msgpack")
    assert main(["publish", "--checkpoint", d, "--output", out]) == 0
    assert Manifest.load(out).checksums() == Manifest.from_safetensors(d).checksums()
    assert main(["publish", "--checkpoint", d, "--output", out, "--store"]) == 1
    assert main(["publish", "--checkpoint", d, "--serve", "--version", "3"]) == 1
    assert "the coordinator assigns version numbers" in capsys.readouterr().err


# --------------------------------------------------------------------------- CUDA (GPU check)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["posix", "mmap", "gds-fake"])
def test_readers_into_cuda_destinations(kind, disk_dir):
    """Pinned bounce buffers + H2D with host-side hashing (posix), copies from a mapping
    (mmap), device bounce buffers with the copy kernel hashing, scratch included (gds through
    the fake kvikio: the real one needs libcufile)."""
    state = make_state(12)
    ck = storage.Checkpoint.open(write_sharded(os.path.join(disk_dir, "ck"), state, shards=2))
    kv = fake_kvikio()
    reader = {"posix": lambda: storage.PosixReader("cuda", bounce_bytes=16 << 10),
              "mmap": lambda: storage.MmapReader("cuda"),
              "gds-fake": lambda: storage.GdsReader("cuda", kv, bounce_bytes=16 << 10)}[kind]()
    try:
        if kind == "posix":
            assert reader.detail["pinned"] and reader._bufs[0].is_pinned()
        _exercise_reader(reader, ck, state, device="cuda")
        assert all(f.awaited for f in kv.futures)
    finally:
        reader.close()


@pytest.mark.cuda
def test_round_trip_to_a_cuda_subscriber(coord, tmp_path):
    state = make_state(13)
    ck = write_sharded(tmp_path / "ck", state)
    local = module_from(spec_of(state)).to("cuda")
    h = local.register_hotweights(name="gpu", endpoint=coord, commit="manual", swap="inplace")
    try:
        with hotweights.Publisher.from_checkpoint(ck, name="gpu", endpoint=coord, device="cuda",
                                                  bucket_bytes=64 << 10) as pub:
            h.wait(pub.publish().version, timeout=60)
            assert pub._source.reader.name == "posix_pinned"
        assert same_state(local.state_dict(), state)
    finally:
        h.close()
