"""Real Caddy, started by lobsterd's supervisor in a throw-away root, admin on a Unix socket.

Everything listens on loopback and high ports picked at run time; the edge uses Caddy's
internal CA (never ACME), so no packet leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lobsterd.adapters.caddy import CaddySupervisor
from lobsterd.adapters.caddy_admin import CaddyAdmin
from lobsterd.config import Config
from lobsterd.core import caddy_config as cc
from lobsterd.errors import CaddyApiError
from tests.helpers import make_config, need, need_binary, need_root

pytestmark = pytest.mark.integration

DOMAIN = "lobster.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def caddy_config(root: Path, **caddy: Any) -> Config:
    section: dict[str, object] = {
        "domain": DOMAIN,
        "http_port": free_port(),
        "https_port": free_port(),
    }
    section.update(caddy)
    return make_config(root, caddy=section)


@contextlib.contextmanager
def running_caddy(cfg: Config, user: str | None = None) -> Iterator[CaddySupervisor]:
    """Caddy up for the duration; stopped (and its process gone) afterwards, always."""
    need_root()
    need_binary("caddy")
    sup = CaddySupervisor(cfg, user=user, bind_host="127.0.0.1", use_systemd=False)
    try:
        sup.ensure_running()
        yield sup
    finally:
        pid = sup.status().pid
        sup.stop()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[CaddySupervisor]:
    with running_caddy(caddy_config(tmp_path)) as sup:
        yield sup


def routes_for(
    tenant: str, ip: str = "10.200.0.6", root: Path = Path("/nonexistent")
) -> list[dict[str, Any]]:
    # Transport files must exist for Caddy to provision the route.
    return cc.tenant_routes(
        tenant=tenant,
        domain=DOMAIN,
        guest_ip=ip,
        gateway_port=9000,
        ca_file=root / "ca.pem",
        client_cert=root / "client.pem",
        client_key=root / "client.key",
        server_name=f"{tenant}.guest.lobsterd.internal",
    )


@pytest.fixture
def pem_root(tmp_path: Path) -> Path:
    """A CA and client certificate on disk, as the tenant routes reference them."""
    from lobsterd.security.ca import HostCA

    ca = HostCA(tmp_path / "pki", caddy_group=None)
    cert, key = ca.client_cert()
    d = tmp_path / "routes-pki"
    d.mkdir()
    shutil.copy(ca.ca_file, d / "ca.pem")
    shutil.copy(cert, d / "client.pem")
    shutil.copy(key, d / "client.key")
    return d


def ids(routes: list[dict[str, Any]]) -> list[str]:
    return [str(r.get("@id")) for r in routes]


# -- the admin socket -------------------------------------------------------------------


def _listening_tcp_ports(pid: int | None = None) -> set[int]:
    """TCP ports in LISTEN state (of ``pid`` only, when given), from /proc/net/tcp{,6}."""
    inodes: set[str] | None = None
    if pid is not None:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            if inodes is not None and f[9] not in inodes:
                continue
            ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def test_base_config_is_loaded_and_admin_has_no_tcp_listener(caddy: CaddySupervisor) -> None:
    admin = caddy.admin()
    assert admin.get_routes() == [cc.fallback_route()]
    running = admin.get_config()
    assert running["admin"]["listen"] == f"unix/{caddy.admin_socket}"
    assert running == caddy.base_config()
    st = caddy.status()
    assert st.running and st.admin_ok and st.pid is not None
    c = caddy.cfg.caddy
    assert _listening_tcp_ports(st.pid) == {c.https_port, c.http_port}
    assert 2019 not in _listening_tcp_ports()
    # The on-disk config is exactly what Caddy runs (a restart recovers it).
    assert cc.render(running) == caddy.config_file.read_bytes()


def _connect_as_nobody(sock: Path) -> str:
    """Try to connect to ``sock`` as uid/gid 65534 (in a forked child); the outcome."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for good, try, report, exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(sock))
                out = "connected"
            except OSError as e:
                out = f"{type(e).__name__} {e.errno}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 256):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return data.decode()


def test_non_root_user_cannot_open_the_admin_socket(caddy: CaddySupervisor) -> None:
    assert _connect_as_nobody(caddy.admin_socket) == "PermissionError 13"  # EACCES
    assert stat.S_IMODE(caddy.run_dir.stat().st_mode) == 0o700
    caddy.admin().ping()  # root can


