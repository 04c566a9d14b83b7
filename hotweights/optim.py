# SPDX-License-Identifier: Apache-2.0
"""Optimizer-state policy at commit: what happens to the Adam/AdamW/SGD state of the parameters
whose weights a new version replaced (the math and the reasons are in docs/optim.md).

The commit path calls :func:`apply_policy` (or :func:`apply_policy_named`) with exactly the
parameters whose bytes changed; every other parameter's state is left bit for bit.
``hotweights opt-check`` shows, for a saved optimizer state (or a synthetic one), how many state
tensors each policy touches and how large the next updates are relative to ``preserve``,
measured by running the optimizer itself (:func:`update_size_ratios`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import config

__all__ = [
    "POLICIES",
    "PolicyReport",
    "apply_policy",
    "apply_policy_named",
    "update_size_ratios",
    "policy_counts",
    "opt_check",
    "warmup_remaining",
    "add_cli",
]

POLICIES = ("preserve", "reset", "attenuate", "reset_step")

# Note [optimizer state at commit]
# 1. Identity. torch optimizers key `optimizer.state` by the Parameter object and step the tensors
#    listed in `param_groups`. The commit writes the new weights into the same Parameter (in
#    place), so its state stays attached; parameters are found through one id -> position index
#    built in O(P). `optimizer.state` is a defaultdict: `state[p]` on a miss would insert `{}`
#    (which then appears in `state_dict()`), so lookups use `.get`.
# 2. In place. Policies change state with `mul_`/`zero_` on the existing tensors, so `step` keeps
#    its dtype and device (CPU float32 by default; the parameter's device for capturable/fused)
#    and tensors captured by a CUDA graph stay the ones the graph updates. The only other change
#    is removing a parameter's whole state entry, after which the optimizer re-initialises it
#    lazily at the next step.
# 3. Complete or empty. Adam's `_init_group` initialises only an *empty* state and then reads
#    `state["step"]` unconditionally: a state with moments but no `step` is a KeyError at the next
#    step. A state is therefore left complete or removed entirely, never partial.
# 4. Layout. A state tensor whose shape, dtype or device differs from its parameter's (the version
#    changed the shape, or the caller lists the parameter in `shape_changed`) is never reshaped or
#    cast: the parameter's state is removed (a reset), and the report says which and why.
# 5. Untouched parameters are neither read nor written.

_ADAM_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
_SGD_KEYS = frozenset({"momentum_buffer"})

# torch optimizers whose _init_group re-creates an empty per-parameter state at the next step
# (read in torch 2.13; tests/test_optim.py steps each after a reset). Only `reset` (and
# `preserve`) are defined for them: their moments have no attenuation analysis here.
_LAZY_RESET_NAMES = ("Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop")

_SUPPORTED = (
    "Adam and AdamW (every policy; default, foreach, fused, capturable, amsgrad), SGD (every "
    "policy), and `reset` only for " + ", ".join(_LAZY_RESET_NAMES)
)


def _lazy_reset_types() -> tuple[type, ...]:
    return tuple(getattr(torch.optim, n) for n in _LAZY_RESET_NAMES if hasattr(torch.optim, n))


def _kind(optimizer) -> str:
    """'adam', 'sgd', 'lazy' (reset only) or 'unknown'."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if type(optimizer) in _lazy_reset_types():  # exact types: a subclass may keep other state
        return "lazy"
    return "unknown"


def _kind_of_groups(groups: Sequence[Mapping[str, Any]], where: str) -> str:
    """The optimizer family of a saved state dict, told from its param_groups keys."""
    keys = set().union(*(set(g) for g in groups)) if groups else set()
    if {"betas", "amsgrad", "eps"} <= keys:
        return "adam"
    if {"momentum", "dampening", "nesterov"} <= keys:
        return "sgd"
    raise ValueError(
        f"{where}: cannot tell the optimizer from its param_groups keys {sorted(keys)}: expected "
        "Adam/AdamW (betas, eps, amsgrad) or SGD (momentum, dampening, nesterov)"
    )


# --- resolving arguments against the config ---


def _resolve(policy, attenuation, warmup_steps, where: str):
    """Explicit values (validated like their HOTWEIGHTS_* variables) beat the environment."""
    for name, v in (("attenuation", attenuation), ("warmup_steps", warmup_steps)):
        if isinstance(v, bool):  # True is not 1.0 (nor 1 step)
            raise ValueError(f"{where}: {name}={v!r}: expected a number, not a bool")
    explicit = {
        k: v
        for k, v in (
            ("opt_policy", policy),
            ("opt_attenuation", attenuation),
            ("opt_warmup_steps", warmup_steps),
        )
        if v is not None
    }
    try:
        checked = config.load({}, **explicit) if explicit else None
    except config.ConfigError as e:
        raise ValueError(f"{where}: {e}") from None
    cfg = config.get()
    pick = lambda f: getattr(checked, f) if f in explicit else getattr(cfg, f)  # noqa: E731
    return pick("opt_policy"), pick("opt_attenuation"), pick("opt_warmup_steps")


# --- planning: what a policy does to one parameter's state ---


@dataclasses.dataclass(frozen=True)
class _Action:
    mul: tuple[str, ...] = ()   # state keys scaled in place by the attenuation factor
    zero: tuple[str, ...] = ()  # state keys zeroed in place
    clear: bool = False         # remove the whole state entry (lazy re-initialisation)
    rebuild: tuple[str, ...] = ()  # replace by zeros shaped like the parameter (Note [fused SGD])


