"""Applying and inspecting lobsterd's nftables table with the ``nft`` command.

Every change is one ``nft -f -`` run, i.e. one netlink transaction: it applies whole or
not at all, so a crash or a bad rule never leaves half a tenant behind. The scripts come
from :mod:`lobsterd.core.firewall` and are idempotent, so every method here is safe to
retry. Only lobsterd's own table is ever written or deleted.

``netns`` runs ``nft`` inside a named network namespace (``ip netns exec``): tests build
a stand-in host there instead of touching the real host's firewall.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lobsterd.adapters.proc import Result, run
from lobsterd.core import firewall as gen
from lobsterd.errors import ExecFailed, ExecTimeout, FirewallError

NFT_TIMEOUT_S = 30.0


def _nft_error(res: Result) -> str:
    """The useful part of nft's complaint: the ``Error:`` line and the command it names."""
    lines = (res.stderr or res.stdout).strip().splitlines()
    for i, line in enumerate(lines):
        _, sep, msg = line.partition("Error: ")
        if sep:
            cmd = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{msg.strip()} (in: {cmd})" if cmd else msg.strip()
    return lines[-1].strip() if lines else f"exit status {res.returncode}"


class Firewall:
    """lobsterd's tenant firewall on one host (or inside one network namespace)."""

    def __init__(
        self,
        host: gen.HostNet,
        *,
        netns: str | None = None,
        nft: str = "nft",
        timeout: float = NFT_TIMEOUT_S,
    ) -> None:
        gen.check_host(host)
        self.host = host
        self.netns = netns
        self._prefix: tuple[str, ...] = ("ip", "netns", "exec", netns) if netns else ()
        self._nft = nft
        self._timeout = timeout

    # -- plumbing ---------------------------------------------------------------------

    def _run(self, args: Sequence[str], script: str | None = None) -> Result:
        argv = [*self._prefix, self._nft, *args]
        try:
            return run(argv, timeout=self._timeout, check=False, input_text=script)
        except ExecTimeout:
            raise FirewallError(
                f"nft did not finish within {self._timeout:g}s",
                hint="check the host's load and whether another nft run is stuck",
            ) from None
        except ExecFailed as exc:
            raise FirewallError(
                f"cannot run nft: {exc.message}", hint="install nftables (apt-get install nftables)"
            ) from None

    def apply(self, script: str) -> None:
        """Apply ``script`` as one atomic transaction; on any error nothing changes."""
        res = self._run(["-f", "-"], script)
        if not res.ok:
            raise FirewallError(
                f"nft rejected lobsterd's firewall change: {_nft_error(res)}",
                hint="nothing was applied; `lobsterd init` rebuilds lobsterd's table",
            )

    def has_base(self) -> bool:
        """Whether lobsterd's table (with its base chains) exists."""
        return self._run(["list", "chain", gen.FAMILY, gen.TABLE, "forward"]).ok

    # -- operations -------------------------------------------------------------------

    def ensure_base(self) -> None:
        """Create lobsterd's table, or re-assert its base chains and sets; tenants stay."""
        self.apply(gen.base_ruleset(self.host))

    def add_tenant(self, t: gen.TenantNet) -> None:
        """Install or rewrite tenant ``t``'s rules (validated before anything is applied).

        The common case is one ``nft`` run; only when that fails because lobsterd's table
        is missing (e.g. after a reboot) are base and tenant applied together, still as
        one transaction.
        """
        script = gen.tenant_add(self.host, t)
        try:
            self.apply(script)
        except FirewallError:
            if self.has_base():
                raise
            self.apply(gen.base_ruleset(self.host) + script)

    def remove_tenant(self, t: gen.TenantNet) -> None:
        """Delete tenant ``t``'s chain and elements; a no-op when they are already gone."""
        script = gen.tenant_remove(self.host, t)
        try:
            self.apply(script)
        except FirewallError:
            if self.has_base():
                raise

    def reconcile(self, tenants: Sequence[gen.TenantNet]) -> None:
        """Rebuild lobsterd's table with exactly ``tenants``, atomically (no duplicates)."""
        self.apply(gen.full_ruleset(self.host, tenants))

    def teardown(self) -> None:
        """Remove lobsterd's table; other tables are left alone."""
        self.apply(gen.teardown_script())

    def list_tenant_chains(self) -> set[int]:
        """Slots that have a tenant chain in lobsterd's table (empty if there is none)."""
        res = self._run(["-j", "list", "chains", gen.FAMILY])
        if not res.ok:
            raise FirewallError(f"cannot list nftables chains: {_nft_error(res)}")
        try:
            doc = json.loads(res.stdout or '{"nftables": []}')
        except json.JSONDecodeError as exc:
            raise FirewallError(f"nft printed unreadable JSON: {exc}") from None
        slots: set[int] = set()
        for item in doc.get("nftables", []):
            chain = item.get("chain") if isinstance(item, dict) else None
            if not isinstance(chain, dict) or chain.get("table") != gen.TABLE:
                continue
            slot = gen.parse_tenant_chain(str(chain.get("name", "")))
            if slot is not None:
                slots.add(slot)
        return slots
