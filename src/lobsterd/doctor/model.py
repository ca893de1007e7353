"""The data doctor works with: statuses, results, fix actions, context and report.

Checks are pure functions over a :class:`~lobsterd.doctor.host.HostView` and a
:class:`DoctorContext`; they describe a fix as data (:data:`FixAction`) instead of doing
it, so that the same check can be tested on a fabricated tree, rendered as advice, and
applied by :mod:`lobsterd.doctor.fix` only when the operator asks for ``--fix``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lobsterd.config import Config

DEFAULT_FIRECRACKER = "/usr/local/bin/firecracker"
DEFAULT_JAILER = "/usr/local/bin/jailer"


class Status(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 - a status, not a password
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


_RANK = {Status.PASS: 0, Status.SKIP: 0, Status.WARN: 1, Status.FAIL: 2}


def worst(*statuses: Status) -> Status:
    """The most severe status (SKIP counts as PASS; no statuses means PASS)."""
    out = Status.PASS
    for s in statuses:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


class PersistKind(enum.StrEnum):
    """Files lobsterd owns outright under /etc; each maps a key to one setting."""

    SYSCTL = "sysctl"  # /etc/sysctl.d/90-lobsterd.conf: key = value
    MODPROBE = "modprobe"  # /etc/modprobe.d/lobsterd-kvm.conf: options <module> k=v
    TMPFILES = "tmpfiles"  # /etc/tmpfiles.d/lobsterd.conf: w <sysfs path> - - - - value
    MODULES_LOAD = "modules-load"  # /etc/modules-load.d/lobsterd.conf: module name


@dataclass(frozen=True)
class SetValue:
    """Write ``value`` into a /proc or /sys file (takes effect at once)."""

    path: str
    value: str

    def describe(self) -> str:
        return f"echo {self.value} > {self.path}"


@dataclass(frozen=True)
class Persist:
    """Record a setting in one of lobsterd's boot-time files (takes effect at boot)."""

    kind: PersistKind
    key: str  # sysctl name, "module.param", sysfs path or module name
    value: str = ""

    def describe(self) -> str:
        from lobsterd.doctor.fix import PERSIST_FILES, render_entry

        return f"{render_entry(self.kind, self.key, self.value)}  (in {PERSIST_FILES[self.kind]})"


@dataclass(frozen=True)
class RunCommand:
    """Run a host command (argv list, bounded by ``timeout``)."""

    argv: tuple[str, ...]
    timeout: float = 120.0

    def describe(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class DisableFstabSwap:
    """Comment out plain swap entries of /etc/fstab so swap stays off after a reboot."""

    def describe(self) -> str:
        return "comment out the swap lines of /etc/fstab"


FixAction = SetValue | Persist | RunCommand | DisableFstabSwap


@dataclass(frozen=True)
class CheckResult:
    """One recommendation, judged.

    ``evidence`` says what was read and from where, ``fix`` is the exact change an
    operator would make. ``actions`` is what ``--fix`` may do about it; ``opt_in`` names
    the extra flag a risky fix needs (e.g. ``swap`` for ``--fix-swap``).
    """

    id: str
    title: str
    status: Status
    evidence: str
    fix: str | None = None
    fixable_at_runtime: bool = False
    needs_reboot: bool = False
    actions: tuple[FixAction, ...] = ()
    opt_in: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": str(self.status),
            "evidence": self.evidence,
            "fix": self.fix,
            "fixable_at_runtime": self.fixable_at_runtime,
            "needs_reboot": self.needs_reboot,
            "opt_in": self.opt_in,
        }


@dataclass(frozen=True)
class TenantVm:
    """A running tenant VM: the processes in the tenant's cgroup."""

    name: str
    pids: tuple[int, ...]


@dataclass(frozen=True)
class DoctorContext:
    """What the checks need to know about lobsterd itself (from the config)."""

    max_tenants: int = 1024
    conn_limit: int = 1024
    vmm: str = "qemu"
    accel: str = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    firecracker_bin: str = DEFAULT_FIRECRACKER
    jailer_bin: str = DEFAULT_JAILER
    protected_paths: tuple[str, ...] = ()
    tenants_dir: str | None = None
    debug_console: bool = False
    net_rate_limited: bool = True
    disk_rate_limited: bool = True
    egress: str = "allow"
    today: date = field(default_factory=date.today)
    trusted_uid: int = 0
    trusted_gid: int = 0
    vms: tuple[TenantVm, ...] | None = None  # None: discover from the cgroup tree

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        today: date | None = None,
        vms: tuple[TenantVm, ...] | None = None,
    ) -> DoctorContext:
        p = cfg.paths
        vm = cfg.vm
        protected = (
            p.config_dir,
            p.state_dir,
            p.volumes,
            p.tenants_mnt,
            p.images,
            p.run_dir,
        )
        return cls(
            max_tenants=cfg.network.max_tenants,
            conn_limit=cfg.network.conn_limit,
            vmm=vm.vmm,
            accel=vm.accel,
            qemu_binary=vm.qemu_binary,
            # The VMM driver may add these keys to [vm]; until then the defaults hold.
            firecracker_bin=str(getattr(vm, "firecracker_binary", DEFAULT_FIRECRACKER)),
            jailer_bin=str(getattr(vm, "jailer_binary", DEFAULT_JAILER)),
            protected_paths=tuple(str(x) for x in protected),
            tenants_dir=str(p.tenants_mnt),
            debug_console=vm.debug_console,
            net_rate_limited=vm.net_rx_limit is not None and vm.net_tx_limit is not None,
            disk_rate_limited=vm.disk_limit is not None,
            egress=cfg.network.egress,
            today=today or date.today(),
            vms=vms,
        )


@dataclass(frozen=True)
class FixOutcome:
    """What ``--fix`` did for one action of one check."""

    check_id: str
    action: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check_id, "action": self.action, "ok": self.ok,
                "detail": self.detail}


@dataclass
class DoctorReport:
    results: list[CheckResult]
    fixes: list[FixOutcome] = field(default_factory=list)
    before: Mapping[str, Status] = field(default_factory=dict)  # status before --fix
    fixed: bool = False

    @property
    def has_fail(self) -> bool:
        return any(r.status == Status.FAIL for r in self.results)

    @property
    def failing_ids(self) -> list[str]:
        return [r.id for r in self.results if r.status == Status.FAIL]

    @property
    def needs_reboot(self) -> list[str]:
        return [r.id for r in self.results if r.needs_reboot and r.status != Status.PASS]

    def get(self, check_id: str) -> CheckResult:
        for r in self.results:
            if r.id == check_id:
                return r
        raise KeyError(check_id)

    def counts(self) -> dict[str, int]:
        out = {str(s): 0 for s in Status}
        for r in self.results:
            out[str(r.status)] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.has_fail,
            "counts": self.counts(),
            "results": [r.to_dict() for r in self.results],
            "fixed": self.fixed,
            "fixes": [f.to_dict() for f in self.fixes],
            "before_fix": {k: str(v) for k, v in self.before.items()},
            "needs_reboot": self.needs_reboot,
        }