_NOTHING = _Action()


def _tensors(state: Mapping[str, Any]) -> int:
    return sum(1 for v in state.values() if isinstance(v, torch.Tensor))


def _bytes(state: Mapping[str, Any], keys: Iterable[str] | None = None) -> int:
    keys = state.keys() if keys is None else keys
    return sum(
        state[k].numel() * state[k].element_size()
        for k in keys
        if isinstance(state.get(k), torch.Tensor)
    )


def _plan(kind: str, policy: str, state: Mapping[str, Any], group: Mapping[str, Any], label: str,
          opt_name: str) -> _Action:
    """The action of `policy` on one non-empty per-parameter state (Note [optimizer state at commit])."""
    if policy == "preserve":
        return _NOTHING
    if kind == "adam":
        extra = set(state) - _ADAM_KEYS
        if extra:
            raise ValueError(
                f"{label}: {opt_name} state has keys {sorted(extra)} that Adam/AdamW do not keep "
                f"(expected a subset of {sorted(_ADAM_KEYS)}); a subclass with other state is "
                "not supported"
            )
        need = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        missing = need - set(state)
        if policy == "reset":
            # Zeroing a complete state in place is exactly the lazy initial state (step 0, zero
            # moments); a partial one is removed so that the optimizer rebuilds it whole.
            return _Action(clear=True) if missing else _Action(zero=tuple(sorted(state)))
        if missing:
            raise ValueError(
                f"{label}: {opt_name} state lacks {sorted(missing)} (has {sorted(state)}): a "
                f"partial state cannot be {policy}d; use policy='reset' to rebuild it"
            )
        if policy == "attenuate":
            return _Action(mul=("exp_avg",))
        return _Action(zero=("step",))  # reset_step
    if kind == "sgd":
        extra = set(state) - _SGD_KEYS
        if extra:
            raise ValueError(
                f"{label}: {opt_name} state has keys {sorted(extra)} that SGD does not keep "
                f"(expected {sorted(_SGD_KEYS)})"
            )
        has_buf = isinstance(state.get("momentum_buffer"), torch.Tensor)
        if policy == "reset":
            # SGD's first step sets buf = g; a zero buffer gives (1 - dampening) * g, the same
            # when dampening = 0. Otherwise the buffer is removed -- except in a fused group:
            # torch's _fused_sgd takes all buffers of a group or none (one missing is a
            # TypeError at the next step), so there it is zeroed (Note [fused SGD]).
            if not has_buf:
                return _Action(clear=True)
            if float(group.get("dampening", 0.0)) == 0.0 or group.get("fused"):
                return _Action(zero=("momentum_buffer",))
            return _Action(clear=True)
        if policy == "attenuate":
            return _Action(mul=("momentum_buffer",)) if has_buf else _NOTHING
        return _NOTHING  # reset_step: SGD has no step counter or bias correction (docs/optim.md)
    if kind == "lazy" and policy == "reset":
        return _Action(clear=True)
    raise ValueError(
        f"optimizer policy {policy!r} is not defined for {opt_name}: supported are {_SUPPORTED} "
        "(`preserve` works with any optimizer)"
    )


# Note [fused SGD]
# torch 2.13's _fused_sgd treats a group's momentum buffers as all present or all absent
# (`is_first_step = all(buf is None ...)`); a group where some parameters have a buffer and others
# do not fails at the next step. In a fused SGD group a reset therefore never removes a buffer: it
# zeroes it in place, or, after a shape change, puts a zero buffer of the new shape in its place.


def _layout_reset(kind: str, group: Mapping[str, Any], label: str, opt_name: str) -> _Action:
    """The reset of a parameter whose state no longer fits it (Note [optimizer state at commit] 4)."""
    if kind == "sgd" and group.get("fused"):
        return _Action(rebuild=("momentum_buffer",))  # Note [fused SGD]
    if kind == "unknown":
        raise ValueError(
            f"{label}: its shape changed, but an empty state is not known to be valid for "
            f"{opt_name}: supported are {_SUPPORTED}"
        )
    return _Action(clear=True)


