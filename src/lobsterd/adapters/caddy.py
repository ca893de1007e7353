"""Caddy, owned by lobsterd: its supervisor (systemd unit or watcher) and base config.

The admin API listens only on a Unix socket inside ``<run_dir>/caddy/`` (0700 root, or
0770 root:caddy when Caddy runs as the ``caddy`` user), so the file system decides who
may rewrite routes: root and Caddy itself, no other local user.

Caddy boots from ``<config_dir>/caddy.json`` — the base config lobsterd writes — so a
Caddy restart (crash, reboot) comes back with the ``lobster`` server and its 404
catch-all; lobsterd's reconcile then re-adds exactly the live tenants' routes. Without
systemd, Caddy's watcher (``adapters/caddy_watch.py``) restarts a Caddy that died and
runs that reconcile itself.

The admin API client lives in ``adapters/caddy_admin.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from lobsterd.adapters import proc
from lobsterd.adapters.caddy_admin import CaddyAdmin
from lobsterd.config import Config
from lobsterd.core import caddy_config as cc
from lobsterd.errors import CaddyApiError, ConfigInvalid, ExecFailed

UNIT_NAME = "lobsterd-caddy.service"
UNIT_DIR = Path("/etc/systemd/system")
_LINE_MAX = 300  # longest log line quoted in an error
# -- supervisor ------------------------------------------------------------------------

WATCH_MODULE = "lobsterd.adapters.caddy_watch"
# The watcher gives Caddy CADDY_STOP_GRACE_S after SIGTERM, then SIGKILLs it: stop()
# waits that long for the watcher, plus a margin, before it SIGKILLs the watcher.
CADDY_STOP_GRACE_S = 5.0
WATCHER_STOP_GRACE_S = CADDY_STOP_GRACE_S + 5.0
_CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class CaddyStatus:
    mode: Literal["systemd", "process"]
    running: bool
    admin_ok: bool
    pid: int | None
    config_file: Path
    admin_socket: Path
    watcher_pid: int | None = None


@dataclass(frozen=True)
class _WatcherContext:
    run_dir: Path
    user: str | None
    bind_host: str


class _Process:
    """Per-process state. ``watcher`` is set only inside Caddy's watcher: there every
    supervisor for the same run directory (also the one ``reconcile_caddy`` builds)
    uses the watcher's settings and never starts a second watcher."""

    watcher: _WatcherContext | None = None
    # Watchers this process started: reaped by whoever stops them (no zombies, and no
    # stale Popen that could later reap a reused pid).
    children: ClassVar[dict[int, subprocess.Popen[bytes]]] = {}


def enter_watcher_context(run_dir: Path, user: str | None, bind_host: str) -> None:
    """Called by the watcher before it builds any supervisor (see :class:`_Process`)."""
    _Process.watcher = _WatcherContext(Path(run_dir), user, bind_host)


