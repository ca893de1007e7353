"""``lobsterd image show/verify`` on a fabricated image (no build, no root)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lobsterd.cli.main import cli
from lobsterd.image.util import replace_symlink
from tests.unit.test_image_artifacts import fake_image


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "lobsterd.toml"
    path.write_text(f'[paths]\ncache_dir = "{tmp_path / "cache"}"\nstate_dir = "{tmp_path}/s"\n')
    return path


def test_show_and_verify(tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    images = tmp_path / "cache" / "images"
    d = fake_image(images)
    replace_symlink(images / "current", d.name)
    runner = CliRunner()
    res = runner.invoke(cli, ["--config", str(cfg), "image", "show", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["key"] == d.name and data["kernel_version"] == "6.1.0-57-cloud-amd64"
    assert data["files"]["rootfs.ext4"]["path"] == str(d / "rootfs.ext4")
    assert data["up_to_date"] is False  # a fabricated image is never what a build would make
    res = runner.invoke(cli, ["--config", str(cfg), "image", "verify"])
    assert res.exit_code == 0 and "all files match" in res.output
    raw = bytearray((d / "bzImage").read_bytes())
    raw[0] ^= 1
    (d / "bzImage").write_bytes(bytes(raw))
    res = runner.invoke(cli, ["--config", str(cfg), "image", "verify", "--json"])
    assert res.exit_code != 0
    out = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    assert out["ok"] is False and out["problems"][0].startswith("bzImage")


def test_show_without_image(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["--config", str(config_file(tmp_path)), "image", "show"])
    assert res.exit_code != 0
    assert "IMAGE_MISSING" in res.output and "lobsterd image build" in res.output


def test_build_option_pairing(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli,
        ["--config", str(config_file(tmp_path)), "image", "build", "--kernel-release", "x"],
    )
    assert res.exit_code == 2 and "together" in res.output
