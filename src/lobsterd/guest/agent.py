"""lobster guest agent: the host's only control channel into a tenant VM.

Runs as root inside the guest (``python3 /usr/lib/lobster/agent.py``), standard library
only. It listens on ``<guest ip>:<agent_port>`` (control) and ``<guest ip>:<health_port>``
(health), never on a wildcard address.

Protocol (see docs/architecture.md "Guest contract"): one JSON object and ``\\n`` per TCP
connection, one JSON object and ``\\n`` back, then close. A client that half-closes
without ``\\n`` gets what it sent parsed. Messages longer than 1 MiB are refused without
ever buffering more than 1 MiB + 1 byte. Every message carries ``token``; the agent knows
only ``sha256(token)`` (``lobster.agent_hash`` on the kernel command line, which guest
processes can read, so the token itself is never there) and compares in constant time.
No hash → every request is refused (fail closed).

Request fields per type (besides ``type`` and ``token``)::

    inject-secrets          secrets: {NAME: value}
    get-logs                service: "gateway"|"agent" = "gateway", max_chars: int = 4000
    set-time                epoch_ms: int
    hold-acquire            hold_id: str, ttl_ms: int
    hold-release            hold_id: str

Every reply is ``{"ok": true, ...}`` or ``{"error": "..."}``.

Paths come from :class:`Settings` (environment overrides) so that tests can run the real
agent as an unprivileged process on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import logging.handlers
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and subprocess are not imported at run time: start-up cost
    import subprocess
    from typing import Any

MAX_MESSAGE = 1024 * 1024
LOG_MAX_BYTES = 1024 * 1024
LOG_BACKUPS = 1
LOGS_DEFAULT_CHARS = 4000
LOGS_MAX_CHARS = 64 * 1024
MAX_HOLDS = 256
MAX_HOLD_TTL_MS = 24 * 3600 * 1000
DEFAULT_PORTS = {"agent_port": 52, "health_port": 53, "gateway_port": 9000}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Names that inject-secrets handles itself; everything else becomes gateway environment.
RESERVED_SECRETS = frozenset(
    {
        "OPENCLAW_GATEWAY_TOKEN",
        "OPENCLAW_CONFIG",
        "SSH_AUTHORIZED_KEY",
        "TLS_SERVER_CERT",
        "TLS_SERVER_KEY",
        "TLS_CLIENT_CA",
    }
)
TLS_NAMES = ("TLS_SERVER_CERT", "TLS_SERVER_KEY", "TLS_CLIENT_CA")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HASH = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("lobster-agent")
_gateway_out = logging.getLogger("lobster-agent.gateway-output")


# --------------------------------------------------------------------------- settings


class Settings:
    """Where the agent reads and writes; production defaults, overridable for tests.

    Plain classes rather than dataclasses here: ``dataclasses`` pulls in ``inspect`` and
    friends, and every import delays the agent at each boot (interpreted under TCG).
    """

    def __init__(
        self,
        *,
        cmdline_file: Path = Path("/proc/cmdline"),
        guest_root: Path = Path("/"),  # /root/.openclaw and /root/.ssh live under it
        log_dir: Path = Path("/var/log/lobster"),
        run_dir: Path = Path("/run/lobster"),
        proc_root: Path = Path("/proc"),
        gateway_cmd: tuple[str, ...] = ("/usr/local/bin/lobster-gateway",),
        shutdown_action: str = "poweroff",  # "poweroff" (SIGTERM to PID 1) or "exit"
        clock: str = "system",  # "system" (clock_settime) or "file" (tests: run_dir/clock)
        read_timeout_s: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.cmdline_file = cmdline_file
        self.guest_root = guest_root
        self.log_dir = log_dir
        self.run_dir = run_dir
        self.proc_root = proc_root
        self.gateway_cmd = gateway_cmd
        self.shutdown_action = shutdown_action
        self.clock = clock
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = cls()
        action = e.get("LOBSTER_SHUTDOWN_ACTION", d.shutdown_action)
        clock = e.get("LOBSTER_CLOCK", d.clock)
        if action not in {"poweroff", "exit"}:
            raise ValueError("LOBSTER_SHUTDOWN_ACTION must be 'poweroff' or 'exit'")
        if clock not in {"system", "file"}:
            raise ValueError("LOBSTER_CLOCK must be 'system' or 'file'")
        cmd = tuple(shlex.split(e["LOBSTER_GATEWAY_CMD"])) if "LOBSTER_GATEWAY_CMD" in e else None
        return cls(
            cmdline_file=Path(e.get("LOBSTER_CMDLINE_FILE", str(d.cmdline_file))),
            guest_root=Path(e.get("LOBSTER_GUEST_ROOT", str(d.guest_root))),
            log_dir=Path(e.get("LOBSTER_LOG_DIR", str(d.log_dir))),
            run_dir=Path(e.get("LOBSTER_RUN_DIR", str(d.run_dir))),
            proc_root=Path(e.get("LOBSTER_PROC_ROOT", str(d.proc_root))),
            gateway_cmd=cmd or d.gateway_cmd,
            shutdown_action=action,
            clock=clock,
            read_timeout_s=float(e.get("LOBSTER_READ_TIMEOUT_S", d.read_timeout_s)),
            max_connections=int(e.get("LOBSTER_MAX_CONNECTIONS", d.max_connections)),
        )

    @property
    def home(self) -> Path:
        return self.guest_root / "root"

    @property
    def agent_log(self) -> Path:
        return self.log_dir / "agent.log"

    @property
    def gateway_log(self) -> Path:
        return self.log_dir / "gateway.log"


# --------------------------------------------------------------------------- boot params


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel command line → {key: value}; a value may itself contain ``=``."""
    out: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


