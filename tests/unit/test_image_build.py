"""Cache key stability/sensitivity, variants, guest file loading (no root, no network)."""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import pytest

from lobsterd.errors import ImageBuildFailed, NotRoot, ValidationFailed
from lobsterd.image.build import (
    GUEST_DIR,
    GUEST_SOURCES,
    build_image,
    check_variant,
    compute_key,
    image_inputs,
    load_guest_files,
    load_init_script,
)
from lobsterd.image.rootfs import BaseSpec, GuestFile
from tests.helpers import make_config

FILES = [
    GuestFile("usr/lib/lobster/agent.py", b"print('agent')\n", 0o644),
    GuestFile("sbin/lobster-init", b"#!/usr/bin/python3\n", 0o755),
]


def inputs(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "variant": "test",
        "kernel_release": "6.1.0-57-cloud-amd64",
        "kernel_package_version": "6.1.192-3",
        "base": BaseSpec(),
        "guest_files": FILES,
        "init_script": b"#!/bin/busybox sh\n",
        "busybox_sha256": "ab" * 32,
    }
    args.update(over)
    return image_inputs(**args)


def test_key_is_stable() -> None:
    a = compute_key(inputs())
    assert a == compute_key(inputs())
    assert len(a) == 32 and int(a, 16) >= 0
    shuffled = dict(reversed(list(inputs().items())))
    assert compute_key(shuffled) == a  # key order does not matter


@pytest.mark.parametrize(
    "change",
    [
        {"variant": "openclaw"},
        {"kernel_release": "6.1.0-58-cloud-amd64"},
        {"kernel_package_version": "6.1.192-4"},
        {"base": BaseSpec(include=("python3", "dropbear-bin"))},
        {"base": BaseSpec(suite="trixie")},
        {"base": BaseSpec(variant="buildd")},
        {
            "guest_files": [
                FILES[0],
                GuestFile("sbin/lobster-init", b"#!/usr/bin/python3\n#", 0o755),
            ]
        },
        {"guest_files": [FILES[0], GuestFile("sbin/lobster-init", FILES[1].data, 0o700)]},
        {"guest_files": FILES[:1]},
        {"init_script": b"#!/bin/busybox sh\necho\n"},
        {"busybox_sha256": "cd" * 32},
    ],
)
def test_key_changes_with_every_input(change: dict[str, Any]) -> None:
    assert compute_key(inputs(**change)) != compute_key(inputs())


def test_key_changes_with_builder_version_and_hardening() -> None:
    base = inputs()
    bumped = copy.deepcopy(base)
    bumped["builder"] += 1
    assert compute_key(bumped) != compute_key(base)
    fewer = copy.deepcopy(base)
    fewer["hardening"]["forbidden"]["reconnaissance tools"].remove("ping")
    assert compute_key(fewer) != compute_key(base)


def test_variants() -> None:
    check_variant("test")
    with pytest.raises(ImageBuildFailed, match="not built yet"):
        check_variant("openclaw")
    with pytest.raises(ValidationFailed, match="unknown image variant"):
        check_variant("alpine")


def test_build_refuses_unbuilt_variant_before_anything(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(ImageBuildFailed, match="openclaw"):
        build_image(cfg, variant="openclaw")
    assert not cfg.paths.images.exists()


def test_build_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(NotRoot):
        build_image(make_config(tmp_path))


def test_guest_files_from_the_package() -> None:
    files = {g.dest: g for g in load_guest_files("test")}
    assert set(files) == {dest for _, dest, _, _ in GUEST_SOURCES}
    assert files["sbin/lobster-init"].mode == 0o755
    assert files["usr/local/bin/lobster-gateway"].mode == 0o755
    assert files["usr/lib/lobster/agent.py"].data == (GUEST_DIR / "agent.py").read_bytes()
    for g in files.values():
        if g.mode & stat.S_IXUSR:
            assert g.data.startswith(b"#!")
    assert load_init_script().startswith(b"#!")


def test_guest_files_missing_or_without_shebang(tmp_path: Path) -> None:
    for src, _, _, _ in GUEST_SOURCES:
        (tmp_path / src).write_bytes(b"#!/usr/bin/python3\n")
    (tmp_path / "tls_front.py").unlink()
    with pytest.raises(ImageBuildFailed, match=r"tls_front\.py is missing"):
        load_guest_files("test", tmp_path)
    (tmp_path / "tls_front.py").write_text("x = 1\n")
    (tmp_path / "lobster_init.py").write_text("no shebang\n")
    with pytest.raises(ImageBuildFailed, match="no #! line"):
        load_guest_files("test", tmp_path)
    with pytest.raises(ImageBuildFailed, match="missing"):
        load_init_script(tmp_path)
    (tmp_path / "initramfs_init.sh").write_text("echo no shebang\n")
    with pytest.raises(ImageBuildFailed, match="no #! line"):
        load_init_script(tmp_path)
