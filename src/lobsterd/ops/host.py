"""The host as operations see it: every adapter, built lazily from the config.

Operations take a :class:`Host` so that tests can run them against a throw-away root
(every path comes from the config) and so that one process builds each adapter once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lobsterd.config import Config
from lobsterd.registry import Registry, Tenant, open_registry

if TYPE_CHECKING:
    from lobsterd.adapters.caddy_admin import CaddyAdmin
    from lobsterd.adapters.firewall import Firewall
    from lobsterd.adapters.vmm.base import VmmDriver
    from lobsterd.core.firewall import HostNet, TenantNet
    from lobsterd.security.audit import AuditLog
    from lobsterd.security.ca import HostCA
    from lobsterd.security.secrets import SecretStore


@dataclass
class Host:
    cfg: Config
    actor: dict[str, Any] = field(default_factory=lambda: {"uid": os.getuid(), "pid": os.getpid()})
    request_id: str | None = None

    @cached_property
    def registry(self) -> Registry:
        return open_registry(self.cfg)

    @cached_property
    def secrets(self) -> SecretStore:
        from lobsterd.security.crypto import MasterKey
        from lobsterd.security.secrets import SecretStore

        return SecretStore(self.cfg, MasterKey.load(self.cfg))

    @cached_property
    def audit(self) -> AuditLog:
        from lobsterd.security.audit import audit_log_for

        return audit_log_for(self.cfg)

    @cached_property
    def vmm(self) -> VmmDriver:
        if self.cfg.vm.vmm == "qemu":
            from lobsterd.adapters.vmm.qemu import QemuDriver

            return QemuDriver(self.cfg)
        from lobsterd.errors import VmmError

        raise VmmError(
            f"vm.vmm = {self.cfg.vm.vmm!r} has no driver in this version of lobsterd",
            hint='set vm.vmm = "qemu"',
        )

    @cached_property
    def host_net(self) -> HostNet:
        from lobsterd.core.firewall import HostNet

        n = self.cfg.network
        return HostNet(
            pool=n.pool,
            gateway_port=n.gateway_port,
            agent_port=n.agent_port,
            health_port=n.health_port,
            blocked_cidrs=tuple(n.blocked_cidrs),
            uplink=n.uplink,
        )

    @cached_property
    def firewall(self) -> Firewall:
        from lobsterd.adapters.firewall import Firewall

        return Firewall(self.host_net)

    def tenant_net(self, t: Tenant) -> TenantNet:
        from lobsterd.core.firewall import TenantNet

        n = self.cfg.network
        return TenantNet(
            name=t.name,
            slot=t.slot,
            tap=t.tap,
            guest_ip=t.guest_ip,
            host_ip=t.host_ip,
            egress=t.spec.get("egress", n.egress),
            egress_allow=tuple(t.spec.get("egress_allow", n.egress_allow)),
            conn_limit=int(t.spec.get("conn_limit", n.conn_limit)),
        )

    @cached_property
    def ca(self) -> HostCA:
        from lobsterd.security.ca import HostCA

        return HostCA(self.cfg.paths.config_dir / "ca")

    @cached_property
    def caddy(self) -> CaddyAdmin:
        from lobsterd.adapters.caddy_admin import CaddyAdmin

        return CaddyAdmin(self.cfg.paths.run_dir / "caddy" / "admin.sock")

    def record(
        self,
        action: str,
        *,
        tenant: str | None,
        outcome: str,
        error_code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Audit ``action``; an audit failure must not hide the operation's own result."""
        self.audit.record(
            action,
            tenant=tenant,
            outcome=outcome,  # type: ignore[arg-type]
            error_code=error_code,
            request_id=self.request_id,
            actor=self.actor,
            details=details,
        )
