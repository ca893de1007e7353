"""Shared CLI plumbing: the loaded config, output helpers, error rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from lobsterd.config import Config, load_config


@dataclass
class CliState:
    config_path: str | None
    _config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


pass_state = click.make_pass_decorator(CliState)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def progress_printer(quiet: bool = False) -> Any:
    """Progress callback for :class:`lobsterd.ops.steps.StepRunner` printing to stderr."""

    def progress(step: str, detail: str, seconds: float | None) -> None:
        if quiet:
            return
        if seconds is None:
            click.echo(f"  [{step}] {detail}", err=True)
        else:
            click.echo(f"  [{step}] done in {seconds * 1000:.0f} ms", err=True)

    return progress


def require_root() -> None:
    import os

    from lobsterd.errors import NotRoot

    if os.geteuid() != 0:
        raise NotRoot("lobsterd must run as root for this command", hint="use sudo")

