# SPDX-License-Identifier: Apache-2.0
"""``model.register_hotweights()``: a subscriber bound to a module, with an atomic commit at a
safe point.

Note [Atomic apply]
Forward passes hold a shared lock from the forward pre-hook to the forward hook (registered with
``always_call=True`` so an exception releases it; torch skips that hook for a BaseException such
as KeyboardInterrupt, so the lock remembers the frame that took it and the thread's next forward
or apply gives back a read lock whose frame has ended). Applying a version takes the lock exclusively:
it waits for running forwards to finish, blocks new ones while it swaps, and swaps every changed
tensor or none (all checks happen before the first swap). A forward therefore sees the old
version or the new one, never a mix. With ``commit="on_forward"`` the pre-hook applies a staged
version before the forward that follows the commit (an apply that fails there is logged, kept in
``last_error`` and ``refused``, and the forward runs on the old weights: serving never fails for an
update); with ``commit="manual"`` the caller applies it with ``handle.commit()`` (any thread but
one inside this model's forward: the lock makes it safe) or ``handle.wait(version)``.
One apply runs at a time (taking the staged version, checking its base, swapping, recording
the version applied), so two threads never swap two versions in the wrong order. A version
that arrives while an older one is still staged merges with it (Note [Delta base] in
replicate.py): what is staged is always one delta from the version applied.

The model's tensors are looked up by state-dict name when a version is received and again when
it is applied (``state_dict(keep_vars=True)``, outside the pause), so ``load_state_dict(...,
assign=True)``, ``.double()`` and buffers replaced since registering are what a version is
checked against and swapped into. A version is refused before the first swap when a tensor is
missing, has another shape or dtype (in place), or moved to another device; an apply that is
refused never leaves some tensors swapped. Whatever fails after the swap (the optimizer policy,
a callback) is logged and recorded, and the version stays applied and recorded.

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
import sys
import threading
import time
import weakref
from typing import Callable

import torch

from . import ops
from . import config as _config
from .replicate import StagedVersion, Subscriber, UpdateError

__all__ = ["HotweightsHandle", "CommitInfo", "register"]

log = logging.getLogger("hotweights")

# model -> the names it is registered under (open handles): a second handle for the same
# name would receive every version twice and race the first one's swaps
_REGISTERED: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()
_REGISTERED_LOCK = threading.Lock()


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

    def acquire_read(self, frame=None) -> None:
        """``frame``: the frame running the forward (kept while this thread holds the lock,
        so an abandoned hold can be told from a nested one: ``owner_running``)."""
        d = self.depth()
        if d == 0:
            with self._cv:
                while self._writer or self._waiting_writers:
                    self._cv.wait()
                self._readers += 1
            self._local.frame = frame
        self._local.depth = d + 1

    def release_read(self) -> None:
        d = self.depth()
        if d <= 0:
            return
        self._local.depth = d - 1
        if d == 1:
            self._local.frame = None
            with self._cv:
                self._readers -= 1
                if self._readers == 0:
                    self._cv.notify_all()

    def owner_running(self) -> bool:
        """Whether the frame that took this thread's read lock is still on its stack (False:
        its forward was left by a BaseException, which skips the releasing hook)."""
        owner = getattr(self._local, "frame", None)
        if owner is None:
            return True  # taken without a frame: cannot tell, assume nested
        f = sys._getframe(1)
        while f is not None:
            if f is owner:
                return True
            f = f.f_back
        return False

    def recover(self) -> bool:
        """Gives back this thread's read lock if the forward that took it has ended; returns
        whether this thread still holds one (it is inside a forward)."""
        if self.depth() == 0:
            return False
        if self.owner_running():
            return True
        self._local.depth = 1
        self.release_read()
        log.warning("hotweights: a forward ended by a BaseException (KeyboardInterrupt?) left "
                    "its read lock held; released")
        return False

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
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_hotweights: name={name!r}, expected a non-empty string")
        if kv_layers is not None and (isinstance(kv_layers, bool) or not isinstance(kv_layers, int)
                                      or kv_layers < 0):
            raise ValueError(f"register_hotweights: kv_layers={kv_layers!r}, expected None or an "
                             "integer >= 0 (the model's number of layers)")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"register_hotweights: optimizer is a {type(optimizer).__name__}, "
                            "expected a torch.optim.Optimizer")
        self.cfg = config or _config.load(opt_policy=opt_policy, opt_attenuation=opt_attenuation)
        self.model, self.name = model, name
        with _REGISTERED_LOCK:
            names = _REGISTERED.setdefault(model, set())
            if name in names:
                raise ValueError(f"register_hotweights: this model is already registered under "
                                 f"name={name!r}; close that handle first")
            names.add(name)
        self._registered = True
        try:
            self._init(model, name, endpoint, commit, consumer, swap, optimizer, accept_reshape,
                       token, node, keep_staging, kv_layers, kv_name_rules)
        except BaseException:
            self._unregister()
            raise

    def _unregister(self) -> None:
        with _REGISTERED_LOCK:
            if self._registered:
                self._registered = False
                _REGISTERED.get(self.model, set()).discard(self.name)

    def _init(self, model, name, endpoint, commit, consumer, swap, optimizer, accept_reshape,
              token, node, keep_staging, kv_layers, kv_name_rules) -> None:
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
        # The objects the publisher's names refer to: parameters and buffers, by state-dict name
        # (looked up again at every receive and apply: Note [Atomic apply]).
        self._targets = self._live_targets()
        if swap == "storage":
            _refuse_shared_storage(self._targets)
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
        self._sub = Subscriber(self._live_targets, name, endpoint, consumer=consumer,
                               accept_reshape=accept_reshape, token=token, node=node,
                               keep_staging=keep_staging, on_staged=self._on_staged,
                               on_error=self._on_error, config=self.cfg)
        self.client_id = self._sub.client_id
        self._sub.staged_tensors = self._staged_tensors
        self._hooks = []  # after the Subscriber: a register that fails leaves no hook behind
        try:
            self._hooks = [
                model.register_forward_pre_hook(self._pre_forward),
                model.register_forward_hook(self._post_forward, always_call=True),
            ]
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ hooks and staging

    def _live_targets(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by state-dict name, as they are now."""
        return dict(self.model.state_dict(keep_vars=True))

    def _pre_forward(self, module, args):
        nested = self._lock.recover()
        if self._staged is not None and self.commit_mode == "on_forward" and not nested:
            try:
                self._apply()
            except Exception as e:  # serving goes on with the old weights (Note [Atomic apply])
                log.error("hotweights %s: applying a version before a forward failed: %s",
                          self.name, e)
                with self._cv:
                    self.last_error = f"apply: {e}"
        self._lock.acquire_read(sys._getframe(1))

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
        applied, or None when nothing was staged. Not from inside this model's forward (it
        would wait for itself): RuntimeError."""
        return self._apply(timeout)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"hotweights {self.name!r}: {what} on a closed handle")

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
                self._check_open(f"wait for version {target}")
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
        # never raise before the all-reduce, which every rank must join: a rank inside a
        # forward takes part with "-1" and raises after it
        inside = self._lock.recover()
        try:
            # Not while another thread applies (its version decides the base): busy is "-1"
            if not inside and self._acquire_applying(timeout):
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
            if inside:
                self._check_outside_forward("commit_collective")
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
        self._unregister()
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

    def _check_outside_forward(self, what: str) -> None:
        if self._lock.recover():
            raise RuntimeError(f"hotweights {self.name!r}: {what} called inside a forward of the "
                               "model (it would wait for that forward to end): call it between "
                               "forwards, or use commit='on_forward'")

    def _acquire_applying(self, timeout: float | None) -> bool:
        return self._applying.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))

    def _take_applying(self, timeout: float | None) -> None:
        if not self._acquire_applying(timeout):
            raise TimeoutError(f"hotweights {self.name!r}: another thread kept applying for "
                               f"{timeout} s")

    def _apply_once(self, timeout: float | None) -> CommitInfo | None:
        self._check_open("commit")
        self._check_outside_forward("commit")
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
        for cb in list(self._callbacks):
            try:  # the user's: the version is applied whatever it does; the next ones run too
                cb(info)
            except Exception as e:
                log.error("hotweights %s: on_commit callback %r raised on version %d: %r",
                          self.name, cb, info.version, e)
                with self._cv:
                    self.last_error = f"version {info.version}: on_commit callback raised {e!r}"
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

    def _refuse_taken(self, staged: StagedVersion, why: str) -> None:
        """A version that cannot be applied here: dropped whole (nothing was swapped), recorded
        as refused, and the publisher asked for a catch-up from the version applied (which the
        receive checks refuse in turn if the model still does not fit)."""
        log.error("hotweights %s: version %d not applied: %s", self.name, staged.version, why)
        self._sub.recycle(staged.shadows)
        self._on_error(staged.version, why)
        self._sub.report_applied(behind=True)
        raise UpdateError(f"version {staged.version}: {why}")

    def _check_taken(self, staged: StagedVersion) -> str | None:
        """Why the staged version cannot be swapped into the model as it is now, or None:
        everything that could refuse it is checked before the first swap."""
        self._targets = self._live_targets()
        for name, shadow in staged.shadows.items():
            live = self._targets.get(name)
            if live is None:
                return f"{name!r} is not in the model (any more)"
            if live.device != shadow.device:
                return (f"{name!r} is on {live.device}, the version was received for "
                        f"{shadow.device}: the model moved after register_hotweights; register it "
                        "again")
            if self.swap == "inplace" and (live.shape != shadow.shape or live.dtype != shadow.dtype):
                return (f"{name!r} is {str(live.dtype).replace('torch.', '')}{tuple(live.shape)} "
                        f"in the model and {str(shadow.dtype).replace('torch.', '')}"
                        f"{tuple(shadow.shape)} in the version; swap='inplace' cannot apply that "
                        "(use swap='storage' and accept_reshape=True)")
        return None

    def _apply_taken(self, staged: StagedVersion, timeout: float | None) -> CommitInfo | None:
        if self._wrong_base(staged):
            self._drop(staged)
            return None
        why = self._check_taken(staged)
        if why is not None:
            self._refuse_taken(staged, why)
        names = list(staged.shadows)
        opt_params, opt_reshaped = self._optimizer_targets(names, staged)
        reshaped = {r[0] for r in staged.reshaped}  # the only ones whose grad can stop fitting
        # the engine copies contiguous tensors in place; any other layout is a torch copy
        strided = ([] if self.swap == "storage"
                   else [n for n in names if not self._targets[n].is_contiguous()])
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
            if self.swap == "storage":
                replaced = {}
                with torch.no_grad():
                    for name in names:
                        live = self._targets[name]
                        replaced[name] = live.data
                        if name in reshaped:  # a gradient of the old shape cannot be stepped
                            live.grad = None
                        live.data = staged.shadows[name]
            else:
                if strided:
                    odd = set(strided)
                    flat = [n for n in names if n not in odd]
                    with torch.no_grad():
                        for n in strided:
                            self._targets[n].data.copy_(staged.shadows[n])
                else:
                    flat = names
                ops.copy_([self._targets[n].data for n in flat], [staged.shadows[n] for n in flat])
                replaced = staged.shadows
            reuse_event = None
            if cuda:
                reuse_event = torch.cuda.Event()
                reuse_event.record(torch.cuda.current_stream(self._sub.device))
            pause = time.perf_counter() - t0
            opt_report = self._apply_optimizer_policy(opt_params, opt_reshaped, staged.version)
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

    def _optimizer_targets(self, names: list[str], staged: StagedVersion) -> tuple[list, list]:
        """The changed and the reshaped parameters the optimizer steps (a frozen base, or
        master copies under mixed precision, are not its; nothing to do for them)."""
        if self.optimizer is None:
            return [], []
        from . import optim

        index = optim._param_index(self.optimizer)
        params = [self._targets[n] for n in names if id(self._targets[n]) in index]
        reshaped = [self._targets[r[0]] for r in staged.reshaped
                    if r[0] in self._targets and id(self._targets[r[0]]) in index]
        return params, reshaped

    def _apply_optimizer_policy(self, params: list, reshaped: list, version: int) -> dict | None:
        """Optimizer-state policy for exactly the parameters that changed (see hotweights.optim);
        a reshaped parameter's state is reset whatever the policy (it no longer fits). Runs after
        the swap: an error is logged and reported, the version stays applied."""
        if self.optimizer is None or (self.opt_policy == "preserve" and not reshaped):
            return None
        from . import optim

        try:
            report = optim.apply_policy(self.optimizer,
                                        [] if self.opt_policy == "preserve" else params,
                                        self.opt_policy, self.opt_attenuation,
                                        shape_changed=reshaped)
        except Exception as e:
            log.error("hotweights %s: optimizer policy %r on version %d failed: %s", self.name,
                      self.opt_policy, version, e)
            with self._cv:
                self.last_error = f"version {version}: optimizer policy failed: {e}"
            return {"error": str(e)}
        return report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))

    def __repr__(self) -> str:
        return (f"HotweightsHandle({self.name!r}, version={self.version}, staged="
                f"{self.staged_version}, commit={self.commit_mode}, swap={self.swap})")


def _refuse_shared_storage(targets: dict[str, torch.Tensor]) -> None:
    """swap="storage" points each tensor at its own new storage: two distinct tensors that
    share one (views of a flat buffer) would silently stop sharing it."""
    seen: dict[tuple, tuple[str, int]] = {}
    for name, t in targets.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        other = seen.get(key)
        if other is not None and other[1] != id(t):
            raise ValueError(
                f"register_hotweights: {other[0]!r} and {name!r} share one storage; "
                "swap='storage' would give each its own and untie them: use swap='inplace'")
        seen.setdefault(key, (name, id(t)))


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
