# SPDX-License-Identifier: Apache-2.0
"""register_hotweights' handle against what users do to models and handles: callbacks that
raise, closed handles, non-contiguous and replaced tensors, optimizers over part of the model,
reshapes under the default policy, interrupted forwards, commits from inside a forward, and
bad arguments. Publisher and subscriber share this process (embedded coordinator); every
result is compared with the publisher's tensors bit for bit."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import hotweights
from hotweights import UpdateError

from replicate_children import make_model
from utils import fast_coord, same_state  # noqa: F401 (fast_coord: the coord fixture)

def bump(model: torch.nn.Module, by: float = 1.0) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


class _Pair:
    """A publisher of ``src`` and a handle on ``dst``, closed at the end."""

    def __init__(self, coord, src, dst, **kw):
        self.src, self.dst = src, dst
        self.pub = hotweights.Publisher(src, name="m", endpoint=coord, bucket_bytes=8192,
                                        serve_late=False)
        kw = {"commit": "manual", **kw}
        self.h = dst.register_hotweights(name="m", endpoint=coord, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.close()
        self.pub.close()


def test_a_raising_callback_neither_fails_the_forward_nor_skips_the_next(coord):
    with _Pair(coord, make_model(1), make_model(2), commit="on_forward", swap="storage") as p:
        seen = []

        def broken(info):
            raise RuntimeError("a broken logging callback")

        p.h.on_commit(broken)
        p.h.on_commit(lambda info: seen.append(info.version))
        v = p.pub.publish("v1").version
        p.h.wait(v, timeout=30, apply=False)
        p.dst(torch.randn(2, 32))  # applies v first, then runs
        assert p.h.version == v and seen == [v] and same_state(p.dst, p.src)
        assert "a broken logging callback" in p.h.last_error


def test_wait_and_commit_on_a_closed_handle_raise(coord):
    with _Pair(coord, make_model(3), make_model(4)) as p:
        errors = []

        def waiter():
            try:
                p.h.wait(timeout=30)
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        p.h.close()
        t.join(10)
        assert not t.is_alive()
        assert len(errors) == 1 and "closed handle" in str(errors[0])
        with pytest.raises(RuntimeError, match="commit on a closed handle"):
            p.h.commit()
        with pytest.raises(RuntimeError, match="closed handle"):
            p.h.wait(timeout=1)


def test_inplace_into_a_non_contiguous_parameter(coord):
    dst = make_model(6)
    with torch.no_grad():  # same values, transposed storage
        dst[0].weight = torch.nn.Parameter(dst[0].weight.detach().t().contiguous().t())
    assert not dst[0].weight.is_contiguous()
    with _Pair(coord, make_model(5), dst, swap="inplace") as p:
        for label in ("v1", "v2"):
            if label == "v2":
                bump(p.src)
            v = p.pub.publish(label).version
            assert p.h.wait(v, timeout=30) == v
            assert same_state(p.dst, p.src) and not p.dst[0].weight.is_contiguous()


def test_tensors_replaced_after_register_are_the_ones_updated(coord):
    src = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    dst = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    src[1].running_mean.normal_()
    with _Pair(coord, src, dst, swap="storage") as p:
        p.h.wait(p.pub.publish("v1").version, timeout=30)
        # the user replaces every tensor object (same values): load_state_dict(assign=True)
        fresh = {k: t.clone() for k, t in dst.state_dict().items()}
        dst.load_state_dict(fresh, assign=True)
        bump(src)
        v = p.pub.publish("v2").version
        assert p.h.wait(v, timeout=30) == v and same_state(dst, src)
        # a dtype conversion replaces the buffers: a float64 version is now the right one
        src.double()
        dst.double()
        bump(src)
        v = p.pub.publish("v3").version
        assert p.h.wait(v, timeout=30) == v and same_state(dst, src) and p.h.refused == {}
        assert dst[1].running_mean.dtype == torch.float64


def test_a_model_moved_after_register_is_refused_by_name(coord):
    with _Pair(coord, make_model(7), make_model(8)) as p:
        p.h.wait(p.pub.publish("v1").version, timeout=30)
        p.dst.to("meta")
        bump(p.src)
        with pytest.raises(hotweights.PublishError, match="rejected by every live expected"):
            p.pub.publish("v2", timeout=30)  # its only subscriber refused it
        with pytest.raises(UpdateError, match=r"'0.weight' is on meta, this subscriber receives "
                                              r"for cpu"):
            p.h.wait(2, timeout=30)


def test_optimizer_over_part_of_the_model(coord):
    """A frozen base and a trainable head: the policy resets only the head's state, the
    base's tensors are swapped too, and the version is recorded."""
    dst = make_model(10)
    head = list(dst[4].parameters())
    opt = torch.optim.AdamW(head, lr=1e-2)
    dst(torch.randn(4, 32)).sum().backward()
    opt.step()
    with _Pair(coord, make_model(9), dst, swap="storage", optimizer=opt, opt_policy="reset") as p:
        v = p.pub.publish("v1").version
        assert p.h.wait(v, timeout=30) == v and same_state(dst, p.src)
        rep = p.h.last_commit.optimizer
        assert "error" not in rep and p.h.last_error is None
        assert all(int(opt.state[q]["step"]) == 0 and not opt.state[q]["exp_avg"].any()
                   for q in head)


