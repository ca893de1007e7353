"""``lobsterd config``: show and check the configuration."""

from __future__ import annotations

import click

from lobsterd.cli.context import CliState, emit_json, pass_state
from lobsterd.config import DEFAULT_CONFIG_TEXT, resolve_config_path


@click.group("config")
def config_group() -> None:
    """Show, check or print a default configuration."""


@config_group.command("check")
@pass_state
def check(state: CliState) -> None:
    """Validate the config file; exits non-zero naming the bad key."""
    cfg = state.config
    click.echo(f"ok: {cfg.source or resolve_config_path(state.config_path)} "
               f"({'file' if cfg.source else 'defaults, no file'})")


@config_group.command("show")
@pass_state
def show(state: CliState) -> None:
    """Print the effective configuration as JSON (defaults filled in)."""
    emit_json(state.config.model_dump(mode="json"))


@config_group.command("default")
def default() -> None:
    """Print a commented default config file."""
    click.echo(DEFAULT_CONFIG_TEXT, nl=False)


COMMANDS: list[click.Command] = [config_group]
