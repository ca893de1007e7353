"""Tenant firewall: nftables script generation (pure: data in, ``nft -f`` text out).

lobsterd keeps every rule in one table of its own, ``inet lobsterd``, and never edits
anybody else's tables. nftables evaluates the base chains of *every* table on a hook: a
``drop`` anywhere is final, an ``accept`` only ends that one chain. So our drops cannot be
undone by another firewall's accepts, and our accepts leave other users' policies in
force (a host whose FORWARD policy is ``drop`` elsewhere must allow tenant egress there).

Per-packet cost is constant: the base chains look a packet up in hash sets and verdict
maps keyed by the TAP name, never in a list of tenants. What depends on the tenant lives
in two places only, so adding or removing a tenant touches nothing else:

* an element ``"lbt<N>" . <guest ip>`` of the set ``guests`` (the tenant's identity), and
* an element ``"lbt<N>" : goto t_N_egress`` of the verdict map ``egress_map``, and the
  tenant's own chain ``t_N_egress`` (blocked destinations, connection limit, egress
  policy: everything the guest may send beyond the host).

============  =================  ====================================================
hook          priority           rule
============  =================  ====================================================
prerouting    raw (-300)         from a TAP: drop IPv6; drop unless TAP . source is in
                                 ``guests`` (anti-spoofing, before conntrack, so a
                                 spoofed packet never creates conntrack state)
input         filter (0)         from a TAP: replies to host connections only
output        filter (0)         to a TAP (chain ``host_to_guest``): only to that TAP's
                                 guest; the gateway port from any host process; the
                                 agent, health and SSH ports from root only
forward       filter (0)         from a TAP: ``egress_map`` → ``t_N_egress``; to a TAP:
                                 replies only (no DNAT, no inbound forwarding)
postrouting   srcnat (100, nat)  masquerade pool sources leaving on the uplink
============  =================  ====================================================

Behaviour that is the same for every tenant sits in shared chains rather than one copy
per tenant, and no tenant rule uses an anonymous set. That keeps adding a tenant nearly
as fast with a thousand tenants as with none: ``nft`` 1.0.6 downloads the list of every
chain (and every set) before any rule or element command, and the kernel re-walks every
jump on commit, so chains, sets and rules per tenant are what one more tenant pays for.

The filter hooks sit at ``filter`` priority, i.e. after every ``dstnat`` and ``route``
chain: they judge the final destination and output interface, so another table's DNAT
or rerouting cannot carry a guest's packet past them. A TAP named ``lbt*`` that has no
tenant entry yet is dropped in every direction (fail closed), and all IPv6 to or from a
TAP is dropped (tenants are IPv4-only).

Every script is one ``nft -f`` transaction (all or nothing) and is idempotent without
``destroy`` (nft 1.0.6 lacks it): objects are declared with ``add`` (a no-op when
present), chains are flushed before their rules are written, and removal first re-adds
what it deletes so that deleting something already gone is not an error.

The connection limit is a per-rule ``ct count``: re-applying a live tenant's rules
restarts its count (existing connections are no longer counted); after a reboot the
conntrack table is empty anyway.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lobsterd.config import NetworkConfig
from lobsterd.core.alloc import parse_pool, slot_addresses
from lobsterd.core.names import tap_name, validate_name
from lobsterd.errors import ValidationFailed

TABLE = "lobsterd"
FAMILY = "inet"
TAP_PREFIX = "lbt"

Egress = Literal["allow", "deny", "allowlist"]
Proto = Literal["tcp", "udp"]

# Destinations no guest may reach, whatever its egress policy (the tenant pool and the
# configured extra CIDRs are added to these). TEST-NET ranges stay reachable on purpose.
ALWAYS_BLOCKED: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, incl. 169.254.169.254 (cloud metadata)
    "172.16.0.0/12",  # RFC 1918
    "192.168.0.0/16",  # RFC 1918
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, incl. 255.255.255.255 (broadcast)
)

# Base chains: name -> (hook, type, priority keyword).
_BASE_CHAINS: tuple[tuple[str, str, str, str], ...] = (
    ("prerouting", "prerouting", "filter", "raw"),
    ("input", "input", "filter", "filter"),
    ("output", "output", "filter", "filter"),
    ("forward", "forward", "filter", "filter"),
    ("postrouting", "postrouting", "nat", "srcnat"),
)

# Per-tenant chains (one: see the module doc for why not more).
TENANT_CHAIN_SUFFIXES: tuple[str, ...] = ("egress",)

_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", re.ASCII)
_TENANT_CHAIN_RE = re.compile(r"t_([0-9]+)_([a-z_]+)", re.ASCII)


@dataclass(frozen=True)
class EgressRule:
    """One allowlist entry: a destination network, optionally one port and protocol.

    ``port`` without ``proto`` allows both TCP and UDP to that port.
    """

    network: ipaddress.IPv4Network
    port: int | None = None
    proto: Proto | None = None

    def nft_matches(self) -> list[str]:
        """nft match expressions that together select exactly this entry's traffic.

        One rule per protocol rather than ``meta l4proto { tcp, udp }``: an anonymous
        set per tenant would make every later ``nft`` run load them all (see module doc).
        """
        dest = f"ip daddr {self.network}"
        if self.port is None:
            return [dest]
        if self.proto is None:
            return [f"{dest} tcp dport {self.port}", f"{dest} udp dport {self.port}"]
        return [f"{dest} {self.proto} dport {self.port}"]


@dataclass(frozen=True)
class HostNet:
    """Host-wide network facts the firewall needs (from ``[network]`` in the config)."""

    pool: str
    gateway_port: int
    agent_port: int
    health_port: int
    ssh_port: int = 22
    blocked_cidrs: tuple[str, ...] = ()
    uplink: str | None = None


@dataclass(frozen=True)
class TenantNet:
    """One tenant's network identity and egress policy."""

    name: str
    slot: int
    tap: str
    guest_ip: str
    host_ip: str
    egress: Egress = "allow"
    egress_allow: tuple[str, ...] = ()
    conn_limit: int = 1024


