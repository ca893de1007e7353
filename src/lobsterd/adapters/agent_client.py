"""Host side of the guest-agent protocol (see docs/architecture.md "Guest contract").

One TCP connection per request: ``JSON + \\n`` out, one JSON object back, EOF. The guest
is untrusted: every reply is checked field by field (type and range) and anything else
is a protocol failure, never a lucky substring match. Text coming back from the guest
(log tails, error messages) is stripped of control characters before anyone prints it.
The token is sent on the wire only; it never appears in messages, logs or ``repr``.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from lobsterd.errors import AgentRejected, AgentUnreachable

#: A reply is at most this big (get-logs: 64 KiB of text, at most 6 bytes each once JSON-escaped).
MAX_REPLY = 1024 * 1024
LOG_SERVICES = ("gateway", "agent")
LOGS_MAX_CHARS = 64 * 1024
_PROBE_CONNECT_S = 0.2

_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {127: None}
_CONTROL |= {c: None for c in range(0x80, 0xA0)}


def sanitize(text: str, limit: int | None = None) -> str:
    """Drop terminal control characters (ESC, CR, C1...) from guest-supplied text."""
    clean = text.translate(_CONTROL)
    return clean if limit is None else clean[:limit]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AgentClient:
    """Talks to one guest's agent at ``host:port`` (control) and ``host:health_port``."""

    def __init__(
        self, host: str, port: int, health_port: int, token: str, timeout_s: float = 5.0
    ) -> None:
        self.host = host
        self.port = port
        self.health_port = health_port
        self._token = token
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"AgentClient({self.host}:{self.port}, health {self.health_port})"

    # ---- transport

    def _exchange(
        self, port: int, payload: dict[str, Any], timeout_s: float, connect_timeout_s: float
    ) -> dict[str, Any]:
        """One request/reply on ``port``; AgentUnreachable on any transport/format failure."""
        where = f"agent at {self.host}:{port}"
        what = payload.get("type", "health")
        deadline = time.monotonic() + timeout_s
        data = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
        try:
            sock = socket.create_connection(
                (self.host, port), timeout=min(connect_timeout_s, timeout_s)
            )
        except OSError as exc:
            raise AgentUnreachable(
                f"cannot connect to the {where}: {exc.strerror or exc}",
                hint="is the VM running? `lobsterd logs <name> --service agent`",
            ) from None
        buf = bytearray()
        try:
            with sock:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(data)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > MAX_REPLY:
                        raise AgentUnreachable(f"{where} sent an oversized reply to {what}")
        except TimeoutError:
            raise AgentUnreachable(f"{where} did not answer {what} within {timeout_s:g}s") from None
        except OSError as exc:
            raise AgentUnreachable(
                f"connection to the {where} failed during {what}: {exc.strerror or exc}"
            ) from None
        try:
            reply = json.loads(bytes(buf).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise AgentUnreachable(f"{where} sent an invalid reply to {what} (not JSON)") from None
        if not isinstance(reply, dict):
            raise AgentUnreachable(f"{where} sent an invalid reply to {what} (not an object)")
        return reply

    def _checked(self, msg_type: str, reply: dict[str, Any]) -> dict[str, Any]:
        if "error" in reply:
            err = reply["error"]
            text = sanitize(err, 200) if isinstance(err, str) else "malformed error"
            raise AgentRejected(f"agent refused {msg_type}: {text}")
        if reply.get("ok") is not True:
            raise AgentUnreachable(f"agent sent an invalid reply to {msg_type} (no ok flag)")
        return reply

    def request(
        self, msg_type: str, timeout_s: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one message; the reply dict (``ok`` is true) or AgentRejected/Unreachable."""
        if "token" in fields or "type" in fields:
            raise ValueError("type and token are set by the client")
        payload = {"type": msg_type, **fields, "token": self._token}
        t = self.timeout_s if timeout_s is None else timeout_s
        return self._checked(msg_type, self._exchange(self.port, payload, t, t))

    @staticmethod
    def _field(msg_type: str, reply: dict[str, Any], key: str, check: Any) -> Any:
        value = reply.get(key)
        if not check(value):
            raise AgentUnreachable(
                f"agent sent an invalid reply to {msg_type} (field {key!r} malformed)"
            )
        return value

    # ---- health

    def _ping(self, timeout_s: float, connect_timeout_s: float) -> None:
        reply = self._exchange(
            self.health_port, {"token": self._token}, timeout_s, connect_timeout_s
        )
        reply = self._checked("health-ping", reply)
        if reply.get("status") != "PONG":
            raise AgentUnreachable("agent sent an invalid reply to health-ping")

    def health_ping(self) -> bool:
        """True only if the health port answers an authenticated, well-formed PONG."""
        try:
            self._ping(self.timeout_s, self.timeout_s)
        except (AgentUnreachable, AgentRejected):
            return False
        return True

    def wait_ready(self, timeout_s: float, interval_s: float = 0.1) -> float:
        """Poll the health port until it answers; seconds waited.

        Short connect timeouts let the host notice the agent within about ``interval_s``
        of it listening. A wrong token is not retried (AgentRejected at once).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentUnreachable(
                    f"agent at {self.host}:{self.health_port} not ready after "
                    f"{timeout_s:g}s ({last})",
                    hint="check the VM console log (vm.debug_console) and the agent log",
                )
            attempt = time.monotonic()
            try:
                self._ping(min(self.timeout_s, remaining), min(_PROBE_CONNECT_S, remaining))
                return time.monotonic() - start
            except AgentUnreachable as exc:
                last = exc.message
            pause = interval_s - (time.monotonic() - attempt)
            if pause > 0:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    # ---- one method per message type

    def inject_secrets(self, secrets: dict[str, str]) -> None:
        reply = self.request("inject-secrets", secrets=secrets)
        accepted = self._field(
            "inject-secrets",
            reply,
            "accepted",
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        )
        if sorted(accepted) != sorted(secrets):
            raise AgentUnreachable("agent did not acknowledge every injected secret")

    def get_stats(self) -> dict[str, Any]:
        t = "get-stats"
        r = self.request(t)
        pid = self._field(t, r, "gateway_pid", lambda v: v is None or (_is_int(v) and v > 0))
        load = self._field(
            t, r, "load_avg", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)
        )
        out: dict[str, Any] = {"gateway_pid": pid, "load_avg": [float(x) for x in load]}
        for key in ("gateway_rss_kb", "gateway_restarts", "mem_total_kb", "mem_available_kb"):
            out[key] = self._field(t, r, key, lambda v: _is_int(v) and v >= 0)
        out["uptime_s"] = float(self._field(t, r, "uptime_s", lambda v: _is_number(v) and v >= 0))
        return out

    def get_logs(self, service: str = "gateway", max_chars: int = 4000) -> str:
        """Tail of a guest log, control characters removed (safe to print)."""
        if service not in LOG_SERVICES:
            raise ValueError(f"service must be one of {', '.join(LOG_SERVICES)}")
        if not 1 <= max_chars <= LOGS_MAX_CHARS:
            raise ValueError(f"max_chars must be in 1..{LOGS_MAX_CHARS}")
        r = self.request("get-logs", service=service, max_chars=max_chars)
        text = self._field("get-logs", r, "text", lambda v: isinstance(v, str))
        return sanitize(text)[-max_chars:]

    def set_time(self, epoch_ms: int | None = None) -> None:
        """Set the guest clock (default: now), with millisecond precision."""
        ms = time.time_ns() // 1_000_000 if epoch_ms is None else epoch_ms
        r = self.request("set-time", epoch_ms=ms)
        if r.get("epoch_ms") != ms:
            raise AgentUnreachable("agent sent an invalid reply to set-time")

    def ensure_gateway(self) -> dict[str, Any]:
        t = "ensure-gateway"
        r = self.request(t)
        status = self._field(t, r, "status", lambda v: v in ("running", "started", "restarted"))
        pid = self._field(t, r, "pid", lambda v: _is_int(v) and v > 0)
        return {"status": status, "pid": pid}

    def hold_acquire(self, hold_id: str, ttl_s: float) -> None:
        ttl_ms = max(1, round(ttl_s * 1000))
        r = self.request("hold-acquire", hold_id=hold_id, ttl_ms=ttl_ms)
        self._field("hold-acquire", r, "holds", lambda v: _is_int(v) and v >= 1)

    def hold_release(self, hold_id: str) -> None:
        r = self.request("hold-release", hold_id=hold_id)
        self._field("hold-release", r, "released", lambda v: isinstance(v, bool))

    def active_connections(self) -> dict[str, int]:
        """{"tcp", "cron", "hold"} (plus "tcp_front"/"tcp_loopback" when sent), all >= 0."""
        t = "get-active-connections"
        r = self.request(t)
        out: dict[str, int] = {}
        for key in ("tcp", "cron", "hold"):
            out[key] = self._field(t, r, key, lambda v: _is_int(v) and 0 <= v < 2**31)
        for key in ("tcp_front", "tcp_loopback"):
            if key in r:
                out[key] = self._field(t, r, key, lambda v: _is_int(v) and 0 <= v < 2**31)
        return out

    def get_cmdline(self) -> str:
        r = self.request("get-cmdline")
        return str(self._field("get-cmdline", r, "cmdline", lambda v: isinstance(v, str)))

    def shutdown(self) -> None:
        """Ask the guest to stop its gateway and power off; returns once acknowledged."""
        r = self.request("shutdown")
        self._field("shutdown", r, "status", lambda v: v == "shutting-down")
