# SPDX-License-Identifier: Apache-2.0
"""The replication pipeline on one node: a Publisher streams a version through its slot ring to
every Subscriber, which stages, verifies and commits it atomically.

Note [One update]
1. ``Publisher.publish`` hashes the live tensors into a manifest, asks the coordinator who
   subscribes (and which version each holds, with which consumer set: Note [Delta base]),
   and makes the delta plan.
2. It registers the version (manifest + plan) with the coordinator, then for each bucket: waits
   for a free slot and for the window controller's admission, gathers the bucket's pieces into
   the slot with the copy engine while hashing them, checks each whole tensor against the
   manifest (a tensor modified since it was hashed aborts the version instead of shipping a
   torn snapshot), records the slot's event, and posts a handle (bucket, slot, digest) for the
   bucket's consumers.
3. Each subscriber imports the ring once, and for every handle waits on the slot's event,
   scatters its pieces into shadow buffers while hashing them, compares the bucket digest and
   acks (or nacks: the publisher re-sends). When every bucket is in, every tensor's checksum is
   checked against the plan (end to end: against the manifest hash), then it precommits: in
   the same request as the last bucket's ack (``ack_handle(precommit=True)``).
4. The coordinator commits when its quorum has precommitted. Each subscriber applies the
   version at a safe point (see Note [Atomic apply] in module.py): storage swap or in-place
   copy, all changed tensors or none. Abort leaves the old version live and frees the staging.
5. The publisher's releaser thread learns of acks (and lease expiries) by long-polling the
   coordinator; a released slot is reused, and the bucket's service time (post to last ack)
   feeds the window controller.
Round trips are the cost of a small update (a delta of 1% moves ~10 MB: a millisecond of
copying, several of coordination on a busy host), so each one on the critical path is earned:
the version event carries a small plan and the handles posted with the version (a direct
version's first buckets), so a subscriber starts reading without a request; the precommit
rides on the last ack; the release of the last handle says the version committed, so the
publisher does not ask; a subscriber asks after other publishers' liveness, not the one that
just published. A delta of two tensors is then: publish, one ack per subscriber, one release.

Note [Direct reads]
On the CPU the ring costs a copy that a subscriber on the same node does not need: it can map
the publisher's tensors and copy them straight into its shadows, one copy per subscriber
instead of a gather plus one per subscriber (what MPI's single-copy shared-memory path does).
So by default (HOTWEIGHTS_DIRECT_READ=auto, the ``direct`` argument) a CPU publisher moves the
storages of its source into POSIX shared memory once, in place (torch's ``share_memory_``
mechanism: every view and alias, inside the model or not, keeps pointing at the same storage;
later publishes re-share only storages that were replaced), and a version whose subscribers all
live on this node and on the CPU is streamed as *direct* handles: (storage fd, inode, offset) per
piece instead of (slot, offset). Subscribers map each storage read-only through
/proc/<pid>/fd once, copy and hash in one pass, and check every whole tensor of the bucket
against the manifest at once (split tensors at the end, as always). What the ring's gather
check did (a tensor modified after it was hashed never ships) is now the subscriber's check:
a source modified during ``publish`` makes the reads mismatch, the bucket is re-sent, and after
three attempts the version aborts; nothing is applied. The price: the publish holds the source
until the last subscriber has read it (``publish`` already returns only after the commit), the
source's memory is shared memory (shmem pages; /dev/shm must have room, checked up front), and
a subscriber that cannot map it (another pid namespace, say) nacks with DIRECT_UNAVAILABLE:
the version is aborted and published again at once, through the ring for that subscriber
from then on. Direct versions are planned in buckets of at least DIRECT_BUCKET_BYTES (a
bucket holds no memory there; each costs round trips), which is also why they cannot fall
back to the ring bucket by bucket; their handles travel in the version's own publish request
(up to 256 of them and ~1 MiB of piece tables; later ones are posted one by one). A CUDA
source may opt in (direct="on"): each storage is exported once over CUDA IPC
(ipc.CudaSourceExport) and subscribers on the publisher's GPU read it with the copy+hash
kernel; it was written without a GPU, so "auto" leaves CUDA sources on the ring. Catch-up
versions for late joiners, versions with remote (relayed) subscribers or subscribers on
another device than the source, and checkpoint sources always use the ring.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import numbers
import operator
import os
import threading
import time
import uuid
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import _C, ops
from . import config as _config
from . import metrics as _metrics
from .coordinator import Client, CoordinatorError
from .dist import launch_info
from .doorbell import NACK, Doorbell, DoorbellError
from .ipc import (CudaSourceExport, CudaSourceMaps, DirectUnavailable, HandleError, SlotRing,
                  SourceMaps, open_ring, share_host_tensors)
from .transport import Transport, TransportError, create_transport, not_ready, select_transport
from .manifest import Manifest, ManifestError, dtype_name
from .plan import Plan, SubscriberSpec, consumer_mask, make_plan

__all__ = ["Publisher", "PublishResult", "PublishError", "Subscriber", "UpdateError",
           "StagedVersion", "BucketSource"]

log = logging.getLogger("hotweights")

# The nack of a subscriber that cannot map a direct read's source (Note [Direct reads]).
DIRECT_UNAVAILABLE = "direct read unavailable"
# Direct versions are planned in buckets of at least this size (unless the Publisher was given
# bucket_bytes): a bucket holds no memory there, and each costs a few coordinator round trips
# per subscriber.
DIRECT_BUCKET_BYTES = 256 << 20
# On a GPU a bucket's copy takes microseconds (64 MiB: ~30 us at 2 TB/s) while its control
# work (gather, announce, scatter, ack, release: Python and coordinator round trips) takes
# ~1.3-1.7 ms (measured on an H200, docs/BENCHMARKS.md "GPU (H200), session 5"): a CUDA
# publisher of a model of at least CUDA_BIG_MODEL_BYTES (1 GB) uses buckets of CUDA_BUCKET_BYTES in a
# ring of at most CUDA_SLOTS slots (1 GiB) unless bucket_mb (or bucket_bytes) is set, and plans
# its direct versions in buckets of CUDA_DIRECT_BUCKET_BYTES (they hold no memory). 8 GiB on
# the H200: 50 ms with these defaults, 299 ms in 64 MiB buckets.
CUDA_BUCKET_BYTES = 256 << 20
CUDA_SLOTS = 4
CUDA_BIG_MODEL_BYTES = 10**9
CUDA_DIRECT_BUCKET_BYTES = 1 << 30
# A direct version's handles posted with the version itself: at most this many (the protocol's
# bound on publish(handles=...)) and about this many bytes of piece tables.
EARLY_HANDLES = 256
EARLY_HANDLE_BYTES = 1 << 20
# a subscriber starts the reads of up to READ_AHEAD waiting handles before checking the first
# (Note [Read-ahead])
READ_AHEAD = 8
# a subscriber waiting on a doorbell asks the coordinator (without waiting) when nothing rang
# for this long: handles that only it has (posted before the lane was claimed, relays)
DOORBELL_POLL_S = 0.05
# ... and about the version's state (aborted? timed out?) at most this often
DOORBELL_STATE_S = 0.25
# per-bucket gauges (window, in flight) are set at most this often (and at a version's end)
GAUGE_EVERY_S = 0.05
# a publisher asks the coordinator about consumers of doorbell-only buckets left unanswered
# this long (dead or refusing ones must not hold a slot)
DOORBELL_STUCK_S = 1.0
# Subscribers look for storages a publisher freed at least this often (sooner when it shares
# new ones).
PRUNE_EVERY_S = 2.0


class PublishError(RuntimeError):
    """A version could not be published (aborted, timed out, or its source changed)."""


class UpdateError(RuntimeError):
    """A subscriber refused or failed a version; its weights are untouched."""


class BucketSource:
    """A source that is not a set of live tensors (a checkpoint on disk): the Publisher asks it
    for the version's manifest, then for the bytes of each bucket.

    Note [Bucket sources]
    ``snapshot`` returns the manifest (it may come from a stored manifest without reading any
    tensor bytes). ``fill`` writes pieces of tensors straight into a slot and returns the hw64
    partial sum of each piece keyed by its offset inside its tensor, exactly as
    ``ops.gather(..., hash=True)`` does for live tensors, so the Publisher's checks apply
    unchanged: a whole piece that does not hash to the manifest (the source changed after it
    was hashed, or a stored manifest is stale) aborts the version, and subscribers verify every
    tensor end to end. Only the pieces of the plan are read, so a delta reads only the changed
    tensors. ``close`` frees what the source holds (files, buffers, threads).
    """

    device: torch.device

    def snapshot(self, model: str, label: str | None, parent: int | None) -> Manifest:
        """The manifest of the source now."""
        raise NotImplementedError

    def fill(self, slot: torch.Tensor, names: list[str], slot_offsets: np.ndarray,
             lengths: np.ndarray, tensor_offsets: np.ndarray) -> np.ndarray:
        """Writes piece k (``lengths[k]`` bytes at ``tensor_offsets[k]`` of tensor
        ``names[k]``) at ``slot_offsets[k]`` of ``slot``; returns the pieces' partial sums."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the source's resources."""


def _tensors_of(source) -> dict[str, torch.Tensor]:
    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict(keep_vars=False))
    if callable(source):
        return dict(source())
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"Publisher: expected an nn.Module, a mapping of tensors, a callable returning "
                    f"one or a BucketSource, got {type(source).__name__}")


def _device_of(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Publisher: source entry {n!r} is a {type(t).__name__}, expected a "
                            "tensor")
    devs = {t.device for t in tensors.values()}
    if len(devs) > 1:
        raise ValueError(f"Publisher: all tensors must live on one device, got {sorted(map(str, devs))}")
    return devs.pop() if devs else torch.device("cpu")


# --------------------------------------------------------------------------- publisher


@dataclasses.dataclass
class PublishResult:
    """What one publish did: version id, bytes and buckets moved, retries and timings (s)."""

    version: int
    state: str
    label: str | None
    bytes: int
    buckets: int
    tensors: int
    retries: int
    timings: dict[str, float]
    reason: str | None = None


@dataclasses.dataclass
class _Rung:
    """A bucket posted only in the doorbell (Note [Doorbell]): its slot, post sequence number,
    the consumers' lanes and client ids (in the same order), when it was posted."""
    slot: int
    seq: int
    lanes: np.ndarray
    cids: list
    t_post: float
    version: int
    bucket: int


class _Transfer:
    """Book-keeping of the version being streamed (publisher side)."""

    def __init__(self, version: int, plan: Plan):
        self.version = version
        self.plan = plan
        self.attempts: dict[int, int] = {}
        self.retry: list[int] = []          # buckets to send again
        self.failed: str | None = None      # reason to abort
        self.posted = 0
        self.acked_bytes = 0
        self.progress: Callable[[int, int], None] | None = None
        self.done = threading.Event()
        self.direct: dict | None = None     # Note [Direct reads]: where the source lives
        self.redo = False                   # a subscriber cannot read directly: publish again
        self.committed = False              # a release said so: no version() request needed


