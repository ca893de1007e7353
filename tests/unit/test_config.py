from __future__ import annotations

from pathlib import Path

import pytest

from lobsterd.config import DEFAULT_CONFIG_TEXT, Config, load_config, parse_config
from lobsterd.errors import ConfigInvalid


def test_defaults_follow_reference() -> None:
    c = Config()
    assert (c.vm.vcpus, c.vm.mem_mib) == (2, 1024)
    assert c.vm.net_rx_limit is not None and c.vm.net_rx_limit.bandwidth is not None
    assert c.vm.net_rx_limit.bandwidth.size == 1_250_000
    assert c.vm.disk_limit is not None and c.vm.disk_limit.bandwidth is not None
    assert c.vm.disk_limit.bandwidth.size == 52_428_800
    assert c.storage.overlay_size_mib == 4096
    assert c.watchdog.interval_s == 10
    assert c.network.conn_limit == 1024


def test_default_text_parses(tmp_path: Path) -> None:
    assert parse_config(DEFAULT_CONFIG_TEXT, tmp_path / "x.toml").vm.vcpus == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[vm]\nvcpus = 64\n", "vm.vcpus"),
        ("[vm]\nvcpu = 2\n", "vm.vcpu: unknown key"),
        ("[network]\npool = '10.0.0.1/8'\n", "network.pool"),
        ("[caddy]\ndomain = 'Bad_Domain'\n", "caddy.domain"),
        ("[network]\nblocked_cidrs = ['nope']\n", "network.blocked_cidrs"),
        ("[network]\negress_allow = ['10.0.0.0/33']\n", "network.egress_allow"),
        ("[network]\negress_allow = ['203.0.113.0/24:70000']\n", "port must be 1-65535"),
        ("[vm\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigInvalid) as exc:
        parse_config(text, tmp_path / "lobsterd.toml")
    assert needle in exc.value.message
    assert str(tmp_path / "lobsterd.toml") in exc.value.message


def test_env_and_explicit_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[vm]\nvcpus = 3\n")
    monkeypatch.setenv("LOBSTERD_CONFIG", str(f))
    assert load_config().vm.vcpus == 3
    g = tmp_path / "d.toml"
    g.write_text("[vm]\nvcpus = 4\n")
    assert load_config(g).vm.vcpus == 4
    monkeypatch.setenv("LOBSTERD_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigInvalid, match="does not exist"):
        load_config()


def test_corrupt_config_not_overwritten(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ConfigInvalid):
        load_config(f)
    assert f.read_bytes() == b"\xff\xfe garbage"
