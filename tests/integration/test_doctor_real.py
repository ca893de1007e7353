"""doctor on this very host: every check read-only, then the safe runtime fixes for real.

The fixes touch host-wide knobs (KSM, nf_conntrack_max, the console log level), so each
is restored to the value it had before, even when an assertion fails. Boot-time files go
to a temporary directory, never to this host's /etc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lobsterd.doctor import CHECKS, Status, run_doctor
from lobsterd.doctor.checks_host import CONNTRACK_HEADROOM, CONNTRACK_MAX, KSM_RUN, PRINTK
from lobsterd.doctor.fix import PERSIST_FILES, parse_entries
from lobsterd.doctor.model import PersistKind
from tests.helpers import make_config, need, need_root

pytestmark = pytest.mark.integration

WATCHED = (KSM_RUN, CONNTRACK_MAX, PRINTK, "/proc/sys/net/ipv4/conf/default/rp_filter",
           "/sys/devices/system/cpu/smt/control", "/proc/sys/net/ipv4/ip_forward")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


@pytest.fixture
def restore_host() -> Iterator[dict[str, str | None]]:
    saved = {p: _read(p) for p in WATCHED}
    try:
        yield saved
    finally:
        for path in (KSM_RUN, CONNTRACK_MAX, PRINTK):
            old = saved[path]
            if old is not None and _read(path) != old:
                _write(path, old.split()[0] if path == KSM_RUN else old)


def test_every_check_runs_for_real_and_reads_only(tmp_path: Path) -> None:
    need_root()
    before = {p: _read(p) for p in WATCHED}
    report = run_doctor(make_config(tmp_path))
    assert {p: _read(p) for p in WATCHED} == before  # a plain run changes nothing

    assert [r.id for r in report.results] == list(CHECKS)
    for r in report.results:
        assert not r.evidence.startswith("the check could not run"), r
        if r.status in {Status.WARN, Status.FAIL}:
            assert r.fix, f"{r.id} has no fix"

    kvm = report.get("kvm_usable")
    if Path("/sys/module/kvm_intel").is_dir() or Path("/sys/module/kvm_amd").is_dir():
        assert kvm.status == Status.PASS
    elif Path("/sys/module/kvm_pvm").is_dir():
        # This machine: /dev/kvm answers, but only kvm_pvm backs it.
        assert kvm.status == Status.WARN
        assert "kvm_pvm" in kvm.evidence and "lobsterd uses TCG" in kvm.evidence

    ksm = _read(KSM_RUN)
    if ksm is not None:
        assert f"{KSM_RUN} = {ksm}" in report.get("ksm").evidence
    smt = _read("/sys/devices/system/cpu/smt/control")
    if smt is not None:
        assert f"= {smt}" in report.get("smt").evidence
    ct = _read(CONNTRACK_MAX)
    if ct is not None:
        assert f"{CONNTRACK_MAX} = {ct}" in report.get("conntrack_max").evidence
    assert report.get("vmm_version").status != Status.FAIL  # QEMU is installed here
    assert "QEMU" in report.get("vmm_version").evidence
    v1 = not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    assert (report.get("cgroup_version").status == Status.WARN) == v1


def test_cli_json_is_well_formed(tmp_path: Path) -> None:
    need_root()
    conf = tmp_path / "lobsterd.toml"
    conf.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "lobsterd", "--config", str(conf), "doctor", "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    data = json.loads(proc.stdout)
    assert proc.returncode == (0 if data["ok"] else 1), proc.stderr
    assert {r["id"] for r in data["results"]} == set(CHECKS)
    for r in data["results"]:
        assert r["status"] in {"PASS", "WARN", "FAIL", "SKIP"}
        assert isinstance(r["evidence"], str) and r["evidence"]
    assert sum(data["counts"].values()) == len(CHECKS)


def test_fix_for_real_then_restore(tmp_path: Path, restore_host: dict[str, str | None]) -> None:
    need_root()
    need(os.path.exists(KSM_RUN), f"needs {KSM_RUN}")
    need(os.path.exists(CONNTRACK_MAX), f"needs {CONNTRACK_MAX} (nf_conntrack)")
    need(os.path.exists(PRINTK), f"needs {PRINTK}")
    current = int(restore_host[CONNTRACK_MAX] or "0")
    # Size the tenant count so that the table must grow by a little.
    tenants = max(1, (current - CONNTRACK_HEADROOM) // 1024 + 2)
    need(tenants <= 16382, "nf_conntrack_max is already larger than any configuration")
    required = tenants * 1024 + CONNTRACK_HEADROOM
    cfg = make_config(tmp_path / "cfg", network={"max_tenants": tenants, "conn_limit": 1024})

    host_file = PERSIST_FILES[PersistKind.SYSCTL]
    host_file_before = _read(host_file)
    _write(KSM_RUN, "1")  # what a careless host would have
    _write(PRINTK, "7 4 1 7")
    only = ["ksm", "conntrack_max", "console_quiet"]
    before = run_doctor(cfg, only=only)
    assert before.get("ksm").status == Status.FAIL
    assert before.get("conntrack_max").status == Status.WARN

    report = run_doctor(cfg, fix=True, only=only, persist_root=tmp_path / "persist")
    assert all(f.ok for f in report.fixes), report.fixes
    assert _read(KSM_RUN) in {"0", "2"}
    assert int(_read(CONNTRACK_MAX) or "0") == required
    assert (_read(PRINTK) or "").split()[0] == "1"
    assert report.get("ksm").status == Status.PASS
    assert report.get("conntrack_max").status == Status.PASS

    sysctl = (tmp_path / "persist" / PERSIST_FILES[PersistKind.SYSCTL].lstrip("/")).read_text()
    entries = parse_entries(PersistKind.SYSCTL, sysctl)
    assert entries["net.netfilter.nf_conntrack_max"] == str(required)
    assert entries["kernel.printk"].split()[0] == "1"
    tmpfiles = tmp_path / "persist" / PERSIST_FILES[PersistKind.TMPFILES].lstrip("/")
    assert f"w {KSM_RUN} - - - - 0" in tmpfiles.read_text()
    assert _read(host_file) == host_file_before  # this host's /etc was left alone
