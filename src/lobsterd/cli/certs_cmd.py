"""``lobsterd certs``: rotate the TLS certificates between Caddy and the guests."""

from __future__ import annotations

import click

from lobsterd.cli.context import CliState, emit_json, pass_state, require_root


@click.group("certs")
def certs_group() -> None:
    """Certificates of the Caddy → guest mutual TLS link."""


@certs_group.command("rotate")
@click.option("--force", is_flag=True, help="Rotate every certificate, due or not.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_state
def rotate(state: CliState, force: bool, as_json: bool) -> None:
    """Replace guest certificates that expire within 7 days (all with --force) and
    refresh Caddy's client certificate and routes."""
    require_root()
    from lobsterd.ops.certs import rotate_guest_certs
    from lobsterd.ops.host import Host
    from lobsterd.ops.reconcile import reconcile_caddy

    host = Host(state.config)
    report = rotate_guest_certs(host, force=force)
    reconcile_caddy(host)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"rotated: {', '.join(report.rotated) or '-'}")
        click.echo(f"current: {', '.join(report.current) or '-'}")
        for name, err in report.failed.items():
            click.echo(f"failed: {name}: {err}", err=True)
    if report.failed:
        raise SystemExit(1)


COMMANDS: list[click.Command] = [certs_group]
