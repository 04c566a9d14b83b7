# SPDX-License-Identifier: Apache-2.0
"""Presets: every value passes the config loader, each preset changes behaviour a component
can observe, the CLI prints them, and --detect follows the topology."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import torch

from hotweights import config, ops, optim, presets, topo
from hotweights.cli import main
from hotweights.coordinator import Coordinator, MemoryBackend, RedisBackend

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "nvidia_smi")
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for k in [k for k in os.environ if k.startswith("HOTWEIGHTS_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config.reset()
    ops.set_link_classifier(None)
    yield
    config.reset()
    ops.set_link_classifier(None)


def use(monkeypatch, name: str) -> None:
    """Puts a preset's environment in os.environ (as `eval $(hotweights preset NAME --shell)`)."""
    for k, v in presets.get(name).env.items():
        monkeypatch.setenv(k, v)
    config.reset()


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_value_is_validated_and_explicit(name):
    p = presets.get(name)
    cfg = config.load(dict(p.env))
    by_env = {s.env: s for s in config.settings()}
    for k, v in p.env.items():
        assert k in by_env, f"{name}: {k} is not a setting"
        assert by_env[k].field in cfg.explicit
        assert p.why.get(k), f"{name}: {k} has no explanation"
        assert getattr(cfg, by_env[k].field) == by_env[k].parse(v)
    assert presets.config_for(name) == cfg


def test_seed_values():
    nv, pc = presets.config_for("nvlink"), presets.config_for("pcie")
    assert (nv.ipc_copy_chunk_mb, nv.ipc_copy_streams) == (64, 4)
    assert (nv.ipc_inflight_buckets, nv.ipc_min_inflight, nv.ipc_max_inflight) == (6, 2, 12)
    assert nv.ipc_target_bucket_ms == 200.0 and nv.use_gds == "on"
    assert (pc.ipc_copy_chunk_mb, pc.ipc_copy_streams, pc.ipc_copy_autotune) == (8, 2, False)
    assert (pc.ipc_inflight_buckets, pc.ipc_min_inflight, pc.ipc_max_inflight) == (3, 1, 6)
    assert pc.ipc_target_bucket_ms == 350.0
    ha = presets.config_for("redis-ha")
    assert ha.coord_backend == "redis" and ha.handle_ttl == 45.0 and ha.redis_url.startswith("redis://")
    kv = presets.config_for("kv-safe")
    assert kv.kv_allow_transforms is True and kv.kv_head_order == "grouped"
    op = presets.config_for("opt-attenuate")
    assert op.opt_policy == "attenuate" and op.opt_attenuation == 0.5


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="preset 'nvlnk': expected one of nvlink, pcie, redis-ha"):
        presets.get("nvlnk")


# --------------------------------------------------------------------------- effects


def test_nvlink_and_pcie_change_copy_settings():
    nv, pc, base = (presets.config_for("nvlink"), presets.config_for("pcie"), config.load({}))
    assert (ops.copy_settings(CUDA0, CUDA1, base).chunk_bytes, ops.copy_settings(CUDA0, CUDA1, base).streams) == (16 << 20, 2)
    s = ops.copy_settings(CUDA0, CUDA1, nv)
    assert (s.chunk_bytes, s.streams, s.source) == (64 << 20, 4, "env")
    # the pcie preset turns autotune off: even an NVLink pair gets its 8 MiB x 2
    with open(os.path.join(FIX, "hgx_h100_nv18.txt")) as f:
        topo.install_classifier(topo.parse_nvidia_smi(f.read(), sysfs="/nonexistent"))
    s = ops.copy_settings(CUDA0, CUDA1, presets.config_for("pcie", {"HOTWEIGHTS_IPC_COPY_AUTOTUNE": "1"}))
    assert (s.chunk_bytes, s.streams, s.source) == (8 << 20, 2, "env")
    # host copies take the engine's thread count from the same setting
    assert ops.copy_settings(torch.device("cpu"), torch.device("cpu"), pc).streams == 2


