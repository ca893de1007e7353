"""The guest root filesystem: Debian minbase + Python + dropbear, hardened, as ext4.

Two stages, cached separately:

* the **base tree** (``debootstrap`` plus Debian's security updates) depends only on the
  suite, variant and package list, and is cached under ``<cache>/rootfs-base/<key>/``
  (root-only: it still holds setuid binaries and package managers);
* the **image** is a copy of the base with the guest files installed, hardened, and
  packed with ``mkfs.ext4 -d``. Changing a guest file only re-runs this fast stage.

Hardening happens last, after everything is installed, and removes whole capabilities
rather than busybox links: package managers (apt, dpkg, debconf), downloaders and network
clients, reconnaissance tools, compilers and perl, ``su``, getty and serial-console
logins, every setuid/setgid bit; root is locked; ``resolv.conf`` is empty. A final audit
refuses the image if a forbidden program is still present. The tree is built on the host
and every path is resolved *inside* it, so an absolute symlink in the tree can never
make the builder write to or delete from the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from lobsterd.adapters.proc import run
from lobsterd.errors import ExecFailed, ImageBuildFailed
from lobsterd.image.apt import DEBIAN_KEYRING, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR
from lobsterd.image.util import (
    Progress,
    build_lock,
    clean_stale_tmp,
    new_tmp_dir,
    no_progress,
    publish_dir,
    remove_tree,
)

BASE_LAYOUT_VERSION = 1  # bump when the base recipe changes in a way the spec does not show
DEBOOTSTRAP_TIMEOUT_S = 1800.0
APT_TIMEOUT_S = 1200.0
MIN_ROOTFS_MIB = 512
ROOTFS_LABEL = "lobster-root"
GUEST_HOSTNAME = "lobster"
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C",
    "HOME": "/root",
}

# Directories searched for programs by the hardening audit (inside the guest).
BIN_DIRS: tuple[str, ...] = (
    "usr/bin",
    "usr/sbin",
    "usr/local/bin",
    "usr/local/sbin",
    "bin",
    "sbin",
)

# Programs that must not exist in the guest. The agent, init and gateway need none of
# them; the initramfs (busybox) configures the network before switch_root.
FORBIDDEN_PROGRAMS: dict[str, tuple[str, ...]] = {
    "package managers": (
        "apt", "apt-get", "apt-cache", "apt-key", "apt-mark", "apt-config", "apt-cdrom",
        "dpkg", "dpkg-deb", "dpkg-query", "dpkg-divert", "dpkg-split", "dpkg-trigger",
        "dpkg-statoverride", "dpkg-maintscript-helper", "dpkg-reconfigure",
        "dpkg-preconfigure", "debconf", "pip", "pip3", "npm", "npx", "gem",
    ),
    "downloaders and network clients": (
        "wget", "curl", "openssl", "dbclient", "ssh", "scp", "sftp", "rsync", "ftp",
        "tftp", "nc", "netcat", "ncat", "socat", "telnet", "gpgv", "gpg", "git",
    ),
    "reconnaissance tools": (
        "ping", "ping4", "ping6", "arping", "ip", "ss", "netstat", "arp", "ifconfig",
        "route", "traceroute", "traceroute6", "tracepath", "mtr", "nslookup", "dig",
        "host", "nmap", "tcpdump", "whois",
    ),
    "compilers and interpreters not needed at run time": (
        "cc", "gcc", "c++", "g++", "cpp", "clang", "as", "ld", "make", "tcc",
        "perl", "gdb", "strace", "ltrace",
    ),
    "privilege changers and console logins": (
        "su", "sudo", "doas", "agetty", "getty", "sulogin",
    ),
}  # fmt: skip

# Paths (globs in the last component only, relative to the guest root) removed by the
# hardening step besides every FORBIDDEN_PROGRAMS name in every BIN_DIRS directory,
# grouped by why.
REMOVE_PATTERNS: dict[str, tuple[str, ...]] = {
    "package managers": (
        "usr/bin/apt*", "usr/bin/dpkg*", "usr/sbin/dpkg*", "usr/bin/debconf*",
        "usr/sbin/update-alternatives", "usr/bin/update-alternatives",
        "usr/lib/apt", "usr/lib/dpkg", "usr/share/debconf", "usr/share/keyrings",
        "etc/apt", "var/lib/apt", "var/cache/apt", "var/cache/debconf",
        "usr/bin/pip*", "etc/cron.daily", "etc/cron.d",
    ),
    "downloaders and network clients": (
        "usr/bin/c_rehash", "usr/bin/nc.*", "usr/bin/telnet.*",
    ),
    "reconnaissance tools": (
        "usr/bin/ping*", "usr/bin/traceroute*", "usr/sbin/traceroute*",
    ),
    "compilers and interpreters not needed at run time": (
        "usr/bin/perl*", "usr/bin/cpan*", "usr/lib/x86_64-linux-gnu/perl*",
        "usr/share/perl*", "usr/bin/gcc*", "usr/bin/g++*", "usr/bin/cpp*",
        "usr/bin/ld.*", "usr/bin/x86_64-linux-gnu-*",
    ),
    "privilege changers and console logins": (
        "etc/inittab", "etc/securetty", "etc/systemd",
        "usr/lib/systemd/system/getty*", "usr/lib/systemd/system/serial-getty*",
        "usr/lib/systemd/system/console-getty*", "etc/init.d", "etc/rc?.d",
    ),
    "documentation, locales and caches": (
        "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
        "usr/share/lintian", "usr/share/linda", "usr/share/bug", "usr/share/doc-base",
        "usr/share/common-licenses", "usr/share/bash-completion", "usr/share/menu",
        "usr/lib/python3.11/pydoc_data", "var/cache/ldconfig", "var/log/*",
        "var/lib/dpkg/*-old", "tmp/*", "var/tmp/*", "root/.cache",
    ),
}  # fmt: skip


def hardening_patterns() -> dict[str, list[str]]:
    """Everything the hardening step removes: forbidden programs in every bin directory
    (the legacy /bin and /sbin are symlinks into /usr on Debian) plus REMOVE_PATTERNS."""
    out: dict[str, list[str]] = {}
    for why in dict.fromkeys([*FORBIDDEN_PROGRAMS, *REMOVE_PATTERNS]):
        progs = FORBIDDEN_PROGRAMS.get(why, ())
        out[why] = [f"{d}/{name}" for name in progs for d in BIN_DIRS]
        out[why] += REMOVE_PATTERNS.get(why, ())
    return out


# What the guest really runs; the smoke test refuses an image without them.
RUNTIME_PROGRAMS: tuple[str, ...] = (
    "usr/bin/python3",
    "usr/sbin/dropbear",
    "usr/bin/dropbearkey",
    "bin/sh",
    "bin/bash",
)
RUNTIME_PY_MODULES: tuple[str, ...] = (
    "json", "ssl", "asyncio", "hmac", "hashlib", "http.server", "ctypes", "selectors",
    "logging.handlers", "subprocess", "ipaddress", "socket", "threading", "base64",
)  # fmt: skip


@dataclass(frozen=True)
class BaseSpec:
    """Everything the debootstrap stage depends on (its cache key is a hash of this)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    include: tuple[str, ...] = ("python3", "dropbear-bin", "ca-certificates")
    mirror: str = DEBIAN_MIRROR
    security_mirror: str = DEBIAN_SECURITY_MIRROR
    security_updates: bool = True
    layout: int = BASE_LAYOUT_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class GuestFile:
    """A file lobsterd installs into the guest: source bytes, destination, mode."""

    dest: str  # relative to the guest root
    data: bytes
    mode: int


