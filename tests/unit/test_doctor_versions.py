"""The VMM version floor: Firecracker advisories and support lines, QEMU minimums."""

from __future__ import annotations

from datetime import date

import pytest

from lobsterd.doctor.model import Status
from lobsterd.doctor.versions import (
    FIRECRACKER_ADVISORIES,
    FIRECRACKER_SUPPORT,
    assess_firecracker,
    assess_qemu,
    parse_version,
)

TODAY = date(2026, 12, 3)
BEFORE_115_EOS = date(2026, 9, 1)
AFTER_116_EOS = date(2026, 12, 4)


@pytest.mark.parametrize(
    ("version", "cves"),
    [
        ("1.12.0", {"CVE-2026-1386"}),
        ("1.13.0", {"CVE-2026-1386", "CVE-2026-5747"}),
        ("1.13.1", {"CVE-2026-1386", "CVE-2026-5747"}),
        ("1.13.2", {"CVE-2026-5747"}),
        ("1.14.0", {"CVE-2026-1386", "CVE-2026-5747"}),
        ("1.14.1", {"CVE-2026-5747"}),
        ("1.14.3", {"CVE-2026-5747"}),
        ("1.15.0", {"CVE-2026-5747"}),
    ],
)
def test_versions_in_an_advisory_range_fail_naming_the_cve(version: str, cves: set[str]) -> None:
    status, reasons = assess_firecracker(f"Firecracker v{version}", TODAY)
    assert status == Status.FAIL
    named = {a.cve for a in FIRECRACKER_ADVISORIES if any(a.cve in r for r in reasons)}
    assert named == cves


@pytest.mark.parametrize(
    ("version", "today", "expected"),
    [
        ("1.14.4", BEFORE_115_EOS, Status.WARN),  # clean, but v1.14 ended 2026-06-03
        ("1.14.4", date(2026, 6, 3), Status.PASS),  # the last day of support
        ("1.15.1", BEFORE_115_EOS, Status.PASS),
        ("1.15.1", TODAY, Status.WARN),  # past v1.15's minimum end of support
        ("1.16.1", TODAY, Status.PASS),  # v1.16's minimum EOS is today: still supported
        ("1.16.1", AFTER_116_EOS, Status.WARN),
        ("1.16.0", TODAY, Status.PASS),
    ],
)
def test_clean_versions_pass_until_their_line_is_out_of_support(
    version: str, today: date, expected: Status
) -> None:
    status, reasons = assess_firecracker(f"Firecracker v{version}\n\nSupported snapshot "
                                         "data format versions: v1.0.0", today)
    assert status == expected, reasons
    if expected == Status.WARN:
        assert any("end of support" in r for r in reasons)


def test_an_old_line_missing_from_the_table_is_out_of_support() -> None:
    status, reasons = assess_firecracker("v1.10.1", TODAY)
    assert status == Status.FAIL  # also inside CVE-2026-1386
    assert any("out of support" in r for r in reasons)


def test_a_newer_line_than_the_table_passes_and_says_so() -> None:
    status, reasons = assess_firecracker("Firecracker v1.17.0", TODAY)
    assert status == Status.PASS
    assert any("newer than lobsterd's table" in r for r in reasons)


def test_prerelease_builds_warn_and_garbage_fails() -> None:
    status, reasons = assess_firecracker("Firecracker v1.16.1-dev", TODAY)
    assert status == Status.WARN and any("pre-release" in r for r in reasons)
    assert assess_firecracker("no version here", TODAY)[0] == Status.FAIL


def test_the_floor_is_one_table() -> None:
    # Every supported line has a date; advisories name where they were fixed.
    assert (1, 16) in FIRECRACKER_SUPPORT
    for adv in FIRECRACKER_ADVISORIES:
        for fixed in adv.fixed_in:
            parsed = parse_version(fixed)
            assert parsed is not None and not adv.affects(parsed[0])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", Status.PASS),
        ("QEMU emulator version 9.0.0", Status.PASS),
        ("QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6)", Status.WARN),
        ("QEMU emulator version 4.1.1", Status.FAIL),
        ("qemu: unknown", Status.FAIL),
    ],
)
def test_qemu_versions(text: str, expected: Status) -> None:
    assert assess_qemu(text)[0] == expected


def test_parse_version() -> None:
    assert parse_version("Firecracker v1.16.1") == ((1, 16, 1), "")
    assert parse_version("QEMU emulator version 7.2") == ((7, 2, 0), "")
    assert parse_version("v1.15.1-rc1") == ((1, 15, 1), "-rc1")
