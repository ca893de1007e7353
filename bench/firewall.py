"""Firewall churn: lobsterd's nft transactions vs a per-rule iptables sequence, one run.

Installs and then removes the rules of N tenants (default 500) twice, side by side in
the same throw-away network namespace (``unshare --net``; nothing outside it changes):

* lobsterd: one ``nft -f`` transaction per tenant (:class:`lobsterd.adapters.firewall.
  Firewall`), plus the whole set rebuilt at once by ``reconcile``;
* baseline: the command sequence of the iptables-based design lobsterd replaces: custom
  chains and jumps once, then per tenant 17 ``iptables`` invocations (3 NAT, 10
  isolation, 4 agent-lockdown rules) to add and the same 17 with ``-D`` to remove.

It also times adding (then removing) one more tenant when 0 and when N tenants exist:
with per-tenant dispatch through verdict maps that should barely move, while
iptables, which re-reads its whole ruleset on every call, grows with N.

    sudo /opt/lobsterd/venv/bin/python bench/firewall.py [--tenants 500] [--samples 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from lobsterd.adapters.firewall import Firewall
from lobsterd.adapters.proc import run
from lobsterd.core import firewall as gen

HOST = gen.HostNet(pool="10.200.0.0/16", gateway_port=9000, agent_port=52, health_port=53)
IPT_TIMEOUT_S = 30.0


def _ipt_rules(t: gen.TenantNet, index: int) -> list[list[str]]:
    """The 17 per-tenant rules of the iptables design (as ``-A`` argument lists)."""
    tap, gip = f"tap-{t.name}", t.guest_ip
    c = f"lobster:{tap}"
    lock = f"lobster:lockdown:{gip}"
    est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
    nat = [
        ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(9000 + index), "!", "-s",
         "10.0.0.0/8", "-j", "DNAT", "--to-destination", f"{gip}:9000"],
        ["-t", "nat", "-A", "POSTROUTING", "-o", tap, "-j", "MASQUERADE"],
        ["-t", "nat", "-A", "POSTROUTING", "-s", f"{gip}/32", "!", "-o", tap, "-j", "MASQUERADE"],
    ]  # fmt: skip
    nat_comments = [c, c, f"{c}:outbound"]
    filt = [
        (["-A", "LOBSTER-INPUT", "-i", tap, *est], "host-return"),
        (["-A", "LOBSTER-INPUT", "-i", tap, "-j", "DROP"], "block-host"),
        (["-A", "LOBSTER-FORWARD", "-o", tap, *est], "return"),
        (["-A", "LOBSTER-FORWARD", "-o", tap, "-p", "tcp", "--dport", "9000", "-m", "conntrack",
          "--ctstate", "NEW", "-j", "ACCEPT"], "gateway-in"),
        (["-A", "LOBSTER-FORWARD", "-i", tap, "-d", "10.0.0.0/8", "-j", "DROP"], "block-rfc1918"),
        (["-A", "LOBSTER-FORWARD", "-i", tap, "-d", "172.16.0.0/12", "-j", "DROP"],
         "block-rfc1918"),
        (["-A", "LOBSTER-FORWARD", "-i", tap, "-d", "192.168.0.0/16", "-j", "DROP"],
         "block-rfc1918"),
        (["-A", "LOBSTER-FORWARD", "-i", tap, "-d", "169.254.0.0/16", "-j", "DROP"],
         "block-link-local"),
        (["-A", "LOBSTER-FORWARD", "-i", tap, "-m", "connlimit", "--connlimit-above", "1024",
          "--connlimit-saddr", "-j", "DROP"], "connlimit"),
        (["-A", "LOBSTER-FORWARD", "-i", tap, "-j", "ACCEPT"], "outbound"),
    ]  # fmt: skip
    out = [[*r, "-m", "comment", "--comment", cm] for r, cm in zip(nat, nat_comments, strict=True)]
    out += [[*r, "-m", "comment", "--comment", f"{c}:{sfx}"] for r, sfx in filt]
    for port, name in ((52, "agent"), (53, "health")):
        out.append(["-A", "LOBSTER-OUTPUT", "-d", gip, "-p", "tcp", "--dport", str(port),
                    "-m", "owner", "--uid-owner", "0", "-j", "ACCEPT",
                    "-m", "comment", "--comment", f"{lock}:{name}-root"])  # fmt: skip
    for port, name in ((52, "agent"), (53, "health")):
        out.append(["-A", "LOBSTER-OUTPUT", "-d", gip, "-p", "tcp", "--dport", str(port),
                    "-j", "DROP", "-m", "comment", "--comment", f"{lock}:{name}-drop"])  # fmt: skip
    assert len(out) == 17
    return out


class Iptables:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def _ipt(self, args: Sequence[str], check: bool = True) -> None:
        run([self.binary, "-w", "5", *args], timeout=IPT_TIMEOUT_S, check=check)

    def init(self) -> None:
        for chain, builtin in (
            ("LOBSTER-INPUT", "INPUT"),
            ("LOBSTER-FORWARD", "FORWARD"),
            ("LOBSTER-OUTPUT", "OUTPUT"),
        ):
            self._ipt(["-N", chain], check=False)
            self._ipt(["-I", builtin, "1", "-j", chain])

    def add(self, t: gen.TenantNet, index: int) -> None:
        for rule in _ipt_rules(t, index):
            self._ipt(rule)

    def remove(self, t: gen.TenantNet, index: int) -> None:
        for rule in _ipt_rules(t, index):
            self._ipt([("-D" if a == "-A" else a) for a in rule], check=False)

    def restore(self, tenants: Sequence[gen.TenantNet]) -> None:
        """Load every tenant's 17 rules at once (only to set up the 'add one' state)."""
        nat, filt = [], []
        for i, t in enumerate(tenants):
            for rule in _ipt_rules(t, i):
                if rule[:2] == ["-t", "nat"]:
                    nat.append(" ".join(rule[2:]))
                else:
                    filt.append(" ".join(rule))
        text = "*nat\n" + "\n".join(nat) + "\nCOMMIT\n*filter\n" + "\n".join(filt) + "\nCOMMIT\n"
        run([f"{self.binary}-restore", "-w", "5", "--noflush"], timeout=120, input_text=text)

    def flush(self) -> None:
        """Drop every tenant rule, keeping the custom chains and their jumps."""
        for chain in ("LOBSTER-INPUT", "LOBSTER-FORWARD", "LOBSTER-OUTPUT"):
            self._ipt(["-F", chain])
        self._ipt(["-t", "nat", "-F"])

    def count_rules(self) -> int:
        res = run([self.binary, "-w", "5", "-S"], timeout=IPT_TIMEOUT_S)
        nat = run([self.binary, "-w", "5", "-t", "nat", "-S"], timeout=IPT_TIMEOUT_S)
        return sum(ln.startswith("-A ") for ln in (res.stdout + nat.stdout).splitlines())


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _growth(
    empty: Callable[[], None],
    fill: Callable[[], None],
    add: Callable[[], None],
    remove: Callable[[], None],
    samples: int,
) -> tuple[float, float, float]:
    """Median seconds to add one tenant to an empty and to a full ruleset, interleaved.

    Each round empties the ruleset, times one add, then fills it with N tenants in one
    go and times one add again, so both sides see the same machine noise. Returns the
    two medians and the median time ``fill`` took.
    """
    at0, atn, fills = [], [], []
    for _ in range(samples):
        empty()
        at0.append(_timed(add))
        remove()
        fills.append(_timed(fill))
        atn.append(_timed(add))
        remove()
    return statistics.median(at0), statistics.median(atn), statistics.median(fills)


