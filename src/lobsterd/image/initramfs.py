"""The guest initramfs: busybox, ``/init`` and the modules needed to reach the root disk.

Debian's cloud kernel has virtio and overlayfs as modules, so a tiny initramfs loads them
(in dependency order, from ``/etc/modules-order``), mounts the root and overlay disks and
switches root. The archive is written here in Python (cpio "newc") rather than with the
``cpio`` tool: entries are sorted and every timestamp and inode number is fixed, so the
same inputs always give the same bytes, and device nodes such as ``/dev/console`` can be
included without root.

Layout inside the archive::

    /init                    the initramfs init script (guest/initramfs_init.sh)
    /bin/busybox             static busybox, plus /bin/<applet> symlinks
    /lib/modules/<name>.ko   plain (uncompressed) modules, '-' in names written as '_'
    /etc/modules-order       one module name per line, dependencies first
    /dev/console, /dev/null  so /init has stdio before devtmpfs is mounted
"""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lobsterd.adapters.proc import run
from lobsterd.errors import ImageBuildFailed
from lobsterd.image.kernel import KernelArtifacts
from lobsterd.image.util import Progress, no_progress

INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "overlay",
)
OPTIONAL_MODULES: tuple[str, ...] = ("virtio_rng",)
HOST_BUSYBOX = Path("/bin/busybox")

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_KO_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` has no leading '/'; symlink targets go in ``data``."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = field(default=0, compare=False)  # 0 = computed when written

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _dir(name: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | 0o755)


def _normalise(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Sort entries, add missing parent directories, reject conflicting duplicates."""
    by_name: dict[str, CpioEntry] = {}
    for given in entries:
        name = given.name.strip("/")
        if not name or name in (".", "..") or ".." in name.split("/"):
            raise ImageBuildFailed(f"invalid initramfs path {given.name!r}")
        entry = CpioEntry(
            name, given.mode, given.data, given.rdev, given.uid, given.gid, given.mtime
        )
        old = by_name.get(name)
        if old is not None and old != entry:
            raise ImageBuildFailed(f"initramfs path {name!r} added twice with different content")
        by_name[name] = entry
    for name in list(by_name):
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in by_name:
                by_name[parent] = _dir(parent)
            elif not by_name[parent].is_dir:
                raise ImageBuildFailed(f"initramfs path {parent!r} is not a directory")
    return [by_name[k] for k in sorted(by_name)]


def _header(ino: int, entry: CpioEntry, nlink: int, filesize: int, namesize: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        entry.mtime,
        filesize,
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        namesize,
        0,  # check
    )
    return _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` as a deterministic newc archive (sorted, parents first)."""
    out = bytearray()
    for ino, entry in enumerate(_normalise(entries), start=1):
        name = entry.name.encode() + b"\0"
        nlink = entry.nlink or (2 if entry.is_dir else 1)
        out += _header(ino, entry, nlink, len(entry.data), len(name))
        out += name + _pad4(110 + len(name))
        out += entry.data + _pad4(len(entry.data))
    trailer = _TRAILER.encode() + b"\0"
    out += _header(0, CpioEntry(_TRAILER, 0), 1, 0, len(trailer))
    out += trailer + _pad4(110 + len(trailer))
    return bytes(out)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (gzip-compressed or not) back into entries."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != _NEWC_MAGIC:
            raise ImageBuildFailed(f"not a newc cpio archive (bad magic at offset {pos})")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, nlink, mtime, filesize = f[1], f[2], f[3], f[4], f[5], f[6]
        namesize = f[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        if name == _TRAILER:
            return entries
        body = data[pos : pos + filesize]
        if len(body) != filesize:
            raise ImageBuildFailed(f"truncated cpio archive at member {name!r}")
        pos += filesize
        pos += -pos % 4
        entries.append(CpioEntry(name, mode, body, (f[9], f[10]), uid, gid, mtime, nlink))


# --- modules -------------------------------------------------------------------------


def module_name(path: str) -> str:
    """Kernel module name of a module file path (``virtio-rng.ko.xz`` → ``virtio_rng``)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` → {module name: (file path, [dependency names])}."""
    out: dict[str, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ImageBuildFailed(f"modules.dep line {lineno} has no ':'")
        out[module_name(path.strip())] = (path.strip(), [module_name(d) for d in deps.split()])
    return out


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def resolve_module_order(
    deps: dict[str, tuple[str, list[str]]],
    wanted: Sequence[str],
    optional: Sequence[str] = (),
    builtin: Iterable[str] = (),
) -> list[tuple[str, str]]:
    """Load order (dependencies first) for ``wanted`` + the ``optional`` modules present.

    Returns ``[(name, path in modules.dep)]``. Modules built into the kernel need no
    loading and are skipped; a wanted module that is neither a module nor built in is an
    error, as is a dependency cycle.
    """
    builtin_set = set(builtin)
    order: list[tuple[str, str]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin_set:
            return
        if name in chain:
            raise ImageBuildFailed(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in deps:
            raise ImageBuildFailed(
                f"kernel module {name!r} is neither a module nor built in",
                hint="choose a kernel that provides virtio and overlayfs",
            )
        path, requires = deps[name]
        # modules.dep lists the deepest dependency last; visiting in reverse keeps the
        # order modprobe would use.
        for dep in reversed(requires):
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, path))

    for name in wanted:
        visit(name, ())
    for name in optional:
        if name in deps:
            visit(name, ())
    return order


def read_module(path: Path) -> bytes:
    """A module file's bytes, decompressed: the initramfs' busybox ``insmod`` takes plain .ko."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        out = path.with_name(name[: -len(".zst")] + ".tmp")
        try:
            run(["zstd", "-d", "-f", "-q", str(path), "-o", str(out)], timeout=120)
            return out.read_bytes()
        finally:
            out.unlink(missing_ok=True)
    raise ImageBuildFailed(f"{path} is not a kernel module file")


# --- busybox -------------------------------------------------------------------------


def check_static_elf(path: Path) -> None:
    """Refuse a dynamically linked busybox: the initramfs has no libc to run it."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ImageBuildFailed(f"{path} is not a 64-bit ELF executable")
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            raise ImageBuildFailed(f"{path} is dynamically linked", hint="install busybox-static")


def busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/sh``, ``sbin/switch_root``…) this busybox provides."""
    res = run([str(busybox), "--list-full"], timeout=30)
    return sorted({line.strip().strip("/") for line in res.stdout.splitlines() if line.strip()})


# --- the archive ---------------------------------------------------------------------


@dataclass(frozen=True)
class InitramfsInfo:
    modules: list[str]  # load order
    members: int
    uncompressed_size: int


def initramfs_entries(
    init_script: bytes,
    busybox: bytes,
    applets: Iterable[str],
    modules: Sequence[tuple[str, bytes]],
) -> list[CpioEntry]:
    """Every member of the initramfs, from already loaded inputs (pure, for testing)."""
    entries = [
        CpioEntry("init", stat.S_IFREG | 0o755, init_script),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry(
            "etc/modules-order",
            stat.S_IFREG | 0o644,
            "".join(f"{name}\n" for name, _ in modules).encode(),
        ),
    ]
    entries += [_dir(d) for d in ("proc", "sys", "run", "tmp", "newroot", "overlay", "lib/modules")]
    for applet in applets:
        if applet in ("bin/busybox", "init") or "/" not in applet:
            continue
        entries.append(CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox"))
    for name, data in modules:
        entries.append(CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data))
    return entries


def build_initramfs(
    kernel: KernelArtifacts,
    init_script: Path,
    out: Path,
    *,
    busybox: Path = HOST_BUSYBOX,
    progress: Progress = no_progress,
) -> InitramfsInfo:
    """Write the gzip-compressed initramfs for ``kernel`` to ``out``."""
    progress("initramfs", f"resolving module order for {kernel.version}")
    if not busybox.is_file():
        raise ImageBuildFailed(f"{busybox} not found", hint="install busybox-static")
    check_static_elf(busybox)
    deps = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = parse_modules_builtin(builtin_file.read_text()) if builtin_file.is_file() else set()
    order = resolve_module_order(deps, INITRAMFS_MODULES, OPTIONAL_MODULES, builtin)
    modules = [(name, read_module(kernel.modules_dir / path)) for name, path in order]
    progress("initramfs", f"packing busybox, /init and {len(modules)} modules")
    entries = initramfs_entries(
        init_script.read_bytes(), busybox.read_bytes(), busybox_applets(busybox), modules
    )
    raw = write_cpio(entries)
    out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    out.chmod(0o644)
    return InitramfsInfo([n for n, _ in order], len(entries), len(raw))