_ELEMENTWISE = {"adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "sgd": ("momentum_buffer",)}


def _layout_mismatch(kind: str, p: torch.Tensor, state: Mapping[str, Any]) -> str | None:
    """Why a state no longer fits its parameter, or None.

    Adam/SGD: the element-wise tensors must match the parameter's shape, dtype and device. The
    other lazily-initialised torch optimizers keep scalar tensors too (NAdam's mu_product, ASGD's
    eta), so only the shapes of their non-scalar tensors are compared. Unknown optimizers are not
    inspected (Adafactor's factored moments are legitimately shaped otherwise).
    """
    if kind == "unknown":  # its tensors need not be shaped like the parameter (Adafactor)
        return None
    keys = _ELEMENTWISE.get(kind)
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or (keys is not None and k not in keys):
            continue
        if keys is None and v.dim() == 0:
            continue
        if v.shape != p.shape:
            return f"{k} shape {tuple(v.shape)} != parameter shape {tuple(p.shape)}"
        if keys is None:
            continue
        if v.dtype != p.dtype:
            return f"{k} dtype {v.dtype} != parameter dtype {p.dtype}"
        if v.device != p.device:
            return f"{k} device {v.device} != parameter device {p.device}"
    return None


def _by_device_dtype(ts: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: dict[tuple, list[torch.Tensor]] = {}
    for t in ts:
        out.setdefault((t.device, t.dtype), []).append(t)
    return list(out.values())


# --- the report ---


@dataclasses.dataclass
class PolicyReport:
    """What apply_policy did: per applied policy, parameters and state tensors touched; JSON-able."""

    policy: str
    attenuation: float | None
    optimizer: str
    #: parameters each policy was applied to (shape-changed ones count under "reset")
    params: dict[str, int]
    #: state tensors modified or removed, per applied policy
    tensors: dict[str, int]
    #: bytes of those tensors, per applied policy
    bytes: dict[str, int]
    #: label (name, or "#i" = state_dict key) -> why its state was reset instead
    shape_reset: dict[str, str]
    #: requested parameters that had no optimizer state yet (never stepped): nothing to do
    no_state: int
    #: steps of the LR ramp applied to reset parameters (0 = none)
    warmup_steps: int
    #: {"steps": n, "next": ratio at k=1, "peak": max ratio over k<=n, "peak_step": k} or None
    predicted_update_ratio: dict[str, float | int] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)


# --- applying ---


def _param_index(optimizer) -> dict[int, tuple[int, int]]:
    """id(param) -> (group index, state_dict key), in the order torch's state_dict() numbers them."""
    index: dict[int, tuple[int, int]] = {}
    i = 0
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in index:
                index[id(p)] = (gi, i)
                i += 1
    return index


def apply_policy(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    policy: str | None = None,
    attenuation: float | None = None,
    *,
    shape_changed: Iterable[torch.Tensor] = (),
    warmup_steps: int | None = None,
    predict_steps: int = 0,
    _labels: Mapping[int, str] | None = None,
) -> PolicyReport:
    """Applies the optimizer-state policy to the state of exactly `params` (and resets `shape_changed`)."""
    t0 = time.perf_counter()
    where = "apply_policy"
    policy, attenuation, warmup_steps = _resolve(policy, attenuation, warmup_steps, where)
    if not isinstance(predict_steps, int) or predict_steps < 0:
        raise ValueError(f"{where}: predict_steps={predict_steps!r}: expected an integer >= 0")
    kind = _kind(optimizer)
    opt_name = type(optimizer).__name__
    index = _param_index(optimizer)
    labels = _labels or {}

    def label_of(p) -> str:
        return labels.get(id(p)) or f"#{index[id(p)][1]}"

    targets: dict[int, torch.Tensor] = {}
    reshaped: set[int] = set()
    for which, seq in (("params", params), ("shape_changed", shape_changed)):
        for pos, p in enumerate(seq):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: {which}[{pos}] is a {type(p).__name__}, expected a Parameter")
            if id(p) not in index:
                raise ValueError(
                    f"{where}: {which}[{pos}] ({labels.get(id(p), 'shape ' + str(tuple(p.shape)))}) "
                    f"is not in any param group of this {opt_name}; pass the parameters the optimizer "
                    "steps (under mixed precision, the master copies)"
                )
            targets[id(p)] = p
            if which == "shape_changed":
                reshaped.add(id(p))

    applied_params: dict[str, int] = {}
    applied_tensors: dict[str, int] = {}
    applied_bytes: dict[str, int] = {}
    shape_reset: dict[str, str] = {}
    no_state = 0
    plans: list[tuple[torch.Tensor, Mapping[str, Any], _Action, str]] = []
    for pid, p in targets.items():
        state = optimizer.state.get(p)
        if not state:
            no_state += 1
            continue
        gi = index[pid][0]
        why = "listed in shape_changed" if pid in reshaped else _layout_mismatch(kind, p, state)
        if why is not None:
            shape_reset[label_of(p)] = why
            action = _layout_reset(kind, optimizer.param_groups[gi], label_of(p), opt_name)
            plans.append((p, state, action, "reset"))
        else:
            action = _plan(kind, policy, state, optimizer.param_groups[gi], label_of(p), opt_name)
            plans.append((p, state, action, policy))

    prediction = None
    if predict_steps and policy != "preserve" and kind in ("adam", "sgd"):
        entries = [
            _Entry(index[id(p)][0], optimizer.param_groups[index[id(p)][0]], state)
            for p, state, _, applied in plans
            if applied == policy
        ]
        prediction = _predict(kind, entries, policy, attenuation, warmup_steps, predict_steps)

    mul: list[torch.Tensor] = []
    zero: list[torch.Tensor] = []
    warm: list[torch.Tensor] = []
    with torch.no_grad():
        for p, state, action, applied in plans:
            applied_params[applied] = applied_params.get(applied, 0) + 1
            if action.clear:
                n, b = _tensors(state), _bytes(state)
            else:
                keys = action.mul + action.zero + action.rebuild
                n, b = len(keys), _bytes(state, keys)
            applied_tensors[applied] = applied_tensors.get(applied, 0) + n
            applied_bytes[applied] = applied_bytes.get(applied, 0) + b
            if action.clear:
                del optimizer.state[p]
            for k in action.rebuild:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for k in action.mul:
                mul.append(state[k])
            for k in action.zero:
                if isinstance(state[k], torch.Tensor):
                    zero.append(state[k])
                else:  # a Python-number step from an old pickle; torch converts it on load
                    state[k] = type(state[k])(0)
            if applied == "reset":
                warm.append(p)
        for group in _by_device_dtype(mul):
            torch._foreach_mul_(group, attenuation)
        for group in _by_device_dtype(zero):
            torch._foreach_zero_(group)
    if warm and warmup_steps:
        _Warmup.attach(optimizer, warm, warmup_steps)
    return PolicyReport(
        policy=policy,
        attenuation=attenuation if policy == "attenuate" else None,
        optimizer=opt_name,
        params=applied_params,
        tensors=applied_tensors,
        bytes=applied_bytes,
        shape_reset=shape_reset,
        no_state=no_state,
        warmup_steps=warmup_steps if warm else 0,
        predicted_update_ratio=prediction,
        seconds=time.perf_counter() - t0,
    )


def apply_policy_named(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    changed: Iterable[str],
    policy: str | None = None,
    attenuation: float | None = None,
    *,
    shape_changed: Iterable[str] = (),
    warmup_steps: int | None = None,
    predict_steps: int = 0,
) -> PolicyReport:
    """apply_policy with parameters chosen by name, e.g. ``model.named_parameters()`` and a version's changed names."""
    by_name = dict(named_parameters)
    changed, shape_changed = list(changed), list(shape_changed)
    missing = [n for n in changed + shape_changed if n not in by_name]
    if missing:
        raise ValueError(
            f"apply_policy_named: {len(missing)} name(s) are not parameters of the model: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    labels = {}
    for n, p in by_name.items():
        labels.setdefault(id(p), n)  # tied weights: the first name
    return apply_policy(
        optimizer,
        [by_name[n] for n in changed],
        policy,
        attenuation,
        shape_changed=[by_name[n] for n in shape_changed],
        warmup_steps=warmup_steps,
        predict_steps=predict_steps,
        _labels=labels,
    )


# --- LR warm-up after a reset ---


class _Warmup:
    """Scales the updates of reset parameters by k/N for their next N steps (an LR multiplier).

    A pre-step hook snapshots those parameters and a post-step hook moves each back to
    ``snapshot + (k/N) * (new - snapshot)``. For Adam, AdamW and SGD the whole update (weight
    decay included) is proportional to the learning rate and the state update does not depend on
    it, so this equals stepping with ``lr * k/N`` for just those parameters while the scheduler
    keeps owning ``group["lr"]``. Costs one copy of the warming parameters per step; hooks do
    not run under CUDA-graph replay. Removes its hooks when every ramp is done.
    """

    _registry: "weakref.WeakKeyDictionary[Any, _Warmup]" = weakref.WeakKeyDictionary()

    def __init__(self, optimizer):
        self.ramps: dict[int, list] = {}  # id(p) -> [p, steps done, N]
        self.snap: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    @classmethod
    def attach(cls, optimizer, params: Sequence[torch.Tensor], steps: int) -> None:
        w = cls._registry.get(optimizer)
        if w is None:
            w = cls._registry[optimizer] = cls(optimizer)
        for p in params:
            w.ramps[id(p)] = [p, 0, steps]  # a second reset restarts the ramp

    def _pre(self, optimizer, args, kwargs):
        with torch.no_grad():
            self.snap = [(r[0], r[0].detach().clone()) for r in self.ramps.values()]

    def _post(self, optimizer, args, kwargs):
        with torch.no_grad():
            for p, before in self.snap:
                r = self.ramps[id(p)]
                r[1] += 1
                if r[1] < r[2]:
                    p.lerp_(before, 1.0 - r[1] / r[2])
        self.snap = []
        self.ramps = {k: r for k, r in self.ramps.items() if r[1] < r[2]}
        if not self.ramps:
            for h in self.handles:
                h.remove()
            self._registry.pop(optimizer, None)


def warmup_remaining(optimizer) -> int:
    """Steps left in the longest post-reset LR ramp of this optimizer (0 = none active)."""
    w = _Warmup._registry.get(optimizer)
    return max((r[2] - r[1] for r in w.ramps.values()), default=0) if w else 0


# --- measuring the update size: the optimizer itself on sampled state ---


@dataclasses.dataclass
class _Entry:
    """One parameter's state and its group (live optimizer or state dict)."""

    group_index: int
    group: Mapping[str, Any]
    state: Mapping[str, Any]


@dataclasses.dataclass
class _Probe:
    """Sampled coordinates of parameters that share hyper-parameters and step."""

    hyper: dict[str, Any]
    step: float | None
    state: dict[str, torch.Tensor]  # 1-D float64 CPU
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # coordinates represented x |lr|


def _hyper(kind: str, group: Mapping[str, Any]) -> dict[str, Any]:
    if kind == "adam":
        b1, b2 = (float(b) for b in group["betas"])
        return {"betas": (b1, b2), "eps": float(group["eps"]), "amsgrad": bool(group.get("amsgrad", False))}
    return {
        "momentum": float(group["momentum"]),
        "dampening": float(group["dampening"]),
        "nesterov": bool(group["nesterov"]),
    }


_MIN_PER_PARAM = 64


def _sample_probes(kind: str, entries: Sequence[_Entry], sample: int, seed: int) -> list[_Probe]:
    """Samples coordinates of each state and derives a stationary gradient model per coordinate.

    Adam: the bias-corrected moments estimate the gradient's mean and mean square, so the model is
    N(mean = c * m_hat, var = max(v_hat - mean^2, 0)), where c <= 1 removes the share of m_hat that
    is EMA noise (estimated per tensor). SGD keeps no second moment: mean =
    buf * (1 - momentum) / (1 - dampening) and the noise std is the RMS of those means over the
    parameter (docs/optim.md). Updates are element-wise, so sampled coordinates evolve exactly as
    they would inside the full tensors.
    """
    key = "exp_avg" if kind == "adam" else "momentum_buffer"

    def complete(e: _Entry) -> bool:
        if kind == "sgd":
            return isinstance(e.state.get(key), torch.Tensor)
        need = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if e.group.get("amsgrad") else [])
        return all(k in e.state for k in need) and float(e.state["step"]) > 0

    usable = [e for e in entries if complete(e)]
    total = sum(e.state[key].numel() for e in usable)
    gen = torch.Generator().manual_seed(seed)
    buckets: dict[tuple, dict[str, list]] = {}
    for e in usable:
        hyper = _hyper(kind, e.group)
        lr = abs(float(e.group["lr"]))
        step = float(e.state["step"]) if kind == "adam" else None
        keys = [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
                if isinstance(e.state.get(k), torch.Tensor)]
        views = {}
        for k in keys:
            t = e.state[k].detach()
            views[k] = torch.view_as_real(t) if t.is_complex() else t
        ref = views[key]
        n = ref.numel()
        if n == 0:
            continue
        s = min(n, max(_MIN_PER_PARAM, round(sample * n / max(total, 1))))
        if s == n:
            picked = {k: v.reshape(-1).to("cpu", torch.float64) for k, v in views.items()}
        else:
            flat = torch.randint(n, (s,), generator=gen)
            coords = tuple(c.to(ref.device) for c in torch.unravel_index(flat, ref.shape))
            picked = {k: v[coords].to("cpu", torch.float64) for k, v in views.items()}
        if kind == "adam":
            b1, b2 = hyper["betas"]
            m_hat = picked["exp_avg"] / (1.0 - b1 ** step)
            msq = picked["exp_avg_sq"] / (1.0 - b2 ** step)
            # m_hat is the true mean plus EMA noise of variance sigma^2 * f; shrinking it by the
            # tensor's share of signal keeps the second moment of m right after the burn-in
            # (without this, low-SNR states look less noisy than they are).
            f = (1 - b1) * (1 - b1 ** (2 * step)) / ((1 + b1) * (1 - b1 ** step) ** 2)
            noise = float((msq - m_hat * m_hat).clamp_min(0).mean()) * f
            power = float((m_hat * m_hat).mean())
            shrink = math.sqrt(max(0.0, 1.0 - noise / power)) if power > 0 else 0.0
            mean = m_hat * shrink
            std = (msq - mean * mean).clamp_min(0).sqrt()
        else:
            mom, damp = hyper["momentum"], hyper["dampening"]
            buf = picked["momentum_buffer"]
            mean = buf * (1.0 - mom) / (1.0 - damp) if damp < 1 else buf.clone()
            std = torch.full_like(mean, float(mean.pow(2).mean().sqrt()))
        weight = torch.full_like(mean, lr * n / s)
        b = buckets.setdefault((e.group_index, step), {"hyper": hyper, "step": step, "parts": []})
        b["parts"].append((picked, mean, std, weight))
    probes = []
    for b in buckets.values():
        parts = b["parts"]
        state = {k: torch.cat([pt[0][k] for pt in parts]) for k in parts[0][0]}
        probes.append(_Probe(
            hyper=b["hyper"], step=b["step"], state=state,
            mean=torch.cat([pt[1] for pt in parts]), std=torch.cat([pt[2] for pt in parts]),
            weight=torch.cat([pt[3] for pt in parts]),
        ))
    return probes


def _probe_optimizer(kind: str, probes: Sequence[_Probe], states: Sequence[Mapping[str, Any]]):
    """A real torch optimizer over zero float64 probe parameters carrying copies of `states`."""
    params = [torch.nn.Parameter(torch.zeros_like(pr.mean)) for pr in probes]
    # lr 1 and no weight decay: the measured update is the gradient-driven part (the group's lr is
    # in the coordinate weights); the default single-tensor path is the reference implementation.
    groups = [{"params": [p], **pr.hyper} for p, pr in zip(params, probes)]
    if kind == "adam":
        opt = torch.optim.Adam(groups, lr=1.0, weight_decay=0.0, foreach=False)
    else:
        opt = torch.optim.SGD(groups, lr=1.0, weight_decay=0.0, foreach=False)
    for p, st in zip(params, states):
        opt.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
    return opt, params


def _run(opt, params, probes, steps: int, gen: torch.Generator, record: bool) -> list[float]:
    """Steps `opt` under the probes' gradient model; the weighted mean |update| per step."""
    sizes = []
    for _ in range(steps):
        with torch.no_grad():
            for p, pr in zip(params, probes):
                p.zero_()
                p.grad = pr.mean + pr.std * torch.randn(pr.mean.shape, generator=gen, dtype=torch.float64)
        opt.step()
        if record:
            with torch.no_grad():
                num = sum(float((pr.weight * p.abs()).sum()) for p, pr in zip(params, probes))
                den = sum(float(pr.weight.sum()) for pr in probes)
            sizes.append(num / den if den else 0.0)
    return sizes


def _burn_in(kind: str, probes: Sequence[_Probe]) -> int:
    """Steps for the first moment to carry its stationary noise: 3 / (1 - beta1 or momentum)."""
    rates = [pr.hyper["betas"][0] if kind == "adam" else pr.hyper["momentum"] for pr in probes]
    return min(300, max((math.ceil(3.0 / (1.0 - r)) if 0 < r < 1 else 0) for r in rates)) if rates else 0


def _simulate(kind: str, probes: Sequence[_Probe], policies: Mapping[str, Callable], steps: int,
              seed: int) -> dict[str, list[float | None]]:
    """Ratio of mean |update| under each policy to preserve at k = 1..steps after the swap."""
    if not probes:
        return {name: [None] * steps for name in policies}
    start = [
        ({"step": torch.tensor(pr.step, dtype=torch.float32), **pr.state} if kind == "adam" else dict(pr.state))
        for pr in probes
    ]
    opt, params = _probe_optimizer(kind, probes, start)
    _run(opt, params, probes, _burn_in(kind, probes), torch.Generator().manual_seed(seed + 1), False)
    at_swap = [dict(opt.state[p]) for p in params]
    sizes = {}
    for name, fn in {"preserve": None, **policies}.items():
        opt, params = _probe_optimizer(kind, probes, at_swap)
        if fn is not None:
            fn(opt, params)
        # The same gradient draws for every policy (common random numbers): ratios are not
        # blurred by sampling noise.
        sizes[name] = _run(opt, params, probes, steps, torch.Generator().manual_seed(seed + 2), True)
    base = sizes.pop("preserve")
    out = {name: [(s / b if b else None) for s, b in zip(v, base)] for name, v in sizes.items()}
    if "preserve" in policies:
        out["preserve"] = [1.0 if b else None for b in base]
    return out


def _policy_fn(policy: str, attenuation: float, warmup_steps: int) -> Callable:
    return lambda opt, params: apply_policy(
        opt, params, policy, attenuation, warmup_steps=warmup_steps, predict_steps=0
    )


def _summary(ratios: Sequence[float | None]) -> dict[str, float | int] | None:
    known = [(r, k) for k, r in enumerate(ratios, 1) if r is not None]
    if not known:
        return None
    peak, at = max(known, key=lambda t: (t[0], -t[1]))
    return {"steps": len(ratios), "next": ratios[0], "peak": peak, "peak_step": at}


def _predict(kind, entries, policy, attenuation, warmup_steps, steps, sample=4096, seed=0):
    probes = _sample_probes(kind, entries, sample, seed)
    ratios = _simulate(kind, probes, {policy: _policy_fn(policy, attenuation, warmup_steps)}, steps, seed)
    return _summary(ratios[policy])


def _state_dict_entries(state_dict: Mapping[str, Any], params: Iterable[int] | None, where: str):
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}: expected an optimizer state dict with 'state' and 'param_groups'")
    groups = state_dict["param_groups"]
    kind = _kind_of_groups(groups, where)
    owner = {int(i): gi for gi, g in enumerate(groups) for i in g["params"]}
    chosen = sorted(owner) if params is None else list(dict.fromkeys(int(i) for i in params))
    unknown = [i for i in chosen if i not in owner]
    if unknown:
        raise ValueError(
            f"{where}: parameter indices {unknown[:5]} are not in the state dict's param_groups "
            f"(it has {len(owner)} parameters, 0..{len(owner) - 1})"
        )
    states = state_dict["state"]
    entries = {i: _Entry(owner[i], groups[owner[i]], states[i]) for i in chosen if states.get(i)}
    return kind, owner, chosen, entries


