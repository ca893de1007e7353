"""The encrypted secrets store: provider keys and lobsterd's own per-tenant tokens.

One SQLite file (``cfg.paths.secrets_db``, mode 0600). Each row is ``(scope, name,
blob)`` where ``blob`` is the value sealed with AES-256-GCM under the "secrets" key
derived from the host master key, with ``scope || name`` as associated data: moving a
blob to another row, name or tenant makes it fail authentication, so even someone who
can write the database cannot hand one tenant's secret to another.

Scopes:

* ``host`` — operator secrets given to every tenant;
* ``tenant:<name>`` — operator secrets for one tenant; they override host secrets of the
  same name;
* ``internal:<name>`` — lobsterd's own per-tenant credentials (agent token, gateway
  token); never listed, never settable through ``lobsterd secrets``, never merged into
  what a tenant receives by :meth:`SecretStore.resolve_for_tenant`.

Operator secret names are environment-variable names (``^[A-Z][A-Z0-9_]{0,63}$``): in the
guest they become the gateway's environment. Names lobsterd itself injects are reserved.

The store records the master key's id when it is created and refuses any other key
with a clear :class:`MasterKeyError` before trying to decrypt anything.
"""

from __future__ import annotations

import builtins
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lobsterd.core.names import validate_name
from lobsterd.errors import DecryptionFailed, SecretsError, ValidationFailed
from lobsterd.security.crypto import MasterKey, open_, seal
from lobsterd.security.redact import register_secret

if TYPE_CHECKING:
    from lobsterd.config import Config

SCHEMA_VERSION = 1
MAX_VALUE_BYTES = 64 * 1024
HOST_SCOPE = "host"

NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}", re.ASCII)
_INTERNAL_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)

RESERVED_NAMES = frozenset({
    "OPENCLAW_GATEWAY_TOKEN",
    "OPENCLAW_CONFIG",
    "SSH_AUTHORIZED_KEY",
    "TLS_SERVER_CERT",
    "TLS_SERVER_KEY",
    "TLS_CLIENT_CA",
})
"""Names lobsterd injects itself (see docs/architecture.md, guest contract)."""

