# SPDX-License-Identifier: Apache-2.0
"""Optimizer-state policies: numerics against hand-computed expectations, every torch variant keeps
training, untouched state is bit-identical, shape changes reset, and the update-size behaviour
that decides what `attenuate` means (docs/optim.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from hotweights import optim
from hotweights.optim import POLICIES, apply_policy, apply_policy_named

from utils import cpu_and_cuda  # tests/ is on sys.path under pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers ---


def _model(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m.to(device)


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g).to(dev)
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _snapshot(opt):
    return {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for p, st in opt.state.items()
    }


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device, k
        assert torch.equal(a[k], b[k]), k


# name -> (factory(params, device), devices it runs on)
VARIANTS = {
    "adam": lambda ps, d: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "adam-foreach": lambda ps, d: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps, d: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adam-amsgrad": lambda ps, d: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adam-capturable": lambda ps, d: torch.optim.Adam(ps, lr=1e-2, capturable=True),
    "adamw": lambda ps, d: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-foreach-amsgrad": lambda ps, d: torch.optim.AdamW(ps, lr=1e-2, foreach=True, amsgrad=True),
    "adamw-fused-amsgrad": lambda ps, d: torch.optim.AdamW(ps, lr=1e-2, fused=True, amsgrad=True),
    "adamw-capturable-foreach": lambda ps, d: torch.optim.AdamW(ps, lr=1e-2, capturable=True, foreach=True),
    "sgd-momentum": lambda ps, d: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, foreach=False),
    "sgd-nesterov-foreach": lambda ps, d: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, foreach=True),
    "sgd-fused": lambda ps, d: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "sgd-plain": lambda ps, d: torch.optim.SGD(ps, lr=1e-2),
}
CUDA_ONLY = {"adam-capturable", "adamw-capturable-foreach"}  # capturable is not supported on CPU


def _make(variant, model, device):
    if variant in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{variant}: torch supports capturable only on CUDA")
    return VARIANTS[variant](model.parameters(), device)


# --- numerical effect of each policy ---


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("variant", ["adam", "adam-fused", "adamw-foreach-amsgrad", "adam-capturable"])
def test_adam_attenuate_scales_first_moment_only(device, variant):
    model = _model(device)
    opt = _make(variant, model, device)
    _train(model, opt, 5)
    w = model[0].weight
    before = _snapshot(opt)[id(w)]
    objs = {k: v for k, v in opt.state[w].items()}
    rep = apply_policy(opt, [w], "attenuate", 0.5)
    st = opt.state[w]
    assert all(st[k] is objs[k] for k in objs)  # same tensors, mutated in place
    torch.testing.assert_close(st["exp_avg"], before["exp_avg"] * 0.5, rtol=0, atol=0)
    assert torch.equal(st["exp_avg_sq"], before["exp_avg_sq"])
    if "max_exp_avg_sq" in before:
        assert torch.equal(st["max_exp_avg_sq"], before["max_exp_avg_sq"])
    assert torch.equal(st["step"], before["step"]) and st["step"].dtype == before["step"].dtype
    assert rep.params == {"attenuate": 1} and rep.tensors == {"attenuate": 1}
    assert rep.attenuation == 0.5 and rep.optimizer == type(opt).__name__


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("variant", ["adam", "adam-fused", "adamw-foreach-amsgrad", "adam-capturable"])
def test_adam_reset_step_zeroes_step_in_place(device, variant):
    model = _model(device)
    opt = _make(variant, model, device)
    _train(model, opt, 5)
    w = model[2].weight
    before = _snapshot(opt)[id(w)]
    step = opt.state[w]["step"]
    rep = apply_policy(opt, [w], "reset_step")
    st = opt.state[w]
    assert st["step"] is step and float(step) == 0.0
    assert step.dtype == before["step"].dtype and step.device == before["step"].device
    # capturable/fused keep step on the parameter's device; the default keeps it on the CPU
    expect_dev = w.device if ("capturable" in variant or "fused" in variant) else torch.device("cpu")
    assert step.device.type == expect_dev.type
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if k in before:
            assert torch.equal(st[k], before[k]), k
    assert rep.tensors == {"reset_step": 1}
    # Adam-Rel: the next bias-corrected first moment is m/(1-b1) -> a small, finite update
    _train(model, opt, 1)
    assert float(opt.state[w]["step"]) == 1.0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("variant", ["adam", "adam-foreach", "adam-fused", "adamw-fused-amsgrad",
                                     "adamw-capturable-foreach"])
def test_adam_reset_is_exactly_a_fresh_optimizer(device, variant):
    model = _model(device)
    opt = _make(variant, model, device)
    _train(model, opt, 5)
    w = model[0].weight
    objs = dict(opt.state[w])
    rep = apply_policy(opt, [w], "reset")
    assert all(opt.state[w][k] is objs[k] for k in objs)  # zeroed in place (CUDA graphs stay valid)
    assert float(opt.state[w]["step"]) == 0 and not any(opt.state[w][k].any() for k in objs if k != "step")
    assert rep.params == {"reset": 1} and rep.tensors == {"reset": len(objs)}

    twin = torch.nn.Parameter(w.detach().clone())
    fresh = VARIANTS[variant]([twin], device)
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(7)).to(device)
    for o, p in ((opt, w), (fresh, twin)):
        o.zero_grad(set_to_none=True)
        p.grad = grad.clone()
        o.step()
    assert torch.equal(w, twin)  # bit for bit the lazy-initialised first step
    _assert_state_equal(opt.state[w], fresh.state[twin])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_sgd_attenuate_and_reset_step(device):
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    _train(model, opt, 4)
    w = model[0].weight
    buf = opt.state[w]["momentum_buffer"]
    before = buf.clone()
    rep = apply_policy(opt, [w], "attenuate", 0.25)
    assert opt.state[w]["momentum_buffer"] is buf
    torch.testing.assert_close(buf, before * 0.25, rtol=0, atol=0)
    assert rep.tensors == {"attenuate": 1}
    before = buf.clone()
    rep = apply_policy(opt, [w], "reset_step")  # SGD has no step: nothing to restart
    assert torch.equal(buf, before) and rep.params == {"reset_step": 1} and rep.tensors == {"reset_step": 0}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dampening,fused,how", [
    (0.1, False, "removed"),  # the zero-buffer first step would be (1 - d) g, not g
    (0.0, False, "zeroed"),   # same first step as a fresh optimizer, tensor kept
    (0.0, True, "zeroed"),
    (0.1, True, "zeroed"),    # Note [fused SGD]: cannot remove; first buffer is (1 - d) g
])
def test_sgd_reset(device, dampening, fused, how):
    model = _model(device)
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=dampening, fused=fused)  # noqa: E731
    opt = make(model.parameters())
    _train(model, opt, 4)
    w, b = model[0].weight, model[0].bias
    buf = opt.state[w]["momentum_buffer"]
    rep = apply_policy(opt, [w, b], "reset")
    assert rep.params == {"reset": 2} and rep.tensors == {"reset": 2}
    if how == "removed":
        assert w not in opt.state and b not in opt.state
    else:
        assert opt.state[w]["momentum_buffer"] is buf and not buf.any()
    twin = torch.nn.Parameter(w.detach().clone())
    fresh = make([twin])
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(device)
    _train(model, opt, 0)
    for o, p in ((opt, w), (fresh, twin)):
        o.zero_grad(set_to_none=True)
        p.grad = g.clone()
    model[0].bias.grad = torch.zeros_like(b)
    model[2].weight.grad = torch.zeros_like(model[2].weight)
    model[2].bias.grad = torch.zeros_like(model[2].bias)
    opt.step()
    fresh.step()
    got, ref = opt.state[w]["momentum_buffer"], fresh.state[twin]["momentum_buffer"]
    if dampening and fused:
        torch.testing.assert_close(got, ref * (1 - dampening))
    else:
        assert torch.equal(w, twin) and torch.equal(got, ref)


@pytest.mark.parametrize("policy", POLICIES)
def test_sgd_without_momentum_has_nothing_to_do(policy):
    model = _model("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt, 2)
    rep = apply_policy(opt, list(model.parameters()), policy)
    assert rep.no_state == 4 and rep.params == {} and len(opt.state) == 0


def test_preserve_touches_nothing():
    model = _model("cpu")
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt, 3)
    before = _snapshot(opt)
    rep = apply_policy(opt, list(model.parameters()), "preserve")
    after = _snapshot(opt)
    for k in before:
        _assert_state_equal(before[k], after[k])
    assert rep.params == {"preserve": 4} and rep.tensors == {"preserve": 0}


# --- every variant keeps training after every policy; untouched state; round trip ---


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_continues_and_round_trips(device, policy, variant):
    model = _model(device)
    opt = _make(variant, model, device)
    _train(model, opt, 3)
    changed = [model[0].weight, model[2].bias]
    untouched = [model[0].bias, model[2].weight]
    before = _snapshot(opt)
    n_state = len(opt.state)
    apply_policy(opt, changed, policy, 0.5)
    for p in untouched:  # bit for bit, and no entries created
        if id(p) in before:
            _assert_state_equal(opt.state[p], before[id(p)])
    assert len(opt.state) <= n_state

    _train(model, opt, 4, seed=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p in model.parameters():
        st = opt.state.get(p)
        if st and "exp_avg" in st:
            assert "step" in st  # never moments without step
            assert st["step"].dtype == before[id(p)]["step"].dtype
            assert st["step"].device == before[id(p)]["step"].device

    # the state after a policy survives torch.save -> torch.load(weights_only) -> load_state_dict
    apply_policy(opt, changed, policy, 0.5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2 = _model(device)
    model2.load_state_dict(model.state_dict())
    opt2 = _make(variant, model2, device)
    opt2.load_state_dict(sd)
    _train(model, opt, 2, seed=3)
    _train(model2, opt2, 2, seed=3)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)


# --- shape changes ---


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("listed", [True, False], ids=["listed", "detected"])
@pytest.mark.parametrize("variant", ["adam", "adamw-fused-amsgrad", "sgd-fused", "sgd-momentum"])
def test_shape_change_resets(device, listed, variant):
    model = _model(device)
    opt = _make(variant, model, device)
    key = "momentum_buffer" if variant.startswith("sgd") else "exp_avg"
    _train(model, opt, 3)
    head = model[2]
    with torch.no_grad():  # a version that grows the output layer: new shape, same Parameter
        head.weight.data = torch.randn(4, 5, device=device)
        head.bias.data = torch.randn(4, device=device)
    head.out_features = 4
    other = model[0].weight
    before_other = _snapshot(opt)[id(other)]
    if listed:
        rep = apply_policy(opt, [other], "attenuate", 0.5, shape_changed=[head.weight, head.bias])
        assert rep.shape_reset == {"#2": "listed in shape_changed", "#3": "listed in shape_changed"}
    else:
        rep = apply_policy(opt, [other, head.weight, head.bias], "attenuate", 0.5)
        assert rep.shape_reset["#2"] == f"{key} shape (3, 5) != parameter shape (4, 5)"
    n_state = len(before_other)
    assert rep.params == {"attenuate": 1, "reset": 2} and rep.tensors["reset"] == 2 * n_state
    if variant == "sgd-fused":  # Note [fused SGD]: a zero buffer of the new shape, not removed
        assert opt.state[head.weight]["momentum_buffer"].shape == (4, 5)
        assert not opt.state[head.weight]["momentum_buffer"].any()
    else:
        assert head.weight not in opt.state and head.bias not in opt.state
    torch.testing.assert_close(opt.state[other][key], before_other[key] * 0.5)
    _train(model, opt, 2)
    assert opt.state[head.weight][key].shape == (4, 5)


# --- errors ---


def test_errors_name_the_problem():
    model = _model("cpu")
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, 1)
    stranger = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(2, 2\)\) is not in any param group of this Adam"):
        apply_policy(opt, [stranger], "reset")
    with pytest.raises(ValueError, match=r"opt_policy \(argument\)='zero'.*expected one of preserve, reset"):
        apply_policy(opt, [model[0].weight], "zero")
    with pytest.raises(ValueError, match=r"opt_attenuation \(argument\)='1.5'.*expected a number <= 1"):
        apply_policy(opt, [model[0].weight], "attenuate", 1.5)
    with pytest.raises(ValueError, match=r"opt_attenuation \(argument\)='0'.*expected a number > 0"):
        apply_policy(opt, [model[0].weight], "attenuate", 0)
    with pytest.raises(TypeError, match=r"params\[0\] is a str"):
        apply_policy(opt, ["0.weight"], "reset")
    with pytest.raises(ValueError, match=r"attenuation=True: expected a number, not a bool"):
        apply_policy(opt, [model[0].weight], "attenuate", True)
    with pytest.raises(ValueError, match=r"warmup_steps=True: expected a number, not a bool"):
        apply_policy(opt, [model[0].weight], "reset", warmup_steps=True)
    # a partial state (the earlier project's bug: moments without step) is refused, reset rebuilds it
    del opt.state[model[0].weight]["step"]
    good = model[2].weight
    before = opt.state[good]["exp_avg"].clone()
    with pytest.raises(ValueError, match=r"#0: Adam state lacks \['step'\]"):
        apply_policy(opt, [good, model[0].weight], "attenuate")
    assert torch.equal(opt.state[good]["exp_avg"], before)  # all checks run before any change
    rep = apply_policy(opt, [model[0].weight], "reset")
    assert model[0].weight not in opt.state and rep.tensors == {"reset": 2}
    _train(model, opt, 1)


def test_unknown_optimizer_lists_what_is_supported():
    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p].setdefault("trace", torch.zeros_like(p))

    model = _model("cpu")
    opt = Custom(model.parameters())
    opt.step()
    assert apply_policy(opt, [model[0].weight], "preserve").params == {"preserve": 1}
    for policy in ("reset", "attenuate", "reset_step"):
        with pytest.raises(ValueError, match=rf"policy '{policy}' is not defined for Custom: supported are Adam and AdamW"):
            apply_policy(opt, [model[0].weight], policy)


def test_unknown_optimizer_state_is_not_judged_by_shape():
    model = _model("cpu")
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)  # factored moments: row/col shapes
    _train(model, opt, 2)
    w = model[0].weight
    before = _snapshot(opt)[id(w)]
    assert apply_policy(opt, [w], "preserve").shape_reset == {}
    _assert_state_equal(opt.state[w], before)
    with pytest.raises(ValueError, match=r"#0: its shape changed, but an empty state is not known to be valid for Adafactor"):
        apply_policy(opt, [], "preserve", shape_changed=[w])
    _assert_state_equal(opt.state[w], before)


@pytest.mark.parametrize("name", optim._LAZY_RESET_NAMES)
def test_reset_is_safe_for_other_lazy_torch_optimizers(name):
    model = _model("cpu")
    opt = getattr(torch.optim, name)(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    rep = apply_policy(opt, [model[0].weight], "reset")
    assert rep.params == {"reset": 1} and model[0].weight not in opt.state
    _train(model, opt, 2)
    assert opt.state[model[0].weight]  # re-initialised lazily
    with pytest.raises(ValueError, match="not defined for " + name):
        apply_policy(opt, [model[0].weight], "attenuate")


def test_env_setting_and_explicit_argument(monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_OPT_POLICY", "reset_step")
    monkeypatch.setenv("HOTWEIGHTS_OPT_ATTENUATION", "0.25")
    model = _model("cpu")
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, 3)
    w = model[0].weight
    assert apply_policy(opt, [w]).policy == "reset_step" and float(opt.state[w]["step"]) == 0
    m = opt.state[w]["exp_avg"].clone()
    rep = apply_policy(opt, [w], "attenuate")  # explicit policy, attenuation from the environment
    assert rep.attenuation == 0.25
    torch.testing.assert_close(opt.state[w]["exp_avg"], m * 0.25)


def test_named_parameters_and_report_json():
    model = _model("cpu")
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt, 2)
    with torch.no_grad():
        model[2].bias.data = torch.zeros(7)
    rep = apply_policy_named(opt, model.named_parameters(), ["0.weight", "2.bias"], "attenuate")
    assert rep.shape_reset == {"2.bias": "exp_avg shape (3,) != parameter shape (7,)"}
    assert rep.params == {"attenuate": 1, "reset": 1}
    d = json.loads(rep.to_json())
    assert d["policy"] == "attenuate" and d["tensors"] == {"attenuate": 1, "reset": 3}
    with pytest.raises(ValueError, match=r"1 name\(s\) are not parameters of the model: \['nope'\]"):
        apply_policy_named(opt, model.named_parameters(), ["nope"], "reset")


def test_params_without_state_are_counted_not_created():
    model = _model("cpu")
    opt = torch.optim.Adam(model.parameters())
    rep = apply_policy(opt, list(model.parameters()), "attenuate")
    assert rep.no_state == 4 and rep.params == {} and len(opt.state) == 0


# --- LR warm-up after reset ---


def test_reset_warmup_is_an_lr_multiplier_for_reset_params_only():
    n = 4
    model = _model("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, 3)
    w, kept = model[0].weight, model[0].bias
    rep = apply_policy(opt, [w], "reset", warmup_steps=n)
    assert rep.warmup_steps == n and optim.warmup_remaining(opt) == n
    twin = torch.nn.Parameter(w.detach().clone())
    ref = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1)
    kept_twin = torch.nn.Parameter(kept.detach().clone())
    kept_ref = torch.optim.AdamW([kept_twin], lr=1e-2, weight_decay=0.1)
    kept_ref.state[kept_twin] = {k: v.clone() for k, v in opt.state[kept].items()}
    gen = torch.Generator().manual_seed(5)
    for k in range(1, n + 3):
        g = torch.randn(w.shape, generator=gen)
        opt.zero_grad(set_to_none=True)
        w.grad = g.clone()
        kept.grad = torch.ones_like(kept)
        opt.step()
        ref.param_groups[0]["lr"] = 1e-2 * min(1.0, k / n)
        twin.grad = g.clone()
        ref.step()
        kept_twin.grad = torch.ones_like(kept)
        kept_ref.step()
        torch.testing.assert_close(w, twin, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(kept, kept_twin, rtol=0, atol=0)  # not reset: full rate
        assert optim.warmup_remaining(opt) == max(0, n - k)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


# --- update size after the swap: why attenuate scales only the first moment ---


def _stationary_adam(n=4096, warm=2000, seed=0):
    """Adam at steady state under stationary gradients N(0.1, 1) (the reference §3.3 setup)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(n))
    opt = torch.optim.Adam([p], lr=1.0)
    for _ in range(warm):
        p.grad = 0.1 + torch.randn(n, generator=gen)
        opt.step()
    return p, opt


