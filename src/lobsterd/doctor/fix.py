"""Applying doctor's fixes: runtime writes now, boot-time files for later.

Only what a check put in its ``actions`` is ever done, and never a reboot. Boot-time
settings go to files lobsterd owns outright (one per mechanism), rewritten whole and
atomically, so applying the same fix twice changes nothing and removing the file undoes
it. Each action's outcome is reported; one failing action does not stop the others.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

from lobsterd.doctor.host import HostView
from lobsterd.doctor.model import (
    CheckResult,
    FixAction,
    FixOutcome,
    Persist,
    PersistKind,
    RunCommand,
    SetValue,
    Status,
)

PERSIST_FILES: dict[PersistKind, str] = {
    PersistKind.SYSCTL: "/etc/sysctl.d/90-lobsterd.conf",
    PersistKind.MODPROBE: "/etc/modprobe.d/lobsterd-kvm.conf",
    PersistKind.TMPFILES: "/etc/tmpfiles.d/lobsterd.conf",
    PersistKind.MODULES_LOAD: "/etc/modules-load.d/lobsterd.conf",
}
_HEADER = ("# Written by `lobsterd doctor --fix`: host hardening for lobsterd.\n"
           "# Keys set here are rewritten by the next --fix; delete the file to undo.\n")
_FSTAB_MARK = "#lobsterd-doctor-swapoff# "


def render_entry(kind: PersistKind, key: str, value: str) -> str:
    if kind == PersistKind.SYSCTL:
        return f"{key} = {value}"
    if kind == PersistKind.MODPROBE:
        module, _, param = key.partition(".")
        return f"options {module} {param}={value}"
    if kind == PersistKind.TMPFILES:
        return f"w {key} - - - - {value}"
    return key


def parse_entries(kind: PersistKind, text: str) -> dict[str, str]:
    """Key → value of a file written by :func:`render_file` (comments ignored)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if kind == PersistKind.SYSCTL:
            key, sep, val = line.partition("=")
            if sep:
                out[key.strip()] = val.strip()
        elif kind == PersistKind.MODPROBE:
            words = line.split()
            if len(words) >= 3 and words[0] == "options":
                for opt in words[2:]:
                    param, _, val = opt.partition("=")
                    out[f"{words[1]}.{param}"] = val
        elif kind == PersistKind.TMPFILES:
            words = line.split(None, 6)
            if len(words) >= 2 and words[0] == "w":
                out[words[1]] = words[6] if len(words) == 7 else ""
        else:
            out[line] = ""
    return out


def render_file(kind: PersistKind, entries: dict[str, str]) -> str:
    lines = [_HEADER]
    if kind == PersistKind.MODPROBE:
        modules: dict[str, list[str]] = {}
        for key in sorted(entries):
            module, _, param = key.partition(".")
            modules.setdefault(module, []).append(f"{param}={entries[key]}")
        lines += [f"options {m} {' '.join(opts)}\n" for m, opts in sorted(modules.items())]
    else:
        lines += [render_entry(kind, k, entries[k]) + "\n" for k in sorted(entries)]
    return "".join(lines)


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def persist(persist_root: Path, action: Persist) -> str:
    """Merge one setting into its file; returns the file's host path."""
    rel = PERSIST_FILES[action.kind]
    path = persist_root / rel.lstrip("/")
    try:
        entries = parse_entries(action.kind, path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        entries = {}
    if entries.get(action.key) == action.value and path.exists():
        return rel
    entries[action.key] = action.value
    _atomic_write(path, render_file(action.kind, entries))
    return rel


def disable_fstab_swap(persist_root: Path) -> int:
    """Comment out swap entries that are neither zram nor /dev/mapper (dm-crypt) ones."""
    path = persist_root / "etc/fstab"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    out, changed = [], 0
    for line in text.splitlines(keepends=True):
        words = line.split()
        if (len(words) >= 3 and not words[0].startswith("#") and words[2] == "swap"
                and not words[0].startswith(("/dev/mapper/", "/dev/zram"))):
            out.append(_FSTAB_MARK + line)
            changed += 1
        else:
            out.append(line)
    if changed:
        _atomic_write(path, "".join(out))
    return changed


def apply_action(  # noqa: PLR0911 - one early return per action type and failure
    host: HostView, persist_root: Path, action: FixAction
) -> tuple[bool, str]:
    if isinstance(action, SetValue):
        before = host.value(action.path)
        try:
            host.write(action.path, action.value)
        except OSError as exc:
            return False, f"cannot write {action.path}: {exc.strerror or exc}"
        return True, f"{action.path}: {before} -> {host.value(action.path)}"
    if isinstance(action, Persist):
        try:
            rel = persist(persist_root, action)
        except OSError as exc:
            return False, f"cannot write {PERSIST_FILES[action.kind]}: {exc.strerror or exc}"
        return True, f"{rel}: {render_entry(action.kind, action.key, action.value)}"
    if isinstance(action, RunCommand):
        res = host.run(list(action.argv), action.timeout)
        if res is None:
            return False, f"cannot run {action.argv[0]}"
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()
            return False, f"exit {res.returncode}: {tail[-1] if tail else ''}"
        return True, "done"
    try:
        n = disable_fstab_swap(persist_root)
    except OSError as exc:
        return False, f"cannot edit /etc/fstab: {exc.strerror or exc}"
    return True, f"/etc/fstab: {n} swap line(s) commented out"


def apply_fixes(
    host: HostView,
    persist_root: Path,
    results: Iterable[CheckResult],
    opt_ins: Collection[str] = (),
) -> list[FixOutcome]:
    """Apply the actions of every result that is not PASS (SKIP is left alone too)."""
    outcomes: list[FixOutcome] = []
    for res in results:
        if res.status in {Status.PASS, Status.SKIP} or not res.actions:
            continue
        if res.opt_in and res.opt_in not in opt_ins:
            outcomes.append(FixOutcome(res.id, "; ".join(a.describe() for a in res.actions),
                                       False, f"not applied: needs --fix-{res.opt_in}"))
            continue
        for action in res.actions:
            ok, detail = apply_action(host, persist_root, action)
            outcomes.append(FixOutcome(res.id, action.describe(), ok, detail))
    return outcomes
