"""The tenant firewall, proven with real packets between network namespaces.

A stand-in host namespace runs lobsterd's nftables table; tenants are namespaces behind
veth links named like their TAPs; an "internet" namespace sits behind the host's
uplink. Nothing leaves the machine (see netns_helpers). Each test installs the firewall
state it needs with one transaction and the fixture removes lobsterd's table after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from lobsterd.adapters.firewall import Firewall
from lobsterd.core import firewall as gen
from lobsterd.errors import FirewallError, ValidationFailed
from tests.helpers import need_binary, need_root
from tests.integration.netns_helpers import (
    GUEST_PORTS,
    HOST_LO_IP,
    HOST_SERVICE_PORT,
    HOST_UPLINK_IP,
    INET_IP,
    INET_IP2,
    POOL,
    PRIVATE_TARGETS,
    UDP_PORT,
    UPLINK,
    Topology,
    in_ns,
    sh,
    strip_handles,
    topology,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HOST = gen.HostNet(pool=POOL, gateway_port=9000, agent_port=52, health_port=53)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    need_root()
    need_binary("nft", "ip", "setpriv")
    with topology() as t:
        yield t


@pytest.fixture
def fw(topo: Topology) -> Iterator[Firewall]:
    f = Firewall(HOST, netns=topo.host_ns)
    try:
        yield f
    finally:
        in_ns(topo.host_ns, "nft", "flush", "ruleset")


def tenant(slot: int, **kw: Any) -> gen.TenantNet:
    return gen.tenant_for_slot(HOST, f"tenant{slot}", slot, **kw)


def _table_items(topo: Topology, table: str) -> list[dict[str, Any]]:
    """Every object of one nftables table, as listed by ``nft -j list ruleset``."""
    out = []
    for item in topo.nft_json()["nftables"]:
        kind, obj = next(iter(item.items()))
        if (obj["name"] if kind == "table" else obj.get("table")) == table:
            out.append(item)
    return out


def test_without_firewall_everything_is_reachable(topo: Topology) -> None:
    """Control: the topology itself lets every probe below through; only the firewall
    (installed by the other tests) makes them fail."""
    need_root()
    in_ns(topo.host_ns, "nft", "flush", "ruleset")
    a, b = topo.guests[1], topo.guests[2]
    targets = [
        (INET_IP, 80),
        (b.guest_ip, 9000),
        (a.host_ip, HOST_SERVICE_PORT),
        (HOST_UPLINK_IP, HOST_SERVICE_PORT),
        (HOST_LO_IP, HOST_SERVICE_PORT),
        *((ip, 80) for ip in PRIVATE_TARGETS),
    ]
    assert all(topo.tcp_ok(a.ns, targets))
    assert all(topo.tcp_ok(topo.host_ns, [(a.guest_ip, 52), (a.guest_ip, 8080)], as_nobody=True))
    assert all(topo.tcp_ok(topo.inet_ns, [(a.guest_ip, 9000)]))
    # The inet ns routes the pool back, so without masquerade it sees the guest address.
    assert topo.probe(a.ns, tcp=[(INET_IP, 80)])["tcp"][0]["peer"] == a.guest_ip
    # A spoofed source gets through too (it is only the firewall that stops it).
    in_ns(a.ns, "ip", "addr", "add", "198.51.100.77/32", "dev", "eth0")
    try:
        topo.probe(a.ns, udp=[(INET_IP, UDP_PORT, "ctl-spoof")], bind="198.51.100.77")
        assert topo.servers[topo.inet_ns].wait_for(lambda s: s.endswith("ctl-spoof"), 2)
    finally:
        in_ns(a.ns, "ip", "addr", "del", "198.51.100.77/32", "dev", "eth0")


def test_guest_reaches_internet_masqueraded_but_nothing_private(
    topo: Topology, fw: Firewall
) -> None:
    a, b = topo.guests[1], topo.guests[2]
    fw.reconcile([tenant(1), tenant(2)])
    res = topo.probe(a.ns, tcp=[(INET_IP, 80), (INET_IP, 443)])["tcp"]
    assert [r["ok"] for r in res] == [True, True]
    # The internet sees the host's uplink address, never the guest's.
    assert {r["peer"] for r in res} == {HOST_UPLINK_IP}

    blocked = [
        (b.guest_ip, 9000),  # another tenant
        (b.guest_ip, 22),
        (a.host_ip, HOST_SERVICE_PORT),  # the host, on every address it has
        (b.host_ip, HOST_SERVICE_PORT),
        (HOST_UPLINK_IP, HOST_SERVICE_PORT),
        (HOST_LO_IP, HOST_SERVICE_PORT),
        *((ip, 80) for ip in PRIVATE_TARGETS),  # 10/8, 172.16/12, 192.168/16, 169.254, CGNAT
    ]
    assert not any(topo.tcp_ok(a.ns, blocked))
    assert not any(topo.tcp_ok(b.ns, [(a.guest_ip, 9000), (HOST_LO_IP, HOST_SERVICE_PORT)]))
    # Routing to those addresses works from the host itself: the firewall did the blocking.
    assert all(topo.tcp_ok(topo.host_ns, [(ip, 80) for ip in PRIVATE_TARGETS]))


def test_masquerade_only_via_configured_uplink_and_extra_blocked_cidrs(
    topo: Topology,
) -> None:
    need_root()
    a = topo.guests[1]
    host = replace(HOST, uplink=UPLINK, blocked_cidrs=(f"{INET_IP2}/32",))
    f = Firewall(host, netns=topo.host_ns)
    try:
        f.reconcile([gen.tenant_for_slot(host, "alpha", 1)])
        ok, extra = topo.probe(a.ns, tcp=[(INET_IP, 80), (INET_IP2, 80)])["tcp"]
        assert ok["ok"] and ok["peer"] == HOST_UPLINK_IP
        assert not extra["ok"]
    finally:
        f.teardown()


def test_host_to_guest_ports_and_root_only_agent(topo: Topology, fw: Firewall) -> None:
    a = topo.guests[1]
    fw.reconcile([tenant(1)])
    ports = [(a.guest_ip, p) for p in (52, 53, 22, 9000, 8080)]
    assert topo.tcp_ok(topo.host_ns, ports) == [True, True, True, True, False]
    assert topo.tcp_ok(topo.host_ns, ports, as_nobody=True) == [False, False, False, True, False]


def test_nothing_inbound_from_outside_and_no_port_forwarding(topo: Topology, fw: Firewall) -> None:
    a = topo.guests[1]
    fw.reconcile([tenant(1)])
    assert not any(topo.tcp_ok(topo.inet_ns, [(a.guest_ip, p) for p in GUEST_PORTS]))
    # The host's own address on the gateway port leads nowhere (no DNAT): refused at once.
    res = topo.probe(topo.inet_ns, tcp=[(HOST_UPLINK_IP, 9000)])["tcp"][0]
    assert not res["ok"] and "ConnectionRefused" in res["err"]


def test_egress_policies(topo: Topology, fw: Firewall) -> None:
    a = topo.guests[1]
    targets = [(INET_IP, 80), (INET_IP, 8080), (INET_IP2, 80), ("10.99.0.1", 80)]

    fw.add_tenant(tenant(1, egress="deny"))
    assert topo.tcp_ok(a.ns, targets) == [False, False, False, False]

    fw.add_tenant(tenant(1, egress="allowlist", egress_allow=(f"{INET_IP}/32:80/tcp",)))
    assert topo.tcp_ok(a.ns, targets) == [True, False, False, False]

    # A blocked range stays blocked even when the allowlist names it.
    allow = (f"{INET_IP2}/32", "198.51.100.0/24:8080", "10.99.0.0/24")
    fw.add_tenant(tenant(1, egress="allowlist", egress_allow=allow))
    assert topo.tcp_ok(a.ns, targets) == [False, True, True, False]
    topo.probe(a.ns, udp=[(INET_IP, 8080, "x"), (INET_IP, UDP_PORT, "udp-denied")])
    time.sleep(0.3)
    assert not any(e.endswith("udp-denied") for e in topo.servers[topo.inet_ns].events())

    fw.add_tenant(tenant(1, egress="allow"))
    assert topo.tcp_ok(a.ns, targets) == [True, True, True, False]


def test_connection_limit(topo: Topology, fw: Firewall) -> None:
    a = topo.guests[1]
    fw.reconcile([tenant(1, conn_limit=5), tenant(2)])
    held = topo.probe(a.ns, hold=(INET_IP, 80, 8), timeout=0.6)["hold"]
    assert [r["ok"] for r in held] == [True] * 5 + [False] * 3
    # Closed connections stop counting: five more fit again.
    held = topo.probe(a.ns, hold=(INET_IP, 80, 5), timeout=0.6)["hold"]
    assert all(r["ok"] for r in held)
    # The limit is per tenant: B is not affected by A's connections.
    held = topo.probe(topo.guests[2].ns, hold=(INET_IP, 80, 8), timeout=0.6)["hold"]
    assert all(r["ok"] for r in held)


def test_spoofed_sources_are_dropped(topo: Topology, fw: Firewall) -> None:
    a, b = topo.guests[1], topo.guests[2]
    fw.reconcile([tenant(1), tenant(2)])
    inet = topo.servers[topo.inet_ns]
    topo.probe(a.ns, udp=[(INET_IP, UDP_PORT, "genuine")])
    assert inet.wait_for(lambda s: s.endswith("genuine"), 2)
    fakes = ("198.51.100.77", b.guest_ip)
    for fake in fakes:
        in_ns(a.ns, "ip", "addr", "add", f"{fake}/32", "dev", "eth0")
        try:
            topo.probe(a.ns, udp=[(INET_IP, UDP_PORT, f"spoof-{fake}")], bind=fake)
            res = topo.probe(a.ns, tcp=[(INET_IP, 80)], bind=fake)["tcp"][0]
        finally:
            in_ns(a.ns, "ip", "addr", "del", f"{fake}/32", "dev", "eth0")
        assert not res["ok"]
    assert not inet.wait_for(lambda line: "spoof-" in line, 0.5)


def test_ipv6_is_dropped_both_ways(topo: Topology, fw: Firewall) -> None:
    a = topo.guests[1]
    in_ns(topo.host_ns, "ip", "-6", "addr", "add", "fd00:1::1/64", "dev", "lbt1", "nodad")
    in_ns(a.ns, "ip", "-6", "addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad")
    try:
        v6_in = [("fd00:1::1", HOST_SERVICE_PORT)]
        v6_out = [("fd00:1::2", 9000)]
        assert topo.tcp_ok(a.ns, v6_in) == [True]  # control: IPv6 works without rules
        assert topo.tcp_ok(topo.host_ns, v6_out) == [True]
        fw.reconcile([tenant(1)])
        assert topo.tcp_ok(a.ns, v6_in) == [False]
        assert topo.tcp_ok(topo.host_ns, v6_out) == [False]
        assert topo.tcp_ok(topo.host_ns, [(a.guest_ip, 9000)]) == [True]
    finally:
        in_ns(topo.host_ns, "ip", "-6", "addr", "del", "fd00:1::1/64", "dev", "lbt1")
        in_ns(a.ns, "ip", "-6", "addr", "del", "fd00:1::2/64", "dev", "eth0")


def test_tap_without_tenant_is_closed_until_added(topo: Topology, fw: Firewall) -> None:
    c = topo.guests[3]
    fw.reconcile([tenant(1)])
    probes = [(INET_IP, 80), (c.host_ip, HOST_SERVICE_PORT)]
    assert topo.tcp_ok(c.ns, probes) == [False, False]
    assert topo.tcp_ok(topo.host_ns, [(c.guest_ip, 52)]) == [False]
    fw.add_tenant(tenant(3))
    assert topo.tcp_ok(c.ns, probes) == [True, False]
    assert topo.tcp_ok(topo.host_ns, [(c.guest_ip, 52)]) == [True]
    fw.remove_tenant(tenant(3))
    assert topo.tcp_ok(c.ns, probes) == [False, False]
    assert topo.tcp_ok(topo.host_ns, [(c.guest_ip, 52)]) == [False]


def test_other_tables_accepts_cannot_bypass_our_drops(topo: Topology, fw: Firewall) -> None:
    a, b = topo.guests[1], topo.guests[2]
    fw.reconcile([tenant(1), tenant(2)])
    other = (
        "table inet other {\n"
        " chain other_fwd { type filter hook forward priority filter - 50; policy accept;"
        ' iifname "lbt1" accept; }\n'
        " chain other_in { type filter hook input priority filter - 50; policy accept;"
        ' iifname "lbt1" accept; }\n'
        "}\n"
    )
    sh("ip", "netns", "exec", topo.host_ns, "nft", "-f", "-", input_text=other)
    assert not any(topo.tcp_ok(a.ns, [(b.guest_ip, 9000), (a.host_ip, HOST_SERVICE_PORT)]))
    # ...and tearing lobsterd down leaves the other table exactly as it was.
    before = _table_items(topo, "other")
    assert before
    fw.teardown()
    assert _table_items(topo, gen.TABLE) == []
    assert _table_items(topo, "other") == before
    assert topo.tcp_ok(a.ns, [(b.guest_ip, 9000)]) == [True]  # no lobsterd rules left


# -- transactions: idempotence, eviction, atomicity ------------------------------------


def test_remove_restores_ruleset_exactly_and_is_idempotent(topo: Topology, fw: Firewall) -> None:
    fw.reconcile([tenant(2)])
    before = topo.nft_json()
    fw.add_tenant(tenant(1, egress="allowlist", egress_allow=(f"{INET_IP}/32:80",)))
    assert topo.nft_json() != before
    assert fw.list_tenant_chains() == {1, 2}
    fw.remove_tenant(tenant(1))
    assert topo.nft_json() == before
    fw.remove_tenant(tenant(1))  # already gone: still fine, still unchanged
    assert topo.nft_json() == before
    assert fw.list_tenant_chains() == {2}


def test_adding_twice_gives_no_duplicates(topo: Topology, fw: Firewall) -> None:
    fw.ensure_base()
    fw.add_tenant(tenant(1))
    once = strip_handles(topo.nft_json())
    fw.add_tenant(tenant(1))
    fw.ensure_base()
    assert strip_handles(topo.nft_json()) == once
    fw.reconcile([tenant(1)])
    fw.reconcile([tenant(1)])
    assert strip_handles(topo.nft_json()) == once
    rules = [i["rule"] for i in once["nftables"] if "rule" in i]
    expected = gen.tenant_add(HOST, tenant(1)).count("add rule inet lobsterd t_1_egress ")
    assert len([r for r in rules if r["chain"] == "t_1_egress"]) == expected == 4


def test_add_without_base_creates_it_and_remove_without_base_is_noop(
    topo: Topology, fw: Firewall
) -> None:
    fw.teardown()
    fw.remove_tenant(tenant(1))
    assert fw.list_tenant_chains() == set()
    assert not fw.has_base()
    fw.add_tenant(tenant(1))
    assert fw.has_base() and fw.list_tenant_chains() == {1}
    assert topo.tcp_ok(topo.guests[1].ns, [(INET_IP, 80)]) == [True]


def test_invalid_entry_applies_nothing(topo: Topology, fw: Firewall) -> None:
    fw.reconcile([tenant(1), tenant(2)])
    before = topo.nft_json()
    bad = tenant(2, egress="allow")
    bad = replace(bad, egress="allowlist", egress_allow=(f"{INET_IP}/32:80", "300.1.2.0/24"))
    with pytest.raises(ValidationFailed, match=r"300\.1\.2\.0/24"):
        fw.add_tenant(bad)
    with pytest.raises(ValidationFailed, match=r"300\.1\.2\.0/24"):
        fw.reconcile([tenant(1), bad, tenant(3)])
    assert topo.nft_json() == before
    # nft itself is all-or-nothing too: a valid tenant followed by one bad line.
    script = gen.tenant_add(HOST, tenant(3)) + "add rule inet lobsterd t_3_egress bogus\n"
    with pytest.raises(FirewallError, match="syntax error"):
        fw.apply(script)
    assert topo.nft_json() == before
    assert fw.list_tenant_chains() == {1, 2}