class BootParams:
    """The ``lobster.*`` parameters the agent needs."""

    def __init__(
        self,
        ip: ipaddress.IPv4Address,
        agent_hash: str | None,  # None → every request is refused
        agent_port: int,
        health_port: int,
        gateway_port: int,
        name: str,
    ) -> None:
        self.ip = ip
        self.agent_hash = agent_hash
        self.agent_port = agent_port
        self.health_port = health_port
        self.gateway_port = gateway_port
        self.name = name

    @classmethod
    def from_cmdline(cls, text: str) -> BootParams:
        """Parse; raises ValueError when the guest address is missing or malformed.

        A missing address is fatal because the agent must never fall back to 0.0.0.0.
        """
        kv = parse_cmdline(text)
        raw_ip = kv.get("lobster.ip", "")
        if not raw_ip:
            raise ValueError("lobster.ip is missing from the kernel command line")
        ip = ipaddress.IPv4Interface(raw_ip).ip
        ports: dict[str, int] = {}
        for key, default in DEFAULT_PORTS.items():
            raw = kv.get(f"lobster.{key}", "")
            port = int(raw) if raw.isdigit() else default
            if not 1 <= port <= 65535:
                raise ValueError(f"lobster.{key} is out of range")
            ports[key] = port
        h = kv.get("lobster.agent_hash", "").strip().lower()
        return cls(
            ip=ip,
            agent_hash=h if _HASH.fullmatch(h) else None,
            name=kv.get("lobster.name", ""),
            **ports,
        )


# --------------------------------------------------------------------------- helpers


def token_hash(token: str) -> str:
    """What the host puts on the command line for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def printable(value: object, limit: int = 64) -> str:
    """A peer-supplied value made safe for one log line (no control characters)."""
    text = value if isinstance(value, str) else type(value).__name__
    text = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return text + ("…" if isinstance(value, str) and len(value) > limit else "")


def _write_private(path: Path, data: str, dir_mode: int = 0o700) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (the directory gets ``dir_mode``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, dir_mode)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_tail(path: Path, max_chars: int) -> str:
    """Last ``max_chars`` characters of a log and its rotated predecessor ('' if none)."""
    text = ""
    for p in (path, path.with_name(path.name + ".1")):
        try:
            with open(p, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                want = max_chars * 4  # UTF-8: at most 4 bytes per character
                fh.seek(max(0, size - want))
                text = fh.read(want).decode("utf-8", errors="replace") + text
        except OSError:
            continue
        if len(text) >= max_chars:
            break
    return text[-max_chars:]


def _hex_to_ip(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Address as printed in /proc/net/tcp{,6}: 32-bit words in host byte order."""
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def count_established(
    tables: list[str], port: int, addresses: set[ipaddress.IPv4Address]
) -> dict[ipaddress.IPv4Address, int]:
    """ESTABLISHED sockets whose *local* end is ``<address>:<port>``, per address.

    ``tables`` are the texts of /proc/net/tcp and /proc/net/tcp6; IPv4-mapped IPv6
    addresses count as their IPv4 address.
    """
    counts = dict.fromkeys(addresses, 0)
    for table in tables:
        for line in table.splitlines()[1:]:
            cols = line.split()
            if len(cols) < 4 or cols[3] != "01":
                continue
            addr_hex, _, port_hex = cols[1].partition(":")
            try:
                if int(port_hex, 16) != port:
                    continue
                addr = _hex_to_ip(addr_hex)
            except ValueError:
                continue
            if isinstance(addr, ipaddress.IPv6Address):
                if addr == ipaddress.IPv6Address("::1"):
                    addr = ipaddress.IPv4Address("127.0.0.1")
                elif addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                else:
                    continue
            if addr in counts:
                counts[addr] += 1
    return counts


