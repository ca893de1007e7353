"""Hardening helpers of the rootfs builder, on small fabricated trees (no root needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lobsterd.errors import ImageBuildFailed
from lobsterd.image.rootfs import (
    FORBIDDEN_PROGRAMS,
    REMOVE_PATTERNS,
    GuestFile,
    audit_tree,
    dpkg_packages,
    find_forbidden,
    hardening_patterns,
    install_file,
    lock_root,
    remove_matching,
    resolve_in_root,
    rootfs_size_mib,
    strip_setuid,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A merged-/usr layout like Debian's: /bin, /sbin are symlinks into /usr."""
    root = tmp_path / "root"
    for d in ("usr/bin", "usr/sbin", "etc", "var/lib/apt", "usr/share/doc/x"):
        (root / d).mkdir(parents=True)
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/sbin", root / "sbin")
    return root


def test_resolve_in_root_never_leaves_the_tree(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "host-file"
    outside.write_text("host")
    os.symlink(str(outside), tree / "etc/abs-link")  # absolute: means <root>/<that path>
    os.symlink("../../../../../../", tree / "etc/up")
    os.symlink("/etc", tree / "usr/abs-etc")
    assert resolve_in_root(tree, "sbin/lobster-init") == tree / "usr/sbin/lobster-init"
    assert resolve_in_root(tree, "etc/abs-link") == tree / str(outside).lstrip("/")
    assert resolve_in_root(tree, "etc/up/passwd") == tree / "passwd"
    assert resolve_in_root(tree, "usr/abs-etc/shadow") == tree / "etc/shadow"
    assert resolve_in_root(tree, "../../x") == tree / "x"
    assert resolve_in_root(tree, "etc/abs-link", follow_last=False) == tree / "etc/abs-link"


def test_resolve_in_root_symlink_loop(tree: Path) -> None:
    os.symlink("b", tree / "a")
    os.symlink("a", tree / "b")
    with pytest.raises(ImageBuildFailed, match="symlinks"):
        resolve_in_root(tree, "a/x")


def test_install_file_through_symlinked_dir_and_over_a_link(tree: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    os.symlink(str(victim), tree / "usr/sbin/lobster-init")  # would escape if followed
    install_file(tree, GuestFile("sbin/lobster-init", b"#!/usr/bin/python3\n", 0o755))
    target = tree / "usr/sbin/lobster-init"
    assert not target.is_symlink()
    assert target.read_bytes() == b"#!/usr/bin/python3\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert victim.read_text() == "untouched"


def test_remove_matching_globs_and_reports(tree: Path, tmp_path: Path) -> None:
    for name in ("apt", "apt-get", "dpkg", "python3"):
        (tree / "usr/bin" / name).write_text("x")
    host_dir = tmp_path / "host-apt"
    host_dir.mkdir()
    (host_dir / "keep").write_text("host")
    os.symlink(str(host_dir), tree / "etc/apt")  # absolute link: removed as a link only
    removed = remove_matching(
        tree, ["usr/bin/apt*", "bin/dpkg", "var/lib/apt", "etc/apt", "no/such/*"]
    )
    assert removed == [
        "/etc/apt",
        "/usr/bin/apt",
        "/usr/bin/apt-get",
        "/usr/bin/dpkg",
        "/var/lib/apt",
    ]
    assert (tree / "usr/bin/python3").exists()
    assert (host_dir / "keep").read_text() == "host"
    assert remove_matching(tree, ["usr/bin/apt*"]) == []  # idempotent


def test_strip_setuid(tree: Path) -> None:
    su = tree / "usr/bin/passwd"
    su.write_text("x")
    su.chmod(0o4755)
    sg = tree / "usr/bin/wall"
    sg.write_text("x")
    sg.chmod(0o2755)
    plain = tree / "usr/bin/ls"
    plain.write_text("x")
    plain.chmod(0o755)
    assert strip_setuid(tree) == ["/usr/bin/passwd", "/usr/bin/wall"]
    assert stat.S_IMODE(su.stat().st_mode) == 0o755
    assert stat.S_IMODE(sg.stat().st_mode) == 0o755
    assert strip_setuid(tree) == []


def test_audit_finds_forbidden_programs(tree: Path) -> None:
    (tree / "usr/bin/python3").write_text("x")
    assert audit_tree(tree) == []
    (tree / "usr/bin/wget").write_text("x")
    (tree / "usr/sbin/agetty").write_text("x")
    hits = audit_tree(tree)
    assert "/usr/bin/wget" in hits and "/usr/sbin/agetty" in hits
    assert "/bin/wget" in hits  # seen through the /bin symlink too


def test_forbidden_list_covers_the_required_categories() -> None:
    names = {n for group in FORBIDDEN_PROGRAMS.values() for n in group}
    for required in ("apt", "apt-get", "dpkg", "wget", "curl", "nc", "telnet", "ping", "ip",
                     "ss", "netstat", "nslookup", "dig", "host", "traceroute", "gcc", "cc",
                     "su", "sudo", "agetty", "getty"):  # fmt: skip
        assert required in names
    assert "python3" not in names and "dropbear" not in names
    assert find_forbidden({"usr/bin": ["python3", "wget"]}) == ["/usr/bin/wget"]


def test_every_forbidden_program_has_a_removal_pattern(tree: Path) -> None:
    """Plant every forbidden program; the removal patterns must take all of them away."""
    for d in ("usr/bin", "usr/sbin"):
        for group in FORBIDDEN_PROGRAMS.values():
            for name in group:
                (tree / d / name).write_text("x")
    (tree / "usr/bin/nc.openbsd").write_text("x")
    (tree / "usr/bin/perl5.36.0").write_text("x")
    removed = {why: remove_matching(tree, pats) for why, pats in hardening_patterns().items()}
    assert audit_tree(tree) == []
    assert not (tree / "usr/bin/nc.openbsd").exists()
    assert "/usr/bin/perl5.36.0" in removed["compilers and interpreters not needed at run time"]
    assert set(removed) == set(FORBIDDEN_PROGRAMS) | set(REMOVE_PATTERNS)


def test_lock_root() -> None:
    text = "root:*:20000:0:99999:7:::\ndaemon:*:20000:0:99999:7:::\n"
    locked = lock_root(text)
    assert locked.splitlines()[0] == "root:!:20000:0:99999:7:::"
    assert locked.splitlines()[1] == "daemon:*:20000:0:99999:7:::"
    assert lock_root("root:$6$hash$x:1:0:99999:7:::\n").startswith("root:!:")
    with pytest.raises(ImageBuildFailed):
        lock_root("daemon:*:1:::::\n")


def test_dpkg_packages() -> None:
    status = (
        "Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n"
        "Description: x\n multi-line\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: dropbear-bin\nStatus: install ok installed\nVersion: 2022.83-1+deb12u2\n"
    )
    assert dpkg_packages(status) == {"dropbear-bin": "2022.83-1+deb12u2", "python3": "3.11.2-1+b1"}


@pytest.mark.parametrize(
    "content_mib, want",
    [(0, 512), (100, 512), (330, 512), (400, 576), (1000, 1344)],
)
def test_rootfs_size(content_mib: int, want: int) -> None:
    size = rootfs_size_mib(content_mib << 20)
    assert size == want
    assert size % 64 == 0 and size >= 512
    assert size << 20 >= content_mib * 1.25 * 2**20


def test_strip_setuid_never_changes_a_hard_linked_original(tree: Path, tmp_path: Path) -> None:
    """The staging tree is a hard-link copy of the cached base: the base must not change."""
    base = tmp_path / "base-su"
    base.write_text("binary")
    base.chmod(0o4755)
    os.link(base, tree / "usr/bin/su-linked")
    assert strip_setuid(tree) == ["/usr/bin/su-linked"]
    assert stat.S_IMODE((tree / "usr/bin/su-linked").stat().st_mode) == 0o755
    assert stat.S_IMODE(base.stat().st_mode) == 0o4755
    assert (tree / "usr/bin/su-linked").read_text() == "binary"
    assert base.stat().st_nlink == 1


def test_install_file_never_writes_into_a_hard_linked_original(tree: Path, tmp_path: Path) -> None:
    base = tmp_path / "base-shadow"
    base.write_text("root:*:1:0:::::\n")
    os.link(base, tree / "etc/shadow")
    install_file(tree, GuestFile("etc/shadow", b"root:!:1:0:::::\n", 0o640))
    assert base.read_text() == "root:*:1:0:::::\n"
    assert (tree / "etc/shadow").read_text() == "root:!:1:0:::::\n"
