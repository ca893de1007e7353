from __future__ import annotations

import datetime as dt

from lobsterd.ops.certs import ROTATE_MARGIN, due

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def test_due_decisions() -> None:
    assert due(None, NOW)
    assert due("garbage", NOW)
    assert due((NOW + ROTATE_MARGIN).isoformat(), NOW)
    assert due((NOW - dt.timedelta(days=1)).isoformat(), NOW)
    assert not due((NOW + ROTATE_MARGIN + dt.timedelta(seconds=1)).isoformat(), NOW)
    assert not due((NOW + dt.timedelta(days=30)).replace(tzinfo=None).isoformat(), NOW)