def process_start_time(proc_root: Path, pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); '' if unreadable."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces
    return fields[19] if len(fields) > 19 else ""


def parse_meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _int_field(msg: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    value = msg.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


# --------------------------------------------------------------------------- gateway


class GatewaySupervisor:
    """Runs the gateway, restarts it with backoff when it exits, captures its output.

    Output goes through a pipe into a size-capped rotating log so the persistent
    overlay cannot fill up with gateway chatter.
    """

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 30.0
    STABLE_S = 30.0
    STOP_GRACE_S = 3.0

    def __init__(
        self, cmd: tuple[str, ...], pid_file: Path, cwd: Path, proc_root: Path = Path("/proc")
    ) -> None:
        self._cmd = cmd
        self._proc_root = proc_root
        self._pid_file = pid_file
        self._cwd = cwd
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] | None = None
        self._want = False
        self._started_at = 0.0
        self._backoff = self.BACKOFF_MIN_S
        self._stop_evt = threading.Event()
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def kill_stale(self) -> bool:
        """Kill the gateway left behind by a previous agent (e.g. one that was SIGKILLed).

        The pid file holds the pid *and* its start time, so a recycled pid is never hit.
        """
        try:
            pid_s, start_s = self._pid_file.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return False
        if pid <= 1 or start_s != process_start_time(self._proc_root, pid):
            return False
        log.warning("killing the gateway (pid %d) left by a previous agent", pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # it leads its own session and group
        return True

    def ensure(self, env: dict[str, str]) -> str:
        """Make sure the gateway runs with ``env``: 'running', 'started' or 'restarted'."""
        with self._lock:
            self._want = True
            self._stop_evt.clear()
            if self._proc is not None and self._proc.poll() is None:
                if env == self._env:
                    return "running"
                self._env = env
                self._terminate(self._proc)
                self._spawn()
                return "restarted"
            self._env = env
            self._spawn()
            return "started"

    def stop(self) -> None:
        with self._lock:
            self._want = False
            self._stop_evt.set()
            proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)
        with contextlib.suppress(OSError):
            self._pid_file.unlink()

    def _spawn(self) -> None:
        import subprocess

        assert self._env is not None
        self._cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            list(self._cmd),
            env=self._env,
            cwd=self._cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills its children too
            close_fds=True,
        )
        self._proc = proc
        self._started_at = time.monotonic()
        with contextlib.suppress(OSError):
            self._pid_file.parent.mkdir(parents=True, exist_ok=True)
            start = process_start_time(self._proc_root, proc.pid)
            self._pid_file.write_text(f"{proc.pid} {start}\n")
        log.info("gateway started, pid %d", proc.pid)
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
        threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        import subprocess

        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.STOP_GRACE_S)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its process group

    @staticmethod
    def _pump(proc: subprocess.Popen[bytes]) -> None:
        out = proc.stdout
        assert out is not None
        with out:
            for line in iter(lambda: out.readline(8192), b""):
                _gateway_out.info("%s", line.decode("utf-8", errors="replace").rstrip("\n"))

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        rc = proc.wait()
        with self._lock:
            if self._proc is not proc:
                return  # replaced or stopped on purpose
            self._proc = None
            if not self._want:
                return
            ran = time.monotonic() - self._started_at
            if ran >= self.STABLE_S:
                self._backoff = self.BACKOFF_MIN_S
            delay = self._next_delay()
        log.warning("gateway exited with status %s after %.1fs; restart in %.1fs", rc, ran, delay)
        while not self._stop_evt.wait(delay):
            with self._lock:
                if not self._want or self._proc is not None or self._env is None:
                    return  # stopped, or ensure() already started a new one
                self.restarts += 1
                try:
                    self._spawn()
                    return
                except OSError as exc:
                    delay = self._next_delay()
                    log.error(
                        "gateway restart failed: %s; next try in %.1fs", exc.strerror or exc, delay
                    )

    def _next_delay(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
        return delay


# --------------------------------------------------------------------------- agent


class _Reply(dict[str, "Any"]):
    """A reply plus an action to run after it has been sent (shutdown)."""

    after: Callable[[], None] | None = None


def _err(message: str) -> _Reply:
    return _Reply(error=message)


def _ok(**fields: Any) -> _Reply:
    return _Reply(ok=True, **fields)


def _load_tls_front() -> Any:
    """The TlsFront class, installed side by side or from the source tree (None if absent)."""
    import importlib

    for name in ("tls_front", "lobsterd.guest.tls_front"):
        try:
            return importlib.import_module(name).TlsFront
        except (ImportError, AttributeError):
            continue
    return None


class _State:
    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.holds: dict[str, float] = {}  # hold id → monotonic expiry


class Agent:
    """Message handling and the two listeners."""

    def __init__(
        self,
        settings: Settings,
        params: BootParams,
        *,
        power_off: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.params = params
        self._state = _State()
        self._lock = threading.RLock()
        self._power_off = power_off or self._default_power_off
        self._tls_front: Any = None
        self.gateway = GatewaySupervisor(
            settings.gateway_cmd,
            settings.run_dir / "gateway.pid",
            settings.home,
            settings.proc_root,
        )
        self._listeners: list[socket.socket] = []
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self.stopped = threading.Event()
        self._handlers: dict[str, Callable[[dict[str, Any]], _Reply]] = {
            "inject-secrets": self._inject_secrets,
            "health-ping": lambda _m: _ok(status="PONG"),
            "get-stats": self._get_stats,
            "get-logs": self._get_logs,
            "set-time": self._set_time,
            "ensure-gateway": self._ensure_gateway,
            "hold-acquire": self._hold_acquire,
            "hold-release": self._hold_release,
            "get-active-connections": self._active_connections,
            "shutdown": self._shutdown,
            "get-cmdline": lambda _m: _ok(cmdline=_read_text(self.settings.cmdline_file)),
            "get-cron-schedules": lambda _m: _ok(schedules=[]),
            "get-heartbeat-schedule": lambda _m: _ok(
                enabled=False, interval_ms=0, next_beat_at_ms=0
            ),
            "poke-cron": lambda _m: _ok(deferred=0),
        }

    # ---- message handling (pure except for the handlers' side effects)

    def authenticate(self, msg: Mapping[str, Any]) -> str | None:
        """None if authorised, else the reason (for the log; never the token)."""
        expected = self.params.agent_hash
        token = msg.get("token")
        if expected is None:
            return "no agent hash on the kernel command line"
        if not isinstance(token, str):
            return "missing token"
        # Hash first so the comparison is over equal-length digests: constant time.
        if not hmac.compare_digest(token_hash(token).encode(), expected.encode()):
            return "bad token"
        return None

    def handle(self, raw: bytes, *, health: bool = False, peer: str = "-") -> _Reply:
        """One framed message (without its newline) → the reply; never raises."""
        try:
            return self._handle(raw, health=health, peer=peer)
        except Exception as exc:
            log.exception("handler failed for %s", peer)
            return _err(f"internal error: {type(exc).__name__}")

    @staticmethod
    def decode(raw: bytes) -> dict[str, Any] | str:
        """The message as a dict, or the error to reply with."""
        try:
            msg = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return "message is not valid UTF-8"
        except RecursionError:
            return "message is nested too deeply"
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            return str(exc)
        if not isinstance(msg, dict):
            return "message must be a JSON object"
        return msg

    def _handle(self, raw: bytes, *, health: bool, peer: str) -> _Reply:
        msg = self.decode(raw)
        if isinstance(msg, str):
            log.warning("rejected request from %s: %s", peer, msg)
            return _err(msg)
        mtype = msg.get("type")
        reason = self.authenticate(msg)
        if reason is not None:
            log.warning("rejected request from %s (type %s): %s", peer, printable(mtype), reason)
            return _err("unauthorized")
        if health:
            return _ok(status="PONG")
        handler = self._handlers.get(mtype) if isinstance(mtype, str) else None
        if handler is None:
            log.warning("unknown message type from %s: %s", peer, printable(mtype))
            if not isinstance(mtype, str):
                return _err("missing message type")
            return _err(f"unknown message type: {printable(mtype)}")
        if mtype != "health-ping":
            log.info("%s from %s", mtype, peer)
        return handler(msg)

    # ---- handlers

    def _gateway_env(self) -> dict[str, str] | None:
        with self._lock:
            token = self._state.secrets.get("OPENCLAW_GATEWAY_TOKEN")
            if not token:
                return None
            env = {k: v for k, v in self._state.secrets.items() if k not in RESERVED_SECRETS}
        env.update(
            PATH=os.environ.get("PATH", DEFAULT_PATH),
            HOME=str(self.settings.home),
            LANG="C.UTF-8",
            NODE_ENV="production",
            OPENCLAW_GATEWAY_TOKEN=token,
            OPENCLAW_GATEWAY_PORT=str(self.params.gateway_port),
        )
        if "LOBSTER_CMDLINE_FILE" in os.environ:  # tests: the stand-in reads the tenant name
            env["LOBSTER_CMDLINE_FILE"] = os.environ["LOBSTER_CMDLINE_FILE"]
        return env

    def _start_gateway(self) -> str:
        env = self._gateway_env()
        if env is None:
            return "no-token"
        return self.gateway.ensure(env)

    @staticmethod
    def _check_secrets(secrets: object) -> str | None:
        """None if ``secrets`` is acceptable, else the reason (never a value)."""
        if not isinstance(secrets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
        ):
            return "secrets must be an object of string values"
        for name, value in secrets.items():
            if not _ENV_NAME.fullmatch(name):
                return f"invalid secret name: {printable(name)}"
            if "\0" in value:
                return f"secret {name} contains a NUL character"
        if "OPENCLAW_CONFIG" in secrets:
            try:
                parsed = json.loads(secrets["OPENCLAW_CONFIG"])
            except (ValueError, RecursionError):
                return "OPENCLAW_CONFIG is not valid JSON"
            if not isinstance(parsed, dict):
                return "OPENCLAW_CONFIG must be a JSON object"
        return None

    def _write_secret_files(self, secrets: Mapping[str, str]) -> None:
        home = self.settings.home
        if "OPENCLAW_CONFIG" in secrets:
            _write_private(home / ".openclaw" / "openclaw.json", secrets["OPENCLAW_CONFIG"])
        if "SSH_AUTHORIZED_KEY" in secrets:
            key = secrets["SSH_AUTHORIZED_KEY"].strip() + "\n"
            _write_private(home / ".ssh" / "authorized_keys", key)
        tls_dir = self.settings.run_dir / "tls"
        files = ("server.crt", "server.key", "client-ca.crt")
        for name, fname in zip(TLS_NAMES, files, strict=True):
            if name in secrets:
                _write_private(tls_dir / fname, secrets[name])

    def _inject_secrets(self, msg: dict[str, Any]) -> _Reply:
        secrets = msg.get("secrets")
        problem = self._check_secrets(secrets)
        if problem is not None:
            return _err(problem)
        assert isinstance(secrets, dict)
        try:
            self._write_secret_files(secrets)
        except OSError as exc:
            log.error("inject-secrets: cannot write a file: %s", exc.strerror or exc)
            return _err(f"cannot write secret files: {exc.strerror or type(exc).__name__}")
        with self._lock:
            self._state.secrets.update(secrets)
        log.info("inject-secrets: accepted %s", ", ".join(sorted(secrets)))
        if any(n in secrets for n in TLS_NAMES):
            tls = self._apply_tls()
        else:
            tls = "running" if self._tls_front is not None else "absent"
        if tls == "unavailable":
            return _err("TLS front unavailable: tls_front.py is missing from the guest image")
        if tls.startswith("failed"):
            return _err(f"TLS front {tls}")
        try:
            gw = self._start_gateway()
        except OSError as exc:
            log.error("cannot start the gateway: %s", exc.strerror or exc)
            return _err(f"cannot start the gateway: {exc.strerror or type(exc).__name__}")
        return _ok(accepted=sorted(secrets), gateway=gw, tls=tls)

    def _apply_tls(self) -> str:
        with self._lock:
            pems = [self._state.secrets.get(n, "") for n in TLS_NAMES]
        if not all(pems):
            return "incomplete"
        try:
            if self._tls_front is not None:
                self._tls_front.reload(*pems)
                log.info("TLS front reloaded")
                return "reloaded"
            cls = _load_tls_front()
            if cls is None:
                log.error("TLS material present but the tls_front module is missing")
                return "unavailable"
            front = cls(
                str(self.params.ip),
                self.params.gateway_port,
                "127.0.0.1",
                self.params.gateway_port,
                *pems,
            )
            front.start()
            self._tls_front = front
            log.info("TLS front on %s:%d", self.params.ip, self.params.gateway_port)
            return "started"
        except Exception as exc:
            # Never echo the exception text: it may quote the PEM it choked on.
            log.error("TLS front failed: %s", type(exc).__name__)
            return f"failed ({type(exc).__name__})"

    def _ensure_gateway(self, _msg: dict[str, Any]) -> _Reply:
        try:
            status = self._start_gateway()
        except OSError as exc:
            return _err(f"cannot start the gateway: {exc.strerror or type(exc).__name__}")
        if status == "no-token":
            return _err("no gateway token: inject OPENCLAW_GATEWAY_TOKEN first")
        return _ok(status=status, pid=self.gateway.pid)

    def _get_stats(self, _msg: dict[str, Any]) -> _Reply:
        proc = self.settings.proc_root
        pid = self.gateway.pid
        rss = 0
        if pid is not None:
            rss = parse_meminfo(_read_text(proc / str(pid) / "status")).get("VmRSS", 0)
        mem = parse_meminfo(_read_text(proc / "meminfo"))
        load: list[float] = []
        for part in _read_text(proc / "loadavg").split()[:3]:
            with contextlib.suppress(ValueError):
                load.append(float(part))
        try:
            uptime = float(_read_text(proc / "uptime").split()[0])
        except (IndexError, ValueError):
            uptime = 0.0
        return _ok(
            gateway_pid=pid,
            gateway_rss_kb=rss,
            gateway_restarts=self.gateway.restarts,
            mem_total_kb=mem.get("MemTotal", 0),
            mem_available_kb=mem.get("MemAvailable", 0),
            load_avg=load,
            uptime_s=uptime,
        )

    def _get_logs(self, msg: dict[str, Any]) -> _Reply:
        service = msg.get("service", "gateway")
        paths = {"gateway": self.settings.gateway_log, "agent": self.settings.agent_log}
        if service not in paths:
            return _err("service must be 'gateway' or 'agent'")
        n = _int_field(msg, "max_chars", LOGS_DEFAULT_CHARS)
        if n is None or not 1 <= n <= LOGS_MAX_CHARS:
            return _err(f"max_chars must be an integer in 1..{LOGS_MAX_CHARS}")
        for h in logging.getLogger().handlers + log.handlers + _gateway_out.handlers:
            with contextlib.suppress(Exception):
                h.flush()
        return _ok(service=service, text=read_tail(paths[service], n))

    def _set_time(self, msg: dict[str, Any]) -> _Reply:
        ms = _int_field(msg, "epoch_ms")
        if ms is None or not 0 < ms < 2**53:
            return _err("epoch_ms must be a positive integer (milliseconds since the epoch)")
        try:
            if self.settings.clock == "file":
                self.settings.run_dir.mkdir(parents=True, exist_ok=True)
                (self.settings.run_dir / "clock").write_text(f"{ms}\n")
            else:
                time.clock_settime_ns(time.CLOCK_REALTIME, ms * 1_000_000)
        except OSError as exc:
            return _err(f"cannot set the clock: {exc.strerror or type(exc).__name__}")
        return _ok(epoch_ms=ms)

    def _live_holds(self) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            holds = self._state.holds
            for hid in [h for h, exp in holds.items() if exp <= now]:
                del holds[hid]
            return holds

    def _hold_acquire(self, msg: dict[str, Any]) -> _Reply:
        hid = msg.get("hold_id")
        ttl = _int_field(msg, "ttl_ms")
        if not isinstance(hid, str) or not 0 < len(hid) <= 128:
            return _err("hold_id must be a non-empty string of at most 128 characters")
        if ttl is None or not 0 < ttl <= MAX_HOLD_TTL_MS:
            return _err(f"ttl_ms must be an integer in 1..{MAX_HOLD_TTL_MS}")
        with self._lock:
            holds = self._live_holds()
            if hid not in holds and len(holds) >= MAX_HOLDS:
                return _err("too many holds")
            holds[hid] = time.monotonic() + ttl / 1000
            return _ok(holds=len(holds))

    def _hold_release(self, msg: dict[str, Any]) -> _Reply:
        hid = msg.get("hold_id")
        if not isinstance(hid, str) or not 0 < len(hid) <= 128:
            return _err("hold_id must be a non-empty string of at most 128 characters")
        with self._lock:
            released = self._live_holds().pop(hid, None) is not None
        return _ok(released=released)

    def _active_connections(self, _msg: dict[str, Any]) -> _Reply:
        proc = self.settings.proc_root
        tables = [_read_text(proc / "net" / "tcp"), _read_text(proc / "net" / "tcp6")]
        loop = ipaddress.IPv4Address("127.0.0.1")
        counts = count_established(tables, self.params.gateway_port, {self.params.ip, loop})
        front = counts[self.params.ip] if self.params.ip != loop else 0
        local = counts[loop]
        return _ok(
            tcp=front + local,
            tcp_front=front,
            tcp_loopback=local,
            cron=0,
            hold=len(self._live_holds()),
        )

    def _shutdown(self, _msg: dict[str, Any]) -> _Reply:
        reply = _ok(status="shutting-down")
        reply.after = self.shutdown
        return reply

    def shutdown(self) -> None:
        """Stop the gateway and the TLS front, then power off (or just exit, in tests)."""
        log.info("shutdown requested")
        self.close()
        self._power_off()

    def _default_power_off(self) -> None:
        if self.settings.shutdown_action == "poweroff":
            log.info("asking init (PID 1) to power off")
            with contextlib.suppress(OSError):
                os.kill(1, signal.SIGTERM)
        self.stopped.set()

    def close(self) -> None:
        self.gateway.stop()
        front, self._tls_front = self._tls_front, None
        if front is not None:
            with contextlib.suppress(Exception):
                front.stop()

    # ---- networking

    def bind(self, retry_s: float = 30.0) -> None:
        """Bind both listeners on the guest address (retrying while eth0 comes up)."""
        deadline = time.monotonic() + retry_s
        for port in (self.params.agent_port, self.params.health_port):
            while True:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((str(self.params.ip), port))
                    s.listen(128)
                    break
                except OSError as exc:
                    s.close()
                    if time.monotonic() >= deadline:
                        raise
                    log.warning("bind %s:%d failed (%s); retrying", self.params.ip, port, exc)
                    time.sleep(0.5)
            self._listeners.append(s)

    def serve(self) -> None:
        """Accept on both listeners in background threads."""
        for i, s in enumerate(self._listeners):
            threading.Thread(
                target=self._accept_loop, args=(s, i == 1), daemon=True, name=f"accept-{i}"
            ).start()

    @property
    def ports(self) -> tuple[int, int]:
        """(control, health) ports actually bound (tests bind port 0)."""
        control, health = (int(s.getsockname()[1]) for s in self._listeners)
        return control, health

    def stop_listening(self) -> None:
        for s in self._listeners:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._listeners = []

    def _accept_loop(self, listener: socket.socket, health: bool) -> None:
        while not self.stopped.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                if self.stopped.is_set() or listener.fileno() < 0:
                    return
                time.sleep(0.05)  # EMFILE and friends: back off, keep serving
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if not self._slots.acquire(blocking=False):
                log.warning("too many connections; refusing %s", peer)
                self._send_and_close(conn, _err("busy"))
                continue
            threading.Thread(
                target=self._connection, args=(conn, peer, health), daemon=True
            ).start()

    def _connection(self, conn: socket.socket, peer: str, health: bool) -> None:
        try:
            reply = self._read_and_handle(conn, peer, health)
            self._send_and_close(conn, reply)
            if reply.after is not None:
                reply.after()
        except Exception:
            log.exception("connection from %s failed", peer)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._slots.release()

    def _read_and_handle(self, conn: socket.socket, peer: str, health: bool) -> _Reply:
        try:
            raw = read_frame(conn, MAX_MESSAGE, time.monotonic() + self.settings.read_timeout_s)
        except TimeoutError:
            log.warning("request from %s timed out", peer)
            return _err("timed out reading the request")
        except OSError as exc:
            log.warning("request from %s failed: %s", peer, exc.strerror or exc)
            return _err("read failed")
        if raw is None:
            log.warning("rejected request from %s: message too large", peer)
            return _err("message too large")
        return self.handle(raw, health=health, peer=peer)

    @staticmethod
    def _send_and_close(conn: socket.socket, reply: Mapping[str, Any]) -> None:
        """Send one reply line, then drain briefly so close() does not reset the reply.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        the reply before the client reads it (oversized or pipelined requests). The
        drain is bounded in bytes and time, so a client that keeps sending cannot hold
        the thread.
        """
        try:
            conn.settimeout(5.0)
            conn.sendall(json.dumps(dict(reply), separators=(",", ":")).encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            drained = 0
            while drained < 4 * MAX_MESSAGE:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                conn.settimeout(remaining)
                chunk = conn.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()


def read_frame(sock: socket.socket, cap: int, deadline: float) -> bytes | None:
    """Read one message: up to ``\\n`` or EOF. None if it exceeds ``cap`` bytes.

    Never holds more than ``cap + 1`` bytes. Raises TimeoutError when ``deadline``
    (monotonic) passes, so a client that trickles bytes cannot hold a thread forever.
    """
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(65536, cap + 1 - len(buf)))
        except TimeoutError:
            raise TimeoutError from None
        if not chunk:
            return bytes(buf)
        start = len(buf)
        buf += chunk
        nl = buf.find(b"\n", start)
        if nl >= 0:
            return bytes(buf[:nl]) if nl <= cap else None
        if len(buf) > cap:
            return None


# --------------------------------------------------------------------------- main


def setup_logging(settings: Settings) -> None:
    """Agent log and gateway output: 1 MiB + one rotated file each: bounded."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(fmt)
    log.addHandler(stderr)
    log.setLevel(logging.INFO)
    _gateway_out.propagate = False
    _gateway_out.setLevel(logging.INFO)
    try:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.log_dir, 0o700)
        for logger, path, f in (
            (log, settings.agent_log, fmt),
            (_gateway_out, settings.gateway_log, logging.Formatter("%(message)s")),
        ):
            h = logging.handlers.RotatingFileHandler(
                path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
            )
            h.setFormatter(f)
            logger.addHandler(h)
    except OSError as exc:
        log.error("cannot open log files in %s: %s", settings.log_dir, exc)
        return
    # The file has everything; stderr (captured by lobster-init) only what is serious.
    stderr.setLevel(logging.ERROR)


def main() -> int:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"lobster-agent: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        params = BootParams.from_cmdline(settings.cmdline_file.read_text())
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    if params.agent_hash is None:
        log.error("no valid lobster.agent_hash on the kernel command line: refusing all requests")
    agent = Agent(settings, params)

    def on_signal(signum: int, _frame: object) -> None:
        agent.stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The host's first request carries TLS material; importing ssl costs most of a second
    # under emulation. Pay it before announcing readiness, so that "ready" means every
    # request is answered promptly.
    _load_tls_front()
    try:
        agent.bind()
    except OSError as exc:
        log.error("cannot listen on %s: %s", params.ip, exc)
        return 1
    # Only once the ports are ours: a second agent must not kill the first one's gateway.
    agent.gateway.kill_stale()
    agent.serve()
    log.info(
        "listening on %s:%d (control) and :%d (health)",
        params.ip,
        params.agent_port,
        params.health_port,
    )
    while not agent.stopped.wait(1.0):
        pass
    agent.stop_listening()
    agent.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
