"""Caddy's JSON config as lobsterd wants it (pure: data in, dicts out).

Shape of what lobsterd owns inside Caddy:

* the admin API on a Unix socket only (``admin.listen = unix//<path>``), so that file
  permissions decide who may rewrite routes; no TCP admin listener exists at all. The
  config is not persisted by Caddy (``admin.config.persist = false``): the base config
  lives in a file lobsterd writes and Caddy boots from, and tenant routes are re-added
  by lobsterd's reconcile from its registry, so Caddy's own autosave would only be a
  second, possibly stale, source of truth;
* one HTTP server ``lobster`` on the HTTPS port. Its route list is the tenants' routes
  (each tenant: WebSocket route, then HTTP route) followed by one final catch-all that
  answers 404, so a host name no tenant owns never reaches any guest. The plain-HTTP
  port carries no routes of lobsterd's: Caddy's automatic HTTPS puts its redirect (and
  ACME HTTP challenge) server there. A server listening on both ports would serve the
  tenant routes in clear text on the HTTP port, because the catch-all shadows the
  redirects Caddy would append;
* TLS at the edge: ``acme`` for a public domain, ``files`` (operator's certificate),
  ``internal`` (Caddy's own CA, trust-store installation disabled) for local domains.

Route ids: ``lobster-<tenant>`` (HTTP) and ``lobster-<tenant>.ws`` (WebSocket). The
separator is a dot because tenant names are DNS labels and cannot contain one: with a
``-ws`` suffix the tenants ``a`` and ``a-ws`` would share an id. The catch-all's id
``lobster.unknown-host`` cannot collide with a tenant for the same reason.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lobsterd.core.names import is_valid_name
from lobsterd.errors import ConfigInvalid, ValidationFailed

TlsMode = Literal["auto", "acme", "files", "internal"]
EffectiveTls = Literal["acme", "files", "internal"]

SERVER = "lobster"
ROUTES_PATH = f"/config/apps/http/servers/{SERVER}/routes"
FALLBACK_ID = "lobster.unknown-host"
_ID_PREFIX = "lobster-"
_WS_SUFFIX = ".ws"

LOCAL_SUFFIXES: tuple[str, ...] = (
    ".local",
    ".internal",
    ".test",
    ".localhost",
    ".lan",
    ".home.arpa",
    ".example",
    ".invalid",
)
"""Domains no public CA will certify: ACME would only fail (and hammer the CA)."""

DIAL_TIMEOUT = "3s"
TRY_DURATION = "30s"
TRY_INTERVAL = "500ms"
"""A request keeps retrying the dial this long: long enough to resume a suspended VM."""

_WS_CONNECTION_RE = r"(?i)(^|[\s,])upgrade($|[\s,])"
"""``Connection`` carries the ``upgrade`` token (any case, any position in the list)."""


def is_local_domain(domain: str) -> bool:
    """True for names only meaningful on this host or LAN (and for IP literals)."""
    d = domain.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(d)
    except ValueError:
        pass
    else:
        return True
    if d in {"localhost", "local", "internal", "test", "lan"} or "." not in d:
        return True
    return d.endswith(LOCAL_SUFFIXES)


def effective_tls_mode(mode: TlsMode, domain: str) -> EffectiveTls:
    """``auto`` means Caddy's internal CA for a local domain and ACME for a public one."""
    if mode == "auto":
        return "internal" if is_local_domain(domain) else "acme"
    return mode


def route_ids(tenant: str) -> tuple[str, str]:
    """(WebSocket route id, HTTP route id) of ``tenant``."""
    return f"{_ID_PREFIX}{tenant}{_WS_SUFFIX}", f"{_ID_PREFIX}{tenant}"


def tenant_of_route(route: Mapping[str, Any]) -> str | None:
    """The tenant owning ``route`` by its ``@id``, or None (catch-all, foreign, no id)."""
    rid = route.get("@id")
    if not isinstance(rid, str) or not rid.startswith(_ID_PREFIX):
        return None
    rest = rid[len(_ID_PREFIX) :]
    if rest.endswith(_WS_SUFFIX):
        rest = rest[: -len(_WS_SUFFIX)]
    return rest if is_valid_name(rest) else None


