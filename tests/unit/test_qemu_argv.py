from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from lobsterd.adapters.vmm.base import DiskLimit, VmSpec
from lobsterd.core.bootargs import build_boot_args
from lobsterd.core.qemu_argv import build_qemu_argv, qmp_arg
from lobsterd.errors import ValidationFailed

TOKEN = "agent-token-that-must-never-appear-0123456789"
RUN = Path("/run/lobsterd/vm/alice")


def spec(**over: Any) -> VmSpec:
    boot = build_boot_args(
        guest_ip="10.200.0.6", host_ip="10.200.0.5", agent_token_hash=hashlib.sha256(
            TOKEN.encode()).hexdigest(), agent_port=52, health_port=53, gateway_port=9000,
        tenant="alice", accel=over.get("accel", "tcg"), tsc_khz=2_300_000,
        debug_console=over.get("debug_console", False))
    base = VmSpec(
        tenant="alice",
        vm_id="lobster-1",
        vcpus=2,
        mem_mib=1024,
        kernel=Path("/var/cache/lobsterd/images/k/vmlinux"),
        initrd=Path("/var/cache/lobsterd/images/k/initrd.img"),
        rootfs=Path("/var/cache/lobsterd/images/k/rootfs.ext4"),
        overlay=Path("/var/lib/lobsterd/tenants/alice/overlay.ext4"),
        tap="lbt1",
        guest_mac="02:4c:42:00:00:01",
        boot_args=boot,
        uid=200001,
        gid=200001,
        chroot=Path("/var/lib/lobsterd/tenants/alice/jail"),
        run_dir=RUN,
        cgroup="tenant-alice",
        cgroup_mem_bytes=1280 << 20,
        cgroup_cpu_quota_us=200_000,
        disk_limit=DiskLimit(bytes_per_s=52_428_800, ops_per_s=5000),
    )
    return dataclasses.replace(base, **over)


def argv_of(s: VmSpec, console: Path | None = None) -> list[str]:
    return build_qemu_argv(s, tap_fd=7, qmp_path=RUN / "qmp.sock", pidfile=RUN / "qemu.pid",
                           console_log=console)


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value that follows ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_machine_and_defaults_off() -> None:
    argv = argv_of(spec())
    assert argv[0] == "qemu-system-x86_64"
    (machine,) = opt(argv, "-M")
    assert machine.startswith("microvm,")
    assert "isa-serial=off" in machine.split(",")
    assert "acpi=off" not in machine  # ACPI is how the guest finds virtio-mmio devices
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert opt(argv, "-display") == ["none"]
    assert "-daemonize" not in argv
    assert "-monitor" not in argv and "-serial" not in argv
    assert "-enable-kvm" not in argv


def test_tcg_accel_and_cpu() -> None:
    argv = argv_of(spec())
    (accel,) = opt(argv, "-accel")
    assert accel.split(",")[0] == "tcg"
    assert "thread=multi" in accel
    assert any(p.startswith("tb-size=") for p in accel.split(","))
    (cpu,) = opt(argv, "-cpu")
    assert cpu != "host"
    (append,) = opt(argv, "-append")
    assert "tsc_early_khz=2300000" in append.split()


def test_kvm_accel() -> None:
    argv = argv_of(spec(accel="kvm"))
    assert opt(argv, "-accel") == ["kvm"]
    assert opt(argv, "-cpu") == ["host"]


def test_size_kernel_initrd() -> None:
    argv = argv_of(spec())
    assert opt(argv, "-smp") == ["2"]
    assert opt(argv, "-m") == ["1024M"]
    assert opt(argv, "-kernel") == ["/var/cache/lobsterd/images/k/vmlinux"]
    assert opt(argv, "-initrd") == ["/var/cache/lobsterd/images/k/initrd.img"]
    assert "-initrd" not in argv_of(spec(initrd=None))


def test_no_token_in_argv() -> None:
    joined = "\0".join(argv_of(spec()))
    assert TOKEN not in joined
    assert hashlib.sha256(TOKEN.encode()).hexdigest() in joined


def test_drives_rootfs_readonly_then_overlay_throttled() -> None:
    argv = argv_of(spec())
    root, ovl = opt(argv, "-drive")
    root_opts = root.split(",")
    assert "file=/var/cache/lobsterd/images/k/rootfs.ext4" in root_opts
    assert "readonly=on" in root_opts
    ovl_opts = ovl.split(",")
    assert "file=/var/lib/lobsterd/tenants/alice/overlay.ext4" in ovl_opts
    assert "readonly=on" not in ovl_opts
    assert {"cache=none", "aio=threads", "format=raw"} <= set(ovl_opts)
    assert "throttling.bps-total=52428800" in ovl_opts
    assert "throttling.iops-total=5000" in ovl_opts
    devices = opt(argv, "-device")
    # rootfs is created first, so the guest sees it as /dev/vda and the overlay as vdb
    assert devices.index("virtio-blk-device,drive=rootfs") < devices.index(
        "virtio-blk-device,drive=overlay")