@dataclass(frozen=True)
class _Checked:
    """A validated tenant, with parsed values ready to render."""

    t: TenantNet
    rules: tuple[EgressRule, ...] = field(default_factory=tuple)


def parse_egress_entry(entry: str) -> EgressRule:
    """Parse ``CIDR``, ``CIDR:port`` or ``CIDR:port/proto`` (IPv4; a bare IP is a /32).

    Host bits in the CIDR are rejected rather than silently dropped, because
    ``10.1.2.3/8`` is more likely a typo than a wish to allow all of 10/8.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ValidationFailed(f"egress allowlist entry {entry!r} is empty")
    text = entry.strip()
    cidr, sep, rest = text.partition(":")
    port: int | None = None
    proto: Proto | None = None
    if sep:
        port_text, slash, proto_text = rest.partition("/")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValidationFailed(
                f"egress allowlist entry {entry!r}: port must be 1-65535",
                hint='use "CIDR", "CIDR:port" or "CIDR:port/tcp|udp"',
            )
        port = int(port_text)
        if slash:
            if proto_text == "tcp":
                proto = "tcp"
            elif proto_text == "udp":
                proto = "udp"
            else:
                raise ValidationFailed(
                    f"egress allowlist entry {entry!r}: protocol must be tcp or udp"
                )
    try:
        network = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        raise ValidationFailed(
            f"egress allowlist entry {entry!r}: {cidr!r} is not an IPv4 CIDR ({exc})",
            hint="tenants are IPv4-only; write the network address, e.g. 203.0.113.0/24",
        ) from None
    return EgressRule(network=network, port=port, proto=proto)


def _check_port(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValidationFailed(f"{what} {value!r} is not a port number (1-65535)")


def _blocked_networks(host: HostNet) -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination guests may never reach (IPv6 is dropped wholesale)."""
    nets = [ipaddress.IPv4Network(c) for c in ALWAYS_BLOCKED]
    nets.append(parse_pool(host.pool))
    for item in host.blocked_cidrs:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValidationFailed(
                f"network.blocked_cidrs entry {item!r} is not a CIDR",
                hint="fix it in the config, e.g. 203.0.113.0/24",
            ) from None
        if isinstance(net, ipaddress.IPv4Network):
            nets.append(net)
    # Collapse so the script never carries overlapping intervals.
    return list(ipaddress.collapse_addresses(nets))


