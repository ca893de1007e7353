"""One writer per tenant, across processes: an ``flock`` per tenant name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lobsterd.adapters.flock import exclusive, is_held
from lobsterd.errors import TenantBusy


@contextmanager
def tenant_lock(lock_dir: Path, name: str, wait_s: float = 0.0) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def busy() -> TenantBusy:
        return TenantBusy(
            f'tenant "{name}" is busy: another lobsterd operation is running on it',
            hint="wait for it to finish and retry",
        )

    with exclusive(lock_dir / f"{name}.lock", wait_s=wait_s, on_timeout=busy):
        yield


def is_locked(lock_dir: Path, name: str) -> bool:
    """True when some live process holds ``name``'s lock."""
    return is_held(lock_dir / f"{name}.lock")
