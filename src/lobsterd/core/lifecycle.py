"""Tenant lifecycle as a transition table.

An operation moves a tenant through these states; anything not in the table is illegal
and raises without changing the tenant. ``creating`` and ``removing`` are durable so
that a crash mid-operation is visible and the next ``evict``/``spawn`` can finish or
undo it.
"""

from __future__ import annotations

from enum import StrEnum

from lobsterd.errors import IllegalTransition


class Status(StrEnum):
    CREATING = "creating"
    ACTIVE = "active"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    REMOVING = "removing"


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.ACTIVE, Status.REMOVING}),
    Status.ACTIVE: frozenset({Status.SUSPENDING, Status.REMOVING}),
    Status.SUSPENDING: frozenset({Status.SUSPENDED, Status.ACTIVE, Status.REMOVING}),
    Status.SUSPENDED: frozenset({Status.RESUMING, Status.REMOVING}),
    Status.RESUMING: frozenset({Status.ACTIVE, Status.SUSPENDED, Status.REMOVING}),
    Status.REMOVING: frozenset(),
}


def check_transition(name: str, current: Status, target: Status) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(
            f'tenant "{name}" is {current.value}; it cannot become {target.value}'
        )