def fallback_route() -> dict[str, Any]:
    """Last route: any host that no tenant route matched gets a 404, never a guest."""
    return {
        "@id": FALLBACK_ID,
        "handle": [
            {
                "handler": "static_response",
                "status_code": 404,
                "body": "unknown host\n",
                "close": True,
            }
        ],
        "terminal": True,
    }


def is_fallback(route: Mapping[str, Any]) -> bool:
    return route.get("@id") == FALLBACK_ID


def base_config(
    *,
    admin_socket: Path,
    domain: str,
    tls_mode: TlsMode,
    cert_file: Path | None,
    key_file: Path | None,
    http_port: int,
    https_port: int,
    storage_dir: Path,
    bind_host: str = "",
    log_file: Path | None = None,
) -> dict[str, Any]:
    """The config Caddy boots with (written to disk) and ``/load`` receives.

    ``bind_host`` restricts the HTTPS listener to one address (tests use loopback);
    empty means every interface.
    """
    if not admin_socket.is_absolute():
        raise ConfigInvalid(f"Caddy admin socket must be an absolute path, got {admin_socket}")
    if http_port == https_port:
        raise ConfigInvalid("caddy.http_port and caddy.https_port must differ")
    mode = effective_tls_mode(tls_mode, domain)
    server: dict[str, Any] = {
        "listen": [f"{bind_host}:{https_port}"],
        "routes": [fallback_route()],
        "tls_connection_policies": [{}],
    }
    tls: dict[str, Any]
    if mode == "files":
        if cert_file is None or key_file is None:
            raise ConfigInvalid(
                'caddy.tls = "files" needs caddy.cert_file and caddy.key_file',
                hint="set both paths, or use tls = auto",
            )
        tls = {
            "certificates": {"load_files": [{"certificate": str(cert_file), "key": str(key_file)}]}
        }
        # Redirects stay on; Caddy must not try to obtain certificates of its own.
        server["automatic_https"] = {"disable_certificates": True}
    else:
        issuer = {"module": "internal"} if mode == "internal" else {"module": "acme"}
        tls = {"automation": {"policies": [{"issuers": [issuer]}]}}
    config: dict[str, Any] = {
        "admin": {
            "disabled": False,
            "listen": f"unix/{admin_socket}",
            "config": {"persist": False},
        },
        "storage": {"module": "file_system", "root": str(storage_dir)},
        "apps": {
            "http": {
                "http_port": http_port,
                "https_port": https_port,
                "servers": {SERVER: server},
            },
            "tls": tls,
            # Caddy must never add its internal root to the host's trust store.
            "pki": {"certificate_authorities": {"local": {"install_trust": False}}},
        },
    }
    if log_file is not None:
        config["logging"] = {
            "logs": {
                "default": {
                    "writer": {
                        "output": "file",
                        "filename": str(log_file),
                        "roll_size_mb": 10,
                        "roll_keep": 3,
                    },
                    "level": "INFO",
                }
            }
        }
    return config


def tenant_routes(
    *,
    tenant: str,
    domain: str,
    guest_ip: str,
    gateway_port: int,
    ca_file: Path,
    client_cert: Path,
    client_key: Path,
    server_name: str,
) -> list[dict[str, Any]]:
    """The two routes of ``tenant``: WebSocket first (it is the narrower match).

    Both proxy over mutual TLS to the guest's TLS front: Caddy verifies the guest's
    certificate against the host CA for ``server_name`` and presents its own client
    certificate. The HTTP route asks the upstream to close after each response: pooled
    idle connections would count as activity in the guest and keep it from suspending;
    a WebSocket needs its connection kept, so that route leaves ``Connection`` alone.
    """
    if not is_valid_name(tenant):
        raise ValidationFailed(f"invalid tenant name {tenant!r} for a Caddy route")
    try:
        ip = ipaddress.ip_address(guest_ip)
    except ValueError:
        raise ValidationFailed(f"invalid guest IP {guest_ip!r} for a Caddy route") from None
    if not 1 <= gateway_port <= 65535:
        raise ValidationFailed(f"invalid gateway port {gateway_port}")
    host = f"{tenant}.{domain}"
    dial = f"[{ip}]:{gateway_port}" if ip.version == 6 else f"{ip}:{gateway_port}"

    def proxy() -> dict[str, Any]:
        return {
            "handler": "reverse_proxy",
            "upstreams": [{"dial": dial}],
            "transport": {
                "protocol": "http",
                "dial_timeout": DIAL_TIMEOUT,
                "versions": ["1.1"],
                "tls": {
                    "root_ca_pem_files": [str(ca_file)],
                    "server_name": server_name,
                    "client_certificate_file": str(client_cert),
                    "client_certificate_key_file": str(client_key),
                },
            },
            "load_balancing": {"try_duration": TRY_DURATION, "try_interval": TRY_INTERVAL},
        }

    ws_id, http_id = route_ids(tenant)
    ws = {
        "@id": ws_id,
        "match": [
            {
                "host": [host],
                "header_regexp": {"Connection": {"pattern": _WS_CONNECTION_RE}},
            }
        ],
        "handle": [proxy()],
        "terminal": True,
    }
    http_handler = proxy()
    http_handler["headers"] = {"request": {"set": {"Connection": ["close"]}}}
    http = {
        "@id": http_id,
        "match": [{"host": [host]}],
        "handle": [http_handler],
        "terminal": True,
    }
    return [ws, http]


