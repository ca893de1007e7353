"""Guest TLS front, in process on 127.0.0.1: who gets in, what gets through, robustness."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lobsterd.guest.tls_front import (
    TlsFront,
    build_server_context,
    cert_ext_key_usages,
    client_identity_ok,
)
from lobsterd.security.ca import HostCA

SERVER_NAME = "demo.guest.lobsterd.internal"


# -- material ---------------------------------------------------------------------------


@dataclass
class Pki:
    ca: HostCA
    server_cert: str
    server_key: str
    client_cert: Path
    client_key: Path


def _pki(root: Path) -> Pki:
    ca = HostCA(root / "ca", caddy_group=None)
    issued = ca.issue_server("demo", "10.200.0.6")
    cert, key = ca.client_cert()
    return Pki(ca, issued.cert_pem, issued.key_pem, cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("other-pki"))


def _mint(
    pki: Pki, tmp: Path, *, cn: str, eku: list[x509.ObjectIdentifier] | None, name: str
) -> tuple[Path, Path]:
    """A leaf signed by ``pki``'s CA with any CN/EKU (what an attacker might hold)."""
    ca_key = serialization.load_pem_private_key(pki.ca.key_file.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = pki.ca.ca_certificate()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("x.lobsterd.internal")]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    cp, kp = tmp / f"{name}.pem", tmp / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cp, kp


# -- upstream: echo with a record of everything it received ----------------------------


@dataclass
class Echo:
    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        s = socket.create_server(("127.0.0.1", 0))
        s.settimeout(0.2)
        self._sock, self.port = s, s.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.received += data
                c.sendall(data)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    e.start()
    try:
        yield e
    finally:
        e.stop()


def _new_front(pki: Pki, upstream_port: int, **kw: Any) -> TlsFront:
    """A front on 127.0.0.1 (any port) for ``upstream_port``, with the test PKI; not
    started."""
    return TlsFront("127.0.0.1", 0, "127.0.0.1", upstream_port, pki.server_cert,
                    pki.server_key, pki.ca.ca_pem(), **kw)


@pytest.fixture
def front(pki: Pki, echo: Echo) -> Iterator[TlsFront]:
    f = _new_front(pki, echo.port, handshake_timeout_s=1.0)
    f.start()
    try:
        yield f
    finally:
        f.stop()


def _client_ctx(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.ca.ca_pem())
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@contextlib.contextmanager
def _connect(front: TlsFront, ctx: ssl.SSLContext, timeout: float = 5.0) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", front.port), timeout=timeout)
    tls = ctx.wrap_socket(raw, server_hostname=SERVER_NAME)
    try:
        yield tls
    finally:
        tls.close()


def _roundtrip(tls: ssl.SSLSocket, data: bytes) -> bytes:
    tls.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = tls.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _refused(front: TlsFront, ctx: ssl.SSLContext) -> bool:
    """True when the front does not forward for this client (handshake fails or the
    connection dies before any byte comes back)."""
    try:
        with _connect(front, ctx) as tls:
            return _roundtrip(tls, b"hello?") != b"hello?"
    except (ssl.SSLError, OSError):
        return True


# -- who gets in ------------------------------------------------------------------------


