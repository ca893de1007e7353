from __future__ import annotations

from pathlib import Path

import pytest

from lobsterd.config import Config
from tests.helpers import make_config


@pytest.fixture
def tmp_config(tmp_path: Path) -> Config:
    return make_config(tmp_path)
