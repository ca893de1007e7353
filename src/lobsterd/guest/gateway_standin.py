#!/usr/bin/python3
"""Stand-in for the OpenClaw gateway in the small test image (/usr/local/bin/lobster-gateway).

Speaks just enough HTTP/1.1 and WebSocket (RFC 6455) to prove the path host → Caddy →
TLS front → gateway end to end:

* ``GET /`` → ``{"gateway": "standin", "tenant": <lobster.name>}``;
* ``/api/...`` (any method) requires ``Authorization: Bearer $OPENCLAW_GATEWAY_TOKEN``
  and echoes method, path and body length; 401 otherwise (fail closed: no token → 401);
* a WebSocket upgrade on any path (``/api/...`` needs the bearer token too) echoes text
  and binary frames, answers pings, and closes cleanly.

Binds ``127.0.0.1:$OPENCLAW_GATEWAY_PORT`` only and never resolves a name (a guest may
have no DNS at all). Standard library only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEADER = 64 * 1024
MAX_BODY = 1024 * 1024
MAX_FRAME = 1024 * 1024
IDLE_TIMEOUT_S = 120.0

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    413: "Payload Too Large",
    426: "Upgrade Required",
}


def tenant_name(cmdline_file: Path) -> str:
    """``lobster.name`` from the kernel command line ('' if absent)."""
    try:
        words = cmdline_file.read_text().split()
    except OSError:
        return ""
    for word in words:
        if word.startswith("lobster.name="):
            return word.partition("=")[2]
    return ""


def ws_accept(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()  # noqa: S324


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def parse_head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and headers (lower-cased names); ValueError when malformed."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("bad header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


class Gateway:
    def __init__(self, token: str, tenant: str) -> None:
        self.token = token
        self.tenant = tenant

    def authorised(self, headers: dict[str, str]) -> bool:
        if not self.token:
            return False
        supplied = headers.get("authorization", "")
        return hmac.compare_digest(supplied.encode(), f"Bearer {self.token}".encode())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
            ValueError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Mapping[str, object],
        *,
        keep_alive: bool,
        extra: str = "",
    ) -> None:
        data = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
            f"{extra}\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        """(method, path, headers, body), or None after answering an unusable request."""
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
        try:
            method, target, headers = parse_head(raw[:-4])
        except ValueError:
            await self._respond(writer, 400, {"error": "bad request"}, keep_alive=False)
            return None
        if "chunked" in headers.get("transfer-encoding", "").lower():
            error = {"error": "chunked bodies unsupported"}
            await self._respond(writer, 400, error, keep_alive=False)
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            await self._respond(writer, 413, {"error": "body too large"}, keep_alive=False)
            return None
        body = await reader.readexactly(length) if length else b""
        return method, target.split("?", 1)[0], headers, body

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; True to keep the connection for another."""
        try:
            request = await self._read_request(reader, writer)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return False  # clean close between requests
        if request is None:
            return False
        method, path, headers, body = request
        keep = headers.get("connection", "").lower() != "close"
        needs_auth = path == "/api" or path.startswith("/api/")
        if needs_auth and not self.authorised(headers):
            extra = 'WWW-Authenticate: Bearer realm="gateway"\r\n'
            error = {"error": "unauthorized"}
            await self._respond(writer, 401, error, keep_alive=keep, extra=extra)
        elif headers.get("upgrade", "").lower() == "websocket":
            await self._websocket(reader, writer, headers)
            return False
        elif path == "/" and method in {"GET", "HEAD"}:
            reply: dict[str, object] = {"gateway": "standin", "tenant": self.tenant, "ok": True}
            await self._respond(writer, 200, reply, keep_alive=keep)
        elif path == "/healthz":
            await self._respond(writer, 200, {"ok": True}, keep_alive=keep)
        elif needs_auth:
            reply = {
                "ok": True,
                "tenant": self.tenant,
                "method": method,
                "path": path,
                "body_bytes": len(body),
            }
            await self._respond(writer, 200, reply, keep_alive=keep)
        else:
            await self._respond(writer, 404, {"error": "not found"}, keep_alive=keep)
        return keep

    async def _websocket(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
    ) -> None:
        key = headers.get("sec-websocket-key", "")
        if headers.get("sec-websocket-version") != "13" or len(base64.b64decode(key + "==")) < 16:
            await self._respond(
                writer,
                426,
                {"error": "websocket version 13 required"},
                keep_alive=False,
                extra="Sec-WebSocket-Version: 13\r\n",
            )
            return
        writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {ws_accept(key)}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        message = bytearray()
        message_op = 0
        while True:
            fin, opcode, payload = await self._read_frame(reader)
            if opcode == 0x8:  # close: echo the status code back
                writer.write(encode_frame(0x8, payload[:2]))
                await writer.drain()
                return
            if opcode == 0x9:
                writer.write(encode_frame(0xA, payload))
            elif opcode in (0x1, 0x2, 0x0):
                if opcode != 0x0:
                    message_op = opcode
                    message.clear()
                message += payload
                if len(message) > MAX_FRAME:
                    writer.write(encode_frame(0x8, struct.pack("!H", 1009)))
                    await writer.drain()
                    return
                if fin:
                    writer.write(encode_frame(message_op, bytes(message)))
                    message.clear()
            elif opcode != 0xA:
                writer.write(encode_frame(0x8, struct.pack("!H", 1002)))
                await writer.drain()
                return
            await writer.drain()

    @staticmethod
    async def _read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), IDLE_TIMEOUT_S)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        if n > MAX_FRAME:
            raise ValueError("frame too large")
        mask = await reader.readexactly(4) if b1 & 0x80 else b""
        payload = await reader.readexactly(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload


async def serve(port: int, gateway: Gateway) -> None:
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", port, limit=MAX_HEADER)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"lobster-gateway (stand-in) listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()
    print("lobster-gateway (stand-in) stopped", flush=True)


def main() -> int:
    try:
        port = int(os.environ.get("OPENCLAW_GATEWAY_PORT", "9000"))
    except ValueError:
        print("OPENCLAW_GATEWAY_PORT is not a number", file=sys.stderr)
        return 2
    token = os.environ.get("OPENCLAW_GATEWAY_TOKEN", "")
    if not token:
        print("warning: OPENCLAW_GATEWAY_TOKEN unset; /api/* will refuse everyone", flush=True)
    cmdline = Path(os.environ.get("LOBSTER_CMDLINE_FILE", "/proc/cmdline"))
    asyncio.run(serve(port, Gateway(token, tenant_name(cmdline))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
