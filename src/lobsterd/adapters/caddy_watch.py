"""Caddy's watcher: keeps lobsterd's Caddy alive on hosts without systemd.

``CaddySupervisor.ensure_running`` starts it detached (own session, stdio to
``<state>/caddy/watcher.log``, pid in ``<run>/caddy/watcher.pid``); the hidden
``lobsterd caddy supervise`` runs it in the foreground for another service manager.

It runs Caddy as its child exactly as the supervisor describes it (same user drop, same
config file), and when Caddy exits without being asked to, starts it again after a
capped exponential backoff. Tenant routes live only in Caddy's memory (the registry is
their source of truth), so once a restarted Caddy answers, the watcher re-applies them
with ``reconcile_caddy``; a failure there is logged and retried at the next restart,
never fatal. Idle, it holds nothing of lobsterd's open: no registry, no lock.

Signals: TERM, INT, HUP stop Caddy (TERM, then KILL after a few seconds) and exit;
USR1 cuts a pending backoff short (``ensure_running`` sends it when it wants Caddy now).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from lobsterd.adapters import caddy as caddy_mod
from lobsterd.adapters.caddy import CaddySupervisor
from lobsterd.adapters.caddy_admin import CaddyAdmin
from lobsterd.config import Config
from lobsterd.errors import ConfigInvalid, LobsterError

LOG_MAX_BYTES = 1 << 20
ADMIN_WAIT_S = 30.0  # how long a restarted Caddy gets to answer before routes are given up


class Backoff:
    """Delay before each restart: ``first`` doubling up to ``cap``; a Caddy that ran for
    ``reset_after_s`` earns the short delay again (a crash loop must not spin, a crash
    after days of service must not wait)."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 10.0, reset_after_s: float = 60.0):
        self.first_s = first_s
        self.cap_s = cap_s
        self.reset_after_s = reset_after_s
        self._next = first_s

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.reset_after_s:
            self._next = self.first_s
        delay = self._next
        self._next = min(self._next * 2, self.cap_s)
        return delay


class _Log:
    """Timestamped lines on stderr; rotated at 1 MiB (one old file) when stderr is the
    watcher's own log file, left alone when it is a terminal or a service manager's pipe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _rotate_if_big(self) -> None:
        try:
            st = os.fstat(2)
            on_disk = self.path.stat()
        except OSError:
            return
        if (st.st_dev, st.st_ino) != (on_disk.st_dev, on_disk.st_ino):
            return
        if st.st_size < LOG_MAX_BYTES:
            return
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fd = caddy_mod._open_private_file(self.path, truncate=False)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def __call__(self, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        line = f"{now} caddy-watch[{os.getpid()}]: {message}\n"
        with self._lock:
            with contextlib.suppress(OSError, LobsterError):  # keep the current file
                self._rotate_if_big()
            with contextlib.suppress(OSError):  # nowhere to log to: keep watching
                os.write(2, line.encode(errors="replace"))


def load_supervisor(state_file: Path) -> CaddySupervisor:
    """The supervisor described by ``state_file`` (written by ``ensure_running``).

    The file steers a root process, so it must be root's and not writable by others.
    """
    try:
        st = state_file.stat()
        data = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigInvalid(
            f"cannot read Caddy's watch state {state_file}: {exc}", hint="run lobsterd init"
        ) from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigInvalid(
            f"{state_file} must belong to uid {os.geteuid()} and be writable by it alone",
            hint="remove it and run lobsterd init",
        )
    try:
        cfg = Config.model_validate(data["config"])
        user = data.get("user")
        bind_host = data.get("bind_host", "")
        if not (user is None or isinstance(user, str)) or not isinstance(bind_host, str):
            raise ValueError("user and bind_host must be strings")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigInvalid(f"Caddy's watch state {state_file} is invalid: {exc}") from None
    caddy_mod.enter_watcher_context(cfg.paths.run_dir / "caddy", user, bind_host)
    sup = CaddySupervisor(cfg)
    if sup.watch_state_file != state_file:
        raise ConfigInvalid(
            f"Caddy's watch state {state_file} describes another lobsterd root "
            f"({sup.watch_state_file})",
            hint="remove it and run lobsterd init",
        )
    return sup


class _Caddy:
    """The Caddy being watched: our child, or one adopted from a watcher that died."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.child = child
        self.started = time.monotonic()
        self.pidfd: int | None
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (its exit is seen at once) or kernel < 5.3
            self.pidfd = None

    def exited(self) -> bool:
        if self.child is not None:
            return self.child.poll() is not None
        return not caddy_mod._pid_alive(self.pid)

    def how(self) -> str:
        rc = None if self.child is None else self.child.returncode
        if rc is None:
            return "exited"
        if rc < 0:
            try:
                return f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"was killed by signal {-rc}"
        return f"exited with status {rc}"

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        caddy_mod._Process.children.pop(self.pid, None)


