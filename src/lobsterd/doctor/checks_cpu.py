"""Checks of the processor and memory: SMT, CPU vulnerabilities, microcode, ECC.

Firecracker cannot mitigate host hardware flaws; a guest shares caches, branch
predictors and (with SMT) a core with whatever the host runs next to it. These checks
read what the kernel itself reports under /sys/devices/system/cpu and /proc.
"""

from __future__ import annotations

from lobsterd.doctor.host import HostView, cgroup2_mount, is_unified
from lobsterd.doctor.model import (
    CheckResult,
    DoctorContext,
    Persist,
    PersistKind,
    RunCommand,
    SetValue,
    Status,
    worst,
)

SMT_CONTROL = "/sys/devices/system/cpu/smt/control"
VULN_DIR = "/sys/devices/system/cpu/vulnerabilities"
EDAC_MC = "/sys/devices/system/edac/mc"
NX_HUGE_PAGES = "/sys/module/kvm/parameters/nx_huge_pages"


def _siblings(host: HostView) -> list[str]:
    """CPUs that share a core with another online CPU (per thread_siblings_list)."""
    shared = []
    for cpu in host.listdir("/sys/devices/system/cpu"):
        if not (cpu.startswith("cpu") and cpu[3:].isdigit()):
            continue
        lst = host.value(f"/sys/devices/system/cpu/{cpu}/topology/thread_siblings_list")
        if lst and ("," in lst or "-" in lst):
            shared.append(f"{cpu}:{lst}")
    return shared


def check_smt(host: HostView, ctx: DoctorContext) -> CheckResult:  # noqa: PLR0911 - a decision table
    title = "SMT (hyper-threading) off"
    control = host.value(SMT_CONTROL)
    active = host.value("/sys/devices/system/cpu/smt/active")
    cmdline = host.cmdline()
    nosmt = any(w == "nosmt" or w.startswith("nosmt=") for w in cmdline)
    siblings = _siblings(host)
    ev = (f"{SMT_CONTROL} = {control or '(absent)'}; smt/active = {active or '(absent)'}; "
          f"sibling threads: {', '.join(siblings[:4]) or 'none'}"
          f"{' ...' if len(siblings) > 4 else ''}; nosmt on /proc/cmdline: "
          f"{'yes' if nosmt else 'no'}")
    reboot_fix = "add nosmt to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, " \
                 "then update-grub) and reboot"
    if control == "forceoff":
        return CheckResult("smt", title, Status.PASS, ev + " (forced off at boot)")
    if control == "notsupported" and not siblings:
        return CheckResult("smt", title, Status.PASS,
                           ev + " (the CPUs have one thread per core)")
    if control == "off":
        if nosmt:
            return CheckResult("smt", title, Status.PASS, ev)
        return CheckResult(
            "smt", title, Status.WARN,
            ev + " (off now, but on again after a reboot)", fix=reboot_fix,
            needs_reboot=True,
            actions=(Persist(PersistKind.TMPFILES, SMT_CONTROL, "off"),))
    if control == "on" and active == "0" and not siblings:
        return CheckResult("smt", title, Status.WARN,
                           ev + " (no sibling threads online now; a hotplug would add them)",
                           fix=f"echo off > {SMT_CONTROL}; {reboot_fix}",
                           fixable_at_runtime=True, needs_reboot=not nosmt,
                           actions=(SetValue(SMT_CONTROL, "off"),
                                    Persist(PersistKind.TMPFILES, SMT_CONTROL, "off")))
    if control == "on":
        return CheckResult(
            "smt", title, Status.FAIL,
            ev + " (sibling threads of one core can run two tenants' vCPUs and leak "
            "through shared core state)",
            fix=f"echo off > {SMT_CONTROL} (now); {reboot_fix}",
            fixable_at_runtime=True, needs_reboot=True,
            actions=(SetValue(SMT_CONTROL, "off"),
                     Persist(PersistKind.TMPFILES, SMT_CONTROL, "off")))
    # notsupported with siblings, notimplemented, or no control file: the kernel cannot
    # switch SMT off at runtime; only the boot parameter (or firmware) can.
    if siblings:
        return CheckResult("smt", title, Status.FAIL,
                           ev + " (the kernel cannot switch SMT off at runtime here)",
                           fix=reboot_fix + " (or disable SMT in the firmware setup)",
                           needs_reboot=True)
    return CheckResult("smt", title, Status.PASS, ev + " (no sibling threads)")


