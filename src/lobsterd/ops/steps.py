"""Ordered steps with undo: the shape of every operation that touches the host.

Each step's ``do`` runs in order; once it succeeds its ``undo`` is pushed. On any failure
(or KeyboardInterrupt) the pushed undos run in reverse, each one's own failure recorded
but not stopping the others, and the original error is re-raised with a note of how much
was undone. Undo functions must be idempotent: crash recovery (evict of a half-created
tenant) calls them again on state that may be partly gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from lobsterd.errors import LobsterError


class InjectedFault(LobsterError):
    """Raised by a StepRunner built with ``fault_after``: tests prove each undo path."""

    code = "INJECTED_FAULT"

T = TypeVar("T")

Progress = Callable[[str, str, float | None], None]
"""progress(step, detail, seconds_or_None): called before (None) and after each step."""


def no_progress(step: str, detail: str, seconds: float | None) -> None:
    return None


@dataclass
class StepRunner:
    progress: Progress = no_progress
    fault_after: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    undo_errors: list[str] = field(default_factory=list)

    def step(
        self,
        name: str,
        detail: str,
        do: Callable[[], T],
        undo: Callable[[], None] | None = None,
        *,
        undo_if_failed: bool = False,
    ) -> T:
        """Run one step. With ``undo_if_failed`` the undo is registered before ``do`` runs,
        for steps that can leave something behind even when they fail half-way."""
        self.progress(name, detail, None)
        start = time.monotonic()
        if undo is not None and undo_if_failed:
            self._undo.append((name, undo))
        result = do()
        elapsed = time.monotonic() - start
        self.timings[name] = self.timings.get(name, 0.0) + elapsed
        if undo is not None and not undo_if_failed:
            self._undo.append((name, undo))
        self.progress(name, detail, elapsed)
        if self.fault_after == name:
            raise InjectedFault(f"fault injected after step {name}")
        return result

    def on_rollback(self, name: str, undo: Callable[[], None]) -> None:
        """Register an undo for something done before the first step (e.g. a reservation)."""
        self._undo.append((name, undo))

    def rollback(self) -> tuple[int, int]:
        """Run pushed undos in reverse; returns (succeeded, total)."""
        total = len(self._undo)
        ok = 0
        while self._undo:
            name, fn = self._undo.pop()
            try:
                fn()
                ok += 1
            except Exception as exc:
                self.undo_errors.append(f"{name}: {exc}")
        return ok, total

    def commit(self) -> None:
        """Forget the undo stack: the operation succeeded."""
        self._undo.clear()


def annotate_rollback(exc: BaseException, done: int, total: int) -> BaseException:
    if isinstance(exc, LobsterError):
        exc.message = f"{exc.message} (rolled back {done}/{total} steps)"
    return exc
