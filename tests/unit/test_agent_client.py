"""AgentClient against a scripted fake agent on loopback: framing, validation, timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lobsterd.adapters.agent_client import AgentClient, sanitize
from lobsterd.errors import AgentRejected, AgentUnreachable

TOKEN = "host-side-token-42"
Responder = Callable[[dict[str, Any]], bytes | None]


class FakeAgent:
    """Answers each connection with ``respond(request)``; None = never answer."""

    def __init__(self, respond: Responder, *, port: int = 0) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(5)
        try:
            while b"\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if not buf:
                return  # a bare connect (a readiness probe) sends nothing
            self.raw.append(buf)
            try:
                req = json.loads(buf)
            except ValueError:
                return  # not a request (a probe or a torn write): just close
            self.requests.append(req)
            out = self.respond(req)
            if out is None:
                self._stop.wait(10)
                return
            conn.sendall(out)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            c.close()


def reply(obj: Any) -> Responder:
    data = json.dumps(obj).encode() + b"\n"
    return lambda _req: data


@pytest.fixture
def fake() -> Iterator[Callable[[Responder], FakeAgent]]:
    made: list[FakeAgent] = []

    def make(respond: Responder) -> FakeAgent:
        f = FakeAgent(respond)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def client_for(f: FakeAgent, timeout_s: float = 2.0) -> AgentClient:
    return AgentClient("127.0.0.1", f.port, f.port, TOKEN, timeout_s=timeout_s)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


# --------------------------------------------------------------------------- framing


def test_request_wire_format(fake: Callable[[Responder], FakeAgent]) -> None:
    f = fake(reply({"ok": True, "holds": 1}))
    client_for(f).hold_acquire("op-1", 2.5)
    assert f.raw[0].endswith(b"\n") and f.raw[0].count(b"\n") == 1
    assert f.requests == [
        {"type": "hold-acquire", "hold_id": "op-1", "ttl_ms": 2500, "token": TOKEN}
    ]


def test_request_refuses_to_override_type_or_token(
    fake: Callable[[Responder], FakeAgent],
) -> None:
    c = client_for(fake(reply({"ok": True})))
    with pytest.raises(ValueError):
        c.request("health-ping", token="other")


def test_error_reply_raises_rejected_with_sanitised_text(
    fake: Callable[[Responder], FakeAgent],
) -> None:
    c = client_for(fake(reply({"error": "no gateway token\x1b[2J\r"})))
    with pytest.raises(AgentRejected) as ei:
        c.ensure_gateway()
    assert ei.value.message == "agent refused ensure-gateway: no gateway token[2J"
    assert TOKEN not in str(ei.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"ACK\n",  # bare text: the old substring protocol is not accepted
        b"PONG\n",
        b'"ok"\n',
        b"[1]\n",
        b"",
        b'{"ok": "true", "status": "PONG"}\n',
        b'{"status": "PONG"}\n',
        b"\xff\n",
    ],
)
def test_malformed_replies_are_unreachable(
    fake: Callable[[Responder], FakeAgent], raw: bytes
) -> None:
    f = fake(lambda _r: raw)
    c = client_for(f)
    with pytest.raises(AgentUnreachable):
        c.request("health-ping")
    assert c.health_ping() is False


def test_health_ping_needs_the_exact_pong(fake: Callable[[Responder], FakeAgent]) -> None:
    assert client_for(fake(reply({"ok": True, "status": "PONG"}))).health_ping() is True
    assert client_for(fake(reply({"ok": True, "status": "PONGX"}))).health_ping() is False
    assert client_for(fake(reply({"ok": True, "status": "NOT PONG"}))).health_ping() is False
    assert client_for(fake(reply({"error": "unauthorized"}))).health_ping() is False


def test_health_ping_sends_only_the_token(fake: Callable[[Responder], FakeAgent]) -> None:
    f = fake(reply({"ok": True, "status": "PONG"}))
    assert client_for(f).health_ping()
    assert f.requests == [{"token": TOKEN}]


def test_connection_refused_is_unreachable() -> None:
    c = AgentClient("127.0.0.1", closed_port(), closed_port(), TOKEN, timeout_s=1)
    with pytest.raises(AgentUnreachable, match="cannot connect"):
        c.get_stats()
    assert c.health_ping() is False


def test_silent_agent_times_out(fake: Callable[[Responder], FakeAgent]) -> None:
    c = client_for(fake(lambda _r: None), timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(AgentUnreachable, match="did not answer"):
        c.get_stats()
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    with pytest.raises(AgentUnreachable):
        c.request("get-stats", timeout_s=0.1)
    assert time.monotonic() - t0 < 0.6


def test_oversized_reply_is_refused(fake: Callable[[Responder], FakeAgent]) -> None:
    huge = b'{"ok": true, "text": "' + b"a" * (2 * 1024 * 1024) + b'"}\n'
    with pytest.raises(AgentUnreachable, match="oversized"):
        client_for(fake(lambda _r: huge)).get_logs()


def test_token_never_in_repr(fake: Callable[[Responder], FakeAgent]) -> None:
    c = client_for(fake(reply({"ok": True})))
    assert TOKEN not in repr(c)


# --------------------------------------------------------------------------- typed methods

GOOD_STATS = {
    "ok": True,
    "gateway_pid": 321,
    "gateway_rss_kb": 5000,
    "gateway_restarts": 0,
    "mem_total_kb": 1000000,
    "mem_available_kb": 500000,
    "load_avg": [0.1, 0, 2],
    "uptime_s": 12,
}


def test_get_stats_valid(fake: Callable[[Responder], FakeAgent]) -> None:
    stats = client_for(fake(reply(GOOD_STATS))).get_stats()
    assert stats["gateway_pid"] == 321
    assert stats["load_avg"] == [0.1, 0.0, 2.0]
    assert stats["uptime_s"] == 12.0
    assert "ok" not in stats


@pytest.mark.parametrize(
    "patch",
    [
        {"gateway_pid": "321"},
        {"gateway_pid": True},
        {"gateway_pid": -1},
        {"gateway_rss_kb": -5},
        {"gateway_rss_kb": 1.5},
        {"mem_total_kb": None},
        {"load_avg": "0.1 0.2"},
        {"load_avg": [True]},
        {"uptime_s": "12"},
    ],
)
def test_get_stats_rejects_bad_fields(
    fake: Callable[[Responder], FakeAgent], patch: dict[str, Any]
) -> None:
    with pytest.raises(AgentUnreachable, match="malformed"):
        client_for(fake(reply({**GOOD_STATS, **patch}))).get_stats()


def test_get_stats_allows_no_gateway(fake: Callable[[Responder], FakeAgent]) -> None:
    stats = client_for(fake(reply({**GOOD_STATS, "gateway_pid": None}))).get_stats()
    assert stats["gateway_pid"] is None


def test_inject_secrets_requires_full_acknowledgement(
    fake: Callable[[Responder], FakeAgent],
) -> None:
    ok = fake(
        lambda r: (json.dumps({"ok": True, "accepted": sorted(r["secrets"])}) + "\n").encode()
    )
    client_for(ok).inject_secrets({"B": "2", "A": "1"})
    assert ok.requests[0]["secrets"] == {"B": "2", "A": "1"}
    partial = fake(reply({"ok": True, "accepted": ["A"]}))
    with pytest.raises(AgentUnreachable):
        client_for(partial).inject_secrets({"B": "2", "A": "1"})


def test_get_logs_sanitises_and_validates(fake: Callable[[Responder], FakeAgent]) -> None:
    f = fake(reply({"ok": True, "service": "agent", "text": "line1\n\x1b]0;pwned\x07line2\x9b"}))
    c = client_for(f)
    assert c.get_logs("agent", 100) == "line1\n]0;pwnedline2"
    assert f.requests[0] == {
        "type": "get-logs",
        "service": "agent",
        "max_chars": 100,
        "token": TOKEN,
    }
    with pytest.raises(ValueError):
        c.get_logs("kernel")
    with pytest.raises(ValueError):
        c.get_logs("agent", 10**6)
    with pytest.raises(AgentUnreachable):
        client_for(fake(reply({"ok": True, "text": 5}))).get_logs()


def test_get_logs_never_longer_than_asked(fake: Callable[[Responder], FakeAgent]) -> None:
    assert len(client_for(fake(reply({"ok": True, "text": "x" * 500}))).get_logs("agent", 10)) == 10


def test_set_time_sends_now_in_ms(fake: Callable[[Responder], FakeAgent]) -> None:
    f = fake(lambda r: (json.dumps({"ok": True, "epoch_ms": r["epoch_ms"]}) + "\n").encode())
    before = time.time_ns() // 1_000_000
    client_for(f).set_time()
    after = time.time_ns() // 1_000_000
    assert before <= f.requests[0]["epoch_ms"] <= after
    client_for(f).set_time(1234)
    assert f.requests[1]["epoch_ms"] == 1234
    with pytest.raises(AgentUnreachable):
        client_for(fake(reply({"ok": True, "epoch_ms": 1}))).set_time(1234)


def test_ensure_gateway(fake: Callable[[Responder], FakeAgent]) -> None:
    good = reply({"ok": True, "status": "started", "pid": 99})
    assert client_for(fake(good)).ensure_gateway() == {"status": "started", "pid": 99}
    with pytest.raises(AgentUnreachable):
        client_for(fake(reply({"ok": True, "status": "launched", "pid": 99}))).ensure_gateway()


def test_holds(fake: Callable[[Responder], FakeAgent]) -> None:
    f = fake(lambda r: (json.dumps({"ok": True, "released": True}) + "\n").encode())
    client_for(f).hold_release("h")
    assert f.requests[0] == {"type": "hold-release", "hold_id": "h", "token": TOKEN}
    with pytest.raises(AgentUnreachable):
        client_for(fake(reply({"ok": True, "holds": 0}))).hold_acquire("h", 1)


def test_active_connections(fake: Callable[[Responder], FakeAgent]) -> None:
    r = {"ok": True, "tcp": 3, "tcp_front": 1, "tcp_loopback": 2, "cron": 0, "hold": 1}
    assert client_for(fake(reply(r))).active_connections() == {
        "tcp": 3,
        "tcp_front": 1,
        "tcp_loopback": 2,
        "cron": 0,
        "hold": 1,
    }
    for bad in ({"tcp": -1}, {"hold": "1"}, {"cron": None}, {"tcp": 2**40}, {"tcp_front": -2}):
        with pytest.raises(AgentUnreachable):
            client_for(fake(reply({**r, **bad}))).active_connections()


def test_cmdline_and_shutdown(fake: Callable[[Responder], FakeAgent]) -> None:
    assert client_for(fake(reply({"ok": True, "cmdline": "quiet\n"}))).get_cmdline() == "quiet\n"
    client_for(fake(reply({"ok": True, "status": "shutting-down"}))).shutdown()
    with pytest.raises(AgentUnreachable):
        client_for(fake(reply({"ok": True}))).shutdown()


# --------------------------------------------------------------------------- wait_ready


def test_wait_ready_notices_a_late_agent_quickly() -> None:
    port = closed_port()
    made: list[FakeAgent] = []
    listening_at: list[float] = []

    def start_later() -> None:
        time.sleep(0.6)
        made.append(FakeAgent(reply({"ok": True, "status": "PONG"}), port=port))
        listening_at.append(time.monotonic())

    t = threading.Thread(target=start_later)
    t.start()
    try:
        c = AgentClient("127.0.0.1", port, port, TOKEN, timeout_s=2)
        waited = c.wait_ready(timeout_s=5, interval_s=0.05)
        noticed = time.monotonic()
        t.join()
        assert 0.5 <= waited < 2.0
        assert noticed - listening_at[0] < 0.3
    finally:
        t.join()
        for f in made:
            f.close()


def test_wait_ready_times_out() -> None:
    c = AgentClient("127.0.0.1", closed_port(), closed_port(), TOKEN, timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(AgentUnreachable, match="not ready after 0.4s"):
        c.wait_ready(timeout_s=0.4)
    assert 0.35 <= time.monotonic() - t0 < 1.0


def test_wait_ready_does_not_retry_a_wrong_token(fake: Callable[[Responder], FakeAgent]) -> None:
    f = fake(reply({"error": "unauthorized"}))
    t0 = time.monotonic()
    with pytest.raises(AgentRejected):
        client_for(f).wait_ready(timeout_s=5)
    assert time.monotonic() - t0 < 1.0
    assert len(f.requests) == 1


def test_wait_ready_bounded_by_a_silent_agent(fake: Callable[[Responder], FakeAgent]) -> None:
    c = client_for(fake(lambda _r: None), timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(AgentUnreachable):
        c.wait_ready(timeout_s=0.5)
    assert time.monotonic() - t0 < 1.0


def test_sanitize() -> None:
    assert sanitize("a\tb\nc\x1b[0m\x00\x7f\x85d") == "a\tb\nc[0md"
    assert sanitize("abcdef", 3) == "abc"
