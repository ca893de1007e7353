"""Small filesystem helpers shared by the image builders.

Every builder writes into a temporary directory next to its target and publishes it with
one ``rename``: a crash leaves either the old complete result or a ``.tmp-*`` directory
that the next build removes, never a half-written artefact under the final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lobsterd.errors import ImageBuildFailed

Progress = Callable[[str, str], None]
"""``progress(stage, detail)``: called when a build stage starts or reports something."""

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def no_progress(stage: str, detail: str) -> None:
    """Default progress callback: says nothing."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def build_lock(path: Path, what: str, wait_s: float = 3600.0) -> Iterator[None]:
    """Serialise builders across processes (the lock dies with its holder)."""
    from lobsterd.adapters.flock import exclusive

    path.parent.mkdir(parents=True, exist_ok=True)

    def stuck() -> ImageBuildFailed:
        return ImageBuildFailed(
            f"another process has been building the {what} for too long",
            hint=f"check for a stuck lobsterd process holding {path}",
        )

    with exclusive(path, wait_s=wait_s, on_timeout=stuck, interval_s=0.2, mode=0o644):
        yield


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if present (idempotent)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def clean_stale_tmp(parent: Path) -> None:
    """Remove temporary build directories left behind by a crashed build.

    Callers hold the build lock, so no live build owns them.
    """
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            remove_tree(entry)


def new_tmp_dir(parent: Path, name: str, mode: int = 0o755) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{name}-{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir()
    tmp.chmod(mode)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a finished build to its final name, replacing a broken one."""
    if final.exists() or final.is_symlink():
        trash = final.parent / f"{TMP_PREFIX}trash-{final.name}-{os.getpid()}"
        remove_tree(trash)
        final.rename(trash)
        tmp.rename(final)
        remove_tree(trash)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (symlink to a temp name, then rename)."""
    tmp = link.parent / f"{TMP_PREFIX}{link.name}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