def update_size_ratios(
    state_dict: Mapping[str, Any],
    policies: Iterable[str] | Mapping[str, Callable] = POLICIES,
    *,
    attenuation: float | None = None,
    warmup_steps: int | None = None,
    steps: int = 100,
    params: Iterable[int] | None = None,
    sample: int = 65536,
    seed: int = 0,
) -> dict[str, list[float | None]]:
    """Mean |update| under each policy / under preserve, at k = 1..steps after the swap.

    Measured, not predicted by formula: a real optimizer of the state dict's family steps
    `sample` coordinates of its state (optionally only the parameters `params`, state-dict keys)
    under stationary gradients drawn from the state's own moments (docs/optim.md). `policies`
    may map names to callables ``fn(optimizer, params)`` to measure other variants.
    """
    where = "update_size_ratios"
    if steps < 1 or sample < 1:
        raise ValueError(f"{where}: steps={steps}, sample={sample}: expected both >= 1")
    _, attenuation, warmup_steps = _resolve(None, attenuation, warmup_steps, where)
    kind, _, _, entries = _state_dict_entries(state_dict, params, where)
    if isinstance(policies, Mapping):
        fns = dict(policies)
    else:
        fns = {}
        for name in policies:
            if name not in POLICIES:
                raise ValueError(f"{where}: policy {name!r} is not one of {', '.join(POLICIES)}")
            fns[name] = None if name == "preserve" else _policy_fn(name, attenuation, warmup_steps)
    probes = _sample_probes(kind, list(entries.values()), sample, seed)
    real = {n: f for n, f in fns.items() if f is not None}
    ratios = _simulate(kind, probes, real, steps, seed)
    if "preserve" in fns and fns["preserve"] is None:
        ratios["preserve"] = [1.0 if probes else None] * steps
    return {n: ratios[n] for n in fns}


