"""Tenant commands: init, spawn, evict, tank, token, logs."""

from __future__ import annotations

import sys

import click

from lobsterd.cli.context import CliState, emit_json, pass_state, progress_printer, require_root

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _host(state: CliState):  # type: ignore[no-untyped-def]
    from lobsterd.ops.host import Host

    return Host(state.config)


@click.command("init")
@click.option("-y", "--yes", is_flag=True, help="Do not ask; do everything needed.")
@click.option("--accept-risk", is_flag=True,
              help="Continue although doctor reports FAIL (recorded in the audit log).")
@click.option("--no-image", is_flag=True, help="Do not build the guest image if missing.")
@json_option
@pass_state
def init_cmd(state: CliState, yes: bool, accept_risk: bool, no_image: bool, as_json: bool) -> None:
    """Prepare this host: directories, config, master key, hardening checks, firewall,
    guest image, host CA and Caddy. Safe to re-run: after a reboot it rebuilds firewall
    tables, TAPs, mounts and routes of existing tenants."""
    require_root()
    from lobsterd.ops.init import init_host

    if not yes and sys.stdin.isatty() and not click.confirm(
        "Prepare this host for lobsterd (installs firewall tables, starts Caddy)?", default=True
    ):
        click.echo("Aborted.")
        return
    report = init_host(_host(state), config_path=state.config_path, accept_risk=accept_risk,
                       build_image=not no_image, progress=progress_printer(as_json))
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.done:
        click.echo(f"  done: {line}")
    for line in report.warnings:
        click.echo(f"  warning: {line}")
    click.echo("Host initialized.")


@click.command("spawn")
@click.argument("name")
@click.option("--vcpus", type=click.IntRange(1, 32), help="vCPUs (default: vm.vcpus).")
@click.option("--mem", "mem_mib", type=click.IntRange(128),
              help="Memory in MiB (default: vm.mem_mib).")
@json_option
@pass_state
def spawn_cmd(state: CliState, name: str, vcpus: int | None, mem_mib: int | None,
              as_json: bool) -> None:
    """Create tenant NAME and boot its VM.

    NAME is a DNS label (a-z, 0-9, '-'; starts with a letter; at most 63 characters);
    the tenant is served as https://NAME.<caddy.domain>.
    """
    from lobsterd.core.names import validate_name
    from lobsterd.ops.spawn import spawn

    validate_name(name)
    require_root()
    if not as_json:
        click.echo(f'Spawning tenant "{name}"...', err=True)
    res = spawn(_host(state), name, vcpus=vcpus, mem_mib=mem_mib,
                progress=progress_printer(as_json))
    if as_json:
        emit_json(res.to_dict())
        return
    t = res.tenant
    click.echo(f'Tenant "{t.name}" spawned in {res.total_s:.2f} s ({res.accel}).')
    click.echo(f"  IP: {t.guest_ip}  PID: {t.vm_pid}  TAP: {t.tap}  UID: {t.uid}")


@click.command("evict")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_state
def evict_cmd(state: CliState, name: str, yes: bool, as_json: bool) -> None:
    """Destroy tenant NAME: its VM, disk, network, routes, keys and secrets."""
    require_root()
    from lobsterd.ops.evict import evict

    host = _host(state)
    host.registry.get(name)
    if not yes and not click.confirm(
        f'Remove tenant "{name}"? This destroys the VM and all its data.', default=False
    ):
        click.echo("Aborted.")
        return
    report = evict(host, name, progress=progress_printer(as_json))
    if as_json:
        emit_json({"name": name, "evicted": True, "warnings": report.warnings})
        return
    for w in report.warnings:
        click.echo(f"  warning: {w}", err=True)
    click.echo(f'Tenant "{name}" evicted.')


@click.command("tank")
@json_option
@pass_state
def tank_cmd(state: CliState, as_json: bool) -> None:
    """List tenants with their address, VM PID and live health."""
    require_root()
    from lobsterd.ops.query import tank

    rows = tank(_host(state))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("No tenants. Create one with: lobsterd spawn NAME")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in ("NAME", "STATUS", "STATE", "IP", "PID", "TAP", "HOST"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["status"], r["state"], r["ip"], str(r["vm_pid"] or "-"),
                      r["tap"], r["host"])
    Console().print(table)


@click.command("token")
@click.argument("name")
@pass_state
def token_cmd(state: CliState, name: str) -> None:
    """Print tenant NAME's gateway token (the read is audited)."""
    require_root()
    from lobsterd.ops.query import gateway_token

    click.echo(gateway_token(_host(state), name))


@click.command("logs")
@click.argument("name")
@click.option("-s", "--service", type=click.Choice(["gateway", "agent"]), default="gateway",
              show_default=True, help="Which guest log to read.")
@click.option("-n", "--chars", type=click.IntRange(1, 65536), default=4000, show_default=True,
              help="How many trailing characters to fetch.")
@pass_state
def logs_cmd(state: CliState, name: str, service: str, chars: int) -> None:
    """Print the tail of tenant NAME's gateway (or agent) log, once."""
    require_root()
    from lobsterd.ops.query import logs

    text = logs(_host(state), name, service=service, max_chars=chars)
    click.echo(text.rstrip("\n"))


COMMANDS: list[click.Command] = [init_cmd, spawn_cmd, evict_cmd, tank_cmd, token_cmd, logs_cmd]
