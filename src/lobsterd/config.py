"""lobsterd's configuration: one TOML file, validated by pydantic.

Found at ``--config``, else ``$LOBSTERD_CONFIG``, else ``/etc/lobsterd/lobsterd.toml``; a
missing file means all defaults. Unknown keys are errors (a typo must not silently fall
back to a default), and every error names the file, the dotted key and the rule broken.
Every path lobsterd writes is under ``paths`` so that tests can run in a throw-away root.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lobsterd.errors import ConfigInvalid

DEFAULT_CONFIG_PATH = Path("/etc/lobsterd/lobsterd.toml")
ENV_CONFIG = "LOBSTERD_CONFIG"

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*",
    re.ASCII,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    config_dir: Path = Path("/etc/lobsterd")
    state_dir: Path = Path("/var/lib/lobsterd")
    run_dir: Path = Path("/run/lobsterd")
    cache_dir: Path = Path("/var/cache/lobsterd")

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.db"

    @property
    def volumes(self) -> Path:
        """Backing image files of the per-tenant filesystems."""
        return self.state_dir / "volumes"

    @property
    def tenants_mnt(self) -> Path:
        """Mount points of the per-tenant filesystems (one filesystem per tenant)."""
        return self.state_dir / "tenants"

    @property
    def images(self) -> Path:
        """Guest artefacts (kernel, initramfs, rootfs) built by ``lobsterd image build``."""
        return self.cache_dir / "images"

    @property
    def ssh_keys(self) -> Path:
        return self.state_dir / "ssh"

    @property
    def locks(self) -> Path:
        return self.run_dir / "locks"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"

    @property
    def master_key(self) -> Path:
        return self.config_dir / "master.key"

    @property
    def secrets_db(self) -> Path:
        return self.state_dir / "secrets.db"


class TokenBucket(_Section):
    size: Annotated[int, Field(ge=0)]
    refill_time_ms: Annotated[int, Field(ge=1)] = 1000
    one_time_burst: Annotated[int, Field(ge=0)] = 0


class RateLimiter(_Section):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


def _net_limiter() -> RateLimiter:
    # 1,250,000 B/s = 10 Mbit/s and 1000 packets/s each way.
    return RateLimiter(bandwidth=TokenBucket(size=1_250_000), ops=TokenBucket(size=1000))


def _disk_limiter() -> RateLimiter:
    # 50 MiB/s and 5000 ops/s.
    return RateLimiter(bandwidth=TokenBucket(size=52_428_800), ops=TokenBucket(size=5000))


class VmConfig(_Section):
    vmm: Literal["qemu", "firecracker"] = "qemu"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    vcpus: Annotated[int, Field(ge=1, le=32)] = 2
    mem_mib: Annotated[int, Field(ge=128, le=1_048_576)] = 1024
    cgroup_mem_overhead_mib: Annotated[int, Field(ge=0)] = 256
    # CPU for the VMM's own threads (I/O, emulation) on top of one CPU per vCPU, in
    # percent of one CPU: a quota of exactly the vCPU count starves the I/O thread.
    cgroup_cpu_overhead_pct: Annotated[int, Field(ge=0, le=400)] = 50
    boot_timeout_s: Annotated[float, Field(gt=0, le=600)] = 90.0
    stop_timeout_s: Annotated[float, Field(ge=0, le=300)] = 5.0
    qemu_binary: str = "qemu-system-x86_64"
    tsc_khz: Annotated[int, Field(ge=0)] = 0  # 0 = read from the host
    debug_console: bool = False  # serial console to a log file; never in production
    net_rx_limit: RateLimiter | None = Field(default_factory=_net_limiter)
    net_tx_limit: RateLimiter | None = Field(default_factory=_net_limiter)
    disk_limit: RateLimiter | None = Field(default_factory=_disk_limiter)


class NetworkConfig(_Section):
    pool: str = "10.200.0.0/16"
    max_tenants: Annotated[int, Field(ge=1, le=16382)] = 1024
    gateway_port: Annotated[int, Field(ge=1, le=65535)] = 9000
    agent_port: Annotated[int, Field(ge=1, le=65535)] = 52
    health_port: Annotated[int, Field(ge=1, le=65535)] = 53
    conn_limit: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    egress: Literal["allow", "deny", "allowlist"] = "allow"
    egress_allow: list[str] = Field(default_factory=list)
    blocked_cidrs: list[str] = Field(default_factory=list)
    uplink: str | None = None  # interface for masquerade; None = any non-tenant interface

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v, strict=True)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 network in CIDR form: {exc}") from exc
        if net.prefixlen > 29:
            raise ValueError("needs at least a /29")
        return v

    @field_validator("egress_allow")
    @classmethod
    def _egress(cls, v: list[str]) -> list[str]:
        from lobsterd.core.firewall import parse_egress_entry
        from lobsterd.errors import ValidationFailed

        for item in v:
            try:
                parse_egress_entry(item)
            except ValidationFailed as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("blocked_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a CIDR: {exc}") from exc
        return v


class StorageConfig(_Section):
    overlay_size_mib: Annotated[int, Field(ge=256)] = 4096
    volume_headroom_mib: Annotated[int, Field(ge=64)] = 256


class UsersConfig(_Section):
    uid_start: Annotated[int, Field(ge=1000, le=2**31 - 100_000)] = 200_000


class CaddyConfig(_Section):
    domain: str = "lobster.local"
    binary: str = "caddy"
    tls: Literal["auto", "acme", "files", "internal"] = "auto"
    cert_file: Path | None = None
    key_file: Path | None = None
    http_port: Annotated[int, Field(ge=1, le=65535)] = 80
    https_port: Annotated[int, Field(ge=1, le=65535)] = 443

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if not _HOSTNAME_RE.fullmatch(v):
            raise ValueError("not a valid host name (lower-case labels of a-z, 0-9, '-')")
        return v


class AgentConfig(_Section):
    connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = 90.0
    request_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0


class WatchdogConfig(_Section):
    interval_s: Annotated[float, Field(ge=1)] = 10.0
    max_repair_attempts: Annotated[int, Field(ge=1)] = 3
    repair_cooldown_s: Annotated[float, Field(ge=0)] = 60.0
    idle_threshold_s: Annotated[float, Field(ge=0)] = 10.0
    cron_wake_ahead_s: Annotated[float, Field(ge=0)] = 15.0
    traffic_poll_s: Annotated[float, Field(ge=1)] = 5.0


def _default_gateway_config() -> dict[str, Any]:
    return {"gateway": {"mode": "local", "bind": "loopback", "auth": {"mode": "token"}}}


class GatewayConfig(_Section):
    """What the guest's gateway is told; the token itself is added per tenant at spawn."""

    default_config: dict[str, Any] = Field(default_factory=_default_gateway_config)