def _direct_ratios(policy_fn, steps=100, seed=1):
    """Mean |update| after `policy_fn` / after preserve, same gradients, the true distribution."""
    sizes = []
    for fn in (None, policy_fn):
        p, opt = _stationary_adam()
        if fn is not None:
            fn(opt, [p])
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(steps):
            with torch.no_grad():
                p.zero_()
            p.grad = 0.1 + torch.randn(p.shape, generator=gen)
            opt.step()
            out.append(float(p.detach().abs().mean()))
        sizes.append(out)
    return [a / b for a, b in zip(sizes[1], sizes[0])]


@pytest.mark.slow
def test_attenuate_never_overshoots_but_scaling_both_moments_does():
    att = _direct_ratios(lambda o, ps: apply_policy(o, ps, "attenuate", 0.5))
    naive = _direct_ratios(lambda o, ps: optim._attenuate_both_moments(o, ps, 0.5))
    assert att[0] < 0.8  # damped first step (~0.62 at a=0.5)
    assert max(att) <= 1.05  # ... and never larger than preserve afterwards
    assert max(naive) > 1.2  # m*=a, v*=a: the denominator stays too small for ~1000 steps
    assert naive[0] < 1.0  # (its first step looks conservative, which is why it is tempting)

    # opt-check's measurement (gradients modelled from the state itself) tells the same story
    _, opt = _stationary_adam()
    sd = opt.state_dict()
    r = optim.update_size_ratios(
        sd, {"attenuate": lambda o, ps: apply_policy(o, ps, "attenuate", 0.5),
             "naive": lambda o, ps: optim._attenuate_both_moments(o, ps, 0.5)},
        steps=100, sample=4096,
    )
    assert abs(r["attenuate"][0] - att[0]) < 0.1
    assert max(r["attenuate"]) <= 1.05 and max(r["naive"]) > 1.2


