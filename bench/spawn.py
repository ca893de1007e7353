"""Spawn overhead: `lobsterd spawn` vs the same guest booted by bare QEMU, in one run.

Baseline: `qemu-system-x86_64 -M microvm` started directly as root with the same kernel,
initramfs, root filesystem, machine model, devices and kernel command line, on a TAP and
overlay prepared before the clock starts, timed from exec to the guest agent answering
an authenticated health ping. Measured: a full `spawn()` (tenant filesystem, TAP,
firewall, cgroup, jailed VMM, agent readiness, secret injection, Caddy routes) to its
return. Runs alternate so drift hits both sides; prints medians, their ratio and the
absolute orchestration overhead.

    python bench/spawn.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lobsterd.adapters import net  # noqa: E402
from lobsterd.adapters.agent_client import AgentClient  # noqa: E402
from lobsterd.adapters.kvm import detect_accel, host_tsc_khz  # noqa: E402
from lobsterd.config import Config  # noqa: E402
from lobsterd.core.bootargs import build_boot_args  # noqa: E402
from lobsterd.core.qemu_argv import KVM_CPU, TCG_CPU, TCG_TB_SIZE_MIB  # noqa: E402
from lobsterd.image.artifacts import find_image  # noqa: E402
from lobsterd.ops import tenant_runtime as rt  # noqa: E402
from lobsterd.ops.evict import evict  # noqa: E402
from lobsterd.ops.host import Host  # noqa: E402
from lobsterd.ops.init import init_host  # noqa: E402
from lobsterd.ops.spawn import spawn  # noqa: E402

CACHE = Path(os.environ.get("LOBSTERD_TEST_CACHE", "/var/cache/lobsterd-test"))
POOL = "10.232.0.0/24"
# Outside the tenant pool and not named lbt*: lobsterd's firewall leaves it alone.
BARE_TAP, BARE_HOST, BARE_GUEST = "lbbare0", "10.239.0.1", "10.239.0.2"


def make_config(root: Path) -> Config:
    return Config.model_validate({
        "paths": {"config_dir": str(root / "etc"), "state_dir": str(root / "state"),
                  "run_dir": str(root / "run"), "cache_dir": str(CACHE)},
        "vm": {"vcpus": 1, "mem_mib": 256},
        "network": {"pool": POOL, "egress": "deny", "max_tenants": 8},
        "storage": {"overlay_size_mib": 256},
        "caddy": {"domain": "lobster.test", "http_port": 18081, "https_port": 18444},
        "users": {"uid_start": 310_000},
    })


def bare_boot(cfg: Config, image: object, overlay: Path, accel: str) -> float:
    token = secrets.token_urlsafe(32)
    args = build_boot_args(
        guest_ip=BARE_GUEST, host_ip=BARE_HOST, prefix=30, agent_token_hash=rt.token_hash(token),
        agent_port=cfg.network.agent_port, health_port=cfg.network.health_port,
        gateway_port=cfg.network.gateway_port, tenant="bare", accel=accel,
        tsc_khz=host_tsc_khz(), debug_console=False)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(overlay), "256M"], check=True, timeout=60)
    fd = net.open_tap_fd(BARE_TAP)
    # The same CPU model and accelerator settings as lobsterd: a different -cpu changes
    # TCG boot time by more than a second and would swamp the comparison.
    accel_args = (["-accel", f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}", "-cpu", TCG_CPU]
                  if accel == "tcg" else ["-accel", "kvm", "-cpu", KVM_CPU])
    argv = [cfg.vm.qemu_binary, "-M", "microvm,x-option-roms=off,isa-serial=off", "-nodefaults",
            "-no-user-config", "-display", "none", *accel_args, "-smp", "1", "-m", "256M",
            "-kernel", str(image.bzimage), "-initrd", str(image.initrd),  # type: ignore[attr-defined]
            "-append", args,
            "-drive", f"file={image.rootfs},format=raw,if=none,id=r,readonly=on",  # type: ignore[attr-defined]
            "-device", "virtio-blk-device,drive=r",
            "-drive", f"file={overlay},format=raw,if=none,id=o,cache=none,aio=threads",
            "-device", "virtio-blk-device,drive=o",
            "-netdev", f"tap,id=n0,fd={fd}", "-device", "virtio-net-device,netdev=n0",
            "-device", "virtio-rng-device"]
    agent = AgentClient(BARE_GUEST, cfg.network.agent_port, cfg.network.health_port, token)
    start = time.monotonic()
    proc = subprocess.Popen(argv, pass_fds=(fd,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(fd)
    try:
        agent.wait_ready(180, interval_s=0.03)  # the same polling as spawn
        return time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/spawn.py needs root")
    root = Path(tempfile.mkdtemp(prefix="lobsterd-bench-", dir="/var/tmp"))
    root.chmod(0o711)  # Caddy's own user must traverse to its config
    cfg = make_config(root)
    host = Host(cfg)
    init_host(host, accept_risk=True)
    image = find_image(cfg)
    accel, why = detect_accel(cfg.vm.accel)
    net.create_tap(BARE_TAP, BARE_HOST, 30)
    overlay = root / "bare-overlay.ext4"
    bare: list[float] = []
    lob: list[float] = []
    steps: dict[str, list[float]] = {}
    try:
        for i in range(opts.runs):
            bare.append(bare_boot(cfg, image, overlay, accel))
            res = spawn(host, "bench")
            lob.append(res.total_s)
            for k, v in res.timings.items():
                steps.setdefault(k, []).append(v)
            evict(host, "bench")
            print(f"run {i + 1}: bare {bare[-1] * 1000:.0f} ms   lobsterd {lob[-1] * 1000:.0f} ms",
                  flush=True)
    finally:
        net.delete_tap(BARE_TAP)
        from lobsterd.adapters.caddy import CaddySupervisor

        CaddySupervisor(cfg).stop()
        host.firewall.teardown()
        shutil.rmtree(root, ignore_errors=True)
    mb, ml = statistics.median(bare), statistics.median(lob)
    print(f"\naccelerator: {accel} ({why})")
    print(f"bare QEMU boot to agent-ready, median of {len(bare)}: {mb * 1000:.0f} ms")
    print(f"lobsterd spawn, median of {len(lob)}:                  {ml * 1000:.0f} ms")
    print(f"ratio lobsterd/bare: {ml / mb:.3f}")
    print(f"orchestration overhead (median difference): {(ml - mb) * 1000:+.0f} ms")
    med = {k: statistics.median(v) for k, v in steps.items()}
    serial_host = ("secrets", "volume", "network", "firewall", "registry")
    overlapped = ("vm", "ssh-key", "tls", "caddy")

    def show(keys: tuple[str, ...]) -> str:
        return ", ".join(f"{k}={med[k] * 1000:.0f}" for k in keys if k in med)

    print(f"host steps on the critical path (ms): {show(serial_host)}; "
          f"sum {sum(med.get(k, 0) for k in serial_host) * 1000:.0f} ms")
    print(f"steps overlapped with the guest's boot (ms): {show(overlapped)}")
    print(f"guest applying token, config, keys, TLS front and gateway (inject): "
          f"{med.get('inject', 0) * 1000:.0f} ms")

if __name__ == "__main__":
    main()