def _drive(window, service_s: float, n: int, clock: list) -> list[int]:
    """Feeds the controller n completions of a given service time; the windows it chose."""
    seen = []
    for _ in range(n):
        clock[0] += service_s
        window.on_complete(clock[0], service_s, 1 << 20)
        seen.append(window.current)
    return seen


@pytest.mark.parametrize("name,slots,base,floor", [(None, 8, 4, 1), ("nvlink", 12, 6, 2),
                                                   ("pcie", 6, 3, 1)])
def test_window_bounds_a_publisher_builds(name, slots, base, floor):
    from hotweights import Publisher
    from hotweights.coordinator import start_embedded

    cfg = presets.config_for(name) if name else config.load({})
    coord = start_embedded()
    try:
        pub = Publisher({"w": torch.zeros(64)}, name=f"p-{name}", endpoint=coord.endpoint,
                        bucket_bytes=4096, serve_late=False, config=cfg)
        try:
            assert pub.slots == slots and pub.ring.slots == slots
            assert pub.window.current == base
            # a fast, steady link: the window grows to its cap (max = the ring's slots) ...
            clock = [0.0]
            grow = _drive(pub.window, 0.001, 600, clock)
            assert max(grow) == slots
            # ... a link whose buckets blow the latency budget: it shrinks to its floor
            shrink = _drive(pub.window, 5.0, 600, clock)
            assert min(grow + shrink) == floor and min(shrink) == floor
        finally:
            pub.close()
    finally:
        coord.stop()


def test_redis_ha_picks_the_redis_backend(monkeypatch):
    c = Coordinator()
    assert isinstance(c.backend, MemoryBackend)
    use(monkeypatch, "redis-ha")
    c = Coordinator()  # not started: nothing connects yet
    assert isinstance(c.backend, RedisBackend) and c.backend.url == "redis://127.0.0.1:6379/0"
    assert c.settings.handle_ttl == 45.0


