"""TLS front of the guest's gateway: mutual TLS in, plain bytes to loopback out.

Runs inside the guest (Python standard library only). The gateway binds 127.0.0.1
only; this front listens on the guest's address, terminates TLS with the guest's server
certificate, and accepts a client only if

* its certificate chains to the host CA it was given (``CERT_REQUIRED``), and
* the certificate's subject CN is ``lobsterd-caddy`` and its extended key usage lists
  ``clientAuth`` — the host CA also signs every guest's *server* certificate, and
  those (serverAuth only, CN = the guest's name) must never pass as Caddy.

It then pumps bytes both ways, so HTTP and WebSocket upgrades both work unchanged.
Each connection is served by one thread with non-blocking sockets (an ``SSLSocket``
must not be read and written from two threads at once). A bad client costs at most one
slot for the handshake timeout; the number of connections is bounded.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REQUIRED_CLIENT_CN = "lobsterd-caddy"
_OID_EKU = bytes.fromhex("551d25")  # 2.5.29.37 extKeyUsage
_OID_CLIENT_AUTH = bytes.fromhex("2b06010505070302")  # 1.3.6.1.5.5.7.3.2
_BUF = 64 * 1024
_MAX_BUFFERED = 1024 * 1024


# -- a minimal DER reader: enough to find the EKU extension of a certificate -----------


def _tlv(buf: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``."""
    if pos + 2 > limit:
        raise ValueError("truncated DER")
    tag = buf[pos]
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > limit:
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > limit:
        raise ValueError("DER element overruns its parent")
    return tag, pos, end