def test_no_throttle_when_unlimited() -> None:
    argv = argv_of(spec(disk_limit=DiskLimit()))
    assert "throttling" not in opt(argv, "-drive")[1]


def test_net_rng_qmp_pidfile() -> None:
    argv = argv_of(spec())
    assert opt(argv, "-netdev") == ["tap,id=n0,fd=7"]
    devices = opt(argv, "-device")
    assert "virtio-net-device,netdev=n0,mac=02:4c:42:00:00:01" in devices
    assert "virtio-rng-device" in devices
    assert opt(argv, "-qmp") == [f"unix:{RUN}/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-qmp") == [qmp_arg(RUN / "qmp.sock")]
    assert opt(argv, "-pidfile") == [f"{RUN}/qemu.pid"]


def test_sandbox_runas_chroot() -> None:
    argv = argv_of(spec())
    (sandbox,) = opt(argv, "-sandbox")
    parts = sandbox.split(",")
    assert parts[0] == "on"
    assert {"obsolete=deny", "spawn=deny", "resourcecontrol=deny"} <= set(parts)
    # elevateprivileges=deny kills QEMU 7.2 at its own -runas (filter installed first)
    assert "elevateprivileges=deny" not in parts
    assert opt(argv, "-runas") == ["200001:200001"]
    assert opt(argv, "-chroot") == ["/var/lib/lobsterd/tenants/alice/jail"]


def test_debug_console() -> None:
    log = RUN / "console.log"
    argv = argv_of(spec(debug_console=True), console=log)
    (machine,) = opt(argv, "-M")
    assert "isa-serial=on" in machine
    assert opt(argv, "-chardev") == [f"file,id=con0,path={log}"]
    assert opt(argv, "-serial") == ["chardev:con0"]
    (append,) = opt(argv, "-append")
    assert "console=ttyS0" in append.split()
    with pytest.raises(ValidationFailed):
        argv_of(spec(debug_console=True), console=None)


@pytest.mark.parametrize(
    "over",
    [
        {"uid": 0},
        {"gid": 0},
        {"accel": "hvf"},
        {"guest_mac": "03:00:00:00:00:01"},  # multicast
        {"guest_mac": "02:00:00:00:00"},
        {"vm_id": "lobster-1,x=y"},
        {"overlay": Path("/tmp/a,b/overlay.ext4")},
        {"rootfs": Path("relative/rootfs.ext4")},
        {"kernel": Path("/k\nx")},
        {"boot_args": "quiet  init=/bin/sh"},
        {"boot_args": "x='y z'"},
        {"vcpus": 0},
    ],
)
def test_rejects(over: dict[str, Any]) -> None:
    # build_boot_args already refuses "hvf": bypass it to reach the argv check
    s = dataclasses.replace(spec(), accel="hvf") if "accel" in over else spec(**over)
    with pytest.raises(ValidationFailed):
        argv_of(s)


def test_rejects_low_fd() -> None:
    with pytest.raises(ValidationFailed):
        build_qemu_argv(spec(), tap_fd=1, qmp_path=RUN / "q", pidfile=RUN / "p",
                        console_log=None)


