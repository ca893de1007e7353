"""Boot real microVMs through QemuDriver (TCG where KVM cannot run guests).

The guest is the pinned Debian cloud kernel (``ensure_kernel``) with a tiny initramfs
built here: static busybox plus the virtio modules, whose /init configures eth0 from
``lobster.ip`` and serves a few facts about itself over HTTP. The TAP lives in a network
namespace the test creates, so no packet can leave the machine; the host side talks to
the guest from inside that namespace.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lobsterd.adapters import net
from lobsterd.adapters.cgroups import Cgroup, detect_layout
from lobsterd.adapters.kvm import detect_accel, host_tsc_khz
from lobsterd.adapters.storage import TenantVolume
from lobsterd.adapters.vmm.base import VmHandle, VmSpec
from lobsterd.adapters.vmm.qemu import QemuDriver, find_orphans, pids_for_socket
from lobsterd.config import Config
from lobsterd.core.bootargs import build_boot_args
from lobsterd.errors import CgroupError, VmBootFailed, VmmError
from tests.helpers import make_config, need, need_binary, need_root

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ.get("LOBSTERD_TEST_CACHE", "/var/cache/lobsterd-test"))
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/char/hw_random/virtio-rng.ko",
)
HTTP_PORT = 8080
HOST_IP, GUEST_IP = "10.200.0.5", "10.200.0.6"
AGENT_TOKEN = "e2e-agent-token-never-in-the-guest-0123456789"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net virtio-rng
do
    insmod /lib/modules/$m.ko
done
for p in $(cat /proc/cmdline); do
    case "$p" in
        lobster.ip=*) IP="${p#lobster.ip=}" ;;
        lobster.gw=*) GW="${p#lobster.gw=}" ;;
    esac
done
cat /proc/cmdline > /www/cmdline
cat /sys/block/vda/ro > /www/vda_ro
cat /sys/block/vdb/ro > /www/vdb_ro
cat /sys/class/net/eth0/address > /www/mac
echo ok > /www/hello
ip link set lo up
ip link set eth0 up
ip addr add "$IP" dev eth0
ip route add default via "$GW"
httpd -f -p "${IP%/*}:%PORT%" -h /www &
while true; do sleep 3600; done
""".replace("%PORT%", str(HTTP_PORT))