class Publisher:
    """Publishes versions of a model's tensors to every subscriber of ``name``.

    ``source``: an ``nn.Module``, a mapping name -> tensor, a callable returning one (read at
    every publish), or a BucketSource (a checkpoint: see ``from_checkpoint``). All tensors must
    live on one device; the slot ring is allocated there once
    (``slots`` x ``bucket_bytes``, default HOTWEIGHTS_IPC_MAX_INFLIGHT x HOTWEIGHTS_BUCKET_MB) and
    exported once. ``endpoint=None`` uses HOTWEIGHTS_COORD_ENDPOINT or the embedded coordinator.
    ``serve_late``: when a subscriber joins after the current version, publish a catch-up
    version (same content if the source did not change; a changed source just gives a new
    version) while no publish is running.
    """

    def __init__(self, source, name: str = "model", endpoint: str | None = None, *,
                 bucket_bytes: int | None = None, slots: int | None = None,
                 quorum: Any = None, token: str | None = None, node: str | None = None,
                 serve_late: bool = True, change_tracking: str = "hash",
                 optimizers: list | tuple = (), transport: str | Transport | None = "auto",
                 direct: str | None = None, client: Client | None = None, config=None):
        self.cfg = config or _config.get()
        _metrics.autostart(self.cfg)  # HOTWEIGHTS_METRICS_PORT (+ local rank); off by default
        if change_tracking not in ("hash", "version"):
            raise ValueError(f"Publisher: change_tracking={change_tracking!r}, expected 'hash' or 'version'")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Publisher: name={name!r}, expected a non-empty string")
        # Note [Change tracking]: "hash" re-hashes every tensor at every publish (always right).
        # "version" re-hashes only tensors whose storage, shape, dtype or autograd version counter
        # changed since the last publish, or whose optimizer stepped (step hooks below: fused
        # optimizers do not bump version counters). Writes through `.data` or from native code
        # that bypass both are NOT seen in this mode.
        self.change_tracking = change_tracking
        self._known: dict[str, tuple] = {}       # name -> (ptr, version, shape, dtype, checksum)
        self._last_snapshot: tuple | None = None  # ((names, shapes+dtypes), Manifest)
        self._dirty: set[int] = set()            # ids of tensors an optimizer stepped
        if not isinstance(optimizers, torch.optim.Optimizer):
            try:
                optimizers = list(optimizers)  # a generator is read once
            except TypeError:
                pass  # refused just below, by type
        if isinstance(optimizers, torch.optim.Optimizer) or not isinstance(optimizers, list) or not all(
                isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(f"Publisher: optimizers is a {type(optimizers).__name__}, expected "
                            "a list of torch.optim.Optimizer")
        self._hooks = [opt.register_step_post_hook(self._on_optimizer_step) for opt in optimizers]
        self._source = source
        self._bucket_source = isinstance(source, BucketSource)  # Note [Bucket sources]
        self._own_source = False                                 # from_checkpoint: close it too
        self.name = name
        tensors = None if self._bucket_source else _tensors_of(source)  # (a callable: called once)
        self.device = (torch.device(source.device) if self._bucket_source
                       else _device_of(tensors))
        for what, v, lo in (("bucket_bytes", bucket_bytes, 256), ("slots", slots, 1)):
            if v is None:
                continue
            try:  # numpy integers too
                ok = not isinstance(v, bool) and operator.index(v) >= lo
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"Publisher: {what}={v!r}, expected None (the setting) or an "
                                 f"integer >= {lo}")
        self.bucket_bytes = int(bucket_bytes or self.cfg.bucket_bytes)
        # direct versions: at least DIRECT_BUCKET_BYTES, unless bucket_bytes was given
        direct_min = DIRECT_BUCKET_BYTES
        self.slots = int(slots or self.cfg.ipc_max_inflight)
        if self.device.type == "cuda" and not self._bucket_source:
            direct_min = CUDA_DIRECT_BUCKET_BYTES
            big = sum(t.numel() * t.element_size() for t in tensors.values()) >= CUDA_BIG_MODEL_BYTES
            if big and not bucket_bytes and "bucket_mb" not in self.cfg.explicit:
                # the ring's memory stays at CUDA_SLOTS x CUDA_BUCKET_BYTES (1 GiB) whatever
                # the window bounds say; set bucket_mb to choose both
                self.bucket_bytes = max(self.bucket_bytes, CUDA_BUCKET_BYTES)
                if not slots:
                    self.slots = min(self.slots, CUDA_SLOTS)
        self._direct_bucket_bytes = int(bucket_bytes or max(self.bucket_bytes, direct_min))
        if self.bucket_bytes % 256:
            raise ValueError(f"Publisher: bucket_bytes={self.bucket_bytes}, expected a multiple of 256")
        self.quorum = quorum
        self.client = client or Client(endpoint, token=token)
        self._own_client = client is None
        self.launch = launch_info()
        self.node = node or self.launch.node
        # Note [Hierarchy]: subscribers on other nodes are reached through one leader per node
        # over an inter-node transport; created on first need (UCX listens only then).
        self._transport_spec = transport
        self._transport: Transport | None = transport if isinstance(transport, Transport) else None
        self._tags = 0
        self.ring = SlotRing(self.bucket_bytes, self.slots, self.device, name=f"pub-{name}")
        self._cuda_export = CudaSourceExport() if self.device.type == "cuda" else None
        self._direct_mode = direct or self.cfg.direct_read
        self.direct = self._direct_setup(self._direct_mode)
        self._no_direct: set[str] = set()   # subscribers that could not map the source
        self._churned = False               # the last direct version had to move its source
        self._share_gen = 0                 # bumped when storages are (re)shared
        self.window = _C.WindowController(
            base=min(self.cfg.ipc_inflight_buckets, self.slots),
            byte_cap=self.cfg.ipc_inflight_bytes, adapt=self.cfg.ipc_adapt,
            min_window=min(self.cfg.ipc_min_inflight, self.slots),
            max_window=min(self.cfg.ipc_max_inflight, self.slots),
            target_s=self.cfg.ipc_target_bucket_ms / 1000.0)
        self.metrics = _metrics.PublisherMetrics(
            name, self.window, target_s=self.cfg.ipc_target_bucket_ms / 1000.0,
            max_window=min(self.cfg.ipc_max_inflight, self.slots))
        # same-node per-bucket control in shared memory (Note [Doorbell])
        self.doorbell = (Doorbell.create(self.slots, spin_s=self.cfg.spin_s) if self.cfg.doorbell
                         else None)
        self._capabilities = {"ring": self.ring.handle(), "ring_id": self.ring.id,
                              "slot_bytes": self.bucket_bytes, "slots": self.slots,
                              "device": str(self.device), "pid": _pid(), "rank": self.launch.rank}
        if self.doorbell is not None:
            self._capabilities["doorbell"] = self.doorbell.handle()
        reg = self.client.register("publisher", name, node=self.node, device=str(self.device),
                                   capabilities=self._capabilities)
        self.client_id = reg["client_id"]
        self.version: int | None = reg["current_version"]
        self._manifests: dict[int, Manifest] = {}
        self._lock = threading.RLock()          # one publish at a time
        self._cv = threading.Condition()        # slots, inflight, transfer state
        self._free = list(range(self.slots))
        self._inflight: dict[str, tuple] = {}   # handle_id -> (slot, bucket, bytes, t_post, transfer)
        self._transfer: _Transfer | None = None
        self._closed = False
        # Test hook: called with (bucket, slot tensor, attempt) after a bucket is gathered and
        # hashed, before it is announced (tests corrupt or delay slots through it).
        self.after_gather: Callable[[int, torch.Tensor, int], None] | None = None
        self.stats = {"versions": 0, "bytes": 0, "buckets": 0, "retries": 0, "expired": 0,
                      "relayed_bytes": 0, "direct_buckets": 0, "doorbell_acks": 0,
                      "doorbell_errors": 0}
        self._routes: dict[str, dict] = {}  # subscriber id -> {"node", "leader", "peer"}
        self._released_after = 0
        self._inflight_reported = self._window_reported = 0.0  # gauges last set (perf_counter)
        # slots whose posts every consumer can ack through the doorbell: handle id ->
        # (slot, seq, lanes); freed by _doorbell_loop as soon as those lanes acked
        self._rung: dict[str, _Rung] = {}
        self._releaser = threading.Thread(target=self._release_loop, name=f"hw-pub-{name}",
                                          daemon=True)
        self._releaser.start()
        self._ringer = None
        if self.doorbell is not None:
            self._ringer = threading.Thread(target=self._doorbell_loop,
                                            name=f"hw-pub-bell-{name}", daemon=True)
            self._ringer.start()
        # asks the coordinator who subscribes while publish() hashes (one thread: one socket)
        self._asker = concurrent.futures.ThreadPoolExecutor(1, f"hw-pub-ask-{name}")
        self._serve_late = serve_late
        self._watcher = None
        if serve_late:
            self._watcher = threading.Thread(target=self._late_join_loop,
                                             name=f"hw-pub-late-{name}", daemon=True)
            self._watcher.start()

    def _direct_setup(self, mode: str) -> bool:
        """Whether same-node CPU subscribers may read the source in place (Note [Direct
        reads]); moves the source to shared memory now, so the first publish is not slower."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"Publisher: direct={mode!r}, expected 'auto', 'on' or 'off'")
        if mode == "off":
            return False
        why = None
        if self._bucket_source:
            why = "a checkpoint source is read bucket by bucket"
        elif self.device.type == "cuda" and mode == "auto":
            why = ("CUDA direct reads are opt-in (direct='on') until they are verified on a GPU")
        elif self.device.type not in ("cpu", "cuda"):
            why = f"the source is on {self.device}"
        else:
            try:
                tensors = list(_tensors_of(self._source).values())
                if self.device.type == "cuda":
                    self._cuda_export.layout(tensors)
                else:
                    share_host_tensors(tensors)
            except DirectUnavailable as e:
                why = str(e)
        if why is None:
            return True
        if mode == "on":
            raise ValueError(f"Publisher: direct='on' but {why}")
        log.info("publisher %s: subscribers read through the ring: %s", self.name, why)
        return False

    @classmethod
    def from_checkpoint(cls, checkpoint, name: str = "model", endpoint: str | None = None, *,
                        device: str | torch.device = "cpu", manifest: str | None = "auto",
                        reader: Any = "auto", progress: Callable[[int, int], None] | None = None,
                        **kwargs) -> "Publisher":
        """A Publisher whose source is a safetensors checkpoint (a file, a directory with or
        without a ``*.safetensors.index.json``, or a list of files), validated before anything
        is registered, read without building a module. ``device``: where its slot ring lives.
        ``manifest``: "auto" (a stored manifest beside the checkpoint when it is fresh),
        a path, or None (hash the files). ``reader``: "auto", "gds", "posix", "mmap" or a
        StorageReader. See hotweights.storage and docs/storage.md."""
        from .storage import CheckpointSource  # integrations layer: imported on use

        src = CheckpointSource(checkpoint, device=device, manifest=manifest, reader=reader,
                               progress=progress)
        try:
            pub = cls(src, name, endpoint, **kwargs)
        except BaseException:
            src.close()
            raise
        pub._own_source = True
        return pub

    # ------------------------------------------------------------------ publish

    def publish(self, label: str | None = None, *, timeout: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> PublishResult:
        """Publishes the source's current tensors as the next version and waits until the
        quorum committed it. Returns what moved and the timings; raises PublishError when the
        version is aborted. The source must not be modified until this returns.
        ``progress(bytes_acked, bytes_total)`` is called as buckets are acknowledged."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ValueError(f"publish: timeout={timeout!r}, expected a number of seconds > 0")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise ValueError(f"publish: label={label!r:.60}, expected a str of at most 200 "
                             "characters")
        with self._lock:
            if self._closed:
                raise PublishError("publisher is closed")
            return self._publish(label, timeout if timeout is not None else self.cfg.version_timeout_s,
                                 progress, direct=True)

    def _publish(self, label, timeout, progress=None, direct: bool = False) -> PublishResult:
        t0 = time.perf_counter()
        asked = self._asker.submit(self.client.clients, self.name)  # overlaps the hashing
        if self._bucket_source:
            tensors = None
            manifest = self._source.snapshot(self.name, label, self.version)
        else:
            tensors = _tensors_of(self._source)
            if _device_of(tensors) != self.device:
                raise PublishError(f"source moved from {self.device} to {_device_of(tensors)}; "
                                   "create a new Publisher for the new device")
            manifest = self._snapshot(tensors, label)
        t_manifest = time.perf_counter()
        subs = [c for c in asked.result() if c["role"] == "subscriber" and c["alive"]]
        self._routes = self._route(subs)
        # each delta from the newest version the subscriber holds, staged or applied
        # (Note [Delta base])
        specs = [SubscriberSpec(c["client_id"], self._manifest(c["holds"]),
                                c["consumer"] or None) for c in subs]
        layout = None
        if direct and tensors is not None and self._direct_possible(subs):
            plan = make_plan(manifest, specs, self._direct_bucket_bytes)
            layout = self._direct_layout(plan, tensors)
        if layout is None:
            plan = make_plan(manifest, specs, self.bucket_bytes)
        t_plan = time.perf_counter()
        xfer = _Transfer(None, plan)
        xfer.progress = progress
        xfer.direct = layout
        # direct reads: the first buckets' handles travel with the version (one request less
        # before anything moves); registered in flight first, so no release can miss them.
        # Not with the after_gather test hook: it runs before its bucket is announced, which
        # must then be after the version exists (tests stop publishers mid-version there).
        with self._cv:
            if not self._inflight:  # idle since the last version: no round spans the gap
                self.window.on_start(time.monotonic())
        early = (self._early_direct(xfer) if layout is not None and self.after_gather is None
                 else [])
        with self._cv:
            self._transfer = xfer
        if self.doorbell is not None:  # seen by any subscriber that sees the version event
            self.doorbell.announce(ring=layout is None)
        try:
            version = self.client.publish(
                self.client_id, self.name, manifest.to_bytes(), label=label,
                parent=self.version, plan=plan.to_bytes(), expected=[s.id for s in specs],
                quorum=self.quorum, handles=early,
                meta={"bytes": plan.total_bytes, "buckets": plan.num_buckets,
                      "ring_id": self.ring.id})["version"]
        except BaseException:
            with self._cv:
                for h in early:
                    self._inflight.pop(h["handle_id"], None)
                self._transfer = None
                self._report_inflight()
                self._cv.notify_all()
            raise
        xfer.version = version
        manifest = manifest.with_version(version)
        plan.version = version
        self._manifests[version] = manifest
        info: dict = {"state": "aborted"}  # what an exception below leaves it as, here
        try:
            self._stream(xfer, tensors, manifest, t0 + timeout, skip=len(early))
            t_stream = time.perf_counter()
            if xfer.failed:
                try:
                    self.client.abort(self.client_id, self.name, version, xfer.failed)
                except CoordinatorError as e:  # decided meanwhile (committed or aborted)
                    log.info("publisher %s: abort of version %d not needed: %s", self.name, version, e)
            left = max(0.1, t0 + timeout - time.perf_counter())
            try:
                info = ({"state": "committed", "reason": None}
                        if xfer.committed and not xfer.failed
                        else self.client.wait_version(self.name, version, left))
            except TimeoutError:
                self.client.abort(self.client_id, self.name, version, f"timeout after {timeout} s")
                info = self.client.version(self.name, version)
        except BaseException as e:  # Ctrl-C, or a bug: the version must not stay in flight
            try:                    # (its subscribers would wait for it until it times out)
                self.client.abort(self.client_id, self.name, version,
                                  f"publish interrupted: {type(e).__name__}")
            except Exception as e2:  # decided meanwhile, or the coordinator is gone
                log.info("publisher %s: abort of interrupted version %d: %s", self.name,
                         version, e2)
            if self._closed and isinstance(e, Exception):
                raise PublishError(f"publisher {self.name!r} was closed while version {version} "
                                   "was being published") from e
            raise
        finally:
            with self._cv:
                xfer.done.set()
                self._transfer = None
                self._cv.notify_all()
            self._settle_rung(xfer, info["state"])
            self.metrics.window(self.window)  # the gauges as the version leaves them
        t_end = time.perf_counter()
        res = PublishResult(
            version=version, state=info["state"], label=label, bytes=plan.total_bytes,
            buckets=plan.num_buckets, tensors=len(plan.names),
            retries=sum(max(0, a - 1) for a in xfer.attempts.values()),
            timings={"manifest_s": t_manifest - t0, "plan_s": t_plan - t_manifest,
                     "stream_s": t_stream - t_plan, "commit_wait_s": t_end - t_stream,
                     "total_s": t_end - t0},
            reason=info.get("reason"))
        self.stats["versions"] += 1
        self.stats["bytes"] += plan.total_bytes
        self.stats["buckets"] += plan.num_buckets
        self.stats["retries"] += res.retries
        self.metrics.version(version, info["state"], info.get("reason") or xfer.failed,
                             res.timings)
        if info["state"] != "committed":
            if xfer.redo and direct:  # once more, through the ring for whoever could not map
                log.warning("publisher %s: version %d aborted (%s); publishing again", self.name,
                            version, xfer.failed)
                return self._publish(label, max(0.1, t0 + timeout - time.perf_counter()),
                                     progress, direct=direct)
            raise PublishError(f"version {version} of {self.name!r} was {info['state']}: "
                               f"{info.get('reason') or xfer.failed or 'no reason given'}")
        self.version = version
        return res

    def _direct_possible(self, subs: list[dict]) -> bool:
        """Every subscriber of the version can read the source directly: on this node, on
        the CPU (CUDA source: on the publisher's GPU), and not known to fail at mapping it
        (Note [Direct reads])."""
        def same_kind(dev: str) -> bool:
            return dev == str(self.device) if self.device.type == "cuda" else dev.startswith("cpu")

        return self.direct and all(
            self._routes.get(c["client_id"], {}).get("leader") is None
            and same_kind(str(c.get("device", "cpu"))) and c["client_id"] not in self._no_direct
            for c in subs)

    def _direct_layout(self, plan: Plan, tensors) -> dict | None:
        """Where each tensor of the plan lives in shared memory; None: the version goes
        through the ring."""
        if not plan.num_buckets:
            return None
        if self.device.type == "cuda":
            names = list(tensors)
            try:  # every tensor: the export cache follows the whole source
                lay = self._cuda_export.layout([tensors[n] for n in names])
            except DirectUnavailable as e:
                log.info("publisher %s: version through the ring: %s", self.name, e)
                return None
            pos = {n: i for i, n in enumerate(names)}
            rows = np.fromiter((pos[n] for n in plan.names), np.int64, len(plan.names))
            torch.cuda.synchronize(self.device)  # every write to the source precedes the reads
            return {**lay, "sidx": lay["sidx"][rows], "soff": lay["soff"][rows]}
        used = np.unique(plan.piece_tensor)
        try:
            lay = share_host_tensors([tensors[plan.names[i]] for i in used.tolist()])
        except DirectUnavailable as e:
            log.info("publisher %s: version through the ring: %s", self.name, e)
            return None
        # A source that hands out fresh tensors at every publish (a callable building them)
        # makes every direct version move its bytes into shared memory first: no better than
        # the ring's gather, plus mappings to churn. Two such versions in a row: the ring.
        if lay["moved"]:  # storages were (re)shared: subscribers look for freed ones
            self._share_gen += 1
        churn = lay["moved"] > plan.total_bytes // 2
        if churn and self._churned and self._direct_mode == "auto":
            self.direct = False
            log.info("publisher %s: the source's storages are new at every publish; "
                     "subscribers read through the ring from now on", self.name)
        self._churned = churn
        sidx = np.full(len(plan.names), -1, np.int32)
        soff = np.zeros(len(plan.names), np.int64)
        sidx[used], soff[used] = lay["sidx"], lay["soff"]
        return {"pid": lay["pid"], "st": lay["st"], "sidx": sidx, "soff": soff,
                "gen": self._share_gen}

    def _route(self, subs: list[dict]) -> dict[str, dict]:
        """Who reads this publisher's ring directly (same node) and who gets buckets through
        the leader of its node (Note [Hierarchy])."""
        by_node: dict[str, list[dict]] = {}
        for c in subs:
            by_node.setdefault(c["node"], []).append(c)
        routes = {}
        for node, members in by_node.items():
            if node == self.node:
                for c in members:
                    routes[c["client_id"]] = {"node": node, "leader": None}
                continue
            t = self._get_transport(node)
            # the leader: lowest rank of the node (client id breaks ties / rank-less processes)
            leader = min(members, key=lambda c: (c["capabilities"].get("rank") is None,
                                                 c["capabilities"].get("rank") or 0, c["client_id"]))
            if t.name in ("mpi", "torch"):
                peer = leader["capabilities"].get("rank")
                if peer is None:
                    raise PublishError(f"subscriber {leader['client_id']} on node {node!r} has no "
                                       f"{t.name} rank; launch every process with the same launcher")
            else:
                peer = leader["client_id"]  # it connects to us and introduces itself
            for c in members:
                routes[c["client_id"]] = {"node": node, "leader": leader["client_id"], "peer": peer}
        return routes

    def _get_transport(self, node: str) -> Transport:
        if self._transport is None:
            name = None if self._transport_spec in ("auto", None) else self._transport_spec
            sel = name or select_transport()
            if sel == "local" or self._transport_spec is None:
                why = "; ".join(f"{k}: {v}" for k, v in
                                select_transport(explain=True)["candidates"].items() if k != "local")
                raise PublishError(
                    f"subscribers on node {node!r} cannot map this publisher's ring (node "
                    f"{self.node!r}) and there is no inter-node transport ({why}): launch with "
                    "mpirun or torchrun, install ucxx, or set HOTWEIGHTS_TRANSPORT")
            problem = not_ready(sel)
            if problem is not None:  # starting it here would hang (Note [Transports])
                raise PublishError(f"subscribers on node {node!r} need the {sel} transport: "
                                   f"{problem}")
            kw = {"coord_endpoint": self.client.endpoints[0]} if sel == "ucx" else {}
            self._transport = create_transport(sel, **kw)
            self._capabilities.update(transport=self._transport.name,
                                      address=getattr(self._transport, "listen_address",
                                                      self._transport.address))
            self.client.register("publisher", self.name, node=self.node, device=str(self.device),
                                 capabilities=self._capabilities, client_id=self.client_id)
            log.info("publisher %s: inter-node transport %s (%s)", self.name,
                     self._transport.name, self._transport.describe())
        return self._transport

    def _on_optimizer_step(self, opt, args, kwargs) -> None:
        for group in opt.param_groups:
            self._dirty.update(id(p) for p in group["params"])

    def _snapshot(self, tensors: dict[str, torch.Tensor], label) -> Manifest:
        """The manifest of the source now (Note [Change tracking])."""
        if self.change_tracking == "hash":
            return Manifest.from_state_dict(tensors, model=self.name, label=label, parent=self.version)
        names = list(tensors)
        sums = np.zeros(len(names), np.uint64)
        todo, keys = [], []
        # taken before reading: a step marked from the trainer's thread meanwhile (a catch-up
        # runs on the publisher's own thread) counts for the next snapshot, never lost
        dirty, self._dirty = self._dirty, set()
        # state_dict() aliases share version counters with these; only needed (and built,
        # ~3 us per parameter) when an optimizer step marked some dirty
        params = self._params if dirty else {}
        refs: list = []
        for i, (n, t) in enumerate(tensors.items()):
            # The storage itself is in the key, not only its address: a new tensor can be
            # allocated where a freed one was, with a fresh version counter (0 again). The
            # weak reference kept with the entry keeps the old StorageImpl's address from
            # being reused while it is remembered, and tells when it was freed.
            st = t.untyped_storage()
            key = (st._cdata, t.data_ptr(), t._version, tuple(t.shape), t.dtype)
            k = self._known.get(n)
            if (k is not None and k[:5] == key and not k[6].expired()
                    and id(params.get(n, t)) not in dirty):
                sums[i] = k[5]
                refs.append(k[6])
            else:
                todo.append(i)
                refs.append(StorageWeakRef(st))
            keys.append(key)
        if todo:
            sums[todo] = ops.checksum_batch([tensors[names[i]].detach() for i in todo])
        self._known = {n: (*keys[i], sums[i], refs[i]) for i, n in enumerate(names)}
        layout = (names, [k[3:] for k in keys])  # names, shapes and dtypes, in order
        last = self._last_snapshot
        if last is not None and last[0] == layout:  # the usual case: only values changed
            m = last[1].with_checksums(sums, label=label, parent=self.version)
        else:
            m = Manifest(names, [dtype_name(t.dtype) for t in tensors.values()],
                         [tuple(t.shape) for t in tensors.values()],
                         np.fromiter((t.numel() * t.element_size() for t in tensors.values()),
                                     np.int64, len(names)),
                         sums, model=self.name, label=label, parent=self.version)
        self._last_snapshot = (layout, m)
        return m

    @property
    def _params(self) -> dict[str, torch.Tensor]:
        """Parameter objects by state-dict name (state_dict() returns detached aliases)."""
        if isinstance(self._source, torch.nn.Module):
            return dict(self._source.named_parameters())
        return {}

    def _manifest(self, version: int | None) -> Manifest | None:
        if version is None:
            return None
        m = self._manifests.get(version)
        if m is None:  # published by an earlier session: the coordinator keeps it
            try:
                # stored before its version existed: stamped here (the plan's bases need it)
                m = Manifest.from_bytes(self.client.manifest(self.name, version)).with_version(version)
                self._manifests[version] = m
            except (CoordinatorError, ManifestError) as e:
                log.warning("publisher %s: manifest of version %s unavailable (%s): full send",
                            self.name, version, e)
                return None
        # keep a bounded history: subscribers lag by a few versions at most
        for v in sorted(self._manifests)[:-8]:
            self._manifests.pop(v, None)
        return m

    def _stream(self, xfer: _Transfer, tensors: dict[str, torch.Tensor] | None,
                manifest: Manifest, deadline: float, skip: int = 0) -> None:
        plan = xfer.plan
        src = None if tensors is None else [tensors[n] for n in plan.names]
        queue = list(range(skip, plan.num_buckets))  # the first `skip` went with the version
        if xfer.direct is None and self.doorbell is not None:
            self.doorbell.set_ring_version(xfer.version)  # its takers wait on the doorbell
        while True:
            with self._cv:
                while True:
                    if xfer.failed or self._closed:
                        return
                    if xfer.retry:
                        queue = xfer.retry + queue
                        xfer.retry = []
                    if not queue and not self._inflight_of(xfer):
                        return
                    info_bytes = sum(v[2] for v in self._inflight.values())
                    # direct reads hold no slot: nothing to pace (Note [Direct reads])
                    direct = xfer.direct is not None
                    if queue and (direct or self._free and self.window.can_admit(
                            len(self._inflight), info_bytes, int(plan.bucket_used[queue[0]]))):
                        b = queue.pop(0)
                        slot = None if direct else self._free.pop()
                        break
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        xfer.failed = "timeout while streaming buckets"
                        return
                    if not self._cv.wait(min(left, 0.5)) and self._decided(xfer):
                        return  # committed or aborted meanwhile: nothing left to send
            try:
                self._send_bucket(xfer, b, slot, src, manifest, last=not queue)
            except BaseException as e:  # a send that failed frees its slot and aborts the version
                with self._cv:
                    if slot is not None:
                        self._free.append(slot)
                    xfer.failed = f"sending bucket {b} failed: {type(e).__name__}: {e}"
                    self._cv.notify_all()
                if not isinstance(e, Exception):  # Ctrl-C: _publish aborts the version
                    raise
                return

    def _decided(self, xfer: _Transfer) -> bool:
        try:
            return self.client.version(self.name, xfer.version)["state"] != "transferring"
        except CoordinatorError:
            return False

    def _inflight_of(self, xfer: _Transfer) -> bool:
        return any(v[4] is xfer for v in self._inflight.values())

    def _send_bucket(self, xfer: _Transfer, b: int, slot: int | None,
                     src: list[torch.Tensor] | None, manifest: Manifest,
                     last: bool = False) -> None:
        if slot is None:
            self._post_direct(xfer, b)
            return
        plan = xfer.plan
        rows = plan.pieces(b)
        tidx = plan.piece_tensor[rows]
        toff = plan.piece_tensor_offset[rows]
        ln = plan.piece_length[rows]
        t_gather = time.perf_counter()
        if src is None:  # Note [Bucket sources]: read straight into the slot
            partials = self._source.fill(self.ring.slot(slot),
                                         [plan.names[i] for i in tidx.tolist()],
                                         plan.piece_slot_offset[rows], ln, toff)
        else:
            h = ops.gather(self.ring.slot(slot), [src[i] for i in tidx.tolist()],
                           plan.piece_slot_offset[rows], lengths=ln, tensor_offsets=toff, hash=True)
            partials = h.partials()
        # Whole pieces must hash to the manifest: otherwise the source changed after it was
        # hashed (a torn snapshot), and the version is aborted rather than shipped.
        partials = np.asarray(partials, dtype=np.uint64)
        whole = np.flatnonzero((toff == 0) & (ln == plan.nbytes[tidx]))
        bad = ops.mismatched(partials[whole], ln[whole], plan.checksums[tidx[whole]])
        if bad.size:
            t = int(tidx[whole[bad[0]]])
            self.metrics.source_changed()
            raise PublishError(f"tensor {plan.names[t]!r} changed while version "
                               f"{xfer.version} was being published; publish again")
        digest = ops.bucket_digest(partials, ln)
        gather_s = time.perf_counter() - t_gather
        attempt = xfer.attempts.get(b, 0) + 1
        xfer.attempts[b] = attempt
        if self.after_gather is not None:
            self.after_gather(b, self.ring.slot(slot), attempt)
        self.ring.record(slot)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        used = int(plan.bucket_used[b])
        consumers, relay, sends = [], {}, []
        for c in plan.consumers(b):
            r = self._routes.get(c, {"leader": None})
            if r["leader"] is None:
                consumers.append(c)
                continue
            leader = r["leader"]
            if leader not in relay:
                self._tags += 1
                relay[leader] = {"to": [], "need": False, "tag": self._tags, "nbytes": used,
                                 "src": self._transport.address, "transport": self._transport.name,
                                 "slot_bytes": self.bucket_bytes}
                consumers.append(leader)
                sends.append((leader, r["peer"], self._tags))
            if c == leader:
                relay[leader]["need"] = True
            else:
                relay[leader]["to"].append(c)
        hid = uuid.uuid4().hex
        db, seq, mask, only = self.doorbell, 0, 0, False
        if db is not None:  # Note [Doorbell]: the consumers on this node that have a lane
            seq = db.next_seq()
            local = [c for c in consumers if c not in relay]
            mask, lanes, every = db.lanes_of(local)
            # only in the doorbell when every consumer can take and ack it there; never the
            # last bucket queued: its release through the coordinator tells that the version
            # committed (the last ack carries the last precommit), as without doorbells
            only = bool(mask) and every and not relay and not last
        t_post = time.perf_counter()
        with self._cv:
            self._inflight[hid] = (slot, b, used, t_post, xfer, [])
            if only:
                self._rung[hid] = _Rung(slot, seq, lanes, local, t_post, xfer.version, b)
            self._report_inflight()
        try:
            if not only:
                payload = {"bucket": b, "slot": slot, "digest": digest, "ring_id": self.ring.id,
                           "attempt": attempt}
                if relay:
                    payload["relay"] = relay
                self.client.post_handle(self.client_id, self.name, xfer.version, payload,
                                        consumers=consumers, handle_id=hid)
            if mask:  # after the coordinator has it: a taker's ack may reach it first
                db.post(slot, seq, version=xfer.version, bucket=b, attempt=attempt, used=used,
                        digest=digest, mask=mask, handle_id=hid, coordinated=not only)
            # bytes cross to each remote node once, to its leader (Note [Hierarchy]); started
            # under the lock so the release of this handle always sees its sends
            with self._cv:
                for leader, peer, tag in sends:
                    pend = self._transport.isend(self.ring.slot(slot)[:used], peer, tag)
                    self._inflight[hid][5].append(pend)
                    self.stats["relayed_bytes"] += used
        except BaseException:  # (Ctrl-C too) the caller frees the slot
            with self._cv:
                self._inflight.pop(hid, None)
                self._rung.pop(hid, None)
                self._report_inflight()
            raise
        xfer.posted += 1
        self.metrics.gathered(int(ln.sum()), gather_s)
        if only:
            self.metrics.rung()

    def _direct_handle(self, xfer: _Transfer, b: int) -> tuple[str, dict]:
        """Bucket b as a direct read: for each piece, which shared storage holds it and where
        (Note [Direct reads]); nothing is copied. Registered in flight; returns (id, payload)."""
        d, plan = xfer.direct, xfer.plan
        rows = plan.pieces(b)
        tidx = plan.piece_tensor[rows]
        used, local = np.unique(d["sidx"][tidx], return_inverse=True)
        attempt = xfer.attempts.get(b, 0) + 1
        xfer.attempts[b] = attempt
        if self.after_gather is not None:
            self.after_gather(b, None, attempt)
        payload = {"bucket": b, "attempt": attempt, "direct": {
            "kind": d.get("kind", "cpu"), "pid": d["pid"], "gen": d.get("gen", 0),
            "st": [d["st"][k] for k in used.tolist()],
            "sidx": local.astype(np.int32).tobytes(),
            "soff": (d["soff"][tidx] + plan.piece_tensor_offset[rows]).astype(np.int64).tobytes()}}
        hid = uuid.uuid4().hex
        with self._cv:
            self._inflight[hid] = (None, b, int(plan.bucket_used[b]), time.perf_counter(), xfer, [])
            self._report_inflight()
        xfer.posted += 1
        self.stats["direct_buckets"] += 1
        return hid, payload

    def _early_direct(self, xfer: _Transfer, limit: int = EARLY_HANDLES,
                      max_bytes: int = EARLY_HANDLE_BYTES) -> list[dict]:
        """The handles of a direct version's first buckets, to post with the version: up to
        ``limit`` of them (the protocol's bound) and about ``max_bytes`` of piece tables. A
        direct bucket holds no slot, so there is nothing to pace: every handle that fits goes
        in that one request instead of one request each."""
        out, size = [], 0
        for b in range(min(limit, xfer.plan.num_buckets)):
            p = xfer.plan.pieces(b)
            rows = p.stop - p.start
            if out and size + 12 * rows > max_bytes:
                break
            size += 12 * rows  # int32 storage index + int64 offset per piece
            hid, payload = self._direct_handle(xfer, b)
            out.append({"payload": payload, "consumers": list(xfer.plan.consumers(b)),
                        "handle_id": hid})
        return out

    def _post_direct(self, xfer: _Transfer, b: int) -> None:
        """Posts bucket b as a direct read (a later bucket, or a re-send)."""
        hid, payload = self._direct_handle(xfer, b)
        try:
            self.client.post_handle(self.client_id, self.name, xfer.version, payload,
                                    consumers=list(xfer.plan.consumers(b)), handle_id=hid)
        except Exception:
            with self._cv:
                self._inflight.pop(hid, None)
                self._report_inflight()
            raise

    def _report_inflight(self) -> None:
        """In-flight gauges (call with self._cv held): at most every GAUGE_EVERY_S while
        buckets are in flight (a gauge per bucket was a fifth of a bucket's control cost once
        the doorbell took the coordinator out of it), and always when none are."""
        now = time.perf_counter()
        if self._inflight and now - self._inflight_reported < GAUGE_EVERY_S:
            return
        self._inflight_reported = now
        self.metrics.inflight(len(self._inflight), sum(v[2] for v in self._inflight.values()))

    # ------------------------------------------------------------------ background

    def _release_loop(self) -> None:
        """Frees slots as the coordinator releases their handles; feeds the window controller;
        schedules re-sends of buckets that a consumer nacked or never took."""
        try:
            while not self._closed:
                try:
                    r = self.client.released(self.client_id, after=self._released_after, wait_ms=1000)
                except Exception as e:
                    if self._closed:
                        return
                    log.warning("publisher %s: waiting for releases failed: %s", self.name, e)
                    time.sleep(0.5)
                    continue
                self._released_after = r["last"]
                self._settle(r["released"], time.perf_counter())
        finally:
            self.client.release_thread()

    def _settle(self, released: list[dict], now: float) -> None:
        """Frees the slots of released handles (from the coordinator, or rung back through
        the doorbell: reason "acked"), feeds the window, re-sends what failed. A handle
        settled already (through the other path) is skipped."""
        with self._cv:
            done = [(rel, self._inflight.pop(rel["handle_id"], None)) for rel in released]
            for rel in released:
                e = self._rung.pop(rel["handle_id"], None)
                if e is not None:  # withdrawn before its slot can be refilled
                    self.doorbell.clear(e.slot, e.seq)
                xfer = self._transfer
                if (rel.get("version_state") == "committed" and xfer is not None
                        and xfer.version == rel["version"]):
                    xfer.committed = True  # the last ack carried the last precommit
        # Sends to relays are settled outside the lock: a dead peer may take a while.
        for rel, entry in done:
            if entry is not None:
                self._settle_sends(entry[5], entry[1])
        progress = []  # the callers' callbacks run after the lock is released
        acked = False
        with self._cv:
            for rel, entry in done:
                if entry is None:
                    continue
                slot, b, nbytes, t_post, xfer, _ = entry
                if slot is not None:
                    self._free.append(slot)
                lost = [c for c in rel.get("missing", []) if self._is_leader(c)]
                if lost and xfer is self._transfer and not xfer.failed:
                    # a node's relay is gone: its subscribers cannot finish this version
                    xfer.failed = (f"relay {lost[0]} of node "
                                   f"{self._routes[lost[0]]['node']!r} did not take bucket "
                                   f"{b} ({rel['reason']}); aborting")
                    continue
                if rel["reason"] == "acked":
                    self.window.on_complete(time.monotonic(), max(now - t_post, 1e-6), max(nbytes, 1))
                    self.metrics.completed(max(now - t_post, 1e-6))
                    acked = True
                    xfer.acked_bytes += int(xfer.plan.piece_length[xfer.plan.pieces(b)].sum())
                    if xfer.progress is not None:
                        progress.append((xfer.progress, xfer.acked_bytes, xfer.plan.total_bytes))
                elif xfer is self._transfer and not xfer.failed:
                    self._handle_failure(xfer, b, rel)
            self._report_inflight()
            self._cv.notify_all()
        if acked and now - self._window_reported >= GAUGE_EVERY_S:  # off the lock
            self._window_reported = now
            self.metrics.window(self.window)
        for fn, nacked, total in progress:
            try:  # the caller's: it must not stop the releases
                fn(nacked, total)
            except Exception as e:
                log.warning("publisher %s: progress callback raised %r", self.name, e)

    def _doorbell_loop(self) -> None:
        """Settles the buckets posted only in the doorbell (Note [Doorbell]) as their lanes
        answer: freed when every lane verified it, re-sent when one failed. What the
        coordinator's lease and liveness did for them is done here: a consumer that died
        (or refused the version) does not hold a slot, one that stays silent past the lease
        (``handle_ttl``) gets the bucket again."""
        db = self.doorbell
        asked = 0.0
        gone: dict[int, set[str]] = {}  # by version: consumers known not to answer any more
        try:
            while not self._closed:
                try:
                    asked = self._doorbell_pass(db, asked, gone)
                except Exception:  # one pass failed: logged, the next one retries
                    self.stats["doorbell_errors"] += 1
                    log.exception("publisher %s: doorbell pass failed", self.name)
                    time.sleep(0.05)
        finally:
            self.client.release_thread()

    def _doorbell_pass(self, db: Doorbell, asked: float, gone: dict[int, set[str]]) -> float:
        """One look at the doorbell's answers (see _doorbell_loop); returns when the
        coordinator was last asked about silent consumers."""
        seen = db.acked_count()
        with self._cv:
            rung = list(self._rung.items())
        now = time.perf_counter()
        done, fresh = [], False
        for hid, e in rung:
            words = db.answers(e.slot, e.lanes)
            ok = words == e.seq
            if ok.all():  # the usual case
                done.append({"handle_id": hid, "reason": "acked", "version": e.version,
                             "errors": {}, "missing": []})
                continue
            bad = words == (e.seq | NACK)
            waiting = ~(ok | bad)
            if waiting.any() and e.version in gone:
                waiting &= ~np.isin(np.array(e.cids), list(gone[e.version]))
            if waiting.any():
                if now - e.t_post < DOORBELL_STUCK_S:
                    continue
                if not fresh and now - asked > DOORBELL_STUCK_S / 2:
                    asked, fresh = now, True
                    news = self._gone_consumers({x.version for _, x in rung})
                    if news is not None:  # (versions no longer in flight drop out)
                        gone.clear()
                        gone.update(news)
                if e.version in gone:
                    waiting &= ~np.isin(np.array(e.cids), list(gone[e.version]))
                if waiting.any():  # (the lease runs out even when liveness is unknown)
                    if now - e.t_post > self.cfg.handle_ttl:
                        done.append({"handle_id": hid, "reason": "expired",
                                     "version": e.version, "errors": {},
                                     "missing": [e.cids[i] for i in np.flatnonzero(waiting)]})
                    continue
            errors = {e.cids[i]: f"checksum mismatch in bucket {e.bucket} (reported "
                                 "through the doorbell)" for i in np.flatnonzero(bad)}
            done.append({"handle_id": hid, "reason": "nacked" if errors else "acked",
                         "version": e.version, "errors": errors, "missing": []})
        if done:
            self.stats["doorbell_acks"] += sum(d["reason"] == "acked" for d in done)
            self._settle(done, time.perf_counter())
        else:
            db.wait_acked(seen, 0.1 if rung else 0.5)
        return asked

    def _gone_consumers(self, versions: set[int]) -> dict[int, set[str]] | None:
        """For each version: its consumers that will not answer any more (dead, gone, or
        refused it); None when the coordinator cannot say now."""
        try:
            alive = {c["client_id"] for c in self.client.clients(self.name) if c["alive"]}
            out = {}
            for v in versions:
                rec = self.client.version(self.name, v)
                out[v] = set(rec.get("rejected", {})) | (set(rec.get("expected", [])) - alive)
            return out
        except Exception as e:
            log.info("publisher %s: liveness of doorbell consumers unknown: %s", self.name, e)
            return None

    def _settle_rung(self, xfer: "_Transfer", state: str) -> None:
        """At the end of a version, as the coordinator does with its handles: an aborted
        version's doorbell-only buckets still unanswered free their slots (nobody needs
        them); a committed version's stay until answered, given up on or past their lease
        (a subscriber outside a quorum smaller than "all" may still be reading). Either way
        the subscribers waiting on the doorbell are woken to ask the coordinator."""
        if self.doorbell is None:
            return
        if state != "committed":
            with self._cv:
                left = [hid for hid, e in self._rung.items() if e.version == xfer.version]
            if left:
                self._settle([{"handle_id": hid, "reason": "aborted", "version": xfer.version,
                               "errors": {}, "missing": []} for hid in left],
                             time.perf_counter())
        self.doorbell.ring()

    def _is_leader(self, cid: str) -> bool:
        return any(r.get("leader") == cid for r in self._routes.values())

    def _settle_sends(self, sends, b: int) -> None:
        """A slot is reused only once the transport is done reading it."""
        for p in sends:
            try:
                p.wait(self.cfg.request_timeout_s)
            except (TimeoutError, TransportError) as e:
                log.warning("publisher %s: relay send of bucket %d did not complete: %s",
                            self.name, b, e)

    def _handle_failure(self, xfer: _Transfer, b: int, rel: dict) -> None:
        if rel["reason"] == "expired":
            self.stats["expired"] += 1
            if not rel.get("missing"):
                return  # nobody live still needs it
        errors = rel.get("errors") or {}
        why = "; ".join(f"{k}: {v}" for k, v in errors.items()) or rel["reason"]
        unmappable = [c for c, e in errors.items() if str(e).startswith(DIRECT_UNAVAILABLE)]
        if unmappable and xfer.direct is not None:
            # direct buckets may be larger than a slot: this version is aborted and published
            # again at once, through the ring for them (and for later versions)
            self._no_direct.update(unmappable)
            xfer.redo = True
            xfer.failed = f"{why}; publishing again through the ring for them"
            return
        if rel["reason"] == "aborted":  # the version is over: nothing to re-send it for
            xfer.failed = f"version {xfer.version} was aborted"
            return
        if xfer.attempts.get(b, 0) >= 3:
            xfer.failed = f"bucket {b} failed 3 times ({why})"
            return
        log.warning("publisher %s: re-sending bucket %d of version %d (%s)", self.name, b,
                    xfer.version, why)
        self.metrics.retry(rel["reason"])
        xfer.retry.append(b)

    def _late_join_loop(self) -> None:
        """Watches the model's events; when a subscriber registers or asks for a catch-up (or
        every few seconds), serves subscribers that are behind the current version. A request
        that comes while a publish runs is served right after it."""
        after, last_check, pending = 0, 0.0, False
        try:
            while not self._closed:
                try:
                    ev = self.client.events(self.name, after=after, wait_ms=1000)
                except Exception:
                    if self._closed:
                        return
                    time.sleep(0.5)
                    continue
                after = ev["last"]
                pending = pending or any(
                    e.get("type") == "client" and e.get("role") == "subscriber"
                    and e.get("action") in ("joined", "rejoined", "behind") for e in ev["events"])
                now = time.monotonic()
                if self.version is not None and (pending or now - last_check > 5.0):
                    last_check = now
                    try:
                        if self._serve_laggards():
                            pending = False
                    except Exception as e:  # the coordinator away: asked again next round
                        log.warning("publisher %s: serving late subscribers failed: %s",
                                    self.name, e)
                        time.sleep(0.5)
        finally:
            self.client.release_thread()

    def _serve_laggards(self) -> bool:
        """Publishes a catch-up version when a live subscriber holds neither the current version
        nor a vote on it (it joined later), or said it dropped a version it could not apply
        (``behind``, Note [Delta base]). Subscribers that refused a version are not retried.
        False when a publish was running (it serves late joiners anyway; the caller asks
        again for the ones that are behind)."""
        if self._closed or not self._lock.acquire(blocking=False):
            return False
        try:
            info = self.client.version(self.name, self.version)
            if info["state"] != "committed":
                return True
            settled = set(info.get("applied", [])) | set(info.get("precommitted", [])) | set(
                info.get("rejected", {}))
            behind = [c for c in self.client.clients(self.name)
                      if c["role"] == "subscriber" and c["alive"] and c["holds"] != self.version
                      and (c["behind"] or c["client_id"] not in settled)]
            if not behind:
                return True
            log.info("publisher %s: %d subscriber(s) behind version %s: catch-up",
                     self.name, len(behind), self.version)
            try:
                # through the ring: training may go on while it streams (Note [Direct reads])
                self._publish(f"catch-up of v{self.version}", self.cfg.version_timeout_s)
            except Exception as e:
                log.warning("publisher %s: catch-up failed: %s", self.name, e)
            return True
        finally:
            self._lock.release()

    def close(self) -> None:
        """Stops the background threads, deregisters and frees the ring."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        with self._cv:
            self._cv.notify_all()
        for t in (self._releaser, self._watcher, self._ringer):
            if t is not None:
                t.join(5)
        _retire(self._asker, self.client, f"publisher {self.name}")
        try:
            self.client.deregister(self.client_id)
        except Exception as e:
            log.warning("publisher %s: deregister failed: %s", self.name, e)
        if self._own_client:
            self.client.close()
        if self._transport is not None and not isinstance(self._transport_spec, Transport):
            self._transport.close()
        self.metrics.close()
        if self._own_source:
            self._source.close()
        self.ring = None
        if self.doorbell is not None:
            self.doorbell.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _retire(pool: concurrent.futures.ThreadPoolExecutor, client: Client, who: str) -> None:
    """Stops a one-thread helper that talks to the coordinator: its socket is closed from its
    own thread (after the work queued before), then what is still queued is dropped."""
    try:
        pool.submit(client.release_thread).result(5)
    except Exception as e:
        log.warning("%s: releasing a helper thread failed: %s", who, e)
    pool.shutdown(wait=False, cancel_futures=True)


def _done(result: tuple) -> Callable[..., tuple]:
    """A bucket handled already: its finishing step just returns the result."""
    return lambda drain=False: result


def _reraise(e: BaseException, drain: bool = False) -> tuple:
    """The finishing step of a bucket whose start raised: raises it at the bucket's turn."""
    if drain:
        return False, str(e), None
    raise e


