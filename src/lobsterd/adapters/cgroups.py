"""Per-tenant cgroups (v1 and v2): memory, CPU and task limits for each VMM process.

Every tenant's VMM runs in a leaf ``tenant-<name>`` under lobsterd's own parent cgroup
``lobsterd``, so one tenant cannot starve the host or another tenant, and all of a
tenant's processes can be found, counted and killed through one directory.

* v2 (unified, the norm on production hosts): ``<root>/lobsterd/<leaf>`` with
  ``memory.max`` (+ ``memory.swap.max = 0``), ``cpu.max = "<quota> <period>"``,
  ``pids.max``; the controllers are enabled in the root's and the parent's
  ``cgroup.subtree_control``.
* v1 (one hierarchy per controller, as on hosts without systemd):
  ``<root>/<controller>/lobsterd/<leaf>`` for memory (``memory.limit_in_bytes`` and the
  same value for ``memory.memsw.limit_in_bytes`` when swap accounting exists, so swap
  cannot extend the limit), cpu (``cpu.cfs_period_us`` / ``cpu.cfs_quota_us``), pids
  (``pids.max``) and, when mounted, cpuacct (CPU usage statistics).

The root is a parameter so that the v2 path logic can be tested against a fabricated
directory tree on a v1 host (and the other way round).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lobsterd.errors import CgroupError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "lobsterd"
V1_REQUIRED = ("memory", "cpu", "pids")
V1_OPTIONAL = ("cpuacct",)
V2_REQUIRED = ("memory", "cpu", "pids")
_LEAF_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}", re.ASCII)
_POLL_S = 0.02


@dataclass(frozen=True)
class CgroupLayout:
    """Which cgroup version the host runs and where each controller lives."""

    version: int  # 1 or 2
    root: Path
    controllers: tuple[str, ...]

    def parent_dirs(self) -> dict[str, Path]:
        """controller -> lobsterd's parent directory (v2: one entry, key ``""``)."""
        if self.version == 2:
            return {"": self.root / PARENT}
        return {c: self.root / c / PARENT for c in self.controllers}

    def leaf_dirs(self, leaf: str) -> dict[str, Path]:
        return {c: d / check_leaf(leaf) for c, d in self.parent_dirs().items()}


@dataclass(frozen=True)
class CgroupStats:
    memory_bytes: int | None
    memory_limit_bytes: int | None
    cpu_seconds: float | None
    pids: int


def check_leaf(leaf: str) -> str:
    """A leaf name is one path component of lower-case letters, digits, ``-``, ``_``."""
    if not isinstance(leaf, str) or not _LEAF_RE.fullmatch(leaf):
        raise CgroupError(f"invalid cgroup name {leaf!r}: one lower-case path component")
    return leaf


def detect_layout(root: Path = CGROUP_ROOT) -> CgroupLayout:
    """v2 when ``root`` is a unified hierarchy (it has ``cgroup.controllers``), else v1.

    A hybrid host (v1 controllers plus an empty cgroup2 at ``unified/``) is v1: the
    resource controllers are where the limits must go.
    """
    controllers_file = root / "cgroup.controllers"
    if controllers_file.is_file():
        try:
            available = tuple(controllers_file.read_text().split())
        except OSError as exc:
            raise CgroupError(f"cannot read {controllers_file}: {exc.strerror or exc}") from None
        missing = [c for c in V2_REQUIRED if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {root} lacks the {', '.join(missing)} controller(s)",
                hint="enable them (systemd: Delegate=, or cgroup_enable= on the kernel line)",
            )
        return CgroupLayout(2, root, available)
    present = tuple(
        c for c in V1_REQUIRED + V1_OPTIONAL if (root / c / "cgroup.procs").is_file()
    )
    missing = [c for c in V1_REQUIRED if c not in present]
    if missing:
        raise CgroupError(
            f"no usable cgroups at {root}: the {', '.join(missing)} controller(s) are not "
            "mounted (neither cgroup v2 nor v1)",
            hint="mount cgroup2 at /sys/fs/cgroup, or the v1 controllers under it",
        )
    return CgroupLayout(1, root, present)


