# SPDX-License-Identifier: Apache-2.0
"""Manifests: built from state dicts and safetensors, round trips, corrupt input, deltas."""

import json

import msgpack
import numpy as np
import pytest
import torch

from hotweights import ops
from hotweights.manifest import Manifest, ManifestError, diff

from utils import cpu_and_cuda


def _sd(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(100, 16, generator=g).to(device),
        "layers.0.w": torch.randn(16, 16, generator=g).to(torch.bfloat16).to(device),
        "layers.0.b": torch.zeros(16, dtype=torch.float16, device=device),
        "layers.1.w": torch.randint(0, 100, (7,), generator=g).to(device),
        "empty": torch.zeros(0, device=device),
    }


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_from_state_dict_hashes_where_tensors_live(device):
    sd = _sd(device)
    m = Manifest.from_state_dict(sd, model="toy", label="step-1")
    assert m.names == list(sd)
    assert m.dtypes == ["float32", "bfloat16", "float16", "int64", "float32"]
    assert m.shapes == [(100, 16), (16, 16), (16,), (7,), (0,)]
    assert m.nbytes.tolist() == [6400, 512, 32, 56, 0]
    for name, t in sd.items():
        assert m.entry(name).checksum == ops.checksum(t.cpu())  # same value on CPU and CUDA
    assert m.label == "step-1" and m.version is None and m.created > 0
    module = torch.nn.Linear(4, 3)
    mm = Manifest.from_state_dict(module)
    assert mm.names == ["weight", "bias"]


def test_roundtrip_msgpack_and_json(tmp_path):
    m = Manifest.from_state_dict(_sd(), model="toy", label="x", parent=3).with_version(4)
    for name in ("m.msgpack", "m.json"):
        p = str(tmp_path / name)
        m.save(p)
        back = Manifest.load(p)
        assert back.names == m.names and back.dtypes == m.dtypes and back.shapes == m.shapes
        assert np.array_equal(back.hashes, m.hashes) and np.array_equal(back.nbytes, m.nbytes)
        assert (back.version, back.label, back.parent, back.model) == (4, "x", 3, "toy")
        assert back.digest == m.digest
    assert json.loads(open(tmp_path / "m.json").read())["tensors"][0]["name"] == "embed.weight"


def test_corrupt_and_foreign_schemas_are_clear(tmp_path):
    m = Manifest.from_state_dict(_sd())
    d = msgpack.unpackb(m.to_bytes())
    with pytest.raises(ManifestError, match="schema 2 is newer than this hotweights reads"):
        Manifest.from_bytes(msgpack.packb({**d, "schema": 2}))
    with pytest.raises(ManifestError, match="schema 0 is older"):
        Manifest.from_bytes(msgpack.packb({**d, "schema": 0}))
    with pytest.raises(ManifestError, match="not a hotweights manifest"):
        Manifest.from_bytes(msgpack.packb({"kind": "other"}))
    cs = bytearray(d["checksums"])
    cs[3] ^= 1
    with pytest.raises(ManifestError, match="digest mismatch"):
        Manifest.from_bytes(msgpack.packb({**d, "checksums": bytes(cs)}))
    with pytest.raises(ManifestError, match="corrupt manifest"):
        Manifest.from_bytes(msgpack.packb({**d, "ndim": d["ndim"][:-1]}))
    with pytest.raises(ManifestError, match="not a valid manifest"):
        Manifest.from_bytes(m.to_bytes()[:40])
    p = tmp_path / "bad.json"
    p.write_text('{"kind": "hotweights.manifest", "schema": 1, ')
    with pytest.raises(ManifestError, match="JSON"):
        Manifest.load(str(p))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        Manifest.load(str(tmp_path / "missing"))
    with pytest.raises(ManifestError, match="duplicate tensor name 'a'"):
        Manifest(["a", "a"], ["float32"] * 2, [(1,), (1,)], np.array([4, 4]), np.array([1, 2], np.uint64))
    with pytest.raises(ManifestError, match="not contiguous"):
        Manifest.from_state_dict({"t": torch.zeros(3, 4).t()})


