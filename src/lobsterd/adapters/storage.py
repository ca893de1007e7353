"""Per-tenant filesystem: one ext4 volume per tenant, loop-mounted on the host.

Why a filesystem of its own: a tenant that fills its disk (overlay, snapshots) fills
only its own volume, never the host's ``/var``; its files share no inode table,
quota or free-space pool with anyone; and ``nodev,nosuid,noexec`` make whatever lands
there inert on the host. Layout (docs/architecture.md, "Per-tenant filesystem")::

    <state>/volumes/<name>.img            sparse backing file (root 0600)
    <state>/tenants/<name>/               its mount point (root 0700 once mounted)
        overlay.ext4                      the guest's /dev/vdb (root 0600)
        jail/                             the VMM's empty chroot (root 0755)
        snapshots/                        suspend snapshots (root 0700)

The overlay stays root-owned 0600: QEMU opens its disks as root *before* it chroots and
drops to the tenant's uid, so the tenant's uid never needs (nor gets) access to the
file, even through a compromised VMM.

Every step is idempotent, and "done" is marked by an atomic rename (a backing file or
overlay exists under its final name only once ``mkfs`` finished), so a crash at any
point leaves something ``create`` completes or ``destroy`` removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lobsterd.adapters.proc import run
from lobsterd.config import Config
from lobsterd.core.names import validate_name
from lobsterd.errors import ExecFailed, ExecTimeout, StorageError

MOUNT_OPTIONS = "loop,nodev,nosuid,noexec"
OVERLAY_LABEL = "lobster-overlay"
VOLUME_LABEL = "lobster-volume"
MKFS_TIMEOUT_S = 300.0
_OCTAL_RE = re.compile(r"\\([0-7]{3})")
MOUNT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class VolumePaths:
    image: Path
    mountpoint: Path
    overlay: Path
    jail: Path
    snapshots: Path


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(" "), right.split(" ")
        if len(lf) < 6 or len(rf) < 2:
            continue
        entries.append(MountEntry(_unescape(lf[4]), rf[0], _unescape(rf[1]), lf[5]))
    return entries


def mounts() -> list[MountEntry]:
    try:
        return parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError as exc:
        raise StorageError(f"cannot read /proc/self/mountinfo: {exc.strerror or exc}") from None


def loop_backing_file(device: str) -> str | None:
    """The file behind ``/dev/loopN`` (None when it is not a bound loop device)."""
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    try:
        text = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return text.removesuffix(" (deleted)")


def loops_for(image: Path) -> list[str]:
    """Every loop device currently bound to ``image``."""
    target = os.path.realpath(image)
    found = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return []
    for name in names:
        backing = loop_backing_file(name)
        if backing and os.path.realpath(backing) == target:
            found.append(f"/dev/{name}")
    return found


def volume_size_mib(cfg: Config, mem_mib: int | None = None) -> int:
    """Overlay + room for one memory snapshot + headroom for filesystem metadata."""
    mem = cfg.vm.mem_mib if mem_mib is None else mem_mib
    return cfg.storage.overlay_size_mib + mem + cfg.storage.volume_headroom_mib


def _mkfs(path: Path, size_mib: int, label: str, extra: list[str]) -> None:
    """Write a sparse file of ``size_mib`` and an ext4 filesystem into it."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_mib << 20)
    finally:
        os.close(fd)
    try:
        run(
            ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", *extra, str(path)],
            timeout=MKFS_TIMEOUT_S,
        )
    except (ExecFailed, ExecTimeout) as exc:
        path.unlink(missing_ok=True)
        raise StorageError(f"cannot create ext4 filesystem {path}: {exc.message}") from None


