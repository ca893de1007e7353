"""The ``lobsterd`` command."""

from __future__ import annotations

import sys
from typing import Any

import click

from lobsterd import __version__
from lobsterd.cli.context import CliState
from lobsterd.errors import LobsterError


class LobsterGroup(click.Group):
    """Turns every :class:`LobsterError` into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LobsterError as exc:
            click.echo(f"error[{exc.code}]: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=LobsterGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="LOBSTERD_CONFIG",
    type=click.Path(dir_okay=False),
    help="Config file (default /etc/lobsterd/lobsterd.toml, or $LOBSTERD_CONFIG).",
)
@click.version_option(__version__, prog_name="lobsterd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """lobsterd — run each tenant's AI gateway in its own microVM.

    Each tenant gets a VM with a read-only shared root filesystem, a writable overlay on
    a filesystem of its own, a /30 link to the host, and a guest agent the host alone
    can talk to. Most commands need root.
    """
    ctx.obj = CliState(config_path=config_path)


def _register() -> None:
    from lobsterd.cli import (
        audit_cmd,
        caddy_cmd,
        certs_cmd,
        config_cmd,
        doctor_cmd,
        image_cmd,
        secrets_cmd,
        tenant_cmds,
    )

    for mod in (tenant_cmds, config_cmd, image_cmd, secrets_cmd, audit_cmd, doctor_cmd,
                certs_cmd, caddy_cmd):
        for command in mod.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="lobsterd")