DEFAULT_BASE = BaseSpec()


@dataclass
class RootfsInfo:
    size_bytes: int
    content_bytes: int
    files: int
    removed: dict[str, list[str]] = field(default_factory=dict)
    setuid_stripped: list[str] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)


# --- safe paths inside a tree --------------------------------------------------------


def resolve_in_root(root: Path, rel: str, *, follow_last: bool = True) -> Path:
    """Resolve ``rel`` inside ``root`` as if ``root`` were ``/``.

    Symlinks are followed component by component; absolute targets are taken relative
    to ``root`` and ``..`` never climbs above it, so the result is always inside it.
    """
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and (parts or follow_last):
            hops += 1
            if hops > 40:
                raise ImageBuildFailed(f"too many symlinks resolving {rel} in the guest tree")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def remove_matching(root: Path, patterns: Iterable[str]) -> list[str]:
    """Remove every path matching ``patterns`` (glob in the last component); return them."""
    removed: list[str] = []
    for pattern in patterns:
        parent_rel, _, leaf = pattern.rpartition("/")
        parent = resolve_in_root(root, parent_rel)
        if not parent.is_dir() or parent.is_symlink():
            continue
        for entry in sorted(parent.iterdir()):
            if fnmatchcase(entry.name, leaf):
                remove_tree(entry)
                removed.append("/" + str(entry.relative_to(root)))
    return sorted(set(removed))


