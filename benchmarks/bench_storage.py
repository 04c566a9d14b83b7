# SPDX-License-Identifier: Apache-2.0
"""Checkpoint read bandwidth: each storage reader against safetensors.torch.load_file, in the
same run, cold (page cache dropped) and warm.

A bf16 checkpoint of 2 GiB (``--quick``: 256 MiB) in 4 shards with a
``model.safetensors.index.json`` is written under ``--dir`` (default: a new directory in
/var/tmp, removed afterwards unless ``--keep``), then read:

- baseline: ``safetensors.torch.load_file`` of every shard, then one byte of every page
  touched (its tensors are backed by a private mapping of the file: nothing is read before
  they are used);
- every reader (posix O_DIRECT with 1 and 2 threads, posix buffered, mmap; gds when kvikio and
  a GPU are present) reading every tensor into one destination buffer allocated and faulted in
  before the timings (as a publisher's slot ring is), without and with hashing (hashing is
  what a publish does);
- the hashing pass that builds a manifest when none is stored (CheckpointSource) against
  ``Manifest.from_safetensors`` (safetensors ``get_tensor`` + checksum).

Cold runs drop the page cache first: ``/proc/sys/vm/drop_caches`` when writable, else
``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file (no root needed; clean pages only, so the
files are fsynced first), checked with ``fincore`` when available. The table says which.

    python benchmarks/bench_storage.py [--device cuda] [--quick] [--repeat 3] [--dir DIR]
                                       [--out results.json]
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parser  # noqa: E402

from hotweights import config, storage  # noqa: E402
from hotweights.manifest import Manifest  # noqa: E402

GB = 1e9


def write_checkpoint(d: str, total: int, shards: int = 4) -> list[str]:
    """bf16 tensors of 32 MiB (4096 x 4096) plus a small norm per layer, sharded + index."""
    from safetensors.torch import save_file

    os.makedirs(d, exist_ok=True)
    big = 4096 * 4096 * 2
    layers = max(shards, total // big)
    names = []
    for i in range(layers):
        names += [f"model.layers.{i}.mlp.weight", f"model.layers.{i}.norm.weight"]
    g = torch.Generator().manual_seed(0)
    weight_map, files = {}, []
    per = -(-len(names) // shards)
    for k in range(shards):
        part = {}
        for n in names[k * per:(k + 1) * per]:
            shape = (4096, 4096) if n.endswith("mlp.weight") else (4096,)
            part[n] = torch.randn(shape, generator=g).to(torch.bfloat16)
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        path = os.path.join(d, fname)
        save_file(part, path, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        files.append(path)
        del part
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    for p in files:  # clean pages can be dropped, dirty ones cannot
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return files


def drop_cache(files: list[str]) -> tuple[str, float | None]:
    """Evicts the files from the page cache; returns how (and how well) it was done."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        how = "drop_caches"
    except OSError as e:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        how = f"fadvise DONTNEED (drop_caches: {e.strerror})"
    return how, resident_fraction(files)


