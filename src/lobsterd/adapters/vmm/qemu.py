"""The QEMU driver: one ``qemu-system-x86_64 -M microvm`` process per tenant.

The process is started by lobsterd (no ``-daemonize``) in a session of its own, so it
outlives the CLI that spawned it; it starts inside the tenant's cgroup (moved there
between fork and exec), opens its disks and the inherited TAP fd as root, then chroots
into the tenant's empty jail and becomes the tenant's uid/gid. It is controlled over QMP
on a root-only socket in ``<run>/vm/<name>/``.

A VM is identified by the exact ``-qmp`` argument of its command line (its tenant's
socket path), never by a pid alone: before any signal the driver re-reads
``/proc/<pid>/cmdline``, because the pid in the registry may by now belong to another
process. The tenant's cgroup is the second, pid-reuse-proof handle: whatever is in it is
that tenant's VMM.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lobsterd.adapters.cgroups import CGROUP_ROOT, Cgroup
from lobsterd.adapters.net import open_tap_fd
from lobsterd.adapters.vmm.base import VmHandle, VmSpec, VmStats
from lobsterd.adapters.vmm.qmp import QmpClient
from lobsterd.config import Config
from lobsterd.core.qemu_argv import QMP_SUFFIX, build_qemu_argv, qmp_arg
from lobsterd.errors import CgroupError, LobsterError, VmBootFailed, VmmError

QMP_SOCKET = "qmp.sock"
PIDFILE = "qemu.pid"
STDERR_LOG = "qemu.log"
CONSOLE_LOG = "console.log"
QMP_READY_TIMEOUT_S = 30.0
_POLL_S = 0.02
_STDERR_TAIL = 600


@dataclass(frozen=True)
class Orphan:
    pid: int
    tenant: str
    qmp_path: str


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the last ')' (the command name may contain anything).
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("Z", "X", "")


def _qmp_value(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == "-qmp":
            return argv[i + 1]
    return None


def process_matches(pid: int, control_socket: str) -> bool:
    """True when ``pid`` is a live QEMU started for exactly this QMP socket path."""
    if pid <= 1:
        return False
    argv = _cmdline(pid)
    if argv is None or _is_zombie(pid):
        return False
    try:
        expected = qmp_arg(Path(control_socket))
    except LobsterError:
        return False
    return _qmp_value(argv) == expected


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie.

    Only a zombie is reaped: waiting on a live child would race with ``Popen``.
    """
    if _is_zombie(pid) and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _wait_gone(pid: int, control_socket: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(pid)
        if not process_matches(pid, control_socket):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _STDERR_TAIL))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def _live_qemus() -> list[tuple[int, str]]:
    """(pid, -qmp value) of every live process that has a ``-qmp`` argument."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        value = _qmp_value(argv) if argv else None
        if value is not None and not _is_zombie(int(entry)):
            found.append((int(entry), value))
    return found


def pids_for_socket(qmp_path: Path) -> list[int]:
    """Live QEMUs started for exactly this QMP socket path."""
    want = qmp_arg(qmp_path)
    return [pid for pid, value in _live_qemus() if value == want]


def find_orphans(cfg: Config, known: set[str]) -> list[Orphan]:
    """QEMU processes started by lobsterd (a qmp socket under ``<run>/vm/``) whose tenant
    is not in ``known``. Matching is on the whole path component: ``lobster-1`` never
    matches ``lobster-10``, nor ``alice`` ``alice2``."""
    base = re.escape(str(cfg.paths.run_dir / "vm"))
    pattern = re.compile(rf"unix:{base}/([^/,]+)/{re.escape(QMP_SOCKET)}{re.escape(QMP_SUFFIX)}")
    found = []
    for pid, value in _live_qemus():
        m = pattern.fullmatch(value)
        if m and m.group(1) not in known:
            path = value.removeprefix("unix:").removesuffix(QMP_SUFFIX)
            found.append(Orphan(pid, m.group(1), path))
    return found


class QemuDriver:
    """:class:`~lobsterd.adapters.vmm.base.VmmDriver` for QEMU microvm."""

    name = "qemu"

    def __init__(self, cfg: Config, *, cgroup_root: Path = CGROUP_ROOT) -> None:
        self.cfg = cfg
        self.cgroup_root = cgroup_root
        self.binary = cfg.vm.qemu_binary
        # Our own children, kept so they are reaped (no zombies, no ResourceWarning)
        # when this process is the one that stops them.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # --- paths ---------------------------------------------------------------------------

    def run_dir(self, tenant: str) -> Path:
        return self.cfg.paths.run_dir / "vm" / tenant

    def _cgroup(self, handle: VmHandle) -> Cgroup:
        return Cgroup.open(handle.cgroup, root=self.cgroup_root)

    # --- boot ----------------------------------------------------------------------------

    def boot(self, spec: VmSpec) -> VmHandle:
        """Start the VM; returns once QEMU answers on QMP (the guest is then booting)."""
        run_dir = spec.run_dir
        qmp_path = run_dir / QMP_SOCKET
        if pids_for_socket(qmp_path):
            raise VmmError(
                f'a QEMU for tenant "{spec.tenant}" is already running',
                hint=f"stop it first: lobsterd evict {spec.tenant} (or reconcile)",
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chown(run_dir, 0, 0)
        run_dir.chmod(0o700)
        for stale in (qmp_path, run_dir / PIDFILE):
            stale.unlink(missing_ok=True)
        console = run_dir / CONSOLE_LOG if spec.debug_console else None
        stderr_path = run_dir / STDERR_LOG

        cg = Cgroup.open(spec.cgroup, root=self.cgroup_root)
        proc: subprocess.Popen[bytes] | None = None
        try:
            cg = Cgroup.create(
                spec.cgroup,
                spec.cgroup_mem_bytes,
                spec.cgroup_cpu_quota_us,
                spec.cgroup_cpu_period_us,
                spec.cgroup_pids_max,
                root=self.cgroup_root,
            )
            tap_fd = open_tap_fd(spec.tap, netns=spec.tap_netns)
            try:
                argv = build_qemu_argv(
                    spec,
                    tap_fd=tap_fd,
                    qmp_path=qmp_path,
                    pidfile=run_dir / PIDFILE,
                    console_log=console,
                    binary=self.binary,
                )
                err_fd = os.open(
                    stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
                )
                try:
                    proc = subprocess.Popen(
                        argv,
                        pass_fds=(tap_fd,),
                        start_new_session=True,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err_fd,
                        preexec_fn=cg.enter_fn(),  # noqa: PLW1509 - raw syscalls only
                        # QEMU's environment is readable through /proc by its own uid:
                        # give it nothing of ours (the host may hold provider keys there).
                        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                             "LC_ALL": "C"},
                        cwd="/",
                    )
                except (OSError, subprocess.SubprocessError) as exc:
                    raise VmBootFailed(f"cannot start {self.binary}: {exc}") from None
                finally:
                    os.close(err_fd)
            finally:
                os.close(tap_fd)
            self._wait_qmp(proc, qmp_path, stderr_path)
            if proc.pid not in cg.pids():
                raise VmBootFailed(f"QEMU (pid {proc.pid}) is not in cgroup {spec.cgroup}")
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            with contextlib.suppress(LobsterError):
                cg.kill_all(timeout_s=5)
                cg.remove(timeout_s=5)
            qmp_path.unlink(missing_ok=True)
            raise
        self._children[proc.pid] = proc
        return VmHandle(
            vmm=self.name,
            pid=proc.pid,
            control_socket=str(qmp_path),
            cgroup=spec.cgroup,
            started_at=time.time(),
        )

    def _wait_qmp(self, proc: subprocess.Popen[bytes], qmp_path: Path, stderr: Path) -> None:
        """Poll until QMP answers ``query-status`` (bounded; never a fixed sleep)."""
        timeout = min(QMP_READY_TIMEOUT_S, self.cfg.vm.boot_timeout_s)
        deadline = time.monotonic() + timeout
        last = "no QMP socket yet"
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                detail = _tail(stderr) or "no output"
                raise VmBootFailed(f"QEMU exited with status {code} during start-up: {detail}")
            if qmp_path.exists():
                try:
                    with QmpClient(qmp_path, timeout_s=2.0) as qmp:
                        qmp.status()
                    return
                except (VmmError, OSError) as exc:
                    last = str(exc)
            time.sleep(_POLL_S)
        raise VmBootFailed(f"QEMU did not answer on QMP within {timeout:g}s ({last})")

    # --- stop / kill ---------------------------------------------------------------------

    def _signal(self, handle: VmHandle, sig: signal.Signals) -> None:
        if process_matches(handle.pid, handle.control_socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, sig)

    def _cleanup(self, handle: VmHandle) -> None:
        child = self._children.pop(handle.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        cg = self._cgroup(handle)
        try:
            cg.kill_all(timeout_s=5)
            cg.remove(timeout_s=10)
        except CgroupError as exc:
            raise VmmError(f"VM of {handle.cgroup} stopped but its cgroup remains: {exc}") from None
        run_dir = Path(handle.control_socket).parent
        for name in (QMP_SOCKET, PIDFILE):
            (run_dir / name).unlink(missing_ok=True)

    def stop(self, handle: VmHandle, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the VM to exit by itself (the caller may have asked
        the guest to power off), then QMP ``quit``, then SIGKILL; then remove the cgroup.
        Idempotent: a VM that is already gone only has its leftovers cleaned."""
        pid, sock = handle.pid, handle.control_socket
        if process_matches(pid, sock) and not _wait_gone(pid, sock, timeout_s):
            with contextlib.suppress(VmmError, OSError), QmpClient(sock, timeout_s=2.0) as q:
                q.execute("quit")
            if not _wait_gone(pid, sock, 3.0):
                self._signal(handle, signal.SIGKILL)
                if not _wait_gone(pid, sock, 5.0):
                    raise VmmError(f"QEMU pid {pid} survived SIGKILL")
        _reap(pid)
        self._cleanup(handle)

    def kill(self, handle: VmHandle) -> None:
        """SIGKILL now, then remove the cgroup; idempotent."""
        self._signal(handle, signal.SIGKILL)
        if not _wait_gone(handle.pid, handle.control_socket, 5.0):
            raise VmmError(f"QEMU pid {handle.pid} survived SIGKILL")
        self._cleanup(handle)

    def kill_orphans(self, tenant: str) -> int:
        """Kill every lobsterd QEMU of ``tenant`` (exact match); returns how many."""
        qmp_path = self.run_dir(tenant) / QMP_SOCKET
        victims = pids_for_socket(qmp_path)
        for pid in victims:
            if process_matches(pid, str(qmp_path)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in victims:
            if not _wait_gone(pid, str(qmp_path), 5.0):
                raise VmmError(f"QEMU pid {pid} of tenant {tenant} survived SIGKILL")
        return len(victims)

    # --- control -------------------------------------------------------------------------

    def _qmp(self, handle: VmHandle, command: str) -> None:
        if not process_matches(handle.pid, handle.control_socket):
            raise VmmError(f"VM of {handle.cgroup} is not running (pid {handle.pid})")
        with QmpClient(handle.control_socket) as qmp:
            qmp.execute(command)

    def pause(self, handle: VmHandle) -> None:
        self._qmp(handle, "stop")

    def resume(self, handle: VmHandle) -> None:
        self._qmp(handle, "cont")

    def status(self, handle: VmHandle) -> str:
        """QMP run state (``running``, ``paused``, ...), for tests and doctor."""
        if not process_matches(handle.pid, handle.control_socket):
            return "gone"
        with QmpClient(handle.control_socket) as qmp:
            return qmp.status()

    def snapshot_save(self, handle: VmHandle, dest_dir: Path) -> None:
        raise VmmError(
            "suspend snapshots are not implemented for the QEMU driver yet",
            hint="stop the tenant instead of suspending it",
        )

    def snapshot_restore(self, spec: VmSpec, src_dir: Path) -> VmHandle:
        raise VmmError(
            "resuming from a snapshot is not implemented for the QEMU driver yet",
            hint="boot the tenant afresh",
        )

    # --- observation ---------------------------------------------------------------------

    def is_alive(self, handle: VmHandle) -> bool:
        return process_matches(handle.pid, handle.control_socket)

    def stats(self, handle: VmHandle) -> VmStats:
        if not self.is_alive(handle):
            return VmStats(alive=False)
        rss: int | None = None
        try:
            for line in Path(f"/proc/{handle.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            rss = None
        cpu: float | None = None
        limit: int | None = None
        with contextlib.suppress(LobsterError, OSError):
            cg = self._cgroup(handle).stats()
            cpu, limit = cg.cpu_seconds, cg.memory_limit_bytes
        return VmStats(alive=True, rss_bytes=rss, cpu_seconds=cpu, mem_limit_bytes=limit)
