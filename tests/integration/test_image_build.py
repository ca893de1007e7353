"""The real guest image: built from Debian's archive (or reused from the test cache).

The image cache is shared with the e2e tests through ``$LOBSTERD_TEST_CACHE`` (default
/var/cache/lobsterd-test): the first build takes a few minutes, later runs reuse it.
Files in the ext4 image are inspected with ``debugfs`` (no mount). One test mounts the
image read-only under a tmpfs overlay, as the guest does, and logs in over SSH with a
key through dropbear inside a fresh network namespace (loopback only): root is locked,
yet key login must work.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lobsterd.config import Config
from lobsterd.image.artifacts import ImageArtifacts, find_image, verify_image
from lobsterd.image.build import GUEST_DIR, GUEST_SOURCES, INITRAMFS_INIT, build_image
from lobsterd.image.initramfs import INITRAMFS_MODULES, read_cpio
from lobsterd.image.kernel import check_vmlinux, parse_bzimage_header
from lobsterd.image.rootfs import (
    BIN_DIRS,
    FORBIDDEN_PROGRAMS,
    ext4_entries,
    ext4_read,
    ext4_stat,
    find_forbidden,
)
from tests.helpers import make_config, need_binary, need_root

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

CACHE = Path(os.environ.get("LOBSTERD_TEST_CACHE", "/var/cache/lobsterd-test"))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    need_root()
    need_binary("debootstrap", "mkfs.ext4", "debugfs", "lz4", "dpkg-deb", "depmod",
                "apt-get", "chroot", "busybox")  # fmt: skip
    return make_config(tmp_path_factory.mktemp("img"), paths={"cache_dir": str(CACHE)})


@pytest.fixture(scope="module")
def image(cfg: Config) -> ImageArtifacts:
    return build_image(cfg, variant="test")


def test_build_is_cached_and_current(cfg: Config, image: ImageArtifacts) -> None:
    t0 = time.monotonic()
    again = build_image(cfg, variant="test")
    took = time.monotonic() - t0
    assert again == image
    assert took < 20, f"an unchanged image must not be rebuilt (took {took:.1f}s)"
    assert find_image(cfg) == image
    assert (cfg.paths.images / "current").resolve() == image.dir
    assert verify_image(image) == []
    manifest = image.manifest()
    assert manifest["key"] == image.key == image.dir.name
    assert manifest["variant"] == "test"
    for name, entry in manifest["files"].items():
        assert (image.dir / name).stat().st_size == entry["size"]


def test_kernel_artefacts(image: ImageArtifacts) -> None:
    check_vmlinux(image.vmlinux)
    assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"
    hdr = parse_bzimage_header(image.bzimage.read_bytes())
    assert hdr.payload_length > 1 << 20
    assert image.kernel_version.endswith("-cloud-amd64")


def test_initrd_contents(image: ImageArtifacts) -> None:
    members = {e.name: e for e in read_cpio(image.initrd.read_bytes())}
    init = members["init"]
    assert init.data == (GUEST_DIR / INITRAMFS_INIT).read_bytes()
    assert stat.S_IMODE(init.mode) == 0o755
    busybox = members["bin/busybox"]
    assert busybox.data[:4] == b"\x7fELF" and stat.S_IMODE(busybox.mode) == 0o755
    order = members["etc/modules-order"].data.decode().split()
    assert [m for m in order if m in INITRAMFS_MODULES] == list(INITRAMFS_MODULES)
    for name in order:
        ko = members[f"lib/modules/{name}.ko"]
        assert ko.data[:4] == b"\x7fELF", f"{name}.ko is not a plain (decompressed) module"
    assert stat.S_ISCHR(members["dev/console"].mode)


def test_rootfs_guest_files(image: ImageArtifacts) -> None:
    for src, dest, mode, variants in GUEST_SOURCES:
        if "test" not in variants:
            continue
        dest_real = dest.replace("sbin/", "usr/sbin/", 1) if dest.startswith("sbin/") else dest
        st = ext4_stat(image.rootfs, "/" + dest_real)
        assert st is not None, f"/{dest} missing from the rootfs"
        assert stat.S_IMODE(st["mode"]) == mode, f"/{dest} has mode {oct(st['mode'])}"
        assert st["uid"] == 0 and st["gid"] == 0
        assert ext4_read(image.rootfs, "/" + dest_real) == (GUEST_DIR / src).read_text()


def test_rootfs_hardening(image: ImageArtifacts) -> None:
    listing = {}
    for d in BIN_DIRS:
        st = ext4_stat(image.rootfs, "/" + d)
        if st is not None and stat.S_ISDIR(st["mode"]):
            listing[d] = ext4_entries(image.rootfs, "/" + d)
    assert find_forbidden({d: list(e) for d, e in listing.items()}) == []
    everything = {n for e in listing.values() for n in e}
    for group in FORBIDDEN_PROGRAMS.values():
        assert not everything & set(group)
    for must in ("python3", "dropbear", "dropbearkey", "bash", "lobster-init", "lobster-gateway"):
        assert must in everything
    for d, entries in listing.items():
        for name, info in entries.items():
            assert not info["mode"] & (stat.S_ISUID | stat.S_ISGID), f"/{d}/{name} is setuid"
    for gone in ("/etc/apt", "/var/lib/apt", "/var/cache/apt", "/usr/share/doc",
                 "/usr/share/man", "/usr/share/locale", "/etc/inittab", "/etc/systemd",
                 "/usr/lib/x86_64-linux-gnu/perl-base"):  # fmt: skip
        assert ext4_stat(image.rootfs, gone) is None, f"{gone} should be gone"


def test_rootfs_accounts_and_resolver(image: ImageArtifacts) -> None:
    shadow = ext4_read(image.rootfs, "/etc/shadow")
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    assert root.split(":")[1] == "!"
    resolv = ext4_stat(image.rootfs, "/etc/resolv.conf")
    assert resolv is not None and resolv["size"] == 0 and stat.S_ISREG(resolv["mode"])
    assert ext4_read(image.rootfs, "/etc/hostname").strip() == "lobster"
    dropbear_dir = ext4_entries(image.rootfs, "/etc/dropbear")
    assert not [n for n in dropbear_dir if "host_key" in n], "no shared SSH host key"
    manifest = image.manifest()
    assert "/usr/bin/apt-get" in manifest["rootfs"]["removed"]["package managers"]
    assert "python3" in manifest["rootfs"]["packages"]


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, timeout=30, capture_output=True)


@pytest.fixture
def guest_root(image: ImageArtifacts, tmp_path: Path) -> Iterator[Path]:
    """The image mounted read-only under a tmpfs overlay, like the guest's root."""
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    for d in (lower, upper, merged):
        d.mkdir()
    mounted: list[Path] = []
    try:
        _mount("-o", "ro,loop", str(image.rootfs), str(lower))
        mounted.append(lower)
        _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(upper))
        mounted.append(upper)
        (upper / "u").mkdir()
        (upper / "w").mkdir()
        _mount("-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={upper}/u,workdir={upper}/w", str(merged))  # fmt: skip
        mounted.append(merged)
        _mount("--bind", "/dev", str(merged / "dev"))
        mounted.append(merged / "dev")
        yield merged
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], timeout=30, check=False)


