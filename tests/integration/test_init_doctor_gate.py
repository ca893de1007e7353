"""init refuses a host that doctor FAILs, unless the operator accepts the risk (audited)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lobsterd.doctor.model import CheckResult, DoctorReport, Status
from lobsterd.errors import HostUnsafe
from lobsterd.ops.host import Host
from lobsterd.ops.init import init_host
from tests.helpers import make_config, need_root

pytestmark = pytest.mark.integration


class StopHere(Exception):
    """Raised where init would start touching the real host's network."""


def failing_report(*_: object, **__: object) -> DoctorReport:
    return DoctorReport(results=[
        CheckResult(id="ksm", title="KSM off", status=Status.FAIL, evidence="run=1"),
        CheckResult(id="swap", title="swap off", status=Status.PASS, evidence="none"),
    ])


def test_init_refuses_on_fail_and_audits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_root()
    monkeypatch.setattr("lobsterd.doctor.run_doctor", failing_report)
    host = Host(make_config(tmp_path))
    with pytest.raises(HostUnsafe) as exc:
        init_host(host, config_path=str(tmp_path / "lobsterd.toml"))
    assert "ksm" in exc.value.message and "--accept-risk" in str(exc.value)
    last = host.audit.tail(1)[0]
    got = (last["action"], last["outcome"], last["error_code"])
    assert got == ("init", "denied", "HOST_UNSAFE")
    assert last["details"] == {"failed_checks": ["ksm"]}


def test_accept_risk_goes_on_and_is_recorded(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    need_root()
    monkeypatch.setattr("lobsterd.doctor.run_doctor", failing_report)

    def stop() -> None:
        raise StopHere

    monkeypatch.setattr("lobsterd.adapters.net.enable_ip_forward", stop)
    host = Host(make_config(tmp_path))
    with pytest.raises(StopHere):
        init_host(host, config_path=str(tmp_path / "lobsterd.toml"), accept_risk=True)
    last = host.audit.tail(1)[0]
    assert (last["action"], last["outcome"]) == ("init.accept-risk", "ok")
    assert last["details"] == {"failed_checks": ["ksm"]}
    assert host.audit.verify().ok
