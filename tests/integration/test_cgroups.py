"""Real cgroups on this host (v1 here; v2 path logic is in tests/unit/test_cgroups_paths.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lobsterd.adapters.cgroups import CGROUP_ROOT, Cgroup, detect_layout
from lobsterd.errors import CgroupError
from tests.helpers import need, need_root

pytestmark = pytest.mark.integration
MIB = 1 << 20


def _usable() -> bool:
    try:
        detect_layout()
    except CgroupError:
        return False
    return True


@pytest.fixture
def leaf() -> Iterator[str]:
    need_root()
    need(_usable(), "needs cgroups with memory, cpu and pids controllers")
    name = f"tenant-test-{uuid.uuid4().hex[:8]}"
    yield name
    cg = Cgroup.open(name)
    try:
        cg.kill_all(timeout_s=5)
    finally:
        cg.remove(timeout_s=5)


def _sleeper(cg: Cgroup | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=cg.enter_fn() if cg else None,  # noqa: PLW1509
        stdin=subprocess.DEVNULL,
    )


def _own_cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def test_create_applies_limits(leaf: str) -> None:
    cg = Cgroup.create(leaf, 640 * MIB, 150_000, 100_000, 77)
    layout = cg.layout
    if layout.version == 1:
        mem = CGROUP_ROOT / "memory" / "lobsterd" / leaf
        assert int((mem / "memory.limit_in_bytes").read_text()) == 640 * MIB
        if (mem / "memory.memsw.limit_in_bytes").exists():
            assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 640 * MIB
        cpu = CGROUP_ROOT / "cpu" / "lobsterd" / leaf
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "150000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (CGROUP_ROOT / "pids" / "lobsterd" / leaf / "pids.max").read_text().strip() == "77"
    else:
        d = CGROUP_ROOT / "lobsterd" / leaf
        assert (d / "cpu.max").read_text().strip() == "150000 100000"
    # idempotent, and limits can be raised and lowered (memsw ordering)
    Cgroup.create(leaf, 900 * MIB, 150_000, 100_000, 77)
    assert cg.stats().memory_limit_bytes == 900 * MIB
    Cgroup.create(leaf, 300 * MIB, 150_000, 100_000, 77)
    assert cg.stats().memory_limit_bytes == 300 * MIB


def test_process_starts_inside_and_is_killed(leaf: str) -> None:
    cg = Cgroup.create(leaf, 256 * MIB, 100_000, 100_000, 32)
    proc = _sleeper(cg)
    try:
        assert cg.pids() == [proc.pid]
        assert f"/lobsterd/{leaf}" in _own_cgroups(proc.pid)
        st = cg.stats()
        assert st.pids == 1
        assert st.memory_bytes and st.memory_bytes > 0
        with pytest.raises(CgroupError, match="still has processes"):
            cg.remove(timeout_s=0.2)
        assert cg.exists()
        cg.kill_all()
        assert proc.wait(timeout=5) == -9
        assert cg.pids() == []
        cg.remove()
        assert not cg.exists()
        cg.remove()  # idempotent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_add_pid_moves_a_running_process(leaf: str) -> None:
    cg = Cgroup.create(leaf, 256 * MIB, 100_000)
    proc = _sleeper()
    try:
        assert proc.pid not in cg.pids()
        cg.add_pid(proc.pid)
        assert cg.pids() == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_pids_limit_is_enforced(leaf: str) -> None:
    cg = Cgroup.create(leaf, 256 * MIB, 100_000, 100_000, 3)
    code = (
        "import os, sys\n"
        "kids = []\n"
        "for i in range(6):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        print(len(kids)); sys.stdout.flush(); break\n"
        "    if pid == 0:\n"
        "        import time; time.sleep(30); os._exit(0)\n"
        "    kids.append(pid)\n"
        "else:\n"
        "    print('unlimited')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            preexec_fn=cg.enter_fn())  # noqa: PLW1509
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line == "2"  # parent + 2 children = 3 tasks
    finally:
        cg.kill_all()
        proc.wait(timeout=5)


def test_cpu_quota_is_enforced(leaf: str) -> None:
    """A busy loop under a 20% quota gets about 0.2 s of CPU per wall second."""
    cg = Cgroup.create(leaf, 256 * MIB, 20_000, 100_000)
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=cg.enter_fn())  # noqa: PLW1509
    try:
        time.sleep(0.3)
        before, t0 = cg.stats().cpu_seconds, time.monotonic()
        time.sleep(1.0)
        after, t1 = cg.stats().cpu_seconds, time.monotonic()
        assert before is not None and after is not None
        share = (after - before) / (t1 - t0)
        assert 0.0 < share < 0.35, share  # the ceiling is the point; a busy host may starve it
    finally:
        cg.kill_all()
        proc.wait(timeout=5)


def test_remove_of_missing_cgroup_is_noop() -> None:
    need_root()
    need(_usable(), "needs cgroups")
    cg = Cgroup.open(f"tenant-never-{os.getpid()}")
    assert not cg.exists()
    cg.remove()
    assert cg.pids() == []


def test_memory_limit_is_enforced(leaf: str) -> None:
    cg = Cgroup.create(leaf, 48 * MIB, 100_000)
    proc = subprocess.Popen(
        [sys.executable, "-c", "b = bytearray(200 * 1024 * 1024); print('survived')"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=cg.enter_fn())  # noqa: PLW1509
    out, _ = proc.communicate(timeout=30)
    assert b"survived" not in out
    assert proc.returncode != 0
