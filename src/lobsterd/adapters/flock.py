"""Cross-process exclusion with ``flock``: the kernel drops the lock when its holder dies,
so a SIGKILLed process never leaves a stale lock behind (unlike a PID file)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lobsterd.errors import LobsterError


@contextmanager
def exclusive(
    path: Path,
    *,
    wait_s: float,
    on_timeout: Callable[[], LobsterError],
    interval_s: float = 0.05,
    mode: int = 0o600,
) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed) for the ``with`` block;
    raise ``on_timeout()`` when another holder keeps it longer than ``wait_s``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise on_timeout() from None
                time.sleep(interval_s)
        yield
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """True when some live process holds an flock on ``path``."""
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