# -- route-list algebra (what the admin client sends) -----------------------------------


def _check_owned(tenant: str, routes: Sequence[Mapping[str, Any]]) -> None:
    ids = set(route_ids(tenant))
    seen: set[str] = set()
    for r in routes:
        rid = r.get("@id")
        if rid not in ids or rid in seen:
            raise ValidationFailed(
                f"route {rid!r} is not one of tenant {tenant!r}'s route ids or is repeated"
            )
        seen.add(rid)


def with_tenant_routes(
    current: Sequence[Mapping[str, Any]], tenant: str, routes: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``current`` with ``tenant``'s routes replaced by ``routes`` (no duplicates ever),
    placed where the old ones were or else just before the catch-all, which stays last."""
    _check_owned(tenant, routes)
    out: list[dict[str, Any]] = []
    inserted = False
    for r in current:
        if is_fallback(r):
            continue
        if tenant_of_route(r) == tenant:
            if not inserted:
                out.extend(dict(x) for x in routes)
                inserted = True
            continue
        out.append(dict(r))
    if not inserted:
        out.extend(dict(x) for x in routes)
    out.append(fallback_route())
    return out


def without_tenant_routes(
    current: Sequence[Mapping[str, Any]], tenant: str
) -> list[dict[str, Any]]:
    """``current`` minus ``tenant``'s routes, with the catch-all last."""
    out = [dict(r) for r in current if tenant_of_route(r) != tenant and not is_fallback(r)]
    out.append(fallback_route())
    return out


def desired_route_list(desired: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The complete route list for ``desired`` (tenant → its routes), catch-all last."""
    out: list[dict[str, Any]] = []
    for tenant in sorted(desired):
        _check_owned(tenant, desired[tenant])
        out.extend(dict(r) for r in desired[tenant])
    out.append(fallback_route())
    return out


def routes_by_tenant(routes: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in routes:
        t = tenant_of_route(r)
        if t is not None:
            out.setdefault(t, []).append(dict(r))
    return out


def render(config: Mapping[str, Any]) -> bytes:
    """Stable JSON text of a config (what is written to disk and compared)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def systemd_unit(
    *,
    caddy_binary: str,
    config_file: Path,
    user: str | None,
    home_dir: Path,
    description: str = "Caddy for lobsterd (tenant HTTPS edge)",
) -> str:
    """``lobsterd-caddy.service``: Caddy supervised by systemd, booting lobsterd's config.

    Type=notify: Caddy reports readiness to systemd. As the ``caddy`` user it gets only
    CAP_NET_BIND_SERVICE (for ports 80/443); ``ExecReload`` is absent on purpose —
    lobsterd changes the running config through the admin socket.
    """
    lines = [
        "[Unit]",
        f"Description={description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
    ]
    if user:
        lines += [
            f"User={user}",
            f"Group={user}",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        ]
    lines += [
        f'Environment="HOME={home_dir}"',
        f'Environment="XDG_CONFIG_HOME={home_dir}/config"',
        f'Environment="XDG_DATA_HOME={home_dir}/data"',
        f"ExecStart={caddy_binary} run --config {config_file}",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "ProtectSystem=full",
        "LimitNOFILE=1048576",
        "Restart=on-failure",
        "RestartSec=2s",
        "TimeoutStopSec=10s",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