def _kv_manifest():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(4):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  *(p + f"self_attn.{x}_proj.weight" for x in "qkvo"),
                  *(p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down"))]
    names.append("model.layers.1.self_attn.k_scale")
    return {n: i for i, n in enumerate(names)}


def test_kv_safe_allows_transforms(monkeypatch):
    from hotweights import kv

    old = _kv_manifest()
    new = dict(old, **{"model.layers.1.self_attn.k_scale": -1})  # an FP8 KV scale changed
    p = kv.plan(old, new, 4)
    assert p.keep == [0] and p.invalidate == [1, 2, 3] and not p.transform
    use(monkeypatch, "kv-safe")
    p = kv.plan(old, new, 4)
    assert p.keep == [0] and p.transform == [1] and p.invalidate == [2, 3]
    assert p.transforms()[0]["op"] == "requantize_fp8"


def test_opt_attenuate_scales_the_first_moment(monkeypatch):
    def trained():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8))
        opt = torch.optim.Adam([w], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
        return w, opt

    w, opt = trained()
    before = opt.state[w]["exp_avg"].clone()
    optim.apply_policy(opt, [w])  # default: preserve
    assert torch.equal(opt.state[w]["exp_avg"], before)
    use(monkeypatch, "opt-attenuate")
    w, opt = trained()
    before = opt.state[w]["exp_avg"].clone()
    rep = optim.apply_policy(opt, [w])
    assert rep.params == {"attenuate": 1} and rep.attenuation == 0.5
    torch.testing.assert_close(opt.state[w]["exp_avg"], before * 0.5, rtol=0, atol=0)


# --------------------------------------------------------------------------- CLI and detect


def test_cli_prints_env_shell_and_json(capsys):
    assert main(["preset", "pcie"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "HOTWEIGHTS_IPC_COPY_CHUNK_MB=8"
    assert dict(x.split("=", 1) for x in lines) == dict(presets.get("pcie").env)
    assert main(["preset", "nvlink", "--shell"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("# hotweights preset nvlink:")
    env = dict(shlex.split(x)[1].split("=", 1) for x in out[1:])
    assert env == dict(presets.get("nvlink").env) and all(x.startswith("export ") for x in out[1:])
    assert main(["preset", "opt-attenuate", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["env"]["HOTWEIGHTS_OPT_POLICY"] == "attenuate" and d["why"]["HOTWEIGHTS_OPT_ATTENUATION"]
    assert main(["preset", "--list"]) == 0
    assert "kv-safe" in capsys.readouterr().out


def test_cli_redis_url_is_validated(capsys):
    assert main(["preset", "redis-ha", "--redis-url", "redis://10.0.0.5:6379/1", "--shell"]) == 0
    assert "export HOTWEIGHTS_REDIS_URL=redis://10.0.0.5:6379/1" in capsys.readouterr().out
    assert main(["preset", "redis-ha", "--redis-url", "10.0.0.5:6379"]) == 1
    assert "HOTWEIGHTS_REDIS_URL='10.0.0.5:6379': expected a redis:// URL" in capsys.readouterr().err
    assert main(["preset", "pcie", "--redis-url", "redis://x"]) == 1
    assert main(["preset"]) == 1


def _smi(name):
    with open(os.path.join(FIX, name)) as f:
        return topo.parse_nvidia_smi(f.read(), sysfs="/nonexistent")


@pytest.mark.parametrize("fixture,name,needle", [
    ("hgx_h100_nv18.txt", "nvlink", "all 28 GPU pairs are NVLink with >= 18 links"),
    ("rtx3090_nvlink_bridge.txt", "nvlink", "all 1 GPU pairs are NVLink"),
    ("pcie_6gpu_2socket.txt", "pcie", "no GPU pair is NVLink"),
    ("p40_legacy_soc.txt", "pcie", "no GPU pair is NVLink"),
    ("single_gpu.txt", "pcie", "one GPU"),
])
def test_detect_from_nvidia_smi(fixture, name, needle):
    got, why = presets.detect(_smi(fixture))
    assert got == name and needle in why


def test_detect_peer_probe_mixed_and_cpu_only():
    got, why = presets.detect(topo.from_peer_matrix([[1, 1], [1, 1]], sysfs="/nonexistent"))
    assert got == "pcie" and "NVLink is not assumed" in why
    t = _smi("rtx3090_nvlink_bridge.txt")
    four = topo.Topology("nvml", [topo.GPU(i) for i in range(3)],
                         [[topo.Link("same_device") if i == j else
                           (t.link(0, 1) if {i, j} == {0, 1} else topo.Link("pcie", path="PHB"))
                           for j in range(3)] for i in range(3)], {})
    got, why = presets.detect(four)
    assert got == "pcie" and "only 1 of 3 GPU pairs are NVLink" in why
    got, why = presets.detect(topo.Topology("none", [], [], {}))
    assert got is None and "no GPU visible" in why


def test_cli_detect_on_this_machine(capsys):
    assert main(["preset", "--detect"]) == 0
    out = capsys.readouterr().out
    t = topo.discover()
    if t.num_gpus == 0:
        assert out.startswith("# no preset recommended: no GPU visible")
    else:
        assert "recommended preset" in out or "HOTWEIGHTS_" in out


def test_conflicting_preset_flags_are_refused(capsys):
    for argv, msg in ((["preset", "--list", "--detect"], "--list lists every preset"),
                      (["preset", "nvlink", "--list"], "--list lists every preset"),
                      (["preset", "nvlink", "--shell", "--json"], "pick one output form"),
                      (["preset", "redis-ha", "--redis-url", ""], "--redis-url '': expected")):
        assert main(argv) == 1
        assert msg in capsys.readouterr().err
