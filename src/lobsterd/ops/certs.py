"""Certificate rotation: guest TLS fronts and Caddy's client certificate.

Guest server certificates live 30 days and exist only in the guest (the host records
their expiry in the registry). Rotation issues a fresh key and certificate, hands them
to the guest over the authenticated agent channel (the TLS front reloads without
dropping connections), and re-renders Caddy's routes so a rotated client certificate is
picked up. Run by ``lobsterd certs rotate`` and by ``init``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from lobsterd.core.lifecycle import Status
from lobsterd.errors import LobsterError
from lobsterd.ops.host import Host
from lobsterd.ops.locks import tenant_lock

ROTATE_MARGIN = dt.timedelta(days=7)


@dataclass
class RotationReport:
    rotated: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rotated": self.rotated, "current": self.current, "failed": self.failed}


def due(not_after: str | None, now: dt.datetime, margin: dt.timedelta = ROTATE_MARGIN) -> bool:
    """True when a certificate expiring at ``not_after`` (ISO 8601) must be replaced now."""
    if not not_after:
        return True
    try:
        expiry = dt.datetime.fromisoformat(not_after)
    except ValueError:
        return True
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=dt.UTC)
    return expiry - now <= margin


def rotate_guest_certs(
    host: Host, *, force: bool = False, now: dt.datetime | None = None
) -> RotationReport:
    from lobsterd.ops.query import agent_for

    now = now or dt.datetime.now(dt.UTC)
    report = RotationReport()
    for t in host.registry.list():
        if t.status is not Status.ACTIVE:
            continue
        if not force and not due(t.runtime.get("tls_not_after"), now):
            report.current.append(t.name)
            continue
        try:
            with tenant_lock(host.cfg.paths.locks, t.name, wait_s=30):
                issued = host.ca.issue_server(t.name, t.guest_ip)
                agent_for(host, t).inject_secrets({
                    "TLS_SERVER_CERT": issued.cert_pem,
                    "TLS_SERVER_KEY": issued.key_pem,
                    "TLS_CLIENT_CA": host.ca.ca_pem(),
                })
                fresh = host.registry.get(t.name)
                host.registry.update(t.name, runtime={
                    **fresh.runtime, "tls_not_after": issued.not_after.isoformat()})
            report.rotated.append(t.name)
            host.record("certs.rotate", tenant=t.name, outcome="ok",
                        details={"serial": issued.serial})
        except LobsterError as exc:
            report.failed[t.name] = str(exc)
            host.record("certs.rotate", tenant=t.name, outcome="error", error_code=exc.code)
    return report
