"""CLI behaviour that needs no VM: errors are one clear line, bad input creates nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lobsterd.cli.main import cli
from tests.helpers import need_binary, need_root


def run(*args: str, config: Path | None = None) -> tuple[int, str, str]:
    runner = CliRunner(mix_stderr=False)
    argv = (["--config", str(config)] if config else []) + list(args)
    res = runner.invoke(cli, argv)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    f = tmp_path / "lobsterd.toml"
    f.write_text(
        f'[paths]\nconfig_dir = "{tmp_path}/etc"\nstate_dir = "{tmp_path}/state"\n'
        f'run_dir = "{tmp_path}/run"\ncache_dir = "{tmp_path}/cache"\n'
    )
    return f


@pytest.mark.parametrize(
    "name", ["Demo", "1demo", "-demo", "de.mo", "de mo", "", "a" * 64, "démo", "demo-"]
)
def test_invalid_names_rejected_before_anything(cfg_file: Path, name: str) -> None:
    code, out, err = run("spawn", "--", name, config=cfg_file)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error[VALIDATION_FAILED]: invalid tenant name")
    assert not (cfg_file.parent / "state").exists()
    assert not (cfg_file.parent / "run").exists()


def test_help_everywhere() -> None:
    for cmd in ([], ["spawn"], ["evict"], ["init"], ["tank"], ["token"], ["logs"], ["config"],
                ["secrets"], ["audit"], ["doctor"], ["image"]):
        code, out, _ = run(*cmd, "--help")
        assert code == 0 and "Usage:" in out, cmd


def test_corrupt_config_is_one_line_naming_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[vm]\nvcpus = 'many'\n")
    code, _, err = run("tank", config=f)
    assert code != 0
    assert err.strip().splitlines() == [
        f"error[CONFIG_INVALID]: config {f}: vm.vcpus: Input should be a valid integer, "
        "unable to parse string as an integer (got 'many')"
    ]
    assert f.read_text() == "[vm]\nvcpus = 'many'\n"


def test_config_check_and_default(cfg_file: Path) -> None:
    code, out, _ = run("config", "check", config=cfg_file)
    assert code == 0 and str(cfg_file) in out
    code, out, _ = run("config", "default")
    assert code == 0 and "[network]" in out


def test_unknown_tenant_errors(cfg_file: Path) -> None:
    need_root()
    for cmd in (["evict", "ghost", "--yes"], ["token", "ghost"], ["logs", "ghost"]):
        code, _, err = run(*cmd, config=cfg_file)
        assert code != 0, cmd
        assert err.strip().splitlines() == ['error[TENANT_NOT_FOUND]: tenant "ghost" not found '
                                            "(lobsterd tank lists tenants)"], cmd


def test_tank_empty(cfg_file: Path) -> None:
    need_root()
    code, out, _ = run("tank", "--json", config=cfg_file)
    assert code == 0 and out.strip() == "[]"


def test_non_root_refused(cfg_file: Path) -> None:
    cmd = [sys.executable, "-m", "lobsterd", "--config", str(cfg_file), "tank"]
    if os.geteuid() == 0:
        need_binary("setpriv")
        cfg_file.parent.chmod(0o755)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error[NOT_ROOT]")


def test_duplicate_spawn_is_clear(cfg_file: Path) -> None:
    need_root()
    from lobsterd.config import load_config
    from lobsterd.core.lifecycle import Status
    from lobsterd.registry import open_registry

    reg = open_registry(load_config(cfg_file))
    reg.reserve("demo", "qemu", {})
    reg.transition("demo", Status.ACTIVE)
    code, _, err = run("spawn", "demo", config=cfg_file)
    assert code != 0
    assert err.strip().splitlines()[-1] == (
        'error[TENANT_EXISTS]: tenant "demo" already exists (active)')


def test_spawn_without_image_says_what_to_do(cfg_file: Path) -> None:
    need_root()
    code, _, err = run("spawn", "demo", config=cfg_file)
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("error[IMAGE_MISSING]") and "lobsterd image build" in last
    assert not list((cfg_file.parent / "state").glob("volumes/*"))
