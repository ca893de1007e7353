"""Placeholder: commands are added by the module's owner."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
