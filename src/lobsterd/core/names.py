"""Tenant naming rules and every name derived from a tenant.

Tenant names are DNS labels because they become ``<name>.<domain>`` host names and
certificate subjects. Kernel-visible names (interfaces, cgroups, VM ids) derive from the
tenant's *slot*, never from the raw name, so a 63-character tenant name works everywhere
(Linux caps interface names at 15 characters).
"""

from __future__ import annotations

import re

from lobsterd.errors import ValidationFailed

MAX_NAME_LEN = 63
_NAME_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
NAME_RULE = (
    "a DNS label: 1-63 characters, lower-case a-z, digits and '-', "
    "starting with a letter and not ending with '-'"
)


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid tenant name, else raise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = name if isinstance(name, str) and name.isprintable() else repr(name)
        if isinstance(name, str) and len(name) > MAX_NAME_LEN:
            shown = f"{name[:20]}… ({len(name)} characters)"
        raise ValidationFailed(f'invalid tenant name "{shown}": must be {NAME_RULE}')
    return name


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def tap_name(slot: int) -> str:
    """Host-side TAP device of the tenant in ``slot`` (≤ 15 chars for any slot < 10**12)."""
    return f"lbt{slot}"


def vm_id(slot: int) -> str:
    return f"lobster-{slot}"


def cgroup_name(name: str) -> str:
    """Leaf cgroup directory under lobsterd's own parent cgroup."""
    return f"tenant-{name}"
