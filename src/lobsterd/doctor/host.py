"""A read-mostly view of one Linux host, rooted anywhere.

Every check reads the host only through :class:`HostView`, whose file root is ``/`` in
production and a fabricated tree in tests, and whose command runner is injectable. That
keeps the checks pure functions of data and lets each one be tested on trees that
reproduce hosts we do not have (SMT on, KSM running, EDAC present, kvm_intel...).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lobsterd.doctor.model import TenantVm

_DEFAULT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_MAX_READ = 1 << 20


@dataclass(frozen=True)
class CmdResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], float], "CmdResult | None"]


@dataclass(frozen=True)
class Mount:
    device: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]


class HostView:
    """Files under ``root`` and commands through ``runner``; never raises on a read."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        runner: Runner | None = None,
        machine: str | None = None,
        path_dirs: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self._runner = runner or self._default_runner
        self._machine = machine
        self._path_dirs = tuple(path_dirs) if path_dirs is not None else _path_dirs()

    # ---- files -------------------------------------------------------------------
    def p(self, path: str) -> Path:
        """The real location of the host path ``path``."""
        return self.root / path.lstrip("/")

    def read(self, path: str, limit: int = _MAX_READ) -> str | None:
        try:
            with open(self.p(path), "rb") as fh:
                return fh.read(limit).decode("utf-8", "replace")
        except OSError:
            return None

    def read_bytes(self, path: str, limit: int = _MAX_READ) -> bytes | None:
        try:
            with open(self.p(path), "rb") as fh:
                return fh.read(limit)
        except OSError:
            return None

    def value(self, path: str) -> str | None:
        """A one-value sysfs/procfs file, stripped; None when absent or unreadable."""
        text = self.read(path, 65536)
        return None if text is None else text.strip()

    def int_value(self, path: str) -> int | None:
        text = self.value(path)
        try:
            return None if text is None else int(text.split()[0])
        except (ValueError, IndexError):
            return None

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.p(path))

    def is_dir(self, path: str) -> bool:
        return self.p(path).is_dir()

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.p(path)))
        except OSError:
            return []

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.p(path))
        except OSError:
            return None

    def readlink(self, path: str) -> str | None:
        try:
            return os.readlink(self.p(path))
        except OSError:
            return None

    def owner_writable(self, path: str) -> bool:
        """Whether the file's mode lets its owner write (sysfs params: 0644 vs 0444).

        ``os.access`` would say yes to root even for a read-only kernel parameter.
        """
        st = self.lstat(path)
        return st is not None and bool(st.st_mode & stat.S_IWUSR)

    def write(self, path: str, value: str) -> None:
        """One write of ``value`` to an existing file, as /proc and /sys expect."""
        fd = os.open(self.p(path), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    # ---- commands ----------------------------------------------------------------
    def which(self, name: str) -> str | None:
        """Host path of an executable (absolute name, or searched like ``$PATH``)."""
        candidates = [name] if "/" in name else [f"{d}/{name}" for d in self._path_dirs]
        for cand in candidates:
            real = self.p(cand)
            if real.is_file() and os.access(real, os.X_OK):
                return cand
        return None

    def run(self, argv: Sequence[str], timeout: float = 10.0) -> CmdResult | None:
        """Run a host command; None when it cannot be started at all."""
        return self._runner(argv, timeout)

    def _default_runner(self, argv: Sequence[str], timeout: float) -> CmdResult | None:
        from lobsterd.adapters.proc import run
        from lobsterd.errors import ExecFailed, ExecTimeout

        args = list(argv)
        if not args:
            return None
        if self.root != Path("/"):
            # A fabricated root must never run the real host's tools (mount, swapoff):
            # only executables that live inside that root.
            found = self.which(args[0])
            if found is None:
                return None
            args[0] = str(self.p(found))
        try:
            res = run(args, timeout=timeout, check=False)
        except ExecTimeout:
            return CmdResult(-1, "", f"timed out after {timeout:g}s")
        except ExecFailed:
            return None
        return CmdResult(res.returncode, res.stdout, res.stderr)

    # ---- kernel facts --------------------------------------------------------------
    @property
    def machine(self) -> str:
        if self._machine is not None:
            return self._machine
        arch = self.value("/proc/sys/kernel/arch")
        return arch or os.uname().machine

    def kernel_release(self) -> str:
        return self.value("/proc/sys/kernel/osrelease") or ""

    def cmdline(self) -> list[str]:
        text = self.value("/proc/cmdline") or ""
        # Arguments after "--" belong to init, not to the kernel.
        words = text.split()
        return words[: words.index("--")] if "--" in words else words

    def cpuinfo_field(self, name: str) -> str | None:
        for line in (self.read("/proc/cpuinfo") or "").splitlines():
            key, sep, val = line.partition(":")
            if sep and key.strip() == name:
                return val.strip()
        return None

    def cpu_flags(self) -> set[str]:
        return set((self.cpuinfo_field("flags") or "").split())

    def mounts(self) -> list[Mount]:
        out = []
        for line in (self.read("/proc/mounts") or "").splitlines():
            parts = line.split()
            if len(parts) >= 4:
                mp = parts[1].replace("\\040", " ")
                out.append(Mount(parts[0], mp, parts[2], tuple(parts[3].split(","))))
        return out

    def module_loaded(self, name: str) -> bool:
        return self.is_dir(f"/sys/module/{name}")

    def module_builtin(self, name: str) -> bool:
        """Loaded modules have ``initstate``; code built into the kernel does not."""
        return self.module_loaded(name) and not self.exists(f"/sys/module/{name}/initstate")

    # ---- processes ---------------------------------------------------------------
    def pids(self) -> list[int]:
        return sorted(int(n) for n in self.listdir("/proc") if n.isdigit())

    def comm(self, pid: int) -> str | None:
        return self.value(f"/proc/{pid}/comm")

    def proc_status(self, pid: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in (self.read(f"/proc/{pid}/status") or "").splitlines():
            key, sep, val = line.partition(":")
            if sep:
                out[key.strip()] = val.strip()
        return out

    def proc_cgroups(self, pid: int) -> dict[str, str]:
        """Hierarchy → cgroup path of ``pid``; keys are the controller lists
        (``"cpu,cpuacct"``) for v1 and ``""`` for the v2 unified hierarchy."""
        return parse_proc_cgroup(self.read(f"/proc/{pid}/cgroup") or "")

    def proc_argv(self, pid: int) -> list[str]:
        raw = self.read_bytes(f"/proc/{pid}/cmdline", 65536) or b""
        return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _path_dirs() -> tuple[str, ...]:
    env = [d for d in os.environ.get("PATH", "").split(":") if d.startswith("/")]
    seen: list[str] = []
    for d in (*_DEFAULT_PATH, *env):
        if d not in seen:
            seen.append(d)
    return tuple(seen)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def cgroup2_mount(host: HostView) -> Mount | None:
    for m in host.mounts():
        if m.fstype == "cgroup2":
            return m
    return None


def cgroup_v1_mount(host: HostView, controllers: str) -> Mount | None:
    """The v1 mount serving the hierarchy ``controllers`` (e.g. ``"cpu,cpuacct"``)."""
    wanted = set(controllers.split(","))
    for m in host.mounts():
        if m.fstype == "cgroup" and wanted <= set(m.options):
            return m
    return None


def is_unified(host: HostView) -> bool:
    """cgroup v2 only: /sys/fs/cgroup itself is the cgroup2 mount."""
    return any(m.fstype == "cgroup2" and m.mountpoint == "/sys/fs/cgroup"
               for m in host.mounts())


TENANT_CGROUP_PARENT = "lobsterd"
TENANT_CGROUP_PREFIX = "tenant-"


def discover_tenant_vms(host: HostView) -> tuple[TenantVm, ...]:
    """Running tenant VMs: the processes in each ``lobsterd/tenant-<name>`` cgroup.

    The tenant cgroup is the one place where lobsterd puts exactly one tenant's VMM, so
    it is the source of truth; every hierarchy (v1 controllers and v2) is looked at and
    the process lists are merged.
    """
    found: dict[str, set[int]] = {}
    for m in host.mounts():
        if m.fstype not in {"cgroup", "cgroup2"}:
            continue
        parent = f"{m.mountpoint}/{TENANT_CGROUP_PARENT}"
        for entry in host.listdir(parent):
            if not entry.startswith(TENANT_CGROUP_PREFIX):
                continue
            name = entry[len(TENANT_CGROUP_PREFIX):]
            procs = host.read(f"{parent}/{entry}/cgroup.procs") or ""
            pids = {int(x) for x in procs.split() if x.isdigit()}
            found.setdefault(name, set()).update(pids)
    return tuple(TenantVm(name, tuple(sorted(pids)))
                 for name, pids in sorted(found.items()) if pids)


_KVM_PIT_RE = re.compile(r"kvm-pit/(\d+)")


def kvm_pit_threads(host: HostView) -> list[tuple[int, int]]:
    """``(tid, n)`` of every ``kvm-pit/<n>`` kernel thread.

    ``n`` is the creating VMM's pid *as seen in its own pid namespace*.
    """
    out = []
    for pid in host.pids():
        comm = host.comm(pid)
        if comm:
            m = _KVM_PIT_RE.fullmatch(comm)
            if m:
                out.append((pid, int(m.group(1))))
    return out