RESERVED_PREFIXES = ("LOBSTER",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
    scope       TEXT NOT NULL,
    name        TEXT NOT NULL,
    blob        BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (scope, name)
);
"""


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: never its value."""

    name: str
    scope: str
    updated_at: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "scope": self.scope, "updated_at": self.updated_at}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def validate_secret_name(name: str) -> str:
    """Return ``name`` if an operator may set it, else raise ValidationFailed."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        # The rejected text is not echoed: a value pasted where the name belongs is a
        # secret, and this message ends up on terminals and in logs.
        raise ValidationFailed(
            "invalid secret name: it must be 1-64 characters of A-Z, 0-9 and _, starting "
            "with a letter (it becomes an environment variable in the guest)"
        )
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        raise ValidationFailed(
            f'secret name "{name}" is reserved for lobsterd itself; choose another name'
        )
    return name


def _validate_value(value: str) -> bytes:
    if not isinstance(value, str):
        raise ValidationFailed("secret value must be text")
    if not value:
        raise ValidationFailed("secret value is empty")
    if "\x00" in value:
        raise ValidationFailed("secret value contains a NUL character")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationFailed("secret value is not valid UTF-8 text") from None
    if len(data) > MAX_VALUE_BYTES:
        raise ValidationFailed(
            f"secret value is {len(data)} bytes; the limit is {MAX_VALUE_BYTES}")
    return data


def tenant_scope(tenant: str | None) -> str:
    return HOST_SCOPE if tenant is None else f"tenant:{validate_name(tenant)}"


def internal_scope(tenant: str) -> str:
    return f"internal:{validate_name(tenant)}"


def _aad(scope: str, name: str) -> bytes:
    return b"lobsterd secret v1\x00" + scope.encode() + b"\x00" + name.encode()


class SecretStore:
    """Encrypted secrets, host-wide and per tenant. Safe to use from many processes."""

    def __init__(self, cfg: Config, master: MasterKey) -> None:
        self.path: Path = cfg.paths.secrets_db
        self._master = master
        self._key = master.derive("secrets")
        self._init_db()

    # -- plumbing --------------------------------------------------------------------

    def _prepare_file(self) -> None:
        """Create the database file 0600 before SQLite does (SQLite would use the umask)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise SecretsError(f"cannot open secrets store {self.path}: "
                               f"{exc.strerror or exc}", hint="run as root") from None
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise SecretsError(f"cannot open secrets store {self.path}: {exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise SecretsError(
                f"secrets store {self.path} is unreadable or corrupt: {exc}",
                hint="restore it from backup",
            ) from None
        finally:
            conn.close()

    def _init_db(self) -> None:
        self._prepare_file()
        with self._db(write=True) as db:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if "key_id" not in rows:
                db.execute("INSERT INTO meta VALUES ('key_id', ?)", (self._master.key_id,))
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                return
        self._master.check_key_id(rows["key_id"], f"secrets store {self.path}")
        if rows.get("schema") != str(SCHEMA_VERSION):
            raise SecretsError(
                f"secrets store {self.path} has schema {rows.get('schema')}, "
                f"this lobsterd understands {SCHEMA_VERSION}",
                hint="upgrade lobsterd",
            )

    def _put(self, scope: str, name: str, value: str) -> None:
        data = _validate_value(value)
        blob = seal(self._key, data, _aad(scope, name))
        now = _now()
        with self._db(write=True) as db:
            db.execute(
                "INSERT INTO secrets (scope, name, blob, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, name) "
                "DO UPDATE SET blob = excluded.blob, updated_at = excluded.updated_at",
                (scope, name, blob, now, now),
            )
        register_secret(value)

    def _open(self, scope: str, name: str, blob: bytes) -> str:
        try:
            value = open_(self._key, blob, _aad(scope, name)).decode("utf-8")
        except (DecryptionFailed, UnicodeDecodeError):
            raise SecretsError(
                f'secret "{name}" in scope {scope} failed authentication: the store was '
                "modified or is corrupt",
                hint="set the secret again, or restore the store from backup",
            ) from None
        register_secret(value)
        return value

    def _fetch(self, scope: str, name: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT blob FROM secrets WHERE scope = ? AND name = ?",
                             (scope, name)).fetchone()
        return None if row is None else self._open(scope, name, bytes(row[0]))

    def _delete(self, scopes: tuple[str, ...], name: str | None = None) -> int:
        marks = ",".join("?" * len(scopes))
        with self._db(write=True) as db:
            if name is None:
                cur = db.execute(f"DELETE FROM secrets WHERE scope IN ({marks})", scopes)  # noqa: S608
            else:
                cur = db.execute(
                    f"DELETE FROM secrets WHERE scope IN ({marks}) AND name = ?",  # noqa: S608
                    (*scopes, name))
            return cur.rowcount

    # -- operator secrets ------------------------------------------------------------

    def set(self, name: str, value: str, tenant: str | None = None) -> None:
        """Create or replace secret ``name`` host-wide (tenant None) or for ``tenant``."""
        self._put(tenant_scope(tenant), validate_secret_name(name), value)

    def get(self, name: str, tenant: str | None = None) -> str | None:
        """The value in exactly that scope (no fallback to host); None when absent."""
        return self._fetch(tenant_scope(tenant), validate_secret_name(name))

    def rm(self, name: str, tenant: str | None = None) -> bool:
        """Delete ``name`` from that scope; False when it was not there."""
        return self._delete((tenant_scope(tenant),), validate_secret_name(name)) > 0

    def list(self, tenant: str | None = None, *, all_scopes: bool = False,
             ) -> builtins.list[SecretInfo]:
        """Names and scopes (never values): host scope, one tenant's, or every scope."""
        with self._db() as db:
            if all_scopes:
                rows = db.execute(
                    "SELECT name, scope, updated_at FROM secrets WHERE scope = 'host' "
                    "OR scope LIKE 'tenant:%' ORDER BY scope = 'host' DESC, scope, name"
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT name, scope, updated_at FROM secrets WHERE scope = ? "
                    "ORDER BY name", (tenant_scope(tenant),)).fetchall()
        return [SecretInfo(str(n), str(s), str(u)) for n, s, u in rows]

    def resolve_for_tenant(self, tenant: str) -> dict[str, str]:
        """Everything ``tenant`` receives: host secrets overridden by its own.

        Only the ``host`` and ``tenant:<tenant>`` scopes are read, and each blob is
        authenticated against its own scope, so no other tenant's value can appear.
        """
        own = tenant_scope(tenant)
        with self._db() as db:
            rows = db.execute(
                "SELECT scope, name, blob FROM secrets WHERE scope IN ('host', ?)",
                (own,)).fetchall()
        merged: dict[str, str] = {}
        for scope, name, blob in sorted(rows, key=lambda r: r[0] == own):
            if name in RESERVED_NAMES:
                continue
            merged[str(name)] = self._open(str(scope), str(name), bytes(blob))
        return merged

    def drop_tenant(self, tenant: str) -> int:
        """Forget every secret of ``tenant`` (its own and lobsterd's); idempotent."""
        return self._delete((tenant_scope(tenant), internal_scope(tenant)))

    # -- lobsterd's own per-tenant credentials ----------------------------------------

    @staticmethod
    def _internal_key(key: str) -> str:
        if not isinstance(key, str) or not _INTERNAL_KEY_RE.fullmatch(key):
            raise ValidationFailed("internal secret key must match [a-z][a-z0-9_]{0,63}")
        return key

    def set_internal(self, tenant: str, key: str, value: str) -> None:
        self._put(internal_scope(tenant), self._internal_key(key), value)

    def get_internal(self, tenant: str, key: str) -> str:
        value = self._fetch(internal_scope(tenant), self._internal_key(key))
        if value is None:
            raise SecretsError(
                f'internal secret "{key}" of tenant "{tenant}" is missing',
                hint="the tenant's state is incomplete: evict it and spawn it again",
            )
        return value

    def drop_internal(self, tenant: str, key: str | None = None) -> None:
        """Forget lobsterd's credentials of ``tenant`` (one key or all); idempotent.

        Returns nothing so that it can serve directly as a step's undo.
        """
        scope = internal_scope(tenant)
        if key is None:
            self._delete((scope,))
        else:
            self._delete((scope,), self._internal_key(key))


def open_store(cfg: Config) -> SecretStore:
    """The store with the host's master key; a missing key says to run ``lobsterd init``."""
    return SecretStore(cfg, MasterKey.load(cfg))
