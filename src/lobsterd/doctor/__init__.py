"""Host hardening: every production-host recommendation, checked and (safely) fixed.

``run_doctor(cfg)`` reads the host through :class:`HostView` and returns a
:class:`DoctorReport`; ``render_report`` turns it into text; ``require_safe`` refuses a
report with a FAIL unless the operator accepts the risk.
"""

from lobsterd.doctor.host import HostView
from lobsterd.doctor.model import (
    CheckResult,
    DoctorContext,
    DoctorReport,
    Status,
    TenantVm,
)
from lobsterd.doctor.runner import CHECKS, render_report, require_safe, run_checks, run_doctor

__all__ = [
    "CHECKS",
    "CheckResult",
    "DoctorContext",
    "DoctorReport",
    "HostView",
    "Status",
    "TenantVm",
    "render_report",
    "require_safe",
    "run_checks",
    "run_doctor",
]
