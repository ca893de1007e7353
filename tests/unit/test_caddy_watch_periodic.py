from __future__ import annotations

import threading
import time

from lobsterd.adapters.caddy_watch import periodic


def test_periodic_runs_until_stopped_and_survives_failures() -> None:
    calls: list[float] = []
    logged: list[str] = []
    stop = threading.Event()

    def job() -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("boom")
        if len(calls) >= 4:
            stop.set()

    t = threading.Thread(target=periodic, args=(stop, 0.02, job, logged.append))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert len(calls) == 4  # the failure did not end the loop; the stop did
    assert logged == ["periodic job failed: RuntimeError: boom"]


def test_periodic_does_not_run_before_the_first_period() -> None:
    stop = threading.Event()
    stop.set()
    ran: list[int] = []
    periodic(stop, 0.01, lambda: ran.append(1), print)
    assert ran == []
