"""Firewall script generation (pure; the packet-level proof is in tests/integration)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lobsterd.config import NetworkConfig
from lobsterd.core import firewall as gen
from lobsterd.core.firewall import EgressRule, HostNet, parse_egress_entry
from lobsterd.errors import ValidationFailed

HOST = HostNet(pool="10.200.0.0/16", gateway_port=9000, agent_port=52, health_port=53)


def tenant(slot: int = 3, **kw: object) -> gen.TenantNet:
    return gen.tenant_for_slot(HOST, f"t{slot}", slot, **kw)  # type: ignore[arg-type]


def lines(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln.strip()]


# -- allowlist entries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("203.0.113.0/24", EgressRule(ipaddress.IPv4Network("203.0.113.0/24"))),
        ("203.0.113.7", EgressRule(ipaddress.IPv4Network("203.0.113.7/32"))),
        ("0.0.0.0/0:443", EgressRule(ipaddress.IPv4Network("0.0.0.0/0"), 443)),
        (
            " 198.51.100.0/24:53/udp ",
            EgressRule(ipaddress.IPv4Network("198.51.100.0/24"), 53, "udp"),
        ),
        ("198.51.100.9/32:22/tcp", EgressRule(ipaddress.IPv4Network("198.51.100.9/32"), 22, "tcp")),
    ],
)
def test_parse_valid_entries(entry: str, expected: EgressRule) -> None:
    assert parse_egress_entry(entry) == expected


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "   ",
        "300.1.2.0/24",
        "10.1.2.3/8",  # host bits set: probably a typo
        "203.0.113.0/33",
        "example.com",
        "2001:db8::/32",  # tenants are IPv4-only
        "203.0.113.0/24:0",
        "203.0.113.0/24:65536",
        "203.0.113.0/24:http",
        "203.0.113.0/24:-1",
        "203.0.113.0/24:",
        "203.0.113.0/24:80/icmp",
        "203.0.113.0/24:80/",
        '203.0.113.0/24:80/tcp"; flush ruleset; "',
    ],
)
def test_parse_rejects_bad_entries_naming_them(entry: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_egress_entry(entry)
    assert repr(entry) in info.value.message


@given(
    net=st.builds(
        lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    port=st.none() | st.integers(1, 65535),
    proto=st.sampled_from([None, "tcp", "udp"]),
)
def test_parse_round_trips(net: ipaddress.IPv4Network, port: int | None, proto: str | None) -> None:
    text = str(net)
    if port is not None:
        text += f":{port}" + (f"/{proto}" if proto else "")
    rule = parse_egress_entry(text)
    assert rule.network == net
    assert rule.port == port
    assert rule.proto == (proto if port is not None else None)
    for match in rule.nft_matches():
        assert match == f"ip daddr {net}" or match.startswith(f"ip daddr {net} ")
        assert "{" not in match  # never an anonymous set (see the module doc)


def test_port_without_protocol_allows_tcp_and_udp() -> None:
    assert parse_egress_entry("203.0.113.0/24:53").nft_matches() == [
        "ip daddr 203.0.113.0/24 tcp dport 53",
        "ip daddr 203.0.113.0/24 udp dport 53",
    ]


# -- host and tenant validation ------------------------------------------------------------


def test_host_from_config_defaults() -> None:
    host = gen.host_from_config(NetworkConfig())
    assert host.pool == "10.200.0.0/16"
    assert (host.gateway_port, host.agent_port, host.health_port, host.ssh_port) == (
        9000,
        52,
        53,
        22,
    )
    assert host.uplink is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"pool": "10.200.0.0/30"}, "too small"),
        ({"pool": "not-a-pool"}, "not an IPv4 network"),
        ({"gateway_port": 0}, "gateway_port"),
        ({"agent_port": 70000}, "agent_port"),
        ({"blocked_cidrs": ("198.51.100.0/24", "nope")}, "'nope'"),
        ({"uplink": "lbt7"}, "uplink"),
        ({"uplink": 'eth0" accept'}, "uplink"),
        ({"uplink": "a-very-long-interface-name"}, "uplink"),
    ],
)
def test_bad_host_is_rejected(change: dict[str, object], needle: str) -> None:
    bad = replace(HOST, **change)  # type: ignore[arg-type]
    with pytest.raises(ValidationFailed, match=re.escape(needle)):
        gen.base_ruleset(bad)
    with pytest.raises(ValidationFailed):
        gen.full_ruleset(bad, [])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tap": "eth0"}, "TAP"),
        ({"tap": "lbt4"}, "TAP"),
        ({"guest_ip": "10.200.0.99"}, "addresses"),
        ({"host_ip": "10.200.0.17"}, "addresses"),
        ({"conn_limit": 0}, "connection limit"),
        ({"egress": "maybe"}, "egress policy"),
        ({"name": 'x" accept; "'}, "invalid tenant name"),
        ({"slot": 0}, "slot"),
        ({"egress_allow": ("203.0.113.0/24", "300.0.0.0/8")}, "300.0.0.0/8"),
    ],
)
def test_bad_tenant_is_rejected_before_any_script(change: dict[str, object], needle: str) -> None:
    bad = replace(tenant(3), **change)  # type: ignore[arg-type]
    with pytest.raises(ValidationFailed, match=re.escape(needle)):
        gen.tenant_add(HOST, bad)
    with pytest.raises(ValidationFailed, match=re.escape(needle)):
        gen.tenant_remove(HOST, bad)
    with pytest.raises(ValidationFailed, match=re.escape(needle)):
        gen.full_ruleset(HOST, [tenant(1), bad])


def test_allowlist_entries_are_validated_whatever_the_policy() -> None:
    with pytest.raises(ValidationFailed, match="nope"):
        gen.tenant_add(HOST, replace(tenant(3), egress="allow", egress_allow=("nope",)))


def test_duplicate_slots_are_rejected() -> None:
    with pytest.raises(ValidationFailed, match="slot 3"):
        gen.full_ruleset(HOST, [tenant(3), replace(tenant(3), name="other")])


def test_tenant_for_slot_derives_tap_and_addresses() -> None:
    t = gen.tenant_for_slot(HOST, "alice", 3, egress="deny", conn_limit=7)
    assert (t.tap, t.host_ip, t.guest_ip) == ("lbt3", "10.200.0.13", "10.200.0.14")
    assert (t.egress, t.conn_limit) == ("deny", 7)


# -- base ruleset ------------------------------------------------------------------------


def _blocked_set(script: str) -> list[ipaddress.IPv4Network]:
    m = re.search(r"add element inet lobsterd blocked4 \{ (.*) \}", script)
    assert m is not None
    return [ipaddress.IPv4Network(x.strip()) for x in m.group(1).split(",")]


@pytest.mark.parametrize(
    "dest",
    [
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.254",
        "127.0.0.1",
        "224.0.0.251",
        "239.255.255.250",
        "255.255.255.255",
        "0.0.0.0",
        "10.200.0.14",  # every tenant (the pool)
    ],
)
def test_blocked_destinations_cover_private_ranges(dest: str) -> None:
    nets = _blocked_set(gen.base_ruleset(HOST))
    assert any(ipaddress.IPv4Address(dest) in n for n in nets)


@pytest.mark.parametrize("dest", ["198.51.100.2", "203.0.113.5", "8.8.8.8", "100.128.0.1"])
def test_public_destinations_are_not_blocked(dest: str) -> None:
    nets = _blocked_set(gen.base_ruleset(HOST))
    assert not any(ipaddress.IPv4Address(dest) in n for n in nets)


def test_pool_and_extra_cidrs_are_blocked_and_never_overlap() -> None:
    host = replace(
        HOST, pool="198.18.0.0/24", blocked_cidrs=("203.0.113.0/24", "203.0.113.0/25", "fd00::/8")
    )
    nets = _blocked_set(gen.base_ruleset(host))
    assert ipaddress.IPv4Network("198.18.0.0/24") in nets
    assert ipaddress.IPv4Network("203.0.113.0/24") in nets
    for i, a in enumerate(nets):  # an nft interval set refuses overlapping elements
        assert not any(a.overlaps(b) for b in nets[i + 1 :])


def test_base_chains_hooks_and_priorities() -> None:
    script = gen.base_ruleset(HOST)
    chains = dict(re.findall(r"add chain inet lobsterd (\w+) \{ (type [^}]*) \}", script))
    assert chains == {
        "prerouting": "type filter hook prerouting priority raw; policy accept;",
        "input": "type filter hook input priority filter; policy accept;",
        "output": "type filter hook output priority filter; policy accept;",
        "forward": "type filter hook forward priority filter; policy accept;",
        "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
    }
    # Every base chain accepts by default and is flushed before it is rewritten, so
    # re-running the script neither duplicates rules nor changes other tables' verdicts.
    for name in chains:
        assert f"flush chain inet lobsterd {name}" in script


def test_base_has_no_dnat_and_only_touches_lobsterd() -> None:
    script = gen.base_ruleset(replace(HOST, uplink="eth0")) + gen.tenant_add(HOST, tenant())
    assert "dnat" not in script and "redirect" not in script
    for line in lines(script):
        assert re.match(r"(add|flush) (table|chain|rule|set|map|element) inet lobsterd\b", line)


def test_masquerade_targets_uplink_or_any_non_tap() -> None:
    assert 'ip saddr 10.200.0.0/16 oifname != "lbt*" masquerade' in gen.base_ruleset(HOST)
    with_uplink = gen.base_ruleset(replace(HOST, uplink="eth0"))
    assert 'ip saddr 10.200.0.0/16 oifname "eth0" masquerade' in with_uplink


def test_agent_ports_root_only_and_gateway_open() -> None:
    script = gen.base_ruleset(replace(HOST, agent_port=4000, health_port=4001, gateway_port=8443))
    rules = [
        ln.split("host_to_guest ", 1)[1]
        for ln in lines(script)
        if ln.startswith("add rule inet lobsterd host_to_guest ")
    ]
    assert rules == [
        "oifname . ip daddr != @guests drop",
        "ct state established,related accept",
        "tcp dport 4000 meta skuid 0 ct state new accept",
        "tcp dport 4001 meta skuid 0 ct state new accept",
        "tcp dport 4000 drop",
        "tcp dport 4001 drop",
        "tcp dport 8443 ct state new accept",
        "tcp dport 22 meta skuid 0 ct state new accept",
        "drop",
    ]


# -- tenant scripts -----------------------------------------------------------------------


def _egress_rules(script: str, slot: int = 3) -> list[str]:
    prefix = f"add rule inet lobsterd t_{slot}_egress "
    return [ln[len(prefix) :] for ln in lines(script) if ln.startswith(prefix)]


def test_allow_policy() -> None:
    assert _egress_rules(gen.tenant_add(HOST, tenant(conn_limit=50))) == [
        'ct state invalid drop comment "tenant t3"',
        "ip daddr @blocked4 drop",
        "ct state new ct count over 50 drop",
        "accept",
    ]


def test_deny_policy_and_empty_allowlist_send_nothing() -> None:
    expected = ['ct state invalid drop comment "tenant t3"', "ip daddr @blocked4 drop", "drop"]
    assert _egress_rules(gen.tenant_add(HOST, tenant(egress="deny"))) == expected
    assert _egress_rules(gen.tenant_add(HOST, tenant(egress="allowlist"))) == expected


def test_allowlist_policy_with_uplink() -> None:
    host = replace(HOST, uplink="eth0")
    t = gen.tenant_for_slot(
        host,
        "t3",
        3,
        egress="allowlist",
        egress_allow=("203.0.113.0/24:443/tcp", "198.51.100.7", "203.0.113.0/24:443/tcp"),
    )
    assert _egress_rules(gen.tenant_add(host, t)) == [
        'ct state invalid drop comment "tenant t3"',
        "ip daddr @blocked4 drop",
        'oifname != "eth0" drop',
        "ct state new ct count over 1024 drop",
        "ip daddr 203.0.113.0/24 tcp dport 443 accept",  # duplicates collapse
        "ip daddr 198.51.100.7/32 accept",
        "drop",
    ]


def test_tenant_add_is_self_replacing_and_touches_only_its_own_objects() -> None:
    script = lines(gen.tenant_add(HOST, tenant(3)))
    assert script[:2] == [
        "add chain inet lobsterd t_3_egress",
        "flush chain inet lobsterd t_3_egress",
    ]
    assert script[-2:] == [
        'add element inet lobsterd guests { "lbt3" . 10.200.0.14 }',
        'add element inet lobsterd egress_map { "lbt3" : goto t_3_egress }',
    ]
    for ln in script:
        assert "t_3_" in ln or '"lbt3"' in ln
        assert not ln.startswith(("delete", "flush table", "flush ruleset", "add table"))


def test_remove_undoes_exactly_what_add_creates() -> None:
    add = lines(gen.tenant_add(HOST, tenant(3, egress="allowlist", egress_allow=("1.2.3.4",))))
    rm = lines(gen.tenant_remove(HOST, tenant(3)))
    added_chains = {ln.split()[-1] for ln in add if ln.startswith("add chain")}
    deleted_chains = {ln.split()[-1] for ln in rm if ln.startswith("delete chain")}
    assert added_chains == deleted_chains == {"t_3_egress"}
    added = [ln for ln in add if ln.startswith("add element")]
    # Removal first re-adds each element exactly as add does (so deleting something
    # already gone cannot fail), then deletes it by key.
    assert [ln for ln in rm if ln.startswith("add element")] == added
    assert [ln for ln in rm if ln.startswith("delete element")] == [
        'delete element inet lobsterd guests { "lbt3" . 10.200.0.14 }',
        'delete element inet lobsterd egress_map { "lbt3" }',
    ]
    assert rm[0] == "add chain inet lobsterd t_3_egress"
    assert rm[-2:] == [
        "flush chain inet lobsterd t_3_egress",
        "delete chain inet lobsterd t_3_egress",
    ]


def test_full_ruleset_replaces_lobsterd_table_atomically() -> None:
    tenants = [tenant(1), tenant(2, egress="deny"), tenant(3)]
    script = lines(gen.full_ruleset(HOST, tenants))
    assert script[:3] == [
        "add table inet lobsterd",
        "delete table inet lobsterd",
        "add table inet lobsterd",
    ]
    assert sum(ln.startswith("add chain inet lobsterd t_") for ln in script) == 3
    assert sum("egress_map {" in ln and "add element" in ln for ln in script) == 3
    assert re.search(r"t_[0-9]+_", gen.full_ruleset(HOST, [])) is None
    assert lines(gen.teardown_script()) == ["add table inet lobsterd", "delete table inet lobsterd"]


def test_no_tenant_script_uses_anonymous_sets() -> None:
    """Anonymous sets per tenant would make every later nft run slower (module doc)."""
    t = tenant(3, egress="allowlist", egress_allow=("203.0.113.0/24:53", "198.51.100.0/24"))
    for ln in lines(gen.tenant_add(HOST, t)):
        if ln.startswith("add rule"):
            assert "{" not in ln


def test_parse_tenant_chain() -> None:
    assert gen.parse_tenant_chain("t_12_egress") == 12
    assert gen.parse_tenant_chain("t_12_other") is None
    assert gen.parse_tenant_chain("forward") is None
    assert gen.parse_tenant_chain("t_x_egress") is None


@given(st.integers(1, 16382))
def test_every_slot_renders_consistent_names(slot: int) -> None:
    t = gen.tenant_for_slot(HOST, "n", slot)
    script = gen.tenant_add(HOST, t)
    assert f'"lbt{slot}" : goto t_{slot}_egress' in script
    assert f'"lbt{slot}" . {t.guest_ip} ' in script
    assert ipaddress.IPv4Address(t.guest_ip) in ipaddress.IPv4Network(HOST.pool)