def _children(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    pos = start
    while pos < end:
        tag, cstart, cend = _tlv(buf, pos, end)
        yield tag, cstart, cend
        pos = cend


def cert_ext_key_usages(der: bytes) -> list[bytes] | None:
    """The EKU OIDs (DER content bytes) of a certificate; None when it has no EKU."""
    _, cs, ce = _tlv(der, 0, len(der))  # Certificate
    _, ts, te = next(_children(der, cs, ce))  # TBSCertificate
    for tag, xs, xe in _children(der, ts, te):
        if tag != 0xA3:  # [3] extensions
            continue
        _, ls, le = _tlv(der, xs, xe)  # SEQUENCE OF Extension
        for _, es, ee in _children(der, ls, le):
            parts = list(_children(der, es, ee))
            if not parts or parts[0][0] != 0x06:
                raise ValueError("extension without OID")
            if der[parts[0][1] : parts[0][2]] != _OID_EKU:
                continue
            vtag, vs, ve = parts[-1]
            if vtag != 0x04:
                raise ValueError("extension value is not an OCTET STRING")
            _, ss, se = _tlv(der, vs, ve)
            return [der[os_:oe] for t, os_, oe in _children(der, ss, se) if t == 0x06]
    return None


def client_identity_ok(peer: dict[str, Any] | None, der: bytes | None, cn: str) -> bool:
    """Subject CN is exactly ``cn`` and the EKU lists clientAuth (an EKU must exist)."""
    if not peer or not der:
        return False
    cns = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
    if cns != [cn]:
        return False
    try:
        ekus = cert_ext_key_usages(der)
    except (ValueError, StopIteration):
        return False
    return ekus is not None and _OID_CLIENT_AUTH in ekus


# -- the front -------------------------------------------------------------------------


def _private_tmp_dir() -> str | None:
    """Where the key may touch a file for an instant: a tmpfs, never the guest's disk."""
    # mkdtemp below makes a fresh 0700 directory, so a shared tmpfs is safe.
    for cand in ("/run/lobster/tls", "/dev/shm", "/run"):  # noqa: S108
        if os.path.isdir(cand) and os.access(cand, os.W_OK | os.X_OK):
            return cand
    return None


def build_server_context(
    cert_pem: str, key_pem: str, client_ca_pem: str, tmp_dir: str | None = None
) -> ssl.SSLContext:
    """A TLS ≥ 1.2 server context that requires a client certificate from the CA.

    ``load_cert_chain`` only reads files, so the key goes through a private 0600 file
    in a fresh 0700 directory (tmpfs in the guest) that is removed right after loading.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_verify_locations(cadata=client_ca_pem)
    d = tempfile.mkdtemp(prefix="tls-front-", dir=tmp_dir or _private_tmp_dir())
    try:
        cert_path = os.path.join(d, "cert.pem")
        key_path = os.path.join(d, "key.pem")
        for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(text)
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        for name in ("cert.pem", "key.pem"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, name))
        os.rmdir(d)
    return ctx


class TlsFront:
    """``bind_host:port`` (mutual TLS) → ``upstream_host:upstream_port`` (plain TCP)."""

    def __init__(
        self,
        bind_host: str,
        port: int,
        upstream_host: str,
        upstream_port: int,
        cert_pem: str,
        key_pem: str,
        client_ca_pem: str,
        *,
        max_connections: int = 256,
        handshake_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float | None = None,
        required_cn: str = REQUIRED_CLIENT_CN,
        tmp_dir: str | None = None,
    ) -> None:
        self.bind_host = bind_host
        self.port = port
        self.upstream = (upstream_host, upstream_port)
        self.handshake_timeout_s = handshake_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.required_cn = required_cn
        self.tmp_dir = tmp_dir
        self._ctx = build_server_context(cert_pem, key_pem, client_ca_pem, tmp_dir)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._active = 0
        self.rejected = 0
        """Connections refused (handshake failure, wrong identity, no free slot)."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in daemon threads; returns once the port is listening."""
        if self._listener is not None:
            return
        self._stopping.clear()
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        lst = socket.create_server((self.bind_host, self.port), family=family, backlog=128)
        lst.settimeout(0.5)
        self.port = lst.getsockname()[1]
        self._listener = lst
        self._acceptor = threading.Thread(target=self._accept_loop, name="tls-front", daemon=True)
        self._acceptor.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every live connection, wait for the threads."""
        self._stopping.set()
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout_s)
            self._acceptor = None
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout_s)

    def reload(self, cert_pem: str, key_pem: str, client_ca_pem: str) -> None:
        """New material for new connections; live ones keep theirs. Bad material raises
        (``ssl.SSLError``/``ValueError``) and the old context stays in force."""
        ctx = build_server_context(cert_pem, key_pem, client_ca_pem, self.tmp_dir)
        with self._lock:
            self._ctx = ctx

    @property
    def active_connections(self) -> int:
        """Authenticated connections currently forwarding (what keeps a guest awake)."""
        with self._lock:
            return self._active

    def _reject(self) -> None:
        with self._lock:
            self.rejected += 1

    # -- serving -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        lst = self._listener
        while not self._stopping.is_set() and lst is not None:
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                self._reject()
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="tls-conn", daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.update(socks)

    def _serve(self, conn: socket.socket) -> None:
        tls: ssl.SSLSocket | None = None
        up: socket.socket | None = None
        try:
            with self._lock:
                ctx = self._ctx
            # CPython turns the socket timeout into one deadline for the whole handshake
            # (not per read), so a client trickling bytes is cut off at this limit too.
            conn.settimeout(self.handshake_timeout_s)
            try:
                tls = ctx.wrap_socket(conn, server_side=True)
                ok = client_identity_ok(
                    tls.getpeercert(), tls.getpeercert(binary_form=True), self.required_cn
                )
            except (OSError, ValueError):
                ok = False
            if not ok or tls is None:
                self._reject()
                return
            try:
                up = socket.create_connection(self.upstream, timeout=self.connect_timeout_s)
            except OSError:
                return
            self._track(tls, up)
            with self._lock:
                self._active += 1
            try:
                if self._pump(tls, up):
                    self._close_notify(tls)
            finally:
                with self._lock:
                    self._active -= 1
        except Exception:  # noqa: S110 - one bad connection must never take the front down
            pass
        finally:
            for s in (tls, up, conn):
                if s is not None:
                    with self._lock:
                        self._conns.discard(s)
                    with contextlib.suppress(OSError):
                        s.close()
            with self._lock:
                self._threads.discard(threading.current_thread())
            self._slots.release()

    @staticmethod
    def _close_notify(tls: ssl.SSLSocket) -> None:
        """End the TLS stream properly, so the client can tell it from a truncation."""
        with contextlib.suppress(OSError, ValueError):
            tls.settimeout(0.5)
            tls.unwrap()

    def _pump(self, tls: ssl.SSLSocket, up: socket.socket) -> bool:
        """Move bytes both ways until both directions are done (True) or the
        connection idles out or the front stops (False)."""
        tls.setblocking(False)
        up.setblocking(False)
        to_up = bytearray()
        to_client = bytearray()
        client_eof = up_eof = up_wr_closed = False
        sel = selectors.DefaultSelector()
        try:
            while not self._stopping.is_set():
                if client_eof and not to_up and not up_wr_closed:
                    with contextlib.suppress(OSError):
                        up.shutdown(socket.SHUT_WR)
                    up_wr_closed = True
                if up_eof and not to_client:
                    return True
                want_tls = (selectors.EVENT_READ if not client_eof else 0) | (
                    selectors.EVENT_WRITE if to_client else 0
                )
                want_up = (
                    selectors.EVENT_READ if not up_eof and len(to_client) < _MAX_BUFFERED else 0
                ) | (selectors.EVENT_WRITE if to_up else 0)
                if len(to_up) >= _MAX_BUFFERED:
                    want_tls &= ~selectors.EVENT_READ
                self._select_set(sel, tls, want_tls)
                self._select_set(sel, up, want_up)
                if not want_tls and not want_up:
                    return True
                ready = [] if tls.pending() else sel.select(self.idle_timeout_s)
                if not ready and not tls.pending():
                    return False  # idle timeout
                events = {key.fileobj: ev for key, ev in ready}
                if tls.pending() or events.get(tls, 0) & selectors.EVENT_READ:
                    client_eof = self._read_tls(tls, to_up) or client_eof
                if events.get(up, 0) & selectors.EVENT_READ:
                    up_eof = self._read_plain(up, to_client) or up_eof
                if to_up and events.get(up, 0) & selectors.EVENT_WRITE:
                    self._write(up, to_up)
                if to_client and events.get(tls, 0) & selectors.EVENT_WRITE:
                    self._write(tls, to_client)
        finally:
            sel.close()
        return False

    @staticmethod
    def _select_set(sel: selectors.BaseSelector, s: socket.socket, events: int) -> None:
        try:
            key = sel.get_key(s)
        except KeyError:
            if events:
                sel.register(s, events)
            return
        if not events:
            sel.unregister(s)
        elif key.events != events:
            sel.modify(s, events)

    @staticmethod
    def _read_tls(tls: ssl.SSLSocket, into: bytearray) -> bool:
        """Read what is there; True at end of stream."""
        try:
            data = tls.recv(_BUF)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except ssl.SSLZeroReturnError:
            return True
        except (ssl.SSLEOFError, ConnectionError):
            return True
        if not data:
            return True
        into += data
        return False

    @staticmethod
    def _read_plain(s: socket.socket, into: bytearray) -> bool:
        try:
            data = s.recv(_BUF)
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        if not data:
            return True
        into += data
        return False

    @staticmethod
    def _write(s: socket.socket, buf: bytearray) -> None:
        try:
            n = s.send(bytes(buf[:_BUF]))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        del buf[:n]


def load_front_from_dir(
    material_dir: Path,
    bind_host: str,
    port: int,
    upstream_port: int,
    **kwargs: Any,
) -> TlsFront:
    """A front from ``server.crt``/``server.key``/``client-ca.crt`` in ``material_dir``
    (the agent keeps them in its tmpfs); upstream is always the loopback gateway."""
    return TlsFront(
        bind_host,
        port,
        "127.0.0.1",
        upstream_port,
        (material_dir / "server.crt").read_text(encoding="ascii"),
        (material_dir / "server.key").read_text(encoding="ascii"),
        (material_dir / "client-ca.crt").read_text(encoding="ascii"),
        **kwargs,
    )
