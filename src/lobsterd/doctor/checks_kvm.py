"""Checks of KVM, the VMM binaries and the running tenant VMs."""

from __future__ import annotations

from lobsterd.adapters.kvm import UNUSABLE_KVM_MODULES
from lobsterd.doctor.host import (
    HostView,
    cgroup2_mount,
    cgroup_v1_mount,
    discover_tenant_vms,
    kvm_pit_threads,
)
from lobsterd.doctor.model import (
    CheckResult,
    DoctorContext,
    FixAction,
    Persist,
    PersistKind,
    SetValue,
    Status,
    TenantVm,
    worst,
)
from lobsterd.doctor.versions import assess_firecracker, assess_qemu, parse_version

KVM_DEV = "/dev/kvm"
MIN_TIMER = "/sys/module/kvm/parameters/min_timer_period_us"
# A floor on the period of the guest's *periodic* PIT and LAPIC timers. The kernel's
# default (200 us) lets each VM make KVM fire 5000 timer interrupts a second on the
# host, through a kvm-pit thread that is outside the tenant's cgroup. 1000 us (1 kHz)
# is what a Linux guest with HZ <= 1000 ever asks for, so it costs guests nothing.
RECOMMENDED_MIN_TIMER_PERIOD_US = 1000

_GOOD_KVM = ("kvm_intel", "kvm_amd")


def vms_of(host: HostView, ctx: DoctorContext) -> tuple[TenantVm, ...]:
    return ctx.vms if ctx.vms is not None else discover_tenant_vms(host)


