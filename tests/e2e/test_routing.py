"""Real VMs behind lobsterd's Caddy: routing, mutual TLS, firewall, reconcile, secrecy."""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from lobsterd.adapters import net
from lobsterd.adapters.caddy import CaddySupervisor
from lobsterd.adapters.storage import TenantVolume
from lobsterd.adapters.vmm.base import VmHandle
from lobsterd.core.caddy_config import tenant_of_route
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.certs import rotate_guest_certs
from lobsterd.ops.evict import evict
from lobsterd.ops.host import Host
from lobsterd.ops.init import init_host
from lobsterd.ops.query import tank
from lobsterd.ops.spawn import spawn
from tests.e2e.traces import traces
from tests.helpers import need_binary

pytestmark = pytest.mark.e2e


def https_get(host: Host, name: str, path: str = "/") -> tuple[int, str]:
    """GET https://<name>.<domain><path> through lobsterd's Caddy on this machine."""
    port = host.cfg.caddy.https_port
    hostname = f"{name}.{host.cfg.caddy.domain}"
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # Caddy's internal issuer; the edge is not under test
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
            ctx.wrap_socket(raw, server_hostname=hostname) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n\r\n"
                    .encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def nft_table() -> str:
    return subprocess.run(["nft", "list", "table", "inet", "lobsterd"], capture_output=True,
                          text=True, timeout=30, check=True).stdout


@pytest.fixture(scope="module")
def two(e2e_host: Host):  # type: ignore[no-untyped-def]
    before = nft_table()
    store = e2e_host.secrets
    store.set("SHARED_KEY", "shared-" + secrets.token_hex(8))
    store.set("ALPHA_KEY", "alpha-" + secrets.token_hex(8), tenant="alpha")
    store.set("BETA_KEY", "beta-" + secrets.token_hex(8), tenant="beta")
    for n in ("alpha", "beta"):
        spawn(e2e_host, n)
    yield e2e_host, before
    for n in ("alpha", "beta"):
        if e2e_host.registry.find(n):
            evict(e2e_host, n)
    store.rm("SHARED_KEY")


def test_each_host_name_reaches_its_own_tenant(two: tuple[Host, str]) -> None:
    host, _ = two
    for n in ("alpha", "beta"):
        status, body = https_get(host, n)
        assert status == 200, body
        assert json.loads(body)["tenant"] == n


def test_each_tenant_got_its_own_secrets_only(two: tuple[Host, str]) -> None:
    host, _ = two
    injected = {}
    for n in ("alpha", "beta"):
        recs = [r for r in host.audit.tail(200, tenant=n) if r["action"] == "secrets.inject"]
        assert recs, f"no secrets.inject record for {n}"
        injected[n] = set(recs[-1]["details"]["names"])
    assert {"SHARED_KEY", "ALPHA_KEY"} <= injected["alpha"]
    assert "BETA_KEY" not in injected["alpha"]
    assert {"SHARED_KEY", "BETA_KEY"} <= injected["beta"]
    assert "ALPHA_KEY" not in injected["beta"]
    audit_text = host.cfg.paths.audit_log.read_text()
    for name, scope in (("SHARED_KEY", None), ("ALPHA_KEY", "alpha"), ("BETA_KEY", "beta")):
        value = host.secrets.get(name, tenant=scope)
        assert value and value not in audit_text


def test_unknown_host_reaches_no_tenant(two: tuple[Host, str]) -> None:
    host, _ = two
    try:
        status, body = https_get(host, "nobody")
    except (ssl.SSLError, OSError):
        return  # no certificate for an unknown name: refused at the edge
    assert status == 404 and "standin" not in body


