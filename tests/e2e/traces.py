"""Find every trace a tenant can leave on the host, by looking at the host itself."""

from __future__ import annotations

import contextlib
from pathlib import Path

from lobsterd.ops import tenant_runtime as rt
from lobsterd.ops.host import Host


def _proc_cmdlines() -> list[tuple[int, str]]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                raw = (p / "cmdline").read_bytes()
                out.append((int(p.name), raw.replace(b"\0", b" ").decode(errors="replace")))
    return out


def traces(host: Host, name: str, slot: int) -> dict[str, object]:
    cfg = host.cfg
    found: dict[str, object] = {}
    run = str(rt.vm_run_dir(cfg, name))
    procs = [pid for pid, cmd in _proc_cmdlines() if run + "/" in cmd]
    if procs:
        found["process"] = procs
    tap = Path(f"/sys/class/net/lbt{slot}")
    if tap.exists():
        found["tap"] = str(tap)
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"**/lobsterd/tenant-{name}")]
    if cgroups:
        found["cgroup"] = cgroups
    mnt = cfg.paths.tenants_mnt / name
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if f" {mnt} " in line]
    if mounts:
        found["mount"] = mounts
    img = cfg.paths.volumes / f"{name}.img"
    loops = []
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if bf.read_text().strip().startswith(str(img)):
                loops.append(bf.parent.parent.name)
    if loops:
        found["loop"] = loops
    for label, path in (("volume_file", img), ("mountpoint", mnt),
                        ("ssh_keys", cfg.paths.ssh_keys / name), ("run_dir", Path(run))):
        if path.exists():
            found[label] = str(path)
    if host.registry.find(name) is not None:
        found["registry_row"] = name
    if slot in host.firewall.list_tenant_chains():
        found["nft_chains"] = slot
    with contextlib.suppress(Exception):
        from lobsterd.core.caddy_config import tenant_of_route

        if any(tenant_of_route(r) == name for r in host.caddy.get_routes()):
            found["caddy_routes"] = name
    try:
        host.secrets.get_internal(name, rt.AGENT_TOKEN)
        found["secrets"] = name
    except Exception:
        pass
    return found
