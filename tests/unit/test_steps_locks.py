from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from lobsterd.errors import ExecFailed, TenantBusy
from lobsterd.ops.locks import is_locked, tenant_lock
from lobsterd.ops.steps import InjectedFault, StepRunner, annotate_rollback


def test_rollback_runs_in_reverse_and_survives_undo_errors() -> None:
    log: list[str] = []
    r = StepRunner()
    r.step("a", "", lambda: log.append("do a"), lambda: log.append("undo a"))
    r.step("b", "", lambda: log.append("do b"), lambda: (_ for _ in ()).throw(OSError("boom")))
    r.step("c", "", lambda: log.append("do c"), lambda: log.append("undo c"))
    done, total = r.rollback()
    assert (done, total) == (2, 3)
    assert log == ["do a", "do b", "do c", "undo c", "undo a"]
    assert r.undo_errors == ["b: boom"]


def test_fault_injection_registers_undo_first() -> None:
    log: list[str] = []
    r = StepRunner(fault_after="b")
    r.step("a", "", lambda: None, lambda: log.append("undo a"))
    with pytest.raises(InjectedFault) as exc:
        r.step("b", "", lambda: None, lambda: log.append("undo b"))
    done, total = r.rollback()
    annotate_rollback(exc.value, done, total)
    assert log == ["undo b", "undo a"]
    assert "(rolled back 2/2 steps)" in exc.value.message


def test_timings_recorded() -> None:
    r = StepRunner()
    r.step("sleep", "", lambda: time.sleep(0.01))
    assert r.timings["sleep"] >= 0.01


def _hold(lock_dir: str) -> None:
    with tenant_lock(Path(lock_dir), "t"):
        time.sleep(60)


def test_lock_excludes_other_process_and_dies_with_it(tmp_path: Path) -> None:
    p = mp.get_context("spawn").Process(target=_hold, args=(str(tmp_path),))
    p.start()
    try:
        deadline = time.monotonic() + 20
        while not is_locked(tmp_path, "t"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(TenantBusy), tenant_lock(tmp_path, "t"):
            pass
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        with tenant_lock(tmp_path, "t", wait_s=5):
            assert True
    finally:
        if p.is_alive():
            p.kill()


def test_proc_run_errors() -> None:
    from lobsterd.adapters.proc import run
    from lobsterd.errors import ExecTimeout

    assert run(["true"]).ok
    with pytest.raises(ExecFailed, match="exit 3"):
        run(["sh", "-c", "echo oops >&2; exit 3"])
    assert run(["false"], check=False).returncode == 1
    with pytest.raises(ExecTimeout):
        run(["sleep", "5"], timeout=0.2)
    with pytest.raises(ExecFailed, match="cannot execute"):
        run(["/nonexistent/binary"])


def test_undo_if_failed_cleans_a_half_done_step() -> None:
    log: list[str] = []
    r = StepRunner()

    def half_done() -> None:
        log.append("created something")
        raise OSError("then failed")

    with pytest.raises(OSError):
        r.step("vm", "", half_done, lambda: log.append("undo vm"), undo_if_failed=True)
    assert r.rollback() == (1, 1)
    assert log == ["created something", "undo vm"]