def inner(n: int, samples: int, iptables: str) -> None:
    tenants = [gen.tenant_for_slot(HOST, f"t{i}", i) for i in range(1, n + 2)]
    extra, tenants = tenants[-1], tenants[:-1]
    fw = Firewall(HOST)
    ipt = Iptables(iptables)
    res: dict[str, float] = {}

    def nft_add_all() -> None:
        for t in tenants:
            fw.add_tenant(t)

    def nft_remove_all() -> None:
        for t in tenants:
            fw.remove_tenant(t)

    def ipt_add_all() -> None:
        for i, t in enumerate(tenants):
            ipt.add(t, i)

    def ipt_remove_all() -> None:
        for i, t in enumerate(tenants):
            ipt.remove(t, i)

    def nft_empty() -> None:
        fw.teardown()
        fw.ensure_base()

    fw.ensure_base()
    res["nft add"] = _timed(nft_add_all)
    assert fw.list_tenant_chains() == {t.slot for t in tenants}
    res["nft remove"] = _timed(nft_remove_all)
    assert fw.list_tenant_chains() == set()
    res["nft one @0"], res["nft one @n"], res["nft reconcile"] = _growth(
        nft_empty,
        lambda: fw.reconcile(tenants),
        lambda: fw.add_tenant(extra),
        lambda: fw.remove_tenant(extra),
        samples,
    )
    res["nft teardown"] = _timed(fw.teardown)

    ipt.init()
    res["ipt add"] = _timed(ipt_add_all)
    assert ipt.count_rules() == 3 + 17 * n
    res["ipt remove"] = _timed(ipt_remove_all)
    assert ipt.count_rules() == 3
    res["ipt one @0"], res["ipt one @n"], res["ipt restore"] = _growth(
        ipt.flush,
        lambda: ipt.restore(tenants),
        lambda: ipt.add(extra, n + 1),
        lambda: ipt.remove(extra, n + 1),
        max(3, samples // 3),
    )
    ipt.flush()

    version = run([iptables, "--version"], timeout=10).stdout.strip()
    nft_version = run(["nft", "--version"], timeout=10).stdout.strip()
    ms = 1000.0
    print(f"{n} tenants, {nft_version} vs {version}; one throw-away network namespace")
    print(f"{'':30}{'lobsterd (nft)':>16}{'iptables x17':>16}{'ratio':>8}")
    for label, key in (
        ("install all, one by one (s)", "add"),
        ("remove all, one by one (s)", "remove"),
    ):
        ours, theirs = res[f"nft {key}"], res[f"ipt {key}"]
        print(f"  {label:28}{ours:16.2f}{theirs:16.2f}{theirs / ours:7.1f}x")
    for label, key in (
        ("add 1 @ 0 tenants (ms)", "one @0"),
        (f"add 1 @ {n} tenants (ms)", "one @n"),
    ):
        ours, theirs = res[f"nft {key}"] * ms, res[f"ipt {key}"] * ms
        print(f"  {label:28}{ours:16.1f}{theirs:16.1f}{theirs / ours:7.1f}x")
    growth_nft = res["nft one @n"] / res["nft one @0"]
    growth_ipt = res["ipt one @n"] / res["ipt one @0"]
    print(f"  growth of 'add 1' from 0 to {n} tenants: lobsterd {growth_nft:.2f}x, "
          f"iptables {growth_ipt:.2f}x (medians, interleaved)")  # fmt: skip
    print(f"  lobsterd reconcile of all {n} in one transaction: {res['nft reconcile']:.2f} s "
          f"(iptables-restore of the same: {res['ipt restore']:.2f} s); "
          f"teardown {res['nft teardown'] * ms:.1f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=500)
    ap.add_argument("--samples", type=int, default=15, help="runs per 'add one' median")
    ap.add_argument("--iptables", default="iptables", help="iptables binary (e.g. iptables-legacy)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args.tenants, args.samples, args.iptables)
        return
    if os.geteuid() != 0:
        sys.exit("bench/firewall.py needs root (it works in a throw-away network namespace)")
    for binary in ("unshare", "nft", args.iptables):
        if shutil.which(binary) is None:
            sys.exit(f"{binary} not found: apt-get install nftables iptables util-linux")
    argv = ["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), "--inner",
            "--tenants", str(args.tenants), "--samples", str(args.samples),
            "--iptables", args.iptables]  # fmt: skip
    res = run(argv, timeout=3600.0, check=False)
    sys.stdout.write(res.stdout)
    if res.returncode != 0:
        sys.exit(f"benchmark failed: {res.stderr.strip()}")


if __name__ == "__main__":
    main()
