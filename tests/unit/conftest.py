"""Fixtures shared by the doctor tests (a test module may override them)."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pytest

from lobsterd.doctor.faketree import FakeTree
from lobsterd.doctor.model import DoctorContext


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    """A fabricated /proc and /sys root of a well-hardened host."""
    return FakeTree(tmp_path / "root").hardened()


@pytest.fixture
def ctx() -> DoctorContext:
    return DoctorContext(trusted_uid=os.getuid(), trusted_gid=os.getgid(),
                         today=date(2026, 12, 3))
