"""Version floors of the VMMs, as data.

Firecracker advisories and release-line support dates live in the two tables below and
nowhere else: a new advisory or release is one added row. Sources: the Firecracker
release policy (``docs/RELEASE_POLICY.md``), GHSA-36j2-f825-qvgc / AWS bulletin
2026-003 (CVE-2026-1386) and GHSA-776c-mpj7-jm3r / AWS bulletin 2026-015 (CVE-2026-5747).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from lobsterd.doctor.model import Status, worst

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Advisory:
    cve: str
    summary: str
    affected: tuple[tuple[Version, Version], ...]  # inclusive ranges
    fixed_in: tuple[str, ...]

    def affects(self, v: Version) -> bool:
        return any(lo <= v <= hi for lo, hi in self.affected)


FIRECRACKER_ADVISORIES: tuple[Advisory, ...] = (
    Advisory(
        cve="CVE-2026-1386",
        summary="jailer follows symlinks when copying the binary into the jail: a local "
        "user who can write to jailer directories can overwrite host files",
        affected=(((0, 0, 0), (1, 13, 1)), ((1, 14, 0), (1, 14, 0))),
        fixed_in=("1.13.2", "1.14.1"),
    ),
    Advisory(
        cve="CVE-2026-5747",
        summary="virtio-pci transport out-of-bounds write: guest root can crash the VMM "
        "and possibly run code on the host (only with --enable-pci)",
        affected=(((1, 13, 0), (1, 14, 3)), ((1, 15, 0), (1, 15, 0))),
        fixed_in=("1.14.4", "1.15.1"),
    ),
)

# Release line → end of support (for the newest lines: the earliest date support may
# end, per the release policy). Lines older than every row are out of support.
FIRECRACKER_SUPPORT: dict[tuple[int, int], date] = {
    (1, 13): date(2026, 3, 9),
    (1, 14): date(2026, 6, 3),
    (1, 15): date(2026, 9, 9),
    (1, 16): date(2026, 12, 3),
}

# Oldest QEMU lobsterd runs on (-M microvm arrived in 4.2) and oldest it recommends
# (Debian 12's 7.2, which the QEMU driver is tested with).
QEMU_MINIMUM: Version = (4, 2, 0)
QEMU_RECOMMENDED: Version = (7, 2, 0)

_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?([-+~][0-9A-Za-z.\-+~]*)?")


def parse_version(text: str) -> tuple[Version, str] | None:
    """First ``X.Y[.Z][suffix]`` in ``text``: ``((x, y, z), suffix)``."""
    m = _VERSION_RE.search(text)
    if not m:
        return None
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)), m.group(4) or ""


def fmt(v: Version) -> str:
    return ".".join(str(x) for x in v)


def assess_firecracker(version: str, today: date) -> tuple[Status, list[str]]:
    """FAIL inside any advisory's range, WARN past end of support, else PASS."""
    parsed = parse_version(version)
    if parsed is None:
        return Status.FAIL, [f"cannot read a version from {version.strip()!r}"]
    v, suffix = parsed
    line = v[:2]
    reasons: list[str] = []
    status = Status.PASS
    for adv in FIRECRACKER_ADVISORIES:
        if adv.affects(v):
            status = Status.FAIL
            reasons.append(f"{adv.cve}: {adv.summary} (fixed in {', '.join(adv.fixed_in)})")
    newest = max(FIRECRACKER_SUPPORT)
    eos = FIRECRACKER_SUPPORT.get((line[0], line[1]))
    if eos is None and line < min(FIRECRACKER_SUPPORT):
        reasons.append(f"release line v{line[0]}.{line[1]} is out of support")
        status = worst(status, Status.WARN)
    elif eos is None and line > newest:
        reasons.append(f"release line v{line[0]}.{line[1]} is newer than lobsterd's table "
                       f"(newest known v{newest[0]}.{newest[1]})")
    elif eos is not None and today > eos:
        reasons.append(f"release line v{line[0]}.{line[1]} reached end of support on "
                       f"{eos.isoformat()}")
        status = worst(status, Status.WARN)
    if suffix:
        reasons.append(f"pre-release or local build ({fmt(v)}{suffix})")
        status = worst(status, Status.WARN)
    if not reasons:
        reasons.append(f"v{fmt(v)}: no known advisory; line supported until at least "
                       f"{eos.isoformat() if eos else 'unknown'}")
    return status, reasons


def assess_qemu(version: str) -> tuple[Status, list[str]]:
    parsed = parse_version(version)
    if parsed is None:
        return Status.FAIL, [f"cannot read a version from {version.strip()!r}"]
    v, _ = parsed
    if v < QEMU_MINIMUM:
        return Status.FAIL, [f"QEMU {fmt(v)} lacks -M microvm (needs >= {fmt(QEMU_MINIMUM)})"]
    if v < QEMU_RECOMMENDED:
        return Status.WARN, [f"QEMU {fmt(v)} is older than {fmt(QEMU_RECOMMENDED)}, the "
                             "oldest lobsterd is tested with"]
    return Status.PASS, [f"QEMU {fmt(v)}"]

