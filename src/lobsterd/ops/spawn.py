"""spawn: create a tenant and boot its VM, as ordered steps each with an undo.

The registry row is reserved first (status ``creating``, atomically allocating the slot,
addresses and uid), so every later resource can be named and found again: if this
process dies mid-way, ``evict`` — or a new ``spawn`` of the same name — finds the row and
removes whatever exists. Nothing waits a fixed time: the agent is polled for readiness.
"""

from __future__ import annotations

import json
import secrets as pysecrets
import shutil
import time
from dataclasses import dataclass
from typing import Any

from lobsterd.core.lifecycle import Status
from lobsterd.errors import LobsterError, TenantExists
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.host import Host
from lobsterd.ops.locks import tenant_lock
from lobsterd.ops.steps import Progress, StepRunner, annotate_rollback, no_progress
from lobsterd.registry import Tenant


@dataclass(frozen=True)
class SpawnResult:
    tenant: Tenant
    timings: dict[str, float]
    total_s: float
    accel: str

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.tenant.public_dict(),
            "accel": self.accel,
            "total_ms": round(self.total_s * 1000, 1),
            "steps_ms": {k: round(v * 1000, 1) for k, v in self.timings.items()},
        }


def spawn(
    host: Host,
    name: str,
    *,
    progress: Progress = no_progress,
    fault_after: str | None = None,
    vcpus: int | None = None,
    mem_mib: int | None = None,
) -> SpawnResult:
    from lobsterd.core.names import validate_name
    from lobsterd.image.artifacts import find_image

    validate_name(name)
    cfg = host.cfg
    started = time.monotonic()
    found = host.registry.find(name)
    if found is not None and found.status is not Status.CREATING:
        raise TenantExists(f'tenant "{name}" already exists ({found.status.value})')
    image = find_image(cfg)
    with tenant_lock(cfg.paths.locks, name):
        existing = host.registry.find(name)
        if existing is not None:
            if existing.status is not Status.CREATING:
                raise TenantExists(f'tenant "{name}" already exists ({existing.status.value})')
            # A spawn died mid-way (we hold the lock, so it is not running): clean up first.
            from lobsterd.ops.evict import teardown

            progress("recover", f"removing leftovers of an interrupted spawn of {name}", None)
            teardown(host, existing)
            host.registry.delete(name)

        spec = {
            "vcpus": vcpus or cfg.vm.vcpus,
            "mem_mib": mem_mib or cfg.vm.mem_mib,
            "egress": cfg.network.egress,
            "egress_allow": list(cfg.network.egress_allow),
            "conn_limit": cfg.network.conn_limit,
        }
        tenant = host.registry.reserve(name, cfg.vm.vmm, spec)
        runner = StepRunner(progress=progress, fault_after=fault_after)
        runner.on_rollback("registry", lambda: host.registry.delete(name))
        try:
            accel, tenant = _run_steps(host, runner, tenant, image)
        except BaseException as exc:
            done, total = runner.rollback()
            annotate_rollback(exc, done, total)
            code = exc.code if isinstance(exc, LobsterError) else type(exc).__name__
            host.record("spawn", tenant=name, outcome="error", error_code=code,
                        details={"rolled_back": f"{done}/{total}"})
            raise
        runner.commit()
        host.record("spawn", tenant=name, outcome="ok",
                    details={"slot": tenant.slot, "ip": tenant.guest_ip, "vm_pid": tenant.vm_pid})
        return SpawnResult(tenant, runner.timings, time.monotonic() - started, accel)


