"""The VMM driver interface that QEMU and Firecracker both implement.

Operations above this line never know which VMM runs a tenant. A driver receives a
fully built :class:`VmSpec` (pure data, built in ``lobsterd.core``) and returns a
:class:`VmHandle` that is persisted (as a dict) in the registry's ``runtime`` column, so
another process (evict, the daemon) can stop the VM later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class DiskLimit:
    bytes_per_s: int | None = None
    ops_per_s: int | None = None


@dataclass(frozen=True)
class VmSpec:
    """Everything a VMM needs to boot one tenant's VM."""

    tenant: str
    vm_id: str
    vcpus: int
    mem_mib: int
    kernel: Path  # ELF vmlinux (Firecracker) or bzImage/vmlinux (QEMU)
    initrd: Path | None
    rootfs: Path  # shared, attached read-only
    overlay: Path  # the tenant's writable disk
    tap: str  # host TAP name, opened by root and handed over as an fd
    guest_mac: str
    boot_args: str  # must never contain a credential the agent accepts
    uid: int
    gid: int
    chroot: Path  # empty directory on the tenant's own filesystem
    run_dir: Path  # per-tenant control sockets, pid file, console log (root-only)
    cgroup: str  # leaf cgroup name under lobsterd's parent cgroup
    cgroup_mem_bytes: int
    cgroup_cpu_quota_us: int
    cgroup_cpu_period_us: int = 100_000
    cgroup_pids_max: int = 512  # tasks (threads) of the VMM: vCPUs, I/O workers, ...
    accel: str = "tcg"  # "kvm" or "tcg"
    debug_console: bool = False
    disk_limit: DiskLimit = field(default_factory=DiskLimit)
    extra: dict[str, Any] = field(default_factory=dict)
    tap_netns: str | None = None  # network namespace holding the TAP (None = the host's)


@dataclass(frozen=True)
class VmHandle:
    vmm: str
    pid: int
    control_socket: str  # QMP socket (QEMU) or API socket (Firecracker)
    cgroup: str
    started_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmHandle:
        return cls(**{k: data[k] for k in ("vmm", "pid", "control_socket", "cgroup", "started_at")})


@dataclass(frozen=True)
class VmStats:
    alive: bool
    rss_bytes: int | None = None
    cpu_seconds: float | None = None
    mem_limit_bytes: int | None = None


class VmmDriver(Protocol):
    name: str

    def boot(self, spec: VmSpec) -> VmHandle:
        """Start the VM; returns once the VMM process runs (not when the guest is up)."""

    def stop(self, handle: VmHandle, timeout_s: float) -> None:
        """Graceful stop, then kill after ``timeout_s``; idempotent (dead VM = no-op).
        Also removes the VM's cgroup."""

    def kill(self, handle: VmHandle) -> None:
        """Immediate kill + cgroup cleanup; idempotent."""

    def kill_orphans(self, tenant: str) -> int:
        """Kill VMM processes of ``tenant`` not known to the registry (a crash between
        process start and the registry write); returns how many were killed."""

    def pause(self, handle: VmHandle) -> None: ...

    def resume(self, handle: VmHandle) -> None: ...

    def snapshot_save(self, handle: VmHandle, dest_dir: Path) -> None: ...

    def snapshot_restore(self, spec: VmSpec, src_dir: Path) -> VmHandle: ...

    def stats(self, handle: VmHandle) -> VmStats: ...

    def is_alive(self, handle: VmHandle) -> bool: ...
