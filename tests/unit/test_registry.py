from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from lobsterd.core.lifecycle import TRANSITIONS, Status
from lobsterd.errors import (
    CapacityExhausted,
    IllegalTransition,
    RegistryCorrupt,
    TenantExists,
    TenantNotFound,
    ValidationFailed,
)
from lobsterd.registry import Registry


def reg(path: Path, max_tenants: int = 100) -> Registry:
    return Registry(path / "r.db", pool="10.200.0.0/16", uid_start=200_000, max_tenants=max_tenants)


def test_reserve_allocates_and_reuses(tmp_path: Path) -> None:
    r = reg(tmp_path)
    a = r.reserve("a", "qemu", {})
    b = r.reserve("b", "qemu", {})
    assert (a.slot, b.slot) == (1, 2)
    assert (a.guest_ip, a.host_ip, a.uid, a.tap) == ("10.200.0.6", "10.200.0.5", 200_001, "lbt1")
    assert a.status is Status.CREATING
    r.delete("a")
    c = r.reserve("c", "qemu", {})
    assert c.slot == 1 and c.uid == 200_001  # evicted slot and uid are reused


def test_duplicate_and_unknown(tmp_path: Path) -> None:
    r = reg(tmp_path)
    r.reserve("a", "qemu", {})
    with pytest.raises(TenantExists):
        r.reserve("a", "qemu", {})
    with pytest.raises(TenantNotFound):
        r.get("zz")
    with pytest.raises(ValidationFailed):
        r.reserve("Bad", "qemu", {})
    assert [t.name for t in r.list()] == ["a"]


def test_exhaustion(tmp_path: Path) -> None:
    r = reg(tmp_path, max_tenants=2)
    r.reserve("a", "qemu", {})
    r.reserve("b", "qemu", {})
    with pytest.raises(CapacityExhausted):
        r.reserve("c", "qemu", {})


def test_transitions_checked_and_atomic(tmp_path: Path) -> None:
    r = reg(tmp_path)
    r.reserve("a", "qemu", {})
    with pytest.raises(IllegalTransition):
        r.transition("a", Status.SUSPENDED, vm_pid=5)
    assert r.get("a").status is Status.CREATING and r.get("a").vm_pid is None
    t = r.transition("a", Status.ACTIVE, vm_pid=42, runtime={"vm": {"pid": 42}})
    assert t.status is Status.ACTIVE and t.vm_pid == 42 and t.runtime == {"vm": {"pid": 42}}


def test_transition_table_is_closed() -> None:
    for src, targets in TRANSITIONS.items():
        assert src not in targets
    assert TRANSITIONS[Status.REMOVING] == frozenset()


def _spawn_many(args: tuple[str, int]) -> list[tuple[str, int, int]]:
    path, worker = args
    r = Registry(Path(path), pool="10.200.0.0/16", uid_start=200_000, max_tenants=1000)
    out = []
    for i in range(15):
        t = r.reserve(f"w{worker}-{i}", "qemu", {})
        out.append((t.name, t.slot, t.uid))
    return out


def test_parallel_processes_never_share_slots(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    reg(tmp_path).close()
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_spawn_many, [(str(db), w) for w in range(4)])
    rows = [row for chunk in results for row in chunk]
    assert len(rows) == 60
    assert len({s for _, s, _ in rows}) == 60
    assert len({u for _, _, u in rows}) == 60


def test_corrupt_registry_is_reported_not_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    with pytest.raises(RegistryCorrupt) as exc:
        Registry(db, pool="10.200.0.0/16", uid_start=200_000, max_tenants=10)
    assert str(db) in exc.value.message
    assert db.read_bytes() == before