def check_kvm_usable(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "KVM able to run ordinary guests"
    present = host.exists(KVM_DEV)
    known = ("kvm", *_GOOD_KVM, *UNUSABLE_KVM_MODULES)
    modules = [m for m in known if host.module_loaded(m)]
    ev = (f"{KVM_DEV}: {'present' if present else 'absent'}; KVM modules in /sys/module: "
          f"{', '.join(modules) or 'none'}")
    forced = ctx.accel == "kvm"
    if not present:
        return CheckResult(
            "kvm_usable", title, Status.FAIL if forced else Status.WARN,
            ev + "; lobsterd falls back to QEMU with TCG (slow, no hardware isolation)"
            + ("; vm.accel = \"kvm\" will fail to boot VMs" if forced else ""),
            fix="enable virtualisation (VT-x/AMD-V) in the firmware and load kvm_intel or "
                "kvm_amd; or set vm.accel = \"tcg\"")
    # The same list the VMM driver uses to choose TCG (adapters/kvm.py), so doctor
    # reports exactly what spawn will do.
    broken = [m for m in UNUSABLE_KVM_MODULES if m in modules]
    if not broken and any(m in modules for m in _GOOD_KVM):
        nested = "hypervisor" in host.cpu_flags()
        return CheckResult("kvm_usable", title, Status.PASS,
                           ev + (" (nested virtualisation: this host is itself a VM)"
                                 if nested else ""))
    if broken:
        why = "; ".join(UNUSABLE_KVM_MODULES[m] for m in broken)
    else:
        why = "no hardware KVM backend (kvm_intel/kvm_amd) is loaded"
    status = Status.FAIL if forced else Status.WARN
    tail = "; vm.accel = \"kvm\" will fail to boot VMs" if forced else \
        "; KVM cannot run ordinary guests here; lobsterd uses TCG"
    if ctx.vmm == "firecracker" and not forced:
        tail += " (and Firecracker itself needs a working KVM)"
    return CheckResult(
        "kvm_usable", title, status, f"{ev}; {why}{tail}",
        fix="run on a host with hardware virtualisation (kvm_intel/kvm_amd), or keep "
            "vm.accel = \"auto\"/\"tcg\" and accept TCG's speed")


def check_kvm_pit(host: HostView, ctx: DoctorContext) -> CheckResult:
    """kvm-pit threads must be charged to their VM's cgroup.

    KVM creates a ``kvm-pit/<pid>`` kernel thread per VM that emulates the PIT; it is
    a child of kthreadd, so it starts outside the VMM's cgroup and a guest can make it
    burn host CPU beyond the tenant's limit. ``<pid>`` is the VMM's pid in its own pid
    namespace, so a VMM in a new pid namespace is also matched by its innermost NSpid.
    """
    title = "kvm-pit threads inside their tenant's cgroup"
    vms = vms_of(host, ctx)
    threads = kvm_pit_threads(host)
    if not vms:
        extra = f"; {len(threads)} kvm-pit thread(s) of other VMMs" if threads else ""
        return CheckResult("kvm_pit", title, Status.PASS,
                           f"no running tenant VMs (lobsterd/tenant-* cgroups){extra}")
    owner = _pit_owners(host, vms)
    ok: list[str] = []
    bad: list[str] = []
    unsure: list[str] = []
    actions: list[FixAction] = []
    for tid, n in threads:
        cands = owner.get(n, [])
        if len({c[1] for c in cands}) > 1:
            unsure.append(f"kvm-pit/{n} (tid {tid}) could belong to "
                          + ", ".join(f"{t}:{p}" for t, p in cands))
        elif cands:
            tenant, pid = cands[0]
            missing, moves = _pit_misplaced(host, tid, pid)
            actions += moves
            if missing:
                bad.append(f"kvm-pit/{n} (tid {tid}) of {tenant} (pid {pid}) is outside "
                           f"its cgroup in {', '.join(missing)}")
            else:
                ok.append(f"kvm-pit/{n} of {tenant}")
    with_pit = {pid for _, n in threads for _, pid in owner.get(n, [])}
    without = [str(p) for vm in vms for p in vm.pids if p not in with_pit]
    parts = [f"{len(vms)} tenant VM(s), {len(threads)} kvm-pit thread(s) in /proc/*/comm"]
    if ok:
        parts.append("in place: " + ", ".join(ok))
    if bad:
        parts.append("; ".join(bad))
    if unsure:
        parts.append("ambiguous: " + "; ".join(unsure))
    if without:
        parts.append(f"VM pids without a kvm-pit thread (TCG or no PIT): {', '.join(without)}")
    ev = "; ".join(parts)
    if bad:
        return CheckResult(
            "kvm_pit", title, Status.FAIL, ev,
            fix="; ".join(a.describe() for a in actions if isinstance(a, SetValue))
            or "move each kvm-pit thread into its VM's cgroup",
            fixable_at_runtime=bool(actions), actions=tuple(actions))
    if unsure:
        return CheckResult("kvm_pit", title, Status.WARN, ev,
                           fix="run VMMs without a private pid namespace, or move the "
                               "kvm-pit threads by hand after checking their start times")
    return CheckResult("kvm_pit", title, Status.PASS, ev)


def _pit_owners(host: HostView, vms: tuple[TenantVm, ...]) -> dict[int, list[tuple[str, int]]]:
    """``n`` of ``kvm-pit/<n>`` → the (tenant, pid) it may belong to: the host pid, and
    the innermost NSpid for a VMM in its own pid namespace."""
    owner: dict[int, list[tuple[str, int]]] = {}
    for vm in vms:
        for pid in vm.pids:
            ns = host.proc_status(pid).get("NSpid", "").split()
            keys = {pid} | ({int(ns[-1])} if ns and ns[-1].isdigit() else set())
            for k in keys:
                owner.setdefault(k, []).append((vm.name, pid))
    return owner


def _pit_misplaced(host: HostView, tid: int, pid: int) -> tuple[list[str], list[FixAction]]:
    """Hierarchies where thread ``tid`` is not in VMM ``pid``'s cgroup, and the moves.

    Only CPU-related hierarchies matter (the thread burns CPU), and only where lobsterd
    placed the VMM below the root.
    """
    want = host.proc_cgroups(pid)
    have = host.proc_cgroups(tid)
    missing: list[str] = []
    moves: list[FixAction] = []
    for hier, path in want.items():
        cpuish = hier == "" or bool({"cpu", "cpuacct", "cpuset"} & set(hier.split(",")))
        if not cpuish or path in {"", "/"} or have.get(hier) == path:
            continue
        missing.append(hier or "unified")
        target = _procs_file(host, hier, path)
        if target:
            moves.append(SetValue(target, str(tid)))
    return missing, moves


def _procs_file(host: HostView, hier: str, path: str) -> str | None:
    if hier == "":
        m = cgroup2_mount(host)
        return f"{m.mountpoint}{path}/cgroup.procs" if m else None
    m = cgroup_v1_mount(host, hier)
    # v1: "tasks" moves exactly the thread named (a kthread is its own thread group).
    return f"{m.mountpoint}{path}/tasks" if m else None


def check_min_timer_period(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "KVM min_timer_period_us bounds guest timer interrupts"
    val = host.int_value(MIN_TIMER)
    if val is None:
        return CheckResult("min_timer_period", title, Status.SKIP,
                           f"{MIN_TIMER} is absent (kvm not loaded)")
    want = RECOMMENDED_MIN_TIMER_PERIOD_US
    ev = f"{MIN_TIMER} = {val} (lobsterd recommends >= {want})"
    if val >= want:
        return CheckResult("min_timer_period", title, Status.PASS, ev)
    runtime = host.owner_writable(MIN_TIMER)
    builtin = host.module_builtin("kvm")
    actions: list[FixAction] = []
    fixes = []
    if runtime:
        actions.append(SetValue(MIN_TIMER, str(want)))
        fixes.append(f"echo {want} > {MIN_TIMER}")
    if builtin:
        fixes.append(f"add kvm.min_timer_period_us={want} to the kernel command line")
    else:
        actions.append(Persist(PersistKind.MODPROBE, "kvm.min_timer_period_us", str(want)))
        fixes.append(f"options kvm min_timer_period_us={want} in "
                     "/etc/modprobe.d/lobsterd-kvm.conf")
    note = "" if runtime else " (read-only at runtime on this kernel)"
    return CheckResult(
        "min_timer_period", title, Status.WARN,
        ev + note + (" (kvm is built into the kernel)" if builtin else ""),
        fix="; ".join(fixes), fixable_at_runtime=runtime,
        needs_reboot=not runtime, actions=tuple(actions))


def check_vmm_version(host: HostView, ctx: DoctorContext) -> CheckResult:
    if ctx.vmm == "firecracker":
        return _firecracker_version(host, ctx)
    return _qemu_version(host, ctx)


def _qemu_version(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "VMM in use: QEMU, version"
    path = host.which(ctx.qemu_binary)
    if path is None:
        return CheckResult("vmm_version", title, Status.FAIL,
                           f"vm.vmm = qemu but {ctx.qemu_binary} is not found on the PATH",
                           fix="apt-get install qemu-system-x86 (or set vm.qemu_binary)")
    res = host.run([path, "--version"])
    out = (res.stdout if res else "").strip()
    if not res or res.returncode != 0 or not out:
        return CheckResult("vmm_version", title, Status.FAIL,
                           f"{path} --version failed: {(res.stderr if res else '').strip()}",
                           fix="reinstall qemu-system-x86")
    status, reasons = assess_qemu(out)
    first = out.splitlines()[0]
    return CheckResult("vmm_version", title, status,
                       f"{path} --version: {first!r}; " + "; ".join(reasons),
                       fix=None if status == Status.PASS else
                       "upgrade QEMU (Debian 12: apt-get install qemu-system-x86)")


def _firecracker_version(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "VMM in use: Firecracker + jailer, version floor"
    statuses: list[Status] = []
    parts: list[str] = []
    versions = {}
    for label, binary in (("firecracker", ctx.firecracker_bin), ("jailer", ctx.jailer_bin)):
        if host.which(binary) is None:
            statuses.append(Status.FAIL)
            parts.append(f"{label}: {binary} not found (lobsterd runs Firecracker only "
                         "through its jailer)")
            continue
        res = host.run([binary, "--version"])
        out = (res.stdout if res else "").strip()
        if not res or res.returncode != 0 or not out:
            statuses.append(Status.FAIL)
            parts.append(f"{label}: {binary} --version failed")
            continue
        status, reasons = assess_firecracker(out, ctx.today)
        parsed = parse_version(out)
        versions[label] = parsed[0] if parsed else None
        statuses.append(status)
        parts.append(f"{label}: {binary} --version: {out.splitlines()[0]!r}: "
                     + "; ".join(reasons))
    if len(versions) == 2 and versions["firecracker"] != versions["jailer"]:
        statuses.append(Status.WARN)
        parts.append("firecracker and jailer come from different releases")
    status = worst(*statuses)
    return CheckResult(
        "vmm_version", title, status, "; ".join(parts),
        fix=None if status == Status.PASS else
        f"install Firecracker and jailer v1.16.1 or newer (at least v1.15.1) from the "
        f"official release to {ctx.firecracker_bin} and {ctx.jailer_bin}")


def check_seccomp(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "VMM processes confined by a seccomp filter"
    actions_avail = host.value("/proc/sys/kernel/seccomp/actions_avail")
    if not actions_avail:
        return CheckResult("seccomp", title, Status.FAIL,
                           "/proc/sys/kernel/seccomp/actions_avail is absent: the kernel "
                           "has no seccomp filter support",
                           fix="run a kernel built with CONFIG_SECCOMP_FILTER", needs_reboot=True)
    vms = vms_of(host, ctx)
    ev = f"kernel seccomp actions: {actions_avail}"
    if not vms:
        return CheckResult("seccomp", title, Status.PASS, ev + "; no running tenant VMs")
    bad, ok = [], []
    for vm in vms:
        for pid in vm.pids:
            mode = host.proc_status(pid).get("Seccomp")
            argv = host.proc_argv(pid)
            if mode is None:
                continue  # exited between listing and reading
            if mode != "2":
                bad.append(f"{vm.name} pid {pid}: Seccomp = {mode}")
            elif "--no-seccomp" in argv or "--seccomp-filter" in argv:
                bad.append(f"{vm.name} pid {pid}: started with a non-default filter option")
            else:
                ok.append(f"{vm.name}:{pid}")
    ev += f"; /proc/<pid>/status Seccomp = 2 for: {', '.join(ok) or 'none'}"
    if bad:
        return CheckResult("seccomp", title, Status.FAIL, ev + "; " + "; ".join(bad),
                           fix="restart the tenant (lobsterd molt) so its VMM starts with the "
                               "default filter (QEMU -sandbox on; Firecracker's built-in)")
    return CheckResult("seccomp", title, Status.PASS, ev)


def check_vm_uids(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "each VMM runs as its own unprivileged uid"
    vms = vms_of(host, ctx)
    if not vms:
        return CheckResult("vm_uids", title, Status.PASS, "no running tenant VMs")
    by_uid: dict[str, set[str]] = {}
    bad = []
    seen = []
    for vm in vms:
        for pid in vm.pids:
            uids = host.proc_status(pid).get("Uid", "").split()
            if not uids:
                continue
            seen.append(f"{vm.name}:{pid}=uid {uids[1]}")
            if "0" in uids:
                bad.append(f"{vm.name} pid {pid} runs as root (Uid: {' '.join(uids)})")
            by_uid.setdefault(uids[1], set()).add(vm.name)
    shared = {u: sorted(n) for u, n in by_uid.items() if len(n) > 1}
    for u, names in shared.items():
        bad.append(f"uid {u} is shared by {', '.join(names)}")
    ev = "/proc/<pid>/status: " + (", ".join(seen) or "no readable VMM processes")
    if bad:
        return CheckResult("vm_uids", title, Status.FAIL, ev + "; " + "; ".join(bad),
                           fix="restart the affected tenants (lobsterd molt NAME); each VMM "
                               "must drop to uid users.uid_start + slot")
    return CheckResult("vm_uids", title, Status.PASS, ev)
