"""CPU and memory checks over fabricated /sys and /proc trees."""

from __future__ import annotations

import pytest

from lobsterd.doctor.checks_cpu import (
    SMT_CONTROL,
    VULN_DIR,
    check_arm_counter,
    check_cpu_vulns,
    check_edac,
    check_itlb_multihit,
    check_microcode,
    check_smt,
    classify_vuln,
)
from lobsterd.doctor.faketree import FakeTree
from lobsterd.doctor.model import DoctorContext, Persist, RunCommand, SetValue, Status

CPU = "/sys/devices/system/cpu"


def _siblings(tree: FakeTree) -> None:
    tree.file(f"{CPU}/cpu0/topology/thread_siblings_list", "0-1")
    tree.file(f"{CPU}/cpu1/topology/thread_siblings_list", "0-1")


# ---- smt -----------------------------------------------------------------------------

def test_smt_on_with_siblings_fails_and_is_fixable_at_runtime(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(SMT_CONTROL, "on")
    tree.file(f"{CPU}/smt/active", "1")
    _siblings(tree)
    r = check_smt(tree.host(), ctx)
    assert r.status == Status.FAIL
    assert r.fixable_at_runtime and r.needs_reboot
    assert SetValue(SMT_CONTROL, "off") in r.actions
    assert "nosmt" in (r.fix or "")
    assert "= on" in r.evidence and "0-1" in r.evidence


def test_smt_off_at_runtime_without_nosmt_warns_about_the_reboot(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(SMT_CONTROL, "off")
    tree.file("/proc/cmdline", "root=/dev/sda1 quiet loglevel=1")
    r = check_smt(tree.host(), ctx)
    assert r.status == Status.WARN and r.needs_reboot and not r.fixable_at_runtime


@pytest.mark.parametrize("cmdline", ["quiet nosmt", "quiet nosmt=force"])
def test_smt_off_and_nosmt_passes(tree: FakeTree, ctx: DoctorContext, cmdline: str) -> None:
    tree.file(SMT_CONTROL, "off")
    tree.file("/proc/cmdline", cmdline)
    assert check_smt(tree.host(), ctx).status == Status.PASS


def test_smt_forceoff_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file(SMT_CONTROL, "forceoff")
    assert check_smt(tree.host(), ctx).status == Status.PASS


def test_smt_notsupported_without_siblings_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file(SMT_CONTROL, "notsupported")
    tree.file("/proc/cmdline", "quiet")
    r = check_smt(tree.host(), ctx)
    assert r.status == Status.PASS and "notsupported" in r.evidence


def test_smt_that_the_kernel_cannot_switch_fails_with_reboot_advice(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(SMT_CONTROL, "notimplemented")
    _siblings(tree)
    r = check_smt(tree.host(), ctx)
    assert r.status == Status.FAIL
    assert not r.fixable_at_runtime and r.needs_reboot and not r.actions


# ---- cpu vulnerabilities -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Not affected", Status.PASS),
        ("Mitigation: PTI", Status.PASS),
        ("Mitigation: Clear CPU buffers; SMT disabled", Status.PASS),
        ("Mitigation: Clear CPU buffers; SMT vulnerable", Status.WARN),
        ("Vulnerable: Clear CPU buffers attempted, no microcode; SMT vulnerable", Status.FAIL),
        ("Vulnerable", Status.FAIL),
        ("Mitigation: PTE Inversion; VMX: vulnerable", Status.FAIL),
        ("KVM: Vulnerable", Status.FAIL),
        ("Unknown: Dependent on hypervisor status", Status.WARN),
    ],
)
def test_vulnerability_strings(text: str, expected: Status) -> None:
    assert classify_vuln(text) == expected


def test_a_vulnerable_file_fails_and_is_named(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file(f"{VULN_DIR}/mds", "Vulnerable: Clear CPU buffers attempted, no microcode")
    r = check_cpu_vulns(tree.host(), ctx)
    assert r.status == Status.FAIL and "mds: Vulnerable" in r.evidence


def test_all_mitigated_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_cpu_vulns(tree.host(), ctx).status == Status.PASS


def test_mitigations_off_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/proc/cmdline", "quiet mitigations=off")
    r = check_cpu_vulns(tree.host(), ctx)
    assert r.status == Status.FAIL and "mitigations=off" in r.evidence


def test_guest_attack_vector_opt_outs_warn(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/proc/cmdline", "mitigations=auto,no_guest_host,no_guest_guest quiet -- init")
    r = check_cpu_vulns(tree.host(), ctx)
    assert r.status == Status.WARN
    assert "guest-to-host" in r.evidence and "guest-to-guest" in r.evidence


def test_missing_vulnerability_directory_warns(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove(VULN_DIR)
    assert check_cpu_vulns(tree.host(), ctx).status == Status.WARN


# ---- microcode -------------------------------------------------------------------------

def test_microcode_in_the_early_initramfs_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    r = check_microcode(tree.host(), ctx)
    assert r.status == Status.PASS and "0x2b000603" in r.evidence


def test_microcode_missing_from_the_initramfs_warns_with_the_vendor_package(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file("/boot/initrd.img-6.1.0-28-amd64", b"\x1f\x8b compressed only")
    r = check_microcode(tree.host(), ctx)
    assert r.status == Status.WARN and "intel-microcode" in (r.fix or "")


def test_outdated_microcode_reported_by_the_kernel_fails(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(f"{VULN_DIR}/old_microcode", "Vulnerable")
    assert check_microcode(tree.host(), ctx).status == Status.FAIL


def test_virtual_machine_microcode(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/proc/cpuinfo", "vendor_id\t: AuthenticAMD\nmicrocode\t: 0x1000065\n"
              "flags\t\t: fpu hypervisor\n")
    assert check_microcode(tree.host(), ctx).status == Status.PASS  # old_microcode: N/A
    tree.remove(f"{VULN_DIR}/old_microcode")
    r = check_microcode(tree.host(), ctx)
    assert r.status == Status.WARN and "hypervisor" in (r.fix or "")


# ---- itlb_multihit -----------------------------------------------------------------------

NX = "/sys/module/kvm/parameters/nx_huge_pages"


def test_itlb_not_affected_and_nx_off_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_itlb_multihit(tree.host(), ctx).status == Status.PASS


def test_itlb_not_affected_but_nx_forced_warns_with_never(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(NX, "Y", mode=0o644)
    r = check_itlb_multihit(tree.host(), ctx)
    assert r.status == Status.WARN and r.fixable_at_runtime
    assert SetValue(NX, "never") in r.actions
    assert any(isinstance(a, Persist) and a.key == "kvm.nx_huge_pages" for a in r.actions)


def test_itlb_kvm_vulnerable_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file(f"{VULN_DIR}/itlb_multihit", "KVM: Vulnerable")
    r = check_itlb_multihit(tree.host(), ctx)
    assert r.status == Status.FAIL and SetValue(NX, "force") in r.actions


def test_itlb_affected_on_v2_without_favordynmods_offers_the_remount(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(f"{VULN_DIR}/itlb_multihit", "KVM: Mitigation: Split huge pages")
    r = check_itlb_multihit(tree.host(), ctx)
    assert r.status == Status.WARN
    assert RunCommand(("mount", "-o", "remount,favordynmods", "/sys/fs/cgroup")) in r.actions
    tree.mounts(["cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,favordynmods 0 0"])
    assert check_itlb_multihit(tree.host(), ctx).status == Status.PASS


def test_itlb_affected_on_v1_needs_the_boot_parameter(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(f"{VULN_DIR}/itlb_multihit", "KVM: Mitigation: Split huge pages")
    tree.mounts(["cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0"])
    r = check_itlb_multihit(tree.host(), ctx)
    assert r.status == Status.WARN and r.needs_reboot and "cgroup_favordynmods" in (r.fix or "")
    tree.file("/proc/cmdline", "quiet cgroup_favordynmods=true")
    assert check_itlb_multihit(tree.host(), ctx).status == Status.PASS


def test_itlb_unreported_is_skipped(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove(f"{VULN_DIR}/itlb_multihit")
    assert check_itlb_multihit(tree.host(), ctx).status == Status.SKIP


# ---- edac ------------------------------------------------------------------------------

def test_edac_clean_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_edac(tree.host(), ctx).status == Status.PASS


def test_edac_corrected_errors_warn_uncorrected_fail(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file("/sys/devices/system/edac/mc/mc0/ce_count", "7")
    assert check_edac(tree.host(), ctx).status == Status.WARN
    tree.file("/sys/devices/system/edac/mc/mc0/ue_count", "1")
    assert check_edac(tree.host(), ctx).status == Status.FAIL


def test_no_edac_warns(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove("/sys/devices/system/edac")
    r = check_edac(tree.host(), ctx)
    assert r.status == Status.WARN and "EDAC" in (r.fix or "")


# ---- arm counter -----------------------------------------------------------------------

def test_arm_counter(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_arm_counter(tree.host(), ctx).status == Status.SKIP
    assert check_arm_counter(tree.host(machine="aarch64"), ctx).status == Status.WARN
    tree.file("/proc/sys/kernel/osrelease", "6.8.0-40-generic")
    assert check_arm_counter(tree.host(machine="aarch64"), ctx).status == Status.PASS


def test_smt_on_without_online_siblings_warns_and_offers_off(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file(SMT_CONTROL, "on")
    tree.file(f"{CPU}/smt/active", "0")
    r = check_smt(tree.host(), ctx)
    assert r.status == Status.WARN and SetValue(SMT_CONTROL, "off") in r.actions
