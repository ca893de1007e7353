"""Running every check, applying fixes, rendering the report."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Collection
from datetime import date
from pathlib import Path

from lobsterd.config import Config
from lobsterd.doctor import checks_cpu, checks_host, checks_kvm
from lobsterd.doctor.fix import apply_fixes
from lobsterd.doctor.host import HostView
from lobsterd.doctor.model import (
    CheckResult,
    DoctorContext,
    DoctorReport,
    Status,
    TenantVm,
)
from lobsterd.errors import HostUnsafe, ValidationFailed

CheckFn = Callable[[HostView, DoctorContext], CheckResult]

# Order is the order of the report: hardware, kernel, KVM, VMM, tenants, host services.
CHECKS: dict[str, CheckFn] = {
    "smt": checks_cpu.check_smt,
    "cpu_vulns": checks_cpu.check_cpu_vulns,
    "microcode": checks_cpu.check_microcode,
    "itlb_multihit": checks_cpu.check_itlb_multihit,
    "edac": checks_cpu.check_edac,
    "arm_counter": checks_cpu.check_arm_counter,
    "ksm": checks_host.check_ksm,
    "swap": checks_host.check_swap,
    "console_quiet": checks_host.check_console_quiet,
    "cgroup_version": checks_host.check_cgroup_version,
    "kvm_usable": checks_kvm.check_kvm_usable,
    "min_timer_period": checks_kvm.check_min_timer_period,
    "vmm_version": checks_kvm.check_vmm_version,
    "jail_paths": checks_host.check_jail_paths,
    "kvm_pit": checks_kvm.check_kvm_pit,
    "seccomp": checks_kvm.check_seccomp,
    "vm_uids": checks_kvm.check_vm_uids,
    "conntrack_max": checks_host.check_conntrack_max,
    "ip_forward": checks_host.check_ip_forward,
    "rp_filter": checks_host.check_rp_filter,
    "rate_limits": checks_host.check_rate_limits,
    "guest_console": checks_host.check_guest_console,
    "host_logs": checks_host.check_host_logs,
}


def run_one(check_id: str, host: HostView, ctx: DoctorContext) -> CheckResult:
    """Run one check; a check that breaks reports WARN instead of sinking the report."""
    fn = CHECKS[check_id]
    try:
        res = fn(host, ctx)
    except Exception as exc:  # one broken check must not hide the others
        return CheckResult(check_id, check_id, Status.WARN,
                           f"the check could not run: {type(exc).__name__}: {exc}")
    assert res.id == check_id, f"check {check_id} reported id {res.id}"
    return res


def run_checks(
    host: HostView, ctx: DoctorContext, only: Collection[str] | None = None
) -> list[CheckResult]:
    ids = _selected(only)
    if ctx.vms is None and any(i in {"kvm_pit", "seccomp", "vm_uids"} for i in ids):
        from dataclasses import replace

        from lobsterd.doctor.host import discover_tenant_vms

        ctx = replace(ctx, vms=discover_tenant_vms(host))
    return [run_one(i, host, ctx) for i in ids]


def _selected(only: Collection[str] | None) -> list[str]:
    if only is None:
        return list(CHECKS)
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise ValidationFailed(f"unknown doctor check(s): {', '.join(unknown)}",
                               hint="known: " + ", ".join(CHECKS))
    return [i for i in CHECKS if i in only]


def run_doctor(
    cfg: Config,
    fix: bool = False,
    root: Path = Path("/"),
    *,
    fix_swap: bool = False,
    only: Collection[str] | None = None,
    persist_root: Path | None = None,
    host: HostView | None = None,
    today: date | None = None,
    vms: tuple[TenantVm, ...] | None = None,
) -> DoctorReport:
    """Check the host against every recommendation; with ``fix``, apply what is safe.

    ``root`` is where /proc, /sys and /etc are read (and written with ``fix``);
    ``persist_root`` is where boot-time files go (defaults to ``root``). Fixed checks
    are run again, so the report shows the state after the fix.
    """
    host = host or HostView(root)
    ctx = DoctorContext.from_config(cfg, today=today, vms=vms)
    results = run_checks(host, ctx, only)
    report = DoctorReport(results=results)
    if not fix:
        return report
    opt_ins = {"swap"} if fix_swap else set()
    report.before = {r.id: r.status for r in results}
    report.fixes = apply_fixes(host, persist_root or root, results, opt_ins)
    report.fixed = True
    touched = {f.check_id for f in report.fixes if f.ok}
    if touched:
        again = {r.id: r for r in run_checks(host, ctx, touched)}
        report.results = [again.get(r.id, r) for r in results]
    return report


def require_safe(report: DoctorReport, accept_risk: bool = False) -> list[str]:
    """Raise :class:`HostUnsafe` on any FAIL unless the risk is accepted; returns the
    failing ids (for the caller's audit record)."""
    failed = report.failing_ids
    if failed and not accept_risk:
        raise HostUnsafe("host hardening checks failed: " + ", ".join(failed),
                         hint="run lobsterd doctor --fix, or accept the risk explicitly")
    return failed


_WIDTH = 100


def render_report(report: DoctorReport) -> str:
    """Plain text: one line per check (status, id, title), evidence and fix below."""
    out: list[str] = []
    id_w = max((len(r.id) for r in report.results), default=4)
    pad = " " * (6 + id_w + 2)
    for r in report.results:
        out.append(f"{r.status!s:<4}  {r.id:<{id_w}}  {r.title}")
        out += textwrap.wrap("evidence: " + r.evidence, _WIDTH, initial_indent=pad,
                             subsequent_indent=pad + "  ", break_on_hyphens=False)
        if r.fix and r.status != Status.PASS:
            tags = [t for t, on in (("runtime", r.fixable_at_runtime),
                                    ("needs reboot", r.needs_reboot),
                                    (f"opt-in --fix-{r.opt_in}", bool(r.opt_in))) if on]
            label = f"fix [{', '.join(tags)}]: " if tags else "fix: "
            out += textwrap.wrap(label + r.fix, _WIDTH, initial_indent=pad,
                                 subsequent_indent=pad + "  ", break_on_hyphens=False)
    if report.fixed:
        out.append("")
        out.append("applied by --fix:" if report.fixes else "--fix: nothing to apply")
        for f in report.fixes:
            mark = "ok  " if f.ok else "FAIL"
            before = report.before.get(f.check_id)
            out.append(f"  {mark} {f.check_id} (was {before}): {f.detail}")
    counts = report.counts()
    out.append("")
    out.append("summary: " + ", ".join(f"{counts[s]} {s}" for s in ("PASS", "WARN", "FAIL",
                                                                  "SKIP")))
    if report.needs_reboot:
        out.append("needs a reboot to take full effect (lobsterd never reboots): "
                   + ", ".join(report.needs_reboot))
    return "\n".join(out) + "\n"