def test_an_optimizer_policy_that_fails_is_reported_and_the_version_stays_applied(coord):
    dst = make_model(12)
    opt = torch.optim.Adam(dst.parameters(), lr=1e-2)
    dst(torch.randn(4, 32)).sum().backward()
    opt.step()
    opt.state[dst[0].weight]["not_adams"] = torch.zeros(1)  # a state reset refuses to touch
    with _Pair(coord, make_model(11), dst, swap="storage", optimizer=opt, opt_policy="reset") as p:
        v = p.pub.publish("v1").version
        assert p.h.wait(v, timeout=30) == v and p.h.version == v and same_state(dst, p.src)
        assert "not_adams" in p.h.last_commit.optimizer["error"]
        assert "optimizer policy failed" in p.h.last_error


def test_a_reshape_under_the_default_policy_resets_state_and_grad(coord):
    state = {"x": torch.randn(4, 8), "y": torch.randn(3)}
    model = torch.nn.ParameterDict({"x": torch.nn.Parameter(torch.zeros(4, 8)),
                                    "y": torch.nn.Parameter(torch.zeros(3))})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=False)
        (model["x"].sum() + model["y"].sum()).backward()
        opt.step()

    step()
    pub = hotweights.Publisher(lambda: state, name="r", endpoint=coord, serve_late=False)
    h = model.register_hotweights(name="r", endpoint=coord, commit="manual", swap="storage",
                                  accept_reshape=True, optimizer=opt)  # opt_policy: preserve
    try:
        h.wait(pub.publish("v1").version, timeout=30)
        step()
        exp_avg_y = opt.state[model["y"]]["exp_avg"].clone()
        state["x"] = torch.randn(6, 8)  # v2 reshapes x
        h.wait(pub.publish("v2").version, timeout=30)
        assert tuple(model["x"].shape) == (6, 8) and model["x"].grad is None
        assert "x" not in {n for n, q in model.named_parameters() if opt.state.get(q)}
        assert torch.equal(opt.state[model["y"]]["exp_avg"], exp_avg_y)  # preserved
        step()  # trains on
        assert tuple(opt.state[model["x"]]["exp_avg"].shape) == (6, 8)
    finally:
        h.close()
        pub.close()


class _InterruptOnce(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 16)
        self.armed = False

    def forward(self, x):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return self.lin(x)


def test_a_forward_ended_by_keyboard_interrupt_does_not_lock_the_handle(coord):
    src, dst = _InterruptOnce(), _InterruptOnce()
    with _Pair(coord, src, dst, commit="on_forward") as p:
        dst.armed = True
        with pytest.raises(KeyboardInterrupt):
            dst(torch.randn(2, 32))
        v = p.pub.publish("v1").version
        p.h.wait(v, timeout=30, apply=False)
        dst(torch.randn(2, 32))  # the next forward applies it
        assert p.h.version == v and same_state(dst, src)
        dst.armed = True
        with pytest.raises(KeyboardInterrupt):
            dst(torch.randn(2, 32))
        bump(src)
        v = p.pub.publish("v2").version
        assert p.h.wait(v, timeout=10) == v and same_state(dst, src)  # an explicit commit too


def test_commit_from_inside_the_forward_raises_instead_of_deadlocking(coord):
    with _Pair(coord, make_model(13), make_model(14)) as p:
        p.h.wait(p.pub.publish("v1").version, timeout=30, apply=False)
        errors = []

        def commit_inside(module, args):
            try:
                p.h.commit(timeout=5)
            except RuntimeError as e:
                errors.append(str(e))

        hook = p.dst[2].register_forward_pre_hook(commit_inside)
        p.dst(torch.randn(2, 32))
        hook.remove()
        assert errors and "inside a forward" in errors[0] and p.h.version is None
        assert p.h.commit(timeout=5) == 1 and same_state(p.dst, p.src)


def test_bad_arguments_name_the_value(coord):
    m = make_model(15)
    hooks = (len(m._forward_pre_hooks), len(m._forward_hooks))
    fds = len(os.listdir("/proc/self/fd"))
    cases = [
        (dict(name=None), ValueError, r"name=None, expected a non-empty string"),
        (dict(kv_layers=-1), ValueError, r"kv_layers=-1, expected None or an integer >= 0"),
        (dict(kv_layers="4"), ValueError, r"kv_layers='4'"),
        (dict(kv_layers=True), ValueError, r"kv_layers=True"),
        (dict(consumer=[]), ValueError, r"consumer=\[\] selects no tensor"),
        (dict(consumer=["layers.*"]), ValueError, r"consumer pattern 'layers.\*' selects none"),
        (dict(consumer=[3]), TypeError, r"consumer pattern 3, expected a non-empty string"),
        (dict(optimizer="adam"), TypeError, r"optimizer is a str"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            m.register_hotweights(**{"name": "m", "endpoint": coord, **kw})
    assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == hooks
    assert len(os.listdir("/proc/self/fd")) == fds
    h = m.register_hotweights(name="m", endpoint=coord, consumer="0.*")  # one pattern
    try:
        assert h._sub.consumer == ["0.*"]
    finally:
        h.close()
    assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == hooks


def test_a_subscriber_takes_a_parameter_dict_as_its_targets(coord):
    """An nn.ParameterDict is a mapping and callable (a Module): it is taken as the mapping."""
    from hotweights.replicate import Subscriber

    pd = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(3))})
    sub = Subscriber(pd, name="m", endpoint=coord)
    try:
        assert list(sub.targets) == ["w"]
    finally:
        sub.close()


