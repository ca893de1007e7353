"""Assemble a tenant's :class:`VmSpec` from config, registry row and image."""

from __future__ import annotations

from typing import Any

from lobsterd.adapters.vmm.base import DiskLimit, VmSpec
from lobsterd.config import Config
from lobsterd.core.names import cgroup_name
from lobsterd.ops import tenant_runtime as rt
from lobsterd.registry import Tenant


def build_vm_spec(
    cfg: Config, tenant: Tenant, image: Any, volume: Any, accel: str, agent_hash: str
) -> VmSpec:
    from lobsterd.adapters.kvm import host_tsc_khz
    from lobsterd.core.bootargs import build_boot_args

    vcpus = int(tenant.spec.get("vcpus", cfg.vm.vcpus))
    mem_mib = int(tenant.spec.get("mem_mib", cfg.vm.mem_mib))
    boot_args = build_boot_args(
        guest_ip=tenant.guest_ip,
        host_ip=tenant.host_ip,
        prefix=30,
        agent_token_hash=agent_hash,
        agent_port=cfg.network.agent_port,
        health_port=cfg.network.health_port,
        gateway_port=cfg.network.gateway_port,
        tenant=tenant.name,
        accel=accel,
        tsc_khz=cfg.vm.tsc_khz or host_tsc_khz(),
        debug_console=cfg.vm.debug_console,
    )
    limit = cfg.vm.disk_limit
    disk = DiskLimit(
        bytes_per_s=limit.bandwidth.size if limit and limit.bandwidth else None,
        ops_per_s=limit.ops.size if limit and limit.ops else None,
    )
    kernel = image.vmlinux if cfg.vm.vmm == "firecracker" else image.bzimage
    return VmSpec(
        tenant=tenant.name,
        vm_id=tenant.vm_id,
        vcpus=vcpus,
        mem_mib=mem_mib,
        kernel=kernel,
        initrd=image.initrd,
        rootfs=image.rootfs,
        overlay=volume.paths.overlay,
        tap=tenant.tap,
        guest_mac=rt.guest_mac(tenant.slot),
        boot_args=boot_args,
        uid=tenant.uid,
        gid=tenant.gid,
        chroot=volume.paths.jail,
        run_dir=rt.vm_run_dir(cfg, tenant.name),
        cgroup=cgroup_name(tenant.name),
        cgroup_mem_bytes=(mem_mib + cfg.vm.cgroup_mem_overhead_mib) * 1024 * 1024,
        cgroup_cpu_quota_us=vcpus * 100_000 + cfg.vm.cgroup_cpu_overhead_pct * 1_000,
        accel=accel,
        debug_console=cfg.vm.debug_console,
        disk_limit=disk,
    )
