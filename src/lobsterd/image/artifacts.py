"""Finding and verifying built guest images.

A build lives in ``<cache>/images/<key>/`` (``vmlinux``, ``bzImage``, ``initrd.img``,
``rootfs.ext4``, ``manifest.json``); ``<cache>/images/current`` points at the newest
complete one. The manifest records every input and the size and SHA-256 of every file,
so a truncated or altered artefact is detected before a VM boots from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lobsterd.config import Config
from lobsterd.errors import ImageMissing
from lobsterd.image.util import sha256_file

MANIFEST = "manifest.json"
CURRENT = "current"
MANIFEST_FORMAT = 1
FILES: dict[str, str] = {
    "vmlinux": "vmlinux",
    "bzimage": "bzImage",
    "initrd": "initrd.img",
    "rootfs": "rootfs.ext4",
}
_HINT = "run: lobsterd image build"


@dataclass(frozen=True)
class ImageArtifacts:
    """One complete guest image. Paths are absolute; files are read-only inputs to VMs."""

    key: str
    dir: Path
    vmlinux: Path
    bzimage: Path
    initrd: Path
    rootfs: Path
    kernel_version: str
    variant: str

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data


def images_root(cfg: Config) -> Path:
    return cfg.paths.images


def load_image(image_dir: Path) -> ImageArtifacts:
    """Read the image in ``image_dir`` and check every file is there with its recorded size."""
    try:
        manifest = json.loads((image_dir / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ImageMissing(
                f"image {image_dir.name} was built by an incompatible lobsterd", hint=_HINT
            )
        art = ImageArtifacts(
            key=str(manifest["key"]),
            dir=image_dir,
            kernel_version=str(manifest["kernel"]["version"]),
            variant=str(manifest["variant"]),
            **{attr: image_dir / name for attr, name in FILES.items()},
        )
        for name in FILES.values():
            if (image_dir / name).stat().st_size != manifest["files"][name]["size"]:
                raise ImageMissing(f"image {art.key}: {name} has the wrong size", hint=_HINT)
    except FileNotFoundError as exc:
        raise ImageMissing(
            f"guest image incomplete: {Path(exc.filename or '?').name} missing in {image_dir}",
            hint=_HINT,
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageMissing(f"guest image in {image_dir} is unreadable: {exc}", hint=_HINT) from None
    if art.key != image_dir.name:
        raise ImageMissing(f"image directory {image_dir.name} holds image {art.key}", hint=_HINT)
    return art


def find_image(cfg: Config) -> ImageArtifacts:
    """The current guest image (quick check: files present with their recorded sizes)."""
    link = images_root(cfg) / CURRENT
    if not link.is_symlink() and not link.exists():
        raise ImageMissing("no guest image has been built", hint=_HINT)
    target = link.resolve()
    if not target.is_dir():
        raise ImageMissing(f"the current guest image {target.name} is missing", hint=_HINT)
    return load_image(target)


def verify_image(art: ImageArtifacts) -> list[str]:
    """Re-hash every file against the manifest; return the problems (empty = intact)."""
    problems: list[str] = []
    try:
        files = art.manifest()["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"{MANIFEST}: unreadable ({exc})"]
    for name in FILES.values():
        path = art.dir / name
        want = files.get(name, {})
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != want.get("size"):
            problems.append(f"{name}: size {size}, manifest says {want.get('size')}")
        elif sha256_file(path) != want.get("sha256"):
            problems.append(f"{name}: content differs from the manifest (sha256 mismatch)")
    return problems