class TenantVolume:
    """The tenant's own filesystem; see the module docstring."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg
        self.name = validate_name(name)
        mnt = cfg.paths.tenants_mnt / name
        self.paths = VolumePaths(
            image=cfg.paths.volumes / f"{name}.img",
            mountpoint=mnt,
            overlay=mnt / "overlay.ext4",
            jail=mnt / "jail",
            snapshots=mnt / "snapshots",
        )
        self._tmp_image = cfg.paths.volumes / f".{name}.img.tmp"

    # --- state ------------------------------------------------------------------------

    def _mount_entry(self) -> MountEntry | None:
        target = os.path.realpath(self.paths.mountpoint)
        found = None
        for entry in mounts():
            if entry.mountpoint == target:
                found = entry  # the last one is the one on top
        return found

    def is_mounted(self) -> bool:
        return self._mount_entry() is not None

    # --- lifecycle ----------------------------------------------------------------------

    def create(self, size_mib: int | None = None) -> VolumePaths:
        """Create, mount and populate the volume; finish a half-done one; idempotent.

        ``size_mib`` is a floor: the volume is never smaller than
        :func:`volume_size_mib` (overlay + one memory snapshot + headroom). The file is
        sparse, so the size is a cap on what the tenant can use, not space taken.
        """
        size = max(size_mib or 0, volume_size_mib(self.cfg))
        for d in (self.cfg.paths.volumes, self.cfg.paths.tenants_mnt):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        if not self.paths.image.exists():
            _mkfs(self._tmp_image, size, VOLUME_LABEL, ["-m", "0"])
            os.replace(self._tmp_image, self.paths.image)
        self.mount()
        self._populate()
        return self.paths

    def _populate(self) -> None:
        p = self.paths
        if not p.overlay.exists():
            tmp = p.mountpoint / ".overlay.ext4.tmp"
            _mkfs(tmp, self.cfg.storage.overlay_size_mib, OVERLAY_LABEL, [])
            os.replace(tmp, p.overlay)
        os.chown(p.overlay, 0, 0)
        p.overlay.chmod(0o600)
        for d, mode in ((p.jail, 0o755), (p.snapshots, 0o700)):
            d.mkdir(exist_ok=True)
            os.chown(d, 0, 0)
            d.chmod(mode)
        if any(p.jail.iterdir()):
            raise StorageError(
                f"jail {p.jail} is not empty: the VMM's chroot must contain nothing",
                hint=f"inspect it, then: lobsterd evict {self.name}",
            )

    def mount(self) -> None:
        """Mount the volume (after a host reboot); no-op when already mounted."""
        entry = self._mount_entry()
        if entry is not None:
            backing = loop_backing_file(entry.source)
            if backing is None or os.path.realpath(backing) != os.path.realpath(
                self.paths.image
            ):
                raise StorageError(
                    f"{self.paths.mountpoint} has {entry.source} mounted, not this tenant's "
                    "volume",
                    hint="unmount it by hand",
                )
            return
        if not self.paths.image.is_file():
            raise StorageError(
                f'volume of tenant "{self.name}" is missing ({self.paths.image})',
                hint=f"evict and re-spawn the tenant: lobsterd evict {self.name}",
            )
        self.paths.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            run(
                ["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(self.paths.image),
                 str(self.paths.mountpoint)],
                timeout=MOUNT_TIMEOUT_S,
            )
        except (ExecFailed, ExecTimeout) as exc:
            raise StorageError(
                f'cannot mount the volume of tenant "{self.name}": {exc.message}',
                hint="check free loop devices (losetup -a) and the image (e2fsck -n)",
            ) from None
        self.paths.mountpoint.chmod(0o700)

    def unmount(self) -> None:
        """Unmount and release the loop device; lazy unmount if busy; idempotent."""
        mp = str(self.paths.mountpoint)
        while self.is_mounted():
            try:
                run(["umount", mp], timeout=MOUNT_TIMEOUT_S)
            except (ExecFailed, ExecTimeout):
                try:
                    run(["umount", "-l", mp], timeout=MOUNT_TIMEOUT_S)
                except (ExecFailed, ExecTimeout) as exc:
                    raise StorageError(
                        f'cannot unmount the volume of tenant "{self.name}": {exc.message}'
                    ) from None
        for dev in loops_for(self.paths.image):
            # mount -o loop sets autoclear; this catches loops left by a crash.
            with contextlib.suppress(ExecFailed, ExecTimeout):
                run(["losetup", "-d", dev], timeout=MOUNT_TIMEOUT_S)

    def destroy(self) -> None:
        """Unmount and delete everything; safe on a half-created or absent volume."""
        self.unmount()
        if self.is_mounted():
            raise StorageError(f"{self.paths.mountpoint} is still mounted; not deleting")
        mp = self.paths.mountpoint
        if mp.is_dir():
            # Not a mount point any more: whatever is left is debris of a failed create.
            shutil.rmtree(mp)
        for f in (self.paths.image, self._tmp_image):
            f.unlink(missing_ok=True)
