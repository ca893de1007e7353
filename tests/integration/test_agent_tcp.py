"""The real guest agent as a subprocess on loopback, driven through AgentClient.

The agent runs with ``python -S -E -s`` from its own directory, exactly as it is
installed in the guest (side by side with tls_front.py, no site-packages): this proves
it needs nothing but the standard library. The guest address is 127.0.0.2 so that the
TLS front (guest address) and the gateway (127.0.0.1) can share the gateway port, as
they do in a VM. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lobsterd.adapters.agent_client import AgentClient
from lobsterd.errors import AgentRejected
from lobsterd.guest import agent as guest_agent
from tests.helpers import need

pytestmark = pytest.mark.integration

GUEST_DIR = Path(guest_agent.__file__).parent
GIP = "127.0.0.2"
TOKEN = "integration-agent-token"
GW_TOKEN = "integration-gateway-token"
# Built at run time: no key-shaped literal is committed.
PROVIDER_KEY = "sk" + "-provider-" + secrets.token_hex(12)


def free_port() -> int:
    """A port free on both the guest address and 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind((GIP, 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


@dataclass
class Guest:
    root: Path
    proc: subprocess.Popen[bytes]
    client: AgentClient
    agent_port: int
    health_port: int
    gateway_port: int
    ready_s: float

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid_file = self.root / "run" / "gateway.pid"
        if pid_file.exists():  # the agent should have stopped it; make sure
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def start_guest(root: Path, *, read_timeout_s: float = 3.0) -> Guest:
    root.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(3)]
    (root / "cmdline").write_text(
        f"quiet lobster.ip={GIP}/30 lobster.gw=127.0.0.1 "
        f"lobster.agent_hash={guest_agent.token_hash(TOKEN)} lobster.agent_port={ports[0]} "
        f"lobster.health_port={ports[1]} lobster.gateway_port={ports[2]} lobster.name=alpha\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LOBSTER_CMDLINE_FILE": str(root / "cmdline"),
        "LOBSTER_GUEST_ROOT": str(root / "guest"),
        "LOBSTER_LOG_DIR": str(root / "log"),
        "LOBSTER_RUN_DIR": str(root / "run"),
        "LOBSTER_GATEWAY_CMD": f"{sys.executable} -S -E -s {GUEST_DIR / 'gateway_standin.py'}",
        "LOBSTER_SHUTDOWN_ACTION": "exit",
        "LOBSTER_CLOCK": "file",
        "LOBSTER_READ_TIMEOUT_S": str(read_timeout_s),
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-S", "-E", "-s", str(GUEST_DIR / "agent.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = AgentClient(GIP, ports[0], ports[1], TOKEN, timeout_s=5)
    try:
        client.wait_ready(timeout_s=15, interval_s=0.05)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return Guest(
        root,
        proc,
        client,
        agent_port=ports[0],
        health_port=ports[1],
        gateway_port=ports[2],
        ready_s=time.monotonic() - t0,
    )


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    g = start_guest(tmp_path_factory.mktemp("guest"))
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture(scope="module")
def gateway_up(guest: Guest) -> Guest:
    guest.client.inject_secrets(
        {
            "OPENCLAW_GATEWAY_TOKEN": GW_TOKEN,
            "OPENCLAW_CONFIG": json.dumps({"gateway": {"mode": "local"}}),
            "SSH_AUTHORIZED_KEY": "ssh-ed25519 AAAAC3Nza test@host",
            "ANTHROPIC_API_KEY": PROVIDER_KEY,
        }
    )
    wait_http(guest.gateway_port)
    return guest


def wait_http(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "gateway never listened"
            time.sleep(0.05)


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def ws_open(sock: socket.socket, path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "connection closed during the handshake"
        head += chunk
    return head


def ws_send_text(sock: socket.socket, text: str) -> None:
    payload = text.encode()
    mask = os.urandom(4)
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)


def ws_recv(sock: socket.socket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            assert chunk, "connection closed mid-frame"
            out += chunk
        return out

    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", exact(2))
    return b0 & 0x0F, exact(n)


# --------------------------------------------------------------------------- basics


def test_agent_is_ready_quickly_and_answers(guest: Guest) -> None:
    assert guest.ready_s < 5.0
    assert guest.client.health_ping() is True
    assert "lobster.name=alpha" in guest.client.get_cmdline()


def test_agent_listens_on_the_guest_address_only(guest: Guest) -> None:
    for port in (guest.agent_port, guest.health_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 1).close()


def test_wrong_token_is_rejected_and_logged(guest: Guest) -> None:
    bad = AgentClient(GIP, guest.agent_port, guest.health_port, "wrong-token", timeout_s=2)
    with pytest.raises(AgentRejected, match="unauthorized"):
        bad.get_stats()
    assert bad.health_ping() is False
    log = guest.client.get_logs("agent", 64 * 1024)
    assert "rejected request" in log and "bad token" in log
    assert "wrong-token" not in log


def test_set_time_and_holds(guest: Guest) -> None:
    guest.client.set_time(1_800_000_000_321)
    assert (guest.root / "run" / "clock").read_text().strip() == "1800000000321"
    guest.client.hold_acquire("it-hold", ttl_s=30)
    assert guest.client.active_connections()["hold"] == 1
    guest.client.hold_release("it-hold")
    assert guest.client.active_connections()["hold"] == 0


# --------------------------------------------------------------------------- gateway


def test_inject_secrets_starts_the_standin_gateway(gateway_up: Guest) -> None:
    g = gateway_up
    status, body = http_get(g.gateway_port, "/")
    assert (status, body) == (200, {"gateway": "standin", "tenant": "alpha", "ok": True})
    assert http_get(g.gateway_port, "/api/status")[0] == 401
    assert http_get(g.gateway_port, "/api/status", {"Authorization": "Bearer nope"})[0] == 401
    status, body = http_get(g.gateway_port, "/api/status", {"Authorization": f"Bearer {GW_TOKEN}"})
    assert status == 200 and body["path"] == "/api/status"
    ensure = g.client.ensure_gateway()
    assert ensure["status"] == "running"
    stats = g.client.get_stats()
    assert stats["gateway_pid"] == ensure["pid"]
    assert stats["gateway_rss_kb"] > 0
    assert stats["mem_total_kb"] > 0 and len(stats["load_avg"]) == 3
    home = g.root / "guest" / "root"
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAC3Nza test@host\n"
    assert json.loads((home / ".openclaw" / "openclaw.json").read_text())["gateway"]
    assert "listening on 127.0.0.1" in g.client.get_logs("gateway")
    agent_log = g.client.get_logs("agent", 64 * 1024)
    assert "inject-secrets" in agent_log
    for secret in (GW_TOKEN, PROVIDER_KEY, TOKEN):
        assert secret not in agent_log
        assert secret not in g.client.get_logs("gateway", 64 * 1024)


def test_websocket_echo_is_counted_as_activity(gateway_up: Guest) -> None:
    g = gateway_up
    with socket.create_connection(("127.0.0.1", g.gateway_port), 5) as ws:
        head = ws_open(ws)
        assert head.startswith(b"HTTP/1.1 101")
        ws_send_text(ws, "hello lobster")
        assert ws_recv(ws) == (0x1, b"hello lobster")
        conns = g.client.active_connections()
        assert conns["tcp_loopback"] >= 1 and conns["tcp"] >= 1
    deadline = time.monotonic() + 5
    while g.client.active_connections()["tcp_loopback"] != 0:
        assert time.monotonic() < deadline, "closed connection still counted"
        time.sleep(0.05)


def test_websocket_on_api_path_needs_the_token(gateway_up: Guest) -> None:
    with socket.create_connection(("127.0.0.1", gateway_up.gateway_port), 5) as ws:
        assert ws_open(ws, "/api/ws").startswith(b"HTTP/1.1 401")


def test_gateway_is_restarted_after_a_crash(gateway_up: Guest) -> None:
    g = gateway_up
    before = g.client.get_stats()
    os.kill(before["gateway_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        stats = g.client.get_stats()
        if stats["gateway_pid"] not in (None, before["gateway_pid"]):
            break
        assert time.monotonic() < deadline, "gateway was not restarted"
        time.sleep(0.1)
    assert stats["gateway_restarts"] == before["gateway_restarts"] + 1
    wait_http(g.gateway_port)
    assert http_get(g.gateway_port, "/")[0] == 200


# --------------------------------------------------------------------------- robustness


def test_slowloris_does_not_block_other_clients(guest: Guest) -> None:
    stop = threading.Event()
    slow_reply: list[bytes] = []

    def slowloris() -> None:
        with socket.create_connection((GIP, guest.agent_port), 10) as s:
            with contextlib.suppress(OSError):  # the agent gives up on us: expected
                for ch in b'{"type": "health-ping", "token": "' * 2:
                    if stop.is_set():
                        break
                    s.sendall(bytes([ch]))
                    time.sleep(0.05)
            s.settimeout(10)
            with contextlib.suppress(OSError):
                slow_reply.append(s.recv(4096))

    idle = [socket.create_connection((GIP, guest.agent_port), 5) for _ in range(20)]
    t = threading.Thread(target=slowloris)
    t.start()
    try:
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            assert guest.client.health_ping()
            assert guest.client.active_connections()["cron"] == 0
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.5, f"a request took {worst:.2f}s while slow clients were connected"
        t.join(10)
        assert slow_reply and json.loads(slow_reply[0]) == {
            "error": "timed out reading the request"
        }
    finally:
        stop.set()
        t.join(10)
        for s in idle:
            s.close()


def test_garbage_and_oversized_requests_keep_the_agent_serving(guest: Guest) -> None:
    for raw in (b"\x00\xff" * 100 + b"\n", b"{" * 10000 + b"\n", b"x" * (1024 * 1024 + 5)):
        with socket.create_connection((GIP, guest.agent_port), 5) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert set(json.loads(data)) == {"error"}
    assert guest.client.health_ping()
    assert guest.proc.poll() is None


# --------------------------------------------------------------------------- TLS front


def _tls_material(tmp: Path) -> tuple[str, str, str, Path, Path, str]:
    from lobsterd.security.ca import HostCA

    ca = HostCA(tmp / "ca", caddy_group=None)
    ca.ensure()
    server = ca.issue_server("alpha", "10.200.0.6")
    client_cert, client_key = ca.client_cert()
    return server.cert_pem, server.key_pem, ca.ca_pem(), client_cert, client_key, server.server_name


def test_tls_front_requires_a_client_certificate(gateway_up: Guest, tmp_path: Path) -> None:
    g = gateway_up
    need((GUEST_DIR / "tls_front.py").exists(), "needs src/lobsterd/guest/tls_front.py")
    cert, key, ca_pem, client_cert, client_key, server_name = _tls_material(tmp_path)
    reply = g.client.request(
        "inject-secrets",
        secrets={"TLS_SERVER_CERT": cert, "TLS_SERVER_KEY": key, "TLS_CLIENT_CA": ca_pem},
    )
    assert reply["tls"] == "started"
    assert (g.root / "run" / "tls" / "server.key").stat().st_mode & 0o777 == 0o600

    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.load_cert_chain(client_cert, client_key)
    with (
        socket.create_connection((GIP, g.gateway_port), 5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: alpha\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
            conns = g.client.active_connections()
        assert data.startswith(b"HTTP/1.1 200")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["tenant"] == "alpha"
    assert conns["tcp_front"] >= 1

    anon = ssl.create_default_context(cadata=ca_pem)
    with (
        socket.create_connection((GIP, g.gateway_port), 5) as raw,
        pytest.raises((ssl.SSLError, OSError)),
        anon.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: alpha\r\n\r\n")
        tls.recv(1024)  # TLS 1.3 reports the refusal on the first read

    again = g.client.request("inject-secrets", secrets={"TLS_SERVER_CERT": cert})
    assert again["tls"] == "reloaded"


# --------------------------------------------------------------------------- shutdown


def test_shutdown_replies_then_stops_gateway_and_exits(tmp_path: Path) -> None:
    g = start_guest(tmp_path / "g2")
    try:
        g.client.inject_secrets({"OPENCLAW_GATEWAY_TOKEN": GW_TOKEN})
        pid = g.client.ensure_gateway()["pid"]
        g.client.shutdown()
        assert g.proc.wait(10) == 0
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
    finally:
        g.stop()