def policy_counts(
    state_dict: Mapping[str, Any],
    policy: str,
    *,
    params: Iterable[int] | None = None,
) -> list[dict[str, Any]]:
    """Per param group of a saved state dict: parameters, those with state, and the tensors/bytes `policy` touches."""
    where = "policy_counts"
    if policy not in POLICIES:
        raise ValueError(f"{where}: policy {policy!r} is not one of {', '.join(POLICIES)}")
    kind, owner, chosen, entries = _state_dict_entries(state_dict, params, where)
    name = "Adam/AdamW" if kind == "adam" else "SGD"
    out = []
    for gi, group in enumerate(state_dict["param_groups"]):
        row = {"group": gi, "params": 0, "with_state": 0, "tensors": 0, "bytes": 0,
               "hyper": {"lr": float(group["lr"]), "weight_decay": float(group.get("weight_decay", 0.0)),
                         **_hyper(kind, group)}}
        for i in chosen:
            if owner[i] != gi:
                continue
            row["params"] += 1
            e = entries.get(i)
            if e is None:
                continue
            row["with_state"] += 1
            a = _plan(kind, policy, e.state, group, f"#{i}", name)
            keys = [k for k in e.state if isinstance(e.state[k], torch.Tensor)] if a.clear else list(a.mul + a.zero)
            row["tensors"] += len(keys)
            row["bytes"] += _bytes(e.state, keys)
        out.append(row)
    return out