def _consumer_patterns(consumer, targets: Mapping[str, torch.Tensor]) -> list[str] | None:
    """The consumer set as a list of names and glob patterns (None: everything); each must
    select some tensor of the model, or it is a typo that would receive nothing."""
    if consumer is None:
        return None
    if isinstance(consumer, str):
        consumer = [consumer]
    try:
        out = list(consumer)
    except TypeError:
        raise TypeError(f"register_hotweights: consumer={consumer!r}, expected None, a name or "
                        "glob pattern, or a list of them") from None
    if not out:
        raise ValueError("register_hotweights: consumer=[] selects no tensor: expected None "
                         "(everything) or names / glob patterns")
    names = list(targets)
    for pat in out:
        if not isinstance(pat, str) or not pat:
            raise TypeError(f"register_hotweights: consumer pattern {pat!r}, expected a "
                            "non-empty string")
        if names and not consumer_mask(names, [pat]).any():
            raise ValueError(f"register_hotweights: consumer pattern {pat!r} selects none of the "
                             f"model's {len(names)} tensors (e.g. {names[0]!r})")
    return out


def _pid() -> int:
    import os

    return os.getpid()


# --------------------------------------------------------------------------- subscriber


@dataclasses.dataclass
class StagedVersion:
    """A version received, verified and waiting to be applied."""

    version: int
    label: str | None
    names: list[str]                 # tensors that change
    shadows: dict[str, torch.Tensor]
    reshaped: list
    timings: dict[str, float]
    bytes: int
    event: Any = None                # CUDA: the receive stream's completion event
    base: int | None = None          # the version its delta was planned from (None: full)
    prior_events: list = dataclasses.field(default_factory=list)  # of versions merged into it

    def onto(self, older: "StagedVersion") -> tuple["StagedVersion", dict[str, torch.Tensor]]:
        """This version staged on top of ``older``, a version staged before and not applied
        (Note [Delta base]). Returns what to stage and the buffers it frees. A delta planned
        from ``older`` merges with it: its tensors replace ``older``'s one by one and the
        rest of ``older`` stays, so the result is a delta from ``older``'s base (the version
        applied). A full version, or a delta from that same base, replaces ``older``. (Any
        other base cannot be merged: it replaces ``older`` and is dropped when applied.)"""
        if self.base is None or self.base != older.version:
            return self, dict(older.shadows)
        freed = {n: t for n, t in older.shadows.items() if n in self.shadows}
        shadows = {**{n: t for n, t in older.shadows.items() if n not in self.shadows},
                   **self.shadows}
        shape = {r[0]: r for r in older.reshaped}
        for r in self.reshaped:  # (name, (dtype, shape) before, after): before = the applied one
            first = shape.get(r[0], r)
            shape[r[0]] = (r[0], first[1], r[2])
        reshaped = [r for r in shape.values() if r[0] in shadows and r[1] != r[2]]
        merged = dataclasses.replace(  # bytes: all that moved for what is applied at once
            self, names=list(shadows), shadows=shadows, reshaped=reshaped,
            bytes=older.bytes + self.bytes, base=older.base,
            prior_events=[*older.prior_events, *([older.event] if older.event is not None else [])])
        return merged, freed