def break_hard_link(path: Path) -> None:
    """Give ``path`` an inode of its own before changing it in place.

    The staging tree is a hard-link copy of the cached base tree; changing a shared inode
    (its mode, its bytes) would silently change the cache too.
    """
    if path.lstat().st_nlink > 1:
        tmp = path.with_name(f".{path.name}.lobster-copy")
        shutil.copy2(path, tmp, follow_symlinks=False)
        os.chown(tmp, path.lstat().st_uid, path.lstat().st_gid, follow_symlinks=False)
        os.chmod(tmp, stat.S_IMODE(path.lstat().st_mode))
        os.replace(tmp, path)


def strip_setuid(root: Path) -> list[str]:
    """Clear setuid/setgid bits on every regular file: no privilege changes in the guest."""
    stripped: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                break_hard_link(path)
                path.chmod(stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
                stripped.append("/" + str(path.relative_to(root)))
    return sorted(stripped)


def find_forbidden(names_by_dir: Mapping[str, Iterable[str]]) -> list[str]:
    """Forbidden programs present, given the file names found in each of ``BIN_DIRS``."""
    forbidden = {n for group in FORBIDDEN_PROGRAMS.values() for n in group}
    hits = {
        f"/{d}/{name}" for d, names in names_by_dir.items() for name in names if name in forbidden
    }
    return sorted(hits)


def audit_tree(root: Path) -> list[str]:
    """Forbidden programs still present in the guest tree ``root``."""
    found: dict[str, list[str]] = {}
    for d in BIN_DIRS:
        path = resolve_in_root(root, d)
        if path.is_dir():
            found[d] = [e.name for e in path.iterdir()]
    return find_forbidden(found)


def lock_root(shadow_text: str) -> str:
    """/etc/shadow with root's password field set to ``!`` (locked, no password login)."""
    out = []
    found = False
    for line in shadow_text.splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            fields[1] = "!"
            found = True
        out.append(":".join(fields))
    if not found:
        raise ImageBuildFailed("the guest's /etc/shadow has no root entry")
    return "\n".join(out) + "\n"


def dpkg_packages(status_text: str) -> dict[str, str]:
    """Installed packages and versions from a dpkg ``status`` file (an inventory for scanners)."""
    packages: dict[str, str] = {}
    for para in status_text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(packages.items()))


# --- stage 1: the base tree ----------------------------------------------------------


def _chroot(tree: Path, argv: Sequence[str], timeout: float) -> None:
    run(["chroot", str(tree), *argv], timeout=timeout, env=CHROOT_ENV)


def ensure_base(
    cache_dir: Path,
    spec: BaseSpec = DEFAULT_BASE,
    *,
    force: bool = False,
    progress: Progress = no_progress,
) -> Path:
    """Return the cached debootstrap tree for ``spec``, building it when missing."""
    bases = cache_dir / "rootfs-base"
    bases.mkdir(parents=True, exist_ok=True)
    bases.chmod(0o700)  # the unhardened tree still has setuid binaries: host root only
    final = bases / spec.key()
    marker = final / "base.json"
    if marker.is_file() and not force:
        progress("rootfs-base", f"debootstrap tree {spec.key()} cached")
        return final / "tree"
    with build_lock(bases / ".lock", "base root filesystem"):
        if marker.is_file() and not force:
            return final / "tree"
        clean_stale_tmp(bases)
        tmp = new_tmp_dir(bases, spec.key(), mode=0o700)
        try:
            _debootstrap(tmp / "tree", spec, progress)
            packages = dpkg_packages((tmp / "tree/var/lib/dpkg/status").read_text())
            info = {"spec": asdict(spec), "packages": packages}
            (tmp / "base.json").write_text(json.dumps(info, indent=2) + "\n")
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final / "tree"


