"""init: prepare the host, idempotently, and say what was done and what is wrong.

Re-running it after a host reboot is the reconcile: firewall tables, TAPs, per-tenant
mounts and Caddy routes are rebuilt from the registry without duplicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lobsterd.config import DEFAULT_CONFIG_TEXT, resolve_config_path
from lobsterd.errors import HostUnsafe
from lobsterd.ops.host import Host
from lobsterd.ops.steps import Progress, no_progress


@dataclass
class InitReport:
    done: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    doctor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"done": self.done, "warnings": self.warnings, "doctor": self.doctor}


def _mkdir(path: Path, mode: int) -> bool:
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return not existed


def init_host(  # noqa: PLR0912 - one linear checklist
    host: Host,
    *,
    config_path: str | None = None,
    accept_risk: bool = False,
    build_image: bool = True,
    start_caddy: bool = True,
    progress: Progress = no_progress,
) -> InitReport:
    cfg = host.cfg
    rep = InitReport()
    p = cfg.paths

    for path, mode in ((p.config_dir, 0o711), (p.state_dir, 0o711), (p.run_dir, 0o711),
                       (p.cache_dir, 0o755), (p.volumes, 0o700), (p.tenants_mnt, 0o700),
                       (p.ssh_keys, 0o700), (p.locks, 0o700)):
        if _mkdir(path, mode):
            rep.done.append(f"created {path}")

    cfg_file = resolve_config_path(config_path)
    if not cfg_file.exists():
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cfg_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(DEFAULT_CONFIG_TEXT)
        rep.done.append(f"wrote default config {cfg_file}")

    from lobsterd.security.crypto import ensure_master_key

    progress("master-key", "ensuring the host master key", None)
    if ensure_master_key(cfg):
        rep.done.append(f"created master key {p.master_key}")

    progress("doctor", "checking host hardening", None)
    from lobsterd.doctor import run_doctor

    report = run_doctor(cfg)
    rep.doctor = report.to_dict()
    failed = [r.id for r in report.results if r.status == "FAIL"]
    warned = [r.id for r in report.results if r.status == "WARN"]
    if warned:
        rep.warnings.append("doctor warnings: " + ", ".join(warned) + " (run lobsterd doctor)")
    if failed:
        if not accept_risk:
            host.record("init", tenant=None, outcome="denied", error_code=HostUnsafe.code,
                        details={"failed_checks": failed})
            raise HostUnsafe(
                "host hardening checks failed: " + ", ".join(failed),
                hint="run lobsterd doctor --fix, or re-run init with --accept-risk",
            )
        host.record("init.accept-risk", tenant=None, outcome="ok",
                    details={"failed_checks": failed})
        rep.warnings.append(
            "continuing despite FAILed checks (--accept-risk): " + ", ".join(failed))

    from lobsterd.adapters import net

    progress("network", "enabling IPv4 forwarding", None)
    net.enable_ip_forward()

    tenants = host.registry.list()
    progress("firewall", f"installing lobsterd's nftables tables ({len(tenants)} tenants)", None)
    host.firewall.reconcile([host.tenant_net(t) for t in tenants])
    rep.done.append(f"firewall reconciled for {len(tenants)} tenant(s)")

    if build_image:
        from lobsterd.errors import ImageMissing
        from lobsterd.image.artifacts import find_image
        from lobsterd.image.build import build_image as build
        from lobsterd.image.build import expected_key

        try:
            current: str | None = find_image(cfg).key
        except ImageMissing:
            current = None
        if current != expected_key():
            progress("image", "building the guest image (first run takes a few minutes)", None)
            art = build(
                cfg, progress=lambda stage, detail: progress(f"image:{stage}", detail, None))
            rep.done.append(f"built guest image {art.key}")

    progress("ca", "ensuring the host CA", None)
    host.ca.ensure()

    if start_caddy:
        from lobsterd.ops.reconcile import reconcile_caddy

        progress("caddy", "starting Caddy with its admin API on a Unix socket", None)
        reconcile_caddy(host)
        rep.done.append("caddy running; routes reconciled")

    from lobsterd.ops.reconcile import reconcile_tenants

    for line in reconcile_tenants(host, progress=progress):
        rep.warnings.append(line)

    from lobsterd.ops.certs import rotate_guest_certs

    rotation = rotate_guest_certs(host)
    if rotation.rotated:
        rep.done.append("rotated guest certificates: " + ", ".join(rotation.rotated))
    for tenant, err in rotation.failed.items():
        rep.warnings.append(f'tenant "{tenant}": certificate rotation failed: {err}')

    host.record("init", tenant=None, outcome="ok", details={"done": len(rep.done)})
    return rep

