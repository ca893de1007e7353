"""Fixtures for real-VM tests: a throw-away lobsterd root on this host.

The guest image is shared through ``$LOBSTERD_TEST_CACHE`` (built once, keyed by its
inputs). Tenants get ``egress = "deny"`` so no guest packet can leave the machine, and
Caddy listens on high ports so nothing collides with a real installation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lobsterd.config import Config
from lobsterd.ops.host import Host
from tests.helpers import make_config, need_binary, need_root

TEST_CACHE = Path(os.environ.get("LOBSTERD_TEST_CACHE", "/var/cache/lobsterd-test"))


def e2e_config(root: Path, pool: str) -> Config:
    return make_config(
        root,
        paths={"cache_dir": str(TEST_CACHE)},
        vm={"vcpus": 1, "mem_mib": 256, "boot_timeout_s": 120, "stop_timeout_s": 3},
        network={"pool": pool, "egress": "deny", "max_tenants": 16},
        storage={"overlay_size_mib": 256},
        agent={"connect_timeout_s": 120},
        caddy={"domain": "lobster.test", "http_port": 18080, "https_port": 18443},
        users={"uid_start": 300_000},
    )


@pytest.fixture(scope="session")
def e2e_root() -> Iterator[Path]:
    need_root()
    need_binary("qemu-system-x86_64", "caddy", "nft", "mkfs.ext4")
    # Caddy runs as its own user and must traverse to its config: not under pytest's
    # 0700 temp root.
    root = Path(tempfile.mkdtemp(prefix="lobsterd-e2e-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root


@pytest.fixture(scope="session")
def e2e_host(e2e_root: Path) -> Iterator[Host]:
    from lobsterd.ops.init import init_host

    cfg = e2e_config(e2e_root, "10.231.0.0/24")
    cfg_file = e2e_root / "lobsterd.toml"
    cfg_file.write_text(_to_toml(cfg))
    host = Host(cfg)
    init_host(host, config_path=str(cfg_file), accept_risk=True)
    try:
        yield host
    finally:
        _shutdown_host(host)
        shutil.rmtree(e2e_root, ignore_errors=True)


def _shutdown_host(host: Host) -> None:
    from lobsterd.ops.evict import evict

    for t in host.registry.list():
        try:
            evict(host, t.name)
        except Exception as exc:  # cleanup must go on
            print(f"cleanup: evict {t.name} failed: {exc}")
    try:
        from lobsterd.adapters.caddy import CaddySupervisor

        CaddySupervisor(host.cfg).stop()
    except Exception as exc:
        print(f"cleanup: caddy stop failed: {exc}")
    try:
        host.firewall.teardown()
    except Exception as exc:
        print(f"cleanup: firewall teardown failed: {exc}")


def _to_toml(cfg: Config) -> str:
    """Serialise the few sections tests customise (enough for the CLI to load them)."""
    data = cfg.model_dump(mode="json", exclude={"source"})
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, object]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", data)
    return "\n".join(lines) + "\n"


def _toml_value(v: object) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))
