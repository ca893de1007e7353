"""Which accelerator can really run a guest here: KVM, or TCG (pure emulation).

``/dev/kvm`` existing is not enough. Some hosts expose a KVM that cannot run an ordinary
guest: with the ``kvm_pvm`` module (PVM, KVM for guests that run *inside* a VM without
hardware nesting) a stock Linux guest dies on "KVM internal error … emulation failure"
and never reaches user space. lobsterd must detect that and fall back to TCG instead of
booting a VM that hangs. Detection only reads /dev, /sys and /proc, so it is cheap
enough for every spawn; the roots are parameters so that tests can fabricate a host.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lobsterd.errors import ConfigInvalid, VmmError

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12

# KVM modules that cannot run a stock guest kernel: name -> why.
UNUSABLE_KVM_MODULES: dict[str, str] = {
    "kvm_pvm": "the host KVM module is kvm_pvm (PVM), which cannot run a stock guest kernel "
    "(emulation failures before user space)",
}


def _loaded_modules(sys_root: Path, proc_root: Path) -> set[str]:
    names: set[str] = set()
    try:
        for line in (proc_root / "modules").read_text().splitlines():
            if line.strip():
                names.add(line.split()[0])
    except OSError:
        pass
    for name in UNUSABLE_KVM_MODULES:
        if (sys_root / "module" / name).exists():
            names.add(name)
    return names


def kvm_unusable_reason(
    *,
    dev_root: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    open_device: bool = True,
) -> str | None:
    """None when KVM can run an ordinary guest, else why not (one line)."""
    kvm = dev_root / "kvm"
    if not kvm.exists():
        return "no /dev/kvm (no hardware virtualisation, or the kvm module is not loaded)"
    modules = _loaded_modules(sys_root, proc_root)
    for name, why in UNUSABLE_KVM_MODULES.items():
        if name in modules:
            return why
    return _api_problem(kvm) if open_device else None


def _api_problem(kvm: Path) -> str | None:
    try:
        fd = os.open(kvm, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /dev/kvm: {exc.strerror or exc}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"/dev/kvm does not answer KVM_GET_API_VERSION: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"/dev/kvm speaks KVM API {version}, expected {KVM_API_VERSION}"
    return None


def detect_accel(
    preference: str,
    *,
    dev_root: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    open_device: bool = True,
) -> tuple[str, str]:
    """``("kvm"|"tcg", reason)`` for ``vm.accel`` = ``auto``, ``kvm`` or ``tcg``.

    ``kvm`` on a host whose KVM cannot run guests is an error rather than a silent
    fallback: the operator asked for it and should learn why it is not available.
    """
    if preference == "tcg":
        return "tcg", "vm.accel = tcg in the config"
    if preference not in ("auto", "kvm"):
        raise ConfigInvalid(f'vm.accel must be "auto", "kvm" or "tcg", got {preference!r}')
    why = kvm_unusable_reason(
        dev_root=dev_root, sys_root=sys_root, proc_root=proc_root, open_device=open_device
    )
    if why is None:
        return "kvm", "/dev/kvm works and no known-broken KVM module is loaded"
    if preference == "kvm":
        raise VmmError(
            f"vm.accel = kvm but KVM cannot run guests on this host: {why}",
            hint='set vm.accel = "auto" (falls back to TCG) or "tcg"',
        )
    return "tcg", f"KVM unusable, using TCG emulation: {why}"


def host_tsc_khz(
    *, proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys")
) -> int:
    """The host TSC frequency in kHz, for the guest's ``tsc_early_khz`` under TCG.

    TCG guests read the host's TSC, so its rate is the right calibration. The exact
    value is exported by some kernels as ``tsc_freq_khz``; otherwise ``cpu MHz`` of
    /proc/cpuinfo is close enough (the guest only needs it to skip calibration).
    """
    exact = sys_root / "devices" / "system" / "cpu" / "cpu0" / "tsc_freq_khz"
    try:
        value = int(exact.read_text().strip())
        if value > 0:
            return value
    except (OSError, ValueError):
        pass
    try:
        text = (proc_root / "cpuinfo").read_text()
    except OSError as exc:
        raise VmmError(
            f"cannot read {proc_root}/cpuinfo: {exc.strerror or exc}",
            hint="set vm.tsc_khz in the config",
        ) from None
    for line in text.splitlines():
        key, sep, value_text = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            try:
                khz = round(float(value_text.strip()) * 1000)
            except ValueError:
                break
            if khz > 0:
                return khz
            break
    raise VmmError(
        "cannot find the host CPU frequency in /proc/cpuinfo",
        hint="set vm.tsc_khz in the config (e.g. 2300000)",
    )
