# SPDX-License-Identifier: Apache-2.0
"""The typed config: defaults, parsing, clear errors naming the variable, README coverage."""

import os
import re

import pytest

from hotweights import config
from hotweights.config import ConfigError


def test_defaults():
    c = config.load({})
    assert c.ipc_copy_chunk_mb == 16 and c.copy_chunk_bytes == 16 << 20
    assert c.ipc_copy_streams == 2 and c.ipc_inflight_buckets == 4
    assert c.handle_ttl == 45.0 and c.coord_backend == "memory"
    assert c.quorum == "all" and c.opt_policy == "preserve" and c.opt_attenuation == 0.5
    assert c.explicit == frozenset()


@pytest.mark.parametrize("env,field,value", [
    ({"HOTWEIGHTS_IPC_COPY_STREAMS": "4"}, "ipc_copy_streams", 4),
    ({"HOTWEIGHTS_IPC_ADAPT": "off"}, "ipc_adapt", False),
    ({"HOTWEIGHTS_IPC_INFLIGHT_BYTES": "512MiB"}, "ipc_inflight_bytes", 512 << 20),
    ({"HOTWEIGHTS_IPC_INFLIGHT_BYTES": "2G"}, "ipc_inflight_bytes", 2 << 30),
    ({"HOTWEIGHTS_QUORUM": "0.5"}, "quorum", 0.5),
    ({"HOTWEIGHTS_QUORUM": "3"}, "quorum", 3),
    ({"HOTWEIGHTS_KV_HEAD_MAP": "[1, 0, 3, 2]"}, "kv_head_map", (1, 0, 3, 2)),
    ({"HOTWEIGHTS_USE_GDS": "require"}, "use_gds", "require"),
    ({"HOTWEIGHTS_SPIN_US": "250"}, "spin_us", 250),
    ({"HOTWEIGHTS_SPIN_US": "AUTO"}, "spin_us", "auto"),
    ({"HOTWEIGHTS_COORD_ENDPOINT": "tcp://127.0.0.1:5555,tcp://127.0.0.1:5556"}, "coord_endpoint",
     "tcp://127.0.0.1:5555,tcp://127.0.0.1:5556"),
])
def test_parse(env, field, value):
    c = config.load(env)
    assert getattr(c, field) == value
    assert field in c.explicit


@pytest.mark.parametrize("env,needle", [
    ({"HOTWEIGHTS_IPC_COPY_STREAMS": "abc"}, "HOTWEIGHTS_IPC_COPY_STREAMS='abc': expected an integer"),
    ({"HOTWEIGHTS_IPC_COPY_STREAMS": "0"}, "expected an integer in [1, 32]"),
    ({"HOTWEIGHTS_IPC_ADAPT": "maybe"}, "HOTWEIGHTS_IPC_ADAPT='maybe'"),
    ({"HOTWEIGHTS_COORD_BACKEND": "etcd"}, "expected one of memory, redis"),
    ({"HOTWEIGHTS_QUORUM": "1.5"}, "fraction in (0, 1]"),
    ({"HOTWEIGHTS_REDIS_URL": "localhost:6379"}, "redis:// URL"),
    ({"HOTWEIGHTS_KV_HEAD_MAP": "[1, 'a']"}, "JSON"),
    ({"HOTWEIGHTS_IPC_MIN_INFLIGHT": "9", "HOTWEIGHTS_IPC_MAX_INFLIGHT": "3"}, "expected min <= max"),
    ({"HOTWEIGHTS_IPC_TARGET_BUCKET_MS": "0"}, "expected a number > 0"),
    ({"HOTWEIGHTS_NO_SUCH_THING": "1"}, "unknown setting HOTWEIGHTS_NO_SUCH_THING"),
    ({"HOTWEIGHTS_SPIN_US": "-1"}, "HOTWEIGHTS_SPIN_US='-1': expected auto or microseconds in [0, 100000]"),
    ({"HOTWEIGHTS_SPIN_US": "often"}, "HOTWEIGHTS_SPIN_US='often': expected auto"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert needle in str(ei.value)


def test_spin_auto_spins_only_with_cores_to_spare(monkeypatch):
    assert config.load({"HOTWEIGHTS_SPIN_US": "40"}).spin_s == pytest.approx(40e-6)
    assert config.load({"HOTWEIGHTS_SPIN_US": "0"}).spin_s == 0
    for cores, spin in ((2, 0.0), (config.SPIN_AUTO_MIN_CORES, config.SPIN_AUTO_US * 1e-6)):
        monkeypatch.setattr(config, "_cores", lambda: cores)
        assert config.load({}).spin_s == pytest.approx(spin)


def test_explicit_arguments_beat_environment():
    c = config.load({"HOTWEIGHTS_IPC_COPY_STREAMS": "4"}, ipc_copy_streams=8)
    assert c.ipc_copy_streams == 8
    with pytest.raises(ConfigError, match=r"ipc_copy_streams \(argument\)=.*expected an integer in \[1, 32\]"):
        config.load({}, ipc_copy_streams=99)


def test_token_never_printed():
    c = config.load({"HOTWEIGHTS_COORD_TOKEN": "s3cret"})
    assert c.coord_token == "s3cret"
    assert "s3cret" not in repr(c) and "s3cret" not in str(c.as_env())


def test_get_is_cached_and_reset(monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_IPC_COPY_STREAMS", "3")
    config.reset()
    assert config.get().ipc_copy_streams == 3
    monkeypatch.setenv("HOTWEIGHTS_IPC_COPY_STREAMS", "5")
    assert config.get().ipc_copy_streams == 3  # read once
    config.reset()
    assert config.get().ipc_copy_streams == 5


def test_readme_lists_every_setting():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    missing = [s.env for s in config.settings() if s.env not in readme]
    assert not missing, f"README.md lacks these settings: {missing}"
    # ... and lists no setting that does not exist.
    listed = set(re.findall(r"`(HOTWEIGHTS_[A-Z0-9_]+)`", readme))
    known = {s.env for s in config.settings()} | config._NON_RUNTIME_ENV
    assert not (listed - known), f"README.md names unknown settings: {listed - known}"


def test_integers_are_decimal():
    assert config.load({"HOTWEIGHTS_BUCKET_MB": "010"}).bucket_mb == 10
    for bad in ("0x40", "4e1"):
        with pytest.raises(ConfigError, match=rf"HOTWEIGHTS_BUCKET_MB='{bad}': expected an integer"):
            config.load({"HOTWEIGHTS_BUCKET_MB": bad})
