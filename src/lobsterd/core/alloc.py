"""Address, slot and uid arithmetic for tenants (pure).

A tenant's *slot* ``i`` (1-based) owns the /30 ``pool + 4·i``: host side ``+1``, guest
``+2``. Slot 0 is never handed out, so the pool's network address is never a tenant's.
The tenant's uid and gid are ``uid_start + i``: unique per live tenant, reused after evict
together with the addresses, and allocated in the same registry transaction.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from lobsterd.errors import CapacityExhausted, ValidationFailed


@dataclass(frozen=True)
class SlotAddresses:
    slot: int
    network: ipaddress.IPv4Network
    host_ip: ipaddress.IPv4Address
    guest_ip: ipaddress.IPv4Address

    @property
    def netmask(self) -> str:
        return str(self.network.netmask)


def parse_pool(pool: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(pool, strict=True)
    except ValueError as exc:
        raise ValidationFailed(f"network.pool {pool!r} is not an IPv4 network: {exc}") from exc
    if net.prefixlen > 29:
        raise ValidationFailed(f"network.pool {pool} is too small: needs at least a /29")
    return net


def max_slot(pool: ipaddress.IPv4Network) -> int:
    return pool.num_addresses // 4 - 1


def slot_addresses(pool: ipaddress.IPv4Network, slot: int) -> SlotAddresses:
    if not 1 <= slot <= max_slot(pool):
        raise ValidationFailed(f"slot {slot} is outside pool {pool} (1..{max_slot(pool)})")
    base = int(pool.network_address) + 4 * slot
    return SlotAddresses(
        slot=slot,
        network=ipaddress.IPv4Network((base, 30)),
        host_ip=ipaddress.IPv4Address(base + 1),
        guest_ip=ipaddress.IPv4Address(base + 2),
    )


def lowest_free_slot(used: set[int], limit: int) -> int:
    """Smallest slot in 1..limit not in ``used``; raises when none is left."""
    for slot in range(1, limit + 1):
        if slot not in used:
            return slot
    raise CapacityExhausted(
        f"no free tenant slot: all {limit} are in use",
        hint="evict a tenant, or widen network.pool / max_tenants in the config",
    )


def uid_for_slot(uid_start: int, slot: int) -> int:
    return uid_start + slot
