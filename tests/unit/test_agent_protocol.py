"""The guest agent's message handling, framing and listeners (in-process, loopback only)."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lobsterd.guest import agent as ag

TOKEN = "correct horse battery staple"
GW_PORT = 9000


def make_agent(tmp_path: Path, *, agent_hash: str | None = None, **kw: Any) -> ag.Agent:
    settings_kw: dict[str, Any] = {
        "cmdline_file": tmp_path / "cmdline",
        "guest_root": tmp_path / "guest",
        "log_dir": tmp_path / "log",
        "run_dir": tmp_path / "run",
        "proc_root": tmp_path / "proc",
        "clock": "file",
        "shutdown_action": "exit",
        "read_timeout_s": 1.0,
    }
    settings_kw.update(kw)
    (tmp_path / "cmdline").write_text("quiet lobster.name=alpha lobster.ip=127.0.0.1/30\n")
    params = ag.BootParams(
        ip=ipaddress.IPv4Address("127.0.0.1"),
        agent_hash=ag.token_hash(TOKEN) if agent_hash is None else agent_hash,
        agent_port=0,
        health_port=0,
        gateway_port=GW_PORT,
        name="alpha",
    )
    return ag.Agent(ag.Settings(**settings_kw), params, power_off=lambda: None)


def call(agent: ag.Agent, msg: dict[str, Any], *, health: bool = False) -> dict[str, Any]:
    reply = agent.handle(json.dumps(msg).encode(), health=health)
    json.dumps(reply)  # always serialisable
    return dict(reply)


def authed(agent: ag.Agent, mtype: str, **fields: Any) -> dict[str, Any]:
    return call(agent, {"type": mtype, "token": TOKEN, **fields})


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ag.Agent]:
    a = make_agent(tmp_path)
    try:
        yield a
    finally:
        a.close()


# --------------------------------------------------------------------------- boot params


def test_boot_params_from_cmdline() -> None:
    h = ag.token_hash("x")
    p = ag.BootParams.from_cmdline(
        f"quiet lobster.ip=10.0.0.6/30 lobster.gw=10.0.0.5 lobster.agent_hash={h.upper()} "
        "lobster.agent_port=5052 lobster.health_port=5053 lobster.gateway_port=9100 "
        "lobster.name=bob other=a=b"
    )
    assert str(p.ip) == "10.0.0.6"
    assert p.agent_hash == h  # normalised to lower case
    assert (p.agent_port, p.health_port, p.gateway_port) == (5052, 5053, 9100)
    assert p.name == "bob"
    assert ag.parse_cmdline("other=a=b flag")["other"] == "a=b"


def test_boot_params_defaults_and_bad_hash() -> None:
    p = ag.BootParams.from_cmdline("lobster.ip=10.0.0.6/30 lobster.agent_hash=nothex")
    assert p.agent_hash is None
    assert (p.agent_port, p.health_port, p.gateway_port) == (52, 53, 9000)


@pytest.mark.parametrize("cmdline", ["quiet", "lobster.ip=", "lobster.ip=not-an-ip/30"])
def test_boot_params_refuse_missing_address(cmdline: str) -> None:
    with pytest.raises(ValueError):
        ag.BootParams.from_cmdline(cmdline)


def test_settings_from_env() -> None:
    s = ag.Settings.from_env(
        {
            "LOBSTER_GUEST_ROOT": "/g",
            "LOBSTER_GATEWAY_CMD": "python3 -u '/x y/gw.py'",
            "LOBSTER_SHUTDOWN_ACTION": "exit",
        }
    )
    assert s.home == Path("/g/root")
    assert s.gateway_cmd == ("python3", "-u", "/x y/gw.py")
    assert s.shutdown_action == "exit"
    assert ag.Settings.from_env({}).cmdline_file == Path("/proc/cmdline")
    with pytest.raises(ValueError):
        ag.Settings.from_env({"LOBSTER_SHUTDOWN_ACTION": "reboot"})


# --------------------------------------------------------------------------- auth


def test_auth_ok_on_both_ports(agent: ag.Agent) -> None:
    assert call(agent, {"token": TOKEN}, health=True) == {"ok": True, "status": "PONG"}
    assert authed(agent, "health-ping") == {"ok": True, "status": "PONG"}


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "health-ping"},
        {"type": "health-ping", "token": None},
        {"type": "health-ping", "token": 12},
        {"type": "health-ping", "token": ""},
        {"type": "health-ping", "token": TOKEN + "x"},
        {"type": "health-ping", "token": TOKEN.upper()},
        {"type": "shutdown", "token": ag.token_hash(TOKEN)},  # the hash is not the token
    ],
)
def test_auth_rejects(
    agent: ag.Agent, msg: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lobster-agent")
    assert call(agent, msg) == {"error": "unauthorized"}
    assert call(agent, msg, health=True) == {"error": "unauthorized"}
    assert "rejected request" in caplog.text
    if isinstance(msg.get("token"), str) and msg["token"]:
        assert msg["token"] not in caplog.text


def test_no_hash_rejects_everything(tmp_path: Path) -> None:
    a = make_agent(tmp_path, agent_hash="")
    a.params = ag.BootParams(a.params.ip, None, 0, 0, GW_PORT, "alpha")
    assert authed(a, "health-ping") == {"error": "unauthorized"}
    assert call(a, {"token": TOKEN}, health=True) == {"error": "unauthorized"}
    assert call(a, {"token": ""}, health=True) == {"error": "unauthorized"}


def test_unauthenticated_unknown_type_is_unauthorized(agent: ag.Agent) -> None:
    assert call(agent, {"type": "bogus"}) == {"error": "unauthorized"}


# --------------------------------------------------------------------------- decoding


def test_bad_json_gets_parser_message(agent: ag.Agent) -> None:
    reply = agent.handle(b'{"type": ')
    try:
        json.loads('{"type": ')
    except json.JSONDecodeError as exc:
        expected = str(exc)
    assert reply == {"error": expected}


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"[1, 2]", "message must be a JSON object"),
        (b'"PONG"', "message must be a JSON object"),
        (b"\xff\xfe{}", "message is not valid UTF-8"),
        (b"[" * 200_000, "message is nested too deeply"),
    ],
)
def test_malformed_messages(agent: ag.Agent, raw: bytes, error: str) -> None:
    assert agent.handle(raw) == {"error": error}


def test_huge_integer_is_an_error_not_a_crash(agent: ag.Agent) -> None:
    reply = agent.handle(b'{"n": ' + b"9" * 50_000 + b"}")
    assert set(reply) == {"error"}


def test_unknown_and_missing_type(agent: ag.Agent) -> None:
    assert authed(agent, "launch-rockets") == {"error": "unknown message type: launch-rockets"}
    assert call(agent, {"token": TOKEN}) == {"error": "missing message type"}
    weird = authed(agent, "\x1b[31mred\n")
    assert "\x1b" not in weird["error"] and "\n" not in weird["error"]


def test_handler_exception_becomes_error_reply(agent: ag.Agent) -> None:
    def boom(_m: dict[str, Any]) -> ag._Reply:
        raise RuntimeError("secret-ish detail")

    agent._handlers["get-stats"] = boom
    assert authed(agent, "get-stats") == {"error": "internal error: RuntimeError"}


# --------------------------------------------------------------------------- inject-secrets


def _env_dump_gateway(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "gw.py"
    script.write_text(
        "import json, os, sys, time\n"
        f"json.dump(dict(os.environ), open({str(tmp_path / 'env.json')!r}, 'w'))\n"
        "print('gateway says hi', flush=True)\n"
        "time.sleep(60)\n"
    )
    return (sys.executable, str(script))


def _wait_for(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_size == 0:
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    time.sleep(0.05)


def test_inject_secrets_writes_files_privately_and_starts_gateway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a = make_agent(tmp_path, gateway_cmd=_env_dump_gateway(tmp_path))
    try:
        cfg = json.dumps({"gateway": {"mode": "local"}})
        secrets = {
            "OPENCLAW_GATEWAY_TOKEN": "gw-token-value-1",
            "OPENCLAW_CONFIG": cfg,
            "SSH_AUTHORIZED_KEY": "ssh-ed25519 AAAAkey user@host",
            "TLS_SERVER_KEY": "-----BEGIN " + "PRIVATE KEY-----\nsecret-key-material\n",
            "ANTHROPIC_API_KEY": "provider-key-value-2",
        }
        reply = authed(a, "inject-secrets", secrets=secrets)
        assert reply["ok"] is True
        assert reply["accepted"] == sorted(secrets)
        assert reply["gateway"] == "started"
        assert reply["tls"] == "incomplete"  # only one of three TLS parts so far

        home = tmp_path / "guest" / "root"
        oc = home / ".openclaw" / "openclaw.json"
        assert json.loads(oc.read_text()) == {"gateway": {"mode": "local"}}
        assert stat.S_IMODE(oc.stat().st_mode) == 0o600
        ak = home / ".ssh" / "authorized_keys"
        assert ak.read_text() == "ssh-ed25519 AAAAkey user@host\n"
        assert stat.S_IMODE(ak.stat().st_mode) == 0o600
        assert stat.S_IMODE(ak.parent.stat().st_mode) == 0o700
        key = tmp_path / "run" / "tls" / "server.key"
        assert key.read_text() == secrets["TLS_SERVER_KEY"]
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

        _wait_for(tmp_path / "env.json")
        env = json.loads((tmp_path / "env.json").read_text())
        assert env["OPENCLAW_GATEWAY_TOKEN"] == "gw-token-value-1"
        assert env["OPENCLAW_GATEWAY_PORT"] == str(GW_PORT)
        assert env["ANTHROPIC_API_KEY"] == "provider-key-value-2"
        assert env["HOME"] == str(home)
        for reserved in ("OPENCLAW_CONFIG", "SSH_AUTHORIZED_KEY", "TLS_SERVER_KEY"):
            assert reserved not in env
        pid = a.gateway.pid
        assert pid is not None

        # Same secrets again: nothing changes; a new provider key restarts the gateway.
        again = authed(a, "inject-secrets", secrets={"ANTHROPIC_API_KEY": "provider-key-value-2"})
        assert again["gateway"] == "running" and a.gateway.pid == pid
        (tmp_path / "env.json").unlink()
        changed = authed(a, "inject-secrets", secrets={"OTHER_KEY": "v3"})
        assert changed["gateway"] == "restarted" and a.gateway.pid != pid
        _wait_for(tmp_path / "env.json")
        assert json.loads((tmp_path / "env.json").read_text())["OTHER_KEY"] == "v3"
    finally:
        a.close()
    for value in ("gw-token-value-1", "provider-key-value-2", "secret-key-material"):
        assert value not in caplog.text


@pytest.mark.parametrize(
    ("secrets", "error"),
    [
        ("nope", "secrets must be an object of string values"),
        ({"A": 1}, "secrets must be an object of string values"),
        ({"BAD-NAME": "x"}, "invalid secret name: BAD-NAME"),
        ({"1ABC": "x"}, "invalid secret name: 1ABC"),
        ({"A": "x\0y"}, "secret A contains a NUL character"),
        ({"OPENCLAW_CONFIG": "{not json"}, "OPENCLAW_CONFIG is not valid JSON"),
        ({"OPENCLAW_CONFIG": "[1]"}, "OPENCLAW_CONFIG must be a JSON object"),
    ],
)
def test_inject_secrets_validation(agent: ag.Agent, secrets: object, error: str) -> None:
    assert authed(agent, "inject-secrets", secrets=secrets) == {"error": error}
    assert agent._state.secrets == {}  # nothing half-applied


def test_tls_material_without_front_module_is_an_error(
    agent: ag.Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ag, "_load_tls_front", lambda: None)
    tls = {"TLS_SERVER_CERT": "c", "TLS_SERVER_KEY": "k", "TLS_CLIENT_CA": "ca"}
    reply = authed(agent, "inject-secrets", secrets=tls)
    assert reply["error"].startswith("TLS front unavailable")


def test_bad_tls_material_is_an_error_without_echoing_it(agent: ag.Agent) -> None:
    tls = {"TLS_SERVER_CERT": "c", "TLS_SERVER_KEY": "not-a-key-SECRET", "TLS_CLIENT_CA": "ca"}
    reply = authed(agent, "inject-secrets", secrets=tls)
    assert reply["error"].startswith("TLS front failed")
    assert "SECRET" not in reply["error"]


def test_inject_without_token_does_not_start_gateway(agent: ag.Agent) -> None:
    reply = authed(agent, "inject-secrets", secrets={"SOME_KEY": "v"})
    assert reply["gateway"] == "no-token"
    assert agent.gateway.pid is None


def test_inject_reports_missing_gateway_binary(tmp_path: Path) -> None:
    a = make_agent(tmp_path, gateway_cmd=(str(tmp_path / "missing-gateway"),))
    reply = authed(a, "inject-secrets", secrets={"OPENCLAW_GATEWAY_TOKEN": "t"})
    assert reply["error"].startswith("cannot start the gateway")
    a.close()


# --------------------------------------------------------------------------- gateway


def test_ensure_gateway(tmp_path: Path) -> None:
    a = make_agent(tmp_path, gateway_cmd=_env_dump_gateway(tmp_path))
    try:
        assert authed(a, "ensure-gateway") == {
            "error": "no gateway token: inject OPENCLAW_GATEWAY_TOKEN first"
        }
        a._state.secrets["OPENCLAW_GATEWAY_TOKEN"] = "t"
        first = authed(a, "ensure-gateway")
        assert first["status"] == "started" and isinstance(first["pid"], int)
        second = authed(a, "ensure-gateway")
        assert second == {"ok": True, "status": "running", "pid": first["pid"]}
    finally:
        a.close()
    assert a.gateway.pid is None


def test_gateway_is_restarted_with_backoff_and_output_captured(tmp_path: Path) -> None:
    script = tmp_path / "flaky.py"
    script.write_text("print('flaky starting', flush=True)\nraise SystemExit(3)\n")
    a = make_agent(tmp_path, gateway_cmd=(sys.executable, str(script)))
    ag.setup_logging(a.settings)
    try:
        a.gateway.BACKOFF_MIN_S = a.gateway._backoff = 0.05
        a._state.secrets["OPENCLAW_GATEWAY_TOKEN"] = "t"
        authed(a, "ensure-gateway")
        deadline = time.monotonic() + 10
        while a.gateway.restarts < 2:
            assert time.monotonic() < deadline, "gateway was not restarted"
            time.sleep(0.05)
        logs = authed(a, "get-logs", service="gateway")
        assert "flaky starting" in logs["text"]
    finally:
        a.close()
        for h in list(ag.log.handlers) + list(ag._gateway_out.handlers):
            h.close()
            ag.log.removeHandler(h)
            ag._gateway_out.removeHandler(h)


def test_kill_stale_gateway_checks_pid_and_start_time(tmp_path: Path) -> None:
    import subprocess

    pid_file = tmp_path / "gateway.pid"
    sup = ag.GatewaySupervisor(("x",), pid_file, tmp_path)
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        start = ag.process_start_time(Path("/proc"), victim.pid)
        assert start
        pid_file.write_text(f"{victim.pid} {int(start) + 1}\n")  # a recycled pid
        assert sup.kill_stale() is False
        assert victim.poll() is None
        for junk in ("", "garbage", "1 0", f"{victim.pid}"):
            pid_file.write_text(junk)
            assert sup.kill_stale() is False
        pid_file.write_text(f"{victim.pid} {start}\n")
        assert sup.kill_stale() is True
        assert victim.wait(5) == -9
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()


def test_gateway_restart_retries_when_the_binary_is_missing(tmp_path: Path) -> None:
    gw = tmp_path / "gw"
    stop = tmp_path / "stop"
    gw.write_text(
        f"#!/bin/sh\necho started >> {tmp_path / 'starts'}\n"
        f"while [ ! -e {stop} ]; do sleep 0.05; done\nexit 1\n"
    )
    gw.chmod(0o755)
    a = make_agent(tmp_path, gateway_cmd=(str(gw),))
    try:
        a.gateway.BACKOFF_MIN_S = a.gateway._backoff = 0.05
        a._state.secrets["OPENCLAW_GATEWAY_TOKEN"] = "t"
        text = gw.read_text()
        gw.unlink()
        with pytest.raises(FileNotFoundError):
            a.gateway.ensure(a._gateway_env() or {})
        gw.write_text(text)
        gw.chmod(0o755)
        authed(a, "ensure-gateway")
        _wait_for(tmp_path / "starts")
        gw.unlink()
        stop.touch()  # the gateway exits; its restart fails with ENOENT...
        time.sleep(0.3)  # ...and the supervisor must keep trying
        gw.write_text(text)
        gw.chmod(0o755)
        deadline = time.monotonic() + 10
        while (tmp_path / "starts").read_text().count("started") < 2:
            assert time.monotonic() < deadline, "supervisor gave up after a failed restart"
            time.sleep(0.05)
    finally:
        a.close()


def test_backoff_grows_and_is_capped() -> None:
    sup = ag.GatewaySupervisor(("true",), Path("/nonexistent/pid"), Path("/"))
    delays = []
    for _ in range(10):
        delays.append(sup._backoff)
        sup._backoff = min(sup._backoff * 2, sup.BACKOFF_MAX_S)
    assert delays[0] == sup.BACKOFF_MIN_S and delays[-1] == sup.BACKOFF_MAX_S


# --------------------------------------------------------------------------- other types


def _fake_proc(root: Path) -> None:
    (root / "net").mkdir(parents=True)
    (root / "meminfo").write_text(
        "MemTotal:        1004000 kB\nMemFree:  10 kB\nMemAvailable:     700123 kB\n"
    )
    (root / "loadavg").write_text("0.25 0.50 1.00 1/80 1234\n")
    (root / "uptime").write_text("123.45 200.00\n")


def test_get_stats(agent: ag.Agent, tmp_path: Path) -> None:
    _fake_proc(tmp_path / "proc")
    reply = authed(agent, "get-stats")
    assert reply == {
        "ok": True,
        "gateway_pid": None,
        "gateway_rss_kb": 0,
        "gateway_restarts": 0,
        "mem_total_kb": 1004000,
        "mem_available_kb": 700123,
        "load_avg": [0.25, 0.5, 1.0],
        "uptime_s": 123.45,
    }


def test_get_logs_tail_spans_rotation(agent: ag.Agent, tmp_path: Path) -> None:
    logdir = tmp_path / "log"
    logdir.mkdir()
    (logdir / "gateway.log.1").write_text("old-" * 10)
    (logdir / "gateway.log").write_text("new-é" * 3)
    assert authed(agent, "get-logs", max_chars=10)["text"] == ("new-é" * 3)[-10:]
    both = authed(agent, "get-logs", max_chars=25)["text"]
    assert both == ("old-" * 10 + "new-é" * 3)[-25:]
    (logdir / "agent.log").write_text("agent line\n")
    assert authed(agent, "get-logs", service="agent") == {
        "ok": True,
        "service": "agent",
        "text": "agent line\n",
    }
    assert authed(agent, "get-logs")["text"].endswith("new-é")


@pytest.mark.parametrize(
    "fields",
    [{"service": "kernel"}, {"max_chars": 0}, {"max_chars": 65537}, {"max_chars": "10"}],
)
def test_get_logs_validation(agent: ag.Agent, fields: dict[str, Any]) -> None:
    assert "error" in authed(agent, "get-logs", **fields)


def test_get_logs_missing_file_is_empty(agent: ag.Agent) -> None:
    assert authed(agent, "get-logs", service="agent")["text"] == ""


def test_set_time_file_clock(agent: ag.Agent, tmp_path: Path) -> None:
    assert authed(agent, "set-time", epoch_ms=1_700_000_000_123) == {
        "ok": True,
        "epoch_ms": 1_700_000_000_123,
    }
    assert (tmp_path / "run" / "clock").read_text().strip() == "1700000000123"


def test_set_time_system_clock_has_ms_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(time, "clock_settime_ns", lambda clk, ns: seen.append((clk, ns)))
    a = make_agent(tmp_path, clock="system")
    assert authed(a, "set-time", epoch_ms=1_700_000_000_789)["ok"] is True
    assert seen == [(time.CLOCK_REALTIME, 1_700_000_000_789_000_000)]


def test_set_time_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(_clk: int, _ns: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(time, "clock_settime_ns", deny)
    a = make_agent(tmp_path, clock="system")
    assert authed(a, "set-time", epoch_ms=5) == {
        "error": "cannot set the clock: Operation not permitted"
    }


@pytest.mark.parametrize("value", [None, 0, -5, 1.5, "1700000000000", True, 2**60])
def test_set_time_validation(agent: ag.Agent, value: object) -> None:
    assert "error" in authed(agent, "set-time", epoch_ms=value)


def test_holds(agent: ag.Agent) -> None:
    assert authed(agent, "hold-acquire", hold_id="spawn-1", ttl_ms=60_000) == {
        "ok": True,
        "holds": 1,
    }
    assert authed(agent, "hold-acquire", hold_id="spawn-1", ttl_ms=60_000)["holds"] == 1
    assert authed(agent, "hold-acquire", hold_id="short", ttl_ms=50)["holds"] == 2
    assert authed(agent, "get-active-connections")["hold"] == 2
    time.sleep(0.1)
    assert authed(agent, "get-active-connections")["hold"] == 1  # "short" expired
    assert authed(agent, "hold-release", hold_id="spawn-1") == {"ok": True, "released": True}
    assert authed(agent, "hold-release", hold_id="spawn-1") == {"ok": True, "released": False}
    assert authed(agent, "get-active-connections")["hold"] == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"ttl_ms": 1000},
        {"hold_id": "", "ttl_ms": 1000},
        {"hold_id": 7, "ttl_ms": 1000},
        {"hold_id": "x" * 129, "ttl_ms": 1000},
        {"hold_id": "a", "ttl_ms": 0},
        {"hold_id": "a", "ttl_ms": -1},
        {"hold_id": "a", "ttl_ms": "10"},
        {"hold_id": "a", "ttl_ms": 10**12},
    ],
)
def test_hold_validation(agent: ag.Agent, fields: dict[str, Any]) -> None:
    assert "error" in authed(agent, "hold-acquire", **fields)


def test_hold_count_is_bounded(agent: ag.Agent) -> None:
    for i in range(ag.MAX_HOLDS):
        assert authed(agent, "hold-acquire", hold_id=f"h{i}", ttl_ms=60_000)["ok"]
    assert authed(agent, "hold-acquire", hold_id="one-more", ttl_ms=60_000) == {
        "error": "too many holds"
    }
    assert authed(agent, "hold-acquire", hold_id="h0", ttl_ms=60_000)["ok"]  # renew is fine


def _tcp_line(local: str, remote: str, state: str) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 0 0 1 1\n"


def _v4(ip: str, port: int) -> str:
    raw = bytes(int(x) for x in ip.split("."))
    if sys.byteorder == "little":
        raw = raw[::-1]
    return f"{raw.hex().upper()}:{port:04X}"


def _v6(ip: str, port: int) -> str:
    raw = ipaddress.IPv6Address(ip).packed
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"{raw.hex().upper()}:{port:04X}"


def test_active_connections_counts_gateway_port_on_guest_and_loopback(tmp_path: Path) -> None:
    a = make_agent(tmp_path)
    a.params = ag.BootParams(
        ipaddress.IPv4Address("10.0.0.6"), a.params.agent_hash, 0, 0, GW_PORT, "alpha"
    )
    _fake_proc(tmp_path / "proc")
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt\n"
    peer = _v4("10.0.0.5", 40000)
    tcp = header + "".join(
        [
            _tcp_line(_v4("10.0.0.6", GW_PORT), peer, "01"),  # through the TLS front
            _tcp_line(_v4("10.0.0.6", GW_PORT), _v4("10.0.0.5", 40001), "01"),
            _tcp_line(_v4("127.0.0.1", GW_PORT), _v4("127.0.0.1", 50000), "01"),  # loopback
            _tcp_line(_v4("127.0.0.1", GW_PORT), "00000000:0000", "0A"),  # LISTEN
            _tcp_line(_v4("10.0.0.6", 52), peer, "01"),  # agent port
            _tcp_line(_v4("127.0.0.1", 50000), _v4("127.0.0.1", GW_PORT), "01"),  # client side
            _tcp_line(_v4("10.0.0.9", GW_PORT), peer, "01"),  # another address
            _tcp_line(_v4("10.0.0.6", GW_PORT), peer, "06"),  # TIME_WAIT
        ]
    )
    tcp6 = header + "".join(
        [
            _tcp_line(_v6("::1", GW_PORT), _v6("::1", 50001), "01"),
            _tcp_line(_v6("::ffff:10.0.0.6", GW_PORT), _v6("::ffff:10.0.0.5", 1), "01"),
            _tcp_line(_v6("fe80::1", GW_PORT), _v6("fe80::2", 1), "01"),
        ]
    )
    (tmp_path / "proc" / "net" / "tcp").write_text(tcp)
    (tmp_path / "proc" / "net" / "tcp6").write_text(tcp6)
    authed(a, "hold-acquire", hold_id="x", ttl_ms=10_000)
    assert authed(a, "get-active-connections") == {
        "ok": True,
        "tcp": 5,
        "tcp_front": 3,
        "tcp_loopback": 2,
        "cron": 0,
        "hold": 1,
    }


def test_active_connections_without_proc_files(agent: ag.Agent) -> None:
    reply = authed(agent, "get-active-connections")
    assert (reply["tcp"], reply["hold"]) == (0, 0)


def test_cmdline_and_openclaw_stubs(agent: ag.Agent) -> None:
    assert "lobster.name=alpha" in authed(agent, "get-cmdline")["cmdline"]
    assert authed(agent, "get-cron-schedules") == {"ok": True, "schedules": []}
    assert authed(agent, "poke-cron") == {"ok": True, "deferred": 0}
    assert authed(agent, "get-heartbeat-schedule") == {
        "ok": True,
        "enabled": False,
        "interval_ms": 0,
        "next_beat_at_ms": 0,
    }


# --------------------------------------------------------------------------- over TCP


class Served:
    def __init__(self, agent: ag.Agent) -> None:
        self.agent = agent
        self.control, self.health = agent.ports

    def send(self, data: bytes, *, port: int | None = None, half_close: bool = True) -> bytes:
        with socket.create_connection(("127.0.0.1", port or self.control), timeout=5) as s:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    calls: list[str] = []
    a = make_agent(tmp_path, max_connections=8)
    a._power_off = lambda: calls.append("power-off")
    a.power_calls = calls  # type: ignore[attr-defined]
    a.bind(retry_s=0)
    a.serve()
    try:
        yield Served(a)
    finally:
        a.stopped.set()
        a.stop_listening()
        a.close()


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode() + b"\n"


def _reply(raw: bytes) -> dict[str, Any]:
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    out = json.loads(raw)
    assert isinstance(out, dict)
    return out


def test_tcp_round_trip_and_health_port(served: Served) -> None:
    ping = _line({"type": "health-ping", "token": TOKEN})
    assert _reply(served.send(ping, half_close=False)) == {"ok": True, "status": "PONG"}
    health = served.send(_line({"token": TOKEN}), port=served.health)
    assert _reply(health) == {"ok": True, "status": "PONG"}
    assert _reply(served.send(_line({"token": "no"}), port=served.health)) == {
        "error": "unauthorized"
    }


def test_listeners_bind_only_the_guest_address(served: Served) -> None:
    # The guest address here is 127.0.0.1; any other loopback address must be refused.
    for port in (served.control, served.health):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), 1).close()


def test_half_close_without_newline_is_parsed(served: Served) -> None:
    raw = json.dumps({"type": "health-ping", "token": TOKEN}).encode()
    assert _reply(served.send(raw)) == {"ok": True, "status": "PONG"}


def test_bytes_after_newline_are_ignored(served: Served) -> None:
    raw = _line({"type": "health-ping", "token": TOKEN}) + b"garbage{{{"
    assert _reply(served.send(raw)) == {"ok": True, "status": "PONG"}


def test_oversized_message_is_refused(served: Served) -> None:
    raw = b'{"pad": "' + b"a" * ag.MAX_MESSAGE + b'"}\n'
    assert _reply(served.send(raw, half_close=False)) == {"error": "message too large"}
    assert _reply(served.send(b"x" * (ag.MAX_MESSAGE + 1))) == {"error": "message too large"}


def test_message_of_exactly_the_cap_is_accepted(served: Served) -> None:
    base = json.dumps({"type": "health-ping", "token": TOKEN, "pad": ""}).encode()
    raw = base[:-2] + b"p" * (ag.MAX_MESSAGE - len(base)) + b'"}'
    assert len(raw) == ag.MAX_MESSAGE
    assert _reply(served.send(raw + b"\n", half_close=False)) == {"ok": True, "status": "PONG"}


def test_read_frame_never_buffers_more_than_cap_plus_one() -> None:
    class Trickle:
        def __init__(self) -> None:
            self.asked = 0

        def settimeout(self, _t: float) -> None:
            pass

        def recv(self, n: int) -> bytes:
            self.asked += n
            return b"y" * n

    sock = Trickle()
    cap = 100_000
    assert ag.read_frame(sock, cap, time.monotonic() + 5) is None  # type: ignore[arg-type]
    assert sock.asked == cap + 1


def test_slow_client_times_out_and_does_not_block_others(served: Served) -> None:
    slow = socket.create_connection(("127.0.0.1", served.control), timeout=5)
    idle = [socket.create_connection(("127.0.0.1", served.control), timeout=5) for _ in range(3)]
    try:
        slow.sendall(b'{"type": "heal')
        for _ in range(3):
            t0 = time.monotonic()
            out = served.send(_line({"type": "health-ping", "token": TOKEN}), half_close=False)
            assert _reply(out)["status"] == "PONG"
            assert time.monotonic() - t0 < 0.5
        slow.settimeout(5)
        t0 = time.monotonic()
        data = slow.recv(4096)
        assert _reply(data) == {"error": "timed out reading the request"}
        assert time.monotonic() - t0 < 2.0  # read_timeout_s = 1
    finally:
        slow.close()
        for s in idle:
            s.close()


def test_connection_cap_answers_busy_and_recovers(served: Served) -> None:
    held = [socket.create_connection(("127.0.0.1", served.control), timeout=5) for _ in range(8)]
    try:
        time.sleep(0.1)
        out = served.send(_line({"type": "health-ping", "token": TOKEN}), half_close=False)
        assert _reply(out) == {"error": "busy"}
    finally:
        for s in held:
            s.close()
    time.sleep(0.1)
    out = served.send(_line({"type": "health-ping", "token": TOKEN}), half_close=False)
    assert _reply(out)["status"] == "PONG"


def test_shutdown_replies_before_powering_off(served: Served) -> None:
    calls: list[str] = served.agent.power_calls  # type: ignore[attr-defined]
    out = served.send(_line({"type": "shutdown", "token": TOKEN}), half_close=False)
    assert _reply(out) == {"ok": True, "status": "shutting-down"}
    deadline = time.monotonic() + 2
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert calls == ["power-off"]


def test_empty_connection_gets_an_error_object(served: Served) -> None:
    assert "error" in _reply(served.send(b""))


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=2048))
def test_fuzz_handle_always_returns_one_json_object(raw: bytes) -> None:
    a = _Fuzz.agent
    reply = a.handle(raw)
    assert isinstance(reply, dict)
    assert set(reply) == {"error"} or reply.get("ok") is True
    json.dumps(reply)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mtype=st.sampled_from(
        [
            "get-logs",
            "set-time",
            "hold-acquire",
            "hold-release",
            "get-active-connections",
            "get-cmdline",
            "health-ping",
            "no-such-type",
        ]
    ),
    fields=st.dictionaries(
        st.sampled_from(["service", "max_chars", "epoch_ms", "hold_id", "ttl_ms", "secrets"]),
        _json_values,
    ),
)
def test_fuzz_authenticated_fields(mtype: str, fields: dict[str, Any]) -> None:
    reply = authed(_Fuzz.agent, mtype, **fields)
    assert set(reply) == {"error"} or reply.get("ok") is True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(min_size=1, max_size=512), max_size=6))
def test_fuzz_framing_over_tcp_keeps_serving(chunks: list[bytes]) -> None:
    served = _Fuzz.served
    with socket.create_connection(("127.0.0.1", served.control), timeout=5) as s:
        for c in chunks:
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if data:
        out = _reply(data)
        assert set(out) == {"error"} or out.get("ok") is True
    ping = served.send(_line({"token": TOKEN}), port=served.health, half_close=False)
    assert _reply(ping) == {"ok": True, "status": "PONG"}


class _Fuzz:
    """The module's shared agent for the fuzz tests (hypothesis cannot use fixtures)."""

    agent: ag.Agent
    served: Served


@pytest.fixture(autouse=True, scope="module")
def _fuzz_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    a = make_agent(tmp_path_factory.mktemp("fuzz"))
    a.bind(retry_s=0)
    a.serve()
    _Fuzz.agent, _Fuzz.served = a, Served(a)
    try:
        yield
    finally:
        a.stopped.set()
        a.stop_listening()
        a.close()
        assert threading.active_count() < 200