def _run_steps(host: Host, runner: StepRunner, tenant: Tenant, image: Any) -> tuple[str, Tenant]:
    from lobsterd.adapters import net, ssh
    from lobsterd.adapters.agent_client import AgentClient
    from lobsterd.adapters.kvm import detect_accel
    from lobsterd.adapters.storage import TenantVolume
    from lobsterd.adapters.vmm.base import VmHandle
    from lobsterd.ops.vmspec import build_vm_spec
    from lobsterd.security.ca import IssuedCert

    cfg = host.cfg
    name = tenant.name
    step = runner.step

    agent_token = pysecrets.token_urlsafe(32)
    gateway_token = pysecrets.token_urlsafe(32)

    def store_tokens() -> None:
        host.secrets.set_internal(name, rt.AGENT_TOKEN, agent_token)
        host.secrets.set_internal(name, rt.GATEWAY_TOKEN, gateway_token)

    step("secrets", "generating agent and gateway tokens", store_tokens,
         lambda: host.secrets.drop_internal(name))

    volume = TenantVolume(cfg, name)
    size = cfg.storage.overlay_size_mib
    step("volume", f"creating the tenant filesystem ({size} MiB overlay)",
         lambda: volume.create(size), volume.destroy, undo_if_failed=True)

    step("network", f"creating TAP {tenant.tap} ({tenant.host_ip} ↔ {tenant.guest_ip})",
         lambda: net.create_tap(tenant.tap, tenant.host_ip, 30),
         lambda: net.delete_tap(tenant.tap))

    tnet = host.tenant_net(tenant)
    step("firewall", "adding the tenant's nftables chains",
         lambda: host.firewall.add_tenant(tnet),
         lambda: host.firewall.remove_tenant(tnet))

    accel, _reason = detect_accel(cfg.vm.accel)
    spec = build_vm_spec(cfg, tenant, image, volume, accel, rt.token_hash(agent_token))
    handles: list[VmHandle] = []

    def boot() -> None:
        handle = host.vmm.boot(spec)
        handles.append(handle)
        host.registry.update(name, vm_pid=handle.pid, runtime={"vm": handle.to_dict()})

    def kill_vm() -> None:
        for h in handles:
            host.vmm.kill(h)
        host.vmm.kill_orphans(name)
        shutil.rmtree(spec.run_dir, ignore_errors=True)

    step("vm", f"booting the VM ({spec.vcpus} vCPU, {spec.mem_mib} MiB, {accel})", boot, kill_vm,
         undo_if_failed=True)

    # These run while the guest boots (Caddy retries upstreams for 30 s, so a route to a
    # guest that is still booting is harmless).
    pubkey = (step("ssh-key", "generating the exec key",
                      lambda: ssh.generate_keypair(cfg.paths.ssh_keys, name),
                      lambda: ssh.remove_keypair(cfg.paths.ssh_keys, name)))
    issued: IssuedCert = step("tls", "issuing the guest's TLS certificate",
                  lambda: host.ca.issue_server(name, tenant.guest_ip))

    def add_routes() -> None:
        from lobsterd.core.caddy_config import tenant_routes

        cert, key = host.ca.client_cert()
        routes = tenant_routes(
            tenant=name, domain=cfg.caddy.domain, guest_ip=tenant.guest_ip,
            gateway_port=cfg.network.gateway_port, ca_file=host.ca.ca_file,
            client_cert=cert, client_key=key, server_name=rt.guest_server_name(name))
        host.caddy.put_tenant_routes(name, routes)

    step("caddy", f"routing https://{rt.hostname(cfg, tenant)}", add_routes,
         lambda: _discard(host.caddy.delete_tenant_routes(name)))

    # Everything the guest receives is prepared while it boots.
    gw_conf = json.loads(json.dumps(cfg.gateway.default_config))
    gw = gw_conf.setdefault("gateway", {})
    gw["port"] = cfg.network.gateway_port
    gw.setdefault("auth", {})["token"] = gateway_token
    gw.setdefault("controlUi", {}).setdefault("allowedOrigins", []).append(
        f"https://{rt.hostname(cfg, tenant)}")
    payload = dict(host.secrets.resolve_for_tenant(name))
    payload.update({
        "OPENCLAW_GATEWAY_TOKEN": gateway_token,
        "OPENCLAW_CONFIG": json.dumps(gw_conf),
        "SSH_AUTHORIZED_KEY": pubkey,
        "TLS_SERVER_CERT": issued.cert_pem,
        "TLS_SERVER_KEY": issued.key_pem,
        "TLS_CLIENT_CA": host.ca.ca_pem(),
    })

    agent = AgentClient(tenant.guest_ip, cfg.network.agent_port, cfg.network.health_port,
                        agent_token, timeout_s=cfg.agent.request_timeout_s)
    # Polled every 30 ms: before the agent listens a probe costs the guest one RST, and
    # every poll interval saved is taken off the whole spawn.
    step("agent", "waiting for the guest agent",
         lambda: agent.wait_ready(cfg.agent.connect_timeout_s, interval_s=0.03))

    def inject() -> None:
        agent.inject_secrets(payload)
        host.record("secrets.inject", tenant=name, outcome="ok",
                    details={"names": sorted(payload)})

    step("inject", "injecting the gateway token, config and keys", inject)

    def activate() -> Tenant:
        runtime = {**host.registry.get(name).runtime,
                   "tls_not_after": issued.not_after.isoformat()}
        return host.registry.transition(name, Status.ACTIVE, runtime=runtime)

    final = step("registry", "marking the tenant active", activate)
    return accel, final


def _discard(_: object) -> None:
    """Undo callbacks return nothing; adapters may report whether they changed anything."""
