"""Network namespaces as a stand-in host, guests and "internet" for firewall tests.

Nothing here touches the real host's network: every link, address, route and firewall
rule lives in namespaces created with a random suffix and deleted afterwards (deleting
a namespace destroys its links, sockets keep nothing alive once the servers are killed).

Topology built by :func:`topology`::

    guest ns gN   eth0 <gip>/30 ──veth── lbtN <hip>/30        (one per tenant slot)
    host ns       lo 10.255.0.1/32, up0 198.51.100.1/24 ──veth── eth0 (inet ns)
    inet ns       eth0 198.51.100.2/24 and, as /32s: 198.51.100.3, 10.99.0.1,
                  172.20.0.1, 192.168.77.1, 100.64.0.1, 169.254.169.254

The veth ends called ``lbt<slot>`` stand in for the tenants' TAPs (the firewall only
sees an interface name). The inet ns routes the tenant pool back to the host, so a
missing masquerade would be seen as the guest's address, not as a silent failure.

Servers and probes are small stdlib Python programs run with ``ip netns exec``; each
server accepts TCP and answers ``peer <address>`` at once, and logs every TCP
connection and UDP datagram as one line on stdout.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PY = "/usr/bin/python3"
CMD_TIMEOUT_S = 20.0

POOL = "10.200.0.0/24"
UPLINK = "up0"
HOST_UPLINK_IP = "198.51.100.1"
INET_IP = "198.51.100.2"
INET_IP2 = "198.51.100.3"
HOST_LO_IP = "10.255.0.1"
# Private, shared and link-local destinations, all living on the inet ns: only the
# firewall (not routing) can keep a guest from them.
PRIVATE_TARGETS = ("10.99.0.1", "172.20.0.1", "192.168.77.1", "169.254.169.254", "100.64.0.1")
HOST_SERVICE_PORT = 7000
GUEST_PORTS = (22, 52, 53, 8080, 9000)
INET_PORTS = (80, 443, 8080)
UDP_PORT = 5353

SERVER_PY = r"""
import json, selectors, socket, sys
spec = json.loads(sys.argv[1])
sel = selectors.DefaultSelector()
def norm(a):
    return a[7:] if a.startswith("::ffff:") else a
for port in spec["tcp"]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(128); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, ("listen", port))
for port in spec["udp"]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, ("udp", port))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        kind, port = key.data
        sock = key.fileobj
        if kind == "listen":
            try:
                conn, addr = sock.accept()
            except OSError:
                continue
            peer = norm(addr[0])
            print(f"tcp {port} {peer}", flush=True)
            try:
                conn.sendall(f"peer {peer}\n".encode())
            except OSError:
                conn.close(); continue
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, ("conn", port))
        elif kind == "udp":
            try:
                data, addr = sock.recvfrom(2048)
            except OSError:
                continue
            print(f"udp {port} {norm(addr[0])} {data.decode(errors='replace')}", flush=True)
        else:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock); sock.close()
"""

PROBE_PY = r"""
import json, socket, sys, threading, time
spec = json.loads(sys.argv[1])
timeout = float(spec.get("timeout", 0.8))
def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
def tcp(t, keep=None):
    s = socket.socket(family(t["host"]), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if t.get("bind"):
            s.bind((t["bind"], 0))
        s.connect((t["host"], t["port"]))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            buf += chunk
        line = buf.decode().strip()
        if not line.startswith("peer "):
            return {"ok": False, "peer": None, "err": "no reply"}
        return {"ok": True, "peer": line[5:], "err": None}
    except OSError as exc:
        return {"ok": False, "peer": None, "err": type(exc).__name__ + ": " + str(exc)}
    finally:
        if keep is None:
            s.close()
        else:
            keep.append(s)
def udp(u):
    s = socket.socket(family(u["host"]), socket.SOCK_DGRAM)
    try:
        if u.get("bind"):
            s.bind((u["bind"], 0))
        s.sendto(u["payload"].encode(), (u["host"], u["port"]))
        return {"ok": True, "err": None}
    except OSError as exc:
        return {"ok": False, "err": type(exc).__name__ + ": " + str(exc)}
    finally:
        s.close()
out = {"tcp": [None] * len(spec.get("tcp", [])), "udp": [udp(u) for u in spec.get("udp", [])]}
def run(i, t):
    out["tcp"][i] = tcp(t)
threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(spec.get("tcp", []))]
for th in threads: th.start()
for th in threads: th.join()
hold = spec.get("hold")
if hold:
    keep = []
    res = [tcp(hold, keep) for _ in range(hold["count"])]
    out["hold"] = res
    for s in keep: s.close()
print(json.dumps(out))
"""


def sh(
    *argv: str, check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one command (argv list, bounded); failures carry stderr in the message."""
    res = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT_S,
        input=input_text,
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