def _debootstrap(tree: Path, spec: BaseSpec, progress: Progress) -> None:
    if not DEBIAN_KEYRING.is_file():
        raise ImageBuildFailed(
            f"{DEBIAN_KEYRING} is missing", hint="install the debian-archive-keyring package"
        )
    if shutil.which("debootstrap") is None:
        raise ImageBuildFailed("debootstrap is not installed", hint="apt-get install debootstrap")
    progress("rootfs-base", f"debootstrap {spec.variant} {spec.suite} (takes a few minutes)")
    argv = [
        "debootstrap",
        f"--variant={spec.variant}",
        f"--include={','.join(spec.include)}",
        f"--keyring={DEBIAN_KEYRING}",
        spec.suite,
        str(tree),
        spec.mirror,
    ]
    try:
        run(argv, timeout=DEBOOTSTRAP_TIMEOUT_S, env=CHROOT_ENV)
    except ExecFailed as exc:
        raise ImageBuildFailed(
            f"debootstrap failed: {exc.message}",
            hint=f"check that {spec.mirror} is reachable; the log is in {tree}/debootstrap",
        ) from None
    if spec.security_updates:
        progress("rootfs-base", "applying Debian security and stable updates")
        sources = (
            f"deb {spec.mirror} {spec.suite} main\n"
            f"deb {spec.mirror} {spec.suite}-updates main\n"
            f"deb {spec.security_mirror} {spec.suite}-security main\n"
        )
        (tree / "etc/apt/sources.list").write_text(sources)
        try:
            _chroot(tree, ["apt-get", "-q", "update"], APT_TIMEOUT_S)
            _chroot(
                tree,
                ["apt-get", "-q", "-y", "-o", "Dpkg::Options::=--force-confold", "dist-upgrade"],
                APT_TIMEOUT_S,
            )
            _chroot(tree, ["apt-get", "clean"], 120)
            lists = tree / "var/lib/apt/lists"
            for entry in lists.iterdir():  # package indexes: ~80 MB nothing uses later
                if entry.is_file() and entry.name != "lock":
                    entry.unlink()
        except ExecFailed as exc:
            raise ImageBuildFailed(f"updating the guest packages failed: {exc.message}") from None


# --- stage 2: the image --------------------------------------------------------------


