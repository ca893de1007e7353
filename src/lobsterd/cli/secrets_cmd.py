"""``lobsterd secrets``: set, list and remove the secrets given to tenants' gateways.

A value is never accepted on the command line (argv is visible to every user through
``ps`` and lands in shell history): it comes from stdin, a hidden prompt, a file, or an
environment variable. Anything extra on the command line is refused *without echoing
it*, because it is most likely the value. Every change is audited by name only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from lobsterd.cli.context import CliState, emit_json, pass_state
from lobsterd.errors import LobsterError, SecretsError, ValidationFailed

# Kept in sync with lobsterd.security.secrets.MAX_VALUE_BYTES (checked by its tests); the
# store module is imported lazily so that ``lobsterd --help`` stays fast.
MAX_VALUE_BYTES = 64 * 1024

_NO_ARGV = (
    "secret values are never taken from the command line (ps and shell history would "
    "show them): pipe the value on stdin, or use --from-file PATH or --from-env VAR"
)


def _strip_newline(text: str) -> str:
    """Drop one trailing newline, as ``echo`` and editors add one."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_VALUE_BYTES + 2:
        raise ValidationFailed(f"secret value from {source} is larger than {MAX_VALUE_BYTES} "
                               "bytes")
    try:
        return _strip_newline(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValidationFailed(f"secret value from {source} is not UTF-8 text") from None


def _read_value(name: str, from_file: Path | None, from_env: str | None) -> tuple[str, str]:
    """(value, where it came from); the description is safe to log."""
    if from_file is not None and from_env is not None:
        raise click.UsageError("give at most one of --from-file and --from-env")
    if from_file is not None:
        try:
            with open(from_file, "rb") as fh:
                data = fh.read(MAX_VALUE_BYTES + 3)
        except OSError as exc:
            raise ValidationFailed(f"cannot read {from_file}: {exc.strerror or exc}") from None
        return _decode(data, str(from_file)), "file"
    if from_env is not None:
        value = os.environ.get(from_env)
        if value is None:
            raise ValidationFailed(f"environment variable {from_env} is not set")
        return value, f"env:{from_env}"
    if sys.stdin is not None and sys.stdin.isatty():
        value = click.prompt(f"Value of {name}", hide_input=True, confirmation_prompt=True,
                             err=True)
        return str(value), "prompt"
    stream = click.get_binary_stream("stdin")
    return _decode(stream.read(MAX_VALUE_BYTES + 3), "stdin"), "stdin"


def _audit(state: CliState, action: str, tenant: str | None, details: dict[str, Any],
           exc: LobsterError | None = None) -> None:
    from lobsterd.security.audit import audit_log_for

    audit_log_for(state.config).record(
        action, tenant=tenant, outcome="ok" if exc is None else "error",
        error_code=None if exc is None else exc.code, details=details)


@click.group("secrets")
def secrets_group() -> None:
    """Secrets (provider API keys...) given to tenants' gateways; encrypted at rest.

    Host-wide secrets go to every tenant; a tenant's own secret of the same name wins.
    Values are read from stdin, a file or an environment variable, never from argv.
    """


@secrets_group.command(
    "set", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name")
@click.option("-t", "--tenant", help="Set it for this tenant only (default: host-wide).")
@click.option("--from-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the value from this file (one trailing newline is dropped).")
@click.option("--from-env", metavar="VAR", help="Read the value from environment variable VAR.")
@click.pass_context
def set_cmd(ctx: click.Context, name: str, tenant: str | None, from_file: Path | None,
            from_env: str | None) -> None:
    """Create or replace secret NAME (an environment variable name, e.g. OPENAI_API_KEY).

    The value comes from stdin (a hidden prompt on a terminal), --from-file or --from-env.
    """
    from lobsterd.security.redact import install_excepthook
    from lobsterd.security.secrets import open_store, tenant_scope, validate_secret_name

    install_excepthook()
    if ctx.args:
        raise click.UsageError(_NO_ARGV)
    state = ctx.find_object(CliState)
    assert state is not None
    validate_secret_name(name)
    scope = tenant_scope(tenant)
    store = open_store(state.config)
    value, source = _read_value(name, from_file, from_env)
    details = {"name": name, "scope": scope, "source": source}
    try:
        store.set(name, value, tenant=tenant)
    except LobsterError as exc:
        _audit(state, "secrets.set", tenant, details, exc)
        raise
    _audit(state, "secrets.set", tenant, details)
    click.echo(f"set {name} ({scope})")


@secrets_group.command("list")
@click.option("-t", "--tenant", help="List this tenant's own secrets.")
@click.option("--all", "all_scopes", is_flag=True, help="List host and every tenant's secrets.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_state
def list_cmd(state: CliState, tenant: str | None, all_scopes: bool, as_json: bool) -> None:
    """Show secret names, scopes and update times (never values)."""
    from lobsterd.security.secrets import open_store, tenant_scope

    if tenant is not None and all_scopes:
        raise click.UsageError("give at most one of --tenant and --all")
    infos = open_store(state.config).list(tenant, all_scopes=all_scopes)
    if as_json:
        emit_json([i.to_dict() for i in infos])
        return
    if not infos:
        where = "any scope" if all_scopes else tenant_scope(tenant)
        click.echo(f"no secrets in {where}")
        return
    width_n = max(4, *(len(i.name) for i in infos))
    width_s = max(5, *(len(i.scope) for i in infos))
    click.echo(f"{'NAME':<{width_n}}  {'SCOPE':<{width_s}}  UPDATED")
    for i in infos:
        click.echo(f"{i.name:<{width_n}}  {i.scope:<{width_s}}  {i.updated_at}")


@secrets_group.command("rm")
@click.argument("name")
@click.option("-t", "--tenant", help="Remove the tenant's own secret (default: host-wide).")
@pass_state
def rm_cmd(state: CliState, name: str, tenant: str | None) -> None:
    """Remove secret NAME from the host scope or from one tenant's scope."""
    from lobsterd.security.secrets import open_store, tenant_scope, validate_secret_name

    validate_secret_name(name)
    scope = tenant_scope(tenant)
    store = open_store(state.config)
    details = {"name": name, "scope": scope}
    if not store.rm(name, tenant=tenant):
        exc = SecretsError(f'no secret "{name}" in scope {scope}',
                           hint="see lobsterd secrets list --all")
        _audit(state, "secrets.rm", tenant, details, exc)
        raise exc
    _audit(state, "secrets.rm", tenant, details)
    click.echo(f"removed {name} ({scope})")


COMMANDS: list[click.Command] = [secrets_group]
