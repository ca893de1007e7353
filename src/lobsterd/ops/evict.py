"""evict: remove a tenant and every trace of it; idempotent and crash-tolerant.

``teardown`` removes everything a tenant *could* have, whether or not it exists, in the
reverse order of spawn; each removal tolerates "already gone". It is also how an
interrupted spawn is cleaned up, so it must not assume any step of spawn completed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from lobsterd.core.lifecycle import Status
from lobsterd.errors import EvictIncomplete, LobsterError
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.host import Host
from lobsterd.ops.locks import tenant_lock
from lobsterd.ops.steps import Progress, no_progress
from lobsterd.registry import Tenant


@dataclass
class TeardownReport:
    problems: list[str] = field(default_factory=list)
    # Problems that do not strand anything: Caddy routes of a tenant that is no longer
    # registered are removed by the next route reconcile (init, the Caddy watcher).
    warnings: list[str] = field(default_factory=list)


def evict(host: Host, name: str, *, progress: Progress = no_progress) -> TeardownReport:
    with tenant_lock(host.cfg.paths.locks, name):
        tenant = host.registry.get(name)
        if tenant.status is not Status.REMOVING:
            tenant = host.registry.transition(name, Status.REMOVING)
        report = teardown(host, tenant, progress=progress)
        if report.problems:
            # Keep the row (and the agent token): the next evict retries what is left.
            host.record("evict", tenant=name, outcome="error", error_code=EvictIncomplete.code,
                        details={"problems": report.problems})
            raise EvictIncomplete(
                f'could not remove everything of tenant "{name}": ' + "; ".join(report.problems),
                hint=f"fix the cause and run: lobsterd evict {name} --yes",
            )
        host.secrets.drop_tenant(name)
        host.registry.delete(name)
    host.record("evict", tenant=name, outcome="ok",
                details={"warnings": report.warnings} if report.warnings else None)
    return report


def teardown(host: Host, tenant: Tenant, *, progress: Progress = no_progress) -> TeardownReport:
    """Remove VM, routes, firewall, TAP, volume, keys — each step best effort, all tried."""
    from lobsterd.adapters import net, ssh
    from lobsterd.adapters.storage import TenantVolume
    from lobsterd.adapters.vmm.base import VmHandle

    cfg = host.cfg
    report = TeardownReport()

    def attempt(step: str, detail: str, fn: object, *, strands: bool = True) -> None:
        progress(step, detail, None)
        try:
            fn()  # type: ignore[operator]
        except (LobsterError, OSError) as exc:
            (report.problems if strands else report.warnings).append(f"{step}: {exc}")

    attempt("caddy", "removing routes", lambda: host.caddy.delete_tenant_routes(tenant.name),
            strands=False)

    def stop_vm() -> None:
        vm = tenant.runtime.get("vm")
        if vm:
            handle = VmHandle.from_dict(vm)
            _ask_guest_to_power_off(host, tenant)
            host.vmm.stop(handle, cfg.vm.stop_timeout_s)
        host.vmm.kill_orphans(tenant.name)

    attempt("vm", "stopping the VM", stop_vm)
    tnet = host.tenant_net(tenant)
    attempt("firewall", "removing the tenant's chains", lambda: host.firewall.remove_tenant(tnet))
    attempt("network", f"deleting TAP {tenant.tap}", lambda: net.delete_tap(tenant.tap))
    attempt("volume", "destroying the tenant filesystem",
            lambda: TenantVolume(cfg, tenant.name).destroy())
    attempt("ssh-key", "removing the exec key",
            lambda: ssh.remove_keypair(cfg.paths.ssh_keys, tenant.name))

    def run_dir() -> None:
        import shutil

        shutil.rmtree(rt.vm_run_dir(cfg, tenant.name), ignore_errors=True)

    attempt("run-dir", "removing runtime files", run_dir)
    return report


def _ask_guest_to_power_off(host: Host, tenant: Tenant) -> None:
    """Graceful path: the authenticated agent powers the guest off (fast, bounded)."""
    from lobsterd.adapters.agent_client import AgentClient

    with contextlib.suppress(Exception):
        token = host.secrets.get_internal(tenant.name, rt.AGENT_TOKEN)
        AgentClient(tenant.guest_ip, host.cfg.network.agent_port, host.cfg.network.health_port,
                    token, timeout_s=1.0).shutdown()
