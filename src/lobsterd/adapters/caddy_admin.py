"""Client of Caddy's admin API, over the Unix socket lobsterd keeps it on.

Route changes are read-modify-write of the whole route list (one ``PATCH``, so Caddy
reloads once and never sees half a change), serialised across lobsterd processes by an
``flock`` next to the socket. Caddy 2.6 accepts duplicate ``@id``s without complaint, so
the no-duplicates rule is enforced here, by construction of the list.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lobsterd.core import caddy_config as cc
from lobsterd.errors import CaddyApiError

_ERROR_TEXT_MAX = 300
_BASE_URL = "http://caddy-admin"


def _caddy_message(resp: httpx.Response) -> str:
    """Caddy's own error text (its JSON ``error`` field when present), one line."""
    text = resp.text.strip()
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            text = body["error"]
    text = " ".join(text.split())
    if len(text) > _ERROR_TEXT_MAX:
        # Caddy chains context ("loading new config: loading http app module: ..."): the
        # cause is at the end, so keep the start and the end.
        head = _ERROR_TEXT_MAX // 3
        text = text[:head] + " … " + text[-(_ERROR_TEXT_MAX - head) :]
    return text or "(empty reply)"


@dataclass(frozen=True)
class RouteReconcile:
    """What :meth:`CaddyAdmin.reconcile_routes` changed (tenant names)."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    foreign_removed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.foreign_removed)


class CaddyAdmin:
    """HTTP over the admin Unix socket (httpx), with an empty ``Host`` header.

    Caddy 2.6 rejects ``Host: localhost`` (403) and a missing Host (400) on a Unix
    socket admin listener; an empty one is what it accepts.
    """

    def __init__(self, socket_path: Path, *, timeout_s: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s

    # -- transport ---------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        content = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Host": ""}
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            with httpx.Client(
                transport=transport,
                base_url=_BASE_URL,
                timeout=timeout_s or self.timeout_s,
            ) as client:
                resp = client.request(method, path, content=content, headers=headers)
        except (httpx.TransportError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise CaddyApiError(
                f"Caddy API {method} {path} failed (no connection): "
                f"cannot reach the admin socket {self.socket_path}: {reason}",
                hint="is Caddy running? lobsterd init starts it",
            ) from None
        if not 200 <= resp.status_code < 300:
            raise CaddyApiError(
                f"Caddy API {method} {path} failed ({resp.status_code}): {_caddy_message(resp)}"
            )
        return resp

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._request(method, path, body)
        text = resp.text.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise CaddyApiError(
                f"Caddy API {method} {path} returned invalid JSON: {text[:80]!r}"
            ) from None

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """One route writer at a time across lobsterd processes (the kernel drops the
        lock if its holder dies, so a crash never wedges later writers)."""
        lock_dir = self.socket_path.parent
        try:
            fd = os.open(lock_dir / "routes.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CaddyApiError(
                f"cannot lock Caddy's routes in {lock_dir}: {exc.strerror}",
                hint="is Caddy running? lobsterd init starts it",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- API ---------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise :class:`CaddyApiError` unless the admin API answers."""
        self._request("GET", "/config/", timeout_s=min(self.timeout_s, 5.0))

    def is_up(self) -> bool:
        try:
            self.ping()
        except CaddyApiError:
            return False
        return True

    def load(self, config: Mapping[str, Any]) -> None:
        """Replace Caddy's whole config (``POST /load``)."""
        self._request("POST", "/load", dict(config))

    def get_config(self, path: str = "") -> Any:
        return self._json("GET", "/config/" + path.lstrip("/"))

    def get_route(self, route_id: str) -> dict[str, Any] | None:
        """One route by its ``@id`` (None when Caddy has no object with that id)."""
        try:
            route = self._json("GET", f"/id/{route_id}")
        except CaddyApiError as exc:
            if "failed (404)" in exc.message:
                return None
            raise
        return route if isinstance(route, dict) else None

    def get_routes(self) -> list[dict[str, Any]]:
        """The ``lobster`` server's routes, in order."""
        routes = self._json("GET", cc.ROUTES_PATH)
        if routes is None:
            return []
        if not isinstance(routes, list):
            raise CaddyApiError(f"Caddy API GET {cc.ROUTES_PATH} returned a non-list")
        return [r for r in routes if isinstance(r, dict)]

    def _set_routes(self, routes: Sequence[Mapping[str, Any]]) -> None:
        ids = [r.get("@id") for r in routes if r.get("@id") is not None]
        if len(ids) != len(set(ids)):  # pragma: no cover - guarded by construction
            raise CaddyApiError("refusing to send Caddy a route list with duplicate @id")
        self._request("PATCH", cc.ROUTES_PATH, [dict(r) for r in routes])

    def put_tenant_routes(self, tenant: str, routes: Sequence[Mapping[str, Any]]) -> bool:
        """Install ``tenant``'s routes, replacing any with the same ids; True if changed."""
        with self._write_lock():
            current = self.get_routes()
            new = cc.with_tenant_routes(current, tenant, routes)
            if new == current:
                return False
            self._set_routes(new)
            return True

    def delete_tenant_routes(self, tenant: str) -> bool:
        """Remove ``tenant``'s routes; a tenant without routes is fine. True if changed."""
        with self._write_lock():
            current = self.get_routes()
            new = cc.without_tenant_routes(current, tenant)
            if new == current:
                return False
            self._set_routes(new)
            return True

    def reconcile_routes(
        self, desired: Mapping[str, Sequence[Mapping[str, Any]]]
    ) -> RouteReconcile:
        """Make the route list exactly ``desired`` (+ the catch-all): add missing,
        replace changed, drop routes of tenants not in ``desired`` and foreign routes."""
        with self._write_lock():
            current = self.get_routes()
            have = cc.routes_by_tenant(current)
            want = {t: [dict(r) for r in rs] for t, rs in desired.items()}
            foreign = [
                r for r in current if cc.tenant_of_route(r) is None and not cc.is_fallback(r)
            ]
            fallback_ok = (
                bool(current)
                and cc.is_fallback(current[-1])
                and current[-1] == cc.fallback_route()
                and sum(cc.is_fallback(r) for r in current) == 1
            )
            result = RouteReconcile(
                added=sorted(t for t in want if t not in have),
                replaced=sorted(t for t in want if t in have and have[t] != want[t]),
                removed=sorted(t for t in have if t not in want),
                foreign_removed=len(foreign),
            )
            if result.changed or not fallback_ok:
                self._set_routes(cc.desired_route_list(want))
            return result
