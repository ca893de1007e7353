"""``lobsterd image build``: kernel + initramfs + rootfs, cached by a hash of every input.

The key covers the kernel release and package version, the debootstrap recipe, the bytes
of every guest file and of the initramfs' busybox and ``/init``, the module list, the
variant and :data:`IMAGE_BUILDER_VERSION`. Same inputs → same key → no work; any change
→ a new directory, built next to the old one and renamed into place, then ``current`` is
switched atomically. VMs that still use an older image keep their files.

The expensive stages are cached on their own inputs (the kernel by version, the
debootstrap tree by its recipe), so editing a guest file re-runs only the initramfs and
rootfs packing (seconds, not minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lobsterd.guest
from lobsterd.config import Config
from lobsterd.errors import ImageBuildFailed, ImageMissing, NotRoot, ValidationFailed
from lobsterd.image.artifacts import (
    CURRENT,
    FILES,
    MANIFEST,
    MANIFEST_FORMAT,
    ImageArtifacts,
    load_image,
    verify_image,
)
from lobsterd.image.initramfs import (
    HOST_BUSYBOX,
    INITRAMFS_MODULES,
    OPTIONAL_MODULES,
    build_initramfs,
)
from lobsterd.image.kernel import (
    DEFAULT_KERNEL_PACKAGE_VERSION,
    DEFAULT_KERNEL_RELEASE,
    KERNEL_LAYOUT_VERSION,
    ensure_kernel,
)
from lobsterd.image.rootfs import (
    DEFAULT_BASE,
    FORBIDDEN_PROGRAMS,
    REMOVE_PATTERNS,
    BaseSpec,
    GuestFile,
    build_rootfs,
    ensure_base,
)
from lobsterd.image.util import (
    Progress,
    build_lock,
    clean_stale_tmp,
    new_tmp_dir,
    no_progress,
    publish_dir,
    replace_symlink,
    sha256_file,
)

IMAGE_BUILDER_VERSION = 1  # bump whenever the builder's output changes for the same inputs
VARIANTS: tuple[str, ...] = ("test", "openclaw")
BUILT_VARIANTS: tuple[str, ...] = ("test",)
GUEST_DIR = Path(lobsterd.guest.__file__).resolve().parent
INITRAMFS_INIT = "initramfs_init.sh"

# (source file in lobsterd/guest, destination in the guest, mode, variants)
GUEST_SOURCES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("agent.py", "usr/lib/lobster/agent.py", 0o644, VARIANTS),
    ("tls_front.py", "usr/lib/lobster/tls_front.py", 0o644, VARIANTS),
    ("lobster_init.py", "sbin/lobster-init", 0o755, VARIANTS),
    ("gateway_standin.py", "usr/local/bin/lobster-gateway", 0o755, ("test",)),
)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValidationFailed(
            f"unknown image variant {variant!r}", hint=f"choose one of: {', '.join(VARIANTS)}"
        )
    if variant not in BUILT_VARIANTS:
        raise ImageBuildFailed(
            f"the {variant!r} image variant is not built yet (it needs Node.js 24 and the "
            "OpenClaw package in the guest)",
            hint="use --variant test",
        )


def load_guest_files(variant: str, guest_dir: Path = GUEST_DIR) -> list[GuestFile]:
    """The guest files of ``variant`` read from lobsterd's package, checked for sanity."""
    files: list[GuestFile] = []
    for src, dest, mode, variants in GUEST_SOURCES:
        if variant not in variants:
            continue
        path = guest_dir / src
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageBuildFailed(
                f"guest file {path} is missing", hint="reinstall lobsterd"
            ) from None
        if mode & 0o111 and not data.startswith(b"#!"):
            raise ImageBuildFailed(f"guest file {src} is installed executable but has no #! line")
        files.append(GuestFile(dest, data, mode))
    return files


def load_init_script(guest_dir: Path = GUEST_DIR) -> bytes:
    path = guest_dir / INITRAMFS_INIT
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageBuildFailed(
            f"initramfs init {path} is missing", hint="reinstall lobsterd"
        ) from None
    if not data.startswith(b"#!"):
        raise ImageBuildFailed(f"{INITRAMFS_INIT} has no #! line: the kernel cannot run it")
    return data


def image_inputs(
    variant: str,
    kernel_release: str,
    kernel_package_version: str,
    base: BaseSpec,
    guest_files: list[GuestFile],
    init_script: bytes,
    busybox_sha256: str,
) -> dict[str, Any]:
    """Every input of a build, as JSON-able data (hashed into the key, kept in the manifest)."""
    return {
        "builder": IMAGE_BUILDER_VERSION,
        "variant": variant,
        "kernel": {
            "release": kernel_release,
            "package_version": kernel_package_version,
            "layout": KERNEL_LAYOUT_VERSION,
        },
        "debootstrap": asdict(base),
        "initramfs": {
            "modules": list(INITRAMFS_MODULES),
            "optional_modules": list(OPTIONAL_MODULES),
            "busybox_sha256": busybox_sha256,
            "init_sha256": hashlib.sha256(init_script).hexdigest(),
        },
        "guest_files": {
            g.dest: {"sha256": hashlib.sha256(g.data).hexdigest(), "mode": oct(g.mode)}
            for g in guest_files
        },
        "hardening": {
            "remove": {k: list(v) for k, v in REMOVE_PATTERNS.items()},
            "forbidden": {k: list(v) for k, v in FORBIDDEN_PROGRAMS.items()},
        },
    }


