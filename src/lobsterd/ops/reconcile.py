"""Rebuild host state from the registry (after a reboot, or on init re-run)."""

from __future__ import annotations

from lobsterd.core.lifecycle import Status
from lobsterd.errors import LobsterError
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.host import Host
from lobsterd.ops.steps import Progress, no_progress


def reconcile_caddy(host: Host) -> None:
    """Make Caddy run with lobsterd's base config and exactly the live tenants' routes."""
    from lobsterd.adapters.caddy import CaddySupervisor
    from lobsterd.core.caddy_config import tenant_routes

    CaddySupervisor(host.cfg).ensure_running()
    cfg = host.cfg
    cert, key = host.ca.client_cert()
    desired = {}
    for t in host.registry.list():
        if t.status in (Status.ACTIVE, Status.SUSPENDED, Status.SUSPENDING, Status.RESUMING):
            desired[t.name] = tenant_routes(
                tenant=t.name, domain=cfg.caddy.domain, guest_ip=t.guest_ip,
                gateway_port=cfg.network.gateway_port, ca_file=host.ca.ca_file,
                client_cert=cert, client_key=key, server_name=rt.guest_server_name(t.name))
    host.caddy.reconcile_routes(desired)


def reconcile_tenants(host: Host, progress: Progress = no_progress) -> list[str]:
    """Re-mount volumes and re-create TAPs; return lines describing what needs attention."""
    from lobsterd.adapters import net
    from lobsterd.adapters.storage import TenantVolume
    from lobsterd.adapters.vmm.base import VmHandle

    notes: list[str] = []
    for t in host.registry.list():
        if t.status in (Status.CREATING, Status.REMOVING):
            notes.append(f'tenant "{t.name}" is {t.status.value} (interrupted); '
                         f"run: lobsterd evict {t.name} --yes")
            continue
        try:
            progress("reconcile", f"{t.name}: volume and TAP", None)
            TenantVolume(host.cfg, t.name).mount()
            net.create_tap(t.tap, t.host_ip, 30)
        except LobsterError as exc:
            notes.append(f'tenant "{t.name}": {exc}')
            continue
        vm = t.runtime.get("vm")
        if t.status is Status.ACTIVE and not (vm and host.vmm.is_alive(VmHandle.from_dict(vm))):
            notes.append(f'tenant "{t.name}": VM is not running')
    return notes