def test_caddy_as_caddy_user_keeps_the_socket_private() -> None:
    need_root()
    import pwd

    need(any(p.pw_name == "caddy" for p in pwd.getpwall()),
         "no caddy user on this host (the Debian caddy package creates it)")
    # pytest's own tmp dirs are 0700 root; Caddy's user must be able to traverse.
    root = Path(tempfile.mkdtemp(prefix="lobsterd-caddy-user-", dir="/tmp"))
    try:
        os.chmod(root, 0o711)
        cfg = caddy_config(root)
        with running_caddy(cfg, user="caddy") as sup:
            pid = sup.status().pid
            assert pid is not None
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(x for x in status.splitlines() if x.startswith("Uid:"))
            import pwd

            assert int(uid_line.split()[1]) == pwd.getpwnam("caddy").pw_uid
            cap_eff = next(x for x in status.splitlines() if x.startswith("CapEff:"))
            assert int(cap_eff.split()[1], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
            d = sup.run_dir.stat()
            assert stat.S_IMODE(d.st_mode) == 0o770 and d.st_uid == 0
            assert _connect_as_nobody(sup.admin_socket) == "PermissionError 13"
            assert sup.admin().get_routes() == [cc.fallback_route()]
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- routes -----------------------------------------------------------------------------


def test_put_twice_gives_no_duplicates(caddy: CaddySupervisor, pem_root: Path) -> None:
    admin = caddy.admin()
    assert admin.put_tenant_routes("demo", routes_for("demo", root=pem_root)) is True
    assert admin.put_tenant_routes("demo", routes_for("demo", root=pem_root)) is False
    assert admin.put_tenant_routes("demo", routes_for("demo", "10.200.0.10", pem_root)) is True
    routes = admin.get_routes()
    assert ids(routes) == ["lobster-demo.ws", "lobster-demo", cc.FALLBACK_ID]
    assert routes[1]["handle"][0]["upstreams"] == [{"dial": "10.200.0.10:9000"}]
    admin.put_tenant_routes("other", routes_for("other", "10.200.0.14", pem_root))
    assert ids(admin.get_routes()) == [
        "lobster-demo.ws",
        "lobster-demo",
        "lobster-other.ws",
        "lobster-other",
        cc.FALLBACK_ID,
    ]


def test_delete_is_idempotent(caddy: CaddySupervisor, pem_root: Path) -> None:
    admin = caddy.admin()
    admin.put_tenant_routes("demo", routes_for("demo", root=pem_root))
    admin.put_tenant_routes("keep", routes_for("keep", "10.200.0.10", pem_root))
    assert admin.delete_tenant_routes("demo") is True
    assert ids(admin.get_routes()) == ["lobster-keep.ws", "lobster-keep", cc.FALLBACK_ID]
    assert admin.delete_tenant_routes("demo") is False
    assert admin.delete_tenant_routes("never-existed") is False


def test_reconcile_adds_replaces_and_removes(caddy: CaddySupervisor, pem_root: Path) -> None:
    admin = caddy.admin()
    admin.put_tenant_routes("gone", routes_for("gone", "10.200.0.6", pem_root))
    admin.put_tenant_routes("changed", routes_for("changed", "10.200.0.10", pem_root))
    admin.put_tenant_routes("same", routes_for("same", "10.200.0.14", pem_root))
    # A route nobody asked for (hand-made through the API) is not lobsterd's to keep.
    admin._request(
        "PUT",
        cc.ROUTES_PATH + "/0",
        {"@id": "hand-made", "handle": [{"handler": "static_response", "status_code": 200}]},
    )
    desired = {
        "changed": routes_for("changed", "10.200.0.18", pem_root),
        "same": routes_for("same", "10.200.0.14", pem_root),
        "new": routes_for("new", "10.200.0.22", pem_root),
    }
    res = admin.reconcile_routes(desired)
    assert (res.added, res.replaced, res.removed, res.foreign_removed) == (
        ["new"],
        ["changed"],
        ["gone"],
        1,
    )
    routes = admin.get_routes()
    assert cc.routes_by_tenant(routes) == desired
    assert len(routes) == 7 and ids(routes)[-1] == cc.FALLBACK_ID
    again = admin.reconcile_routes(desired)
    assert not again.changed
    assert admin.get_routes() == routes


def test_restart_recovers_base_config_and_reconcile_restores_routes(
    caddy: CaddySupervisor, pem_root: Path
) -> None:
    admin = caddy.admin()
    admin.put_tenant_routes("demo", routes_for("demo", root=pem_root))
    status = caddy.status()
    pid = status.pid
    assert pid is not None
    # A host crash: the watcher dies too (else it restarts Caddy within 0.2 s).
    if status.watcher_pid is not None:
        os.kill(status.watcher_pid, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while caddy.status().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not caddy.status().running
    with pytest.raises(CaddyApiError):
        admin.get_routes()
    caddy.ensure_running()
    assert caddy.status().pid != pid
    assert admin.get_routes() == [cc.fallback_route()]  # base config from disk
    res = admin.reconcile_routes({"demo": routes_for("demo", root=pem_root)})
    assert res.added == ["demo"]
    assert ids(admin.get_routes()) == ["lobster-demo.ws", "lobster-demo", cc.FALLBACK_ID]


def test_ensure_running_is_idempotent_and_applies_a_new_base_config(
    caddy: CaddySupervisor, pem_root: Path
) -> None:
    pid = caddy.status().pid
    caddy.ensure_running()
    assert caddy.status().pid == pid
    caddy.admin().put_tenant_routes("demo", routes_for("demo", root=pem_root))
    new_port = free_port()
    changed_cfg = caddy.cfg.model_copy(
        update={"caddy": caddy.cfg.caddy.model_copy(update={"https_port": new_port})}
    )
    sup2 = CaddySupervisor(changed_cfg, user=None, bind_host="127.0.0.1", use_systemd=False)
    sup2.ensure_running()
    assert sup2.status().pid == pid  # same process, new config loaded live
    assert new_port in _listening_tcp_ports(pid)
    # Tenant routes survive a base-config change.
    assert ids(sup2.admin().get_routes()) == ["lobster-demo.ws", "lobster-demo", cc.FALLBACK_ID]
    assert b'"https_port": %d' % new_port in sup2.config_file.read_bytes()


def test_a_route_caddy_cannot_provision_is_refused_and_nothing_changes(
    caddy: CaddySupervisor, pem_root: Path
) -> None:
    admin = caddy.admin()
    admin.put_tenant_routes("demo", routes_for("demo", root=pem_root))
    before = admin.get_routes()
    with pytest.raises(CaddyApiError) as err:
        admin.put_tenant_routes("broken", routes_for("broken", root=Path("/nonexistent")))
    msg = str(err.value)
    assert msg.startswith(f"Caddy API PATCH {cc.ROUTES_PATH} failed (500): loading new config")
    assert "/nonexistent/client.pem: no such file or directory" in msg
    assert admin.get_routes() == before


def test_caddy_down_gives_a_clear_error(tmp_path: Path) -> None:
    admin = CaddyAdmin(tmp_path / "no-such" / "admin.sock")
    with pytest.raises(CaddyApiError) as err:
        admin.get_routes()
    e = err.value
    assert e.code == "CADDY_API_ERROR"
    assert e.message.startswith(f"Caddy API GET {cc.ROUTES_PATH} failed (no connection): ")
    assert str(tmp_path / "no-such" / "admin.sock") in e.message
    assert e.hint is not None and "lobsterd init" in e.hint
    with pytest.raises(CaddyApiError):
        admin.put_tenant_routes("demo", routes_for("demo"))
    assert admin.is_up() is False


def test_caddy_http_errors_carry_status_and_caddy_message(caddy: CaddySupervisor) -> None:
    admin = caddy.admin()
    bad = caddy.base_config()
    bad["apps"]["http"]["servers"]["lobster"]["listen"] = ["127.0.0.1:notaport"]
    with pytest.raises(CaddyApiError) as err:
        admin.load(bad)
    msg = err.value.message
    assert msg.startswith("Caddy API POST /load failed (400): ")
    assert "notaport" in msg
    # A refused load leaves the running config as it was.
    assert admin.get_config() == caddy.base_config()
    assert admin.get_route(cc.FALLBACK_ID) == cc.fallback_route()
    assert admin.get_route("lobster-nobody") is None


def test_stop_is_idempotent(tmp_path: Path) -> None:
    cfg = caddy_config(tmp_path)
    with running_caddy(cfg) as sup:
        pid = sup.status().pid
        assert sup.stop() is True
        assert sup.stop() is False
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
        assert not sup.admin_socket.exists() and not sup.pid_file.exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_systemd_mode_installs_and_enables_the_unit_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No systemd on the test machines: the unit file and the systemctl calls are checked
    against a recording stand-in for proc.run."""
    import lobsterd.adapters.caddy as caddy_mod
    from lobsterd.adapters import proc
    from lobsterd.adapters.proc import Result

    calls: list[tuple[str, ...]] = []

    def fake_run(argv: list[str], **_: Any) -> Result:
        calls.append(tuple(argv))
        return Result(tuple(argv), 0, "", "")

    unit_dir = tmp_path / "systemd"
    unit_dir.mkdir()
    monkeypatch.setattr(caddy_mod, "UNIT_DIR", unit_dir)
    monkeypatch.setattr(proc, "run", fake_run)
    cfg = caddy_config(tmp_path, binary="/bin/true")
    sup = CaddySupervisor(cfg, user=None, use_systemd=True)
    sup._ensure_unit()
    unit = (unit_dir / "lobsterd-caddy.service").read_text()
    assert f"ExecStart=/bin/true run --config {sup.config_file}" in unit.splitlines()
    assert calls == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "--now", "lobsterd-caddy.service"),
    ]
    calls.clear()
    sup._ensure_unit()  # unchanged unit: no daemon-reload, enable is idempotent
    assert calls == [("systemctl", "enable", "--now", "lobsterd-caddy.service")]
