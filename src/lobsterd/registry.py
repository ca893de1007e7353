"""The tenant registry: one SQLite database in WAL mode.

Allocation (slot → /30 and uid) happens inside a single ``BEGIN IMMEDIATE`` transaction,
so concurrent ``spawn``s in different processes can never receive the same address or
uid. Rows are updated field by field in short transactions, so no process ever writes
back a stale copy of the whole registry. Secrets never live here.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lobsterd.core import alloc
from lobsterd.core.lifecycle import Status, check_transition
from lobsterd.core.names import tap_name, validate_name, vm_id
from lobsterd.errors import RegistryCorrupt, TenantExists, TenantNotFound

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    name        TEXT PRIMARY KEY,
    slot        INTEGER NOT NULL UNIQUE,
    uid         INTEGER NOT NULL UNIQUE,
    status      TEXT NOT NULL,
    vm_pid      INTEGER,
    vmm         TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    spec        TEXT NOT NULL DEFAULT '{}',
    runtime     TEXT NOT NULL DEFAULT '{}'
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Tenant:
    name: str
    slot: int
    uid: int
    status: Status
    vm_pid: int | None
    vmm: str
    created_at: str
    updated_at: str
    guest_ip: str
    host_ip: str
    spec: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def gid(self) -> int:
        return self.uid

    @property
    def tap(self) -> str:
        return tap_name(self.slot)

    @property
    def vm_id(self) -> str:
        return vm_id(self.slot)

    def public_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "slot": self.slot,
            "ip": self.guest_ip,
            "host_ip": self.host_ip,
            "tap": self.tap,
            "uid": self.uid,
            "vmm": self.vmm,
            "vm_pid": self.vm_pid,
            "created_at": self.created_at,
        }


class Registry:
    def __init__(self, path: Path, pool: str, uid_start: int, max_tenants: int) -> None:
        self.path = path
        self._pool = alloc.parse_pool(pool)
        self._uid_start = uid_start
        self._limit = min(max_tenants, alloc.max_slot(self._pool))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row["value"]) > SCHEMA_VERSION:
                raise RegistryCorrupt(
                    f"registry {self.path} has schema {row['value']}, newer than this "
                    f"lobsterd understands ({SCHEMA_VERSION})",
                    hint="upgrade lobsterd",
                )
        except sqlite3.DatabaseError as exc:
            raise RegistryCorrupt(
                f"registry {self.path} is unreadable: {exc}",
                hint="restore it from a backup; lobsterd will not overwrite it",
            ) from None
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        return db

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: takes the write lock up front, so reads inside it
        see a state no other writer can change before commit."""
        for attempt in range(200):
            try:
                self._db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.05)
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _row_to_tenant(self, row: sqlite3.Row) -> Tenant:
        try:
            addrs = alloc.slot_addresses(self._pool, int(row["slot"]))
            return Tenant(
                name=row["name"],
                slot=int(row["slot"]),
                uid=int(row["uid"]),
                status=Status(row["status"]),
                vm_pid=row["vm_pid"],
                vmm=row["vmm"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                guest_ip=str(addrs.guest_ip),
                host_ip=str(addrs.host_ip),
                spec=json.loads(row["spec"]),
                runtime=json.loads(row["runtime"]),
            )
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            raise RegistryCorrupt(
                f"registry {self.path}: tenant row {row['name']!r} is invalid: {exc}"
            ) from None

    # -- reads ---------------------------------------------------------------------

    def list(self) -> list[Tenant]:
        rows = self._db.execute("SELECT * FROM tenants ORDER BY slot").fetchall()
        return [self._row_to_tenant(r) for r in rows]

    def find(self, name: str) -> Tenant | None:
        row = self._db.execute("SELECT * FROM tenants WHERE name=?", (name,)).fetchone()
        return None if row is None else self._row_to_tenant(row)

    def get(self, name: str) -> Tenant:
        tenant = self.find(name)
        if tenant is None:
            raise TenantNotFound(f'tenant "{name}" not found', hint="lobsterd tank lists tenants")
        return tenant

    # -- writes --------------------------------------------------------------------

    def reserve(self, name: str, vmm: str, spec: dict[str, Any]) -> Tenant:
        """Insert a ``creating`` row with the lowest free slot and its uid, atomically."""
        validate_name(name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM tenants WHERE name=?", (name,)).fetchone():
                raise TenantExists(f'tenant "{name}" already exists')
            used = {int(r[0]) for r in db.execute("SELECT slot FROM tenants")}
            slot = alloc.lowest_free_slot(used, self._limit)
            uid = alloc.uid_for_slot(self._uid_start, slot)
            now = _now()
            db.execute(
                "INSERT INTO tenants(name, slot, uid, status, vm_pid, vmm, created_at,"
                " updated_at, spec, runtime) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (name, slot, uid, Status.CREATING.value, None, vmm, now, now,
                 json.dumps(spec, sort_keys=True), "{}"),
            )
        return self.get(name)

    def transition(self, name: str, target: Status, **fields: Any) -> Tenant:
        """Move ``name`` to ``target`` (checked against the lifecycle table) and set
        ``vm_pid``/``runtime`` in the same transaction."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM tenants WHERE name=?", (name,)).fetchone()
            if row is None:
                raise TenantNotFound(f'tenant "{name}" not found')
            current = Status(row["status"])
            if current != target:
                check_transition(name, current, target)
            self._update(db, name, status=target.value, **fields)
        return self.get(name)

    def update(self, name: str, **fields: Any) -> Tenant:
        with self._tx() as db:
            self._update(db, name, **fields)
        return self.get(name)

    def _update(self, db: sqlite3.Connection, name: str, **fields: Any) -> None:
        allowed = {"status", "vm_pid", "runtime", "spec"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update {sorted(bad)}")
        cols = []
        vals: list[Any] = []
        for key, value in fields.items():
            cols.append(f"{key}=?")
            vals.append(json.dumps(value, sort_keys=True) if key in {"runtime", "spec"} else value)
        cols.append("updated_at=?")
        vals.append(_now())
        vals.append(name)
        cur = db.execute(f"UPDATE tenants SET {', '.join(cols)} WHERE name=?", vals)  # noqa: S608
        if cur.rowcount == 0:
            raise TenantNotFound(f'tenant "{name}" not found')

    def delete(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM tenants WHERE name=?", (name,))


def open_registry(cfg: Any) -> Registry:
    """Open the registry described by a :class:`lobsterd.config.Config`."""
    return Registry(
        cfg.paths.registry,
        pool=cfg.network.pool,
        uid_start=cfg.users.uid_start,
        max_tenants=cfg.network.max_tenants,
    )