def test_from_safetensors_files_and_directory(tmp_path):
    from safetensors.torch import save_file

    sd = _sd()
    save_file({k: v for k, v in list(sd.items())[:2]}, str(tmp_path / "a.safetensors"))
    save_file({k: v for k, v in list(sd.items())[2:]}, str(tmp_path / "b.safetensors"))
    seen = []
    m = Manifest.from_safetensors(str(tmp_path), model="ck", progress=lambda d, t: seen.append((d, t)))
    ref = Manifest.from_state_dict(sd)
    assert sorted(m.names) == sorted(ref.names)
    assert m.checksums() == ref.checksums()
    assert seen[-1][0] == seen[-1][1] == ref.total_bytes
    save_file({"embed.weight": sd["embed.weight"]}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ManifestError, match="appears in both"):
        Manifest.from_safetensors(str(tmp_path))
    with pytest.raises(ManifestError, match="no such file or directory"):
        Manifest.from_safetensors(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no .safetensors files"):
        Manifest.from_safetensors(str(tmp_path / "empty"))


def test_delta_changed_added_removed_reshaped():
    old_sd = _sd()
    new_sd = dict(old_sd)
    new_sd["layers.0.w"] = old_sd["layers.0.w"] + 1           # changed
    new_sd["layers.2.w"] = torch.ones(3)                        # added
    del new_sd["layers.1.w"]                                    # removed
    new_sd["layers.0.b"] = torch.zeros(4, 4, dtype=torch.float16)  # reshaped (16 -> 4x4)
    old, new = Manifest.from_state_dict(old_sd), Manifest.from_state_dict(new_sd)
    d = diff(old, new)
    assert set(d.changed) == {"layers.0.w", "layers.2.w", "layers.0.b"}
    assert d.added == ["layers.2.w"] and d.removed == ["layers.1.w"]
    assert d.reshaped == [("layers.0.b", ("float16", (16,)), ("float16", (4, 4)))]
    assert d.unchanged == 2  # embed.weight and empty
    assert d.changed_mask.tolist() == [n in d.changed for n in new.names]
    assert diff(new, new).empty and diff(None, new).changed == new.names


def test_dtype_change_with_same_bytes_is_reshaped():
    a = Manifest.from_state_dict({"w": torch.zeros(4, dtype=torch.float32)})
    b = Manifest.from_state_dict({"w": torch.zeros(4, dtype=torch.int32)})
    d = diff(a, b)
    assert d.reshaped == [("w", ("float32", (4,)), ("int32", (4,)))] and d.changed == ["w"]


def test_with_checksums_equals_a_manifest_built_from_scratch():
    """A version-tracked publisher's next snapshot of an unchanged layout shares the columns
    and re-encodes only the checksums: the result is the manifest built from scratch."""
    sd = {"a": torch.randn(3, 4), "b": torch.arange(7, dtype=torch.int64),
          "c": torch.ones(2, 2, 2, dtype=torch.float16)}
    m1 = Manifest.from_state_dict(sd, model="m", label="v1", parent=None)
    assert m1.to_bytes()  # encodes (and caches) the static columns
    with torch.no_grad():
        sd["a"].add_(1)
    fresh = Manifest.from_state_dict(sd, model="m", label="v2", parent=4)
    m2 = m1.with_checksums(fresh.hashes, label="v2", parent=4)
    assert m2.digest == fresh.digest != m1.digest
    assert (m2.label, m2.parent, m2.version) == ("v2", 4, None)
    back = Manifest.from_bytes(m2.to_bytes())
    assert back.digest == fresh.digest and back.names == fresh.names
    assert np.array_equal(back.hashes, fresh.hashes) and back.shapes == fresh.shapes
    assert np.array_equal(m1.hashes, Manifest.from_bytes(m1.to_bytes()).hashes)  # m1 unchanged
    assert diff(m1, m2).changed == ["a"]
    with pytest.raises(ManifestError, match=r"shape \(2,\), expected \(3,\)"):
        m1.with_checksums(np.zeros(2, np.uint64))


def test_dtype_or_shape_change_with_same_bytes_is_seen_in_large_models():
    """dtype and shape are not in the checksum: the diff compares them for every row, also
    past the 2048 rows where it once looked only at rows whose bytes differ."""
    for n in (10, 3000):
        old = {f"t{i}": torch.full((4, 2), float(i)) for i in range(n)}
        new = dict(old)
        new["t0"] = old["t0"].view(torch.int32)  # the same bytes, reinterpreted
        new["t1"] = old["t1"].reshape(2, 4)       # the same bytes, reshaped
        d = diff(Manifest.from_state_dict(old), Manifest.from_state_dict(new))
        assert d.changed == ["t0", "t1"] and [r[0] for r in d.reshaped] == ["t0", "t1"], n


def test_diff_from_an_empty_manifest_adds_everything():
    new = Manifest.from_state_dict({"w": torch.ones(3)})
    d = diff(Manifest.from_state_dict({}), new)
    assert d.changed == ["w"] and d.added == ["w"] and d.removed == []


def test_hostile_manifest_rows_are_refused_by_name():
    """Manifests come off the coordinator: every row must describe a tensor that can exist
    (the digest is no protection: anyone can compute it)."""
    good = Manifest.from_state_dict({"a": torch.ones(4), "b": torch.ones(2, 3, dtype=torch.int64)})
    d = msgpack.unpackb(good.to_bytes(), raw=False)

    def forged(mutate) -> bytes:
        names, dtypes = list(d["names"]), [d["dtype_table"][i] for i in
                                           np.frombuffer(d["dtype_idx"], np.uint16).tolist()]
        shapes, nb = list(good.shapes), good.nbytes.copy()
        names, dtypes, shapes, nb = mutate(names, dtypes, shapes, nb)
        m = Manifest(names, dtypes, shapes, nb, good.hashes, model=good.model)
        return m.to_bytes()  # with a valid digest of the forged content

    def nbytes(n, dt, sh, nb):
        nb[0] = 7
        return n, dt, sh, nb

    def negative_dim(n, dt, sh, nb):
        sh[1] = (-2, -3)
        return n, dt, sh, nb

    def bad_dtype(n, dt, sh, nb):
        dt[0] = "not_a_dtype"
        return n, dt, sh, nb

    def int_name(n, dt, sh, nb):
        n[0] = 5
        return n, dt, sh, nb

    for mutate, msg in ((nbytes, r"tensor 'a' claims 7 bytes, but float32\(4,\) holds 16"),
                        (negative_dim, r"tensor 'b': negative dimension in \(-2, -3\)"),
                        (bad_dtype, r"tensor 'a': unknown dtype 'not_a_dtype'"),
                        (int_name, r"tensor name 5 is a int, expected a str")):
        with pytest.raises(ManifestError, match=msg):
            Manifest.from_bytes(forged(mutate))
    js = good.to_json().encode()
    assert Manifest.from_bytes(b"\xef\xbb\xbf" + js).digest == good.digest  # a BOM
    assert Manifest.from_bytes(b"\t\r\n" + js).digest == good.digest
    bad = json.loads(js)
    bad["tensors"][0]["checksum"] = "-1"
    with pytest.raises(ManifestError, match="corrupt manifest"):
        Manifest.from_bytes(json.dumps(bad).encode())
    with pytest.raises(TypeError, match="expected bytes, got str"):
        Manifest.from_bytes("{}")


def test_state_dict_entries_that_cannot_be_published_are_named():
    with pytest.raises(ManifestError, match=r"state entry 0 has a int name, expected a str"):
        Manifest.from_state_dict({0: torch.ones(2)})
    with pytest.raises(ManifestError, match=r"tensor 'm' is on the meta device"):
        Manifest.from_state_dict({"m": torch.ones(2, device="meta")})
    with pytest.raises(ManifestError, match=r"tensor 's' is torch.sparse_coo; publish dense"):
        Manifest.from_state_dict({"s": torch.ones(2).to_sparse()})
