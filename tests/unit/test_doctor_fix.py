"""``--fix`` against fabricated trees, persistence files, the report and the CLI."""

from __future__ import annotations

import json
import os
import re
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner

from lobsterd.cli.main import cli
from lobsterd.config import Config
from lobsterd.doctor import (
    CHECKS,
    DoctorReport,
    Status,
    TenantVm,
    render_report,
    require_safe,
    run_doctor,
)
from lobsterd.doctor.checks_cpu import SMT_CONTROL, VULN_DIR
from lobsterd.doctor.checks_host import CONNTRACK_MAX, KSM_RUN, PRINTK, RP_DEFAULT
from lobsterd.doctor.checks_kvm import MIN_TIMER
from lobsterd.doctor.faketree import FakeTree
from lobsterd.doctor.fix import PERSIST_FILES, parse_entries, persist, render_file
from lobsterd.doctor.model import Persist, PersistKind
from lobsterd.errors import HostUnsafe
from tests.helpers import make_config

TODAY = date(2026, 12, 3)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path / "cfgroot", network={"max_tenants": 10, "conn_limit": 1000})


def _doctor(tree: FakeTree, cfg: Config, **kw: object) -> DoctorReport:
    only = [i for i in CHECKS if i != "jail_paths"]  # the fake tree's owner is not root
    return run_doctor(cfg, root=tree.root, host=tree.host(), today=TODAY, only=only,
                      **kw)  # type: ignore[arg-type]


def _break_runtime_settings(tree: FakeTree) -> None:
    tree.file(KSM_RUN, "1")
    tree.file(CONNTRACK_MAX, "5000")
    tree.file(PRINTK, "7\t4\t1\t7")
    tree.file(RP_DEFAULT, "0")
    tree.file(MIN_TIMER, "200", mode=0o644)
    tree.file(SMT_CONTROL, "on")
    tree.file("/sys/devices/system/cpu/smt/active", "1")
    for n in (0, 1):
        tree.file(f"/sys/devices/system/cpu/cpu{n}/topology/thread_siblings_list", "0-1")


def test_a_hardened_tree_passes_everything(tree: FakeTree, cfg: Config) -> None:
    report = _doctor(tree, cfg)
    bad = {r.id: r.status for r in report.results if r.status not in {Status.PASS, Status.SKIP}}
    assert bad == {}
    assert not report.has_fail


def test_fix_applies_runtime_values_and_persists_them(tree: FakeTree, cfg: Config) -> None:
    _break_runtime_settings(tree)
    before = _doctor(tree, cfg)
    assert before.get("ksm").status == Status.FAIL
    assert before.get("smt").status == Status.FAIL
    assert before.get("conntrack_max").status == Status.WARN

    report = _doctor(tree, cfg, fix=True)
    need = str(10 * 1000 + 65536)
    assert tree.read(KSM_RUN).strip() == "2"
    assert tree.read(CONNTRACK_MAX).strip() == need
    assert tree.read(PRINTK).strip() == "1 4 1 7"
    assert tree.read(RP_DEFAULT).strip() == "1"
    assert tree.read(MIN_TIMER).strip() == "1000"
    assert tree.read(SMT_CONTROL).strip() == "off"
    assert all(f.ok for f in report.fixes), [f for f in report.fixes if not f.ok]

    sysctl = parse_entries(PersistKind.SYSCTL, tree.read(PERSIST_FILES[PersistKind.SYSCTL]))
    assert sysctl == {"net.netfilter.nf_conntrack_max": need, "kernel.printk": "1 4 1 7",
                      "net.ipv4.conf.default.rp_filter": "1"}
    assert "options kvm min_timer_period_us=1000" in tree.read(
        PERSIST_FILES[PersistKind.MODPROBE])
    tmpfiles = tree.read(PERSIST_FILES[PersistKind.TMPFILES])
    assert f"w {KSM_RUN} - - - - 0" in tmpfiles and f"w {SMT_CONTROL} - - - - off" in tmpfiles
    assert tree.read(PERSIST_FILES[PersistKind.MODULES_LOAD]).splitlines()[-1] == "nf_conntrack"

    # The report shows the state after the fix; what was wrong is kept in "before".
    for cid in ("ksm", "smt", "conntrack_max", "console_quiet", "rp_filter",
                "min_timer_period"):
        assert report.get(cid).status == Status.PASS, report.get(cid)
    assert report.before["ksm"] == Status.FAIL
    assert not report.has_fail
    # Never a reboot, never a command for these fixes.
    assert tree.runner.calls == [("/usr/bin/qemu-system-x86_64", "--version")] * 2