def test_storage_swap_refuses_tensors_that_share_a_storage(coord):
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            flat = torch.zeros(96)
            self.a = torch.nn.Parameter(flat[:64].view(8, 8))
            self.b = torch.nn.Parameter(flat[64:].view(32))

    with pytest.raises(ValueError, match=r"'a' and 'b' share one storage; swap='storage' would"):
        Flat().register_hotweights(name="m", endpoint=coord, swap="storage")
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    tied[1].weight = tied[0].weight  # one object under two names (a tied embedding): fine
    h = tied.register_hotweights(name="m", endpoint=coord, swap="storage")
    h.close()


def test_one_handle_per_model_and_name(coord):
    m = make_model(17)
    h = m.register_hotweights(name="m", endpoint=coord, commit="manual")
    try:
        with pytest.raises(ValueError, match=r"already registered under name='m'; close that"):
            m.register_hotweights(name="m", endpoint=coord)
        other = m.register_hotweights(name="other", endpoint=coord)  # another name: fine
        other.close()
    finally:
        h.close()
    m.register_hotweights(name="m", endpoint=coord).close()  # closed: free again


def _xy():
    return torch.nn.ParameterDict({"x": torch.nn.Parameter(torch.zeros(4, 8)),
                                   "y": torch.nn.Parameter(torch.zeros(3))})


def test_a_late_subscriber_that_accepts_reshapes_takes_the_reshaped_full_send(coord):
    """A replica registered after the publisher reshaped a tensor gets a full send (which
    lists no reshapes): with accept_reshape it takes it, not refuses it forever."""
    state = {"x": torch.randn(4, 8), "y": torch.randn(3)}
    pub = hotweights.Publisher(lambda: state, name="r", endpoint=coord)
    early, late = _xy(), _xy()
    h0 = early.register_hotweights(name="r", endpoint=coord, commit="manual", swap="storage",
                                   accept_reshape=True)
    h1 = None
    try:
        h0.wait(pub.publish("v1").version, timeout=30)
        state["x"] = torch.randn(2, 16)
        h0.wait(pub.publish("v2").version, timeout=30)
        h1 = late.register_hotweights(name="r", endpoint=coord, commit="manual", swap="storage",
                                      accept_reshape=True)
        got = h1.wait(timeout=30)  # the catch-up the publisher serves it
        assert got >= 2 and h1.refused == {}
        assert torch.equal(late["x"].detach(), state["x"]) and torch.equal(late["y"].detach(), state["y"])
        assert [r[0] for r in h1.last_commit.reshaped] == ["x"]
    finally:
        h0.close()
        if h1 is not None:
            h1.close()
        pub.close()


def test_a_reshape_reported_is_a_reshape_here_not_another_subscribers(coord):
    """Subscribers on different bases share one plan: a tensor reshaped in another
    subscriber's delta is not a reshape for one that already holds the new shape (its grad
    and optimizer state stay)."""
    state = {"x": torch.randn(4, 8), "y": torch.randn(3)}
    pub = hotweights.Publisher(lambda: state, name="r", endpoint=coord, serve_late=False)
    ma, mb = _xy(), _xy()
    opt = torch.optim.Adam(ma.parameters(), lr=1e-3)
    a = ma.register_hotweights(name="r", endpoint=coord, commit="manual", swap="storage",
                               accept_reshape=True, optimizer=opt)
    b = mb.register_hotweights(name="r", endpoint=coord, commit="manual")  # refuses reshapes
    try:
        v1 = pub.publish("v1").version
        a.wait(v1, timeout=30)
        b.wait(v1, timeout=30)
        state["x"] = torch.randn(2, 16)  # v2: A takes the reshape, B refuses it
        a.wait(pub.publish("v2").version, timeout=30)
        (ma["x"].sum() + ma["y"].sum()).backward()
        opt.step()
        state["x"] = state["x"] + 1.0  # v3: new values, the same (new) shape; B still on v1
        v3 = pub.publish("v3").version
        a.wait(v3, timeout=30)
        assert a.last_commit.reshaped == []
        assert ma["x"].grad is not None and "exp_avg" in opt.state[ma["x"]]
        assert torch.equal(ma["x"].detach(), state["x"])
    finally:
        a.close()
        b.close()
        pub.close()
