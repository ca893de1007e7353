"""The guest kernel command line (pure).

The command line is world-readable inside the guest (``/proc/cmdline``), so it carries
only what the guest may know: its addresses, ports, its name and the SHA-256 of the
agent token (useless for authenticating as the host). Every value is validated
structurally, so nothing can smuggle an extra ``key=value`` or a second parameter in.
"""

from __future__ import annotations

import ipaddress
import re

from lobsterd.core.names import validate_name
from lobsterd.errors import ValidationFailed

_HASH_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)

# Production: no serial device exists (QEMU runs with -nodefaults and isa-serial=off), and
# the kernel is told not to look for one, nor to print; a panic reboots at once, and
# QEMU runs with -no-reboot so a reboot ends the VM and the watchdog notices.
PRODUCTION_BASE: tuple[str, ...] = ("8250.nr_uarts=0", "quiet", "panic=1", "reboot=k")
DEBUG_BASE: tuple[str, ...] = ("console=ttyS0", "earlyprintk=ttyS0", "panic=1", "reboot=k")
ACCELS = ("kvm", "tcg")


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError):
        raise ValidationFailed(f"{what} {value!r} is not an IPv4 address") from None


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValidationFailed(f"{what} {value!r} is not a TCP port (1-65535)")
    return value


def build_boot_args(
    *,
    guest_ip: str,
    host_ip: str,
    prefix: int = 30,
    agent_token_hash: str,
    agent_port: int,
    health_port: int,
    gateway_port: int,
    tenant: str,
    accel: str,
    tsc_khz: int,
    debug_console: bool,
) -> str:
    """Kernel command line of a tenant's guest (see docs/architecture.md, Guest contract).

    ``agent_token_hash`` must be the 64-hex SHA-256 of the agent token: a raw token is
    refused by shape, so a caller mixing them up fails loudly instead of leaking it.
    ``tsc_khz`` is required under TCG, where QEMU's microvm can otherwise hang forever
    calibrating the TSC.
    """
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= 30:
        raise ValidationFailed(f"prefix {prefix!r} must be an integer between 1 and 30")
    gip = _ipv4(guest_ip, "guest_ip")
    hip = _ipv4(host_ip, "host_ip")
    net = ipaddress.IPv4Network((int(gip), prefix), strict=False)
    if gip == hip:
        raise ValidationFailed("guest_ip and host_ip must differ")
    if hip not in net:
        raise ValidationFailed(f"host_ip {hip} is not in the guest's network {net}")
    if gip in (net.network_address, net.broadcast_address):
        raise ValidationFailed(f"guest_ip {gip} is the network or broadcast address of {net}")
    if not isinstance(agent_token_hash, str) or not _HASH_RE.fullmatch(agent_token_hash):
        # The value itself is never echoed: it may be a raw token passed by mistake.
        raise ValidationFailed(
            "agent_token_hash must be the lower-case hex SHA-256 (64 characters) of the "
            "agent token, never the token itself"
        )
    ports = {
        "agent_port": _port(agent_port, "agent_port"),
        "health_port": _port(health_port, "health_port"),
        "gateway_port": _port(gateway_port, "gateway_port"),
    }
    if len(set(ports.values())) != len(ports):
        raise ValidationFailed(f"agent, health and gateway ports must differ: {ports}")
    validate_name(tenant)
    if accel not in ACCELS:
        raise ValidationFailed(f"accel {accel!r} must be one of {', '.join(ACCELS)}")
    if isinstance(tsc_khz, bool) or not isinstance(tsc_khz, int) or tsc_khz < 0:
        raise ValidationFailed(f"tsc_khz {tsc_khz!r} must be a non-negative integer")
    if accel == "tcg" and tsc_khz == 0:
        raise ValidationFailed(
            "tsc_khz is required under TCG (microvm can hang calibrating the TSC)",
            hint="set vm.tsc_khz in the config or let lobsterd read it from the host",
        )

    args = list(DEBUG_BASE if debug_console else PRODUCTION_BASE)
    if accel == "tcg":
        args.append(f"tsc_early_khz={tsc_khz}")
    args += [
        f"lobster.ip={gip}/{prefix}",
        f"lobster.gw={hip}",
        f"lobster.agent_hash={agent_token_hash}",
        f"lobster.agent_port={ports['agent_port']}",
        f"lobster.health_port={ports['health_port']}",
        f"lobster.gateway_port={ports['gateway_port']}",
        f"lobster.name={tenant}",
    ]
    line = " ".join(args)
    check_boot_args(line)
    return line


def check_boot_args(line: str) -> None:
    """Refuse a command line that is not plain space-separated ``word`` / ``key=value``.

    The last line of defence against a value that slipped past validation: no control
    characters, no quotes, no empty parameters, at most one ``=`` per parameter.
    """
    if not line.isascii() or not line.isprintable() or any(c in line for c in "\"'\\"):
        raise ValidationFailed("kernel command line contains quotes or non-printable characters")
    for param in line.split(" "):
        if not param or param.count("=") > 1 or param.startswith("="):
            raise ValidationFailed(f"malformed kernel parameter {param!r}")


def parse_lobster_params(cmdline: str) -> dict[str, str]:
    """The ``lobster.*`` parameters of a command line, without the prefix (for checks)."""
    out: dict[str, str] = {}
    for param in cmdline.split():
        key, sep, value = param.partition("=")
        if sep and key.startswith("lobster."):
            out[key.removeprefix("lobster.")] = value
    return out