def install_file(root: Path, gf: GuestFile) -> None:
    """Write ``gf`` into the tree (parents created, any old file or link replaced)."""
    parent_rel, _, name = gf.dest.strip("/").rpartition("/")
    parent = resolve_in_root(root, parent_rel)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / name
    if target.is_symlink() or target.exists():
        remove_tree(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(gf.data)
    if os.geteuid() == 0:
        os.chown(target, 0, 0)
    target.chmod(gf.mode)


def configure_guest(root: Path) -> None:
    """Identity and name resolution of the guest: nothing points at a public resolver."""
    etc = resolve_in_root(root, "etc")
    for name, text in (
        ("resolv.conf", ""),
        ("hostname", f"{GUEST_HOSTNAME}\n"),
        ("hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n::1\tlocalhost\n"),
    ):
        install_file(root, GuestFile(f"etc/{name}", text.encode(), 0o644))
    shadow = etc / "shadow"
    install_file(root, GuestFile("etc/shadow", lock_root(shadow.read_text()).encode(), 0o640))
    for d, mode in (("etc/dropbear", 0o700), ("root/.ssh", 0o700), ("usr/lib/lobster", 0o755)):
        path = resolve_in_root(root, d)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    for old in (resolve_in_root(root, "etc/dropbear")).glob("*host_key*"):
        old.unlink()  # a host key in a shared image would be shared by every tenant


def harden(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Remove everything in ``REMOVE_PATTERNS`` and strip setuid bits; return what went."""
    removed = {why: remove_matching(root, pats) for why, pats in hardening_patterns().items()}
    stripped = strip_setuid(root)
    left = audit_tree(root)
    if left:
        raise ImageBuildFailed(f"hardening left forbidden programs in the image: {', '.join(left)}")
    return removed, stripped


def smoke_test(root: Path) -> None:
    """Check the hardened tree still runs what the guest needs (before packing it)."""
    for program in RUNTIME_PROGRAMS:
        if not resolve_in_root(root, program).is_file():
            raise ImageBuildFailed(f"the hardened image lacks /{program}, which the guest needs")
    try:
        _chroot(root, ["python3", "-c", "import " + ", ".join(RUNTIME_PY_MODULES)], 120)
    except ExecFailed as exc:
        raise ImageBuildFailed(
            f"the hardened image's Python lacks modules the guest needs: {exc.message}"
        ) from None


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes the tree needs on ext4 with 4 KiB blocks, number of inodes)."""
    total = 0
    count = 0
    for dirpath, dirs, files in os.walk(root):
        count += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += -(-st.st_size // 4096) * 4096
        total += 4096 * len(dirs)
    return total, count


def rootfs_size_mib(content_bytes: int) -> int:
    """Content plus ~25 % (and journal/metadata), rounded up to 64 MiB, at least 512 MiB."""
    want = int(content_bytes * 1.25) + (64 << 20)
    mib = -(-want // (64 << 20)) * 64
    return max(MIN_ROOTFS_MIB, mib)


def make_ext4(tree: Path, out: Path, key: str) -> int:
    """Pack ``tree`` into an ext4 image at ``out``; return the image size in bytes."""
    content, inodes = tree_usage(tree)
    size_mib = rootfs_size_mib(content)
    fs_uuid = str(uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32]))
    out.unlink(missing_ok=True)
    argv = [
        "mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", ROOTFS_LABEL, "-U", fs_uuid,
        "-N", str(max(inodes * 2, 32768)), "-m", "0", "-E", f"hash_seed={fs_uuid}",
        str(out), f"{size_mib}M",
    ]  # fmt: skip
    try:
        run(argv, timeout=600, env={"PATH": CHROOT_ENV["PATH"], "LC_ALL": "C"})
    except ExecFailed as exc:
        raise ImageBuildFailed(
            f"mkfs.ext4 failed: {exc.message}", hint="install e2fsprogs"
        ) from None
    out.chmod(0o644)
    return out.stat().st_size


def build_rootfs(
    base_tree: Path,
    files: Sequence[GuestFile],
    out: Path,
    work: Path,
    key: str,
    *,
    progress: Progress = no_progress,
) -> RootfsInfo:
    """Copy the base tree, install ``files``, harden, and write ``out`` (ext4)."""
    staging = work / "rootfs"
    remove_tree(staging)
    progress("rootfs", "copying the base tree (hard links)")
    # A hard-link copy takes a second instead of copying ~250 MB. It is safe because the
    # steps below only ever unlink, create or replace files, never write into one in
    # place (install_file replaces, break_hard_link guards the chmods).
    try:
        run(["cp", "-a", "--link", str(base_tree), str(staging)], timeout=600)
    except ExecFailed:  # another filesystem: copy for real
        remove_tree(staging)
        run(["cp", "-a", str(base_tree), str(staging)], timeout=1200)
    try:
        packages = dpkg_packages((staging / "var/lib/dpkg/status").read_text())
        progress("rootfs", f"installing {len(files)} guest files")
        for gf in files:
            install_file(staging, gf)
        py_dirs = sorted({"/" + g.dest.rpartition("/")[0] for g in files if g.dest.endswith(".py")})
        if py_dirs:
            # Byte-compile the guest modules now: the image is read-only at run time.
            _chroot(staging, ["python3", "-m", "compileall", "-q", *py_dirs], 300)
        configure_guest(staging)
        progress("rootfs", "hardening (package managers, downloaders, recon tools, logins)")
        removed, stripped = harden(staging)
        smoke_test(staging)
        content, nfiles = tree_usage(staging)
        progress("rootfs", f"mkfs.ext4 ({content >> 20} MiB of content)")
        size = make_ext4(staging, out, key)
    finally:
        remove_tree(staging)
    return RootfsInfo(size, content, nfiles, removed, stripped, packages)


# --- reading a built image without mounting it --------------------------------------


def ext4_stat(image: Path, path: str) -> dict[str, Any] | None:
    """Mode, uid and size of ``path`` in an ext4 image, or None when it does not exist."""
    parent, _, name = path.rstrip("/").rpartition("/")
    try:
        entries = ext4_entries(image, parent or "/")
    except ImageBuildFailed:
        return None
    return entries.get(name)


def ext4_entries(image: Path, path: str) -> dict[str, dict[str, Any]]:
    """Entries of directory ``path`` in an ext4 image (via ``debugfs``, no mount needed)."""
    res = run(["debugfs", "-R", f"ls -p {path}", str(image)], timeout=60)
    out: dict[str, dict[str, Any]] = {}
    for line in res.stdout.splitlines():
        fields = line.strip().split("/")
        if len(fields) >= 7 and fields[5] not in (".", ".."):
            size = int(fields[6]) if fields[6].isdigit() else 0
            out[fields[5]] = {
                "mode": int(fields[2], 8),
                "uid": int(fields[3]),
                "gid": int(fields[4]),
                "size": size,
            }
    if not out and "File not found" in res.stderr:
        raise ImageBuildFailed(f"{path} does not exist in {image.name}")
    return out


def ext4_read(image: Path, path: str) -> str:
    """Text of file ``path`` inside an ext4 image (via ``debugfs cat``)."""
    if ext4_stat(image, path) is None:
        raise ImageBuildFailed(f"{path} does not exist in {image.name}")
    res = run(["debugfs", "-R", f"cat {path}", str(image)], timeout=60)
    return res.stdout
