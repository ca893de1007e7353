"""A small, synchronous QMP (QEMU Machine Protocol) client over a Unix socket.

QMP is line-delimited JSON: a greeting, then ``qmp_capabilities`` to leave negotiation
mode, then one ``{"execute": ...}`` per command, each answered by ``{"return": ...}`` or
``{"error": ...}``, with asynchronous ``{"event": ...}`` lines in between. The QEMU on
the other side runs as the tenant and may be compromised, so replies are bounded in size
and time and validated by shape (and by the ``id`` echoed back), never trusted blindly.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from lobsterd.errors import VmmError

MAX_LINE = 1 << 20  # bytes; a reply larger than this is an attack or a bug
DEFAULT_TIMEOUT_S = 5.0


class QmpError(VmmError):
    """QEMU answered a command with an error (class and description from QEMU)."""


class QmpClient:
    def __init__(self, path: Path | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    # --- connection ---------------------------------------------------------------------

    def connect(self) -> QmpClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise VmmError(f"cannot connect to QMP socket {self.path}: {exc}") from None
        self._sock = sock
        try:
            greeting = self._read_message()
            if not isinstance(greeting.get("QMP"), dict):
                raise VmmError(f"{self.path} did not greet with QMP")
            self.greeting = greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> QmpClient:
        return self.connect() if self._sock is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- protocol -------------------------------------------------------------------------

    def _read_message(self) -> dict[str, Any]:
        if self._sock is None:
            raise VmmError("QMP client is not connected")
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise VmmError(f"QMP message from {self.path} exceeds {MAX_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmmError(f"QMP on {self.path} did not answer within {self.timeout_s:g}s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise VmmError(f"QMP connection {self.path} failed: {exc}") from None
            if not chunk:
                raise EOFError(f"QMP socket {self.path} closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise VmmError(f"QMP sent something that is not JSON on {self.path}") from None
        if not isinstance(msg, dict):
            raise VmmError(f"QMP sent a non-object message on {self.path}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command``; return its ``return`` value or raise :class:`QmpError`."""
        if self._sock is None:
            raise VmmError("QMP client is not connected")
        self._next_id += 1
        ident = f"lobsterd-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise VmmError(f"cannot send {command!r} on QMP {self.path}: {exc}") from None
        while True:
            try:
                msg = self._read_message()
            except EOFError:
                if command == "quit":
                    return {}  # QEMU may close before its reply is read
                raise VmmError(f"QMP {self.path} closed while running {command!r}") from None
            if "event" in msg:
                if len(self.events) < 1000:
                    self.events.append(msg)
                continue
            if msg.get("id") != ident:
                continue  # a late reply to an earlier, timed-out command
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                cls = str(err.get("class", "GenericError"))[:100]
                desc = str(err.get("desc", ""))[:300]
                raise QmpError(f"QEMU refused {command!r}: {cls}: {desc}")
            if "return" in msg:
                return msg["return"]
            raise VmmError(f"unexpected QMP reply to {command!r} on {self.path}")

    # --- helpers --------------------------------------------------------------------------

    def status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``shutdown``, ...)."""
        ret = self.execute("query-status")
        if not isinstance(ret, dict) or not isinstance(ret.get("status"), str):
            raise VmmError(f"malformed query-status reply on {self.path}")
        return str(ret["status"])
