"""The whole edge path with real parts: client → Caddy (edge TLS) → mutual TLS → guest
TLS front → gateway stand-in (HTTP + WebSocket).

The "guest" is a :class:`TlsFront` on 127.0.0.2 forwarding to a tiny upstream on
127.0.0.1; Caddy runs as the ``caddy`` user when the host has one (as in production),
with the host CA's files readable through the caddy group. Loopback only; Caddy's
internal CA at the edge, no ACME.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lobsterd.adapters.caddy import CaddySupervisor
from lobsterd.core import caddy_config as cc
from lobsterd.guest.tls_front import TlsFront
from lobsterd.security.ca import HostCA, guest_server_name
from tests.helpers import need_binary, need_root
from tests.integration.test_caddy import DOMAIN, caddy_config, free_port, running_caddy

pytestmark = pytest.mark.integration

GUEST_IP = "127.0.0.2"
HOST = f"demo.{DOMAIN}"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- gateway stand-in -------------------------------------------------------------------


@dataclass
class Gateway:
    """HTTP answers with what it saw; WebSocket upgrades echo bytes. Records requests."""

    port: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    _sock: socket.socket | None = None

    def start(self) -> None:
        s = socket.create_server(("127.0.0.1", 0))
        s.settimeout(0.2)
        self._sock, self.port = s, s.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                c, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        with c:
            c.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, _rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            hdrs = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
            self.requests.append({"method": method, "path": path, **hdrs})
            if hdrs.get("upgrade", "").lower() == "websocket":
                digest = hashlib.sha1(  # RFC 6455 mandates SHA-1 here
                    (hdrs["sec-websocket-key"] + WS_GUID).encode()
                ).digest()
                c.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                    + base64.b64encode(digest)
                    + b"\r\n\r\n"
                )
                while chunk := c.recv(65536):
                    c.sendall(chunk)
                return
            body = json.dumps({"path": path, "connection": hdrs.get("connection")}).encode()
            c.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )


# -- the assembled path -----------------------------------------------------------------


@dataclass
class EdgePath:
    sup: CaddySupervisor
    ca: HostCA
    gateway: Gateway
    front: TlsFront
    front_port: int
    edge_root_pem: str

    @property
    def https_port(self) -> int:
        return self.sup.cfg.caddy.https_port

    @property
    def http_port(self) -> int:
        return self.sup.cfg.caddy.http_port

    def new_front(self, tenant: str = "demo") -> TlsFront:
        issued = self.ca.issue_server(tenant, "10.200.0.6")
        return TlsFront(
            GUEST_IP,
            self.front_port,
            "127.0.0.1",
            self.gateway.port,
            issued.cert_pem,
            issued.key_pem,
            self.ca.ca_pem(),
        )


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.fixture
def edge() -> Iterator[EdgePath]:
    need_root()
    need_binary("caddy")
    user: str | None = "caddy"
    try:
        pwd.getpwnam("caddy")
    except KeyError:
        user = None
    # Caddy's user must be able to traverse the root (pytest's tmp dirs are 0700).
    root = Path(tempfile.mkdtemp(prefix="lobsterd-mtls-", dir="/tmp"))
    os.chmod(root, 0o711)
    gateway = Gateway()
    front: TlsFront | None = None
    try:
        gateway.start()
        cfg = caddy_config(root)
        ca = HostCA(cfg.paths.config_dir / "ca", caddy_group=user)
        with running_caddy(cfg, user=user) as sup:
            front_port = free_port()
            issued = ca.issue_server("demo", "10.200.0.6")
            front = TlsFront(
                GUEST_IP,
                front_port,
                "127.0.0.1",
                gateway.port,
                issued.cert_pem,
                issued.key_pem,
                ca.ca_pem(),
            )
            front.start()
            cert, key = ca.client_cert()
            routes = cc.tenant_routes(
                tenant="demo",
                domain=DOMAIN,
                guest_ip=GUEST_IP,
                gateway_port=front_port,
                ca_file=ca.ca_file,
                client_cert=cert,
                client_key=key,
                server_name=guest_server_name("demo"),
            )
            sup.admin().put_tenant_routes("demo", routes)
            root_crt = sup.storage_dir / "pki" / "authorities" / "local" / "root.crt"
            _wait_for(root_crt)
            path = EdgePath(sup, ca, gateway, front, front_port, root_crt.read_text())
            yield path
            front = path.front
    finally:
        if front is not None:
            front.stop()
        gateway.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- a raw client (so SNI and Host can differ) ------------------------------------------


def _edge_ctx(edge: EdgePath) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=edge.edge_root_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@contextlib.contextmanager
def _tls(
    edge: EdgePath, sni: str, timeout: float = 40, retry_s: float = 20
) -> Iterator[ssl.SSLSocket]:
    """TLS to Caddy, retrying while Caddy's internal issuer has not made the cert yet."""
    deadline = time.monotonic() + retry_s
    while True:
        raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=timeout)
        try:
            tls = _edge_ctx(edge).wrap_socket(raw, server_hostname=sni)
            break
        except (ssl.SSLError, ConnectionResetError):
            raw.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield tls
    finally:
        tls.close()


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)}
    return status, hdrs, body


