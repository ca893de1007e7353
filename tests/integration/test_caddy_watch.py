"""Caddy's watcher (hosts without systemd): real Caddy, real crashes, real routes.

Each test gets a throw-away lobsterd root under /var/tmp (0711, so Caddy's own user can
traverse it), Caddy on loopback and high ports picked at run time, and a registry and a
host CA of its own; no VM is needed to render tenant routes. Every process a test starts
is found by its root path in /proc and killed at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lobsterd.adapters.caddy import CaddySupervisor
from lobsterd.adapters.caddy_watch import Backoff
from lobsterd.config import Config
from lobsterd.core import caddy_config as cc
from lobsterd.core.lifecycle import Status
from lobsterd.errors import CaddyApiError
from lobsterd.ops.host import Host
from lobsterd.registry import open_registry
from lobsterd.security.ca import guest_server_name
from tests.helpers import make_config, need_binary, need_root

pytestmark = pytest.mark.integration

DOMAIN = "lobster.test"


# -- helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def caddy_user() -> str | None:
    try:
        pwd.getpwnam("caddy")
    except KeyError:
        return None
    return "caddy"


def processes_under(root: Path) -> dict[int, list[str]]:
    """Live (not zombie) processes whose command line names a path under ``root``."""
    found: dict[int, list[str]] = {}
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in raw and state != "Z":
            found[int(entry.name)] = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` every 10 ms; the time it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def watcher_log(sup: CaddySupervisor) -> str:
    try:
        return sup.watcher_log.read_text()
    except FileNotFoundError:
        return ""


def log_has(sup: CaddySupervisor, text: str) -> Callable[[], bool]:
    return lambda: text in watcher_log(sup)


def caddy_replaced(sup: CaddySupervisor, old: int) -> Callable[[], bool]:
    """A Caddy other than ``old`` runs and answers."""

    def check() -> bool:
        pid = sup.status().pid
        return pid is not None and pid != old and sup.admin().is_up()

    return check


@pytest.fixture
def root() -> Iterator[Path]:
    need_root()
    need_binary("caddy", "setpriv")
    path = Path(tempfile.mkdtemp(prefix="lobsterd-caddy-watch-", dir="/var/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        for pid in processes_under(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not processes_under(path), 5, "test processes gone")
        shutil.rmtree(path, ignore_errors=True)


def make_cfg(root: Path) -> Config:
    return make_config(
        root,
        caddy={"domain": DOMAIN, "http_port": free_port(), "https_port": free_port()},
        network={"pool": "10.231.8.0/24", "max_tenants": 8},
    )


@pytest.fixture
def sup(root: Path) -> Iterator[CaddySupervisor]:
    s = CaddySupervisor(make_cfg(root), user=caddy_user(), bind_host="127.0.0.1",
                        use_systemd=False)
    try:
        yield s
    finally:
        s.stop()


def add_tenant(cfg: Config, name: str, status: Status) -> str:
    """A registry row as spawn leaves it (no VM: routes only need the row); its guest IP."""
    reg = open_registry(cfg)
    try:
        reg.reserve(name, "qemu", {})
        if status is not Status.CREATING:
            reg.transition(name, status)
        return reg.get(name).guest_ip
    finally:
        reg.close()


def routes_of(host: Host, name: str, guest_ip: str) -> list[dict[str, Any]]:
    """The routes reconcile renders for ``name`` (same inputs as ops.reconcile)."""
    cert, key = host.ca.client_cert()
    return cc.tenant_routes(
        tenant=name, domain=host.cfg.caddy.domain, guest_ip=guest_ip,
        gateway_port=host.cfg.network.gateway_port, ca_file=host.ca.ca_file,
        client_cert=cert, client_key=key, server_name=guest_server_name(name))


# -- backoff (pure) ---------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    b = Backoff(first_s=0.2, cap_s=10.0, reset_after_s=60.0)
    delays = [b.next_delay(1.0) for _ in range(9)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert b.next_delay(59.9) == 10.0  # not long enough to count as healthy
    assert b.next_delay(60.0) == pytest.approx(0.2)
    assert b.next_delay(0.0) == pytest.approx(0.4)


# -- crash recovery ---------------------------------------------------------------------


def test_killed_caddy_comes_back_with_base_config_and_tenant_routes(
    sup: CaddySupervisor,
) -> None:
    cfg = sup.cfg
    host = Host(cfg)
    host.ca.ensure()
    alpha_ip = add_tenant(cfg, "alpha", Status.ACTIVE)
    add_tenant(cfg, "beta", Status.CREATING)  # interrupted spawn: not routed
    want = {"alpha": routes_of(host, "alpha", alpha_ip)}

    st = sup.ensure_running()
    assert st.running and st.admin_ok and st.pid is not None and st.watcher_pid is not None
    admin = sup.admin()
    admin.reconcile_routes(want)  # what spawn/init leave in Caddy
    assert cc.routes_by_tenant(admin.get_routes()) == want

    old = st.pid
    os.kill(old, signal.SIGKILL)  # a crash: no clean shutdown
    t0 = time.monotonic()

    def new_caddy_answers() -> bool:
        pid = sup.status().pid
        return pid is not None and pid != old and admin.is_up()

    wait_for(new_caddy_answers, 10, "a new Caddy answering on the admin socket")
    t_admin = time.monotonic() - t0
    running = admin.get_config()
    base = sup.base_config()
    assert running["admin"] == base["admin"]
    assert running["apps"]["tls"] == base["apps"]["tls"]
    wait_for(lambda: cc.routes_by_tenant(admin.get_routes()) == want, 15,
             "tenant routes re-applied")
    t_routes = time.monotonic() - t0
    expected = sup.base_config()
    expected["apps"]["http"]["servers"][cc.SERVER]["routes"] = [*want["alpha"],
                                                                cc.fallback_route()]
    assert admin.get_config() == expected  # base config from disk + exactly the live tenant
    after = sup.status()
    assert after.watcher_pid == st.watcher_pid and after.running
    print(f"\nSIGKILL -> admin answering: {t_admin * 1000:.0f} ms; "
          f"-> routes re-applied: {t_routes * 1000:.0f} ms")
    assert t_admin < 5

    log = watcher_log(sup)
    assert f"Caddy pid {old} was killed by SIGKILL" in log
    wait_for(lambda: "tenant routes re-applied (1 tenant(s))" in watcher_log(sup), 5,
             "re-apply logged")

    # Idle again: the watcher holds neither the registry nor any lock file open.
    def holds_nothing() -> bool:
        targets = []
        for fd in Path(f"/proc/{st.watcher_pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
        return not [t for t in targets if t.endswith((".db", ".db-wal", ".lock"))]

    wait_for(holds_nothing, 5, "watcher idle without registry or locks")

    # A second crash soon after: the next delay has doubled, and routes come back again.
    second = sup.status().pid
    assert second is not None
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: sup.status().pid not in (None, second) and admin.is_up(), 10,
             "second restart")
    wait_for(lambda: cc.routes_by_tenant(admin.get_routes()) == want, 15,
             "routes after the second restart")
    assert "restarting Caddy in 0.4s" in watcher_log(sup)


def test_route_reapply_failure_is_logged_and_caddy_keeps_running(
    sup: CaddySupervisor,
) -> None:
    cfg = sup.cfg
    # A registry that cannot be read: re-applying routes fails, the watcher carries on.
    cfg.paths.registry.parent.mkdir(parents=True, exist_ok=True)
    cfg.paths.registry.write_bytes(b"this is not a database" * 100)
    st = sup.ensure_running()
    assert st.pid is not None
    os.kill(st.pid, signal.SIGKILL)
    wait_for(lambda: "re-applying tenant routes failed" in watcher_log(sup), 15,
             "failure logged")
    after = sup.status()
    assert after.running and after.admin_ok and after.watcher_pid == st.watcher_pid
    assert sup.admin().get_routes() == [cc.fallback_route()]


def test_ensure_running_cuts_a_long_backoff_short(sup: CaddySupervisor) -> None:
    sup.ensure_running()
    for delay in ("0.2", "0.4", "0.8", "1.6", "3.2"):  # a crash loop builds up the backoff
        pid = sup.status().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        line = f"restarting Caddy in {delay}s"
        wait_for(log_has(sup, line), 5, line)
        if delay != "3.2":
            wait_for(caddy_replaced(sup, pid), 10, "restarted")
    t0 = time.monotonic()
    st = sup.ensure_running()  # wakes the watcher (SIGUSR1) instead of waiting 3.2 s
    assert time.monotonic() - t0 < 2.5
    assert st.running and st.admin_ok


def test_the_last_ensure_running_settings_survive_a_restart(sup: CaddySupervisor) -> None:
    st = sup.ensure_running()
    assert st.pid is not None
    new_port = free_port()
    changed = sup.cfg.model_copy(
        update={"caddy": sup.cfg.caddy.model_copy(update={"https_port": new_port})})
    sup2 = CaddySupervisor(changed, user=caddy_user(), bind_host="127.0.0.1",
                           use_systemd=False)
    assert sup2.ensure_running().watcher_pid == st.watcher_pid  # same watcher, live /load
    os.kill(st.pid, signal.SIGKILL)
    wait_for(lambda: sup2.status().pid not in (None, st.pid) and sup2.admin().is_up(), 10,
             "restart")
    server = sup2.admin().get_config()["apps"]["http"]["servers"][cc.SERVER]
    assert server["listen"] == [f"127.0.0.1:{new_port}"]
    assert f'"https_port": {new_port}'.encode() in sup2.config_file.read_bytes()


# -- start, stop, identity ---------------------------------------------------------------


def test_stop_leaves_no_process_pid_file_or_socket(root: Path, sup: CaddySupervisor) -> None:
    st = sup.ensure_running()
    assert st.pid is not None and st.watcher_pid is not None
    assert set(processes_under(root)) == {st.pid, st.watcher_pid}
    assert sup.stop() is True
    assert not alive(st.pid) and not alive(st.watcher_pid)
    assert processes_under(root) == {}
    for p in (sup.admin_socket, sup.pid_file, sup.watcher_pid_file, sup.watch_state_file):
        assert not p.exists(), p
    assert sup.stop() is False  # idempotent
    assert "stopped" in watcher_log(sup).splitlines()[-1]


def test_ensure_running_twice_starts_one_watcher(root: Path, sup: CaddySupervisor) -> None:
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(sup.ensure_running())
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({(r.pid, r.watcher_pid) for r in results}) == 1
    again = sup.ensure_running()
    assert (again.pid, again.watcher_pid) == (results[0].pid, results[0].watcher_pid)
    procs = processes_under(root)
    watchers = [p for p, argv in procs.items() if "lobsterd.adapters.caddy_watch" in argv]
    assert watchers == [again.watcher_pid]
    assert set(procs) == {again.pid, again.watcher_pid}


def test_stale_pid_files_naming_an_unrelated_process_are_replaced_not_killed(
    sup: CaddySupervisor,
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        sup.prepare()
        for p in (sup.watcher_pid_file, sup.pid_file):
            p.write_text(f"{sleeper.pid}\n")
        st = sup.ensure_running()
        assert st.watcher_pid not in (None, sleeper.pid)
        assert st.pid not in (None, sleeper.pid)
        assert sup.watcher_pid_file.read_text().strip() == str(st.watcher_pid)
        assert sup.pid_file.read_text().strip() == str(st.pid)
        assert sleeper.poll() is None
        # Stale again (as after a crash of both) and stop(): still not signalled.
        sup.stop()
        for p in (sup.watcher_pid_file, sup.pid_file):
            p.write_text(f"{sleeper.pid}\n")
        assert sup.stop() is False
        assert sleeper.poll() is None and alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait(5)


def test_a_killed_watcher_is_replaced_and_its_caddy_adopted(
    root: Path, sup: CaddySupervisor
) -> None:
    st = sup.ensure_running()
    assert st.pid is not None and st.watcher_pid is not None
    os.kill(st.watcher_pid, signal.SIGKILL)
    wait_for(lambda: not alive(st.watcher_pid or 0), 5, "watcher gone")
    assert sup.admin().is_up() and sup.status().pid == st.pid  # Caddy keeps serving
    again = sup.ensure_running()
    assert again.pid == st.pid  # adopted, not restarted
    assert again.watcher_pid not in (None, st.watcher_pid)
    assert f"adopted running Caddy pid {st.pid}" in watcher_log(sup)
    # The adopted Caddy is really watched: its crash is followed by a restart.
    os.kill(st.pid, signal.SIGKILL)
    wait_for(lambda: sup.status().pid not in (None, st.pid) and sup.admin().is_up(), 10,
             "adopted Caddy restarted")
    assert set(processes_under(root)) == {sup.status().pid, again.watcher_pid}


def test_sigterm_to_the_watcher_stops_caddy(root: Path, sup: CaddySupervisor) -> None:
    st = sup.ensure_running()
    assert st.pid is not None and st.watcher_pid is not None
    os.kill(st.watcher_pid, signal.SIGTERM)
    wait_for(lambda: not processes_under(root), 10, "watcher and Caddy gone")
    assert not sup.pid_file.exists() and not sup.watcher_pid_file.exists()
    assert f"stopping Caddy pid {st.pid}" in watcher_log(sup)


def test_a_caddy_that_cannot_start_is_reported_and_nothing_is_left(
    root: Path, sup: CaddySupervisor
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", sup.cfg.caddy.https_port))
        squatter.listen()
        with pytest.raises(CaddyApiError) as err:
            sup.ensure_running()
    msg = err.value.message
    assert msg.startswith("Caddy exited during start-up: "), msg
    assert "address already in use" in msg
    wait_for(lambda: not processes_under(root), 5, "no watcher or Caddy left behind")
    assert not sup.watcher_pid_file.exists() and not sup.pid_file.exists()
    # Once the port is free, the next call works.
    st = sup.ensure_running()
    assert st.running and st.admin_ok


def test_missing_caddy_binary_fails_fast_with_the_watchers_reason(root: Path) -> None:
    need_root()
    cfg = make_config(root, caddy={"domain": DOMAIN, "http_port": free_port(),
                                   "https_port": free_port(),
                                   "binary": "/nonexistent/caddy"})
    s = CaddySupervisor(cfg, user=None, bind_host="127.0.0.1", use_systemd=False)
    t0 = time.monotonic()
    with pytest.raises(CaddyApiError) as err:
        s.ensure_running()
    assert time.monotonic() - t0 < 10
    assert "Caddy's watcher exited during start-up: cannot start Caddy: " in err.value.message
    assert "/nonexistent/caddy" in err.value.message
    assert processes_under(root) == {}


# -- the hidden foreground command --------------------------------------------------------


def _toml(cfg: Config) -> str:
    p, c = cfg.paths, cfg.caddy
    return "\n".join([
        "[paths]",
        f'config_dir = "{p.config_dir}"',
        f'state_dir = "{p.state_dir}"',
        f'run_dir = "{p.run_dir}"',
        f'cache_dir = "{p.cache_dir}"',
        "[caddy]",
        f'domain = "{c.domain}"',
        f"http_port = {c.http_port}",
        f"https_port = {c.https_port}",
        "[network]",
        f'pool = "{cfg.network.pool}"',
        f"max_tenants = {cfg.network.max_tenants}",
        "",
    ])


def test_caddy_supervise_runs_the_watcher_in_the_foreground(
    root: Path, sup: CaddySupervisor
) -> None:
    cfg_file = root / "lobsterd.toml"
    cfg_file.write_text(_toml(sup.cfg))
    help_text = subprocess.run([sys.executable, "-m", "lobsterd", "--help"], check=True,
                               capture_output=True, text=True, timeout=60).stdout
    commands = [line.split()[0] for line in help_text.splitlines() if line.startswith("  ")]
    assert "certs" in commands and "caddy" not in commands  # hidden
    fg = subprocess.Popen(
        [sys.executable, "-m", "lobsterd", "--config", str(cfg_file), "caddy", "supervise",
         f"--user={caddy_user() or ''}", "--bind-host=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sup.status().admin_ok, 20, "foreground watcher's Caddy")
        st = sup.status()
        assert st.watcher_pid == fg.pid  # exec'd: the service manager's pid is the watcher
        # ensure_running recognises it and starts nothing else.
        again = sup.ensure_running()
        assert (again.pid, again.watcher_pid) == (st.pid, fg.pid)
        assert set(processes_under(root)) == {st.pid, fg.pid}
        fg.send_signal(signal.SIGTERM)
        assert fg.wait(15) == 0
        out = fg.stdout.read().decode() if fg.stdout else ""
        assert "stopping Caddy" in out and "stopped" in out
        assert st.pid is not None and not alive(st.pid)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait(5)