def test_guest_front_requires_caddys_client_certificate(two: tuple[Host, str]) -> None:
    host, _ = two
    t = host.registry.get("alpha")
    ctx = ssl.create_default_context(cadata=host.ca.ca_pem())
    ctx.check_hostname = False
    addr = (t.guest_ip, host.cfg.network.gateway_port)
    with socket.create_connection(addr, timeout=10) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError)), \
            ctx.wrap_socket(raw, server_hostname=rt.guest_server_name("alpha")) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        if not tls.recv(1024):  # TLS 1.3 reports the rejection on first read
            raise ConnectionError("closed")
    # Plain HTTP to the gateway port gets no HTTP answer: only TLS is spoken there.
    with socket.create_connection((t.guest_ip, host.cfg.network.gateway_port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(10)
        try:
            reply = raw.recv(1024)
        except (ConnectionError, TimeoutError):
            reply = b""
        assert not reply.startswith(b"HTTP/")


def test_agent_ports_only_for_root(two: tuple[Host, str]) -> None:
    need_binary("setpriv")
    host, _ = two
    t = host.registry.get("alpha")
    target = (t.guest_ip, host.cfg.network.agent_port)
    probe = ("import socket,sys\n"
             "s=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex({target!r})==0 else 1)")
    as_root = subprocess.run([sys.executable, "-c", probe], timeout=30, check=False)
    as_nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                sys.executable, "-c", probe], timeout=30, check=False)
    assert as_root.returncode == 0
    assert as_nobody.returncode == 1


def test_no_secret_in_registry_tank_audit_or_argv(two: tuple[Host, str]) -> None:
    host, _ = two
    t = host.registry.get("alpha")
    values = [host.secrets.get_internal("alpha", k) for k in (rt.AGENT_TOKEN, rt.GATEWAY_TOKEN)]
    values += [v for v in (host.secrets.get("SHARED_KEY"), host.secrets.get("ALPHA_KEY", "alpha"))
               if v]
    assert len(values) == 4
    blobs = {
        "registry": host.cfg.paths.registry.read_bytes(),
        "secrets.db": host.cfg.paths.secrets_db.read_bytes(),
        "audit": host.cfg.paths.audit_log.read_bytes(),
        "tank": json.dumps(tank(host)).encode(),
        "qemu argv": Path(f"/proc/{t.vm_pid}/cmdline").read_bytes(),
        "qemu environ": Path(f"/proc/{t.vm_pid}/environ").read_bytes(),
    }
    for wal in host.cfg.paths.state_dir.glob("*.db-wal"):
        blobs[wal.name] = wal.read_bytes()
    for label, blob in blobs.items():
        for v in values:
            assert v.encode() not in blob, f"a token leaked into {label}"


def test_rotation_keeps_serving(two: tuple[Host, str]) -> None:
    host, _ = two
    before = host.registry.get("alpha").runtime["tls_not_after"]
    report = rotate_guest_certs(host, force=True)
    assert "alpha" in report.rotated and not report.failed
    assert host.registry.get("alpha").runtime["tls_not_after"] >= before
    status, body = https_get(host, "alpha")
    assert status == 200 and json.loads(body)["tenant"] == "alpha"


def test_reconcile_after_simulated_reboot(two: tuple[Host, str]) -> None:
    """A reboot loses VMs, TAPs, mounts, nftables and Caddy: init brings back the host
    side without duplicates."""
    host, _ = two
    table_before = nft_table()
    names = ("alpha", "beta")
    for n in names:
        t = host.registry.get(n)
        host.vmm.kill(VmHandle.from_dict(t.runtime["vm"]))
        TenantVolume(host.cfg, n).unmount()
        net.delete_tap(t.tap)
    host.firewall.teardown()
    CaddySupervisor(host.cfg).stop()

    report = init_host(host, accept_risk=True)
    assert nft_table() == table_before
    init_host(host, accept_risk=True)  # twice: still no duplicates
    assert nft_table() == table_before
    routes = host.caddy.get_routes()
    for n in names:
        t = host.registry.get(n)
        assert net.tap_exists(t.tap)
        assert TenantVolume(host.cfg, n).is_mounted()
        assert sum(tenant_of_route(r) == n for r in routes) == 2
        assert any(f'"{n}": VM is not running' in w for w in report.warnings)


def test_evict_restores_the_ruleset(two: tuple[Host, str]) -> None:
    host, before = two
    for n in ("alpha", "beta"):
        slot = host.registry.get(n).slot
        evict(host, n)
        assert traces(host, n, slot) == {}
    assert nft_table() == before