def test_caddy_client_cert_is_forwarded(front: TlsFront, pki: Pki, echo: Echo) -> None:
    with _connect(front, _client_ctx(pki, pki.client_cert, pki.client_key)) as tls:
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        assert _roundtrip(tls, b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"
        assert front.active_connections == 1
    assert bytes(echo.received) == b"GET / HTTP/1.1\r\n\r\n"


def test_no_client_cert_is_refused(front: TlsFront, pki: Pki, echo: Echo) -> None:
    assert _refused(front, _client_ctx(pki, None, None))
    assert echo.connections == 0 and not echo.received


def test_cert_from_another_ca_is_refused(
    front: TlsFront, pki: Pki, other_pki: Pki, echo: Echo
) -> None:
    # Right CN and EKU, wrong CA (the client trusts the right server CA).
    assert _refused(front, _client_ctx(pki, other_pki.client_cert, other_pki.client_key))
    assert echo.connections == 0


def test_guest_server_cert_is_no_client_credential(
    front: TlsFront, pki: Pki, echo: Echo, tmp_path: Path
) -> None:
    issued = pki.ca.issue_server("evil", "10.200.0.10")
    cp, kp = tmp_path / "s.pem", tmp_path / "s.key"
    cp.write_text(issued.cert_pem)
    kp.write_text(issued.key_pem)
    assert _refused(front, _client_ctx(pki, cp, kp))
    assert echo.connections == 0


@pytest.mark.parametrize(
    ("cn", "eku"),
    [
        ("someone-else", [ExtendedKeyUsageOID.CLIENT_AUTH]),  # right CA, wrong CN
        ("lobsterd-caddy", None),  # no EKU at all (OpenSSL alone would accept it)
    ],
)
def test_same_ca_but_wrong_identity_is_refused(
    front: TlsFront,
    pki: Pki,
    echo: Echo,
    tmp_path: Path,
    cn: str,
    eku: list[x509.ObjectIdentifier] | None,
) -> None:
    cp, kp = _mint(pki, tmp_path, cn=cn, eku=eku, name="minted")
    assert _refused(front, _client_ctx(pki, cp, kp))
    assert echo.connections == 0
    # The same forgery with the right identity passes: the test checks the right thing.
    ok_cp, ok_kp = _mint(
        pki, tmp_path, cn="lobsterd-caddy", eku=[ExtendedKeyUsageOID.CLIENT_AUTH], name="ok"
    )
    assert not _refused(front, _client_ctx(pki, ok_cp, ok_kp))


def test_context_policy(pki: Pki) -> None:
    ctx = build_server_context(pki.server_cert, pki.server_key, pki.ca.ca_pem())
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_key_material_does_not_linger_on_disk(pki: Pki, tmp_path: Path) -> None:
    build_server_context(pki.server_cert, pki.server_key, pki.ca.ca_pem(), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# -- what gets through ------------------------------------------------------------------


def test_large_bidirectional_stream(pki: Pki, echo: Echo) -> None:
    # Its own front with a generous handshake limit: the shared fixture's 1 s limit (which
    # the timeout tests rely on) can be missed on a busy 2-core machine.
    front = _new_front(pki, echo.port, handshake_timeout_s=15.0)
    front.start()
    try:
        _stream_through(front, pki)
    finally:
        front.stop()


def _stream_through(front: TlsFront, pki: Pki) -> None:
    """Write 3 MiB while reading the echo, from ONE thread: both directions fill up, and
    the front's pump must keep both moving. (An SSL object must not be used from two
    threads at once, so the client multiplexes with a selector instead.)"""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    got = bytearray()
    sent = 0
    with _connect(front, _client_ctx(pki, pki.client_cert, pki.client_key), timeout=30) as tls:
        tls.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(tls, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + 60
        try:
            while len(got) < len(payload):
                assert time.monotonic() < deadline, f"stalled at {sent} sent, {len(got)} back"
                if sent == len(payload):
                    sel.modify(tls, selectors.EVENT_READ)
                if not tls.pending():
                    sel.select(1.0)
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    chunk = tls.recv(65536)
                    assert chunk, "the front closed the stream early"
                    got.extend(chunk)
                if sent < len(payload):
                    with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        sent += tls.send(payload[sent:sent + 65536])
        finally:
            sel.close()
    assert bytes(got) == payload


def test_upstream_close_ends_the_client_connection(pki: Pki) -> None:
    # Upstream answers once and closes (HTTP with Connection: close).
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(1024)
            c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbye")

    threading.Thread(target=serve, daemon=True).start()
    f = _new_front(pki, port)
    f.start()
    try:
        with _connect(f, _client_ctx(pki, pki.client_cert, pki.client_key)) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
            data = b""
            while True:
                chunk = tls.recv(1024)
                if not chunk:
                    break
                data += chunk
        assert data.endswith(b"bye")
    finally:
        f.stop()
        srv.close()


def test_upstream_down_closes_the_client(pki: Pki) -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    f = _new_front(pki, port)
    f.start()
    try:
        assert _refused(f, _client_ctx(pki, pki.client_cert, pki.client_key))
    finally:
        f.stop()


# -- reload, limits, robustness ---------------------------------------------------------


def test_reload_switches_new_connections_and_keeps_live_ones(
    front: TlsFront, pki: Pki, other_pki: Pki
) -> None:
    old_ctx = _client_ctx(pki, pki.client_cert, pki.client_key)
    with _connect(front, old_ctx) as live:
        assert _roundtrip(live, b"before") == b"before"
        front.reload(other_pki.server_cert, other_pki.server_key, other_pki.ca.ca_pem())
        assert _roundtrip(live, b"after") == b"after"  # unaffected
    assert _refused(front, old_ctx)
    new_ctx = _client_ctx(other_pki, other_pki.client_cert, other_pki.client_key)
    with _connect(front, new_ctx) as tls:
        assert _roundtrip(tls, b"new") == b"new"


def test_bad_reload_keeps_the_old_material(front: TlsFront, pki: Pki) -> None:
    with pytest.raises((ssl.SSLError, ValueError)):
        front.reload(pki.server_cert, "-----BEGIN " + "PRIVATE KEY-----\nAAAA\n", pki.ca.ca_pem())
    with _connect(front, _client_ctx(pki, pki.client_cert, pki.client_key)) as tls:
        assert _roundtrip(tls, b"still") == b"still"


def test_connection_limit(pki: Pki, echo: Echo) -> None:
    f = _new_front(pki, echo.port, max_connections=2)
    f.start()
    ctx = _client_ctx(pki, pki.client_cert, pki.client_key)
    try:
        with _connect(f, ctx) as a, _connect(f, ctx) as b:
            assert _roundtrip(a, b"a") == b"a" and _roundtrip(b, b"b") == b"b"
            assert f.active_connections == 2
            assert _refused(f, ctx)
        deadline = time.monotonic() + 5
        while f.active_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        with _connect(f, ctx) as c:  # slots come back
            assert _roundtrip(c, b"c") == b"c"
    finally:
        f.stop()


def test_silent_and_garbage_clients_do_not_hurt(front: TlsFront, pki: Pki, echo: Echo) -> None:
    silent = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    garbage = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(512))
    try:
        t0 = time.monotonic()
        assert silent.recv(16) == b""  # closed by the handshake timeout (1 s here)
        assert time.monotonic() - t0 < 4
        with contextlib.suppress(ConnectionResetError):
            garbage.recv(1024)
    finally:
        silent.close()
        garbage.close()
    with _connect(front, _client_ctx(pki, pki.client_cert, pki.client_key)) as tls:
        assert _roundtrip(tls, b"alive") == b"alive"
    assert front.rejected >= 2 and echo.connections == 1


def test_a_trickling_handshake_is_cut_at_the_deadline(front: TlsFront) -> None:
    """One byte every 0.3 s must not stretch the handshake: the limit (1 s) is total."""
    s = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40)
    t0 = time.monotonic()
    closed_after: float | None = None
    try:
        for b in hello:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed_after = time.monotonic() - t0
                break
            s.settimeout(0.3)
            try:
                if s.recv(16) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - t0
                break
    finally:
        s.close()
    assert closed_after is not None, "the front kept a trickling handshake open"
    assert closed_after < 3.0


def test_stop_closes_live_connections_and_the_port(pki: Pki, echo: Echo) -> None:
    f = _new_front(pki, echo.port)
    f.start()
    ctx = _client_ctx(pki, pki.client_cert, pki.client_key)
    with _connect(f, ctx) as tls:
        assert _roundtrip(tls, b"x") == b"x"
        f.stop()
        assert _roundtrip(tls, b"y") != b"y"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", f.port), timeout=2).close()


# -- the EKU reader ---------------------------------------------------------------------


def test_eku_reader(pki: Pki, tmp_path: Path) -> None:
    server_der = x509.load_pem_x509_certificate(pki.server_cert.encode()).public_bytes(
        serialization.Encoding.DER
    )
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    client_der = client.public_bytes(serialization.Encoding.DER)
    assert cert_ext_key_usages(server_der) == [bytes.fromhex("2b06010505070301")]
    assert cert_ext_key_usages(client_der) == [bytes.fromhex("2b06010505070302")]
    cp, _ = _mint(pki, tmp_path, cn="lobsterd-caddy", eku=None, name="noeku")
    no_eku = x509.load_pem_x509_certificate(cp.read_bytes())
    assert cert_ext_key_usages(no_eku.public_bytes(serialization.Encoding.DER)) is None
    with pytest.raises(ValueError):
        cert_ext_key_usages(client_der[:100])
    peer = {"subject": ((("commonName", "lobsterd-caddy"),),)}
    assert client_identity_ok(peer, client_der, "lobsterd-caddy")
    assert not client_identity_ok(peer, server_der, "lobsterd-caddy")
    assert not client_identity_ok(peer, client_der[:50], "lobsterd-caddy")
    assert not client_identity_ok(None, client_der, "lobsterd-caddy")
    two_cns = {"subject": ((("commonName", "lobsterd-caddy"),), (("commonName", "x"),))}
    assert not client_identity_ok(two_cns, client_der, "lobsterd-caddy")