@pytest.mark.slow
def test_reset_and_reset_step_first_updates():
    reset = _direct_ratios(lambda o, ps: apply_policy(o, ps, "reset"), steps=10)
    rel = _direct_ratios(lambda o, ps: apply_policy(o, ps, "reset_step"), steps=10)
    assert reset[0] > 3  # Adam's first step ~ lr * sign(g): ~5x the steady update at SNR 0.1
    assert max(rel) < 0.5  # Adam-Rel: bias correction re-inflates v_hat more than m_hat


def test_predicted_ratio_in_report():
    _, opt = _stationary_adam(n=1024, warm=300)
    p = opt.param_groups[0]["params"][0]
    rep = apply_policy(opt, [p], "attenuate", 0.5, predict_steps=10)
    pr = rep.predicted_update_ratio
    assert pr["steps"] == 10 and 0.4 < pr["next"] < 0.8 and pr["peak"] <= 1.05
    assert apply_policy(opt, [p], "reset", predict_steps=3).predicted_update_ratio["next"] > 2
    assert apply_policy(opt, [p], "preserve", predict_steps=3).predicted_update_ratio is None


# --- opt-check ---


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTWEIGHTS_")}
    r = subprocess.run([sys.executable, "-m", "hotweights", "opt-check", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return r


def test_opt_check_synthetic():
    r = _cli("--policy", "attenuate", "--attenuation", "0.5", "--horizon", "20", "--sample", "4096")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "synthetic AdamW state" in out and "* attenuate a=0.5" in out
    for name in POLICIES:
        assert name in out


def test_opt_check_checkpoint(tmp_path):
    model = _model("cpu")
    opt = torch.optim.Adam(
        [{"params": [model[0].weight, model[0].bias]}, {"params": list(model[2].parameters()), "lr": 1e-3}],
        lr=1e-2, amsgrad=True,
    )
    _train(model, opt, 20)
    path = tmp_path / "optimizer.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 20}, path)
    r = _cli("--checkpoint", str(path), "--json", "--horizon", "10", "--sample", "2048", "--steps", "1,5")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["source"].endswith("[optimizer]") and d["optimizer"] == "Adam/AdamW"
    assert [g["params"] for g in d["groups"]] == [2, 2]
    # amsgrad: 4 tensors per param; reset zeroes all, attenuate scales exp_avg, reset_step zeroes step
    assert d["groups"][0]["tensors"] == {"preserve": 0, "reset": 8, "attenuate": 2, "reset_step": 2}
    pol = d["policies"]
    assert pol["reset"]["tensors"] == 16 and pol["attenuate"]["tensors"] == 4
    assert pol["preserve"]["ratio"] == {"1": 1.0, "5": 1.0}
    assert pol["attenuate"]["ratio"]["1"] < 1 and pol["reset"]["ratio"]["1"] > 1

    r = _cli("--checkpoint", str(path), "--params", "0-1", "--json", "--horizon", "2", "--sample", "256")
    assert r.returncode == 0, r.stderr
    assert [g["params"] for g in json.loads(r.stdout)["groups"]] == [2, 0]


def test_opt_check_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Opaque()}, path)
    r = _cli("--checkpoint", str(path))
    assert r.returncode == 1
    assert "cannot be read with torch.load(weights_only=True)" in r.stderr


class _Opaque:
    pass