def resident_fraction(files: list[str]) -> float | None:
    """Fraction of the files' pages in the page cache (fincore), None when unknown."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE",
                              *files], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    res = size = 0
    for line in out.split("\n"):
        if line.strip():
            r, s = line.split()[:2]
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def timed(fn, device: torch.device) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def read_all(reader: storage.StorageReader, ck: storage.Checkpoint, dest: torch.Tensor,
             hash: bool) -> None:
    """Every tensor into its place in ``dest`` (allocated and faulted in once, as a
    publisher's slot ring is)."""
    reqs, off = [], 0
    for t in ck.tensors.values():
        reqs.append(storage.ReadRequest(t.file, t.offset, t.nbytes, dest[off:off + t.nbytes]))
        off += t.nbytes
    reader.read(reqs, hash=hash)


def load_all(files: list[str], device: torch.device) -> None:
    """On the CPU, load_file returns tensors backed by a private mapping of the file
    (safetensors 0.8): nothing is read until they are touched, so touch one byte of every
    page. On CUDA it copies every tensor to the device."""
    from safetensors.torch import load_file

    for f in files:
        if device.type == "cuda":
            load_file(f, device=str(device))
            continue
        for t in load_file(f).values():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--dir", help="where to write the checkpoint (default: a temp dir in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per case and cache state; the table shows the median (default 3)")
    args = p.parse_args()
    total = (256 if args.quick else 2048) << 20
    d = args.dir or tempfile.mkdtemp(prefix="hw-bench-storage-", dir="/var/tmp")
    try:
        print(f"writing a {total / 2**30:.2f} GiB checkpoint to {d} ...", flush=True)
        files = write_checkpoint(os.path.join(d, "ck"), total)
        ck = storage.Checkpoint.open(os.path.join(d, "ck"))
        nbytes = ck.total_bytes
        cfg = config.get()
        mb = cfg.storage_bounce_mb
        dev = torch.device(args.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        readers = {
            f"posix O_DIRECT, 1 thread, 2x{mb} MiB": lambda: storage.PosixReader(
                dev, direct=True, threads=1, config=cfg),
            f"posix O_DIRECT, 2 threads, 4x{mb} MiB (default)": lambda: storage.PosixReader(
                dev, direct=True, threads=2, config=cfg),
            f"posix buffered, 2 threads, 4x{mb} MiB": lambda: storage.PosixReader(
                dev, direct=False, threads=2, config=cfg),
            "mmap": lambda: storage.MmapReader(dev),
        }
        if dev.type == "cuda":
            try:
                storage.select_reader(dev, "gds", probe=files[0]).close()
                readers["gds"] = lambda: storage.select_reader(dev, "gds", probe=files[0])
            except storage.StorageError as e:
                print(f"gds: not measured ({e})")
        else:
            print("gds: not measured (destination on the CPU; run with --device cuda)")
        rows, cache_notes = [], set()

        def run(case: str, method: str, fn, base: dict, reader=None) -> None:
            for cache in ("cold", "warm"):
                times = []
                for _ in range(args.repeat):
                    if cache == "cold":
                        if reader is not None:
                            reader.forget()  # mapped pages cannot be dropped
                        how, frac = drop_cache(files)
                        cache_notes.add(how + ("" if frac is None else f", {frac:.0%} resident after"))
                        if frac is not None and frac > 0.05:
                            print(f"warning: {frac:.0%} of the checkpoint still cached after {how}")
                    else:
                        fn()  # make sure everything is cached
                    times.append(timed(fn, dev))
                t = statistics.median(times)
                b = base.get(cache)
                row = {"case": case, "cache": cache, "method": method, "GB/s": nbytes / t / GB,
                       "range GB/s": f"{nbytes / max(times) / GB:.2f}-{nbytes / min(times) / GB:.2f}",
                       "s": t}
                if b is None:
                    base[cache] = t
                else:
                    row.update({"baseline GB/s": nbytes / b / GB, "ratio": b / t})
                rows.append(row)
                print(row, flush=True)

        dest = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dest.fill_(0)  # fault the pages in once, outside the timings
        base_read: dict = {}
        run("read all", "safetensors load_file" + (" + page touch" if dev.type == "cpu" else ""),
            lambda: load_all(files, dev), base_read)
        for hash in (False, True):
            for name, make in readers.items():
                r = make()
                try:
                    run("read all" + (" + hash" if hash else ""), name,
                        lambda r=r, h=hash: read_all(r, ck, dest, h), base_read, reader=r)
                finally:
                    r.close()
        base_hash: dict = {}
        run("manifest (hash pass)", "Manifest.from_safetensors",
            lambda: Manifest.from_safetensors(files), base_hash)
        for name in (list(readers)[1], "mmap"):
            def hash_pass(name=name):
                src = storage.CheckpointSource(ck, dev, manifest=None, reader=readers[name]())
                try:
                    src.snapshot("bench", None, None)
                finally:
                    src.reader.close()
            run("manifest (hash pass)", f"CheckpointSource, {name}", hash_pass, base_hash)
        finish("bench_storage", rows, ["case", "cache", "method", "GB/s", "range GB/s",
                                        "baseline GB/s", "ratio", "s"], args.out, repeat=args.repeat,
               checkpoint_bytes=nbytes, files=len(files), tensors=len(ck.tensors),
               cache_drop=sorted(cache_notes), dir=d, fs=_fs_of(d), device=str(dev))
        print("cold cache: " + "; ".join(sorted(cache_notes)))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)


def _fs_of(path: str) -> str:
    best, typ = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, t, *_ = line.split()
            if os.path.realpath(path).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, typ = mnt, f"{t} on {dev}"
    return typ


if __name__ == "__main__":
    main()