# --- a minimal initramfs (cpio "newc") ------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def build_initramfs(dest: Path, busybox: Path, modules_dir: Path) -> None:
    parts = [_cpio_entry(d, 0o040755) for d in
             ("bin", "dev", "proc", "sys", "www", "lib", "lib/modules")]
    parts.append(_cpio_entry("dev/console", 0o020600, rdev=(5, 1)))
    parts.append(_cpio_entry("init", 0o100755, INIT.encode()))
    parts.append(_cpio_entry("bin/busybox", 0o100755, busybox.read_bytes()))
    for rel in MODULES:
        ko = modules_dir / rel
        parts.append(_cpio_entry(f"lib/modules/{ko.name}", 0o100644, ko.read_bytes()))
    parts.append(_cpio_entry("TRAILER!!!", 0))
    dest.write_bytes(b"".join(parts))


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Guest:
    cfg: Config
    driver: QemuDriver
    spec: VmSpec
    volume: TenantVolume
    netns: str


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(kernel, initrd, rootfs) shared by the tests of this module."""
    need_root()
    need_binary("qemu-system-x86_64", "mkfs.ext4", "ip", "dpkg-deb")
    busybox = next((Path(p) for p in BUSYBOX_CANDIDATES if Path(p).is_file()), None)
    need(busybox is not None, "needs busybox-static")
    need(os.path.exists("/dev/net/tun"), "needs /dev/net/tun")
    try:
        detect_layout()
    except CgroupError as exc:
        need(False, f"needs cgroups: {exc}")
    from lobsterd.image.kernel import ensure_kernel

    kernel = ensure_kernel(CACHE)
    work = tmp_path_factory.mktemp("guest")
    initrd = work / "initrd.img"
    assert busybox is not None
    build_initramfs(initrd, busybox, kernel.modules_dir)
    rootfs = work / "rootfs.img"
    with rootfs.open("wb") as fh:
        fh.truncate(16 << 20)
    return kernel.vmlinux, initrd, rootfs


@pytest.fixture
def guest(tmp_path: Path, artefacts: tuple[Path, Path, Path]) -> Iterator[Guest]:
    kernel, initrd, rootfs = artefacts
    suffix = uuid.uuid4().hex[:8]
    name = f"e2e-{suffix}"
    cfg = make_config(tmp_path, storage={"overlay_size_mib": 256, "volume_headroom_mib": 64},
                      vm={"mem_mib": 256})
    accel, _ = detect_accel("auto")
    ns = f"lbe2e-{suffix}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    volume = TenantVolume(cfg, name)
    driver = QemuDriver(cfg)
    uid = 260_000 + os.getpid() % 10_000
    try:
        volume.create()
        net.create_tap("lbt1", HOST_IP, 30, netns=ns)
        boot_args = build_boot_args(
            guest_ip=GUEST_IP, host_ip=HOST_IP, agent_token_hash=hashlib.sha256(
                AGENT_TOKEN.encode()).hexdigest(), agent_port=52, health_port=53,
            gateway_port=9000, tenant=name, accel=accel, tsc_khz=host_tsc_khz(),
            debug_console=False)
        spec = VmSpec(
            tenant=name, vm_id="lobster-1", vcpus=1, mem_mib=256, kernel=kernel,
            initrd=initrd, rootfs=rootfs, overlay=volume.paths.overlay, tap="lbt1",
            guest_mac="02:4c:42:00:00:01", boot_args=boot_args, uid=uid, gid=uid,
            chroot=volume.paths.jail, run_dir=cfg.paths.run_dir / "vm" / name,
            cgroup=f"tenant-{name}", cgroup_mem_bytes=(256 + 256) << 20,
            cgroup_cpu_quota_us=100_000, accel=accel, tap_netns=ns)
        yield Guest(cfg, driver, spec, volume, ns)
    finally:
        for pid in pids_for_socket(cfg.paths.run_dir / "vm" / name / "qmp.sock"):
            os.kill(pid, 9)
        cg = Cgroup.open(f"tenant-{name}")
        try:
            cg.kill_all()
        finally:
            cg.remove()
            volume.destroy()
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


def http_get(ns: str, path: str, timeout: float = 2.0) -> str:
    """GET from the guest, from inside the test's namespace (never the host's)."""
    with net.in_netns(ns):
        sock = socket.create_connection((GUEST_IP, HTTP_PORT), timeout=timeout)
    with sock:
        sock.sendall(f"GET /{path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0], head
    return body.strip()


def wait_reachable(ns: str, deadline_s: float) -> float:
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < deadline_s:
        try:
            assert http_get(ns, "hello", timeout=1.0) == "ok"
            return time.monotonic() - start
        except (OSError, AssertionError) as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"guest not reachable within {deadline_s}s: {last}")


def _status_ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            out[key] = [int(v) for v in value.split()]
    return out


# --- tests ----------------------------------------------------------------------------------


def test_boot_isolate_reach_and_stop(guest: Guest, capsys: pytest.CaptureFixture[str]) -> None:
    spec, driver = guest.spec, guest.driver
    t0 = time.monotonic()
    handle = driver.boot(spec)
    qmp_ready = time.monotonic() - t0
    try:
        pid = handle.pid
        assert driver.is_alive(handle)
        assert VmHandle.from_dict(handle.to_dict()) == handle

        # unprivileged, chrooted in the tenant's empty jail, inside the tenant's cgroup
        ids = _status_ids(pid)
        assert ids["Uid"] == [spec.uid] * 4 and ids["Gid"] == [spec.gid] * 4
        assert os.readlink(f"/proc/{pid}/root") == str(spec.chroot)
        assert Cgroup.open(spec.cgroup).pids() == [pid]
        assert f"/lobsterd/{spec.cgroup}" in Path(f"/proc/{pid}/cgroup").read_text()
        assert os.environ.get("PATH", "") in Path(f"/proc/{pid}/environ").read_bytes().decode()
        assert b"PYTEST" not in Path(f"/proc/{pid}/environ").read_bytes()

        # QMP answers; pause and resume work
        assert driver.status(handle) == "running"
        driver.pause(handle)
        assert driver.status(handle) == "paused"
        driver.resume(handle)
        assert driver.status(handle) == "running"

        # the guest boots and answers over the TAP
        reach = wait_reachable(guest.netns, 120.0)
        booted = time.monotonic() - t0
        cmdline = http_get(guest.netns, "cmdline")
        assert cmdline == spec.boot_args
        assert AGENT_TOKEN not in cmdline
        if spec.accel == "tcg":
            assert "tsc_early_khz=" in cmdline
        assert http_get(guest.netns, "vda_ro") == "1"  # shared rootfs is read-only
        assert http_get(guest.netns, "vdb_ro") == "0"  # the tenant's overlay is writable
        assert http_get(guest.netns, "mac") == spec.guest_mac
        assert net.read_counter(spec.tap, "tx_bytes", netns=guest.netns) > 0

        st = driver.stats(handle)
        assert st.alive and st.rss_bytes and st.rss_bytes > 10 << 20
        assert st.mem_limit_bytes == spec.cgroup_mem_bytes

        # found as this tenant's VM, never as an orphan of another tenant
        assert [o.pid for o in find_orphans(guest.cfg, set())] == [pid]
        assert find_orphans(guest.cfg, {spec.tenant}) == []
        assert find_orphans(guest.cfg, {spec.tenant + "0"})[0].tenant == spec.tenant

        with pytest.raises(VmmError, match="already running"):
            driver.boot(spec)
        with capsys.disabled():
            print(f"\n[e2e qemu] accel={spec.accel} qmp_ready={qmp_ready:.2f}s "
                  f"reachable={booted:.2f}s after boot() (waited {reach:.2f}s after QMP), "
                  f"rss={st.rss_bytes >> 20}MiB")
    finally:
        t1 = time.monotonic()
        driver.stop(handle, timeout_s=0.5)  # guest not asked to power off: QMP quit path
        stop_s = time.monotonic() - t1
    assert stop_s < 10
    assert not driver.is_alive(handle)
    assert not Path(f"/proc/{handle.pid}").exists() or _is_zombie_or_other(handle)
    assert not Cgroup.open(spec.cgroup).exists()
    assert not Path(handle.control_socket).exists()
    assert pids_for_socket(Path(handle.control_socket)) == []
    driver.stop(handle, timeout_s=0.5)  # idempotent
    driver.kill(handle)
    # the TAP and the volume belong to the tenant, not to the VM: both survive
    assert net.tap_exists(spec.tap, netns=guest.netns)
    assert guest.volume.is_mounted() and spec.overlay.exists()


def _is_zombie_or_other(handle: VmHandle) -> bool:
    """The pid may have been reused already: then it must not be our QEMU."""
    from lobsterd.adapters.vmm.qemu import process_matches

    return not process_matches(handle.pid, handle.control_socket)


def test_debug_console_and_kill_orphans(guest: Guest) -> None:
    import dataclasses

    spec = dataclasses.replace(
        guest.spec, debug_console=True,
        boot_args=guest.spec.boot_args.replace("8250.nr_uarts=0 quiet", "console=ttyS0"))
    driver = guest.driver
    handle = driver.boot(spec)
    try:
        wait_reachable(guest.netns, 120.0)
        console = (spec.run_dir / "console.log").read_text(errors="replace")
        assert "Linux version" in console
        assert AGENT_TOKEN not in console
        assert driver.kill_orphans(spec.tenant) == 1
        assert not driver.is_alive(handle)
    finally:
        driver.kill(handle)
    assert not Cgroup.open(spec.cgroup).exists()


def test_boot_failure_is_reported_and_cleaned(guest: Guest, tmp_path: Path) -> None:
    import dataclasses

    bad = tmp_path / "not-a-kernel"
    bad.write_bytes(b"\0" * 4096)
    spec = dataclasses.replace(guest.spec, kernel=bad)
    with pytest.raises(VmBootFailed, match="exited") as exc:
        guest.driver.boot(spec)
    assert "qemu" in str(exc.value).lower() or "kernel" in str(exc.value).lower()
    assert AGENT_TOKEN not in str(exc.value)
    assert not Cgroup.open(spec.cgroup).exists()
    assert pids_for_socket(spec.run_dir / "qmp.sock") == []
    assert net.tap_exists(spec.tap, netns=guest.netns)

    from lobsterd.errors import NetworkSetupFailed

    with pytest.raises(NetworkSetupFailed, match="does not exist"):
        guest.driver.boot(dataclasses.replace(guest.spec, tap="lbt9"))
    assert not Cgroup.open(spec.cgroup).exists()


def test_root_owned_overlay_is_not_readable_by_the_tenant(guest: Guest) -> None:
    """QEMU opens the 0600 root-owned overlay before dropping to the tenant uid; the uid
    itself cannot open it (nor even reach it: the volume root is 0700)."""
    uid = guest.spec.uid
    script = (f"import os; os.setgid({uid}); os.setgroups([]); os.setuid({uid}); "
              f"open({str(guest.spec.overlay)!r}, 'rb')")
    python = shutil.which("python3") or "/usr/bin/python3"
    res = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=10,
                         check=False)
    assert res.returncode != 0 and "PermissionError" in res.stderr