# --- `hotweights opt-check` ---


def _synthetic_state(seed: int, steps: int = 300) -> tuple[dict, str]:
    """A real AdamW state: a small MLP trained on a random regression task, two param groups."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, 8),
        )
        teacher = torch.nn.Linear(32, 8)
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-3
        )
        for _ in range(steps):
            x = torch.randn(64, 32)
            with torch.no_grad():
                y = teacher(x) + 0.1 * torch.randn(64, 8)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return opt.state_dict(), f"synthetic AdamW state (MLP 32-64-64-8, 2 param groups, {steps} steps on a random regression task)"


def _load_checkpoint(path: str, key: str | None) -> tuple[dict, str]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--checkpoint {path}: no such file") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(
            f"--checkpoint {path}: cannot be read with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); expected a "
            "torch.save(optimizer.state_dict()) file"
        ) from None
    is_sd = lambda o: isinstance(o, Mapping) and "state" in o and "param_groups" in o  # noqa: E731
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj or not is_sd(obj[key]):
            raise ValueError(f"--key {key!r}: {path} has no optimizer state dict under that key")
        return obj[key], f"{path} [{key}]"
    if is_sd(obj):
        return obj, path
    found = [k for k, v in obj.items() if is_sd(v)] if isinstance(obj, Mapping) else []
    if len(found) == 1:
        return obj[found[0]], f"{path} [{found[0]}]"
    if found:
        raise ValueError(f"--checkpoint {path}: several optimizer state dicts ({found}); pick one with --key")
    raise ValueError(
        f"--checkpoint {path}: holds no optimizer state dict (a mapping with 'state' and "
        "'param_groups'); expected torch.save(optimizer.state_dict())"
    )


def _int_list(text: str, what: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"{what}={text!r}: expected comma-separated integers or ranges a-b")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(a, b + 1))
    if not out:
        raise ValueError(f"{what}={text!r}: expected at least one integer")
    return out


def opt_check(
    state_dict: Mapping[str, Any],
    source: str,
    *,
    policy: str | None = None,
    attenuation: float | None = None,
    warmup_steps: int | None = None,
    params: Iterable[int] | None = None,
    report_steps: Sequence[int] = (1, 10),
    horizon: int = 100,
    sample: int = 65536,
    seed: int = 0,
) -> dict[str, Any]:
    """Counts and measured update-size ratios of every policy on a saved optimizer state (JSON-able)."""
    policy, attenuation, warmup_steps = _resolve(policy, attenuation, warmup_steps, "opt-check")
    if any(k < 1 for k in report_steps):
        raise ValueError(f"--steps={list(report_steps)}: expected steps >= 1")
    horizon = max(horizon, *report_steps)
    params = None if params is None else list(params)
    kind, _, _, _ = _state_dict_entries(state_dict, params, "opt-check")
    ratios = update_size_ratios(
        state_dict, POLICIES, attenuation=attenuation, warmup_steps=warmup_steps,
        steps=horizon, params=params, sample=sample, seed=seed,
    )
    groups = {name: policy_counts(state_dict, name, params=params) for name in POLICIES}
    out_groups = []
    for gi, row in enumerate(groups["preserve"]):
        out_groups.append({
            "group": gi, "hyper": row["hyper"], "params": row["params"], "with_state": row["with_state"],
            "tensors": {name: groups[name][gi]["tensors"] for name in POLICIES},
        })
    pol = {}
    for name in POLICIES:
        summ = _summary(ratios[name])
        pol[name] = {
            "params": sum(r["with_state"] for r in groups[name]),
            "tensors": sum(r["tensors"] for r in groups[name]),
            "bytes": sum(r["bytes"] for r in groups[name]),
            "ratio": {str(k): ratios[name][k - 1] for k in report_steps},
            "peak": summ and summ["peak"],
            "peak_step": summ and summ["peak_step"],
        }
    return {
        "source": source,
        "optimizer": "Adam/AdamW" if kind == "adam" else "SGD",
        "selected": policy,
        "attenuation": attenuation,
        "warmup_steps": warmup_steps,
        "horizon": horizon,
        "sample": sample,
        "groups": out_groups,
        "policies": pol,
    }


def _render(data: Mapping[str, Any]) -> str:
    f = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731
    lines = [f"optimizer state: {data['source']}", f"optimizer: {data['optimizer']}", ""]
    hyper = [", ".join(f"{k}={v}" for k, v in g["hyper"].items()) for g in data["groups"]]
    hw = max([len("hyper-parameters")] + [len(h) for h in hyper])
    lines.append(f"group  params  with state  {'hyper-parameters':<{hw}}  tensors touched by "
                 + " / ".join(POLICIES))
    for g, h in zip(data["groups"], hyper):
        t = " / ".join(str(g["tensors"][n]) for n in POLICIES)
        lines.append(f"{g['group']:>5}  {g['params']:>6}  {g['with_state']:>10}  {h:<{hw}}  {t}")
    lines.append("")
    ks = list(next(iter(data["policies"].values()))["ratio"])
    labels = {}
    for name in data["policies"]:
        label = name + (f" a={data['attenuation']:g}" if name == "attenuate" else "")
        label += f" warm-up {data['warmup_steps']}" if name == "reset" and data["warmup_steps"] else ""
        labels[name] = label
    lw = max(len(x) for x in labels.values())
    lines.append(f"  {'policy':<{lw}}  params  tensors  state MiB  "
                 + "".join(f"{'k=' + str(k):>7}" for k in ks) + f"   peak (k<={data['horizon']})")
    for name, p in data["policies"].items():
        mark = "*" if name == data["selected"] else " "
        rs = "".join(f"{f(p['ratio'][k]):>7}" for k in ks)
        peak = "-" if p["peak"] is None else f"{p['peak']:.2f} at k={p['peak_step']}"
        lines.append(f"{mark} {labels[name]:<{lw}}  {p['params']:>6}  {p['tensors']:>7}  "
                     f"{p['bytes'] / 2**20:>9.2f}  {rs}   {peak}")
    lines.append("")
    lines.append("ratio: mean |update| under the policy / under preserve, k steps after the swap, same "
                 "stationary gradients drawn")
    lines.append(f"from the state's own moments ({data['sample']} sampled coordinates; docs/optim.md). "
                 "* = selected policy.")
    return "\n".join(lines)


def _cmd_opt_check(args) -> int:
    if args.checkpoint:
        sd, source = _load_checkpoint(args.checkpoint, args.key)
    else:
        sd, source = _synthetic_state(args.seed)
    if args.horizon < 1 or args.sample < 1:
        raise ValueError(f"--horizon={args.horizon} --sample={args.sample}: expected both >= 1")
    data = opt_check(
        sd, source, policy=args.policy, attenuation=args.attenuation, warmup_steps=args.warmup_steps,
        params=_int_list(args.params, "--params") if args.params else None,
        report_steps=_int_list(args.steps, "--steps"), horizon=args.horizon, sample=args.sample,
        seed=args.seed,
    )
    print(json.dumps(data, indent=2) if args.json else _render(data))
    return 0


def add_cli(subparsers) -> None:
    """Registers ``hotweights opt-check``."""
    s = subparsers.add_parser(
        "opt-check",
        help="what each optimizer-state policy touches, and the next update sizes vs preserve",
        description="For a saved optimizer state (or a synthetic AdamW one), how many state tensors "
        "each policy (preserve, reset, attenuate, reset_step) would touch and the measured ratio "
        "of the update size k steps after the swap to that under preserve.",
    )
    s.add_argument("--policy", choices=POLICIES, help="policy to mark (default: HOTWEIGHTS_OPT_POLICY)")
    s.add_argument("--attenuation", type=float, help="factor of attenuate (default: HOTWEIGHTS_OPT_ATTENUATION)")
    s.add_argument("--warmup-steps", type=int, help="LR ramp after reset (default: HOTWEIGHTS_OPT_WARMUP_STEPS)")
    s.add_argument("--checkpoint", metavar="FILE",
                   help="torch.save(optimizer.state_dict()) file, read with weights_only=True "
                   "(default: a synthetic AdamW state)")
    s.add_argument("--key", help="entry of a training checkpoint dict that holds the optimizer state dict")
    s.add_argument("--params", help="parameters whose weights change, as state-dict keys: 0,3,5-9 (default: all)")
    s.add_argument("--steps", default="1,10", help="steps after the swap to show (default: 1,10)")
    s.add_argument("--horizon", type=int, default=100, help="steps simulated; the peak is over these (default: 100)")
    s.add_argument("--sample", type=int, default=65536, help="state coordinates simulated (default: 65536)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the synthetic gradients")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_opt_check)


# --- rejected variants, kept to measure them (docs/optim.md, tests/test_optim.py) ---


def _attenuate_both_moments(optimizer, params, a: float, v_power: int = 1) -> None:
    """REJECTED attenuate: exp_avg *= a and exp_avg_sq *= a**v_power (overshoots ~1.37x / ~1.88x)."""
    with torch.no_grad():
        for p in params:
            st = optimizer.state.get(p)
            if st:
                st["exp_avg"].mul_(a)
                st["exp_avg_sq"].mul_(a ** v_power)


def _zero_moments_keep_step(optimizer, params) -> None:
    """REJECTED reset: zero moments but keep step (the 3DGS pattern; ~16x first update)."""
    with torch.no_grad():
        for p in params:
            st = optimizer.state.get(p)
            if st:
                for k, v in st.items():
                    if k != "step":
                        v.zero_()
