from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lobsterd.core import alloc
from lobsterd.core.names import is_valid_name, tap_name, validate_name
from lobsterd.errors import CapacityExhausted, ValidationFailed


@pytest.mark.parametrize("name", ["a", "demo", "my-tenant", "t1", "a" * 63, "x-1-y"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Demo", "1abc", "-abc", "abc-", "a.b", "a b", "a_b", "a" * 64, "tënant", "ab\n",
     "demo\x00", "\uff41\uff42\uff43"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        validate_name(name)
    assert "invalid tenant name" in exc.value.message
    assert "\n" not in exc.value.message


@given(st.text(max_size=80))
def test_name_rule_matches_dns_label(name: str) -> None:
    ok = is_valid_name(name)
    expected = (
        1 <= len(name) <= 63
        and name.isascii()
        and name[0].isalpha() and name[0].islower()
        and name[-1] != "-"
        and all(c.islower() or c.isdigit() or c == "-" for c in name)
    )
    assert ok == expected


def test_interface_names_fit_for_any_slot() -> None:
    assert len(tap_name(16382)) <= 15
    assert tap_name(1) != tap_name(10)


def test_slot_addresses() -> None:
    pool = alloc.parse_pool("10.200.0.0/16")
    a = alloc.slot_addresses(pool, 1)
    got = (str(a.host_ip), str(a.guest_ip), str(a.network))
    assert got == ("10.200.0.5", "10.200.0.6", "10.200.0.4/30")
    last = alloc.slot_addresses(pool, alloc.max_slot(pool))
    assert str(last.guest_ip) == "10.200.255.254"
    with pytest.raises(ValidationFailed):
        alloc.slot_addresses(pool, 0)
    with pytest.raises(ValidationFailed):
        alloc.slot_addresses(pool, alloc.max_slot(pool) + 1)


@given(st.sets(st.integers(1, 50)), st.integers(1, 60))
def test_lowest_free_slot(used: set[int], limit: int) -> None:
    free = [s for s in range(1, limit + 1) if s not in used]
    if not free:
        with pytest.raises(CapacityExhausted):
            alloc.lowest_free_slot(used, limit)
    else:
        assert alloc.lowest_free_slot(used, limit) == free[0]


@given(st.integers(1, 16382), st.integers(1, 16382))
def test_slots_never_overlap(a: int, b: int) -> None:
    pool = alloc.parse_pool("10.200.0.0/16")
    na, nb = alloc.slot_addresses(pool, a).network, alloc.slot_addresses(pool, b).network
    assert (a == b) == na.overlaps(nb)
    assert na.subnet_of(ipaddress.IPv4Network("10.200.0.0/16"))


def test_bad_pool() -> None:
    with pytest.raises(ValidationFailed):
        alloc.parse_pool("10.0.0.1/16")
    with pytest.raises(ValidationFailed):
        alloc.parse_pool("10.0.0.0/30")