def systemd_is_pid1() -> bool:
    """sd_booted(): systemd creates this directory early at boot, nothing else does."""
    return Path("/run/systemd/system").is_dir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    with contextlib.suppress(OSError):
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        if stat_line.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def _wait_exit(pid: int, pidfd: int | None, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit; True when it has."""
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if poller.poll(max(0, int(timeout_s * 1000))):
            return True
        return not _pid_alive(pid)
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    child = _Process.children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not our child: its parent (or init) reaps it
        if done:
            return
        time.sleep(0.02)


def stop_process(pid: int, grace_s: float, is_ours: Callable[[int], bool]) -> bool:
    """SIGTERM ``pid`` if ``is_ours(pid)``, SIGKILL after ``grace_s``; True if signalled.

    The process is pinned with a pidfd *before* its command line is checked and every
    signal goes through that pidfd, so a pid reused meanwhile is never signalled.
    """
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # pragma: no cover - kernels before 5.3
        pidfd = None

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:  # pragma: no cover - kernels before 5.3
                os.kill(pid, sig)

    try:
        if not is_ours(pid):
            return False
        send(signal.SIGTERM)
        if not _wait_exit(pid, pidfd, grace_s):
            send(signal.SIGKILL)
            _wait_exit(pid, pidfd, 5.0)
        _reap(pid)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _open_private_file(path: Path, *, truncate: bool) -> int:
    """A log file for a root process in a directory Caddy's user owns: never through a
    symlink, never a file with other hard links."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_APPEND
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ExecFailed(
            f"cannot open {path}: {exc.strerror or exc}", hint="remove it and retry"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ExecFailed(
            f"refusing to write {path}: not a plain file with a single link",
            hint="remove it and retry",
        )
    if truncate:
        os.ftruncate(fd, 0)
    return fd


def _tmp_suffix() -> str:
    """Unique per process *and* thread: two threads may prepare at the same time."""
    return f"{os.getpid()}-{threading.get_ident()}"


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a 0600 file (pid files, the watcher's state)."""
    tmp = path.with_name(f".{path.name}.tmp-{_tmp_suffix()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_pid_file(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _last_line(path: Path, *, max_bytes: int = 4096) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    if not lines:
        return "(empty log)"
    # Watcher lines start "<time> caddy-watch[<pid>]: "; the message is what matters.
    return lines[-1].split("]: ", 1)[-1][:_LINE_MAX]


def _traversable_by(path: Path, uid: int, gids: set[int]) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _chown_tree(root: Path, uid: int, gid: int, skip: frozenset[str] = frozenset()) -> None:
    """``chown -R`` without following symlinks; touches only entries that differ and
    leaves ``skip`` (absolute paths of root's own files) alone."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            if p in skip:
                continue
            st = os.lstat(p)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(p, uid, gid)


class CaddySupervisor:
    """Keeps one Caddy running with lobsterd's base config.

    With systemd as PID 1 it installs and enables ``lobsterd-caddy.service``
    (``Restart=on-failure``). Otherwise it starts Caddy's watcher
    (``python -m lobsterd.adapters.caddy_watch``), a detached process that runs Caddy as
    its child, restarts it with backoff when it dies and then re-applies the tenant
    routes from the registry. Caddy runs as ``user`` (default ``caddy``, when that
    account exists and we are root) with only CAP_NET_BIND_SERVICE; else as the current
    user.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        user: str | None = "caddy",
        bind_host: str = "",
        use_systemd: bool | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.cfg = cfg
        self.bind_host = bind_host
        self.start_timeout_s = start_timeout_s
        ctx = _Process.watcher
        self.in_watcher = ctx is not None and ctx.run_dir == self.run_dir
        if ctx is not None and self.in_watcher:
            user, self.bind_host, use_systemd = ctx.user, ctx.bind_host, False
        self.use_systemd = systemd_is_pid1() if use_systemd is None else use_systemd
        self.account: pwd.struct_passwd | None = None
        if user and os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                self.account = pwd.getpwnam(user)

    # -- paths -------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.cfg.paths.run_dir / "caddy"

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"

    @property
    def pid_file(self) -> Path:
        """Caddy's pid (written by the watcher at each start)."""
        return self.run_dir / "caddy.pid"

    @property
    def watcher_pid_file(self) -> Path:
        return self.run_dir / "watcher.pid"

    @property
    def watch_state_file(self) -> Path:
        """What the watcher runs: config and Caddy's user and bind address, as the last
        ``ensure_running`` wanted them. In ``<run_dir>`` (root's), not in the Caddy
        directory, because Caddy's user can write there and this file steers root."""
        return self.cfg.paths.run_dir / "caddy-watch.json"

    @property
    def config_file(self) -> Path:
        return self.cfg.paths.config_dir / "caddy.json"

    @property
    def state_dir(self) -> Path:
        """Caddy's own data: certificate storage, home, logs."""
        return self.cfg.paths.state_dir / "caddy"

    @property
    def storage_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def home_dir(self) -> Path:
        return self.state_dir / "home"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "caddy.log"

    @property
    def output_file(self) -> Path:
        """stdout/stderr of a Caddy we started (start-up errors before logging is set)."""
        return self.state_dir / "caddy.out"

    @property
    def watcher_log(self) -> Path:
        """The watcher's stdout/stderr: Caddy's exits, restarts and route re-applies."""
        return self.state_dir / "watcher.log"

    @property
    def unit_file(self) -> Path:
        return UNIT_DIR / UNIT_NAME

    def admin(self) -> CaddyAdmin:
        return CaddyAdmin(self.admin_socket)

    def base_config(self) -> dict[str, Any]:
        c = self.cfg.caddy
        return cc.base_config(
            admin_socket=self.admin_socket,
            domain=c.domain,
            tls_mode=c.tls,
            cert_file=c.cert_file,
            key_file=c.key_file,
            http_port=c.http_port,
            https_port=c.https_port,
            storage_dir=self.storage_dir,
            bind_host=self.bind_host,
            log_file=self.log_file,
        )

    def _binary(self) -> str:
        found = shutil.which(self.cfg.caddy.binary)
        if found is None:
            raise ExecFailed(
                f"Caddy binary {self.cfg.caddy.binary!r} not found",
                hint="install Caddy (apt-get install caddy) or set caddy.binary",
            )
        return found

    # -- preparation -------------------------------------------------------------------

    def prepare(self) -> None:
        """Directories, modes and the on-disk base config (idempotent)."""
        acct = self.account
        uid = acct.pw_uid if acct else os.geteuid()
        gid = acct.pw_gid if acct else os.getegid()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if acct:
            # Caddy must create its socket here; no one else but root gets in.
            os.chown(self.run_dir, 0, gid)
            os.chmod(self.run_dir, 0o770)  # noqa: S103 - group is caddy's own, others get nothing
        else:
            os.chmod(self.run_dir, 0o700)
        for d in (self.state_dir, self.storage_dir, self.home_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        if acct:
            # Everything under Caddy's own directory is Caddy's (also after it ran as
            # root), except the watcher's log, which root writes.
            skip = frozenset(str(p) for p in (self.watcher_log, self._rotated_watcher_log))
            _chown_tree(self.state_dir, uid, gid, skip)
        self.cfg.paths.config_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        if acct:
            self._make_reachable(uid, {gid, *os.getgrouplist(acct.pw_name, gid)})
        self._write_config(gid if acct else None)

    @property
    def _rotated_watcher_log(self) -> Path:
        return self.watcher_log.with_name(self.watcher_log.name + ".1")

    def _make_reachable(self, uid: int, gids: set[int]) -> None:
        """Caddy's account must traverse config_dir and state_dir (only search, o+x);
        what lies inside stays protected by its own modes."""
        own = (self.cfg.paths.config_dir, self.cfg.paths.state_dir)
        for d in own:
            if not _traversable_by(d, uid, gids):
                os.chmod(d, d.stat().st_mode & 0o7777 | 0o001)
        needed = [self.config_file.parent, self.state_dir, *self._extra_read_paths()]
        for target in needed:
            chain = [*reversed(target.parents), *([target] if target.is_dir() else [])]
            for anc in chain:
                if anc.exists() and not _traversable_by(anc, uid, gids):
                    raise ConfigInvalid(
                        f"Caddy's user cannot enter {anc} (needed for {target})",
                        hint=f"chmod o+x {anc}, or run Caddy as root (not recommended)",
                    )

    def _extra_read_paths(self) -> list[Path]:
        c = self.cfg.caddy
        return [p for p in (c.cert_file, c.key_file) if p is not None]

    def _write_config(self, gid: int | None) -> bool:
        data = cc.render(self.base_config())
        try:
            if self.config_file.read_bytes() == data:
                if gid is not None:
                    os.chown(self.config_file, 0, gid)
                    os.chmod(self.config_file, 0o640)
                return False
        except FileNotFoundError:
            pass
        tmp = self.config_file.with_name(f".{self.config_file.name}.tmp-{_tmp_suffix()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if gid is not None:
                os.fchown(fd, 0, gid)
                os.fchmod(fd, 0o640)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.config_file)
        return True

    def watch_state(self) -> dict[str, Any]:
        """What the watcher needs to run this supervisor's Caddy (no secrets in it)."""
        return {
            "config": self.cfg.model_dump(mode="json"),
            "user": self.account.pw_name if self.account else None,
            "bind_host": self.bind_host,
        }

    def write_watch_state(self) -> None:
        """Hand the watcher this supervisor's settings; it re-reads them at each Caddy
        restart and route re-apply, so the last ``ensure_running`` wins."""
        text = json.dumps(self.watch_state(), indent=1, sort_keys=True) + "\n"
        with contextlib.suppress(OSError):
            if self.watch_state_file.read_text() == text:
                return
        _write_private(self.watch_state_file, text)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.run_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- process mode: identities ------------------------------------------------------

    def _read_pid(self) -> int | None:
        return _read_pid_file(self.pid_file)

    def _is_our_caddy(self, pid: int) -> bool:
        """The pid file can be stale and the pid reused: check it is *our* Caddy."""
        if not _pid_alive(pid):
            return False
        argv = _cmdline(pid)
        return argv is not None and b"run" in argv and str(self.config_file).encode() in argv

    def is_our_watcher(self, pid: int) -> bool:
        """A live watcher of *this* lobsterd root (its exact ``--state=`` element)."""
        if not _pid_alive(pid):
            return False
        argv = _cmdline(pid)
        return (
            argv is not None
            and WATCH_MODULE.encode() in argv
            and f"--state={self.watch_state_file}".encode() in argv
        )

    def watcher_pid(self) -> int | None:
        pid = _read_pid_file(self.watcher_pid_file)
        return pid if pid is not None and self.is_our_watcher(pid) else None

    def find_caddy_pid(self) -> int | None:
        """Our live Caddy: from the pid file, else by its command line in /proc (a
        watcher that died leaves its Caddy running; the next one adopts it)."""
        pid = self._read_pid()
        if pid is not None and self._is_our_caddy(pid):
            return pid
        for entry in Path("/proc").iterdir():
            if (
                entry.name.isdigit()
                and int(entry.name) != pid
                and self._is_our_caddy(int(entry.name))
            ):
                return int(entry.name)
        return None

    # -- process mode: starting --------------------------------------------------------

    def _argv(self) -> list[str]:
        argv = [self._binary(), "run", "--config", str(self.config_file)]
        if self.account is None:
            return argv
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ExecFailed(
                "setpriv (util-linux) is needed to start Caddy as an unprivileged user",
                hint="install util-linux, or run Caddy as root (user=None)",
            )
        return [
            setpriv,
            f"--reuid={self.account.pw_uid}",
            f"--regid={self.account.pw_gid}",
            "--init-groups",
            "--inh-caps=-all,+net_bind_service",
            "--ambient-caps=-all,+net_bind_service",
            "--bounding-set=-all,+net_bind_service",
            "--no-new-privs",
            "--",
            *argv,
        ]

    def _env(self) -> dict[str, str]:
        """A clean environment: nothing of the caller's (tokens, keys) reaches Caddy."""
        return {
            "PATH": _CLEAN_PATH,
            "HOME": str(self.home_dir),
            "XDG_CONFIG_HOME": str(self.home_dir / "config"),
            "XDG_DATA_HOME": str(self.home_dir / "data"),
        }

    def spawn_caddy(self) -> subprocess.Popen[bytes]:
        """Start ``caddy run`` as a child of the calling process (the watcher) and record
        its pid. A stale socket is removed; a live one means a Caddy we do not know."""
        if self.admin_socket.exists() or self.admin_socket.is_symlink():
            if CaddyAdmin(self.admin_socket, timeout_s=2.0).is_up():
                raise CaddyApiError(
                    f"a Caddy that lobsterd did not start answers on {self.admin_socket}",
                    hint="stop that Caddy, then run lobsterd init",
                )
            with contextlib.suppress(FileNotFoundError):
                self.admin_socket.unlink()
        out_fd = _open_private_file(self.output_file, truncate=True)
        try:
            # A daemon, not a command: proc.run's timeout does not apply; the watcher
            # bounds start-up by waiting for the admin socket.
            child = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=out_fd,
                stderr=out_fd,
                env=self._env(),
                cwd=str(self.home_dir),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ExecFailed(f"cannot start Caddy: {exc.strerror or exc}") from None
        finally:
            os.close(out_fd)
        _write_private(self.pid_file, f"{child.pid}\n")
        return child

    def watcher_argv(self) -> list[str]:
        """``python -I``: no PYTHON* variables, user site or working directory on the
        path of a root daemon. The ``--state=`` element identifies the watcher."""
        if not sys.executable:
            raise ExecFailed("cannot find the Python interpreter to run Caddy's watcher")
        return [sys.executable, "-I", "-m", WATCH_MODULE, f"--state={self.watch_state_file}"]

    def _spawn_watcher(self) -> int:
        log_fd = _open_private_file(self.watcher_log, truncate=False)
        try:
            child = subprocess.Popen(
                self.watcher_argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env={"PATH": _CLEAN_PATH, "LANG": "C.UTF-8"},
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ExecFailed(f"cannot start Caddy's watcher: {exc.strerror or exc}") from None
        finally:
            os.close(log_fd)
        _Process.children[child.pid] = child
        _write_private(self.watcher_pid_file, f"{child.pid}\n")
        return child.pid

    @staticmethod
    def _reap_exited_children() -> None:
        for pid, child in list(_Process.children.items()):
            if child.poll() is not None:
                del _Process.children[pid]

    def _wait_admin(self, pid: int | None, deadline: float) -> None:
        """Wait for the admin socket (systemd mode); ``pid`` must stay alive meanwhile."""
        admin = CaddyAdmin(self.admin_socket, timeout_s=2.0)
        last = ""
        while time.monotonic() < deadline:
            if pid is not None and not _pid_alive(pid):
                raise CaddyApiError(
                    f"Caddy exited during start-up: {self._output_tail()}",
                    hint=f"see {self.output_file}",
                )
            try:
                admin.ping()
                return
            except CaddyApiError as exc:
                last = exc.message
            time.sleep(0.05)
        raise CaddyApiError(
            f"Caddy's admin socket did not answer within {self.start_timeout_s:g}s: {last}",
            hint=f"see {self.output_file}",
        )

    def _wait_watched(self, watcher: int, deadline: float) -> None:
        """Wait until the watcher has a Caddy (its pid file names it) that answers. A
        Caddy seen alive that dies (the watcher would restart it after a backoff) is a
        start-up failure, reported with Caddy's own last error instead of a timeout."""
        admin = CaddyAdmin(self.admin_socket, timeout_s=2.0)
        seen: set[int] = set()
        last = ""
        while time.monotonic() < deadline:
            if watcher != os.getpid() and not self.is_our_watcher(watcher):
                raise CaddyApiError(
                    f"Caddy's watcher exited during start-up: {_last_line(self.watcher_log)}",
                    hint=f"see {self.watcher_log}",
                )
            current = self._read_pid()
            if any(p != current or not _pid_alive(p) for p in seen):
                raise CaddyApiError(
                    f"Caddy exited during start-up: {self._output_tail()}",
                    hint=f"see {self.output_file} and {self.watcher_log}",
                )
            if current is not None and self._is_our_caddy(current):
                seen.add(current)
                try:
                    admin.ping()
                    return
                except CaddyApiError as exc:
                    last = exc.message
            time.sleep(0.05)
        raise CaddyApiError(
            f"Caddy's admin socket did not answer within {self.start_timeout_s:g}s: {last}",
            hint=f"see {self.watcher_log}",
        )

    def _output_tail(self) -> str:
        try:
            lines = self.output_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no output)"
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") in {"error", "fatal"}:
                    return str(entry.get("msg", "")) + ": " + str(entry.get("error", ""))
        return lines[-1][:_LINE_MAX] if lines else "(no output)"

    def _ensure_watched(self) -> None:
        """Non-systemd: a live watcher with a Caddy that answers (under the lock)."""
        deadline = time.monotonic() + self.start_timeout_s
        self._reap_exited_children()
        if not self.in_watcher:
            self.write_watch_state()
        watcher = self.watcher_pid()
        if watcher is None and self.in_watcher:
            # Called from inside the watcher (route re-apply) whose pid file went
            # missing: the caller *is* the watcher, so never start another.
            watcher = os.getpid()
            _write_private(self.watcher_pid_file, f"{watcher}\n")
        if watcher is not None:
            if not self.admin().is_up():
                if not self.in_watcher:
                    # Skip the watcher's backoff: the caller wants Caddy now.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(watcher, signal.SIGUSR1)
                self._wait_watched(watcher, deadline)
            return
        # The new watcher rewrites Caddy's pid file once it has started or adopted (a
        # Caddy that outlived the last watcher) one: until then Caddy is not "watched".
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        watcher = self._spawn_watcher()
        try:
            self._wait_watched(watcher, deadline)
        except BaseException:
            # Undo: no half-started watcher crash-looping Caddy behind an error.
            stop_process(watcher, WATCHER_STOP_GRACE_S, self.is_our_watcher)
            orphan = self.find_caddy_pid()
            if orphan is not None:
                stop_process(orphan, CADDY_STOP_GRACE_S, self._is_our_caddy)
            for p in (self.watcher_pid_file, self.pid_file):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise

    # -- systemd mode ------------------------------------------------------------------

    def _ensure_unit(self) -> None:
        text = cc.systemd_unit(
            caddy_binary=self._binary(),
            config_file=self.config_file,
            user=self.account.pw_name if self.account else None,
            home_dir=self.home_dir,
        )
        try:
            current = self.unit_file.read_text()
        except FileNotFoundError:
            current = None
        if current != text:
            tmp = self.unit_file.with_name(f".{UNIT_NAME}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.unit_file)
            proc.run(["systemctl", "daemon-reload"], timeout=60)
        proc.run(["systemctl", "enable", "--now", UNIT_NAME], timeout=60)

    # -- public ------------------------------------------------------------------------

    def ensure_running(self) -> CaddyStatus:
        """Caddy up with the current base config; safe to call any time, any number of
        times. A running Caddy whose base config differs (domain, ports, TLS) gets the
        new one via ``/load``, with its tenant routes carried over.

        Without systemd: a live watcher whose Caddy answers is left alone; a dead one
        (stale pid file) is replaced, and the new watcher adopts a Caddy that outlived
        its predecessor instead of starting a second one."""
        self.prepare()
        with self._lock():
            if self.use_systemd:
                self._ensure_unit()
                self._wait_admin(None, time.monotonic() + self.start_timeout_s)
            else:
                self._ensure_watched()
            self._sync_base_config()
        return self.status()

    def _sync_base_config(self) -> None:
        admin = self.admin()
        base = self.base_config()
        running = admin.get_config()
        if not isinstance(running, dict):
            running = {}
        try:
            routes = running["apps"]["http"]["servers"][cc.SERVER]["routes"]
        except (KeyError, TypeError):
            routes = []
        tenant_routes = [
            r for r in routes if isinstance(r, dict) and cc.tenant_of_route(r) is not None
        ]
        wanted = json.loads(json.dumps(base))
        wanted["apps"]["http"]["servers"][cc.SERVER]["routes"] = [
            *tenant_routes,
            cc.fallback_route(),
        ]
        if running != wanted:
            admin.load(wanted)

    def stop(self) -> bool:
        """Stop Caddy (idempotent); True if one was running.

        Without systemd: the watcher first (it stops its Caddy), then any Caddy of ours
        that outlived a killed watcher; pid files and the socket go too. Nothing is
        signalled unless its command line shows it is ours."""
        if self.use_systemd:
            was = self.status().running
            proc.run(["systemctl", "stop", UNIT_NAME], timeout=60, check=False)
            return was
        if not self.run_dir.exists():
            return False
        with self._lock():
            was = False
            watcher = _read_pid_file(self.watcher_pid_file)
            if watcher is not None and watcher != os.getpid():
                was = stop_process(watcher, WATCHER_STOP_GRACE_S, self.is_our_watcher)
            caddy = self.find_caddy_pid()
            if caddy is not None:
                was = stop_process(caddy, CADDY_STOP_GRACE_S, self._is_our_caddy) or was
            for p in (self.watcher_pid_file, self.pid_file, self.admin_socket):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            if not self.in_watcher:
                with contextlib.suppress(FileNotFoundError):
                    self.watch_state_file.unlink()
            return was

    def status(self) -> CaddyStatus:
        admin_ok = self.admin_socket.exists() and self.admin().is_up()
        if self.use_systemd:
            res = proc.run(["systemctl", "is-active", UNIT_NAME], timeout=15, check=False)
            main_pid = proc.run(
                ["systemctl", "show", "-p", "MainPID", "--value", UNIT_NAME],
                timeout=15,
                check=False,
            ).stdout.strip()
            pid = int(main_pid) if main_pid.isdigit() and int(main_pid) > 0 else None
            return CaddyStatus(
                "systemd",
                res.stdout.strip() == "active",
                admin_ok,
                pid,
                self.config_file,
                self.admin_socket,
            )
        pid = self._read_pid()
        running = pid is not None and self._is_our_caddy(pid)
        return CaddyStatus(
            "process",
            running,
            admin_ok,
            pid if running else None,
            self.config_file,
            self.admin_socket,
            self.watcher_pid(),
        )
