#!/usr/bin/python3
"""lobster-init: PID 1 of a lobster guest (installed as /sbin/lobster-init).

The initramfs has already mounted the root overlay, moved /dev, /proc and /sys and
configured eth0. This process finishes the job (devpts, /dev/shm, /run, /tmp, hostname,
``lo``), then starts and supervises the guest agent and dropbear, restarting either with
backoff when it exits, reaps every orphan, and powers the VM off on SIGTERM/SIGINT (the
agent sends SIGTERM when the host asks it to shut down).

If PID 1 exits the kernel panics, so the main loop catches everything and keeps going.
Standard library only. ``LOBSTER_INIT_DRY_RUN=1`` (tests) skips mounts, hostname and
``lo``, never signals processes outside its own children, and exits instead of powering
off, so the supervisor can be tested as an ordinary process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import selectors
import shlex
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0
STOP_GRACE_S = 3.0
LOG_MAX_BYTES = 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MNT_DETACH = 0x2
RB_POWER_OFF = 0x4321FEDC
PR_SET_CHILD_SUBREAPER = 36
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


# --------------------------------------------------------------------------- pure helpers


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel command line → {key: value}; a value may itself contain ``=``."""
    out: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


def guest_ip(params: Mapping[str, str]) -> str | None:
    """The guest's IPv4 address from ``lobster.ip=<a.b.c.d>/<len>`` (None if malformed)."""
    addr = params.get("lobster.ip", "").partition("/")[0]
    parts = addr.split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return addr
    return None


def valid_hostname(name: str) -> bool:
    return bool(_LABEL.fullmatch(name))


def dropbear_argv(binary: str, ip: str) -> list[str]:
    """Dropbear in the foreground, logging to stderr, keys only, no port forwarding.

    ``-R`` creates host keys on first start; they live on the overlay and so persist.
    """
    return [binary, "-R", "-F", "-E", "-s", "-j", "-k", "-p", f"{ip}:22"]


def next_backoff(current: float, ran_s: float) -> tuple[float, float]:
    """(delay before this restart, backoff for the next one); a stable run resets it."""
    delay = BACKOFF_MIN_S if ran_s >= STABLE_S else current
    return delay, min(delay * 2, BACKOFF_MAX_S)


def mount_points(mounts_text: str) -> set[str]:
    """Mount points listed in /proc/self/mounts (octal escapes decoded)."""
    out: set[str] = set()
    for line in mounts_text.splitlines():
        cols = line.split()
        if len(cols) >= 2:
            out.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), cols[1]))
    return out


# --------------------------------------------------------------------------- settings


#: The agent is imported rather than run as a script so that its bytecode is cached
#: (under TCG, compiling agent.py costs about a second of every boot); -S skips site.
DEFAULT_AGENT_CMD: tuple[str, ...] = (
    "/usr/bin/python3",
    "-S",
    "-c",
    "import sys; sys.path.insert(0, '/usr/lib/lobster'); import agent; sys.exit(agent.main())",
)


class InitSettings:
    """Paths and commands; production defaults, overridable by LOBSTER_* variables.

    Plain classes instead of dataclasses (and no ``logging``) throughout this file: every
    import is paid at each boot, at interpreter speed under TCG, before the agent starts.
    """

    def __init__(
        self,
        cmdline_file: str = "/proc/cmdline",
        agent_cmd: tuple[str, ...] = DEFAULT_AGENT_CMD,
        dropbear: str = "/usr/sbin/dropbear",
        log_dir: str = "/var/log/lobster",
        dry_run: bool = False,
    ) -> None:
        self.cmdline_file = cmdline_file
        self.agent_cmd = agent_cmd
        self.dropbear = dropbear
        self.log_dir = log_dir
        self.dry_run = dry_run

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InitSettings:
        d = cls()
        agent = env.get("LOBSTER_AGENT_CMD")
        return cls(
            cmdline_file=env.get("LOBSTER_CMDLINE_FILE", d.cmdline_file),
            agent_cmd=tuple(shlex.split(agent)) if agent else d.agent_cmd,
            dropbear=env.get("LOBSTER_DROPBEAR", d.dropbear),
            log_dir=env.get("LOBSTER_LOG_DIR", d.log_dir),
            dry_run=env.get("LOBSTER_INIT_DRY_RUN", "") == "1",
        )


