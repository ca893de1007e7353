"""Derived per-tenant runtime facts shared by spawn, evict and the repairs (pure-ish)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lobsterd.config import Config
from lobsterd.registry import Tenant
from lobsterd.security.ca import guest_server_name

__all__ = ["AGENT_TOKEN", "GATEWAY_TOKEN", "guest_mac", "guest_server_name", "hostname",
           "token_hash", "vm_run_dir"]

AGENT_TOKEN = "agent_token"  # noqa: S105 - the secret's name, not its value
GATEWAY_TOKEN = "gateway_token"  # noqa: S105


def token_hash(token: str) -> str:
    """What the guest may see of the agent token: its SHA-256, useless to authenticate."""
    return hashlib.sha256(token.encode()).hexdigest()


def guest_mac(slot: int) -> str:
    """Locally administered, unique per slot."""
    hi, mid, lo = (slot >> 16) & 0xFF, (slot >> 8) & 0xFF, slot & 0xFF
    return f"02:4c:42:{hi:02x}:{mid:02x}:{lo:02x}"


def vm_run_dir(cfg: Config, name: str) -> Path:
    return cfg.paths.run_dir / "vm" / name


def hostname(cfg: Config, t: Tenant) -> str:
    return f"{t.name}.{cfg.caddy.domain}"

