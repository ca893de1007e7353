"""Per-tenant volumes on real loop devices and ext4 (root)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lobsterd.adapters.storage import TenantVolume, loops_for, mounts, volume_size_mib
from lobsterd.config import Config
from lobsterd.errors import StorageError
from tests.helpers import make_config, need, need_binary, need_root

pytestmark = pytest.mark.integration


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    need_root()
    need_binary("mkfs.ext4", "mount", "umount", "losetup")
    need(Path("/dev/loop-control").exists(), "needs loop devices (/dev/loop-control)")
    return make_config(tmp_path, storage={"overlay_size_mib": 256, "volume_headroom_mib": 64},
                       vm={"mem_mib": 128})


@pytest.fixture
def volume(cfg: Config) -> Iterator[TenantVolume]:
    vol = TenantVolume(cfg, "alice")
    try:
        yield vol
    finally:
        vol.destroy()


def _mount_of(path: Path) -> tuple[str, str] | None:
    for m in mounts():
        if m.mountpoint == str(path):
            return m.source, m.options
    return None


def _ext4_label(path: Path) -> str:
    with path.open("rb") as fh:
        fh.seek(1024)
        sb = fh.read(1024)
    assert sb[56:58] == b"\x53\xef", "not an ext2/3/4 superblock"
    return sb[120:136].rstrip(b"\0").decode()


def test_create_layout(volume: TenantVolume, cfg: Config) -> None:
    p = volume.create(cfg.storage.overlay_size_mib)  # a floor: the volume gets bigger
    assert volume.is_mounted()
    mounted = _mount_of(p.mountpoint)
    assert mounted is not None
    source, options = mounted
    assert source.startswith("/dev/loop")
    # nodev/nosuid/noexec are per-mount flags: they show in the mount options
    assert {"nodev", "nosuid", "noexec"} <= set(options.split(","))
    assert loops_for(p.image) == [source]

    img = p.image.stat()
    assert img.st_size == volume_size_mib(cfg) << 20 == (256 + 128 + 64) << 20
    assert img.st_blocks * 512 < img.st_size // 4, "backing file must be sparse"
    assert stat.S_IMODE(img.st_mode) == 0o600

    ovl = p.overlay.stat()
    assert (ovl.st_uid, ovl.st_gid, stat.S_IMODE(ovl.st_mode)) == (0, 0, 0o600)
    assert ovl.st_size == 256 << 20
    assert ovl.st_blocks * 512 < ovl.st_size // 4
    assert _ext4_label(p.overlay) == "lobster-overlay"

    jail = p.jail.stat()
    assert (jail.st_uid, stat.S_IMODE(jail.st_mode)) == (0, 0o755)
    assert list(p.jail.iterdir()) == []
    assert stat.S_IMODE(p.snapshots.stat().st_mode) == 0o700
    assert stat.S_IMODE(p.mountpoint.stat().st_mode) == 0o700

    # it really is a filesystem of its own, of the volume's size
    assert os.stat(p.mountpoint).st_dev != os.stat(cfg.paths.state_dir).st_dev
    vfs = os.statvfs(p.mountpoint)
    assert 300 << 20 < vfs.f_blocks * vfs.f_frsize <= img.st_size


def test_noexec_nodev(volume: TenantVolume) -> None:
    p = volume.create()
    exe = p.snapshots / "true"
    shutil.copy2("/bin/true", exe)
    exe.chmod(0o755)
    with pytest.raises(PermissionError):
        subprocess.run([str(exe)], check=False, timeout=5)
    os.mknod(p.snapshots / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(PermissionError):
        (p.snapshots / "null").open("rb")


def test_idempotent_and_survives_remount(volume: TenantVolume) -> None:
    p = volume.create()
    (p.snapshots / "marker").write_text("kept")
    ovl_ino = p.overlay.stat().st_ino
    assert volume.create() == p  # second create: nothing re-made
    assert p.overlay.stat().st_ino == ovl_ino

    volume.unmount()
    assert not volume.is_mounted()
    assert loops_for(p.image) == []
    assert not p.overlay.exists()
    volume.unmount()  # idempotent

    volume.mount()
    volume.mount()  # idempotent
    assert volume.is_mounted()
    assert (p.snapshots / "marker").read_text() == "kept"
    assert len(loops_for(p.image)) == 1


def test_destroy_leaves_nothing(volume: TenantVolume, cfg: Config) -> None:
    p = volume.create()
    volume.destroy()
    assert not volume.is_mounted()
    assert _mount_of(p.mountpoint) is None
    assert loops_for(p.image) == []
    assert not p.image.exists()
    assert not p.mountpoint.exists()
    assert list(cfg.paths.volumes.iterdir()) == []
    assert list(cfg.paths.tenants_mnt.iterdir()) == []
    volume.destroy()  # idempotent


def test_destroy_while_busy_uses_lazy_unmount(volume: TenantVolume) -> None:
    p = volume.create()
    fh = (p.snapshots / "open").open("w")  # keeps the filesystem busy
    try:
        volume.destroy()
        assert _mount_of(p.mountpoint) is None
        assert not p.image.exists()
    finally:
        fh.close()


def test_half_created_volumes(volume: TenantVolume, cfg: Config) -> None:
    # crash during mkfs of the backing file: only the temporary exists
    cfg.paths.volumes.mkdir(parents=True)
    tmp = cfg.paths.volumes / ".alice.img.tmp"
    tmp.write_bytes(b"partial")
    volume.destroy()
    assert not tmp.exists()

    # crash during mkfs of the overlay: create() finishes the job
    p = volume.create()
    p.overlay.unlink()
    (p.mountpoint / ".overlay.ext4.tmp").write_bytes(b"partial")
    volume.create()
    assert _ext4_label(p.overlay) == "lobster-overlay"
    assert not (p.mountpoint / ".overlay.ext4.tmp").exists()

    # crash after the backing file, before the mount: create() mounts it
    volume.unmount()
    volume.create()
    assert volume.is_mounted()


def test_mount_of_missing_volume_fails_clearly(volume: TenantVolume) -> None:
    with pytest.raises(StorageError, match="missing"):
        volume.mount()


def test_foreign_mount_is_refused(volume: TenantVolume, cfg: Config) -> None:
    p = volume.create()
    other = TenantVolume(cfg, "bob")
    try:
        other.create()
        volume.unmount()
        subprocess.run(["mount", "--bind", str(other.paths.mountpoint), str(p.mountpoint)],
                       check=True, timeout=10)
        try:
            with pytest.raises(StorageError, match="not this tenant's volume"):
                volume.mount()
        finally:
            subprocess.run(["umount", str(p.mountpoint)], check=True, timeout=10)
    finally:
        other.destroy()
