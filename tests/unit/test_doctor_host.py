"""Memory, network, console, path, cgroup and log checks over fabricated trees."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from lobsterd.doctor.checks_host import (
    CONNTRACK_MAX,
    KSM_RUN,
    PRINTK,
    RP_DEFAULT,
    check_cgroup_version,
    check_conntrack_max,
    check_console_quiet,
    check_guest_console,
    check_host_logs,
    check_ip_forward,
    check_jail_paths,
    check_ksm,
    check_rate_limits,
    check_rp_filter,
    check_swap,
    required_conntrack,
)
from lobsterd.doctor.faketree import FakeTree
from lobsterd.doctor.model import (
    DisableFstabSwap,
    DoctorContext,
    Persist,
    PersistKind,
    RunCommand,
    SetValue,
    Status,
)

# ---- ksm --------------------------------------------------------------------------------

def test_ksm_running_fails_and_fix_unmerges(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file(KSM_RUN, "1")
    tree.file("/sys/kernel/mm/ksm/pages_shared", "1200")
    r = check_ksm(tree.host(), ctx)
    assert r.status == Status.FAIL and r.fixable_at_runtime
    assert SetValue(KSM_RUN, "2") in r.actions
    assert Persist(PersistKind.TMPFILES, KSM_RUN, "0") in r.actions
    assert "pages_shared = 1200" in r.evidence


def test_ksm_stopped_with_merged_pages_warns(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/sys/kernel/mm/ksm/pages_shared", "5")
    assert check_ksm(tree.host(), ctx).status == Status.WARN


@pytest.mark.parametrize("run", ["0", "2"])
def test_ksm_off_passes(tree: FakeTree, ctx: DoctorContext, run: str) -> None:
    tree.file(KSM_RUN, run)
    assert check_ksm(tree.host(), ctx).status == Status.PASS


def test_no_ksm_in_kernel_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove("/sys/kernel/mm/ksm")
    assert check_ksm(tree.host(), ctx).status == Status.PASS


# ---- swap ---------------------------------------------------------------------------------

SWAPS_HEAD = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


def test_plain_swap_warns_and_its_fix_is_opt_in(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/proc/swaps", SWAPS_HEAD + "/dev/sda2  partition\t8388604\t0\t-2\n")
    r = check_swap(tree.host(), ctx)
    assert r.status == Status.WARN and r.opt_in == "swap"
    assert RunCommand(("swapoff", "/dev/sda2"), timeout=600.0) in r.actions
    assert DisableFstabSwap() in r.actions
    assert "--fix-swap" in (r.fix or "")


def test_encrypted_and_zram_swap_pass(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/proc/swaps", SWAPS_HEAD + "/dev/dm-1 partition 100 0 -2\n"
              "/dev/zram0 partition 100 0 100\n")
    tree.file("/sys/block/dm-1/dm/uuid", "CRYPT-PLAIN-cryptswap")
    r = check_swap(tree.host(), ctx)
    assert r.status == Status.PASS and "dm-crypt" in r.evidence and "zram" in r.evidence


def test_swap_on_a_non_crypt_device_mapper_warns(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.file("/proc/swaps", SWAPS_HEAD + "/dev/mapper/vg-swap partition 100 0 -2\n")
    tree.symlink("/dev/mapper/vg-swap", "../dm-3")
    tree.file("/sys/block/dm-3/dm/uuid", "LVM-abc")
    assert check_swap(tree.host(), ctx).status == Status.WARN


def test_no_swap_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_swap(tree.host(), ctx).status == Status.PASS


# ---- conntrack ------------------------------------------------------------------------

def test_conntrack_thresholds(tree: FakeTree, ctx: DoctorContext) -> None:
    small = replace(ctx, max_tenants=100, conn_limit=1000)
    need = required_conntrack(small)
    assert need == 100 * 1000 + 65536
    tree.file(CONNTRACK_MAX, str(need))
    assert check_conntrack_max(tree.host(), small).status == Status.PASS
    tree.file(CONNTRACK_MAX, str(need - 1))
    r = check_conntrack_max(tree.host(), small)
    assert r.status == Status.WARN and r.fixable_at_runtime
    assert SetValue(CONNTRACK_MAX, str(need)) in r.actions
    assert Persist(PersistKind.SYSCTL, "net.netfilter.nf_conntrack_max", str(need)) in r.actions
    assert f"nf_conntrack_max={need}" in (r.fix or "")
    tree.file(CONNTRACK_MAX, "1000")  # one tenant at its limit fills the whole table
    assert check_conntrack_max(tree.host(), small).status == Status.FAIL


def test_conntrack_not_loaded_warns_and_persists(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.remove("/proc/sys/net/netfilter")
    r = check_conntrack_max(tree.host(), ctx)
    assert r.status == Status.WARN and not r.fixable_at_runtime
    assert Persist(PersistKind.MODULES_LOAD, "nf_conntrack") in r.actions
    assert not any(isinstance(a, SetValue) for a in r.actions)


# ---- console ----------------------------------------------------------------------------

def test_console_verbose_warns_with_runtime_and_reboot_parts(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file("/proc/cmdline", "console=ttyS0 root=/dev/vda")
    tree.file(PRINTK, "7\t4\t1\t7")
    r = check_console_quiet(tree.host(), ctx)
    assert r.status == Status.WARN and r.fixable_at_runtime and r.needs_reboot
    assert SetValue(PRINTK, "1 4 1 7") in r.actions
    assert "quiet loglevel=1" in (r.fix or "")
    assert "console=ttyS0" in r.evidence


def test_console_quiet_only_at_runtime_still_needs_the_cmdline(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.file("/proc/cmdline", "quiet")
    r = check_console_quiet(tree.host(), ctx)
    assert r.status == Status.WARN and r.needs_reboot and not r.actions


def test_console_quiet_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_console_quiet(tree.host(), ctx).status == Status.PASS


def test_guest_console(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_guest_console(tree.host(), ctx).status == Status.PASS
    r = check_guest_console(tree.host(), replace(ctx, debug_console=True))
    assert r.status == Status.WARN and "debug_console" in (r.fix or "")


# ---- jail paths ---------------------------------------------------------------------------

def test_jail_paths_safe_tree_passes(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.dir("/var/lib/lobsterd/tenants/a/jail", 0o755)
    c = replace(ctx, protected_paths=("/var/lib/lobsterd",),
                tenants_dir="/var/lib/lobsterd/tenants")
    r = check_jail_paths(tree.host(), c)
    assert r.status == Status.PASS
    assert "/var/lib/lobsterd/tenants/a/jail" in r.evidence


def test_a_world_writable_parent_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.dir("/var/lib/lobsterd/tenants/a/jail", 0o755)
    tree.dir("/var/lib", 0o777)
    c = replace(ctx, protected_paths=("/var/lib/lobsterd",))
    r = check_jail_paths(tree.host(), c)
    assert r.status == Status.FAIL
    assert "/var/lib is writable by everyone" in r.evidence
    assert "chmod go-w /var/lib" in (r.fix or "")


def test_a_group_writable_binary_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.executable("/usr/local/bin/firecracker")
    os.chmod(tree.p("/usr/local/bin/firecracker"), 0o775)
    c = replace(ctx, vmm="firecracker", trusted_gid=ctx.trusted_gid + 1)
    r = check_jail_paths(tree.host(), c)
    assert r.status == Status.FAIL and "firecracker is writable by group" in r.evidence


def test_a_path_owned_by_another_user_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.dir("/srv/jailer", 0o755)
    c = replace(ctx, protected_paths=("/srv/jailer",), trusted_uid=ctx.trusted_uid + 1)
    r = check_jail_paths(tree.host(), c)
    assert r.status == Status.FAIL and "is owned by uid" in r.evidence


def test_sticky_tmp_is_fine_for_an_existing_child_but_not_a_missing_one(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.dir("/tmp", 0o1777)
    tree.dir("/tmp/lobster", 0o700)
    ok = replace(ctx, protected_paths=("/tmp/lobster/state",))
    assert check_jail_paths(tree.host(), ok).status == Status.PASS
    missing = replace(ctx, protected_paths=("/tmp/nothere/state",))
    r = check_jail_paths(tree.host(), missing)
    assert r.status == Status.FAIL and "anyone could create it" in r.evidence
    itself = replace(ctx, protected_paths=("/tmp",))
    assert check_jail_paths(tree.host(), itself).status == Status.FAIL


def test_symlinks_are_followed_and_their_targets_checked(
    tree: FakeTree, ctx: DoctorContext
) -> None:
    tree.dir("/data", 0o777)
    tree.dir("/data/lobsterd", 0o755)
    tree.symlink("/var/lib/lobsterd", "/data/lobsterd")
    c = replace(ctx, protected_paths=("/var/lib/lobsterd/tenants",))
    r = check_jail_paths(tree.host(), c)
    assert r.status == Status.FAIL and "/data is writable by everyone" in r.evidence
    os.chmod(tree.p("/data"), 0o755)
    assert check_jail_paths(tree.host(), c).status == Status.PASS


def test_relative_symlinks(tree: FakeTree, ctx: DoctorContext) -> None:
    tree.dir("/opt/real", 0o755)
    tree.dir("/opt/bad", 0o757)
    tree.symlink("/opt/link", "bad/../real")
    c = replace(ctx, protected_paths=("/opt/link",))
    assert check_jail_paths(tree.host(), c).status == Status.PASS  # bad/.. is never entered


# ---- network -----------------------------------------------------------------------------

def test_ip_forward(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_ip_forward(tree.host(), ctx).status == Status.PASS
    tree.file("/proc/sys/net/ipv4/ip_forward", "0")
    assert check_ip_forward(tree.host(), ctx).status == Status.WARN
    assert check_ip_forward(tree.host(), replace(ctx, egress="deny")).status == Status.PASS


@pytest.mark.parametrize(("dflt", "alls", "expected"),
                         [("1", "0", Status.PASS), ("0", "1", Status.PASS),
                          ("2", "0", Status.WARN), ("0", "0", Status.WARN)])
def test_rp_filter(tree: FakeTree, ctx: DoctorContext, dflt: str, alls: str,
                   expected: Status) -> None:
    tree.file(RP_DEFAULT, dflt)
    tree.file("/proc/sys/net/ipv4/conf/all/rp_filter", alls)
    r = check_rp_filter(tree.host(), ctx)
    assert r.status == expected
    if expected == Status.WARN:
        assert SetValue(RP_DEFAULT, "1") in r.actions


# ---- cgroups, logs, limits ---------------------------------------------------------------

def test_cgroup_v2_passes_v1_warns_none_fails(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_cgroup_version(tree.host(), ctx).status == Status.PASS
    tree.file("/sys/fs/cgroup/cgroup.controllers", "cpuset io")
    assert check_cgroup_version(tree.host(), ctx).status == Status.WARN
    tree.mounts(["tmpfs /sys/fs/cgroup tmpfs rw 0 0",
                 "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0",
                 "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0"])
    r = check_cgroup_version(tree.host(), ctx)
    assert r.status == Status.WARN and "firecracker#2129" in r.evidence and r.needs_reboot
    tree.mounts(["sysfs /sys sysfs rw 0 0"])
    assert check_cgroup_version(tree.host(), ctx).status == Status.FAIL


def test_host_logs(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_host_logs(tree.host(), ctx).status == Status.PASS
    tree.remove("/proc/300")
    assert check_host_logs(tree.host(), ctx).status == Status.WARN
    tree.executable("/usr/sbin/logrotate")
    assert check_host_logs(tree.host(), ctx).status == Status.WARN  # never scheduled
    tree.file("/etc/cron.daily/logrotate", "#!/bin/sh\n")
    assert check_host_logs(tree.host(), ctx).status == Status.PASS


def test_rate_limits(tree: FakeTree, ctx: DoctorContext) -> None:
    assert check_rate_limits(tree.host(), ctx).status == Status.PASS
    r = check_rate_limits(tree.host(), replace(ctx, disk_rate_limited=False))
    assert r.status == Status.WARN and "vm.disk_limit" in r.evidence