def test_fix_is_idempotent(tree: FakeTree, cfg: Config) -> None:
    _break_runtime_settings(tree)
    _doctor(tree, cfg, fix=True)
    files = {k: tree.read(v) for k, v in PERSIST_FILES.items()}
    again = _doctor(tree, cfg, fix=True)
    assert again.fixes == []  # nothing left to do
    assert {k: tree.read(v) for k, v in PERSIST_FILES.items()} == files


def test_persist_merges_with_what_is_already_there(tmp_path: Path) -> None:
    persist(tmp_path, Persist(PersistKind.MODPROBE, "kvm.nx_huge_pages", "never"))
    persist(tmp_path, Persist(PersistKind.MODPROBE, "kvm.min_timer_period_us", "1000"))
    persist(tmp_path, Persist(PersistKind.MODPROBE, "kvm.min_timer_period_us", "2000"))
    text = (tmp_path / "etc/modprobe.d/lobsterd-kvm.conf").read_text()
    assert "options kvm min_timer_period_us=2000 nx_huge_pages=never\n" in text
    assert parse_entries(PersistKind.MODPROBE, text) == {
        "kvm.min_timer_period_us": "2000", "kvm.nx_huge_pages": "never"}
    entries = {"a.b": "1", "c": "2"}
    assert parse_entries(PersistKind.SYSCTL, render_file(PersistKind.SYSCTL, entries)) == entries


FSTAB = ("UUID=1 / ext4 defaults 0 1\n"
         "/dev/sda2 none swap sw 0 0\n"
         "/dev/mapper/cryptswap none swap sw 0 0\n")


def test_swap_fix_is_opt_in(tree: FakeTree, cfg: Config) -> None:
    tree.file("/proc/swaps", "Filename Type Size Used Priority\n/dev/sda2 partition 1 0 -2\n")
    tree.file("/etc/fstab", FSTAB)
    report = _doctor(tree, cfg, fix=True)
    out = [f for f in report.fixes if f.check_id == "swap"]
    assert len(out) == 1 and not out[0].ok and "--fix-swap" in out[0].detail
    assert ("swapoff", "/dev/sda2") not in tree.runner.calls
    assert tree.read("/etc/fstab") == FSTAB

    tree.runner.set(["swapoff", "/dev/sda2"], "")
    report = _doctor(tree, cfg, fix=True, fix_swap=True)
    assert ("swapoff", "/dev/sda2") in tree.runner.calls
    fstab = tree.read("/etc/fstab").splitlines()
    assert fstab[1].startswith("#") and "/dev/sda2" in fstab[1]
    assert fstab[2] == "/dev/mapper/cryptswap none swap sw 0 0"  # encrypted: kept
    assert all(f.ok for f in report.fixes if f.check_id == "swap")


def test_a_failed_action_is_reported_not_raised(tree: FakeTree, cfg: Config) -> None:
    tree.file(f"{VULN_DIR}/itlb_multihit", "KVM: Mitigation: Split huge pages")
    tree.runner.set(["mount", "-o", "remount,favordynmods", "/sys/fs/cgroup"], "",
                    returncode=32, stderr="mount: bad option")
    report = _doctor(tree, cfg, fix=True)
    (outcome,) = [f for f in report.fixes if f.check_id == "itlb_multihit"]
    assert not outcome.ok and "bad option" in outcome.detail
    assert report.get("itlb_multihit").status == Status.WARN


def test_fix_moves_kvm_pit_threads(tree: FakeTree, cfg: Config) -> None:
    tree.file("/sys/fs/cgroup/lobsterd/tenant-a/cgroup.procs", "700")
    tree.process(700, "qemu-system-x86", uid=200001, seccomp=2,
                 cgroup="0::/lobsterd/tenant-a\n")
    tree.process(701, "kvm-pit/700", cgroup="0::/\n")
    report = _doctor(tree, cfg, fix=True)
    assert report.before["kvm_pit"] == Status.FAIL
    # A real cgroup.procs would now list 701; the fake file received exactly the write.
    assert tree.read("/sys/fs/cgroup/lobsterd/tenant-a/cgroup.procs") == "701"


