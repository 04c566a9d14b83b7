# SPDX-License-Identifier: Apache-2.0
"""``model.register_hotweights()``: a subscriber bound to a module, with an atomic commit at a
safe point.

Note [Atomic apply]
Forward passes hold a shared lock from the forward pre-hook to the forward hook (registered with
``always_call=True`` so an exception releases it). Applying a version takes the lock exclusively:
it waits for running forwards to finish, blocks new ones while it swaps, and swaps every changed
tensor or none (all checks happen before the first swap). A forward therefore sees the old
version or the new one, never a mix. With ``commit="on_forward"`` the pre-hook applies a staged
version before the forward that follows the commit; with ``commit="manual"`` the caller applies
it with ``handle.commit()`` (any thread: the lock makes it safe) or ``handle.wait(version)``.
One apply runs at a time (taking the staged version, checking its base, swapping, recording
the version applied), so two threads never swap two versions in the wrong order. A version
that arrives while an older one is still staged merges with it (Note [Delta base] in
replicate.py): what is staged is always one delta from the version applied.

``swap="storage"`` points each parameter at its shadow (``param.data = shadow``; O(1) per tensor,
the pause does not grow with size, 2x memory for changed tensors); the replaced storage becomes
the next version's shadow. ``swap="inplace"`` copies the shadows into the live tensors with the
chunked engine (the parameters keep their storage, which CUDA graphs and engines that cached
pointers need). On CUDA the compute stream first waits for the receive stream's event, and the
next version's writes into recycled buffers wait for an event recorded after the apply.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import torch

from . import ops
from . import config as _config
from .replicate import StagedVersion, Subscriber, UpdateError

__all__ = ["HotweightsHandle", "CommitInfo", "register"]

log = logging.getLogger("hotweights")


@dataclasses.dataclass
class CommitInfo:
    """Passed to on_commit callbacks: what was applied and how long it took."""

    version: int
    label: str | None
    changed: list[str]
    reshaped: list
    bytes: int
    timings: dict[str, float]  # receive_s, verify_wait_s, pause_s, ...
    optimizer: dict | None = None
    kv_plan: object | None = None


class _ForwardLock:
    """Many forwards, or one apply (writer preferred so an apply is not starved)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()

    def depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def acquire_read(self) -> None:
        d = self.depth()
        if d == 0:
            with self._cv:
                while self._writer or self._waiting_writers:
                    self._cv.wait()
                self._readers += 1
        self._local.depth = d + 1

    def release_read(self) -> None:
        d = self.depth()
        if d <= 0:
            return
        self._local.depth = d - 1
        if d == 1:
            with self._cv:
                self._readers -= 1
                if self._readers == 0:
                    self._cv.notify_all()

    def acquire_write(self, timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(left)
                self._writer = True
                return True
            finally:
                self._waiting_writers -= 1

    def release_write(self) -> None:
        with self._cv:
            self._writer = False
            self._cv.notify_all()


class HotweightsHandle:
    """What ``register_hotweights`` returns (see module docstring)."""

    def __init__(self, model: torch.nn.Module, name: str = "model", endpoint: str | None = None,
                 *, commit: str = "on_forward", consumer=None, swap: str = "inplace",
                 optimizer: torch.optim.Optimizer | None = None, opt_policy: str | None = None,
                 opt_attenuation: float | None = None, accept_reshape: bool = False,
                 token: str | None = None, node: str | None = None, keep_staging: bool = True,
                 kv_layers: int | None = None, kv_name_rules=None, config=None):
        if commit not in ("on_forward", "manual"):
            raise ValueError(f"register_hotweights: commit={commit!r}, expected 'on_forward' or 'manual'")
        if swap not in ("inplace", "storage"):
            raise ValueError(f"register_hotweights: swap={swap!r}, expected 'inplace' or 'storage'")
        if accept_reshape and swap == "inplace":
            raise ValueError("register_hotweights: accept_reshape needs swap='storage' (an in-place "
                             "copy cannot change a tensor's shape)")
        self.cfg = config or _config.load(opt_policy=opt_policy, opt_attenuation=opt_attenuation)
        self.model = model
        self.name = name
        self.commit_mode = commit
        self.swap = swap
        self.optimizer = optimizer
        # With kv_layers, each CommitInfo carries the per-layer keep/invalidate decision for the
        # KV cache (hotweights.kv.plan), so a server drops exactly the stale layers.
        self.kv_layers = kv_layers
        self.kv_name_rules = kv_name_rules
        self.opt_policy = self.cfg.opt_policy
        self.opt_attenuation = self.cfg.opt_attenuation
        # The objects the publisher's names refer to: parameters and buffers, by state-dict name.
        self._targets = dict(model.state_dict(keep_vars=True))
        self._lock = _ForwardLock()
        self._applying = threading.Lock()  # one apply at a time: take, check, swap, record
        self._cv = threading.Condition()
        self._staged: StagedVersion | None = None
        self._frozen = False  # commit_collective: no new staging between agreement and apply
        self._closed = False
        self._taken: StagedVersion | None = None  # taken by an apply, not swapped in yet
        self._callbacks: list[Callable[[CommitInfo], None]] = []
        self.version: int | None = None
        self.last_error: str | None = None
        self.refused: dict[int, str] = {}  # version -> why this subscriber refused or failed it
        self.last_commit: CommitInfo | None = None
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]
        self._sub = Subscriber(self._targets, name, endpoint, consumer=consumer,
                               accept_reshape=accept_reshape, token=token, node=node,
                               keep_staging=keep_staging, on_staged=self._on_staged,
                               on_error=self._on_error, config=self.cfg)
        self.client_id = self._sub.client_id
        self._sub.staged_tensors = self._staged_tensors

    # ------------------------------------------------------------------ hooks and staging

    def _pre_forward(self, module, args):
        if self._staged is not None and self.commit_mode == "on_forward" and self._lock.depth() == 0:
            self._apply()
        self._lock.acquire_read()

    def _post_forward(self, module, args, output):
        self._lock.release_read()

    def _on_staged(self, staged: StagedVersion) -> None:
        with self._cv:
            while self._frozen and not self._closed:
                self._cv.wait()
            if self._closed:
                return
            self._stage_locked(self._staged, staged)

    def _stage_locked(self, older: StagedVersion | None, newer: StagedVersion | None) -> None:
        """Under ``_cv``: stages ``newer`` on top of ``older``, two versions not applied yet
        (either may be None): merged or replaced (Note [Delta base]); what the newer one
        supersedes goes back to the pool."""
        freed = {}
        if older is None or newer is None:
            self._staged = older or newer
        else:
            self._staged, freed = newer.onto(older)
        self._cv.notify_all()  # a wait() may apply it now
        if freed:
            self._sub.recycle(freed)

    def _staged_tensors(self) -> dict[str, torch.Tensor]:
        """What is held and not applied yet: the staged version, over the one an apply has
        taken and not swapped in yet."""
        with self._cv:
            taken, staged = self._taken, self._staged
        out = dict(taken.shadows) if taken is not None else {}
        if staged is not None:
            out.update(staged.shadows)
        return out

    def _on_error(self, version: int, message: str) -> None:
        with self._cv:
            self.last_error = f"version {version}: {message}"
            self.refused[version] = message
            self._cv.notify_all()

    # ------------------------------------------------------------------ public API

    @property
    def staged_version(self) -> int | None:
        """The committed version waiting to be applied, if any."""
        s = self._staged
        return s.version if s is not None else None

    def on_commit(self, callback: Callable[[CommitInfo], None]) -> None:
        """Calls ``callback(CommitInfo)`` after every applied version, in the applying thread,
        once the apply has finished (a callback may run a forward or commit). Versions applied
        by different threads (or by a callback's own forward) may call back out of order:
        ``info.version < handle.version`` means a newer one is already applied."""
        self._callbacks.append(callback)

    def commit(self, timeout: float | None = None) -> int | None:
        """Applies the staged version now (waits for running forwards); returns the version
        applied, or None when nothing was staged."""
        return self._apply(timeout)

    def wait(self, version: int | None = None, timeout: float | None = None,
             apply: bool = True) -> int | None:
        """Waits until ``version`` (default: the next one) is committed and staged, applies it
        unless ``apply=False``, and returns the version. Raises TimeoutError, or UpdateError when
        this subscriber refused that version."""
        end = None if timeout is None else time.monotonic() + timeout
        target = version if version is not None else (self.version or 0) + 1
        with self._cv:
            while True:
                if self.version is not None and self.version >= target:
                    return self.version
                s = self._staged
                if s is not None and s.version >= target:
                    break
                if target in self.refused:
                    raise UpdateError(f"version {target}: {self.refused[target]}")
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"hotweights {self.name!r}: version {target} not committed "
                                       f"within {timeout} s (applied: {self.version})")
                self._cv.wait(left if left is not None else 1.0)
        if not apply:
            return s.version
        got = self._apply(None if end is None else max(0.0, end - time.monotonic()))
        if got is None and self.version is not None and self.version >= target:
            return self.version  # another thread applied it meanwhile
        if got is None and target in self.refused:  # dropped when applied (Note [Delta base])
            raise UpdateError(f"version {target}: {self.refused[target]}")
        return got

    def commit_collective(self, group=None, timeout: float | None = None) -> int | None:
        """The safe barrier of data-parallel replicas: every rank of ``group`` (a
        torch.distributed group; default: the whole world) calls this at the same step; a
        version is applied only when every rank has the *same* committed version staged, so
        gradients are never averaged across different weights. Returns the version applied
        (None when the ranks did not agree yet: they retry at a later step).

        Note [Collective commit]: an all-reduce computes min and max of the staged versions
        (-1 for none); min == max >= 0 means everyone holds it. Subscribers stage every
        committed version within moments of each other (the coordinator commits once all of
        them precommitted), so disagreement lasts at most a step or two. A rank that refused a
        version keeps the whole group on the old one, by design."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("commit_collective: torch.distributed is not initialised")
        with self._cv:
            self._frozen = True
        info, staged = None, None
        try:
            # Not while another thread applies (its version decides the base); and never
            # raise before the all-reduce, which every rank must join: busy means "-1"
            if self._acquire_applying(timeout):
                try:
                    with self._cv:
                        staged = self._staged
                        drop = staged is not None and self._wrong_base(staged)  # never agreed
                        if drop:
                            self._staged = None
                    if drop:
                        self._drop(staged)
                        staged = None
                finally:
                    self._applying.release()
            mine = -1 if staged is None else int(staged.version)
            backend = str(dist.get_backend(group))
            dev = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                   else torch.device("cpu"))
            t = torch.tensor([mine, -mine], dtype=torch.int64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
            lo, hi = int(t[0]), -int(t[1])
            if lo < 0 or lo != hi:
                return None
            info = self._apply_once(timeout)  # the staged version cannot change while frozen
        finally:
            with self._cv:
                self._frozen = False
                self._cv.notify_all()
        return self._after_apply(info)

    def close(self) -> None:
        """Removes the hooks, stops receiving, deregisters and frees the staging (after an
        apply running in another thread, if any, finished)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        applying = self._applying.acquire(timeout=30)
        try:
            self._sub.close()
            self._staged = None
        finally:
            if applying:
                self._applying.release()

    # ------------------------------------------------------------------ apply

    def _apply(self, timeout: float | None = None) -> int | None:
        return self._after_apply(self._apply_once(timeout))

    def _acquire_applying(self, timeout: float | None) -> bool:
        return self._applying.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))

    def _take_applying(self, timeout: float | None) -> None:
        if not self._acquire_applying(timeout):
            raise TimeoutError(f"hotweights {self.name!r}: another thread kept applying for "
                               f"{timeout} s")

    def _apply_once(self, timeout: float | None) -> CommitInfo | None:
        self._take_applying(timeout)
        try:
            return self._apply_locked(timeout)
        finally:
            self._applying.release()

    def _after_apply(self, info: CommitInfo | None) -> int | None:
        """Callbacks run outside the apply (and outside commit_collective's freeze): one may
        run a forward, commit, or wait for the next version."""
        if info is None:
            return None
        for cb in self._callbacks:
            cb(info)
        return info.version

    def _wrong_base(self, staged: StagedVersion) -> bool:
        return staged.base is not None and staged.base != self.version

    def _drop(self, staged: StagedVersion) -> None:
        """Note [Delta base] (replicate.py): a delta planned from a version that is not the
        one applied here (its staging was lost) is dropped, never applied; the publisher is
        asked for a catch-up from the version applied."""
        msg = (f"planned as a delta from version {staged.base}, but version {self.version} is "
               "applied here; dropped (a catch-up from it is asked for)")
        log.warning("hotweights %s: version %d %s", self.name, staged.version, msg)
        self._sub.recycle(staged.shadows)
        self._on_error(staged.version, msg)
        self._sub.report_applied(behind=True)

    def _apply_locked(self, timeout: float | None) -> CommitInfo | None:
        with self._cv:
            staged, self._staged = self._staged, None
            self._taken = staged  # still what this subscriber holds (_staged_tensors)
        if staged is None:
            return None
        try:
            return self._apply_taken(staged, timeout)
        finally:
            with self._cv:
                self._taken = None

    def _apply_taken(self, staged: StagedVersion, timeout: float | None) -> CommitInfo | None:
        if self._wrong_base(staged):
            self._drop(staged)
            return None
        # Everything that could refuse the version is checked before the first swap.
        for name, shadow in staged.shadows.items():
            live = self._targets.get(name)
            if live is None:
                raise UpdateError(f"version {staged.version}: {name!r} is not in the model")
            if self.swap == "inplace" and (live.shape != shadow.shape or live.dtype != shadow.dtype):
                raise UpdateError(f"version {staged.version}: {name!r} changed shape or dtype; "
                                  "swap='inplace' cannot apply that (use swap='storage' and "
                                  "accept_reshape=True)")
        if not self._lock.acquire_write(timeout):
            with self._cv:  # keep it staged for later (merged under one that came meanwhile)
                self._stage_locked(staged, self._staged)
            raise TimeoutError(f"hotweights {self.name!r}: forwards kept running for {timeout} s; "
                               f"version {staged.version} stays staged")
        cuda = self._sub.device.type == "cuda"
        try:
            t0 = time.perf_counter()
            if cuda:
                for ev in [*staged.prior_events, staged.event]:
                    if ev is not None:
                        torch.cuda.current_stream(self._sub.device).wait_event(ev)
            names = list(staged.shadows)
            if self.swap == "storage":
                replaced = {}
                with torch.no_grad():
                    for name in names:
                        live = self._targets[name]
                        replaced[name] = live.data
                        live.data = staged.shadows[name]
            else:
                ops.copy_([self._targets[n].data for n in names], [staged.shadows[n] for n in names])
                replaced = staged.shadows
            reuse_event = None
            if cuda:
                reuse_event = torch.cuda.Event()
                reuse_event.record(torch.cuda.current_stream(self._sub.device))
            pause = time.perf_counter() - t0
            opt_report = self._apply_optimizer_policy(names, staged)
        finally:
            self._lock.release_write()
        self._sub.recycle(replaced, reuse_event)
        self.version = staged.version
        self._sub.version = staged.version
        self._sub.metrics.applied(staged.version, pause, self._sub.current_version)
        self._sub.report_applied()
        kv_plan = None
        if self.kv_layers is not None:
            from . import kv

            # the changed names are what differs between the old and the new version
            kv_plan = kv.plan({n: 0 for n in names}, {n: 1 for n in names}, self.kv_layers,
                              self.kv_name_rules)
        info = CommitInfo(version=staged.version, label=staged.label, changed=names,
                          reshaped=staged.reshaped, bytes=staged.bytes,
                          timings={**staged.timings, "pause_s": pause}, optimizer=opt_report,
                          kv_plan=kv_plan)
        self.last_commit = info
        with self._cv:
            self._cv.notify_all()
        return info

    def _apply_optimizer_policy(self, names: list[str], staged: StagedVersion) -> dict | None:
        """Optimizer-state policy for exactly the parameters that changed (see hotweights.optim)."""
        if self.optimizer is None or self.opt_policy == "preserve":
            return None
        from . import optim

        params = [self._targets[n] for n in names if isinstance(self._targets[n], torch.nn.Parameter)]
        reshaped = [self._targets[r[0]] for r in staged.reshaped if r[0] in self._targets]
        report = optim.apply_policy(self.optimizer, params, self.opt_policy, self.opt_attenuation,
                                    shape_changed=reshaped)
        return report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))

    def __repr__(self) -> str:
        return (f"HotweightsHandle({self.name!r}, version={self.version}, staged="
                f"{self.staged_version}, commit={self.commit_mode}, swap={self.swap})")


def register(model: torch.nn.Module, name: str = "model", endpoint: str | None = None,
             **kwargs) -> HotweightsHandle:
    """Subscribes ``model`` to the versions of ``name`` (see HotweightsHandle)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"register_hotweights: expected an nn.Module, got {type(model).__name__}")
    return HotweightsHandle(model, name, endpoint, **kwargs)


def _register_hotweights(self: torch.nn.Module, name: str = "model", endpoint: str | None = None,
                         **kwargs) -> HotweightsHandle:
    """Subscribes this module to hot weight updates (see hotweights.module.HotweightsHandle)."""
    return register(self, name, endpoint, **kwargs)


def install() -> None:
    """Adds ``register_hotweights`` to ``torch.nn.Module`` (done by ``import hotweights``)."""
    if not hasattr(torch.nn.Module, "register_hotweights"):
        torch.nn.Module.register_hotweights = _register_hotweights