def _write(path: Path, value: str) -> None:
    try:
        with path.open("w") as fh:
            fh.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def limit_writes(
    layout: CgroupLayout,
    leaf: str,
    *,
    mem_bytes: int,
    cpu_quota_us: int,
    cpu_period_us: int,
    pids_max: int,
    has_memsw: bool,
    has_swap_max: bool,
) -> list[tuple[Path, str]]:
    """The (file, value) writes that apply the limits, in the order they must happen."""
    if mem_bytes < 16 << 20:
        raise CgroupError(f"memory limit {mem_bytes} bytes is below 16 MiB")
    if not 1000 <= cpu_period_us <= 1_000_000 or cpu_quota_us < 1000:
        raise CgroupError(
            f"cpu quota/period {cpu_quota_us}/{cpu_period_us} us out of range "
            "(period 1000..1000000, quota >= 1000)"
        )
    if pids_max < 1:
        raise CgroupError(f"pids_max {pids_max} must be >= 1")
    dirs = layout.leaf_dirs(leaf)
    if layout.version == 2:
        d = dirs[""]
        out = [(d / "memory.max", str(mem_bytes))]
        if has_swap_max:
            out.append((d / "memory.swap.max", "0"))
        out += [
            (d / "cpu.max", f"{cpu_quota_us} {cpu_period_us}"),
            (d / "pids.max", str(pids_max)),
        ]
        return out
    mem, cpu, pids = dirs["memory"], dirs["cpu"], dirs["pids"]
    out = [(mem / "memory.limit_in_bytes", str(mem_bytes))]
    if has_memsw:
        out.append((mem / "memory.memsw.limit_in_bytes", str(mem_bytes)))
    out += [
        (cpu / "cpu.cfs_period_us", str(cpu_period_us)),
        (cpu / "cpu.cfs_quota_us", str(cpu_quota_us)),
        (pids / "pids.max", str(pids_max)),
    ]
    return out