def check_host(host: HostNet) -> None:
    """Validate ``host``; raises :class:`ValidationFailed` naming the bad field."""
    parse_pool(host.pool)
    _check_port("network.gateway_port", host.gateway_port)
    _check_port("network.agent_port", host.agent_port)
    _check_port("network.health_port", host.health_port)
    _check_port("ssh port", host.ssh_port)
    _blocked_networks(host)
    if host.uplink is not None and (
        not _IFNAME_RE.fullmatch(host.uplink) or host.uplink.startswith(TAP_PREFIX)
    ):
        raise ValidationFailed(
            f"network.uplink {host.uplink!r} is not a usable interface name",
            hint=f"name the host's outside interface (not a {TAP_PREFIX}* tenant TAP)",
        )


def _check_tenant(host: HostNet, t: TenantNet) -> _Checked:
    """Validate one tenant against ``host``; nothing is rendered for a bad tenant."""
    validate_name(t.name)
    if isinstance(t.slot, bool) or not isinstance(t.slot, int) or t.slot < 1:
        raise ValidationFailed(f"tenant {t.name}: slot {t.slot!r} must be a positive integer")
    if t.tap != tap_name(t.slot):
        raise ValidationFailed(
            f"tenant {t.name}: TAP {t.tap!r} does not match slot {t.slot} "
            f"(expected {tap_name(t.slot)!r})"
        )
    addrs = slot_addresses(parse_pool(host.pool), t.slot)
    if t.guest_ip != str(addrs.guest_ip) or t.host_ip != str(addrs.host_ip):
        raise ValidationFailed(
            f"tenant {t.name}: addresses {t.host_ip}/{t.guest_ip} do not match slot "
            f"{t.slot} of pool {host.pool} ({addrs.host_ip}/{addrs.guest_ip})"
        )
    if t.egress not in ("allow", "deny", "allowlist"):
        raise ValidationFailed(
            f"tenant {t.name}: egress policy {t.egress!r} must be allow, deny or allowlist"
        )
    if isinstance(t.conn_limit, bool) or not isinstance(t.conn_limit, int) or t.conn_limit < 1:
        raise ValidationFailed(
            f"tenant {t.name}: connection limit {t.conn_limit!r} must be a positive integer"
        )
    rules: list[EgressRule] = []
    for entry in t.egress_allow:
        rule = parse_egress_entry(entry)
        if rule not in rules:
            rules.append(rule)
    return _Checked(t=t, rules=tuple(rules) if t.egress == "allowlist" else ())


def chain_name(slot: int, suffix: str) -> str:
    return f"t_{slot}_{suffix}"


def parse_tenant_chain(name: str) -> int | None:
    """Slot of a per-tenant chain name (``t_<slot>_<suffix>``), else None."""
    m = _TENANT_CHAIN_RE.fullmatch(name)
    if m is None or m.group(2) not in TENANT_CHAIN_SUFFIXES:
        return None
    return int(m.group(1))


def _q(text: str) -> str:
    """Quote an (already validated) interface-name literal for nft."""
    return f'"{text}"'