class RotatingLog:
    """Timestamped lines in a file capped at ``max_bytes``, plus one rotated file."""

    def __init__(self, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.path: str | None = None
        self._fd: int | None = None
        self._size = 0

    def open(self, path: str) -> None:
        self.close()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.path, self._fd, self._size = path, fd, os.fstat(fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def write(self, line: str) -> None:
        if self._fd is None or self.path is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        data = f"{stamp} {line}\n".encode(errors="replace")
        try:
            if self._size + len(data) > self.max_bytes:
                os.replace(self.path, self.path + ".1")
                self.open(self.path)
            assert self._fd is not None
            os.write(self._fd, data)
            self._size += len(data)
        except OSError:
            pass  # a full or broken disk must never take PID 1 down


# --------------------------------------------------------------------------- system calls


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    libc = _libc()
    rc = libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    if _libc().umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def power_off() -> None:
    """reboot(RB_POWER_OFF); returns only if the kernel refused."""
    _libc().reboot(RB_POWER_OFF)


def link_up(ifname: str) -> None:
    """Set IFF_UP on an interface with SIOCSIFFLAGS (no ``ip`` binary needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", ifname.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", ifname.encode(), flags | IFF_UP))


def kmsg(line: str) -> None:
    """Best effort: a line in the kernel log, visible on a debug console."""
    with contextlib.suppress(OSError), open("/dev/kmsg", "w") as fh:
        fh.write(f"lobster-init: {line}\n")


# --------------------------------------------------------------------------- services


class Service:
    """One supervised child and its restart bookkeeping."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.pid: int | None = None
        self.started_at = 0.0
        self.backoff = BACKOFF_MIN_S
        self.next_start = 0.0  # monotonic; 0 = now
        self.out_fd: int | None = None
        self.restarts = 0
        self.partial = b""  # an unfinished output line


class Init:
    """The supervisor; every public step is safe to call again."""

    def __init__(self, settings: InitSettings) -> None:
        self.settings = settings
        self.params = parse_cmdline(self._read(settings.cmdline_file))
        self.services: list[Service] = []
        self.sel = selectors.DefaultSelector()
        self.shutting_down = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.log = RotatingLog()

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    # ---- early setup

    def setup_system(self) -> None:
        if self.settings.dry_run:
            # Adopt orphans like PID 1 does, so reaping is exercised in tests too.
            _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            return
        current = mount_points(self._read("/proc/self/mounts"))
        plan = [
            ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
            ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),  # noqa: S108
            ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
            ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),  # noqa: S108
        ]
        for src, target, fstype, flags, data in plan:
            if target in current:
                continue
            try:
                os.makedirs(target, exist_ok=True)
                mount(src, target, fstype, flags, data)
            except OSError as exc:
                self.note(f"cannot mount {target}: {exc.strerror or exc}")
        name = self.params.get("lobster.name", "")
        if valid_hostname(name):
            try:
                socket.sethostname(name)
            except OSError as exc:
                self.note(f"cannot set hostname: {exc.strerror or exc}")
        try:
            link_up("lo")
        except OSError as exc:
            self.note(f"cannot bring lo up: {exc.strerror or exc}")

    def setup_logging(self) -> None:
        try:
            os.makedirs(self.settings.log_dir, mode=0o700, exist_ok=True)
            self.log.open(os.path.join(self.settings.log_dir, "init.log"))
        except OSError as exc:
            kmsg(f"no log file: {exc}")

    def note(self, msg: str) -> None:
        self.log.write(msg)
        kmsg(msg)

    def plan_services(self) -> None:
        self.services = [Service("agent", list(self.settings.agent_cmd))]
        ip = guest_ip(self.params)
        if not os.path.exists(self.settings.dropbear):
            self.note("dropbear not installed; SSH is disabled")
        elif ip is None:
            self.note("no valid lobster.ip; SSH is disabled")
        else:
            if not self.settings.dry_run:
                with contextlib.suppress(OSError):
                    os.makedirs("/etc/dropbear", mode=0o700, exist_ok=True)
            self.services.append(Service("dropbear", dropbear_argv(self.settings.dropbear, ip)))

    # ---- children

    def child_env(self) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        env.update({k: v for k, v in os.environ.items() if k.startswith("LOBSTER_")})
        env.pop("LOBSTER_INIT_DRY_RUN", None)
        return env

    def start(self, svc: Service) -> None:
        r, w = os.pipe()
        try:
            pid = os.posix_spawnp(
                svc.argv[0],
                svc.argv,
                self.child_env(),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, w, 1),
                    (os.POSIX_SPAWN_DUP2, w, 2),
                ],
                setsid=True,
            )
        except OSError as exc:
            os.close(r)
            self.note(f"cannot start {svc.name}: {exc.strerror or exc}")
            self._schedule_restart(svc, 0.0)
            return
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self.sel.register(r, selectors.EVENT_READ, svc)
        svc.pid, svc.out_fd, svc.started_at = pid, r, time.monotonic()
        self.note(f"started {svc.name} (pid {pid})")

    def _schedule_restart(self, svc: Service, ran_s: float) -> None:
        delay, svc.backoff = next_backoff(svc.backoff, ran_s)
        svc.next_start = time.monotonic() + delay

    def _drain(self, fd: int, svc: Service) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            if svc.out_fd == fd:
                svc.out_fd = None
            if svc.partial:
                self.log.write(f"[{svc.name}] {svc.partial.decode(errors='replace')}")
                svc.partial = b""
            return
        lines = (svc.partial + data).split(b"\n")
        svc.partial = lines.pop()[-8192:]
        for line in lines:
            self.log.write(f"[{svc.name}] {line.decode(errors='replace')}")

    def reap(self) -> None:
        """Collect every exited child (supervised or orphan) and schedule restarts."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for svc in self.services:
                if svc.pid == pid:
                    ran = time.monotonic() - svc.started_at
                    svc.pid = None
                    self.note(f"{svc.name} exited ({describe_status(status)}) after {ran:.1f}s")
                    if not self.shutting_down:
                        svc.restarts += 1
                        self._schedule_restart(svc, ran)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.shutting_down = True

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def step(self) -> None:
        """One turn of the main loop: wait, pump output, reap, (re)start what is due."""
        now = time.monotonic()
        due = [s.next_start for s in self.services if s.pid is None]
        timeout = max(0.0, min([*due, now + 1.0]) - now)
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 512):
                        pass
            else:
                self._drain(key.fd, key.data)
        self.reap()
        if self.shutting_down:
            return
        now = time.monotonic()
        for svc in self.services:
            if svc.pid is None and svc.next_start <= now:
                self.start(svc)

    def run(self) -> int:
        self.install_signals()
        for fn in (self.setup_system, self.setup_logging, self.plan_services):
            try:
                fn()
            except Exception as exc:
                kmsg(f"{fn.__name__} failed: {exc!r}")
        self.note(f"up; supervising {', '.join(s.name for s in self.services)}")
        while not self.shutting_down:
            try:
                self.step()
            except Exception as exc:
                kmsg(f"main loop error: {exc!r}")
                time.sleep(0.5)
        return self.shutdown()

    # ---- shutdown

    def _wait_children(self, timeout: float) -> bool:
        """Reap until no supervised child runs or ``timeout`` passes; True if all gone."""
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if all(s.pid is None for s in self.services):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _signal_services(self, sig: int) -> None:
        for svc in self.services:
            if svc.pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(svc.pid, sig)

    def shutdown(self) -> int:
        self.note("shutting down")
        try:
            self._signal_services(signal.SIGTERM)
            if not self._wait_children(STOP_GRACE_S):
                self._signal_services(signal.SIGKILL)
                self._wait_children(1.0)
            if os.getpid() == 1 and not self.settings.dry_run:
                # Everything else left in the guest (orphans of the gateway, sessions).
                with contextlib.suppress(OSError):
                    os.kill(-1, signal.SIGTERM)
                time.sleep(0.5)
                with contextlib.suppress(OSError):
                    os.kill(-1, signal.SIGKILL)
                self.reap()
        except Exception as exc:
            kmsg(f"stopping children failed: {exc!r}")
        self.log.close()
        os.sync()
        if self.settings.dry_run:
            return 0
        for target in ("/tmp", "/dev/shm", "/dev/pts", "/run"):  # noqa: S108
            with contextlib.suppress(OSError):
                umount(target)
        with contextlib.suppress(OSError):
            mount("none", "/", "none", MS_REMOUNT | MS_RDONLY)
        os.sync()
        kmsg("power off")
        while True:  # PID 1 must never return
            with contextlib.suppress(Exception):
                power_off()
            time.sleep(1)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(sig).name}"
        return f"killed by signal {sig}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def main() -> int:
    settings = InitSettings.from_env(os.environ)
    if os.getpid() != 1 and not settings.dry_run:
        print("lobster-init must run as PID 1 (or set LOBSTER_INIT_DRY_RUN=1)", file=sys.stderr)
        return 2
    while True:
        try:
            return Init(settings).run()
        except Exception as exc:  # PID 1 must not die: start over
            kmsg(f"fatal error, restarting the supervisor: {exc!r}")
            if settings.dry_run:
                raise
            time.sleep(1)
        except BaseException as exc:
            if settings.dry_run:
                raise
            kmsg(f"ignored {exc!r}")
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
