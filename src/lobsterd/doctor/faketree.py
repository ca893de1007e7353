"""Fabricated /proc, /sys and /etc trees for testing doctor without the host.

A :class:`FakeTree` writes plain files where the kernel would show its pseudo-files, so
that every check can be driven through states this machine cannot reach (SMT on, KSM
running, EDAC errors, kvm_intel...). ``hardened()`` starts from a host that passes every
check; tests then break exactly one thing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lobsterd.doctor.host import CmdResult, HostView

_MICROCODE_CPIO = b"070701" + b"0" * 104 + b"kernel/x86/microcode/GenuineIntel.bin\0"


class FakeRunner:
    """Command outputs by argv; anything else "cannot be started" (None)."""

    def __init__(self, outputs: Mapping[tuple[str, ...], CmdResult] | None = None) -> None:
        self.outputs = dict(outputs or {})
        self.calls: list[tuple[str, ...]] = []

    def set(self, argv: Sequence[str], stdout: str, returncode: int = 0,
            stderr: str = "") -> None:
        self.outputs[tuple(argv)] = CmdResult(returncode, stdout, stderr)

    def __call__(self, argv: Sequence[str], timeout: float) -> CmdResult | None:
        self.calls.append(tuple(argv))
        return self.outputs.get(tuple(argv))


class FakeTree:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runner = FakeRunner()
        self.root.mkdir(parents=True, exist_ok=True)

    def p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def file(self, path: str, content: str | bytes = "", mode: int | None = None) -> Path:
        real = self.p(path)
        real.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            real.write_bytes(content)
        else:
            real.write_text(content if content.endswith("\n") or not content
                            else content + "\n")
        if mode is not None:
            os.chmod(real, mode)
        return real

    def dir(self, path: str, mode: int | None = None) -> Path:
        real = self.p(path)
        real.mkdir(parents=True, exist_ok=True)
        if mode is not None:
            os.chmod(real, mode)
        return real

    def symlink(self, path: str, target: str) -> None:
        real = self.p(path)
        real.parent.mkdir(parents=True, exist_ok=True)
        real.symlink_to(target)

    def remove(self, path: str) -> None:
        real = self.p(path)
        if real.is_dir() and not real.is_symlink():
            for child in sorted(real.rglob("*"), reverse=True):
                if child.is_dir() and not child.is_symlink():
                    child.rmdir()
                else:
                    child.unlink()
            real.rmdir()
        elif real.exists() or real.is_symlink():
            real.unlink()

    def read(self, path: str) -> str:
        return self.p(path).read_text()

    def executable(self, path: str, version_output: str | None = None) -> None:
        self.file(path, "#!/bin/sh\nexit 0\n", mode=0o755)
        if version_output is not None:
            self.runner.set([path, "--version"], version_output)

    def process(
        self,
        pid: int,
        comm: str,
        *,
        uid: int = 0,
        seccomp: int = 0,
        cgroup: str = "0::/\n",
        cmdline: Sequence[str] = (),
        nspid: Sequence[int] = (),
    ) -> None:
        ids = f"{uid}\t{uid}\t{uid}\t{uid}"
        ns = "\t".join(str(x) for x in (nspid or (pid,)))
        self.file(f"/proc/{pid}/comm", comm)
        self.file(f"/proc/{pid}/status",
                  f"Name:\t{comm[:15]}\nUid:\t{ids}\nGid:\t{ids}\nNSpid:\t{ns}\n"
                  f"Seccomp:\t{seccomp}\n")
        self.file(f"/proc/{pid}/cgroup", cgroup)
        self.file(f"/proc/{pid}/cmdline", "\0".join([comm, *cmdline]).encode() + b"\0")

    def mounts(self, lines: Sequence[str]) -> None:
        self.file("/proc/mounts", "\n".join(lines))

    def host(self, machine: str = "x86_64") -> HostView:
        return HostView(self.root, runner=self.runner, machine=machine,
                        path_dirs=("/usr/local/bin", "/usr/bin", "/usr/sbin"))

    def hardened(self, release: str = "6.1.0-28-amd64") -> FakeTree:
        """A bare-metal Intel host with cgroup v2 that passes every check."""
        f = self.file
        for d in ("/", "/usr", "/usr/bin", "/usr/local", "/usr/local/bin", "/etc", "/var",
                  "/run", "/proc", "/sys"):
            self.dir(d, 0o755)
        f("/proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet loglevel=1 nosmt")
        f("/proc/sys/kernel/osrelease", release)
        f("/proc/sys/kernel/printk", "1\t4\t1\t7")
        f("/proc/sys/kernel/seccomp/actions_avail", "kill_process kill_thread trap errno "
          "user_notif trace log allow")
        f("/proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\n"
          "microcode\t: 0x2b000603\nflags\t\t: fpu vme vmx sse2\n\n")
        f("/boot/initrd.img-" + release, _MICROCODE_CPIO + b"\0" * 64)
        cpu = "/sys/devices/system/cpu"
        f(f"{cpu}/smt/control", "forceoff")
        f(f"{cpu}/smt/active", "0")
        for n in (0, 1):
            f(f"{cpu}/cpu{n}/topology/thread_siblings_list", str(n))
        for name in ("meltdown", "spectre_v1", "spectre_v2", "mds", "l1tf",
                     "itlb_multihit", "old_microcode"):
            f(f"{cpu}/vulnerabilities/{name}",
              "Mitigation: something" if name.startswith("spectre") else "Not affected")
        f("/sys/devices/system/edac/mc/mc0/ce_count", "0")
        f("/sys/devices/system/edac/mc/mc0/ue_count", "0")
        f("/sys/kernel/mm/ksm/run", "0")
        f("/sys/kernel/mm/ksm/pages_shared", "0")
        f("/sys/kernel/mm/ksm/pages_sharing", "0")
        f("/proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority")
        f("/proc/sys/net/netfilter/nf_conntrack_max", str(2_000_000))
        f("/proc/sys/net/netfilter/nf_conntrack_count", "12")
        f("/proc/sys/net/netfilter/nf_conntrack_buckets", "262144")
        f("/proc/sys/net/ipv4/ip_forward", "1")
        f("/proc/sys/net/ipv4/conf/default/rp_filter", "1")
        f("/proc/sys/net/ipv4/conf/all/rp_filter", "0")
        self.dir("/dev")
        f("/dev/kvm", "")
        for mod in ("kvm", "kvm_intel"):
            f(f"/sys/module/{mod}/initstate", "live")
        f("/sys/module/kvm/parameters/min_timer_period_us", "1000", mode=0o644)
        f("/sys/module/kvm/parameters/nx_huge_pages", "N", mode=0o644)
        self.mounts(["sysfs /sys sysfs rw 0 0",
                     "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec 0 0"])
        f("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids")
        self.process(1, "init")
        self.process(300, "systemd-journal")
        self.executable("/usr/bin/qemu-system-x86_64",
                        "QEMU emulator version 8.2.2 (Debian 1:8.2.2)\n")
        return self
