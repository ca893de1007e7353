"""Host networking of a tenant: its TAP device, and host-wide IPv4 forwarding.

Each tenant has one persistent TAP (no bridge): the host side owns ``<hip>/30``, the
guest ``<gip>``; routing and nftables do the rest. The TAP is created and opened by root
(through ``/dev/net/tun``) and its file descriptor handed to the VMM, which runs
unprivileged and could not open the device itself. Persistence (``TUNSETPERSIST``)
keeps the device, its address and its firewall hooks across VMM restarts, and no owner
is set, so only a process with CAP_NET_ADMIN can attach to it.

Links and addresses go through netlink (pyroute2). Every function takes an optional
``netns`` (a name under /run/netns) so that tests, and stand-in hosts, can do all of
this inside a network namespace they own.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from lobsterd.errors import NetworkSetupFailed

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # QEMU probes the fd for it and then uses virtio-net offloads
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
IFLA_TUN_TYPE_TAP = 2
NETNS_DIR = "/run/netns"
COUNTERS = frozenset(
    {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped",
     "rx_errors", "tx_errors"}
)
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", re.ASCII)
_NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)


def check_ifname(name: str) -> str:
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name):
        raise NetworkSetupFailed(f"invalid interface name {name!r} (1-15 of A-Z a-z 0-9 _ . -)")
    return name


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the block with the *calling thread* in ``netns`` (no-op for None).

    Needed for what netlink cannot do remotely: ``/dev/net/tun`` attaches a TAP of the
    thread's own namespace, and /proc/sys/net shows the opener's namespace. A missing
    namespace is an error, never silently created.
    """
    if netns is None:
        yield
        return
    if not _NETNS_RE.fullmatch(netns):
        raise NetworkSetupFailed(f"invalid network namespace name {netns!r}")
    path = os.path.join(NETNS_DIR, netns)
    if not os.path.exists(path):
        raise NetworkSetupFailed(f"network namespace {netns!r} does not exist")
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pyroute2_netns.setns(path, flags=0)
        try:
            yield
        finally:
            pyroute2_netns.setns(saved)
    finally:
        os.close(saved)


def _ipr(netns: str | None) -> IPRoute:
    if netns is not None:
        if not _NETNS_RE.fullmatch(netns) or not os.path.exists(os.path.join(NETNS_DIR, netns)):
            raise NetworkSetupFailed(f"network namespace {netns!r} does not exist")
        return IPRoute(netns=netns)
    return IPRoute()


def _link(ipr: IPRoute, name: str) -> Any | None:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return None
    links = ipr.get_links(idx[0])
    return links[0] if links else None


def _tun_info(link: Any) -> tuple[str | None, dict[str, Any]]:
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return None, {}
    kind = info.get_attr("IFLA_INFO_KIND")
    data = info.get_attr("IFLA_INFO_DATA")
    attrs: dict[str, Any] = {}
    if data is not None and hasattr(data, "get"):
        for key, value in data.get("attrs", []):
            attrs[key] = value
    return kind, attrs