class Config(_Section):
    paths: Paths = Field(default_factory=Paths)
    vm: VmConfig = Field(default_factory=VmConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    users: UsersConfig = Field(default_factory=UsersConfig)
    caddy: CaddyConfig = Field(default_factory=CaddyConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    source: Path | None = Field(default=None, exclude=True)


def resolve_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def _format_error(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        parts.append(f"{key}: {msg}{shown}")
    return f"config {path}: " + "; ".join(parts)


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid(f"config {path}: not valid TOML: {exc}") from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigInvalid(_format_error(path, exc)) from None
    return cfg.model_copy(update={"source": path})


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config; a missing file means defaults."""
    path = resolve_config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit or os.environ.get(ENV_CONFIG):
            raise ConfigInvalid(
                f"config {path} does not exist",
                hint="create it (lobsterd init writes a commented default) or fix the path",
            ) from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigInvalid(f"config {path}: cannot read: {exc}") from None
    return parse_config(text, path)


DEFAULT_CONFIG_TEXT = """\
# lobsterd configuration. Every key is optional; shown values are the defaults.
# Check it with: lobsterd config check

[paths]
# config_dir = "/etc/lobsterd"
# state_dir  = "/var/lib/lobsterd"     # registry, per-tenant volumes, audit log
# run_dir    = "/run/lobsterd"         # sockets and locks
# cache_dir  = "/var/cache/lobsterd"   # built guest images, keyed by their inputs

[vm]
# vmm = "qemu"          # or "firecracker"
# accel = "auto"        # auto = KVM when it can really run a guest, else TCG
# vcpus = 2
# mem_mib = 1024

[network]
# pool = "10.200.0.0/16"   # one /30 per tenant is carved from this
# gateway_port = 9000
# conn_limit = 1024        # concurrent connections per tenant
# egress = "allow"         # allow | deny | allowlist (then egress_allow = ["cidr[:port]", ...])

[storage]
# overlay_size_mib = 4096

[caddy]
# domain = "lobster.local"
"""
