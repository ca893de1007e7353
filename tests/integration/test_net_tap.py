"""TAP devices for real, inside network namespaces created (and removed) by the tests.

Nothing here can reach another machine: the namespaces have no route anywhere, and the
single host-namespace test uses a TAP that no process attaches to (no carrier: the
kernel sends nothing on it).
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from lobsterd.adapters import net
from lobsterd.errors import NetworkSetupFailed
from tests.helpers import need, need_binary, need_root

pytestmark = pytest.mark.integration

IFF_UP = 0x1


@pytest.fixture
def netns() -> Iterator[str]:
    need_root()
    need_binary("ip")
    need(os.path.exists(net.TUN_DEVICE), "needs /dev/net/tun")
    name = f"lbtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def link_of(ns: str, name: str) -> dict[str, object]:
    with IPRoute(netns=ns) as ipr:
        (idx,) = ipr.link_lookup(ifname=name)
        link = ipr.get_links(idx)[0]
        kind, data = net._tun_info(link)
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(index=idx, family=2)]
        addrs6 = list(ipr.get_addr(index=idx, family=10))
        return {"index": idx, "flags": link["flags"], "kind": kind, "data": data,
                "addrs": addrs, "addrs6": addrs6, "oper": link.get_attr("IFLA_OPERSTATE")}


def sysctl_in(ns: str, path: str) -> str:
    with net.in_netns(ns), open(path) as fh:
        return fh.read().strip()


def test_create_persistent_tap(netns: str) -> None:
    net.create_tap("lbt1", "10.200.0.5", 30, netns=netns)
    assert net.tap_exists("lbt1", netns=netns)
    assert not net.tap_exists("lbt1")  # not in the host namespace
    info = link_of(netns, "lbt1")
    assert info["kind"] == "tun"
    data = info["data"]
    assert isinstance(data, dict)
    assert data["IFLA_TUN_TYPE"] == net.IFLA_TUN_TYPE_TAP
    assert data["IFLA_TUN_PERSIST"] == 1
    assert data.get("IFLA_TUN_OWNER") in (None, 0xFFFFFFFF)  # no owner: root only
    assert info["addrs"] == [("10.200.0.5", 30)]
    assert int(info["flags"]) & IFF_UP  # type: ignore[call-overload]
    assert sysctl_in(netns, "/proc/sys/net/ipv6/conf/lbt1/disable_ipv6") == "1"
    assert info["addrs6"] == []  # no link-local address: IPv6 was off before "up"


def test_create_is_idempotent_and_repairs(netns: str) -> None:
    net.create_tap("lbt2", "10.200.0.9", 30, netns=netns)
    first = link_of(netns, "lbt2")["index"]
    net.create_tap("lbt2", "10.200.0.9", 30, netns=netns)
    assert link_of(netns, "lbt2")["index"] == first  # kept as is

    net.create_tap("lbt2", "10.200.0.13", 30, netns=netns)  # wrong address: recreated
    assert link_of(netns, "lbt2")["addrs"] == [("10.200.0.13", 30)]

    # a link of that name that is not a TAP is replaced by one
    net.delete_tap("lbt2", netns=netns)
    subprocess.run(["ip", "-n", netns, "link", "add", "lbt2", "type", "veth", "peer", "name",
                    "lbt2p"], check=True, timeout=10)
    net.create_tap("lbt2", "10.200.0.9", 30, netns=netns)
    info = link_of(netns, "lbt2")
    assert info["kind"] == "tun"
    assert info["addrs"] == [("10.200.0.9", 30)]


def test_open_fd_carrier_and_counters(netns: str) -> None:
    net.create_tap("lbt3", "10.200.0.17", 30, netns=netns)
    assert link_of(netns, "lbt3")["oper"] != "UP"  # nobody attached: no carrier
    fd = net.open_tap_fd("lbt3", netns=netns)
    try:
        assert not os.get_inheritable(fd)
        assert link_of(netns, "lbt3")["oper"] == "UP"
        before = net.read_counter("lbt3", "rx_packets", netns=netns)
        # What a guest would send: a virtio-net header (IFF_VNET_HDR) + an ARP request.
        eth = b"\xff" * 6 + bytes.fromhex("024c42000003") + b"\x08\x06"
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + bytes.fromhex("024c42000003") + \
            bytes([10, 200, 0, 18]) + b"\0" * 6 + bytes([10, 200, 0, 17])
        os.write(fd, b"\0" * 10 + eth + arp)
        assert net.read_counter("lbt3", "rx_packets", netns=netns) == before + 1
        assert net.read_counter("lbt3", "rx_bytes", netns=netns) >= len(eth + arp)
    finally:
        os.close(fd)
    assert net.tap_exists("lbt3", netns=netns)  # persistent: survives its user
    with pytest.raises(NetworkSetupFailed, match="unknown counter"):
        net.read_counter("lbt3", "../../etc", netns=netns)


def test_open_missing_tap_creates_nothing(netns: str) -> None:
    with pytest.raises(NetworkSetupFailed, match="does not exist"):
        net.open_tap_fd("lbt4", netns=netns)
    assert not net.tap_exists("lbt4", netns=netns)


def test_delete_is_idempotent(netns: str) -> None:
    net.create_tap("lbt5", "10.200.0.21", 30, netns=netns)
    net.delete_tap("lbt5", netns=netns)
    assert not net.tap_exists("lbt5", netns=netns)
    net.delete_tap("lbt5", netns=netns)


def test_ip_forward(netns: str) -> None:
    with net.in_netns(netns):
        net.enable_ip_forward()
        net.enable_ip_forward()
    assert sysctl_in(netns, "/proc/sys/net/ipv4/ip_forward") == "1"


@pytest.mark.parametrize("bad", ["", "a" * 16, "lbt 1", "../x", "lbt1\n"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(NetworkSetupFailed):
        net.create_tap(bad, "10.200.0.5", 30)


def test_missing_namespace_is_not_created() -> None:
    need_root()
    name = f"lbtest-missing-{uuid.uuid4().hex[:6]}"
    with pytest.raises(NetworkSetupFailed, match="does not exist"):
        net.create_tap("lbt6", "10.200.0.25", 30, netns=name)
    assert not os.path.exists(f"/run/netns/{name}")


def test_host_namespace_roundtrip() -> None:
    """The production path (no netns): create, check, delete; never attached."""
    need_root()
    need(os.path.exists(net.TUN_DEVICE), "needs /dev/net/tun")
    name = f"lbtt{uuid.uuid4().hex[:6]}"
    try:
        net.create_tap(name, "10.255.254.1", 30)
        assert net.tap_exists(name)
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6") as fh:
            assert fh.read().strip() == "1"
    finally:
        net.delete_tap(name)
    assert not net.tap_exists(name)
