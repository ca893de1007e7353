"""An evict that cannot remove everything keeps the tenant registered for a retry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lobsterd.core.lifecycle import Status
from lobsterd.errors import EvictIncomplete, NetworkSetupFailed
from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.evict import evict
from lobsterd.ops.host import Host
from lobsterd.security.crypto import ensure_master_key
from tests.helpers import make_config, need_root

pytestmark = pytest.mark.integration


class FakeFirewall:
    def __init__(self) -> None:
        self.removed: list[int] = []

    def remove_tenant(self, t: Any) -> None:
        self.removed.append(t.slot)


def test_failed_step_keeps_the_row_and_a_retry_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_root()
    cfg = make_config(tmp_path)
    ensure_master_key(cfg)
    host = Host(cfg)
    host.__dict__["firewall"] = FakeFirewall()  # never touch the real host's nftables
    host.registry.reserve("demo", "qemu", {})
    host.registry.transition("demo", Status.ACTIVE)
    host.secrets.set_internal("demo", rt.AGENT_TOKEN, "tok")

    calls: list[str] = []

    def flaky_delete(name: str, **_: object) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise NetworkSetupFailed(f"cannot delete {name}: device busy")

    monkeypatch.setattr("lobsterd.adapters.net.delete_tap", flaky_delete)
    with pytest.raises(EvictIncomplete) as exc:
        evict(host, "demo")
    assert "network: cannot delete lbt1: device busy" in exc.value.message
    assert "lobsterd evict demo --yes" in str(exc.value)
    assert host.registry.get("demo").status is Status.REMOVING
    assert host.secrets.get_internal("demo", rt.AGENT_TOKEN) == "tok"
    assert host.audit.tail(1)[0]["error_code"] == "EVICT_INCOMPLETE"

    report = evict(host, "demo")  # Caddy is not running here: only a warning
    assert any(w.startswith("caddy:") for w in report.warnings)
    assert host.registry.find("demo") is None
    assert calls == ["lbt1", "lbt1"]
    assert host.audit.tail(1)[0]["outcome"] == "ok"
