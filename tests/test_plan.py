# SPDX-License-Identifier: Apache-2.0
"""Delta plans: property tests of packing and verification, consumer sets, deltas, round trip."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotweights import _C
from hotweights.manifest import Manifest
from hotweights.plan import (Plan, PlanError, SubscriberSpec, auto_bucket_bytes, consumer_mask,
                             make_plan, verify_plan)


def fake_manifest(sizes, seed=0, names=None, model="m"):
    rng = np.random.default_rng(seed)
    names = names or [f"layers.{i // 4}.p{i % 4}" for i in range(len(sizes))]
    return Manifest(names, ["uint8"] * len(sizes), [(s,) for s in sizes],
                    np.asarray(sizes, np.int64), rng.integers(0, 2**63, len(sizes)).astype(np.uint64),
                    model=model)


def bump(m, rows, seed=1):
    h = m.hashes.copy()
    h[list(rows)] ^= np.uint64(seed)
    return Manifest(m.names, m.dtypes, m.shapes, m.nbytes, h, model=m.model)


sizes_st = st.lists(st.integers(0, 5000), min_size=0, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=sizes_st, bucket_units=st.integers(1, 40), align_pow=st.integers(3, 9))
def test_packing_properties(sizes, bucket_units, align_pow):
    align = 1 << align_pow
    bucket = bucket_units * align
    r = _C.pack_buckets(np.asarray(sizes, np.int64), None, bucket, align)
    t, toff, ln = r["tensor"], r["tensor_offset"], r["length"]
    b, so, used = r["bucket"], r["slot_offset"], r["bucket_used"]
    # every byte of every tensor exactly once, in order
    for i, n in enumerate(sizes):
        rows = np.flatnonzero(t == i)
        assert ln[rows].sum() == n
        if n:
            assert toff[rows].tolist() == np.r_[0, np.cumsum(ln[rows])[:-1]].tolist()
    assert (so % align == 0).all() and (so + ln <= bucket).all() and (ln > 0).all()
    assert (np.diff(b) >= 0).all()  # bucket order
    for k in range(len(used)):
        rows = np.flatnonzero(b == k)
        ends = so[rows] + ln[rows]
        assert (so[rows][1:] >= ends[:-1]).all() and used[k] == ends.max()
    # deterministic
    r2 = _C.pack_buckets(np.asarray(sizes, np.int64), None, bucket, align)
    assert all(np.array_equal(r[k], r2[k]) for k in r)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, changed=st.sets(st.integers(0, 59)), bucket_units=st.integers(1, 30))
def test_plan_from_random_manifests_verifies(sizes, changed, bucket_units):
    old = fake_manifest(sizes)
    rows = [c for c in changed if c < len(sizes)]
    new = bump(old, rows)
    subs = [SubscriberSpec("a", old), SubscriberSpec("b", None, ["layers.1.*"]),
            SubscriberSpec("c", old, ["layers.0.p0", "layers.2.*"])]
    plan = make_plan(new, subs, bucket_units * 256)
    verify_plan(plan, new, subs)
    assert set(plan.tensors_for("a")) <= set(range(len(plan.names)))
    want_a = {new.names[r] for r in rows if sizes[r] > 0}
    assert {plan.names[i] for i in plan.tensors_for("a")} == want_a
    back = Plan.from_bytes(plan.to_bytes())
    verify_plan(back, new, subs)
    assert back.summary() == plan.summary()


def test_groups_keep_consumers_apart():
    m = fake_manifest([1000] * 8, names=[f"tp{i % 2}.w{i}" for i in range(8)])
    subs = [SubscriberSpec("rank0", None, ["tp0.*"]), SubscriberSpec("rank1", None, ["tp1.*"])]
    plan = make_plan(m, subs, 4096)
    for b in range(plan.num_buckets):
        (who,) = plan.consumers(b)
        names = {plan.names[i] for i in plan.piece_tensor[plan.pieces(b)]}
        assert all(n.startswith("tp0" if who == "rank0" else "tp1") for n in names)
    assert plan.bytes_for("rank0") == plan.bytes_for("rank1") == 4000


def test_delta_moves_only_changed_bytes():
    old = fake_manifest([4096] * 100)
    new = bump(old, [3, 50])
    plan = make_plan(new, [SubscriberSpec("s", old)], 1 << 20)
    assert plan.names == ["layers.0.p3", "layers.12.p2"] and plan.total_bytes == 8192
    full = make_plan(new, [SubscriberSpec("s", None)], 1 << 20)
    assert full.total_bytes == 409600


def test_large_tensor_split_and_alignment():
    m = fake_manifest([100, 10_000, 300])
    plan = make_plan(m, [SubscriberSpec("s")], 4096)
    verify_plan(plan, m, [SubscriberSpec("s")])
    big = plan.names.index("layers.0.p1")
    rows = np.flatnonzero(plan.piece_tensor == big)
    assert len(rows) == 3 and plan.piece_length[rows].sum() == 10_000
    assert (plan.piece_tensor_offset[rows] % 256 == 0).all()  # hashable piece boundaries
    assert plan.summary()["split_tensors"] == 1


def test_verify_catches_broken_plans():
    m = fake_manifest([1000, 2000, 3000])
    plan = make_plan(m, [SubscriberSpec("s")], 4096)
    bad = Plan.from_bytes(plan.to_bytes())
    bad.piece_length = bad.piece_length.copy()
    bad.piece_length[0] -= 8
    with pytest.raises(PlanError, match="gap at byte|cover"):
        verify_plan(bad)
    bad = Plan.from_bytes(plan.to_bytes())
    bad.piece_slot_offset = bad.piece_slot_offset.copy()
    bad.piece_slot_offset[1] = 8
    with pytest.raises(PlanError, match="unaligned|overlap"):
        verify_plan(bad)
    bad = Plan.from_bytes(plan.to_bytes())
    bad.bucket_used = bad.bucket_used + 256
    with pytest.raises(PlanError, match="used_bytes"):
        verify_plan(bad)
    # a subscriber that would receive what it did not ask for
    with pytest.raises(PlanError, match="did not ask for"):
        verify_plan(plan, m, [SubscriberSpec("s", None, ["layers.0.p0"])])
    with pytest.raises(PlanError, match="not a hotweights plan"):
        Plan.from_bytes(b"\x80")


def test_reshape_is_reported_not_hidden():
    a = Manifest.from_state_dict({"w": torch.zeros(4, 4), "b": torch.zeros(4)})
    b = Manifest.from_state_dict({"w": torch.zeros(2, 8), "b": torch.ones(4)})
    plan = make_plan(b, [SubscriberSpec("s", a)], 4096)
    assert plan.reshaped == [("w", ("float32", (4, 4)), ("float32", (2, 8)))]
    assert set(plan.names) == {"w", "b"}


def test_consumer_mask_globs_and_exact_names():
    names = ["a.w", "a.b", "b.w", "c[0]"]
    assert consumer_mask(names, None).all() and consumer_mask(names, ["*"]).all()
    assert consumer_mask(names, ["a.*"]).tolist() == [True, True, False, False]
    assert consumer_mask(names, ["*.w", "a.b"]).tolist() == [True, True, True, False]
    assert consumer_mask(names, ["c[0]"]).tolist() == [False, False, False, False]  # glob class
    assert consumer_mask(names, ["c[[]0]"]).tolist() == [False, False, False, True]


def test_auto_bucket_bytes():
    assert auto_bucket_bytes(10 << 30, 4, 1 << 20) == 512 << 20       # preferred fits
    assert auto_bucket_bytes(1 << 30, 4, 1 << 20) == (int((1 << 30) * 0.9) // 4) // 256 * 256
    assert auto_bucket_bytes(100 << 30, 2, 2 << 30) == 2 << 30       # at least the largest tensor
    with pytest.raises(PlanError, match="slots=0"):
        auto_bucket_bytes(1 << 30, 0, 1)


def test_bad_arguments():
    m = fake_manifest([10])
    with pytest.raises(PlanError, match="bucket_bytes=100"):
        make_plan(m, [SubscriberSpec("s")], 100)
    with pytest.raises(PlanError, match="unique"):
        make_plan(m, [SubscriberSpec("s"), SubscriberSpec("s")], 4096)


def test_plans_read_from_bytes_are_checked_before_use():
    """A plan comes off the coordinator: anything its readers would index with is checked
    by from_bytes (not only by verify_plan, which receivers do not run)."""
    import msgpack

    m = fake_manifest([1000, 2000, 3000])
    plan = make_plan(m, [SubscriberSpec("a"), SubscriberSpec("b", None, ["layers.0.p0"])], 2048)
    d = msgpack.unpackb(plan.to_bytes(), raw=False, strict_map_key=False)

    def forged(**kw):
        return msgpack.packb({**d, **kw}, use_bin_type=True)

    i8 = lambda a: np.asarray(a, "<i8").tobytes()  # noqa: E731
    pb = np.frombuffer(d["piece_bucket"], "<i8")
    cases = [
        (forged(bucket_group=i8(np.full(len(d["bucket_used"]) // 8, 99))),
         "consumer group outside the plan"),
        (forged(piece_tensor=i8(np.full(len(pb), 99))), "tensor outside the plan"),
        (forged(piece_bucket=i8(pb[::-1])), "not in bucket order"),
        (forged(piece_length=i8([])), "piece columns differ in length"),
        (forged(align=0), "align=0"),
        (forged(names=5), "corrupt plan"),
    ]
    for data, msg in cases:
        with pytest.raises(PlanError, match=msg):
            Plan.from_bytes(data)
    assert Plan.from_bytes(plan.to_bytes()).num_buckets == plan.num_buckets


def test_consumer_mask_takes_one_pattern_as_a_string():
    names = ["layer0.w", "layer1.w", "head.w"]
    assert consumer_mask(names, "layer0.*").tolist() == [True, False, False]
    assert consumer_mask(names, "head.w").tolist() == [False, False, True]


def test_free_memory_names_a_bad_device():
    from hotweights.plan import free_memory

    assert free_memory("cpu") > 0
    with pytest.raises(PlanError, match=r"device 'bogus': expected 'cpu', 'cuda' or 'cuda:N'"):
        free_memory("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match=r"device 'cuda:0': this machine has 0 CUDA device"):
            free_memory("cuda:0")
