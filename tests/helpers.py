"""Test helpers shared by every tier.

A test that needs root, a binary or a VM calls one of the ``need_*`` helpers: outside CI
it skips with the reason printed; under CI (``CI=true``) it fails, because CI installs
everything and nothing may be skipped there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lobsterd.config import Config

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    if os.geteuid() != 0:
        _unavailable("needs root")


def need_binary(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        _unavailable(f"needs {', '.join(missing)} on PATH (scripts/install.sh installs it)")


def need(condition: bool, reason: str) -> None:
    if not condition:
        _unavailable(reason)


def make_config(root: Path, **sections: dict[str, object]) -> Config:
    """A Config whose every path lives under ``root`` (a throw-away test root)."""
    data: dict[str, object] = {
        "paths": {
            "config_dir": str(root / "etc"),
            "state_dir": str(root / "state"),
            "run_dir": str(root / "run"),
            "cache_dir": str(root / "cache"),
        }
    }
    for key, value in sections.items():
        if key == "paths":
            data["paths"] = {**data["paths"], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    return Config.model_validate(data)
