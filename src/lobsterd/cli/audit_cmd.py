"""``lobsterd audit``: read and verify the tamper-evident audit log."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from lobsterd.cli.context import CliState, emit_json, pass_state


def _line(rec: dict[str, Any]) -> str:
    actor = rec.get("actor") or {}
    who = f"uid={actor.get('uid', '?')} pid={actor.get('pid', '?')}"
    if "loginuid" in actor:
        who += f" login={actor['loginuid']}"
    if actor.get("token_id"):
        who = f"token={actor['token_id']}"
    outcome = str(rec.get("outcome"))
    if rec.get("error_code"):
        outcome += f"[{rec['error_code']}]"
    extra = ""
    if rec.get("details"):
        extra = " " + json.dumps(rec["details"], separators=(",", ":"), sort_keys=True)
    if rec.get("request_id"):
        extra += f" req={rec['request_id']}"
    return (f"{rec.get('time')} #{rec.get('seq')} {rec.get('action', '?'):<16} "
            f"{rec.get('tenant') or '-':<14} {outcome:<8} {who}{extra}")


@click.group("audit")
def audit_group() -> None:
    """Read and verify the audit log (who did what to which tenant, hash-chained)."""


@audit_group.command("tail")
@click.option("-n", "--lines", "n", type=click.IntRange(1), default=20, show_default=True,
              help="How many records.")
@click.option("-t", "--tenant", help="Only records about this tenant.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_state
def tail_cmd(state: CliState, n: int, tenant: str | None, as_json: bool) -> None:
    """Show the last records, oldest first."""
    from lobsterd.security.audit import audit_log_for

    records = audit_log_for(state.config).tail(n, tenant=tenant)
    if as_json:
        emit_json(records)
        return
    if not records:
        click.echo("no audit records" + (f" for tenant {tenant}" if tenant else ""))
        return
    for rec in records:
        click.echo(_line(rec))


@audit_group.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_state
def verify_cmd(state: CliState, as_json: bool) -> None:
    """Check the whole chain; exit 0 when intact, 1 when records were tampered with.

    Reports modified, deleted, reordered, duplicated and truncated records with their
    line. A torn final line (an interrupted write) is a warning, not tampering.
    """
    from lobsterd.security.audit import audit_log_for

    log = audit_log_for(state.config)
    report = log.verify()
    if as_json:
        emit_json({"path": str(log.path), **report.to_dict()})
    else:
        if report.ok:
            algs = ", ".join(report.algs) or "empty"
            click.echo(f"ok: {log.path}: {report.records} records intact ({algs}), "
                       f"last seq {report.last_seq}")
        else:
            click.echo(f"TAMPERED: {log.path}: {report.records} records, "
                       f"{sum(p.fatal for p in report.problems)} problems", err=True)
        for p in report.problems:
            level = "error" if p.fatal else "warning"
            where = f"line {p.line}" if p.line else "log"
            click.echo(f"  {level}: {where}: {p.kind}: {p.message}", err=not report.ok)
    if not report.ok:
        sys.exit(1)


COMMANDS: list[click.Command] = [audit_group]