def _ipv4_addrs(ipr: IPRoute, index: int) -> list[tuple[str, int]]:
    return [
        (str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"]))
        for a in ipr.get_addr(index=index, family=2)
    ]


def tap_exists(name: str, *, netns: str | None = None) -> bool:
    check_ifname(name)
    with _ipr(netns) as ipr:
        return _link(ipr, name) is not None


def _make_persistent_tap(name: str, netns: str | None) -> None:
    with in_netns(netns):
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        finally:
            os.close(fd)


def _disable_ipv6(name: str, netns: str | None) -> None:
    with in_netns(netns):
        path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
        if not os.path.exists("/proc/sys/net/ipv6"):
            return  # IPv6 is off host-wide
        with open(path, "w") as fh:
            fh.write("1")


def create_tap(name: str, host_ip: str, prefix: int, *, netns: str | None = None) -> None:
    """Ensure a persistent, up TAP ``name`` with exactly ``host_ip/prefix``; idempotent.

    An existing TAP with the right address is kept (a running VMM stays attached); any
    other link of that name is replaced.
    """
    check_ifname(name)
    try:
        iface = ipaddress.IPv4Interface(f"{host_ip}/{prefix}")
    except ValueError as exc:
        raise NetworkSetupFailed(f"bad TAP address {host_ip}/{prefix}: {exc}") from None
    want = (str(iface.ip), iface.network.prefixlen)
    try:
        with _ipr(netns) as ipr:
            link = _link(ipr, name)
            if link is not None:
                kind, data = _tun_info(link)
                is_tap = kind == "tun" and data.get("IFLA_TUN_TYPE") == IFLA_TUN_TYPE_TAP
                if not is_tap or _ipv4_addrs(ipr, link["index"]) != [want]:
                    ipr.link("del", index=link["index"])
                    link = None
            if link is None:
                _make_persistent_tap(name, netns)
                link = _link(ipr, name)
                if link is None:
                    raise NetworkSetupFailed(f"TAP {name} vanished right after creation")
            index = link["index"]
            # IPv6 off before the link goes up: no link-local address, no ND chatter.
            _disable_ipv6(name, netns)
            if _ipv4_addrs(ipr, index) != [want]:
                ipr.addr("add", index=index, address=want[0], prefixlen=want[1])
            ipr.link("set", index=index, state="up")
    except NetworkSetupFailed:
        raise
    except OSError as exc:
        raise NetworkSetupFailed(
            f"cannot create TAP {name} ({host_ip}/{prefix}): {exc.strerror or exc}",
            hint="lobsterd needs root (CAP_NET_ADMIN) and /dev/net/tun",
        ) from None
    except Exception as exc:  # pyroute2 raises its own NetlinkError and friends
        raise NetworkSetupFailed(f"cannot create TAP {name} ({host_ip}/{prefix}): {exc}") from None


def open_tap_fd(name: str, *, netns: str | None = None) -> int:
    """Attach to the existing TAP ``name`` and return the fd (for QEMU ``tap,fd=N``).

    The TAP must exist: ``TUNSETIFF`` on an unknown name would silently create a new,
    unconfigured device. The fd is close-on-exec; pass it with ``pass_fds``.
    """
    check_ifname(name)
    if not tap_exists(name, netns=netns):
        raise NetworkSetupFailed(
            f"TAP {name} does not exist", hint="re-run the spawn or lobsterd reconcile"
        )
    with in_netns(netns):
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkSetupFailed(f"cannot open {TUN_DEVICE}: {exc.strerror or exc}") from None
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
        except OSError as exc:
            os.close(fd)
            raise NetworkSetupFailed(
                f"cannot attach to TAP {name}: {exc.strerror or exc}",
                hint="is another process (a stale VMM) still attached to it?",
            ) from None
    got = ifr[:16].rstrip(b"\0").decode()
    if got != name:
        os.close(fd)
        raise NetworkSetupFailed(f"attached to {got!r} instead of TAP {name}")
    return fd


def delete_tap(name: str, *, netns: str | None = None) -> None:
    """Remove the TAP (persistent or not); a missing one is fine."""
    check_ifname(name)
    try:
        with _ipr(netns) as ipr:
            link = _link(ipr, name)
            if link is not None:
                ipr.link("del", index=link["index"])
    except NetworkSetupFailed:
        raise
    except Exception as exc:
        raise NetworkSetupFailed(f"cannot delete TAP {name}: {exc}") from None


def enable_ip_forward() -> None:
    """Host-wide IPv4 forwarding (idempotent); the firewall decides what may pass."""
    path = "/proc/sys/net/ipv4/ip_forward"
    try:
        with open(path) as fh:
            if fh.read().strip() == "1":
                return
        with open(path, "w") as fh:
            fh.write("1")
    except OSError as exc:
        raise NetworkSetupFailed(
            f"cannot enable IPv4 forwarding: {exc.strerror or exc}", hint="run as root"
        ) from None


def read_counter(name: str, counter: str, *, netns: str | None = None) -> int:
    """A 64-bit interface counter (``rx_bytes``, ``tx_packets``, ...) read via netlink."""
    check_ifname(name)
    if counter not in COUNTERS:
        raise NetworkSetupFailed(f"unknown counter {counter!r}; one of {sorted(COUNTERS)}")
    with _ipr(netns) as ipr:
        link = _link(ipr, name)
        if link is None:
            raise NetworkSetupFailed(f"interface {name} does not exist")
        stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
        if stats is None:
            raise NetworkSetupFailed(f"no statistics for {name}")
        return int(stats[counter])
