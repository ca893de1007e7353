"""Checks of host memory, network, console, file permissions, cgroups and logs."""

from __future__ import annotations

import os
import stat

from lobsterd.doctor.host import HostView, is_unified
from lobsterd.doctor.model import (
    CheckResult,
    DisableFstabSwap,
    DoctorContext,
    FixAction,
    Persist,
    PersistKind,
    RunCommand,
    SetValue,
    Status,
)

KSM_RUN = "/sys/kernel/mm/ksm/run"
CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
PRINTK = "/proc/sys/kernel/printk"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
RP_DEFAULT = "/proc/sys/net/ipv4/conf/default/rp_filter"
RP_ALL = "/proc/sys/net/ipv4/conf/all/rp_filter"
# Room for the host's own connections (SSH, Caddy's upstream legs, DNS) on top of every
# tenant at its limit.
CONNTRACK_HEADROOM = 65536


def check_ksm(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "KSM (kernel same-page merging) off"
    run = host.value(KSM_RUN)
    if run is None:
        return CheckResult("ksm", title, Status.PASS, f"{KSM_RUN} is absent (no KSM in "
                           "this kernel)")
    shared = host.int_value("/sys/kernel/mm/ksm/pages_shared") or 0
    sharing = host.int_value("/sys/kernel/mm/ksm/pages_sharing") or 0
    ev = f"{KSM_RUN} = {run}; pages_shared = {shared}; pages_sharing = {sharing}"
    # 2 = stop and unmerge every merged page: it both stops ksmd and undoes its work.
    actions: tuple[FixAction, ...] = (SetValue(KSM_RUN, "2"),
                                      Persist(PersistKind.TMPFILES, KSM_RUN, "0"))
    fix = f"echo 2 > {KSM_RUN} (stops ksmd and unmerges shared pages); keep it off at boot"
    if run == "1":
        return CheckResult(
            "ksm", title, Status.FAIL,
            ev + " (merging identical pages across VMs leaks memory contents through "
            "copy-on-write timing; QEMU marks guest RAM mergeable)",
            fix=fix, fixable_at_runtime=True, actions=actions)
    if run == "0" and shared:
        return CheckResult("ksm", title, Status.WARN,
                           ev + " (stopped, but pages merged earlier are still shared)",
                           fix=fix, fixable_at_runtime=True, actions=actions)
    return CheckResult("ksm", title, Status.PASS, ev)


def _swap_is_safe(host: HostView, dev: str) -> str | None:
    """Why a swap device leaves no plaintext on disk, or None."""
    if dev.startswith("/dev/zram"):
        return "zram (in memory)"
    name = dev.rsplit("/", 1)[-1]
    if dev.startswith("/dev/mapper/"):
        target = host.readlink(dev)
        name = target.rsplit("/", 1)[-1] if target else name
    if name.startswith("dm-"):
        uuid = host.value(f"/sys/block/{name}/dm/uuid") or ""
        if uuid.startswith("CRYPT-"):
            return "dm-crypt"
    return None


def check_swap(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "no swap, or only encrypted swap"
    text = host.read("/proc/swaps")
    if text is None:
        return CheckResult("swap", title, Status.PASS, "/proc/swaps is absent (no swap support)")
    entries = [line.split() for line in text.splitlines()[1:] if line.strip()]
    if not entries:
        return CheckResult("swap", title, Status.PASS, "/proc/swaps lists no swap areas")
    safe: list[str] = []
    plain: list[str] = []
    for e in entries:
        why = _swap_is_safe(host, e[0])
        (safe if why else plain).append(f"{e[0]} ({why or e[1]})")
    ev = "/proc/swaps: " + ", ".join(safe + plain)
    if not plain:
        return CheckResult("swap", title, Status.PASS, ev)
    argv = ("swapoff", *[p.split(" ")[0] for p in plain])
    return CheckResult(
        "swap", title, Status.WARN,
        ev + " (guest memory, secrets included, can be written to disk in clear)",
        fix=f"{' '.join(argv)} and comment out the swap lines of /etc/fstab (or encrypt "
            "swap with dm-crypt); --fix does this only with --fix-swap, because swapoff can "
            "push a loaded host into the OOM killer",
        fixable_at_runtime=True, actions=(RunCommand(argv, timeout=600.0), DisableFstabSwap()),
        opt_in="swap")


def required_conntrack(ctx: DoctorContext) -> int:
    return ctx.max_tenants * ctx.conn_limit + CONNTRACK_HEADROOM


def check_conntrack_max(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "nf_conntrack_max sized for every tenant at its connection limit"
    need = required_conntrack(ctx)
    cur = host.int_value(CONNTRACK_MAX)
    count = host.int_value("/proc/sys/net/netfilter/nf_conntrack_count")
    buckets = host.int_value("/proc/sys/net/netfilter/nf_conntrack_buckets")
    basis = (f"network.max_tenants {ctx.max_tenants} x network.conn_limit {ctx.conn_limit} "
             f"+ {CONNTRACK_HEADROOM} = {need}")
    persist: tuple[FixAction, ...] = (
        Persist(PersistKind.SYSCTL, "net.netfilter.nf_conntrack_max", str(need)),
        Persist(PersistKind.MODULES_LOAD, "nf_conntrack"),
    )
    if cur is None:
        return CheckResult(
            "conntrack_max", title, Status.WARN,
            f"{CONNTRACK_MAX} is absent (nf_conntrack not loaded yet); needed: {basis}",
            fix=f"net.netfilter.nf_conntrack_max = {need} in /etc/sysctl.d/90-lobsterd.conf "
                "and nf_conntrack in /etc/modules-load.d/lobsterd.conf",
            actions=persist)
    ev = (f"{CONNTRACK_MAX} = {cur} (in use: {count if count is not None else '?'}, "
          f"hash buckets: {buckets if buckets is not None else '?'}); needed: {basis}")
    if cur >= need:
        return CheckResult("conntrack_max", title, Status.PASS, ev)
    status = Status.FAIL if cur <= ctx.conn_limit else Status.WARN
    why = (" (one tenant alone can fill the table and drop every VM's packets)"
           if status == Status.FAIL else
           " (tenants together can fill the table and drop every VM's packets)")
    return CheckResult(
        "conntrack_max", title, status, ev + why,
        fix=f"sysctl -w net.netfilter.nf_conntrack_max={need}; persist in "
            "/etc/sysctl.d/90-lobsterd.conf",
        fixable_at_runtime=True,
        actions=(SetValue(CONNTRACK_MAX, str(need)), *persist))


def _loglevel(cmdline: list[str]) -> int | None:
    level = None
    for w in cmdline:
        if w.startswith("loglevel="):
            val = w.split("=", 1)[1]
            level = int(val) if val.isdigit() else level
    return level


def check_console_quiet(host: HostView, ctx: DoctorContext) -> CheckResult:
    """The host console must be quiet: a serial console at a verbose log level makes
    the kernel wait for the UART (Firecracker measured snapshot restore going from 3 ms
    to 8.5 ms with a serial console)."""
    title = "host kernel console quiet (quiet loglevel=1)"
    cmd = host.cmdline()
    quiet = "quiet" in cmd
    boot_level = _loglevel(cmd)
    consoles = [w for w in cmd if w.startswith("console=")]
    printk = (host.value(PRINTK) or "").split()
    live = int(printk[0]) if printk and printk[0].isdigit() else None
    ev = (f"/proc/cmdline: quiet={'yes' if quiet else 'no'}, "
          f"loglevel={boot_level if boot_level is not None else '(unset)'}, "
          f"{' '.join(consoles) or 'no console='}; {PRINTK} = {' '.join(printk) or '(absent)'}")
    boot_ok = boot_level is not None and boot_level <= 1
    live_ok = live is not None and live <= 1
    if boot_ok and live_ok:
        return CheckResult("console_quiet", title, Status.PASS, ev)
    actions: list[FixAction] = []
    fixes = []
    if not live_ok and len(printk) == 4:
        new = " ".join(["1", *printk[1:]])
        actions += [SetValue(PRINTK, new), Persist(PersistKind.SYSCTL, "kernel.printk", new)]
        fixes.append(f"sysctl -w kernel.printk='{new}' (now; persisted in "
                     "/etc/sysctl.d/90-lobsterd.conf)")
    if not boot_ok:
        fixes.append("add 'quiet loglevel=1' to the kernel command line "
                     "(GRUB_CMDLINE_LINUX in /etc/default/grub, update-grub) and reboot")
    return CheckResult(
        "console_quiet", title, Status.WARN,
        ev + (" (console log level > 1 now)" if not live_ok else "")
        + (" (boot messages still reach the console)" if not boot_ok else ""),
        fix="; ".join(fixes), fixable_at_runtime=bool(actions), needs_reboot=not boot_ok,
        actions=tuple(actions))


def check_guest_console(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "guest serial console off (bounded host logs)"
    if ctx.debug_console:
        return CheckResult(
            "guest_console", title, Status.WARN,
            "config vm.debug_console = true: guests write a serial console log on the "
            "host, and a guest can flood it",
            fix="set vm.debug_console = false in the config (development only)")
    return CheckResult("guest_console", title, Status.PASS,
                       "config vm.debug_console = false: guests boot with 8250.nr_uarts=0 and "
                       "no host-side console log")


# ---- jail paths ------------------------------------------------------------------------

def _chain_problems(host: HostView, path: str, ctx: DoctorContext) -> tuple[list[str], str]:
    """Problems along ``path`` and its parents; the second value notes a missing tail.

    A component is unsafe when a non-root user owns it or can write to it (a writable
    parent lets them swap the child for a symlink). The sticky /tmp pattern is safe for
    an existing root-owned child, but a missing child could be created by anyone.
    Symlinks are followed, and their targets checked the same way.
    """
    problems: list[str] = []
    parts = _normalise(path.split("/"))
    i, hops = 0, 0
    parent: os.stat_result | None = None
    while True:
        here = "/" + "/".join(parts[:i])
        st = host.lstat(here)
        if st is None:
            if parent is not None and parent.st_mode & stat.S_IWOTH:
                problems.append(f"{here} does not exist and its parent is writable by "
                                "everyone (anyone could create it)")
            return problems, f"{here} not created yet"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != ctx.trusted_uid:
                problems.append(f"{here} is a symlink owned by uid {st.st_uid}")
            hops += 1
            if hops > 40:
                problems.append(f"{here}: too many levels of symlinks")
                return problems, ""
            target = host.readlink(here) or ""
            base = [] if target.startswith("/") else parts[: i - 1]
            parts = _normalise([*base, *target.split("/"), *parts[i:]])
            i, parent = 0, None
            continue
        if st.st_uid != ctx.trusted_uid:
            problems.append(f"{here} is owned by uid {st.st_uid}")
        if st.st_mode & stat.S_IWGRP and st.st_gid != ctx.trusted_gid:
            problems.append(f"{here} is writable by group {st.st_gid}")
        sticky_dir = stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX)
        # A sticky world-writable parent is judged by its child (which must exist and
        # be root's); the path itself must never be world-writable.
        if st.st_mode & stat.S_IWOTH and (not sticky_dir or i == len(parts)):
            problems.append(f"{here} is writable by everyone")
        if i == len(parts):
            return problems, ""
        parent = st
        i += 1


def _normalise(parts: list[str]) -> list[str]:
    out: list[str] = []
    for p in parts:
        if p == "..":
            if out:
                out.pop()
        elif p and p != ".":
            out.append(p)
    return out


def jail_paths(host: HostView, ctx: DoctorContext) -> list[str]:
    """Every path a VMM, its jail or its inputs hang off."""
    paths: list[str] = list(ctx.protected_paths)
    qemu = host.which(ctx.qemu_binary)
    if qemu:
        paths.append(qemu)
    if ctx.vmm == "firecracker" or host.exists(ctx.firecracker_bin):
        paths += [ctx.firecracker_bin, ctx.jailer_bin]
    for netns in ("/run/netns", "/var/run/netns"):
        if host.exists(netns):
            paths.append(netns)
    if ctx.tenants_dir:
        for name in host.listdir(ctx.tenants_dir):
            jail = f"{ctx.tenants_dir}/{name}/jail"
            if host.exists(jail):
                paths.append(jail)
    seen: list[str] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def check_jail_paths(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "VMM, jailer and jail paths not writable by non-root users"
    bad: list[str] = []
    notes: list[str] = []
    paths = jail_paths(host, ctx)
    for path in paths:
        problems, note = _chain_problems(host, path, ctx)
        for pr in problems:
            if pr not in bad:
                bad.append(pr)
        if note and note not in notes:
            notes.append(note)
    ev = f"checked {len(paths)} paths and their parents: {', '.join(paths)}"
    if notes:
        ev += "; " + "; ".join(notes)
    if bad:
        comps = sorted({b.split(" ", 1)[0] for b in bad})
        return CheckResult(
            "jail_paths", title, Status.FAIL, ev + "; UNSAFE: " + "; ".join(bad),
            fix="; ".join(f"chown root:root {c} && chmod go-w {c}" for c in comps)
            + " (or move lobsterd's paths out of user-writable directories)")
    return CheckResult("jail_paths", title, Status.PASS, ev)


# ---- network ----------------------------------------------------------------------------

def check_ip_forward(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "IPv4 forwarding matches the egress policy"
    val = host.value(IP_FORWARD)
    ev = f"{IP_FORWARD} = {val or '(absent)'}; network.egress = {ctx.egress}"
    if val == "1" or ctx.egress == "deny":
        return CheckResult("ip_forward", title, Status.PASS, ev)
    return CheckResult(
        "ip_forward", title, Status.WARN, ev + " (tenants have no egress)",
        fix="lobsterd init enables it together with lobsterd's firewall "
            "(sysctl -w net.ipv4.ip_forward=1)")


def check_rp_filter(host: HostView, ctx: DoctorContext) -> CheckResult:
    """New interfaces (the tenants' TAPs) should drop packets with spoofed sources;
    lobsterd's firewall pins each TAP to its guest address as well (defence in depth)."""
    title = "reverse-path filtering on new interfaces (anti-spoofing)"
    dflt = host.value(RP_DEFAULT)
    alls = host.value(RP_ALL)
    ev = f"{RP_DEFAULT} = {dflt or '(absent)'}; {RP_ALL} = {alls or '(absent)'}"
    if dflt is None:
        return CheckResult("rp_filter", title, Status.SKIP, ev + " (no IPv4)")
    effective = max(int(dflt) if dflt.isdigit() else 0, int(alls) if alls and alls.isdigit()
                    else 0)
    if effective == 1:
        return CheckResult("rp_filter", title, Status.PASS, ev + " (strict)")
    mode = "loose" if effective == 2 else "off"
    return CheckResult(
        "rp_filter", title, Status.WARN,
        ev + f" ({mode}: a guest's spoofed source addresses reach the host's routing)",
        fix="sysctl -w net.ipv4.conf.default.rp_filter=1 (applies to interfaces created "
            "from now on); persist in /etc/sysctl.d/90-lobsterd.conf",
        fixable_at_runtime=True,
        actions=(SetValue(RP_DEFAULT, "1"),
                 Persist(PersistKind.SYSCTL, "net.ipv4.conf.default.rp_filter", "1")))


# ---- cgroups, logs, limits -------------------------------------------------------------

def check_cgroup_version(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "cgroup v2 (unified hierarchy)"
    mounts = [m for m in host.mounts() if m.fstype in {"cgroup", "cgroup2"}]
    ev = "/proc/mounts: " + (", ".join(f"{m.mountpoint} ({m.fstype})" for m in mounts)
                             or "no cgroup mounts")
    if is_unified(host):
        ctrls = (host.value("/sys/fs/cgroup/cgroup.controllers") or "").split()
        missing = [c for c in ("cpu", "memory", "pids") if c not in ctrls]
        if missing:
            return CheckResult("cgroup_version", title, Status.WARN,
                               ev + f"; cgroup.controllers lacks {', '.join(missing)}",
                               fix="boot without cgroup_disable=... for those controllers",
                               needs_reboot=True)
        return CheckResult("cgroup_version", title, Status.PASS,
                           ev + f"; controllers: {' '.join(ctrls)}")
    if not mounts:
        return CheckResult("cgroup_version", title, Status.FAIL,
                           ev + " (tenants cannot be limited)",
                           fix="mount cgroup2 at /sys/fs/cgroup", needs_reboot=True)
    return CheckResult(
        "cgroup_version", title, Status.WARN,
        ev + " (cgroup v1: works, but snapshot restore is much slower on v1 — "
        "firecracker#2129 — and v1 is deprecated)",
        fix="boot with systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all",
        needs_reboot=True)


def check_host_logs(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "host logs on bounded storage (journald or logrotate)"
    journald_running = any((host.comm(p) or "").startswith("systemd-journal")
                           for p in host.pids())
    logrotate = host.which("logrotate")
    scheduled = any(host.exists(p) for p in (
        "/etc/cron.daily/logrotate", "/lib/systemd/system/logrotate.timer",
        "/usr/lib/systemd/system/logrotate.timer"))
    ev = (f"systemd-journald running: {'yes' if journald_running else 'no'}; "
          f"logrotate: {logrotate or 'not installed'}"
          f"{' (scheduled)' if logrotate and scheduled else ''}")
    if journald_running or (logrotate and scheduled):
        return CheckResult("host_logs", title, Status.PASS, ev)
    return CheckResult(
        "host_logs", title, Status.WARN,
        ev + " (a guest influences how much the VMM and lobsterd log)",
        fix="apt-get install logrotate (runs daily from cron), or run systemd-journald "
            "with SystemMaxUse= set")


def check_rate_limits(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "per-VM network and disk rate limits configured"
    missing = []
    if not ctx.net_rate_limited:
        missing.append("vm.net_rx_limit/vm.net_tx_limit")
    if not ctx.disk_rate_limited:
        missing.append("vm.disk_limit")
    if missing:
        return CheckResult(
            "rate_limits", title, Status.WARN,
            f"config leaves {', '.join(missing)} unset: one tenant can saturate the host's "
            "network or disk",
            fix="set " + " and ".join(missing) + " in the config (defaults: 10 Mbit/s and "
                "1000 packets/s per direction, 50 MiB/s and 5000 ops/s of disk)")
    return CheckResult("rate_limits", title, Status.PASS,
                       "config sets vm.net_rx_limit, vm.net_tx_limit and vm.disk_limit")
