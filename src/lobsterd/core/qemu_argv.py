"""QEMU command line of one tenant's VM (pure).

Shape, and why:

* ``-M microvm`` with its default ACPI: the guest kernel finds the virtio-mmio devices
  through ACPI once ``virtio_mmio.ko`` is loaded (Debian kernels lack
  ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``). No option ROMs, and no serial port unless the
  debug console is on.
* ``-nodefaults -no-user-config -display none``: no monitor, no default devices, no
  config file from the host; QMP on a root-only Unix socket is the only control path.
* Under TCG a v2-level x86-64 CPU (SSE4.2, POPCNT, CX16): enough for today's user space
  and measurably faster to emulate than ``-cpu max``; ``thread=multi`` gives one host
  thread per vCPU and ``tb-size`` bounds the translation cache, which counts against the
  tenant's cgroup memory.
* Disks: the shared rootfs is ``/dev/vda`` and read-only at the block layer; the
  tenant's overlay is ``/dev/vdb`` with O_DIRECT (the host page cache holds no second
  copy of tenant data), thread-pool AIO, discard passed through so the sparse file
  stays sparse, and the configured I/O throttle.
* The TAP is opened by root and passed as an inherited fd: QEMU never needs
  ``/dev/net/tun``.
* ``-sandbox on`` with obsolete, spawn and resourcecontrol denied. ``elevateprivileges``
  is left at its default because QEMU installs the seccomp filter before ``-runas``
  drops privileges, so ``deny`` kills QEMU at its own setuid/setgid (measured with QEMU
  7.2). After the drop the process has no capabilities and ``spawn=deny`` forbids exec,
  so there is nothing left to elevate with.
* ``-runas uid:gid`` and ``-chroot <jail>``: files are opened first (as root), then QEMU
  chroots into the tenant's empty jail and becomes the tenant's uid/gid.
* ``-no-reboot``: a guest reboot or panic ends the process, and lobsterd notices.
* No ``-daemonize``: lobsterd supervises the process itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from lobsterd.adapters.vmm.base import VmSpec
from lobsterd.core.bootargs import check_boot_args
from lobsterd.errors import ValidationFailed

DEFAULT_BINARY = "qemu-system-x86_64"
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+lahf-lm"
KVM_CPU = "host"
TCG_TB_SIZE_MIB = 64
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
QMP_SUFFIX = ",server=on,wait=off"

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", re.ASCII)
_VMID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)


def _path(value: Path, what: str) -> str:
    """An absolute, printable path without commas.

    QEMU splits option strings on ``,`` and its escaping (``,,``) differs between option
    kinds, so a comma is refused outright: every path here is lobsterd's own.
    """
    text = str(value)
    if not value.is_absolute():
        raise ValidationFailed(f"{what} must be an absolute path, got {text!r}")
    if not text.isprintable() or "," in text:
        raise ValidationFailed(
            f"{what} path {text!r} contains a comma or a non-printable character",
            hint="choose lobsterd's [paths] without commas",
        )
    return text


def qmp_arg(qmp_path: Path) -> str:
    """The exact ``-qmp`` argument; also how a VM's process is recognised in /proc."""
    return f"unix:{_path(qmp_path, 'qmp socket')}{QMP_SUFFIX}"


def _check(spec: VmSpec, tap_fd: int, console_log: Path | None) -> None:
    """Refuse a spec QEMU would misread or that would run the VM with too much power."""
    if spec.accel not in ("kvm", "tcg"):
        raise ValidationFailed(f"accel {spec.accel!r} must be kvm or tcg")
    if not _VMID_RE.fullmatch(spec.vm_id):
        raise ValidationFailed(f"vm id {spec.vm_id!r} is not a lower-case label")
    if not _MAC_RE.fullmatch(spec.guest_mac):
        raise ValidationFailed(f"guest MAC {spec.guest_mac!r} is not aa:bb:cc:dd:ee:ff")
    if int(spec.guest_mac[:2], 16) & 1:
        raise ValidationFailed(f"guest MAC {spec.guest_mac} is a multicast address")
    if not 1 <= spec.vcpus <= 255 or spec.mem_mib < 64:
        raise ValidationFailed(f"bad VM size: {spec.vcpus} vCPUs, {spec.mem_mib} MiB")
    if tap_fd < 3:
        raise ValidationFailed(f"tap fd {tap_fd} would collide with stdin/stdout/stderr")
    if spec.uid <= 0 or spec.gid <= 0:
        raise ValidationFailed("QEMU must never run as root: uid and gid must be > 0")
    if spec.debug_console and console_log is None:
        raise ValidationFailed("debug_console needs a console_log path")
    check_boot_args(spec.boot_args)


def build_qemu_argv(
    spec: VmSpec,
    *,
    tap_fd: int,
    qmp_path: Path,
    pidfile: Path,
    console_log: Path | None,
    binary: str = DEFAULT_BINARY,
) -> list[str]:
    """Full argv (binary first) of the VM described by ``spec``."""
    _check(spec, tap_fd, console_log)
    serial = "on" if spec.debug_console else "off"
    argv = [
        binary,
        "-name", f"{spec.vm_id},debug-threads=on",
        "-M", f"microvm,x-option-roms=off,isa-serial={serial}",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-msg", "timestamp=on",
    ]
    if spec.accel == "tcg":
        argv += ["-accel", f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}", "-cpu", TCG_CPU]
    else:
        argv += ["-accel", "kvm", "-cpu", KVM_CPU]
    argv += [
        "-smp", str(spec.vcpus),
        "-m", f"{spec.mem_mib}M",
        "-kernel", _path(spec.kernel, "kernel"),
    ]
    if spec.initrd is not None:
        argv += ["-initrd", _path(spec.initrd, "initrd")]
    argv += ["-append", spec.boot_args]

    # Device order fixes guest names: first virtio-blk is /dev/vda.
    argv += [
        "-drive",
        f"file={_path(spec.rootfs, 'rootfs')},format=raw,if=none,id=rootfs,readonly=on",
        "-device", "virtio-blk-device,drive=rootfs",
    ]
    overlay = [
        f"file={_path(spec.overlay, 'overlay')}",
        "format=raw",
        "if=none",
        "id=overlay",
        "cache=none",
        "aio=threads",
        "discard=unmap",
        "detect-zeroes=unmap",
    ]
    if spec.disk_limit.bytes_per_s:
        overlay.append(f"throttling.bps-total={int(spec.disk_limit.bytes_per_s)}")
    if spec.disk_limit.ops_per_s:
        overlay.append(f"throttling.iops-total={int(spec.disk_limit.ops_per_s)}")
    argv += [
        "-drive", ",".join(overlay),
        "-device", "virtio-blk-device,drive=overlay",
        "-netdev", f"tap,id=n0,fd={tap_fd}",
        "-device", f"virtio-net-device,netdev=n0,mac={spec.guest_mac}",
        "-device", "virtio-rng-device",
    ]
    if spec.debug_console:
        assert console_log is not None
        argv += [
            "-chardev", f"file,id=con0,path={_path(console_log, 'console log')}",
            "-serial", "chardev:con0",
        ]
    argv += [
        "-qmp", qmp_arg(qmp_path),
        "-pidfile", _path(pidfile, "pidfile"),
        "-sandbox", SANDBOX,
        "-runas", f"{spec.uid}:{spec.gid}",
        "-chroot", _path(spec.chroot, "chroot"),
    ]
    return argv
