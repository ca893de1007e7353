"""KVM, VMM and running-VM checks over fabricated trees."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import pytest

from lobsterd.doctor.checks_kvm import (
    MIN_TIMER,
    RECOMMENDED_MIN_TIMER_PERIOD_US,
    check_kvm_pit,
    check_kvm_usable,
    check_min_timer_period,
    check_seccomp,
    check_vm_uids,
    check_vmm_version,
)
from lobsterd.doctor.faketree import FakeTree
from lobsterd.doctor.host import discover_tenant_vms, kvm_pit_threads
from lobsterd.doctor.model import (
    DoctorContext,
    Persist,
    PersistKind,
    SetValue,
    Status,
    TenantVm,
)

# ---- kvm usable ---------------------------------------------------------------------------

def test_kvm_intel_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    r = check_kvm_usable(tree.host(), ctx)
    assert r.status == Status.PASS and "kvm_intel" in r.evidence


def test_kvm_pvm_is_detected_as_unable_to_run_ordinary_guests(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.remove("/sys/module/kvm_intel")
    tree.dir("/sys/module/kvm_pvm/parameters")
    r = check_kvm_usable(tree.host(), ctx)
    assert r.status == Status.WARN
    assert "kvm_pvm" in r.evidence and "lobsterd uses TCG" in r.evidence
    forced = check_kvm_usable(tree.host(), replace(ctx, accel="kvm"))
    assert forced.status == Status.FAIL


def test_no_dev_kvm_warns_tcg_fallback(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove("/dev/kvm")
    r = check_kvm_usable(tree.host(), ctx)
    assert r.status == Status.WARN and "TCG" in r.evidence
    assert check_kvm_usable(tree.host(), replace(ctx, accel="kvm")).status == Status.FAIL


# ---- min_timer_period -----------------------------------------------------------------------

def test_min_timer_low_and_writable_is_fixed_now_and_at_module_load(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(MIN_TIMER, "200", mode=0o644)
    r = check_min_timer_period(tree.host(), ctx)
    want = str(RECOMMENDED_MIN_TIMER_PERIOD_US)
    assert r.status == Status.WARN and r.fixable_at_runtime and not r.needs_reboot
    assert SetValue(MIN_TIMER, want) in r.actions
    assert Persist(PersistKind.MODPROBE, "kvm.min_timer_period_us", want) in r.actions


def test_min_timer_read_only_and_builtin_needs_the_cmdline(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(MIN_TIMER, "200", mode=0o444)
    tree.remove("/sys/module/kvm/initstate")  # built into the kernel
    r = check_min_timer_period(tree.host(), ctx)
    assert r.status == Status.WARN and not r.fixable_at_runtime and r.needs_reboot
    assert not r.actions
    assert "kvm.min_timer_period_us=1000" in (r.fix or "")


def test_min_timer_ok_or_absent(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_min_timer_period(tree.host(), ctx).status == Status.PASS
    tree.remove("/sys/module/kvm")
    assert check_min_timer_period(tree.host(), ctx).status == Status.SKIP


# ---- kvm-pit ------------------------------------------------------------------------------

def _v1_tree(tree: FakeTree) -> None:
    tree.mounts(["tmpfs /sys/fs/cgroup tmpfs rw 0 0",
                 "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0",
                 "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0"])
    for ctl in ("cpu,cpuacct", "memory"):
        tree.file(f"/sys/fs/cgroup/{ctl}/lobsterd/tenant-alpha/cgroup.procs", "4242")
        tree.file(f"/sys/fs/cgroup/{ctl}/lobsterd/tenant-alpha/tasks", "4242")


def test_kvm_pit_outside_the_v1_cgroup_fails_and_fix_moves_it(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    _v1_tree(tree)
    tree.process(4242, "qemu-system-x86", uid=200001, seccomp=2,
                 cgroup="3:memory:/lobsterd/tenant-alpha\n"
                        "2:cpu,cpuacct:/lobsterd/tenant-alpha\n0::/\n")
    tree.process(4250, "kvm-pit/4242", cgroup="3:memory:/\n2:cpu,cpuacct:/\n0::/\n")
    host = tree.host()
    assert kvm_pit_threads(host) == [(4250, 4242)]
    r = check_kvm_pit(host, ctx)
    assert r.status == Status.FAIL and r.fixable_at_runtime
    assert r.actions == (SetValue("/sys/fs/cgroup/cpu,cpuacct/lobsterd/tenant-alpha/tasks",
                                  "4250"),)
    assert "of alpha (pid 4242) is outside its cgroup in cpu,cpuacct" in r.evidence
    # Once the thread is in the VM's cpu hierarchy, the check passes (memory is not CPU).
    tree.process(4250, "kvm-pit/4242",
                 cgroup="3:memory:/\n2:cpu,cpuacct:/lobsterd/tenant-alpha\n0::/\n")
    assert check_kvm_pit(tree.host(), ctx).status == Status.PASS


def test_kvm_pit_on_cgroup_v2(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/sys/fs/cgroup/lobsterd/tenant-beta/cgroup.procs", "777")
    tree.process(777, "firecracker", uid=200002, seccomp=2,
                 cgroup="0::/lobsterd/tenant-beta\n", nspid=(777, 1))
    # A VMM in its own pid namespace names its thread after its pid there (1).
    tree.process(780, "kvm-pit/1", cgroup="0::/\n")
    r = check_kvm_pit(tree.host(), ctx)
    assert r.status == Status.FAIL
    assert r.actions == (SetValue("/sys/fs/cgroup/lobsterd/tenant-beta/cgroup.procs", "780"),)


def test_kvm_pit_ambiguous_across_pid_namespaces_warns(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    for name, pid in (("a", 501), ("b", 601)):
        tree.file(f"/sys/fs/cgroup/lobsterd/tenant-{name}/cgroup.procs", str(pid))
        tree.process(pid, "firecracker", uid=pid, seccomp=2,
                     cgroup=f"0::/lobsterd/tenant-{name}\n", nspid=(pid, 1))
    tree.process(510, "kvm-pit/1", cgroup="0::/\n")
    r = check_kvm_pit(tree.host(), ctx)
    assert r.status == Status.WARN and "ambiguous" in r.evidence and not r.actions


def test_kvm_pit_without_vms_or_without_pit_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_kvm_pit(tree.host(), ctx).status == Status.PASS
    tree.file("/sys/fs/cgroup/lobsterd/tenant-c/cgroup.procs", "900")
    tree.process(900, "qemu-system-x86", uid=200003, seccomp=2,
                 cgroup="0::/lobsterd/tenant-c\n")
    r = check_kvm_pit(tree.host(), ctx)
    assert r.status == Status.PASS and "without a kvm-pit thread" in r.evidence


def test_discovery_merges_hierarchies(tree: FakeTree) -> None:
    _v1_tree(tree)
    tree.file("/sys/fs/cgroup/memory/lobsterd/tenant-alpha/cgroup.procs", "4242\n4243\n")
    tree.file("/sys/fs/cgroup/cpu,cpuacct/lobsterd/tenant-empty/cgroup.procs", "")
    tree.file("/sys/fs/cgroup/cpu,cpuacct/lobsterd/other/cgroup.procs", "1")
    assert discover_tenant_vms(tree.host()) == (TenantVm("alpha", (4242, 4243)),)


# ---- seccomp and uids -------------------------------------------------------------------

def _vm(tree: FakeTree, name: str, pid: int, uid: int, seccomp: int = 2,
        argv: tuple[str, ...] = ()) -> None:
    tree.file(f"/sys/fs/cgroup/lobsterd/tenant-{name}/cgroup.procs", str(pid))
    tree.process(pid, "qemu-system-x86", uid=uid, seccomp=seccomp,
                 cgroup=f"0::/lobsterd/tenant-{name}\n", cmdline=argv)


def test_seccomp(tree: FakeTree, ctx: DoctorContext) -> None:
    _vm(tree, "a", 100, 200001)
    assert check_seccomp(tree.host(), ctx).status == Status.PASS
    _vm(tree, "b", 101, 200002, seccomp=0)
    r = check_seccomp(tree.host(), ctx)
    assert r.status == Status.FAIL and "b pid 101: Seccomp = 0" in r.evidence


def test_seccomp_disabled_on_the_firecracker_command_line_fails(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    _vm(tree, "a", 100, 200001, argv=("--api-sock", "/a.sock", "--no-seccomp"))
    assert check_seccomp(tree.host(), ctx).status == Status.FAIL


def test_kernel_without_seccomp_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove("/proc/sys/kernel/seccomp")
    assert check_seccomp(tree.host(), ctx).status == Status.FAIL


def test_vm_uids(tree: FakeTree, ctx: DoctorContext) -> None:
    _vm(tree, "a", 100, 200001)
    _vm(tree, "b", 101, 200002)
    assert check_vm_uids(tree.host(), ctx).status == Status.PASS
    _vm(tree, "b", 101, 200001)
    r = check_vm_uids(tree.host(), ctx)
    assert r.status == Status.FAIL and "shared by a, b" in r.evidence
    _vm(tree, "b", 101, 0)
    assert "runs as root" in check_vm_uids(tree.host(), ctx).evidence


def test_vms_given_as_data_override_discovery(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.process(55, "qemu-system-x86", uid=0, seccomp=2)
    given = replace(ctx, vms=(TenantVm("z", (55,)),))
    assert check_vm_uids(tree.host(), given).status == Status.FAIL
    assert check_vm_uids(tree.host(), ctx).status == Status.PASS


# ---- vmm version --------------------------------------------------------------------------

def test_qemu_version(tree: FakeTree, ctx: DoctorContext) -> None:
    r = check_vmm_version(tree.host(), ctx)
    assert r.status == Status.PASS and "8.2.2" in r.evidence
    tree.runner.set(["/usr/bin/qemu-system-x86_64", "--version"], "QEMU emulator version 6.0.0")
    assert check_vmm_version(tree.host(), ctx).status == Status.WARN
    tree.remove("/usr/bin/qemu-system-x86_64")
    r = check_vmm_version(tree.host(), ctx)
    assert r.status == Status.FAIL and "not found" in r.evidence


def _firecracker(tree: FakeTree, fc: str, jailer: str | None) -> DoctorContext:
    tree.executable("/usr/local/bin/firecracker", f"Firecracker v{fc}\n")
    if jailer is not None:
        tree.executable("/usr/local/bin/jailer", f"Jailer v{jailer}\n")
    return DoctorContext(vmm="firecracker", today=date(2026, 12, 3))


@pytest.mark.parametrize(
    ("fc", "jailer", "expected"),
    [
        ("1.16.1", "1.16.1", Status.PASS),
        ("1.13.1", "1.13.1", Status.FAIL),
        ("1.14.4", "1.14.4", Status.WARN),
        ("1.15.0", "1.15.0", Status.FAIL),
        ("1.16.1", "1.14.0", Status.FAIL),  # the jailer carries CVE-2026-1386
        ("1.16.1", "1.16.0", Status.WARN),  # mixed releases
        ("1.16.1", None, Status.FAIL),  # no jailer: lobsterd will not run Firecracker
    ],
)
def test_firecracker_and_jailer_versions(
    tree: FakeTree, fc: str, jailer: str | None, expected: Status
) -> None:
    c = _firecracker(tree, fc, jailer)
    r = check_vmm_version(tree.host(), c)
    assert r.status == expected, r.evidence
    if expected == Status.FAIL and jailer is not None and jailer != fc:
        assert "CVE-2026-1386" in r.evidence


def test_a_broken_kvm_module_wins_over_a_good_one(tree: FakeTree, ctx: DoctorContext) -> None:
    # Same rule as the VMM driver's accelerator choice: kvm_pvm present means TCG.
    tree.dir("/sys/module/kvm_pvm")
    assert check_kvm_usable(tree.host(), ctx).status == Status.WARN