_GUEST_OPTOUTS = ("no_guest_host", "no_guest_guest", "no_cross_thread")


def _mitigations_cmdline(cmdline: list[str]) -> tuple[Status, list[str]]:
    """``mitigations=off`` is a FAIL; opting out of the guest attack vectors a WARN."""
    status = Status.PASS
    notes = []
    for w in cmdline:
        if not w.startswith("mitigations="):
            continue
        opts = w.split("=", 1)[1].split(",")
        if "off" in opts:
            status = Status.FAIL
            notes.append(f"/proc/cmdline has {w}: every mitigation is off")
        optouts = [o for o in opts if o in _GUEST_OPTOUTS]
        if optouts:
            status = worst(status, Status.WARN)
            vectors = ", ".join(o[3:].replace("_", "-to-") if o != "no_cross_thread"
                                else "cross-thread" for o in optouts)
            notes.append(f"/proc/cmdline has {w}: {vectors} mitigations are switched off "
                         "on a host that runs untrusted guests")
    return status, notes


def classify_vuln(text: str) -> Status:
    """One vulnerabilities/* file: 'Vulnerable...' (or a vulnerable KVM/VMX part) is a
    FAIL, 'Unknown' or 'SMT vulnerable' a WARN, 'Not affected'/'Mitigation: ...' PASS."""
    low = text.lower()
    if low.startswith("vulnerable") or "vmx: vulnerable" in low or "kvm: vulnerable" in low:
        return Status.FAIL
    if low.startswith("unknown") or "smt vulnerable" in low:
        return Status.WARN
    return Status.PASS


