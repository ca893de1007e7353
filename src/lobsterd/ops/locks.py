"""One writer per tenant, across processes: an ``flock`` per tenant name.

The kernel drops an flock when its holder dies, so a SIGKILLed operation never leaves a
stale lock behind (unlike a PID file).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lobsterd.errors import TenantBusy


@contextmanager
def tenant_lock(lock_dir: Path, name: str, wait_s: float = 0.0) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TenantBusy(
                        f'tenant "{name}" is busy: another lobsterd operation is running on it',
                        hint="wait for it to finish and retry",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def is_locked(lock_dir: Path, name: str) -> bool:
    """True when some live process holds ``name``'s lock."""
    path = lock_dir / f"{name}.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
