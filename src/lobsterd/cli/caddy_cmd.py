"""``lobsterd caddy supervise`` (hidden): Caddy's watcher in the foreground.

``lobsterd init`` starts the watcher detached by itself; this command is for hosts whose
service manager (runit, s6, OpenRC's supervise-daemon, a container) wants to own the
long-running process. It becomes the very watcher ``init`` would start (same process,
same pid file), so ``init`` and ``ensure_running`` recognise it and start no other.
"""

from __future__ import annotations

import os
import sys

import click

from lobsterd.cli.context import CliState, pass_state, require_root


@click.group("caddy", hidden=True)
def caddy_group() -> None:
    """lobsterd's Caddy (internal)."""


@caddy_group.command("supervise", hidden=True)
@click.option(
    "--user",
    default="caddy",
    show_default=True,
    help="Account Caddy runs as (empty: root; not recommended).",
)
@click.option("--bind-host", default="", help="Address of the HTTPS listener (default: all).")
@pass_state
def supervise(state: CliState, user: str, bind_host: str) -> None:
    """Run Caddy and restart it when it dies, re-applying tenant routes; stop on SIGTERM."""
    require_root()
    from lobsterd.adapters.caddy import CaddySupervisor

    sup = CaddySupervisor(state.config, user=user or None, bind_host=bind_host, use_systemd=False)
    sup.prepare()
    sup.write_watch_state()
    argv = sup.watcher_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: the service manager's pid is the watcher's pid.
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv of our own interpreter


COMMANDS: list[click.Command] = [caddy_group]