ROTATE_EVERY_S = 6 * 3600.0
"""How often the watcher looks for TLS certificates due for rotation (guest server
certificates live 30 days and are replaced 7 days before expiry)."""


def periodic(
    stop: threading.Event, every_s: float, job: Callable[[], None], log: Callable[[str], None]
) -> None:
    """Run ``job`` every ``every_s`` seconds until ``stop`` is set; a failing job is
    logged and tried again at the next period."""
    while not stop.wait(every_s):
        try:
            job()
        except Exception as exc:
            log(f"periodic job failed: {type(exc).__name__}: {exc}")


class Watcher:
    def __init__(self, state_file: Path, rotate_every_s: float = ROTATE_EVERY_S) -> None:
        self.state_file = state_file
        self.sup = load_supervisor(state_file)
        self.log = _Log(self.sup.watcher_log)
        self.backoff = Backoff()
        self.caddy: _Caddy | None = None
        self.stopping = False
        self._hurry = False
        self._reapply = threading.Event()
        self._stopped = threading.Event()
        self.rotate_every_s = rotate_every_s
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals -----------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hurry(self, signum: int, frame: FrameType | None) -> None:
        self._hurry = True

    def _install_signals(self) -> None:
        # Handlers only set flags; the wake-up pipe makes the poll in the loop return.
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_hurry)

    def _drain(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _poll(self, fds: list[int], timeout_s: float | None) -> None:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000)))
        self._drain()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        other = caddy_mod._read_pid_file(self.sup.watcher_pid_file)
        if other is not None and other != os.getpid() and self.sup.is_our_watcher(other):
            self.log(f"another watcher (pid {other}) already runs this Caddy; exiting")
            return 1
        caddy_mod._write_private(self.sup.watcher_pid_file, f"{os.getpid()}\n")
        self.log(f"watching Caddy (config {self.sup.config_file})")
        threading.Thread(target=self._reapply_worker, name="routes", daemon=True).start()
        threading.Thread(
            target=periodic,
            args=(self._stopped, self.rotate_every_s, self._rotate_certs, self.log),
            name="certs",
            daemon=True,
        ).start()
        try:
            code = self._loop()
        except Exception:
            # A bug here must not take the edge down: Caddy keeps serving, and the next
            # ensure_running starts a watcher that adopts it.
            self.log("watcher failed:\n" + traceback.format_exc().rstrip())
            self._forget_pid_file(self.sup.watcher_pid_file, os.getpid())
            return 3
        self._shutdown()
        if code == 0:
            self.log("stopped")
        return code

    def _loop(self) -> int:
        first = True
        adopted = self.sup.find_caddy_pid()
        if adopted is not None:
            self.caddy = _Caddy(adopted, None)
            self.log(f"adopted running Caddy pid {adopted}")
            caddy_mod._write_private(self.sup.pid_file, f"{adopted}\n")
            first = False
        delay = 0.0
        while not self.stopping:
            if self.caddy is None:
                if not first:
                    self._sleep(delay)
                    if self.stopping:
                        break
                    self._reload()
                try:
                    self.sup.prepare()
                    child = self.sup.spawn_caddy()
                except (LobsterError, OSError) as exc:
                    self.log(f"cannot start Caddy: {exc}")
                    if first:
                        return 2  # ensure_running reports that line and cleans up
                    delay = self.backoff.next_delay(0.0)
                    self.log(f"next attempt in {delay:g}s")
                    continue
                caddy_mod._Process.children[child.pid] = child
                self.caddy = _Caddy(child.pid, child)
                self.log(f"started Caddy pid {child.pid}")
                if not first:
                    self._reapply.set()
                first = False
            caddy = self.caddy
            if self._wait_exit(caddy):
                uptime = time.monotonic() - caddy.started
                self.log(
                    f"Caddy pid {caddy.pid} {caddy.how()} after {uptime:.1f}s "
                    f"(last output: {self.sup._output_tail()})"
                )
                self._forget_pid_file(self.sup.pid_file, caddy.pid)
                caddy.close()
                self.caddy = None
                delay = self.backoff.next_delay(uptime)
                self.log(f"restarting Caddy in {delay:g}s")
        return 0

    def _sleep(self, delay_s: float) -> None:
        """The backoff; SIGUSR1 (also one that came just before) or a stop ends it."""
        deadline = time.monotonic() + delay_s
        while not self.stopping and not self._hurry:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._poll([self._wake_r], left)
        self._hurry = False

    def _wait_exit(self, caddy: _Caddy) -> bool:
        """Block until Caddy exits (True) or a stop is requested (False)."""
        fds = [self._wake_r] if caddy.pidfd is None else [self._wake_r, caddy.pidfd]
        while not self.stopping:
            if caddy.exited():
                return True
            self._poll(fds, 0.5 if caddy.pidfd is None else None)
        return False

    def _reload(self) -> None:
        """Pick up what the last ``ensure_running`` asked for (user, ports, domain)."""
        try:
            self.sup = load_supervisor(self.state_file)
        except LobsterError as exc:
            self.log(f"keeping the previous settings: {exc}")

    def _forget_pid_file(self, path: Path, pid: int) -> None:
        if caddy_mod._read_pid_file(path) == pid:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _shutdown(self) -> None:
        """Asked to stop (or the first start failed): Caddy goes with us."""
        self.stopping = True
        self._stopped.set()
        self._reapply.set()  # lets the worker see the stop
        caddy = self.caddy
        if caddy is not None:
            if not caddy.exited():
                self.log(f"stopping Caddy pid {caddy.pid}")
                caddy_mod.stop_process(
                    caddy.pid, caddy_mod.CADDY_STOP_GRACE_S, self.sup._is_our_caddy
                )
            self._forget_pid_file(self.sup.pid_file, caddy.pid)
            caddy.close()
            self.caddy = None
        self._forget_pid_file(self.sup.watcher_pid_file, os.getpid())

    # -- tenant routes -----------------------------------------------------------------

    def _reapply_worker(self) -> None:
        """Re-applies routes off the main thread, so a slow registry or a held route lock
        never delays noticing that Caddy died again, or a stop."""
        try:
            import lobsterd.ops.reconcile  # noqa: F401 - imported now, not on the first restart
        except Exception as exc:  # pragma: no cover - broken installation
            self.log(f"cannot load the route reconcile: {exc}")
        while True:
            self._reapply.wait()
            if self.stopping:
                return
            self._reapply.clear()
            try:
                self._reapply_routes()
            except Exception as exc:  # never fatal: the next restart tries again
                self.log(f"re-applying tenant routes failed: {type(exc).__name__}: {exc}")

    def _reapply_routes(self) -> None:
        from lobsterd.core.caddy_config import tenant_of_route
        from lobsterd.ops.host import Host
        from lobsterd.ops.reconcile import reconcile_caddy
        from lobsterd.registry import Registry

        t0 = time.monotonic()
        sup = self.sup
        admin = CaddyAdmin(sup.admin_socket, timeout_s=5.0)
        while not admin.is_up():
            if self.stopping:
                return
            if time.monotonic() - t0 > ADMIN_WAIT_S:
                self.log("Caddy's admin socket did not answer: tenant routes not re-applied")
                return
            time.sleep(0.05)
        if not sup.cfg.paths.registry.exists():
            self.log("no registry yet: no tenant routes to re-apply")
            return
        host = Host(sup.cfg)
        try:
            reconcile_caddy(host)
            tenants = {tenant_of_route(r) for r in admin.get_routes()} - {None}
            ms = (time.monotonic() - t0) * 1000
            self.log(f"tenant routes re-applied ({len(tenants)} tenant(s)) in {ms:.0f} ms")
        except LobsterError as exc:
            self.log(f"re-applying tenant routes failed: {exc}")
        finally:
            registry = host.__dict__.get("registry")
            if isinstance(registry, Registry):
                registry.close()


    def _rotate_certs(self) -> None:
        """Rotate guest certificates that are due and refresh Caddy's client certificate
        and routes: the watcher is lobsterd's one long-running process on hosts without
        systemd, so expiry never depends on someone re-running ``init``."""
        from lobsterd.ops.certs import rotate_guest_certs
        from lobsterd.ops.host import Host
        from lobsterd.ops.reconcile import reconcile_caddy
        from lobsterd.registry import Registry

        if not self.sup.cfg.paths.registry.exists():
            return
        host = Host(self.sup.cfg)
        try:
            report = rotate_guest_certs(host)
            reconcile_caddy(host)
            if report.rotated or report.failed:
                self.log(f"certificates rotated: {report.rotated or '-'}; "
                         f"failed: {sorted(report.failed) or '-'}")
        finally:
            registry = host.__dict__.get("registry")
            if isinstance(registry, Registry):
                registry.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lobsterd.adapters.caddy_watch",
        description="Keep lobsterd's Caddy running and its tenant routes applied.",
    )
    parser.add_argument(
        "--state", required=True, type=Path, help="watch state written by ensure_running"
    )
    args = parser.parse_args(argv)
    try:
        watcher = Watcher(Path(args.state))
    except LobsterError as exc:
        sys.stderr.write(f"caddy-watch: {exc}\n")
        return 2
    return watcher.run()


if __name__ == "__main__":
    sys.exit(main())
