"""Read-only operations: tank (status table), token, logs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lobsterd.core.lifecycle import Status
from lobsterd.errors import LobsterError, ValidationFailed
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.host import Host
from lobsterd.registry import Tenant


def agent_for(host: Host, tenant: Tenant, timeout_s: float | None = None) -> Any:
    from lobsterd.adapters.agent_client import AgentClient

    cfg = host.cfg
    token = host.secrets.get_internal(tenant.name, rt.AGENT_TOKEN)
    return AgentClient(tenant.guest_ip, cfg.network.agent_port, cfg.network.health_port, token,
                       timeout_s=timeout_s or cfg.agent.request_timeout_s)


def tank_entry(host: Host, tenant: Tenant) -> dict[str, Any]:
    """One row of ``tank``: registry facts plus a live probe (process, agent, gateway)."""
    from lobsterd.adapters.vmm.base import VmHandle

    entry = tenant.public_dict()
    entry["host"] = rt.hostname(host.cfg, tenant)
    if tenant.status is not Status.ACTIVE:
        entry["state"] = tenant.status.value.upper()
        return entry
    checks: dict[str, bool] = {}
    vm = tenant.runtime.get("vm")
    checks["vm.process"] = vm is not None and host.vmm.is_alive(VmHandle.from_dict(vm))
    checks["vm.responsive"] = False
    checks["net.gateway"] = False
    if checks["vm.process"]:
        try:
            agent = agent_for(host, tenant, timeout_s=2.0)
            stats = agent.get_stats()
            checks["vm.responsive"] = True
            checks["net.gateway"] = stats.get("gateway_pid") is not None
            if stats.get("gateway_rss_kb"):
                entry["gateway_mem_mb"] = round(int(stats["gateway_rss_kb"]) / 1024)
        except LobsterError:
            pass
    entry["checks"] = checks
    entry["state"] = "HEALTHY" if all(checks.values()) else "DEGRADED"
    return entry


def tank(host: Host) -> list[dict[str, Any]]:
    tenants = host.registry.list()
    if not tenants:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(tenants))) as pool:
        return list(pool.map(lambda t: tank_entry(host, t), tenants))


def gateway_token(host: Host, name: str) -> str:
    tenant = host.registry.get(name)
    value = host.secrets.get_internal(tenant.name, rt.GATEWAY_TOKEN)
    host.record("token.read", tenant=name, outcome="ok")
    return value


def logs(host: Host, name: str, service: str = "gateway", max_chars: int = 4000) -> str:
    if service not in {"gateway", "agent"}:
        raise ValidationFailed(f"unknown log service {service!r}: use gateway or agent")
    tenant = host.registry.get(name)
    if tenant.status is not Status.ACTIVE:
        raise ValidationFailed(f'tenant "{name}" is {tenant.status.value}; logs need a running VM')
    text = str(agent_for(host, tenant).get_logs(service=service, max_chars=max_chars))
    host.record("logs.read", tenant=name, outcome="ok", details={"service": service})
    return text