def check_cpu_vulns(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "CPU vulnerabilities mitigated"
    names = host.listdir(VULN_DIR)
    if not names:
        return CheckResult("cpu_vulns", title, Status.WARN,
                           f"{VULN_DIR} is absent: the kernel does not report CPU flaws",
                           fix="run a current distribution kernel (Debian 12: linux-image-amd64)",
                           needs_reboot=True)
    fails, warns = [], []
    for name in names:
        val = host.value(f"{VULN_DIR}/{name}") or ""
        verdict = classify_vuln(val)
        if verdict == Status.FAIL:
            fails.append(f"{name}: {val}")
        elif verdict == Status.WARN:
            warns.append(f"{name}: {val}")
    cmd_status, notes = _mitigations_cmdline(host.cmdline())
    status = worst(Status.FAIL if fails else Status.WARN if warns else Status.PASS,
                   cmd_status)
    ev_parts = [f"read {len(names)} files in {VULN_DIR}"]
    if fails:
        ev_parts.append("vulnerable: " + "; ".join(fails))
    if warns:
        ev_parts.append("partial: " + "; ".join(warns))
    if not fails and not warns:
        ev_parts.append("all report 'Not affected' or 'Mitigation: ...'")
    ev_parts.extend(notes)
    fix = None
    if status != Status.PASS:
        fix = ("update the kernel and CPU microcode; remove mitigations=off and any "
               "no_guest_host/no_guest_guest/no_cross_thread from the kernel command line; "
               "for 'SMT vulnerable' see the smt check; verify with spectre-meltdown-checker")
    return CheckResult("cpu_vulns", title, status, "; ".join(ev_parts), fix=fix,
                       needs_reboot=status != Status.PASS)


def _vendor_package(host: HostView) -> str:
    vendor = host.cpuinfo_field("vendor_id") or ""
    if vendor == "GenuineIntel":
        return "intel-microcode"
    if vendor == "AuthenticAMD":
        return "amd64-microcode"
    return "intel-microcode or amd64-microcode"


_EARLY_UCODE_MARK = b"kernel/x86/microcode/"


def check_microcode(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "CPU microcode current and loaded early"
    rev = host.cpuinfo_field("microcode")
    virtual = "hypervisor" in host.cpu_flags()
    old = host.value(f"{VULN_DIR}/old_microcode")
    release = host.kernel_release()
    initrd = f"/boot/initrd.img-{release}" if release else None
    head = host.read_bytes(initrd, 4 << 20) if initrd else None
    early = head is not None and _EARLY_UCODE_MARK in head
    ev = (f"/proc/cpuinfo microcode = {rev or '(absent)'}; "
          f"{VULN_DIR}/old_microcode = {old or '(absent)'}; "
          f"virtualised (cpuinfo 'hypervisor' flag): {'yes' if virtual else 'no'}; "
          f"early microcode in {initrd or '/boot/initrd.img-?'}: "
          f"{'yes' if early else ('no' if head is not None else 'initrd not found')}")
    pkg = _vendor_package(host)
    fix = f"apt-get install {pkg} && update-initramfs -u, then reboot (loads it early)"
    if old and old.lower().startswith("vulnerable"):
        return CheckResult("microcode", title, Status.FAIL,
                           ev + " (the kernel knows this revision is outdated)",
                           fix=fix, needs_reboot=True)
    if virtual:
        if old and old.lower().startswith("not affected"):
            return CheckResult("microcode", title, Status.PASS,
                               ev + " (microcode is loaded by the hypervisor's host)")
        return CheckResult("microcode", title, Status.WARN,
                           ev + " (a virtual machine cannot load microcode; its provider must)",
                           fix="ask the hypervisor's operator to keep host microcode current")
    if early:
        return CheckResult("microcode", title, Status.PASS, ev)
    return CheckResult("microcode", title, Status.WARN,
                       ev + " (no microcode update found in the initramfs)",
                       fix=fix, needs_reboot=True)


def check_itlb_multihit(  # noqa: PLR0911 - a decision table
    host: HostView, ctx: DoctorContext
) -> CheckResult:
    """iTLB multihit: keep KVM's mitigation where needed, avoid its cost where not.

    On affected CPUs KVM splits huge pages (``nx_huge_pages``) and, since Linux 6.1, also
    attaches a recovery thread to the VM's cgroup at KVM_CREATE_VM, which is slow unless
    the cgroup hierarchy favours dynamic changes (``favordynmods``). On CPUs that are not
    affected the mitigation can be switched off entirely (``nx_huge_pages=never``).
    """
    title = "iTLB multihit: KVM mitigation and VM-creation latency"
    val = host.value(f"{VULN_DIR}/itlb_multihit")
    nx = host.value(NX_HUGE_PAGES)
    if val is None:
        return CheckResult("itlb_multihit", title, Status.SKIP,
                           f"{VULN_DIR}/itlb_multihit is absent (not x86, or an old kernel)")
    ev = f"{VULN_DIR}/itlb_multihit = {val}; {NX_HUGE_PAGES} = {nx or '(kvm not loaded)'}"
    low = val.lower()
    loadable = not host.module_builtin("kvm")
    if low.startswith("not affected"):
        if nx is None or nx.upper() in {"N", "NEVER", "OFF"}:
            return CheckResult("itlb_multihit", title, Status.PASS, ev)
        runtime, actions = _nx_huge_pages_actions(host, loadable, "never")
        return CheckResult(
            "itlb_multihit", title, Status.WARN,
            ev + " (CPU not affected, yet KVM splits huge pages and slows KVM_CREATE_VM)",
            fix=("echo never > " + NX_HUGE_PAGES + "; " if runtime else "")
            + ("options kvm nx_huge_pages=never in /etc/modprobe.d/lobsterd-kvm.conf"
               if loadable else "add kvm.nx_huge_pages=never to the kernel command line"),
            fixable_at_runtime=runtime, needs_reboot=not runtime,
            actions=actions)
    if low.startswith("vulnerable") or "kvm: vulnerable" in low:
        runtime, acts = _nx_huge_pages_actions(host, loadable, "force")
        return CheckResult(
            "itlb_multihit", title, Status.FAIL,
            ev + " (a guest can machine-check the host)",
            fix=("echo force > " + NX_HUGE_PAGES + "; " if runtime else "")
            + "set kvm.nx_huge_pages=force (modprobe option or kernel command line)",
            fixable_at_runtime=runtime, needs_reboot=not runtime, actions=acts)
    # Affected and mitigated: make VM creation fast again.
    v2 = cgroup2_mount(host)
    if is_unified(host) and v2 is not None:
        if "favordynmods" in v2.options:
            return CheckResult("itlb_multihit", title, Status.PASS,
                               ev + f"; {v2.mountpoint} mounted with favordynmods")
        return CheckResult(
            "itlb_multihit", title, Status.WARN,
            ev + f"; {v2.mountpoint} lacks favordynmods (KVM_CREATE_VM stalls on "
            "Linux >= 6.1)",
            fix=f"mount -o remount,favordynmods {v2.mountpoint} (now and at every boot)",
            fixable_at_runtime=True,
            actions=(RunCommand(("mount", "-o", "remount,favordynmods", v2.mountpoint)),))
    if "cgroup_favordynmods=true" in host.cmdline():
        return CheckResult("itlb_multihit", title, Status.PASS,
                           ev + "; cgroup_favordynmods=true on /proc/cmdline")
    return CheckResult(
        "itlb_multihit", title, Status.WARN,
        ev + "; cgroup v1 without cgroup_favordynmods=true (KVM_CREATE_VM stalls on "
        "Linux >= 6.1)",
        fix="add cgroup_favordynmods=true to the kernel command line and reboot",
        needs_reboot=True)


def _nx_huge_pages_actions(
    host: HostView, loadable: bool, value: str
) -> tuple[bool, tuple[SetValue | Persist, ...]]:
    """Set kvm.nx_huge_pages now (when writable) and persist it (when kvm is a module)."""
    runtime = host.owner_writable(NX_HUGE_PAGES)
    actions: list[SetValue | Persist] = []
    if runtime:
        actions.append(SetValue(NX_HUGE_PAGES, value))
    if loadable:
        actions.append(Persist(PersistKind.MODPROBE, "kvm.nx_huge_pages", value))
    return runtime, tuple(actions)


def check_edac(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "ECC memory reported by EDAC"
    mcs = [m for m in host.listdir(EDAC_MC) if m.startswith("mc")]
    virtual = "hypervisor" in host.cpu_flags()
    if not mcs:
        why = ("a virtual machine sees no memory controller; ECC/TRR is its provider's "
               "to guarantee" if virtual else
               "no EDAC driver is loaded: memory without ECC, or the driver is missing")
        return CheckResult(
            "edac", title, Status.WARN,
            f"{EDAC_MC} has no memory controllers ({why})",
            fix=("confirm ECC DDR4+ memory with TRR with the provider" if virtual else
                 "use ECC DDR4+ memory with TRR; load the platform EDAC driver "
                 "(e.g. modprobe skx_edac, i10nm_edac or amd64_edac)"))
    ce = ue = 0
    for mc in mcs:
        ce += host.int_value(f"{EDAC_MC}/{mc}/ce_count") or 0
        ue += host.int_value(f"{EDAC_MC}/{mc}/ue_count") or 0
    ev = (f"{EDAC_MC}: {', '.join(mcs)}; corrected errors (ce_count) = {ce}, "
          f"uncorrected (ue_count) = {ue}")
    if ue:
        return CheckResult("edac", title, Status.FAIL, ev + " (memory is failing)",
                           fix="replace the failing DIMMs (see edac-util -v)")
    if ce:
        return CheckResult("edac", title, Status.WARN,
                           ev + " (corrected errors: failing DIMM or row-hammering)",
                           fix="check edac-util -v; replace DIMMs that keep correcting")
    return CheckResult("edac", title, Status.PASS, ev)


def check_arm_counter(host: HostView, ctx: DoctorContext) -> CheckResult:
    title = "ARM guest physical counter reset (KVM_CAP_COUNTER_OFFSET)"
    machine = host.machine
    if machine not in {"aarch64", "arm64"}:
        return CheckResult("arm_counter", title, Status.SKIP, f"host is {machine}, not ARM")
    release = host.kernel_release()
    parts = release.split(".")
    try:
        ver = (int(parts[0]), int(parts[1].split("-")[0]))
    except (ValueError, IndexError):
        ver = (0, 0)
    ev = f"/proc/sys/kernel/osrelease = {release or '(absent)'}"
    if ver >= (6, 4):
        return CheckResult("arm_counter", title, Status.PASS, ev)
    return CheckResult("arm_counter", title, Status.WARN,
                       ev + " (guests can read the host's physical counter before 6.4)",
                       fix="run a host kernel >= 6.4", needs_reboot=True)
