"""``lobsterd doctor``: host hardening checks, and the safe runtime fixes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lobsterd.cli.context import CliState, emit_json, pass_state, require_root


@click.command("doctor")
@click.option("--fix", is_flag=True,
              help="Apply the fixes that are safe at runtime and persist them "
                   "(sysctl.d, modprobe.d, tmpfiles.d). Never reboots.")
@click.option("--fix-swap", is_flag=True,
              help="With --fix, also turn plain swap off (swapoff can OOM a loaded host).")
@click.option("--only", "only", multiple=True, metavar="ID",
              help="Run only these checks (repeatable, or comma separated).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              hidden=True, help="Read /proc, /sys and /etc under this directory (tests).")
@pass_state
def doctor(state: CliState, fix: bool, fix_swap: bool, only: tuple[str, ...],
           as_json: bool, root: Path) -> None:
    """Check this host against every hardening recommendation.

    Each check prints PASS, WARN, FAIL or SKIP with the evidence it read and the exact
    fix. Exits 1 when any check FAILs (lobsterd init then refuses the host unless given
    --accept-risk).
    """
    from lobsterd.doctor import render_report, run_doctor
    from lobsterd.errors import ValidationFailed

    if fix_swap and not fix:
        raise ValidationFailed("--fix-swap only makes sense with --fix")
    if fix and root == Path("/"):
        require_root()
    ids = [i.strip() for part in only for i in part.split(",") if i.strip()] or None
    report = run_doctor(state.config, fix=fix, root=root, fix_swap=fix_swap, only=ids)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(render_report(report), nl=False)
    if report.has_fail:
        click.echo(f"doctor: {len(report.failing_ids)} check(s) FAIL: "
                   f"{', '.join(report.failing_ids)} (lobsterd init refuses this host "
                   "unless --accept-risk)", err=True)
        sys.exit(1)


COMMANDS: list[click.Command] = [doctor]
