"""The newc cpio writer/reader and module load-order resolution."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from lobsterd.errors import ImageBuildFailed
from lobsterd.image.initramfs import (
    CpioEntry,
    initramfs_entries,
    module_name,
    parse_modules_builtin,
    parse_modules_dep,
    read_cpio,
    read_module,
    resolve_module_order,
    write_cpio,
)
from tests.helpers import need_binary

_V = "kernel/drivers/virtio"
_N = "kernel/drivers/net"
MODULES_DEP = f"""\
kernel/fs/overlayfs/overlay.ko:
{_V}/virtio.ko: {_V}/virtio_ring.ko
{_V}/virtio_ring.ko:
{_V}/virtio_mmio.ko: {_V}/virtio.ko {_V}/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: {_V}/virtio.ko {_V}/virtio_ring.ko
{_N}/virtio_net.ko: {_N}/net_failover.ko kernel/net/core/failover.ko {_V}/virtio.ko \
{_V}/virtio_ring.ko
{_N}/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: {_V}/virtio.ko {_V}/virtio_ring.ko
kernel/drivers/scsi/virtio_scsi.ko: kernel/drivers/scsi/scsi_mod.ko {_V}/virtio.ko
"""

WANTED = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover",
          "virtio_net", "overlay")  # fmt: skip


def sample_entries() -> list[CpioEntry]:
    return [
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF" + b"\0" * 1001),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("lib/modules/a.ko", stat.S_IFREG | 0o644, b"abc"),
        CpioEntry("empty", stat.S_IFREG | 0o644, b""),
    ]


# --- cpio ----------------------------------------------------------------------------


def test_cpio_round_trip_adds_parents_and_sorts() -> None:
    data = write_cpio(sample_entries())
    assert len(data) % 4 == 0
    back = {e.name: e for e in read_cpio(data)}
    assert list(back) == sorted(back)
    assert {"bin", "dev", "lib", "lib/modules"} <= set(back)
    assert back["bin"].is_dir and back["bin"].nlink == 2
    assert back["init"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(back["init"].mode) == 0o755
    assert stat.S_ISLNK(back["bin/sh"].mode) and back["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISCHR(back["dev/console"].mode) and back["dev/console"].rdev == (5, 1)
    assert back["empty"].data == b""
    assert all(e.mtime == 0 and e.uid == 0 for e in back.values())


def test_cpio_is_deterministic_regardless_of_input_order() -> None:
    a = write_cpio(sample_entries())
    b = write_cpio(list(reversed(sample_entries())))
    assert a == b


def test_cpio_rejects_conflicts_and_bad_paths() -> None:
    with pytest.raises(ImageBuildFailed, match="twice"):
        write_cpio(
            [CpioEntry("x", stat.S_IFREG | 0o644, b"1"), CpioEntry("x", stat.S_IFREG | 0o644, b"2")]
        )
    with pytest.raises(ImageBuildFailed, match="invalid"):
        write_cpio([CpioEntry("../etc/passwd", stat.S_IFREG | 0o644, b"")])
    with pytest.raises(ImageBuildFailed, match="not a directory"):
        write_cpio([CpioEntry("f", stat.S_IFREG | 0o644), CpioEntry("f/g", stat.S_IFREG | 0o644)])


def test_cpio_identical_duplicates_are_merged() -> None:
    e = CpioEntry("x", stat.S_IFREG | 0o644, b"1")
    assert read_cpio(write_cpio([e, e])) == [e]


def test_read_cpio_rejects_garbage_and_truncation() -> None:
    with pytest.raises(ImageBuildFailed, match="magic"):
        read_cpio(b"not a cpio archive at all" * 10)
    data = write_cpio([CpioEntry("big", stat.S_IFREG | 0o644, b"z" * 1000)])
    with pytest.raises(ImageBuildFailed):
        read_cpio(data[:300])


def test_gnu_cpio_reads_our_archive(tmp_path: Path) -> None:
    need_binary("cpio")
    data = write_cpio(sample_entries())
    listing = (
        subprocess.run(
            ["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True, timeout=30
        )
        .stdout.decode()
        .split()
    )
    assert listing == [e.name for e in read_cpio(data)]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "init", "lib/modules/a.ko"],
        input=data, cwd=out, check=True, timeout=30,
    )  # fmt: skip
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "lib/modules/a.ko").read_bytes() == b"abc"


def test_read_cpio_accepts_gzip() -> None:
    data = write_cpio(sample_entries())
    assert read_cpio(gzip.compress(data)) == read_cpio(data)


# --- modules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, name",
    [
        ("kernel/drivers/virtio/virtio.ko", "virtio"),
        ("kernel/drivers/char/hw_random/virtio-rng.ko.xz", "virtio_rng"),
        ("x/net_failover.ko.zst", "net_failover"),
        ("overlay.ko.gz", "overlay"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_module_order_dependencies_first() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    order = resolve_module_order(deps, WANTED, ("virtio_rng", "not_there"))
    names = [n for n, _ in order]
    assert names == [*WANTED, "virtio_rng"]
    assert dict(order)["virtio_rng"] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
    for name, _ in order:
        for dep in deps[name][1]:
            assert names.index(dep) < names.index(name)


def test_module_order_pulls_in_unlisted_dependencies() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    names = [n for n, _ in resolve_module_order(deps, ["virtio_net"])]
    assert names == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net"]


def test_module_order_skips_builtins() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    builtin = parse_modules_builtin(
        "kernel/drivers/virtio/virtio_ring.ko\nkernel/fs/overlayfs/overlay.ko\n"
    )
    del deps["virtio_ring"], deps["overlay"]
    names = [n for n, _ in resolve_module_order(deps, WANTED, (), builtin)]
    assert "virtio_ring" not in names and "overlay" not in names
    assert names[0] == "virtio"


def test_module_order_missing_and_cycle() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    with pytest.raises(ImageBuildFailed, match="virtio_scsi|scsi_mod"):
        resolve_module_order(deps, ["virtio_scsi"])  # scsi_mod is not in modules.dep
    cyclic = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ImageBuildFailed, match="cycle"):
        resolve_module_order(cyclic, ["a"])


def test_parse_modules_dep_rejects_garbage() -> None:
    with pytest.raises(ImageBuildFailed, match="line 2"):
        parse_modules_dep("a.ko:\nthis line has no colon\n")


def test_read_module_decompresses(tmp_path: Path) -> None:
    import lzma

    raw = b"\x7fELF module bytes" * 50
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "n.ko.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "o.ko").write_bytes(raw)
    assert read_module(tmp_path / "m.ko.xz") == raw
    assert read_module(tmp_path / "n.ko.gz") == raw
    assert read_module(tmp_path / "o.ko") == raw
    if shutil.which("zstd"):
        zst = tmp_path / "p.ko.zst"
        subprocess.run(["zstd", "-q", "-f", str(tmp_path / "o.ko"), "-o", str(zst)], check=True)
        assert read_module(tmp_path / "p.ko.zst") == raw


def test_initramfs_entries_layout() -> None:
    modules = [("virtio_ring", b"r"), ("virtio", b"v")]
    entries = initramfs_entries(
        b"#!/bin/busybox sh\n", b"BB", ["bin/sh", "sbin/switch_root", "linuxrc"], modules
    )
    back = {e.name: e for e in read_cpio(write_cpio(entries))}
    assert back["etc/modules-order"].data == b"virtio_ring\nvirtio\n"
    assert back["lib/modules/virtio.ko"].data == b"v"
    assert back["sbin/switch_root"].data == b"/bin/busybox"
    assert "linuxrc" not in back
    assert stat.S_IMODE(back["init"].mode) == 0o755
    for d in ("proc", "sys", "newroot", "overlay", "run", "tmp"):
        assert back[d].is_dir