def test_vms_given_as_data(tree: FakeTree, cfg: Config) -> None:
    tree.process(900, "qemu", uid=0, seccomp=0)
    r = _doctor(tree, cfg, vms=(TenantVm("t", (900,)),))
    assert r.get("vm_uids").status == Status.FAIL and r.get("seccomp").status == Status.FAIL


def test_a_crashing_check_becomes_a_warning(tree: FakeTree, cfg: Config,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("bad tree")

    monkeypatch.setitem(CHECKS, "ksm", boom)
    r = _doctor(tree, cfg).get("ksm")
    assert r.status == Status.WARN and "RuntimeError: bad tree" in r.evidence


def test_report_rendering_and_json(tree: FakeTree, cfg: Config) -> None:
    _break_runtime_settings(tree)
    tree.file("/proc/cmdline", "quiet")
    report = _doctor(tree, cfg, fix=True)
    text = render_report(report)
    assert re.search(r"^PASS  ksm +KSM \(kernel same-page merging\) off$", text, re.M)
    assert re.search(r"^ +evidence: /sys/kernel/mm/ksm/run = 2", text, re.M)
    assert "applied by --fix:" in text and "(was FAIL)" in text
    assert "needs a reboot" in text and "console_quiet" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["fixed"] is True
    assert {r["id"] for r in data["results"]} == {i for i in CHECKS if i != "jail_paths"}
    assert "console_quiet" in data["needs_reboot"]
    assert data["before_fix"]["ksm"] == "FAIL"


def test_require_safe(tree: FakeTree, cfg: Config) -> None:
    tree.file(KSM_RUN, "1")
    report = _doctor(tree, cfg)
    with pytest.raises(HostUnsafe, match="ksm"):
        require_safe(report)
    assert require_safe(report, accept_risk=True) == ["ksm"]
    tree.file(KSM_RUN, "0")
    assert require_safe(_doctor(tree, cfg)) == []


# ---- CLI --------------------------------------------------------------------------------

def _cli_tree(tree: FakeTree) -> None:
    # The CLI runs the real runner: a script in the fake root answers --version.
    tree.file("/usr/bin/qemu-system-x86_64",
              "#!/bin/sh\necho 'QEMU emulator version 8.2.2'\n", mode=0o755)


def test_cli_exit_codes_and_json(tree: FakeTree, tmp_path: Path) -> None:
    _cli_tree(tree)
    conf = tmp_path / "lobsterd.toml"
    conf.write_text('[network]\nmax_tenants = 10\nconn_limit = 1000\n')
    args = ["--config", str(conf), "doctor", "--root", str(tree.root),
            "--only", "ksm,swap", "--only", "vmm_version", "--only", "conntrack_max"]
    runner = CliRunner(mix_stderr=False)
    res = runner.invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["id"] for r in data["results"]] == ["ksm", "swap", "vmm_version",
                                                  "conntrack_max"]
    assert data["results"][2]["status"] == "PASS"

    tree.file(KSM_RUN, "1")
    res = runner.invoke(cli, args)
    assert res.exit_code == 1
    assert "FAIL  ksm" in res.stdout
    assert "1 check(s) FAIL: ksm" in res.stderr

    res = runner.invoke(cli, [*args, "--fix"])
    assert res.exit_code == 0, res.output
    assert tree.read(KSM_RUN).strip() == "2"


def test_cli_rejects_fix_swap_without_fix(tree: FakeTree) -> None:
    res = CliRunner(mix_stderr=False).invoke(
        cli, ["doctor", "--root", str(tree.root), "--fix-swap"])
    assert res.exit_code == 2 and "--fix-swap only makes sense with --fix" in res.stderr


def test_cli_fix_on_the_real_root_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    res = CliRunner(mix_stderr=False).invoke(cli, ["doctor", "--fix"])
    assert res.exit_code != 0 and "root" in res.stderr


def test_a_fabricated_root_never_runs_host_tools(tree: FakeTree) -> None:
    from lobsterd.doctor.host import HostView

    host = HostView(tree.root, path_dirs=("/usr/bin",))
    assert host.run(["mount", "-o", "remount,favordynmods", "/sys/fs/cgroup"]) is None
    tree.file("/usr/bin/mount", "#!/bin/sh\necho fake-mount \"$@\"\n", mode=0o755)
    res = host.run(["mount", "-o", "remount"])
    assert res is not None and res.stdout.strip() == "fake-mount -o remount"