def test_custom_binary() -> None:
    argv = build_qemu_argv(spec(), tap_fd=9, qmp_path=RUN / "q", pidfile=RUN / "p",
                           console_log=None, binary="/usr/local/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/local/bin/qemu-system-x86_64"


# --- accelerator choice (adapters/kvm.py), against fabricated /dev, /sys and /proc ----------


def fake_host(root: Path, *, kvm: bool, modules: tuple[str, ...], mhz: str | None) -> Path:
    (root / "dev").mkdir()
    (root / "sys" / "module").mkdir(parents=True)
    (root / "proc").mkdir()
    if kvm:
        (root / "dev" / "kvm").touch()
    lines = [f"{m} 16384 0 - Live 0x0000000000000000" for m in modules]
    (root / "proc" / "modules").write_text("\n".join(lines) + "\n")
    if mhz is not None:
        (root / "proc" / "cpuinfo").write_text(
            f"processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: {mhz}\ncache size\t: 1 KB\n")
    return root


def accel(root: Path, pref: str) -> tuple[str, str]:
    from lobsterd.adapters.kvm import detect_accel

    return detect_accel(pref, dev_root=root / "dev", sys_root=root / "sys",
                        proc_root=root / "proc", open_device=False)


def test_accel_pvm_host_falls_back(tmp_path: Path) -> None:
    from lobsterd.errors import VmmError

    root = fake_host(tmp_path, kvm=True, modules=("kvm", "kvm_pvm"), mhz="2445.402")
    got, reason = accel(root, "auto")
    assert got == "tcg" and "kvm_pvm" in reason
    with pytest.raises(VmmError, match="kvm_pvm"):
        accel(root, "kvm")
    assert accel(root, "tcg")[0] == "tcg"


def test_accel_pvm_seen_through_sys_module(tmp_path: Path) -> None:
    root = fake_host(tmp_path, kvm=True, modules=(), mhz=None)
    (root / "sys" / "module" / "kvm_pvm").mkdir()
    assert accel(root, "auto")[0] == "tcg"


def test_accel_no_dev_kvm(tmp_path: Path) -> None:
    root = fake_host(tmp_path, kvm=False, modules=("kvm_intel", "kvm"), mhz=None)
    got, reason = accel(root, "auto")
    assert got == "tcg" and "/dev/kvm" in reason


def test_accel_good_kvm(tmp_path: Path) -> None:
    root = fake_host(tmp_path, kvm=True, modules=("kvm_intel", "kvm"), mhz=None)
    assert accel(root, "auto")[0] == "kvm"
    assert accel(root, "kvm")[0] == "kvm"


def test_accel_bad_preference(tmp_path: Path) -> None:
    from lobsterd.errors import ConfigInvalid

    with pytest.raises(ConfigInvalid):
        accel(fake_host(tmp_path, kvm=False, modules=(), mhz=None), "hvf")


def test_host_tsc_khz(tmp_path: Path) -> None:
    from lobsterd.adapters.kvm import host_tsc_khz
    from lobsterd.errors import VmmError

    root = fake_host(tmp_path, kvm=False, modules=(), mhz="2445.402")
    assert host_tsc_khz(proc_root=root / "proc", sys_root=root / "sys") == 2_445_402
    exact = root / "sys" / "devices" / "system" / "cpu" / "cpu0"
    exact.mkdir(parents=True)
    (exact / "tsc_freq_khz").write_text("2300000\n")
    assert host_tsc_khz(proc_root=root / "proc", sys_root=root / "sys") == 2_300_000
    (exact / "tsc_freq_khz").unlink()
    (root / "proc" / "cpuinfo").write_text("processor\t: 0\n")
    with pytest.raises(VmmError, match="tsc_khz"):
        host_tsc_khz(proc_root=root / "proc", sys_root=root / "sys")


# --- process identity (adapters/vmm/qemu.py): exact -qmp matching, no root needed ---------


def _fake_vm(qmp_value: str) -> Any:
    """A harmless process whose command line carries ``-qmp <value>`` like a VM's."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "-qmp", qmp_value])


def test_orphans_match_whole_tenant_component(tmp_path: Path) -> None:
    from lobsterd.adapters.vmm.qemu import (
        QemuDriver,
        find_orphans,
        pids_for_socket,
        process_matches,
    )
    from tests.helpers import make_config

    cfg = make_config(tmp_path)
    vm = cfg.paths.run_dir / "vm"
    p1 = _fake_vm(qmp_arg(vm / "lobster-1" / "qmp.sock"))
    p10 = _fake_vm(qmp_arg(vm / "lobster-10" / "qmp.sock"))
    try:
        import time as _t

        deadline = _t.monotonic() + 5
        while len(find_orphans(cfg, set())) < 2 and _t.monotonic() < deadline:
            _t.sleep(0.01)
        found = {o.tenant: o.pid for o in find_orphans(cfg, set())}
        assert found == {"lobster-1": p1.pid, "lobster-10": p10.pid}
        assert [o.pid for o in find_orphans(cfg, {"lobster-1"})] == [p10.pid]
        assert [o.pid for o in find_orphans(cfg, {"lobster-10"})] == [p1.pid]
        assert pids_for_socket(vm / "lobster-1" / "qmp.sock") == [p1.pid]
        assert process_matches(p1.pid, str(vm / "lobster-1" / "qmp.sock"))
        assert not process_matches(p1.pid, str(vm / "lobster-10" / "qmp.sock"))
        assert not process_matches(p1.pid, str(vm / "lobster-" / "qmp.sock"))

        driver = QemuDriver(cfg)
        assert driver.kill_orphans("lobster") == 0
        assert driver.kill_orphans("lobster-1") == 1
        p1.wait(timeout=5)  # kill_orphans may already have reaped it (it is our child)
        assert not Path(f"/proc/{p1.pid}").exists()
        assert p10.poll() is None  # the tenant sharing a prefix is untouched
        assert not process_matches(p1.pid, str(vm / "lobster-1" / "qmp.sock"))
    finally:
        for p in (p1, p10):
            p.kill()
            p.wait()


def test_other_run_dirs_are_not_ours(tmp_path: Path) -> None:
    from lobsterd.adapters.vmm.qemu import find_orphans
    from tests.helpers import make_config

    cfg = make_config(tmp_path / "a")
    other = make_config(tmp_path / "b")
    p = _fake_vm(qmp_arg(other.paths.run_dir / "vm" / "alice" / "qmp.sock"))
    try:
        assert find_orphans(cfg, set()) == []
    finally:
        p.kill()
        p.wait()


# --- QMP client (adapters/vmm/qmp.py) against a scripted server ----------------------------


def _qmp_server(path: Path, script: list[bytes | None]) -> Any:
    """Serve one connection: greet, then answer each request line with the next item.

    ``None`` in the script closes the connection instead of answering.
    """
    import json
    import socket
    import threading

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    seen: list[dict[str, Any]] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            buf = b""
            for reply in script:
                while b"\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                req = json.loads(line)
                seen.append(req)
                if reply is None:
                    return
                conn.sendall(reply.replace(b"@ID@", json.dumps(req["id"]).encode()))
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return seen


def test_qmp_happy_path_with_events(tmp_path: Path) -> None:
    from lobsterd.adapters.vmm.qmp import QmpClient

    sock = tmp_path / "q.sock"
    seen = _qmp_server(sock, [
        b'{"return": {}, "id": @ID@}\n',
        b'{"event": "RESUME", "timestamp": {}}\n{"return": {"status": "running",'
        b' "running": true}, "id": @ID@}\n',
        b'{"return": {}, "id": "stale"}\n{"return": {}, "id": @ID@}\n',
    ])
    with QmpClient(sock, timeout_s=2) as q:
        assert q.status() == "running"
        assert q.execute("stop") == {}
        assert q.events[0]["event"] == "RESUME"
    assert [r["execute"] for r in seen] == ["qmp_capabilities", "query-status", "stop"]


def test_qmp_error_reply(tmp_path: Path) -> None:
    from lobsterd.adapters.vmm.qmp import QmpClient, QmpError

    sock = tmp_path / "q.sock"
    _qmp_server(sock, [
        b'{"return": {}, "id": @ID@}\n',
        b'{"error": {"class": "CommandNotFound", "desc": "nope"}, "id": @ID@}\n',
    ])
    with QmpClient(sock, timeout_s=2) as q, pytest.raises(QmpError, match="CommandNotFound"):
        q.execute("bogus")


@pytest.mark.parametrize(
    "reply",
    [b"not json\n", b"[1, 2]\n", b'{"return": {}}\n', b"x" * (1 << 20) + b"y" * 10, None],
)
def test_qmp_hostile_or_broken_replies(tmp_path: Path, reply: bytes | None) -> None:
    from lobsterd.adapters.vmm.qmp import QmpClient
    from lobsterd.errors import VmmError

    sock = tmp_path / "q.sock"
    _qmp_server(sock, [b'{"return": {}, "id": @ID@}\n', reply])
    with QmpClient(sock, timeout_s=0.5) as q, pytest.raises(VmmError):
        q.status()


def test_qmp_quit_tolerates_close(tmp_path: Path) -> None:
    from lobsterd.adapters.vmm.qmp import QmpClient

    sock = tmp_path / "q.sock"
    _qmp_server(sock, [b'{"return": {}, "id": @ID@}\n', None])
    with QmpClient(sock, timeout_s=2) as q:
        assert q.execute("quit") == {}


def test_qmp_no_socket(tmp_path: Path) -> None:
    from lobsterd.adapters.vmm.qmp import QmpClient
    from lobsterd.errors import VmmError

    with pytest.raises(VmmError, match="cannot connect"):
        QmpClient(tmp_path / "missing.sock").connect()


def test_longest_tenant_name_builds() -> None:
    name = "a" + "b" * 61 + "c"
    boot = build_boot_args(
        guest_ip="10.200.0.6", host_ip="10.200.0.5", agent_token_hash="0" * 64, agent_port=52,
        health_port=53, gateway_port=9000, tenant=name, accel="tcg", tsc_khz=1, debug_console=False)
    run = Path("/run/lobsterd/vm") / name
    argv = build_qemu_argv(spec(tenant=name, boot_args=boot, run_dir=run), tap_fd=3,
                           qmp_path=run / "qmp.sock", pidfile=run / "qemu.pid", console_log=None)
    assert f"lobster.name={name}" in opt(argv, "-append")[0]
    assert opt(argv, "-qmp") == [f"unix:{run}/qmp.sock,server=on,wait=off"]
