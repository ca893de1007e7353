from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lobsterd.core.lifecycle import Status
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.vmspec import build_vm_spec
from lobsterd.registry import Tenant
from tests.helpers import make_config


def tenant(spec: dict[str, object]) -> Tenant:
    return Tenant(name="demo", slot=3, uid=200_003, status=Status.CREATING, vm_pid=None,
                  vmm="qemu", created_at="", updated_at="", guest_ip="10.200.0.14",
                  host_ip="10.200.0.13", spec=spec)


def test_spec_limits_and_credentials(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, vm={"tsc_khz": 2_000_000, "cgroup_cpu_overhead_pct": 50,
                                    "cgroup_mem_overhead_mib": 256})
    image = SimpleNamespace(vmlinux=tmp_path / "vmlinux", bzimage=tmp_path / "bzImage",
                            initrd=tmp_path / "initrd.img", rootfs=tmp_path / "rootfs.ext4")
    volume = SimpleNamespace(paths=SimpleNamespace(overlay=tmp_path / "o.ext4",
                                                   jail=tmp_path / "jail"))
    token = "a-token-that-must-never-reach-the-guest"
    spec = build_vm_spec(cfg, tenant({"vcpus": 2, "mem_mib": 512}), image, volume, "tcg",
                         rt.token_hash(token))
    assert spec.cgroup_cpu_quota_us == 250_000  # two vCPUs + half a CPU for QEMU itself
    assert spec.cgroup_mem_bytes == (512 + 256) * 1024 * 1024
    assert (spec.uid, spec.gid, spec.tap, spec.chroot) == (200_003, 200_003, "lbt3",
                                                           tmp_path / "jail")
    assert spec.kernel == tmp_path / "bzImage"
    assert token not in spec.boot_args
    assert f"lobster.agent_hash={rt.token_hash(token)}" in spec.boot_args
    assert "tsc_early_khz=2000000" in spec.boot_args
    assert spec.guest_mac == "02:4c:42:00:00:03"