class Subscriber:
    """Receives versions of ``name`` into shadow buffers next to ``targets`` (a mapping name ->
    live tensor, or a function returning it, called again at every version received) and
    stages them; applying is the caller's (see module.py).

    ``consumer``: names or glob patterns of the tensors this subscriber needs (default: all);
    each must select at least one of the targets.
    ``on_staged(staged)`` is called from the worker thread when a version is committed by the
    coordinator and ready to apply; ``on_error(version, message)`` when one is refused or fails.
    """

    def __init__(self, targets: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]],
                 name: str = "model",
                 endpoint: str | None = None, *, consumer=None, accept_reshape: bool = False,
                 token: str | None = None, node: str | None = None, keep_staging: bool = True,
                 on_staged: Callable[[StagedVersion], None] | None = None,
                 on_error: Callable[[int, str], None] | None = None, client: Client | None = None,
                 config=None):
        self.cfg = config or _config.get()
        _metrics.autostart(self.cfg)  # HOTWEIGHTS_METRICS_PORT (+ local rank); off by default
        # a mapping (an nn.ParameterDict is callable too: a Module) or a function returning one
        self._targets_fn = (targets if callable(targets) and not hasattr(targets, "items")
                            else (lambda: targets))
        self.targets = targets = self._targets_fn()
        self.name = name
        self.consumer = _consumer_patterns(consumer, targets)
        self.accept_reshape = accept_reshape
        self.keep_staging = keep_staging
        self.on_staged = on_staged
        self.on_error = on_error
        devs = {t.device for t in targets.values()}
        if len(devs) > 1:
            raise ValueError(f"register_hotweights: the model's tensors live on several devices "
                             f"({sorted(map(str, devs))}); one subscriber serves one device")
        self.device = devs.pop() if devs else torch.device("cpu")
        self.client = client or Client(endpoint, token=token)
        self._own_client = client is None
        self.launch = launch_info()
        self.node = node or self.launch.node
        self._capabilities = {"pid": _pid(), "rank": self.launch.rank}
        try:
            reg = self.client.register("subscriber", name, node=self.node, device=str(self.device),
                                       consumer=self.consumer or [], capabilities=self._capabilities)
        except BaseException:  # nothing of this subscriber is left behind
            if self._own_client:
                self.client.close()
            raise
        self.client_id = reg["client_id"]
        self.version: int | None = None         # applied version
        self.held: int | None = None            # newest version held, staged or applied
        # the tensors of the version staged and not applied (set by module.py)
        self.staged_tensors: Callable[[], Mapping[str, torch.Tensor]] = dict
        self.current_version = reg["current_version"]
        self._pool: dict[str, torch.Tensor] = {}  # reusable shadow buffers
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._reuse_event = None                  # CUDA: shadows may be rewritten after this
        self._closed = False
        self.errors: list[tuple[int, str]] = []
        self.stats = {"versions": 0, "bytes": 0, "buckets": 0, "nacks": 0, "aborted": 0,
                      "direct_buckets": 0, "ack_failures": 0, "read_ahead": 0,
                      "doorbell_takes": 0}
        self._stuck: list = []  # reads of abandoned versions that outlived their wait
        self.metrics = _metrics.SubscriberMetrics(name)
        self._rings: dict[str, Any] = {}          # owner client id -> ring import
        self._doorbells: dict[str, Doorbell] = {}  # owner client id -> its doorbell, lane held
        self._sources = SourceMaps()              # publishers' storages (Note [Direct reads])
        self._cuda_sources = CudaSourceMaps()     # the same for a CUDA publisher (opt-in)
        self._source_pids: dict[str, int] = {}    # owner client id -> its pid
        # prune mappings of freed storages when a publisher (re)shared some, else now and then
        self._source_gens: dict[int, int] = {}     # pid -> the last share generation seen
        self._prune_due, self._pruned_at = False, time.monotonic()
        self._transport: Transport | None = None  # created when this subscriber first relays
        self._relay: _Relay | None = None
        # Test hooks: called with the bucket index before each scatter, and with (version,
        # bucket) before relaying a bucket to this node.
        self.before_scatter: Callable[[int], None] | None = None
        self.before_relay: Callable[[int, int], None] | None = None
        # acks of all but a version's last bucket go out from here while the next bucket is
        # read (one thread, so in order; the last ack carries the precommit and waits)
        self._acker = concurrent.futures.ThreadPoolExecutor(1, f"hw-sub-ack-{name}")
        self._acks: list[concurrent.futures.Future] = []
        self._receiving: int | None = None  # the version being received, until staged
        self._thread = threading.Thread(target=self._loop, name=f"hw-sub-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker

    def _loop(self) -> None:
        after = 0
        try:
            while not self._closed:
                try:
                    ev = self.client.events(self.name, after=after, wait_ms=1000)
                except Exception as e:
                    if self._closed:
                        return
                    log.warning("subscriber %s: events failed: %s", self.name, e)
                    time.sleep(0.5)
                    continue
                if ev.get("truncated"):
                    log.warning("subscriber %s: event log truncated; resyncing", self.name)
                after = ev["last"]
                gone = False
                for e in ev["events"]:  # the newest committed version, for the lag metric
                    if e.get("type") == "commit":
                        self.current_version = max(self.current_version or 0, int(e["version"]))
                    elif e.get("type") == "client" and e.get("role") == "publisher":
                        gone = gone or self._publisher_gone(e)
                if gone:  # an idle subscriber too lets a dead publisher's memory go now
                    self._drop_dead_rings()
                self.metrics.lag(self.current_version, self.version)
                news = {e["version"]: e for e in ev["events"] if e.get("type") == "version"}
                versions = sorted(news)
                for v in versions:
                    if self._closed:
                        return
                    if self.version is not None and v <= self.version:
                        continue
                    # the newest version's event is fresh enough to stand in for a version()
                    # request (one round trip less on the critical path); older ones are not
                    self._receiving = v
                    try:
                        self._receive(v, news[v] if v == versions[-1] else None)
                    except Exception as e:  # this version only: nothing applied
                        if self._closed:
                            return
                        log.exception("subscriber %s: receiving version %d failed", self.name, v)
                        # refused, unless it was already staged (committed: it will apply)
                        refuse = self._receiving == v
                        self._fail(v, f"receiving failed: {type(e).__name__}: {e}",
                                   reject=refuse)
                        if not refuse and self.held != v:  # committed, and its staging lost
                            self.report_applied(behind=True)  # (a catch-up now, not at the
                                                              # next publish)
        finally:
            self.client.release_thread()

    def _fail(self, version: int, reason: str, reject: bool = True) -> None:
        self.errors.append((version, reason))
        log.warning("subscriber %s: version %d refused: %s", self.name, version, reason)
        # recorded here before the coordinator hears of it: whoever sees the version fail
        # (a publisher's PublishError, say) finds the reason already on this side
        if self.on_error:
            try:
                self.on_error(version, reason)
            except Exception as e:  # the refusal must still reach the coordinator
                log.warning("subscriber %s: on_error callback raised %r", self.name, e)
        if reject:
            try:
                self.client.reject(self.client_id, self.name, version, reason)
            except Exception as e:
                log.warning("subscriber %s: reject failed: %s", self.name, e)

    def _receive(self, version: int, event: dict | None = None) -> None:
        """Receives, verifies and stages one version (or refuses it with a reason); ``event``:
        its "version" event (label, expected), else the coordinator is asked."""
        t0 = time.perf_counter()
        if event is not None and "expected" in event:
            info = {"label": event.get("label"), "expected": event["expected"],
                    "publisher": event.get("publisher"),
                    "state": "transferring"}  # if decided meanwhile, the receive loop sees it
        else:
            info = self.client.version(self.name, version)
        if self.client_id not in info.get("expected", []) or info["state"] != "transferring":
            return  # not ours (we joined later: a catch-up serves us), or already decided
        raw = event.get("plan") if event is not None else None  # small plans ride along
        plan = Plan.from_bytes(raw if isinstance(raw, bytes) else self.client.plan(self.name, version))
        mine = plan.tensors_for(self.client_id)
        self.targets = self._targets_fn()  # the model as it is now (tensors replaced, moved)
        wrong_base = self._check_base(plan)
        problems, plan.reshaped = self._check_model(plan, mine)
        problems = problems or wrong_base
        if problems:
            self._fail(version, problems)
            if problems is wrong_base:  # after the refusal, which would clear it
                self.report_applied(behind=True)
            return
        buckets = plan.buckets_for(self.client_id)
        shadows = self._shadows(plan, mine)
        begun: dict[str, Callable[[], tuple]] = {}  # reads started ahead (Note [Read-ahead])
        try:
            staged = self._receive_buckets(version, info, plan, mine, buckets, shadows, t0,
                                           (event or {}).get("handles") or (), begun)
        finally:
            for finish in begun.values():  # a read left running could write the shadows
                try:                       # after they are reused or freed
                    finish(drain=True)
                except Exception as e:
                    log.warning("subscriber %s: abandoned read: %s", self.name, e)
        if staged is None:
            # aborted, refused or failed: the staging goes, nothing was applied
            shadows.clear()
            self.stats["aborted"] += 1
            self._drop_dead_rings()
            return
        self.stats["versions"] += 1
        self.stats["bytes"] += staged.bytes
        self._receiving = None  # staged: committed, nothing to refuse any more
        if self.on_staged:
            self.on_staged(staged)  # merged with a version staged before (module.py)
            self.held = staged.version  # the next delta is planned from it
        # its publisher is alive (it just had a version committed): only other ones are asked
        self._drop_dead_rings(alive=info.get("publisher"))

    def _receive_buckets(self, version, info, plan, mine, buckets, shadows, t0, first, begun):
        """Takes every bucket of the version (``first``: handles that came with its event),
        verifies end to end and precommits; waits for the decision. Returns the staged version,
        or None when it was refused, aborted or failed. ``begun``: the reads started ahead,
        by handle id (finished by the caller when this returns early)."""
        acc = np.zeros(len(plan.names), np.uint64)
        todo = set(buckets)
        after, nbytes, t_first = 0, 0, None
        deadline = t0 + self.cfg.version_timeout_s
        pending = [h for h in first if self.client_id in h.get("consumers", ())]
        answered: set[str] = set()  # handles acked (maybe still on the way): not twice
        relay_nacks: dict[int, int] = {}  # bucket -> relayed copies of it read wrong
        precommitted, t_recv = None, None
        polled, checked = 0.0, time.perf_counter()  # the coordinator asked for handles, state
        # after the precommit, the rest of the batch is still answered (relays for the
        # node's other subscribers, re-sends of buckets held)
        while not self._closed and (todo or precommitted is None or pending):
            if not pending and todo:
                if time.perf_counter() > deadline:
                    self._fail(version, f"timed out with {len(todo)} bucket(s) missing")
                    return None
                # a ring's same-node buckets ring a doorbell (Note [Doorbell]); the
                # coordinator is still asked, without waiting, every DOORBELL_POLL_S (a
                # handle only it has: posted before our lane was claimed, a relay)
                pending, rung = self._rung_handles(version, info.get("publisher"), answered)
                if pending and time.perf_counter() - polled < DOORBELL_POLL_S:
                    continue
                try:
                    r = self.client.get_handles(self.client_id, self.name, version, after=after,
                                                wait_ms=0 if rung else 1000)
                except CoordinatorError as e:
                    self._fail(version, f"get_handles failed: {e}", reject=False)
                    return None
                polled = time.perf_counter()
                after = r["last"]
                have = {h["handle_id"] for h in pending}
                pending += [h for h in r["handles"]
                            if h["handle_id"] not in answered and h["handle_id"] not in have]
                if not pending and not r["handles"]:
                    if rung and polled - checked < DOORBELL_STATE_S:
                        continue  # (the doorbell wakes us when the publisher decides)
                    checked = polled
                    st = self.client.version(self.name, version)["state"]
                    if st != "transferring":
                        log.info("subscriber %s: version %d %s while receiving", self.name,
                                 version, st)
                        return None
                    continue
            h = pending.pop(0) if pending else None
            ok, err = True, None
            if h is not None:
                t_first = t_first or time.perf_counter()
                b = int(h["payload"]["bucket"])
                if h["handle_id"] not in begun:
                    begun[h["handle_id"]] = self._take(version, plan, h, b, b in todo, shadows)
                self._read_ahead(version, plan, pending, b, todo, shadows, begun)  # tops up
                ok, err, partials = begun.pop(h["handle_id"])()
                if ok and partials is not None:
                    np.add.at(acc, plan.piece_tensor[plan.pieces(b)], partials)
                    todo.discard(b)
                    nbytes += int(plan.piece_length[plan.pieces(b)].sum())
                    self.stats["buckets"] += 1
                elif not ok:
                    self.stats["nacks"] += 1
                    log.warning("subscriber %s: %s", self.name, err)
                    if h["payload"].get("relayed"):  # the leader re-posts it, 3 times at most
                        relay_nacks[b] = relay_nacks.get(b, 0) + 1
            last = not todo and precommitted is None
            if last:
                bad = self._end_to_end(plan, mine, acc)
                if bad is not None:
                    if h is not None:
                        self._answer_now(h, ok, err)
                    self._fail(version, bad)
                    return None
                if self._stream is not None:
                    event = torch.cuda.Event()
                    event.record(self._stream)
                else:
                    event = None
                t_recv = time.perf_counter()
            # the precommit rides on the last bucket's ack (Note [One update]); the others
            # go out while the next bucket is read
            r = {}
            if h is not None:
                answered.add(h["handle_id"])
                if h.get("rung_only"):  # posted only in the doorbell: answered only there
                    self._answer_now(h, ok, err)
                elif last:
                    self._flush_acks()
                    r = self.client.ack_handle(self.client_id, h["handle_id"], ok, err,
                                               precommit=True)
                else:
                    self._acks.append(self._acker.submit(self._ack, h["handle_id"], ok, err))
                if relay_nacks.get(b, 0) >= 3:  # no fourth copy is coming: refused, not hung
                    self._flush_acks()
                    self._fail(version, f"relayed bucket {b} read wrong 3 times ({err})")
                    return None
            if last:
                if "precommit_error" in r:
                    log.info("subscriber %s: version %d: %s", self.name, version,
                             r["precommit_error"])
                    return None
                if "state" not in r:  # no handle to carry it, or the handle was gone
                    try:
                        self._flush_acks()
                        r = self.client.precommit(self.client_id, self.name, version)
                    except CoordinatorError as e:  # aborted meanwhile, say
                        log.info("subscriber %s: version %d: %s", self.name, version, e)
                        return None
                precommitted = r["state"]
        if self._closed:
            return None
        try:
            final = ({"state": "committed"} if precommitted == "committed" else
                     self.client.wait_version(self.name, version,
                                              max(1.0, deadline - time.perf_counter())))
        except TimeoutError as e:
            self._fail(version, str(e), reject=False)
            self.report_applied(behind=True)  # it may have committed with our vote: catch up
            return None
        if final["state"] != "committed":
            log.info("subscriber %s: version %d %s: %s", self.name, version, final["state"],
                     final.get("reason"))
            return None
        t_commit = time.perf_counter()
        return StagedVersion(
            version=version, label=info.get("label"), names=[plan.names[i] for i in mine],
            shadows=shadows, reshaped=[r for r in plan.reshaped if r[0] in shadows], bytes=nbytes,
            timings={"receive_s": t_recv - (t_first or t0), "verify_wait_s": t_commit - t_recv,
                     "total_s": t_commit - t0}, event=event,
            base=plan.bases.get(self.client_id))

    def _take(self, version: int, plan: Plan, h: dict, b: int, needed: bool,
              shadows: dict[str, torch.Tensor]) -> Callable[[], tuple]:
        """Starts one bucket's handle: relays it (we lead our node for it), reads it (directly
        or out of the publisher's ring) when ``needed``, else nothing (a re-send of a bucket
        held: it is just acked). Returns the function that finishes it, which returns (ok,
        error, partial digests or None): a read runs on the device (or the copy engine's
        threads) until then (Note [Read-ahead])."""
        p = h["payload"]
        rinfo = (p.get("relay") or {}).get(self.client_id)
        if rinfo is not None:
            return _done(self._relay_bucket(version, plan, b, h, rinfo, shadows, needed))
        if not needed:
            return _done((True, None, None))
        if self.before_scatter is not None:
            self.before_scatter(b)
        if "direct" in p:
            return self._read_direct(h["owner"], plan, b, p["direct"], shadows)
        try:
            src_ring = self._ring_of(h["owner"], p.get("ring_id"))
        except Exception as e:
            return _done((False, f"cannot import the ring of {h['owner']}: {e}", None))
        return self._scatter(src_ring, plan, b, int(p["slot"]), int(p["digest"]), shadows)

    def _read_ahead(self, version: int, plan: Plan, pending: list[dict], b: int, todo: set,
                    shadows: dict[str, torch.Tensor], begun: dict[str, Callable]) -> None:
        """Note [Read-ahead]
        A bucket's read is a copy on the device (or the copy engine's threads); checking its
        partial sums, the bookkeeping and the ack are Python. When several handles are waiting
        (a direct version's handles all come with it; a ring has several slots in flight),
        the reads of the ones queued behind bucket ``b`` start before ``b`` is checked, so the
        device copies while the host checks: up to READ_AHEAD plain reads of distinct buckets
        still to do, topped up as each is taken (a sliding window). A relayed handle, a
        second handle for a bucket already started (a re-send: two copies into one shadow
        must not race) or a bucket held already stops it. Every started read is finished,
        in order, before its handle is answered; an error in starting one is raised at its
        turn. A read the version is abandoned with is waited for (``drain``: no checks,
        no counts) before the shadows can be reused or freed."""
        seen = {b}
        for h in pending:
            p = h["payload"]
            nb = int(p["bucket"])
            if h["handle_id"] in begun:  # started by an earlier call: the window slides
                seen.add(nb)
                continue
            if (len(begun) > READ_AHEAD or nb in seen or nb not in todo
                    or (p.get("relay") or {}).get(self.client_id) is not None):
                return
            seen.add(nb)
            try:
                begun[h["handle_id"]] = self._take(version, plan, h, nb, True, shadows)
            except Exception as e:  # a test hook, say: raised at that handle's turn, as before
                begun[h["handle_id"]] = functools.partial(_reraise, e)
                return
            self.stats["read_ahead"] += 1

    def _end_to_end(self, plan: Plan, mine: list[int], acc: np.ndarray) -> str | None:
        """Every tensor's pieces must add up to the manifest's checksum; else why not."""
        idx = np.asarray(mine, dtype=np.int64)
        bad = ops.mismatched(acc[idx], plan.nbytes[idx], plan.checksums[idx])
        if bad.size:
            i = int(idx[bad[0]])
            got = ops.tensor_digest([acc[i]], int(plan.nbytes[i]))
            self.metrics.tensor_mismatch()
            return (f"tensor {plan.names[i]!r} arrived with checksum {got:016x}, the "
                    f"manifest says {int(plan.checksums[i]):016x}")
        return None

    def _answer_now(self, h: dict, ok: bool, err: str | None) -> None:
        """Answers a handle at once: in the doorbell when it was posted only there (Note
        [Doorbell]), else to the coordinator."""
        if not h.get("rung_only"):
            self.client.ack_handle(self.client_id, h["handle_id"], ok, err)
            return
        db = self._doorbells.get(h["owner"])
        if db is not None:
            db.ack(int(h["payload"]["slot"]), int(h["payload"]["seq"]), ok)

    def _ack(self, hid: str, ok: bool, err: str | None) -> None:
        try:
            self.client.ack_handle(self.client_id, hid, ok, err)
        except Exception as e:  # the lease runs out instead: the publisher re-sends
            self.stats["ack_failures"] += 1
            log.warning("subscriber %s: ack of handle %s failed: %s", self.name, hid, e)

    def _flush_acks(self) -> None:
        """Waits for the acks on their way (so the precommit follows every ack)."""
        acks, self._acks = self._acks, []
        concurrent.futures.wait(acks, timeout=self.cfg.version_timeout_s)

    def _ring_of(self, publisher_id: str, ring_id: str | None = None):
        """The publisher's ring, imported once per publisher (Note [CUDA IPC lifetime]); again
        when a handle names another ring of it (a node leader's relay ring that grew)."""
        ring = self._rings.get(publisher_id)
        if ring is not None and ring_id is not None and ring.id != ring_id:
            self._rings.pop(publisher_id).close()
            ring = None
        if ring is None:
            pub = self.client.get_client(publisher_id)
            ring = open_ring(pub["capabilities"]["ring"], self.device)
            self._rings[publisher_id] = ring
            self._open_doorbell(publisher_id, pub["capabilities"].get("doorbell"))
        return ring

    def _open_doorbell(self, publisher_id: str, handle: bytes | None) -> None:
        """Maps the publisher's doorbell and claims a lane in it (Note [Doorbell]); without
        one (switched off, another node, all lanes taken) its buckets come through the
        coordinator only."""
        if handle is None or not self.cfg.doorbell:
            return
        try:
            db = Doorbell.open(handle, spin_s=self.cfg.spin_s)
        except DoorbellError as e:
            log.info("subscriber %s: no doorbell for %s: %s", self.name, publisher_id, e)
            return
        if db.claim(self.client_id) is None:
            log.info("subscriber %s: the doorbell of %s has no free lane", self.name, publisher_id)
            db.close()
            return
        self._doorbells[publisher_id] = db

    def _rung_handles(self, version: int, owner: str | None, answered: set) -> tuple[list, bool]:
        """Waits up to DOORBELL_POLL_S for this lane's posts of ``version`` in the doorbell of
        its publisher (Note [Doorbell]) and returns them as handles, oldest first, with
        whether the doorbell is in use for this version (if not, the coordinator is
        long-polled instead)."""
        db = self._doorbells.get(owner)
        if db is None:
            return [], False
        rv = db.ring_version()
        # streaming now, or announced before the version existed; else a direct version, or
        # one the publisher has moved on from (its posts stay readable until their slots
        # are refilled: a subscriber outside a smaller quorum may still take them)
        streaming = rv == version or (rv < version and db.ring_next())
        end = time.perf_counter() + DOORBELL_POLL_S
        while not self._closed:
            seen = db.posted_count()
            recs = db.take(version, answered)
            if not recs and not streaming:
                return [], False
            if recs:
                self.stats["doorbell_takes"] += len(recs)
                return [{"handle_id": r["handle_id"], "owner": owner,
                         "consumers": [self.client_id], "rung_only": not r["coordinated"],
                         "payload": {"bucket": r["bucket"], "slot": r["slot"],
                                     "digest": r["digest"], "attempt": r["attempt"],
                                     "seq": r["seq"]}} for r in recs], True
            left = end - time.perf_counter()
            if left <= 0:
                break
            db.wait_posted(seen, left)
        return [], True

    def _transport_for(self, name: str) -> Transport:
        if self._transport is None:
            problem = not_ready(name)
            if problem is not None:  # starting it here would hang (Note [Transports])
                raise TransportError(f"the publisher relays over {name}: {problem}")
            kw = ({"identity": self.client_id, "coord_endpoint": self.client.endpoints[0]}
                  if name == "ucx" else {})
            self._transport = create_transport(name, **kw)
            log.info("subscriber %s: relays for node %r over %s", self.name, self.node, name)
        elif self._transport.name != name:
            raise TransportError(f"the publisher relays over {name}, this process already uses "
                                 f"{self._transport.name}")
        return self._transport

    def _relay_bucket(self, version: int, plan: Plan, b: int, h: dict, rinfo: dict,
                      shadows: dict, need: bool):
        """Receives bucket b over the transport into our relay ring, verifies it (taking it
        when we need it ourselves) and re-announces it to our node (Note [Hierarchy])."""
        if self.before_relay is not None:
            self.before_relay(version, b)
        need_bytes = max(int(rinfo["slot_bytes"]), int(rinfo["nbytes"]))
        if self._relay is not None and self._relay.ring.slot_bytes < need_bytes:
            # a publisher with larger buckets than the one the relay ring was made for: a
            # larger ring once nothing is held in this one (node-mates re-import it by id)
            if not self._relay.idle():
                return False, (f"relay of node {self.node!r}: bucket {b} has {need_bytes} bytes, "
                               f"the relay ring's slots {self._relay.ring.slot_bytes} and some "
                               "are still held; resized once they are released"), None
            self._relay.close()
            self._relay = None
        if self._relay is None:
            self._relay = _Relay(self, need_bytes)
        relay = self._relay
        try:
            slot = relay.acquire(self.cfg.handle_ttl)
        except TimeoutError as e:
            return False, f"relay of node {self.node!r}: {e}", None
        digest = int(h["payload"]["digest"])
        try:
            t = self._transport_for(rinfo["transport"])
            buf = relay.ring.slot(slot)[:int(rinfo["nbytes"])]
            t.irecv(buf, rinfo["src"], int(rinfo["tag"])).wait(self.cfg.handle_ttl)
            relay.ring.record(slot)
            if need:
                ok, err, partials = self._scatter(relay.ring, plan, b, slot, digest, shadows)()
            else:
                got = ops.bucket_digest(ops.hash_pieces(
                    relay.ring.slot(slot), plan.piece_slot_offset[plan.pieces(b)],
                    plan.piece_length[plan.pieces(b)], plan.piece_tensor_offset[plan.pieces(b)]),
                    plan.piece_length[plan.pieces(b)])
                ok, partials = got == digest, None
                err = None if ok else f"checksum mismatch in relayed bucket {b}"
            if ok and rinfo["to"]:
                hid = uuid.uuid4().hex
                post = {"version": version, "consumers": list(rinfo["to"]), "attempt": 1,
                        "payload": {"bucket": b, "slot": slot, "digest": digest,
                                    "ring_id": relay.ring.id, "relayed": True}}
                relay.hold(hid, slot, post)
                self.client.post_handle(self.client_id, self.name, version, post["payload"],
                                        consumers=post["consumers"], handle_id=hid)
            else:
                relay.release(slot)
            return ok, err, partials
        except (TransportError, TimeoutError, CoordinatorError) as e:
            relay.release(slot)
            return False, f"relay of bucket {b} to node {self.node!r} failed: {e}", None

    def _publisher_gone(self, e: dict) -> bool:
        """Whether a publisher's client event means memory we map from it can go now: it
        died, or it left and its process is gone too (a process that closed one publisher
        session and opened another keeps its storages: they stay mapped)."""
        cid, action = e.get("client_id"), e.get("action")
        if cid not in self._rings and cid not in self._source_pids:
            return False
        if action in ("dead", "purged"):
            return True
        if action != "left":
            return False
        pid = self._source_pids.get(cid)
        if pid is None:
            return True  # a ring only: the next session makes a new one
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass  # alive, not ours to signal
        return False

    def _drop_dead_rings(self, alive: str | None = None) -> None:
        """Unmaps the rings (and directly read storages) of publishers that left or died, so
        their memory can go (``alive``: a publisher known to be alive, not asked about)."""
        for cid in (set(self._rings) | set(self._source_pids)) - {alive}:
            try:
                live = self.client.get_client(cid).get("alive", False)
            except CoordinatorError:
                live = False  # not registered any more
            except Exception as e:  # the coordinator is unreachable: ask again next time
                log.info("subscriber %s: liveness of %s unknown: %s", self.name, cid, e)
                continue
            if not live:
                if cid in self._rings:
                    self._rings.pop(cid).close()
                if cid in self._doorbells:
                    self._doorbells.pop(cid).close()
                if cid in self._source_pids:
                    pid = self._source_pids.pop(cid)
                    # a later publisher in the same process keeps its mappings (whatever
                    # only the gone one held is pruned once its storage is freed)
                    if pid not in self._source_pids.values():
                        self._sources.drop(pid)
                        self._cuda_sources.drop(pid)
                        self._source_gens.pop(pid, None)
                    else:
                        self._prune_due = True
        # storages a live publisher replaced or freed since (a stat per mapping: ~1 ms per
        # 200, so not after every version when nothing was re-shared)
        if len(self._sources) and (self._prune_due
                                   or time.monotonic() - self._pruned_at > PRUNE_EVERY_S):
            self._sources.prune()
            self._prune_due, self._pruned_at = False, time.monotonic()

    def _read_direct(self, owner: str, plan: Plan, b: int, d: dict,
                     shadows: dict[str, torch.Tensor]):
        """Copies bucket b straight from the publisher's shared storages into the shadows,
        hashing as it reads; every whole tensor is checked against the manifest now (Note
        [Direct reads])."""
        rows = plan.pieces(b)
        tidx = plan.piece_tensor[rows]
        ln = plan.piece_length[rows]
        toff = plan.piece_tensor_offset[rows]
        cuda = d.get("kind") == "cuda"
        try:
            pid = int(d["pid"])
            if cuda:
                regions = [self._cuda_sources.region(pid, st) for st in d["st"]]
            else:
                regions = [self._sources.region(pid, *map(int, st)) for st in d["st"]]
            self._source_pids[owner] = pid
            gen = int(d.get("gen", 0))
            if self._source_gens.get(pid) != gen:
                self._source_gens[pid] = gen
                self._prune_due = True
        except (HandleError, OSError, ValueError, TypeError, KeyError) as e:
            return _done((False, f"{DIRECT_UNAVAILABLE}: {e}", None))
        t_read = time.perf_counter()

        def read():
            return ops.scatter_regions(regions, np.frombuffer(d["sidx"], np.int32),
                                       np.frombuffer(d["soff"], np.int64),
                                       [shadows[plan.names[i]] for i in tidx.tolist()],
                                       lengths=ln, tensor_offsets=toff, hash=True, async_op=True)

        try:
            copy = self._on_receive_stream(read)
        except Exception as e:
            return _done((False, f"direct read of bucket {b} failed: {type(e).__name__}: {e}",
                          None))
        return functools.partial(self._check_direct, plan, b, tidx, ln, toff, regions, copy,
                                 t_read)

    def _check_direct(self, plan: Plan, b: int, tidx: np.ndarray, ln: np.ndarray,
                      toff: np.ndarray, regions: list, copy: ops.CopyHandle, t_read: float,
                      drain: bool = False):
        """Finishes a direct read of bucket b (its pieces' tensors, lengths and offsets):
        every whole tensor is checked against the manifest."""
        if drain:
            return self._drain(copy)
        try:
            partials = copy.partials()
        except Exception as e:
            return False, f"direct read of bucket {b} failed: {type(e).__name__}: {e}", None
        t_verify = time.perf_counter()
        whole = np.flatnonzero((toff == 0) & (ln == plan.nbytes[tidx]))
        bad = whole[ops.mismatched(partials[whole], ln[whole], plan.checksums[tidx[whole]])]
        self.metrics.bucket(_metrics.path_label(regions[0].device if regions else self.device,
                                                self.device), int(ln.sum()),
                            t_verify - t_read, time.perf_counter() - t_verify, not bad.size)
        if bad.size:
            return False, (f"tensor {plan.names[tidx[bad[0]]]!r} read from the publisher does not "
                           "match its manifest checksum (was the source modified during "
                           "publish?)"), None
        self.stats["direct_buckets"] += 1
        return True, None, partials

    def _drain(self, copy: ops.CopyHandle) -> tuple:
        """Waits for a read of an abandoned version (Note [Read-ahead]): no check, no counts.
        One still running after the version's timeout is kept referenced (it keeps its
        tensors alive) rather than freed under the copy."""
        try:
            copy.wait(self.cfg.version_timeout_s)
        except TimeoutError:
            self._stuck.append(copy)
            raise
        return False, "abandoned", None

    def _check_base(self, plan: Plan) -> str | None:
        """Note [Delta base]: a delta planned from version b carries the tensors that differ
        between b and the new version, so it is right only on top of b: a tensor that changed
        in some other version and changed back in this one is not in it. The publisher plans
        each subscriber's delta from the newest version it *holds* - the latest committed
        version it precommitted (staged, or applied), which the coordinator records as the
        client's ``holds`` - not from the version it has applied: with ``commit="manual"`` or
        between forwards a version can stay staged while the next one streams. Staging merges
        (module.py): the new version's shadows replace the staged one's tensor by tensor, and
        the merge keeps the older base, so the staged set is always a delta from the version
        applied, whatever the subscriber applies meanwhile.

        A subscriber that does not hold b (its staging was lost: a failure after its
        precommit) refuses the delta here, or drops it when applying (module.py), never
        applies it, and reports its applied version with ``behind=True``: the publisher
        serves it a catch-up planned from that version at once."""
        base = plan.bases.get(self.client_id)
        holds = max((v for v in (self.held, self.version) if v is not None), default=None)
        # (from the applied version while a newer one is staged: a publisher that read this
        # subscriber's record before its late vote on that one; the new version replaces it)
        if base is not None and base != holds and base != self.version:
            return (f"planned as a delta from version {base}, but this subscriber holds "
                    f"version {holds}; a catch-up is asked for")
        return None

    def report_applied(self, behind: bool = False) -> None:
        """Tells the coordinator which version is applied here (what publishers plan from);
        ``behind``: a newer committed version was dropped or lost here, a catch-up is wanted
        (also with nothing applied yet: then it is a full send)."""
        if behind:
            self.held = self.version  # nothing newer is staged any more
        elif self.version is None:
            return
        try:
            self.client.applied(self.client_id, self.name, self.version, behind=behind)
        except Exception as e:
            log.warning("subscriber %s: reporting applied version %s failed: %s", self.name,
                        self.version, e)

    def _check_model(self, plan: Plan, mine: list[int]) -> tuple[str | None, list]:
        """The model must match the manifest for the tensors this subscriber receives: as
        staged, for a delta planned from a version staged here and not applied yet (its
        reshapes are not in the live model yet), else as live. Returns (why not, or None;
        the reshapes this version makes *here*: (name, (old dtype, shape), (new dtype,
        shape)), what the commit reports and resets state for; the plan's own list covers
        every subscriber's delta together, and a full send's lists none)."""
        base = plan.bases.get(self.client_id)
        staged = self.staged_tensors() if base is not None and base != self.version else {}
        bad, reshapes = [], []
        for i in mine:
            name = plan.names[i]
            t = staged.get(name, self.targets.get(name))
            if t is None:
                bad.append(f"{name!r} is not in the model")
                continue
            if t.device != self.device:
                bad.append(f"{name!r} is on {t.device}, this subscriber receives for "
                           f"{self.device} (the model moved after it was registered: register "
                           "it again)")
                continue
            old, new = (dtype_name(t.dtype), tuple(t.shape)), (plan.dtypes[i], tuple(plan.shapes[i]))
            if old != new:
                reshapes.append((name, old, new))
                if not self.accept_reshape:  # (accepted: any layout change, a full send's too)
                    bad.append(f"{name!r}: the model has {old[0]}{old[1]}, the version has "
                               f"{new[0]}{new[1]}")
        if not bad:
            return None, reshapes
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        return "model does not match the version: " + "; ".join(bad[:3]) + more, reshapes

    def _shadows(self, plan: Plan, mine: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for i in mine:
            name = plan.names[i]
            dtype = getattr(torch, plan.dtypes[i])
            shape = plan.shapes[i]
            t = self._pool.pop(name, None)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                t = torch.empty(shape, dtype=dtype, device=self.device)
            out[name] = t
        return out

    def _on_receive_stream(self, fn):
        """Runs fn (a copy into the shadows) on the CUDA receive stream, after the last use of
        recycled shadows; on the CPU, just runs it."""
        if self._stream is None:
            return fn()
        with torch.cuda.stream(self._stream):
            if self._reuse_event is not None:
                self._stream.wait_event(self._reuse_event)
            return fn()

    def _scatter(self, ring, plan: Plan, b: int, slot: int, digest: int,
                 shadows: dict[str, torch.Tensor]):
        rows = plan.pieces(b)
        tidx = plan.piece_tensor[rows]
        dst = [shadows[plan.names[i]] for i in tidx.tolist()]
        ln = plan.piece_length[rows]
        t_scatter = time.perf_counter()

        def read():
            ring.wait(slot)
            return ops.scatter(ring.slot(slot), dst, plan.piece_slot_offset[rows], lengths=ln,
                               tensor_offsets=plan.piece_tensor_offset[rows], hash=True,
                               async_op=True)

        try:
            copy = self._on_receive_stream(read)
        except Exception as e:
            return _done((False, f"scatter of bucket {b} failed: {type(e).__name__}: {e}", None))
        return functools.partial(self._check_scatter, ring, b, ln, digest, copy, t_scatter)

    def _check_scatter(self, ring, b: int, ln: np.ndarray, digest: int, copy: ops.CopyHandle,
                       t_scatter: float, drain: bool = False):
        """Finishes a read out of a ring: the bucket must hash to the publisher's digest."""
        if drain:
            return self._drain(copy)
        try:
            partials = copy.partials()
        except Exception as e:
            return False, f"scatter of bucket {b} failed: {type(e).__name__}: {e}", None
        t_verify = time.perf_counter()
        got = ops.bucket_digest(partials, ln)
        # a node leader's own bucket came from another node, through its relay ring
        path = ("node->node" if self._relay is not None and ring is self._relay.ring
                else _metrics.path_label(ring.source_device, self.device))
        self.metrics.bucket(path, int(ln.sum()), t_verify - t_scatter,
                            time.perf_counter() - t_verify, got == digest)
        if got != digest:
            return False, (f"checksum mismatch in bucket {b}: got {got:016x}, expected "
                           f"{digest:016x}"), None
        return True, None, partials

    # ------------------------------------------------------------------ staging pool

    def recycle(self, tensors: Mapping[str, torch.Tensor], reuse_event=None) -> None:
        """Returns buffers (the replaced storage of a swap, or applied shadows) to the pool so
        the next version reuses them instead of allocating; ``reuse_event`` (CUDA) orders the
        next writes after the compute stream's last use."""
        if not self.keep_staging:
            return
        if reuse_event is not None:  # the latest on the compute stream covers earlier ones
            self._reuse_event = reuse_event
        self._pool.update(tensors)

    def close(self) -> None:
        """Stops the worker, deregisters, and drops the ring mapping and staging."""
        if self._closed:
            return
        self._closed = True
        self._thread.join(5)
        _retire(self._acker, self.client, f"subscriber {self.name}")
        if self._relay is not None:  # before the client goes: its loop long-polls with it
            self._relay.close()
            self._relay = None
        try:
            self.client.deregister(self.client_id)
        except Exception as e:
            log.warning("subscriber %s: deregister failed: %s", self.name, e)
        if self._own_client:
            self.client.close()
        self._pool.clear()
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        for db in self._doorbells.values():
            db.close()
        self._doorbells.clear()
        self._sources.drop()
        self._cuda_sources.drop()
        self._source_pids.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.metrics.close()


class _Relay:
    """A node leader's ring (Note [Hierarchy]): buckets received over the inter-node transport
    wait here until every subscriber of the node acked them. Exported once, through the
    leader's coordinator registration."""

    def __init__(self, sub: Subscriber, slot_bytes: int):
        self.sub = sub
        self.ring = SlotRing(slot_bytes, sub.cfg.ipc_max_inflight, sub.device, name=f"relay-{sub.name}")
        self._free = list(range(self.ring.slots))
        self._held: dict[str, int] = {}
        self._cv = threading.Condition()
        self._closed = False
        sub._capabilities.update(ring=self.ring.handle(), ring_id=self.ring.id)
        sub.client.register("subscriber", sub.name, node=sub.node, device=str(sub.device),
                            consumer=sub.consumer or [], capabilities=sub._capabilities,
                            client_id=sub.client_id)
        self._after = 0
        self._thread = threading.Thread(target=self._loop, name=f"hw-relay-{sub.name}", daemon=True)
        self._thread.start()

    def acquire(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        with self._cv:
            while not self._free:
                left = end - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no free relay slot within {timeout} s")
                self._cv.wait(left)
            return self._free.pop()

    def hold(self, hid: str, slot: int, post: dict) -> None:
        """Slot ``slot`` stays until handle ``hid`` (``post``: what was posted, to post it
        again for node-mates that nack it or let its lease run out) is released."""
        with self._cv:
            self._held[hid] = (slot, post)

    def idle(self) -> bool:
        """No slot is held by a handle or being filled."""
        with self._cv:
            return not self._held and len(self._free) == self.ring.slots

    def release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify_all()

    def _loop(self) -> None:
        client = self.sub.client
        try:
            while not self._closed:
                try:
                    r = client.released(self.sub.client_id, after=self._after, wait_ms=1000)
                except Exception as e:
                    if self._closed:
                        return
                    log.warning("relay %s: waiting for releases failed: %s", self.sub.name, e)
                    time.sleep(0.5)
                    continue
                self._after = r["last"]
                again = []
                with self._cv:
                    for rel in r["released"]:
                        held = self._held.pop(rel["handle_id"], None)
                        if held is None:
                            continue
                        slot, post = held
                        who = [c for c in (*rel.get("errors", {}), *rel.get("missing", ()))
                               if c in post["consumers"]]
                        retry = who and rel["reason"] in ("nacked", "expired")
                        if retry and post["attempt"] < 3:
                            again.append((slot, post, who, rel))
                            continue
                        if retry:  # (a consumer that died is "missing" from an acked one)
                            log.error("relay %s: bucket %d of version %d failed %d times for %s "
                                      "(%s)", self.sub.name, post["payload"]["bucket"],
                                      post["version"], post["attempt"], who,
                                      rel.get("errors") or rel["reason"])
                        self._free.append(slot)
                    self._cv.notify_all()
                for slot, post, who, rel in again:
                    self._post_again(slot, post, who, rel)
        finally:
            client.release_thread()

    def _post_again(self, slot: int, post: dict, who: list[str], rel: dict) -> None:
        """Posts a held bucket once more for the node-mates that nacked it or let it expire
        (the bytes are still in the slot; a same-node ring bucket is re-sent by its publisher
        the same way)."""
        b = post["payload"]["bucket"]
        log.warning("relay %s: re-posting bucket %d of version %d for %s (%s)", self.sub.name,
                    b, post["version"], who, rel.get("errors") or rel["reason"])
        post = {**post, "consumers": who, "attempt": post["attempt"] + 1}
        hid = uuid.uuid4().hex
        self.hold(hid, slot, post)
        try:
            self.sub.client.post_handle(self.sub.client_id, self.sub.name, post["version"],
                                        post["payload"], consumers=who, handle_id=hid)
        except Exception as e:  # the version is over, say: the slot comes back
            log.info("relay %s: re-post of bucket %d failed: %s", self.sub.name, b, e)
            with self._cv:
                if self._held.pop(hid, None) is not None:
                    self._free.append(slot)
                self._cv.notify_all()

    def close(self) -> None:
        self._closed = True
        with self._cv:
            self._cv.notify_all()
        self._thread.join(5)