def _base_lines(host: HostNet) -> list[str]:
    check_host(host)
    tb = f"{FAMILY} {TABLE}"
    tap = _q(TAP_PREFIX + "*")
    pool = parse_pool(host.pool)
    blocked = ", ".join(str(n) for n in _blocked_networks(host))
    out = [
        f"add table {tb}",
        f"add set {tb} blocked4 {{ type ipv4_addr; flags interval; }}",
        f"flush set {tb} blocked4",
        f"add element {tb} blocked4 {{ {blocked} }}",
        f"add set {tb} guests {{ type ifname . ipv4_addr; }}",
        f"add map {tb} egress_map {{ type ifname : verdict; }}",
        f"add chain {tb} host_to_guest",
        f"flush chain {tb} host_to_guest",
    ]
    for chain, hook, ctype, prio in _BASE_CHAINS:
        out.append(
            f"add chain {tb} {chain} {{ type {ctype} hook {hook} priority {prio}; policy accept; }}"
        )
        out.append(f"flush chain {tb} {chain}")
    agent_ports = sorted({host.agent_port, host.health_port})
    rules: dict[str, list[str]] = {
        "host_to_guest": [
            "oifname . ip daddr != @guests drop",
            "ct state established,related accept",
            *(f"tcp dport {p} meta skuid 0 ct state new accept" for p in agent_ports),
            *(f"tcp dport {p} drop" for p in agent_ports),
            f"tcp dport {host.gateway_port} ct state new accept",
            f"tcp dport {host.ssh_port} meta skuid 0 ct state new accept",
            "drop",
        ],
        "prerouting": [
            f"iifname {tap} meta nfproto ipv6 drop",
            f"iifname {tap} iifname . ip saddr != @guests drop",
        ],
        "input": [
            f"iifname {tap} ct state established,related accept",
            f"iifname {tap} drop",
        ],
        "output": [
            f"oifname {tap} meta nfproto ipv6 drop",
            f"oifname {tap} goto host_to_guest",
        ],
        "forward": [
            f"iifname {tap} meta nfproto ipv6 drop",
            f"oifname {tap} meta nfproto ipv6 drop",
            "iifname vmap @egress_map",
            f"iifname {tap} drop",
            f"oifname {tap} ct state established,related accept",
            f"oifname {tap} drop",
        ],
        "postrouting": [
            # Only guest traffic leaving the host is rewritten; never toward a TAP.
            f"ip saddr {pool} oifname {_q(host.uplink)} masquerade"
            if host.uplink
            else f"ip saddr {pool} oifname != {tap} masquerade",
        ],
    }
    for chain, body in rules.items():
        out += [f"add rule {tb} {chain} {r}" for r in body]
    return out


def base_ruleset(host: HostNet) -> str:
    """Script that creates (or re-asserts) lobsterd's table, base chains, maps and sets.

    Idempotent and safe on a live host: base chains are flushed and rewritten in the same
    transaction, tenant chains and map elements are left as they are.
    """
    return "\n".join(_base_lines(host)) + "\n"


def _elements(t: TenantNet) -> list[tuple[str, str, str]]:
    """(set or map, key, value suffix) of every element that belongs to tenant ``t``."""
    return [
        ("guests", f"{_q(t.tap)} . {t.guest_ip}", ""),
        ("egress_map", _q(t.tap), f" : goto {chain_name(t.slot, 'egress')}"),
    ]


def _tenant_lines(host: HostNet, c: _Checked) -> list[str]:
    t = c.t
    tb = f"{FAMILY} {TABLE}"
    chain = chain_name(t.slot, "egress")
    # Every packet (not only the first of a connection) is checked against the blocked
    # destinations and the policy, so narrowing a policy also stops established flows.
    # The connection limit comes before the allowlist so that one rule (one counter)
    # serves the whole chain; a refused attempt stays counted only until conntrack
    # forgets it, about one jiffy.
    body: list[str] = [
        f'ct state invalid drop comment "tenant {t.name}"',
        "ip daddr @blocked4 drop",
    ]
    if host.uplink:
        body.append(f"oifname != {_q(host.uplink)} drop")
    if t.egress == "allow":
        body += [f"ct state new ct count over {t.conn_limit} drop", "accept"]
    elif t.egress == "allowlist" and c.rules:
        body.append(f"ct state new ct count over {t.conn_limit} drop")
        body += [f"{m} accept" for r in c.rules for m in r.nft_matches()]
        body.append("drop")
    else:
        body.append("drop")
    out = [f"add chain {tb} {chain}", f"flush chain {tb} {chain}"]
    out += [f"add rule {tb} {chain} {r}" for r in body]
    out += [f"add element {tb} {m} {{ {k}{v} }}" for m, k, v in _elements(t)]
    return out