class Cgroup:
    """One tenant's leaf cgroup (in every v1 hierarchy, or the single v2 one)."""

    def __init__(self, leaf: str, layout: CgroupLayout) -> None:
        self.leaf = check_leaf(leaf)
        self.layout = layout
        dirs = layout.leaf_dirs(leaf)
        self.dirs = dirs
        # Co-mounted v1 controllers (cpu,cpuacct) resolve to one directory: act once.
        unique: dict[str, Path] = {}
        for path in dirs.values():
            unique.setdefault(os.path.realpath(path), path)
        self._unique = list(unique.values())

    @classmethod
    def open(cls, leaf: str, *, root: Path = CGROUP_ROOT) -> Cgroup:
        """The cgroup ``leaf`` whether or not it exists (for stop/stats/remove)."""
        return cls(leaf, detect_layout(root))

    @classmethod
    def create(
        cls,
        name: str,
        mem_bytes: int,
        cpu_quota_us: int,
        cpu_period_us: int = 100_000,
        pids_max: int = 512,
        *,
        root: Path = CGROUP_ROOT,
    ) -> Cgroup:
        """Create (or re-apply the limits of) the leaf ``name``; idempotent."""
        cg = cls.open(name, root=root)
        cg._ensure_parents()
        for d in cg._unique:
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup {d}: {exc.strerror or exc}") from None
        cg.set_limits(mem_bytes, cpu_quota_us, cpu_period_us, pids_max)
        return cg

    def _ensure_parents(self) -> None:
        layout = self.layout
        for parent in layout.parent_dirs().values():
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(
                    f"cannot create cgroup {parent}: {exc.strerror or exc}"
                ) from None
        if layout.version == 2:
            enable = " ".join(f"+{c}" for c in V2_REQUIRED)
            for d in (layout.root, layout.root / PARENT):
                current = (_read(d / "cgroup.subtree_control") or "").split()
                if not all(c in current for c in V2_REQUIRED):
                    _write(d / "cgroup.subtree_control", enable)

    def set_limits(
        self, mem_bytes: int, cpu_quota_us: int, cpu_period_us: int, pids_max: int
    ) -> None:
        mem_dir = self.dirs["" if self.layout.version == 2 else "memory"]
        writes = limit_writes(
            self.layout,
            self.leaf,
            mem_bytes=mem_bytes,
            cpu_quota_us=cpu_quota_us,
            cpu_period_us=cpu_period_us,
            pids_max=pids_max,
            has_memsw=(mem_dir / "memory.memsw.limit_in_bytes").exists(),
            has_swap_max=(mem_dir / "memory.swap.max").exists(),
        )
        if self.layout.version == 1:
            # memsw must stay >= the memory limit: when raising, memsw goes first.
            current = _read_int(mem_dir / "memory.limit_in_bytes")
            if current is not None and mem_bytes > current:
                writes.sort(key=lambda w: w[0].name != "memory.memsw.limit_in_bytes")
        for path, value in writes:
            _write(path, value)

    # --- processes ---------------------------------------------------------------------

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self._unique]

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` (the whole thread group) into this cgroup, in every hierarchy."""
        for path in self.procs_files():
            _write(path, str(pid))

    def enter_fn(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into this cgroup before it execs.

        Every allocation of the new process is then charged to the tenant from its first
        page on. The function only makes raw system calls (no locks, no imports), as
        code between fork and exec must.
        """
        paths = [os.fsencode(p) for p in self.procs_files()]

        def enter() -> None:
            pid = str(os.getpid()).encode()
            for path in paths:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        return enter

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.procs_files():
            text = _read(path)
            if text:
                found.update(int(x) for x in text.split())
        return sorted(found)

    def exists(self) -> bool:
        return any(d.is_dir() for d in self._unique)

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty (bounded)."""
        kill_file = self.dirs.get("", Path("/nonexistent")) / "cgroup.kill"
        if self.layout.version == 2 and kill_file.exists():
            _write(kill_file, "1")
        deadline = time.monotonic() + timeout_s
        me = os.getpid()
        while True:
            pids = [p for p in self.pids() if p != me]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {self.leaf} still has processes {pids} after SIGKILL"
                )
            time.sleep(_POLL_S)

    def remove(self, timeout_s: float = 10.0) -> None:
        """Wait for the cgroup to empty, then delete it everywhere; idempotent.

        The parent ``lobsterd`` cgroup stays: other tenants live in it.
        """
        deadline = time.monotonic() + timeout_s
        while self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {self.leaf} still has processes {self.pids()}",
                    hint="stop the VM first (lobsterd evict kills it)",
                )
            time.sleep(_POLL_S)
        for d in self._unique:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY while the last task is still exiting: retry until the deadline.
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(
                            f"cannot remove cgroup {d}: {exc.strerror or exc}"
                        ) from None
                    time.sleep(_POLL_S)

    # --- statistics --------------------------------------------------------------------

    def stats(self) -> CgroupStats:
        pids = len(self.pids())
        if self.layout.version == 2:
            d = self.dirs[""]
            cpu: float | None = None
            for line in (_read(d / "cpu.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec" and value.strip().isdigit():
                    cpu = int(value) / 1e6
            return CgroupStats(
                memory_bytes=_read_int(d / "memory.current"),
                memory_limit_bytes=_read_int(d / "memory.max"),
                cpu_seconds=cpu,
                pids=pids,
            )
        mem = self.dirs["memory"]
        usage_ns = _read_int(self.dirs["cpuacct"] / "cpuacct.usage") if (
            "cpuacct" in self.dirs
        ) else None
        return CgroupStats(
            memory_bytes=_read_int(mem / "memory.usage_in_bytes"),
            memory_limit_bytes=_read_int(mem / "memory.limit_in_bytes"),
            cpu_seconds=usage_ns / 1e9 if usage_ns is not None else None,
            pids=pids,
        )
