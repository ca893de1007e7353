"""init → spawn → tank → evict on real VMs, with every kind of trace checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.evict import evict
from lobsterd.ops.host import Host
from lobsterd.ops.query import agent_for, tank
from lobsterd.ops.spawn import spawn
from lobsterd.ops.steps import InjectedFault
from tests.e2e.traces import traces

pytestmark = pytest.mark.e2e

SPAWN_STEPS = ["secrets", "volume", "network", "firewall", "vm", "ssh-key", "tls", "caddy",
               "agent", "inject", "registry"]


def cli(host: Host, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cfg_file = host.cfg.paths.config_dir.parent / "lobsterd.toml"
    return subprocess.run([sys.executable, "-m", "lobsterd", "--config", str(cfg_file), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_spawn_tank_evict_leaves_no_trace(e2e_host: Host) -> None:
    res = spawn(e2e_host, "demo")
    t = res.tenant
    assert t.vm_pid and t.guest_ip.startswith("10.231.0.")
    rows = {r["name"]: r for r in tank(e2e_host)}
    assert rows["demo"]["state"] == "HEALTHY", rows["demo"]
    assert rows["demo"]["ip"] == t.guest_ip and rows["demo"]["vm_pid"] == t.vm_pid

    # The CLI sees the same (a second process reading the same registry).
    out = cli(e2e_host, "tank", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)] == ["demo"]

    # No credential the agent accepts is on the QEMU command line or in the guest's.
    agent_token = e2e_host.secrets.get_internal("demo", rt.AGENT_TOKEN)
    gateway_token = e2e_host.secrets.get_internal("demo", rt.GATEWAY_TOKEN)
    qemu_cmdline = Path(f"/proc/{t.vm_pid}/cmdline").read_bytes().decode(errors="replace")
    guest_cmdline = agent_for(e2e_host, t).get_cmdline()
    for secret in (agent_token, gateway_token):
        assert secret not in qemu_cmdline
        assert secret not in guest_cmdline
    assert f"lobster.agent_hash={rt.token_hash(agent_token)}" in guest_cmdline
    # ...and the hash itself is not accepted as a token.
    from lobsterd.adapters.agent_client import AgentClient
    from lobsterd.errors import AgentRejected

    with pytest.raises(AgentRejected):
        AgentClient(t.guest_ip, e2e_host.cfg.network.agent_port, e2e_host.cfg.network.health_port,
                    rt.token_hash(agent_token), timeout_s=3).get_stats()

    # QEMU runs as the tenant's uid, chrooted into the jail on its own filesystem.
    status = Path(f"/proc/{t.vm_pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(t.uid)] * 4
    jail = e2e_host.cfg.paths.tenants_mnt / "demo" / "jail"
    assert os.readlink(f"/proc/{t.vm_pid}/root") == str(jail)

    assert traces(e2e_host, "demo", t.slot)  # sanity: the finder sees a live tenant
    evict(e2e_host, "demo")
    assert traces(e2e_host, "demo", t.slot) == {}


def test_two_parallel_spawns_get_distinct_addresses(e2e_host: Host) -> None:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lobsterd", "--config",
         str(e2e_host.cfg.paths.config_dir.parent / "lobsterd.toml"), "spawn", n, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ("par-a", "par-b")]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, se) in zip(procs, outs, strict=True):
        assert p.returncode == 0, se
    a, b = (json.loads(so) for so, _ in outs)
    assert a["ip"] != b["ip"] and a["uid"] != b["uid"] and a["tap"] != b["tap"]
    for n in ("par-a", "par-b"):
        slot = e2e_host.registry.get(n).slot
        evict(e2e_host, n)
        assert traces(e2e_host, n, slot) == {}


@pytest.mark.parametrize("step", SPAWN_STEPS)
def test_failure_at_each_step_leaves_nothing(e2e_host: Host, step: str) -> None:
    name = "fault"
    with pytest.raises(InjectedFault) as exc:
        spawn(e2e_host, name, fault_after=step)
    assert "rolled back" in exc.value.message
    slot = 1  # the lowest free slot: every earlier test evicted its tenants
    assert traces(e2e_host, name, slot) == {}


@pytest.mark.parametrize("recover_with", ["evict", "spawn"])
def test_sigkill_mid_spawn_then_recover(e2e_host: Host, recover_with: str) -> None:
    name = "killed"
    cfg_file = str(e2e_host.cfg.paths.config_dir.parent / "lobsterd.toml")
    proc = subprocess.Popen([sys.executable, "-m", "lobsterd", "--config", cfg_file, "spawn", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:  # kill it once the VM is booting: the worst moment
        t = e2e_host.registry.find(name)
        if t is not None and t.vm_pid:
            break
        assert time.monotonic() < deadline, "spawn never reached the vm step"
        assert proc.poll() is None, "spawn exited early"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    slot = t.slot
    assert traces(e2e_host, name, slot)  # leftovers exist...
    if recover_with == "evict":
        out = cli(e2e_host, "evict", name, "--yes")
        assert out.returncode == 0, out.stderr
        assert traces(e2e_host, name, slot) == {}
    else:
        out = cli(e2e_host, "spawn", name)
        assert out.returncode == 0, out.stderr
        assert e2e_host.registry.get(name).status.value == "active"
        evict(e2e_host, name)
        assert traces(e2e_host, name, slot) == {}