def tenant_add(host: HostNet, t: TenantNet) -> str:
    """Script that installs (or rewrites) one tenant's chains and map entries.

    Assumes the base from :func:`base_ruleset` exists. Applying it twice leaves the
    same ruleset as applying it once. Raises :class:`ValidationFailed` before any text
    is produced if the tenant or one of its allowlist entries is invalid.
    """
    check_host(host)
    return "\n".join(_tenant_lines(host, _check_tenant(host, t))) + "\n"


def tenant_remove(host: HostNet, t: TenantNet) -> str:
    """Script that deletes one tenant's chains and map entries, present or not.

    Everything is first (re-)declared, so the deletes cannot fail on a tenant that is
    already gone: removal is safe to retry after a crash.
    """
    check_host(host)
    t = _check_tenant(host, t).t
    tb = f"{FAMILY} {TABLE}"
    chains = [chain_name(t.slot, s) for s in TENANT_CHAIN_SUFFIXES]
    out = [f"add chain {tb} {ch}" for ch in chains]
    out += [f"add element {tb} {m} {{ {k}{v} }}" for m, k, v in _elements(t)]
    out += [f"delete element {tb} {m} {{ {k} }}" for m, k, _ in _elements(t)]
    out += [f"flush chain {tb} {ch}" for ch in chains]
    out += [f"delete chain {tb} {ch}" for ch in reversed(chains)]
    return "\n".join(out) + "\n"


def full_ruleset(host: HostNet, tenants: Sequence[TenantNet]) -> str:
    """Script that replaces lobsterd's table with the base plus exactly ``tenants``.

    Used after a host reboot or to repair drift: the old table is deleted and rebuilt in
    the same transaction, so there is never a moment without rules and never a
    duplicate. Other tables are untouched. Every tenant is validated first; one bad
    tenant means no script at all.
    """
    checked = [_check_tenant(host, t) for t in tenants]
    seen: dict[int, str] = {}
    for c in checked:
        if c.t.slot in seen:
            raise ValidationFailed(
                f"tenants {seen[c.t.slot]} and {c.t.name} both claim slot {c.t.slot}"
            )
        seen[c.t.slot] = c.t.name
    tb = f"{FAMILY} {TABLE}"
    out = [f"add table {tb}", f"delete table {tb}", *_base_lines(host)]
    for c in checked:
        out += _tenant_lines(host, c)
    return "\n".join(out) + "\n"


def teardown_script() -> str:
    """Script that removes lobsterd's table (and nothing else), present or not."""
    tb = f"{FAMILY} {TABLE}"
    return f"add table {tb}\ndelete table {tb}\n"


def host_from_config(net: NetworkConfig, *, ssh_port: int = 22) -> HostNet:
    """Build a validated :class:`HostNet` from the config's ``[network]`` section."""
    host = HostNet(
        pool=net.pool,
        gateway_port=net.gateway_port,
        agent_port=net.agent_port,
        health_port=net.health_port,
        ssh_port=ssh_port,
        blocked_cidrs=tuple(net.blocked_cidrs),
        uplink=net.uplink,
    )
    check_host(host)
    return host


def tenant_for_slot(
    host: HostNet,
    name: str,
    slot: int,
    *,
    egress: Egress = "allow",
    egress_allow: Sequence[str] = (),
    conn_limit: int = 1024,
) -> TenantNet:
    """The :class:`TenantNet` of tenant ``name`` in ``slot`` (TAP and /30 derived)."""
    addrs = slot_addresses(parse_pool(host.pool), slot)
    t = TenantNet(
        name=name,
        slot=slot,
        tap=tap_name(slot),
        guest_ip=str(addrs.guest_ip),
        host_ip=str(addrs.host_ip),
        egress=egress,
        egress_allow=tuple(egress_allow),
        conn_limit=conn_limit,
    )
    _check_tenant(host, t)
    return t