def compute_key(inputs: dict[str, Any]) -> str:
    """Stable hash of ``inputs`` (canonical JSON: sorted keys, no whitespace)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def expected_key(
    variant: str = "test",
    *,
    kernel_release: str = DEFAULT_KERNEL_RELEASE,
    kernel_package_version: str = DEFAULT_KERNEL_PACKAGE_VERSION,
    guest_dir: Path = GUEST_DIR,
) -> str:
    """The key a build would have now; differs from the current image's when it is stale
    (a guest file, the busybox or the recipe changed since it was built)."""
    return compute_key(
        image_inputs(
            variant,
            kernel_release,
            kernel_package_version,
            DEFAULT_BASE,
            load_guest_files(variant, guest_dir),
            load_init_script(guest_dir),
            sha256_file(HOST_BUSYBOX),
        )
    )


def _intact(image_dir: Path) -> ImageArtifacts | None:
    try:
        art = load_image(image_dir)
    except ImageMissing:
        return None
    return art if not verify_image(art) else None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        dst.chmod(0o644)


class _Timer:
    """Wraps the caller's progress callback and records how long each stage took."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stages: dict[str, float] = {}
        self._stage: str | None = None
        self._t0 = time.monotonic()

    def __call__(self, stage: str, detail: str) -> None:
        now = time.monotonic()
        if stage != self._stage:
            if self._stage is not None:
                self.stages[self._stage] = self.stages.get(self._stage, 0.0) + now - self._t0
            self._stage, self._t0 = stage, now
        self.progress(stage, detail)

    def finish(self) -> dict[str, float]:
        self("done", "")
        return {k: round(v, 2) for k, v in self.stages.items()}


def build_image(
    cfg: Config,
    variant: str = "test",
    force: bool = False,
    progress: Progress = no_progress,
    *,
    kernel_release: str = DEFAULT_KERNEL_RELEASE,
    kernel_package_version: str = DEFAULT_KERNEL_PACKAGE_VERSION,
    guest_dir: Path = GUEST_DIR,
) -> ImageArtifacts:
    """Build (or reuse) the guest image for ``variant`` and make it ``current``.

    ``force`` rebuilds everything except the kernel (which is re-verified): it re-runs
    debootstrap too, which picks up Debian's latest security updates.
    """
    check_variant(variant)
    if os.geteuid() != 0:
        raise NotRoot("building the guest image needs root (debootstrap, chroot)", hint="use sudo")
    started = time.time()
    guest_files = load_guest_files(variant, guest_dir)
    init_script = load_init_script(guest_dir)
    if not HOST_BUSYBOX.is_file():
        raise ImageBuildFailed(f"{HOST_BUSYBOX} not found", hint="install busybox-static")
    base = DEFAULT_BASE
    inputs = image_inputs(
        variant,
        kernel_release,
        kernel_package_version,
        base,
        guest_files,
        init_script,
        sha256_file(HOST_BUSYBOX),
    )
    key = compute_key(inputs)
    images = cfg.paths.images
    final = images / key
    cache = cfg.paths.cache_dir
    if not force and (art := _intact(final)) is not None:
        progress("image", f"{key} is up to date")
        replace_symlink(images / CURRENT, key)
        return art
    images.mkdir(parents=True, exist_ok=True)
    with build_lock(images / ".lock", "guest image"):
        if not force and (art := _intact(final)) is not None:
            replace_symlink(images / CURRENT, key)
            return art
        clean_stale_tmp(images)
        timer = _Timer(progress)
        kernel = ensure_kernel(
            cache, timer, release=kernel_release, package_version=kernel_package_version
        )
        base_tree = ensure_base(cache, base, force=force, progress=timer)
        tmp = new_tmp_dir(images, key, mode=0o700)
        try:
            _link_or_copy(kernel.vmlinux, tmp / FILES["vmlinux"])
            _link_or_copy(kernel.bzimage, tmp / FILES["bzimage"])
            init_path = tmp / "init.sh"
            init_path.write_bytes(init_script)
            initramfs = build_initramfs(
                kernel, init_path, tmp / FILES["initrd"], busybox=HOST_BUSYBOX, progress=timer
            )
            init_path.unlink()
            rootfs = build_rootfs(
                base_tree, guest_files, tmp / FILES["rootfs"], tmp, key, progress=timer
            )
            timer("publish", "hashing artefacts and writing the manifest")
            manifest = {
                "format": MANIFEST_FORMAT,
                "key": key,
                "variant": variant,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "inputs": inputs,
                "kernel": {
                    "version": kernel.version,
                    "package_version": kernel.package_version,
                },
                "initramfs": {
                    "modules": initramfs.modules,
                    "members": initramfs.members,
                    "uncompressed_size": initramfs.uncompressed_size,
                },
                "rootfs": {
                    "content_bytes": rootfs.content_bytes,
                    "files": rootfs.files,
                    "removed": rootfs.removed,
                    "setuid_stripped": rootfs.setuid_stripped,
                    "packages": rootfs.packages,
                },
                "files": {
                    name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                    for name in FILES.values()
                },
            }
            manifest["stage_seconds"] = timer.finish()
            manifest["build_seconds"] = round(time.time() - started, 2)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / MANIFEST).chmod(0o644)
            tmp.chmod(0o755)
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_symlink(images / CURRENT, key)
    return load_image(final)
