from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lobsterd.core.bootargs import build_boot_args, check_boot_args, parse_lobster_params
from lobsterd.errors import ValidationFailed

TOKEN = "s3cr3t-agent-token-value-0123456789abcdef"
HASH = hashlib.sha256(TOKEN.encode()).hexdigest()


def args(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "guest_ip": "10.200.0.6",
        "host_ip": "10.200.0.5",
        "prefix": 30,
        "agent_token_hash": HASH,
        "agent_port": 52,
        "health_port": 53,
        "gateway_port": 9000,
        "tenant": "alice",
        "accel": "tcg",
        "tsc_khz": 2_445_402,
        "debug_console": False,
    }
    base.update(over)
    return base


def test_production_line_matches_contract() -> None:
    line = build_boot_args(**args())
    params = line.split(" ")
    assert params[:4] == ["8250.nr_uarts=0", "quiet", "panic=1", "reboot=k"]
    assert "tsc_early_khz=2445402" in params
    assert not any(p.startswith("console=") or p.startswith("earlyprintk") for p in params)
    assert parse_lobster_params(line) == {
        "ip": "10.200.0.6/30",
        "gw": "10.200.0.5",
        "agent_hash": HASH,
        "agent_port": "52",
        "health_port": "53",
        "gateway_port": "9000",
        "name": "alice",
    }


def test_no_token_anywhere() -> None:
    line = build_boot_args(**args())
    assert TOKEN not in line
    assert HASH in line


def test_kvm_has_no_tsc_hint() -> None:
    line = build_boot_args(**args(accel="kvm", tsc_khz=0))
    assert "tsc_early_khz" not in line


def test_tcg_requires_tsc_khz() -> None:
    with pytest.raises(ValidationFailed, match="tsc_khz"):
        build_boot_args(**args(tsc_khz=0))


def test_debug_console() -> None:
    line = build_boot_args(**args(debug_console=True))
    params = line.split()
    assert "console=ttyS0" in params
    assert "earlyprintk=ttyS0" in params
    assert "8250.nr_uarts=0" not in params
    assert "quiet" not in params


@pytest.mark.parametrize(
    "bad",
    [
        TOKEN,  # a raw token
        HASH.upper(),
        HASH[:-1],
        HASH + "0",
        HASH[:32] + " " + HASH[33:],
        HASH[:-1] + "=",
        "",
    ],
)
def test_rejects_anything_but_a_hash(bad: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        build_boot_args(**args(agent_token_hash=bad))
    if bad:
        assert bad not in str(exc.value)  # a mistaken token is never echoed


@pytest.mark.parametrize(
    "over",
    [
        {"guest_ip": "10.200.0.6 init=/bin/sh"},
        {"guest_ip": "10.200.0.6=1"},
        {"host_ip": "10.200.0.9"},  # not in the /30
        {"host_ip": "10.200.0.6"},  # same as the guest
        {"guest_ip": "10.200.0.7"},  # broadcast of the /30
        {"prefix": 31},
        {"prefix": True},
        {"agent_port": 0},
        {"gateway_port": 70000},
        {"health_port": 52},  # clashes with agent_port
        {"tenant": "bob init=/bin/sh"},
        {"tenant": "a=b"},
        {"tenant": "Bob"},
        {"accel": "hvf"},
        {"tsc_khz": -1},
    ],
)
def test_rejects_bad_values(over: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed):
        build_boot_args(**args(**over))


@pytest.mark.parametrize(
    "line", ["a  b", "a=b=c", "=x", "x\ny", "x 'y'", "é"]
)
def test_check_boot_args_rejects(line: str) -> None:
    with pytest.raises(ValidationFailed):
        check_boot_args(line)


@given(st.text(min_size=1, max_size=40))
def test_any_tenant_value_either_rejected_or_one_param(name: str) -> None:
    try:
        line = build_boot_args(**args(tenant=name))
    except ValidationFailed:
        return
    assert line.split(" ")[-1] == f"lobster.name={name}"
    assert len(line.split(" ")) == len(build_boot_args(**args()).split(" "))
