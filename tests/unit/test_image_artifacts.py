"""Finding, loading and verifying built images; atomic publishing (fabricated images)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lobsterd.config import Config
from lobsterd.errors import ImageMissing
from lobsterd.image.artifacts import FILES, MANIFEST_FORMAT, find_image, load_image, verify_image
from lobsterd.image.util import (
    clean_stale_tmp,
    new_tmp_dir,
    publish_dir,
    replace_symlink,
)


def fake_image(images: Path, key: str = "k" * 32) -> Path:
    d = images / key
    d.mkdir(parents=True)
    files = {}
    for i, name in enumerate(FILES.values()):
        data = f"{name}-{i}".encode() * 100
        (d / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "format": MANIFEST_FORMAT,
        "key": key,
        "variant": "test",
        "kernel": {"version": "6.1.0-57-cloud-amd64"},
        "files": files,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_find_image_without_build(tmp_config: Config) -> None:
    with pytest.raises(ImageMissing) as err:
        find_image(tmp_config)
    assert "lobsterd image build" in str(err.value)


def test_find_image_follows_current(tmp_config: Config) -> None:
    images = tmp_config.paths.images
    d = fake_image(images)
    replace_symlink(images / "current", d.name)
    art = find_image(tmp_config)
    assert art.key == d.name and art.dir == d
    assert art.vmlinux == d / "vmlinux" and art.rootfs == d / "rootfs.ext4"
    assert art.initrd == d / "initrd.img" and art.bzimage == d / "bzImage"
    assert art.kernel_version == "6.1.0-57-cloud-amd64" and art.variant == "test"
    assert verify_image(art) == []


def test_dangling_current_and_missing_file(tmp_config: Config) -> None:
    images = tmp_config.paths.images
    images.mkdir(parents=True)
    replace_symlink(images / "current", "gone")
    with pytest.raises(ImageMissing, match="missing"):
        find_image(tmp_config)
    d = fake_image(images)
    replace_symlink(images / "current", d.name)
    (d / "initrd.img").unlink()
    with pytest.raises(ImageMissing, match=r"initrd\.img missing"):
        find_image(tmp_config)


def test_wrong_size_is_caught_quickly_and_content_by_verify(tmp_path: Path) -> None:
    d = fake_image(tmp_path)
    with (d / "rootfs.ext4").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(ImageMissing, match="wrong size"):
        load_image(d)
    d2 = fake_image(tmp_path, "j" * 32)
    data = bytearray((d2 / "vmlinux").read_bytes())
    data[10] ^= 0xFF
    (d2 / "vmlinux").write_bytes(bytes(data))
    art = load_image(d2)  # same size: the quick check passes
    problems = verify_image(art)
    assert len(problems) == 1 and problems[0].startswith("vmlinux") and "sha256" in problems[0]


def test_manifest_key_must_match_directory(tmp_path: Path) -> None:
    d = fake_image(tmp_path)
    os.rename(d, tmp_path / "other")
    with pytest.raises(ImageMissing, match="holds image"):
        load_image(tmp_path / "other")


def test_bad_manifest(tmp_path: Path) -> None:
    d = fake_image(tmp_path)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ImageMissing, match="unreadable"):
        load_image(d)
    (d / "manifest.json").write_text(json.dumps({"format": 999}))
    with pytest.raises(ImageMissing, match="incompatible"):
        load_image(d)


def test_publish_replaces_atomically_and_cleans_up(tmp_path: Path) -> None:
    final = tmp_path / "final"
    tmp = new_tmp_dir(tmp_path, "x")
    (tmp / "a").write_text("1")
    publish_dir(tmp, final)
    assert (final / "a").read_text() == "1" and not tmp.exists()
    tmp2 = new_tmp_dir(tmp_path, "x")
    (tmp2 / "a").write_text("2")
    publish_dir(tmp2, final)
    assert (final / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    stale = new_tmp_dir(tmp_path, "crashed")
    (stale / "junk").write_text("x")
    clean_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_symlink(tmp_path: Path) -> None:
    link = tmp_path / "current"
    replace_symlink(link, "a")
    assert os.readlink(link) == "a"
    replace_symlink(link, "b")
    assert os.readlink(link) == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["current"]