def https_get(
    edge: EdgePath, host: str = HOST, sni: str = HOST, path: str = "/", retry_s: float = 20
) -> tuple[int, dict[str, str], bytes]:
    with _tls(edge, sni, retry_s=retry_s) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return _read_response(tls)


# -- the tests --------------------------------------------------------------------------


def test_https_request_reaches_the_guest_over_mutual_tls(edge: EdgePath) -> None:
    status, _, body = https_get(edge, path="/hello")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/hello"
    # The HTTP route tells the guest to close after the response (no idle pool).
    assert seen["connection"] == "close"
    assert len(edge.gateway.requests) == 1
    assert edge.gateway.requests[0]["host"] == HOST


def test_websocket_upgrade_is_proxied_and_kept_open(edge: EdgePath) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    with _tls(edge, HOST) as tls:
        tls.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive, Upgrade\r\n"
                f"Upgrade: websocket\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(1)
            assert chunk, "connection closed before the 101"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest())
        assert b"Sec-Websocket-Accept: " + expected in head.replace(
            b"Sec-WebSocket-Accept", b"Sec-Websocket-Accept"
        )
        for msg in (b"\x81\x05hello", os.urandom(70000)):
            tls.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = tls.recv(65536)
                assert chunk
                got += chunk
            assert got == msg
    req = edge.gateway.requests[-1]
    assert req["path"] == "/ws" and "upgrade" in req["connection"].lower()
    assert "close" not in req["connection"].lower()


def test_unknown_host_gets_404_and_never_reaches_a_guest(edge: EdgePath) -> None:
    assert https_get(edge)[0] == 200  # the route works (and the edge cert exists)
    before = len(edge.gateway.requests)
    status, _, body = https_get(edge, host=f"other.{DOMAIN}")
    assert status == 404 and body == b"unknown host\n"
    # Unknown SNI as well: either no certificate (handshake refused) or the 404.
    try:
        status = https_get(edge, host=f"other.{DOMAIN}", sni=f"other.{DOMAIN}", retry_s=0)[0]
    except (ssl.SSLError, ConnectionResetError):
        status = 0
    assert status in {0, 404}
    assert len(edge.gateway.requests) == before


def test_plain_http_only_redirects(edge: EdgePath) -> None:
    with socket.create_connection(("127.0.0.1", edge.http_port), timeout=10) as s:
        s.sendall(f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        status, hdrs, _ = _read_response(s)
    assert status == 308 and hdrs["location"].startswith(f"https://{HOST}")
    assert edge.gateway.requests == []


def test_guest_front_refuses_clients_without_caddys_certificate(edge: EdgePath) -> None:
    ctx = ssl.create_default_context(cadata=edge.ca.ca_pem())
    with socket.create_connection((GUEST_IP, edge.front_port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=guest_server_name("demo")) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(1024) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
    assert edge.gateway.requests == []
    # Control: with Caddy's client certificate the same connection is forwarded.
    cert, key = edge.ca.client_cert()
    ctx.load_cert_chain(cert, key)
    with (
        socket.create_connection((GUEST_IP, edge.front_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=guest_server_name("demo")) as tls,
    ):
        tls.sendall(b"GET /direct HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = _read_response(tls)
    assert status == 200 and edge.gateway.requests[-1]["path"] == "/direct"


def test_caddy_refuses_a_guest_with_another_tenants_certificate(edge: EdgePath) -> None:
    # Caddy retries failed TLS dials like refused ones (for try_duration, 30 s); this
    # test is about the verification, so shorten the retry window of this route.
    admin = edge.sup.admin()
    routes = cc.routes_by_tenant(admin.get_routes())["demo"]
    for r in routes:
        r["handle"][0]["load_balancing"]["try_duration"] = "1s"
    admin.put_tenant_routes("demo", routes)
    evil = edge.ca.issue_server("evil", "10.200.0.10")
    edge.front.reload(evil.cert_pem, evil.key_pem, edge.ca.ca_pem())
    status, _, _ = https_get(edge)
    assert status == 502
    assert edge.gateway.requests == []
    good = edge.ca.issue_server("demo", "10.200.0.6")
    edge.front.reload(good.cert_pem, good.key_pem, edge.ca.ca_pem())
    assert https_get(edge)[0] == 200


def test_request_waits_for_a_guest_that_comes_back(edge: EdgePath) -> None:
    """Wake-on-request relies on Caddy retrying the dial (try_duration/try_interval)."""
    assert https_get(edge)[0] == 200
    edge.front.stop()
    replacement = edge.new_front()
    timer = threading.Timer(1.5, replacement.start)
    t0 = time.monotonic()
    timer.start()
    try:
        status, _, body = https_get(edge, path="/after-wake")
    finally:
        timer.join()
        edge.front = replacement
    elapsed = time.monotonic() - t0
    assert status == 200, body
    assert json.loads(body)["path"] == "/after-wake"
    assert elapsed >= 1.4