class Server:
    """A background server in a namespace whose event lines are collected by a thread."""

    def __init__(self, ns: str, tcp: Sequence[int], udp: Sequence[int] = ()) -> None:
        spec = json.dumps({"tcp": list(tcp), "udp": list(udp)})
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", SERVER_PY, spec],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10.0)
        first = self.proc.stdout.readline().strip() if ready else ""
        if first != "ready":
            self.stop()
            raise RuntimeError(f"server in {ns} did not start: {first!r}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.strip())

    def events(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, pred: Callable[[str], bool], timeout: float) -> bool:
        """True once a line satisfying ``pred`` was logged, False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(line) for line in self.events()):
                return True
            time.sleep(0.02)
        return any(pred(line) for line in self.events())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@dataclass
class Guest:
    slot: int
    ns: str
    host_ip: str
    guest_ip: str


@dataclass
class Topology:
    suffix: str
    host_ns: str
    inet_ns: str
    guests: dict[int, Guest] = field(default_factory=dict)
    servers: dict[str, Server] = field(default_factory=dict)

    def probe(
        self,
        ns: str,
        *,
        tcp: Sequence[tuple[str, int]] = (),
        bind: str | None = None,
        udp: Sequence[tuple[str, int, str]] = (),
        hold: tuple[str, int, int] | None = None,
        timeout: float = 0.8,
        as_nobody: bool = False,
    ) -> dict[str, Any]:
        """Run the probe program in ``ns`` (as uid 65534 with ``as_nobody``)."""
        spec: dict[str, Any] = {
            "timeout": timeout,
            "tcp": [{"host": h, "port": p, "bind": bind} for h, p in tcp],
            "udp": [{"host": h, "port": p, "payload": m, "bind": bind} for h, p, m in udp],
        }
        if hold:
            spec["hold"] = {"host": hold[0], "port": hold[1], "count": hold[2], "bind": bind}
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
        res = in_ns(ns, *drop, PY, "-c", PROBE_PY, json.dumps(spec))
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def tcp_ok(self, ns: str, targets: Sequence[tuple[str, int]], **kw: Any) -> list[bool]:
        return [r["ok"] for r in self.probe(ns, tcp=targets, **kw)["tcp"]]

    def nft_json(self) -> dict[str, Any]:
        """``nft -j list ruleset`` of the host ns, without the version banner."""
        doc: dict[str, Any] = json.loads(in_ns(self.host_ns, "nft", "-j", "list", "ruleset").stdout)
        doc["nftables"] = [i for i in doc["nftables"] if "metainfo" not in i]
        return doc


def _slot_ips(slot: int) -> tuple[str, str]:
    base = 4 * slot
    return f"10.200.0.{base + 1}", f"10.200.0.{base + 2}"


@contextlib.contextmanager
def topology(slots: Sequence[int] = (1, 2, 3)) -> Iterator[Topology]:
    """Build the namespaces, links and servers; always tear everything down."""
    suffix = secrets.token_hex(3)
    topo = Topology(suffix=suffix, host_ns=f"lbtest-host-{suffix}", inet_ns=f"lbtest-inet-{suffix}")
    created: list[str] = []
    try:
        for ns in (topo.host_ns, topo.inet_ns):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        h, i = topo.host_ns, topo.inet_ns
        for key in ("all", "default"):
            in_ns(h, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        in_ns(h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(h, "ip", "link", "set", "lo", "up")
        in_ns(h, "ip", "addr", "add", f"{HOST_LO_IP}/32", "dev", "lo")
        in_ns(i, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", UPLINK, "netns", h, "type", "veth", "peer", "name", "eth0",
           "netns", i)  # fmt: skip
        in_ns(h, "ip", "addr", "add", f"{HOST_UPLINK_IP}/24", "dev", UPLINK)
        in_ns(h, "ip", "link", "set", UPLINK, "up")
        in_ns(i, "ip", "addr", "add", f"{INET_IP}/24", "dev", "eth0")
        for extra in (INET_IP2, *PRIVATE_TARGETS):
            in_ns(i, "ip", "addr", "add", f"{extra}/32", "dev", "eth0")
            if extra != INET_IP2:
                in_ns(h, "ip", "route", "add", f"{extra}/32", "via", INET_IP)
        in_ns(i, "ip", "link", "set", "eth0", "up")
        in_ns(i, "ip", "route", "add", "default", "via", HOST_UPLINK_IP)
        for slot in slots:
            g = f"lbtest-g{slot}-{suffix}"
            sh("ip", "netns", "add", g)
            created.append(g)
            hip, gip = _slot_ips(slot)
            tap = f"lbt{slot}"
            sh("ip", "link", "add", tap, "netns", h, "type", "veth", "peer", "name", "eth0",
               "netns", g)  # fmt: skip
            in_ns(h, "ip", "addr", "add", f"{hip}/30", "dev", tap)
            in_ns(h, "ip", "link", "set", tap, "up")
            in_ns(g, "ip", "link", "set", "lo", "up")
            in_ns(g, "ip", "addr", "add", f"{gip}/30", "dev", "eth0")
            in_ns(g, "ip", "link", "set", "eth0", "up")
            in_ns(g, "ip", "route", "add", "default", "via", hip)
            topo.guests[slot] = Guest(slot=slot, ns=g, host_ip=hip, guest_ip=gip)
            topo.servers[g] = Server(g, GUEST_PORTS)
        topo.servers[h] = Server(h, (HOST_SERVICE_PORT,))
        topo.servers[i] = Server(i, INET_PORTS, (UDP_PORT,))
        yield topo
    finally:
        for server in topo.servers.values():
            server.stop()
        for ns in reversed(created):
            sh("ip", "netns", "del", ns, check=False)


def strip_handles(obj: Any) -> Any:
    """A copy of nft JSON without ``handle`` keys (rewritten rules get new handles)."""
    if isinstance(obj, dict):
        return {k: strip_handles(v) for k, v in obj.items() if k != "handle"}
    if isinstance(obj, list):
        return [strip_handles(v) for v in obj]
    return obj