def test_python_and_key_login_work_with_root_locked(guest_root: Path, tmp_path: Path) -> None:
    need_binary("ssh", "ssh-keygen", "unshare", "ip")
    code = "import json, ssl, asyncio, hmac; print('ok')"
    res = subprocess.run(
        ["chroot", str(guest_root), "python3", "-c", code], check=False,
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/usr/sbin"},
    )  # fmt: skip
    assert res.stdout.strip() == "ok", res.stderr
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, timeout=30)  # fmt: skip
    ssh_dir = guest_root / "root/.ssh"
    (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    # A fresh network and PID namespace: only loopback exists, and when the script
    # ends every process in it (dropbear included) is killed by the kernel.
    script = f"""
ip link set lo up
chroot {guest_root} /usr/sbin/dropbear -R -F -E -s -j -k -p 127.0.0.1:2222 2>{tmp_path}/db.log &
for i in 1 2 3 4 5 6 7 8 9 10; do
  ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
      -o ConnectTimeout=5 -i {key} -p 2222 root@127.0.0.1 \
      'id -u; wc -c < /etc/resolv.conf; command -v apt-get wget curl ping ip || true' \
      && exit 0
  sleep 0.5
done
exit 1
"""
    res = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "sh", "-c", script], check=False,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = (tmp_path / "db.log").read_text() if (tmp_path / "db.log").exists() else ""
    assert res.returncode == 0, f"ssh failed: {res.stderr[-500:]} / dropbear: {log[-500:]}"
    assert res.stdout.split() == ["0", "0"], res.stdout
    assert "Pubkey auth succeeded for 'root'" in log
