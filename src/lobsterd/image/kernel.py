"""The guest kernel: a pinned Debian cloud kernel, as ``bzImage`` and as an ELF ``vmlinux``.

Debian's ``-cloud-amd64`` flavour is small and has ext4 built in, but virtio and overlayfs
are modules, so the module tree is kept for the initramfs. Firecracker and QEMU's microvm
boot fastest from an uncompressed ELF, which is not shipped: it is recovered from the
bzImage's compressed payload, located through the x86 boot protocol header
(``payload_offset``/``payload_length``, protocol >= 2.08).

Results are cached per kernel release and package version under
``<cache>/kernels/<release>_<version>/`` and re-verified (sizes and hashes) on every use.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lobsterd.adapters.proc import run
from lobsterd.errors import ExecFailed, ImageBuildFailed
from lobsterd.image.apt import DebianArchive
from lobsterd.image.util import (
    Progress,
    build_lock,
    clean_stale_tmp,
    new_tmp_dir,
    no_progress,
    publish_dir,
    sha256_file,
)

# The newest bookworm cloud kernel Debian's archive (bookworm-security) serves at the
# time of pinning. Override with ensure_kernel(release=..., package_version=...) when the
# archive drops it.
DEFAULT_KERNEL_RELEASE = "6.1.0-57-cloud-amd64"
DEFAULT_KERNEL_PACKAGE_VERSION = "6.1.192-3"
KERNEL_LAYOUT_VERSION = 1  # bump when the cached layout or the extraction changes

_HDR_MAGIC = b"HdrS"
_MIN_PROTOCOL = 0x208  # payload_offset/payload_length exist from boot protocol 2.08
_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 62

COMPRESSION_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x02\x21\x4c\x18", "lz4"),  # LZ4 legacy frame, as the kernel build writes it
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


@dataclass(frozen=True)
class KernelArtifacts:
    """A cached, verified kernel. ``version`` is the kernel release (``uname -r``)."""

    version: str
    package_version: str
    dir: Path
    bzimage: Path
    vmlinux: Path
    modules_dir: Path  # .../lib/modules/<release>, with modules.dep
    config: Path


@dataclass(frozen=True)
class BzImageHeader:
    setup_sects: int
    protocol: int
    payload_offset: int  # absolute offset of the compressed kernel in the file
    payload_length: int

    @property
    def protected_mode_offset(self) -> int:
        return (self.setup_sects + 1) * 512


def parse_bzimage_header(data: bytes) -> BzImageHeader:
    """Locate the compressed payload of a bzImage from its boot protocol header."""
    if len(data) < 0x250 or data[0x202:0x206] != _HDR_MAGIC:
        raise ImageBuildFailed("not a bzImage: boot header magic 'HdrS' missing")
    setup_sects = data[0x1F1] or 4  # 0 means 4 for very old images
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < _MIN_PROTOCOL:
        raise ImageBuildFailed(
            f"bzImage boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is too old "
            "to locate its payload (need 2.08)"
        )
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(data):
        raise ImageBuildFailed("bzImage payload lies outside the file: corrupt kernel image")
    return BzImageHeader(setup_sects, protocol, start, length)


def detect_compression(payload: bytes) -> str:
    for magic, name in COMPRESSION_MAGICS:
        if payload.startswith(magic):
            return name
    raise ImageBuildFailed(
        f"unknown kernel payload compression (magic {payload[:6].hex()})",
        hint="use a Debian kernel package whose bzImage lobsterd can unpack",
    )


def check_vmlinux(path: Path, expected_size: int | None = None) -> None:
    """Check that ``path`` is a whole x86-64 ELF: header, and every segment inside the file.

    ``expected_size`` is the uncompressed size the kernel build appends to its payload;
    a decompressor that stops early (or whose exit status cannot be trusted) is caught
    by comparing with it.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        ehdr = fh.read(64)
        if len(ehdr) < 64 or ehdr[:4] != _ELF_MAGIC:
            raise ImageBuildFailed(f"{path.name} is not an ELF file")
        if ehdr[4] != 2 or ehdr[5] != 1:
            raise ImageBuildFailed(f"{path.name} is not a 64-bit little-endian ELF")
        (machine,) = struct.unpack_from("<H", ehdr, 18)
        if machine != _EM_X86_64:
            raise ImageBuildFailed(f"{path.name} is not an x86-64 kernel (machine {machine})")
        phoff, shoff = struct.unpack_from("<QQ", ehdr, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", ehdr, 54)
        if phnum == 0:
            raise ImageBuildFailed(f"{path.name} has no program headers")
        if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
            raise ImageBuildFailed(f"{path.name} is truncated (headers beyond end of file)")
        fh.seek(phoff)
        table = fh.read(phnum * phentsize)
        for i in range(phnum):
            p_offset, _, _, p_filesz = struct.unpack_from("<QQQQ", table, i * phentsize + 8)
            if p_offset + p_filesz > size:
                raise ImageBuildFailed(f"{path.name} is truncated (segment {i} beyond end)")
    if expected_size is not None and size != expected_size:
        raise ImageBuildFailed(
            f"{path.name} has {size} bytes but the kernel says {expected_size}: "
            "decompression was incomplete"
        )


def _stream_decompress(decompressor: Any, src: bytes, out: BinaryIO) -> None:
    view = memoryview(src)
    for i in range(0, len(view), 1 << 20):
        if getattr(decompressor, "eof", False):
            break  # trailing bytes after the stream (the appended size) are not data
        out.write(decompressor.decompress(view[i : i + (1 << 20)]))


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF kernel contained in ``bzimage`` to ``out`` and verify it."""
    data = bzimage.read_bytes()
    hdr = parse_bzimage_header(data)
    payload = data[hdr.payload_offset : hdr.payload_offset + hdr.payload_length]
    (expected,) = struct.unpack_from("<I", payload, len(payload) - 4)
    kind = detect_compression(payload)
    if kind in ("lz4", "zstd"):
        packed = out.with_name(out.name + f".{kind}")
        packed.write_bytes(payload)
        try:
            # lz4 exits 1 on the size the kernel build appends after the stream although
            # the output is complete, so the exit status is ignored and the result
            # verified instead.
            run([kind, "-d", "-f", "-q", str(packed), str(out)], timeout=300, check=False)
        finally:
            packed.unlink(missing_ok=True)
        if not out.is_file():
            raise ImageBuildFailed(f"{kind} produced no output from the kernel payload")
    else:
        decomp: Any
        if kind == "gzip":
            decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "xz":
            decomp = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        elif kind == "lzma":
            decomp = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
        else:
            decomp = bz2.BZ2Decompressor()
        try:
            with out.open("wb") as fh:
                _stream_decompress(decomp, payload, fh)
        except (zlib.error, lzma.LZMAError, OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ImageBuildFailed(
                f"cannot decompress the kernel payload ({kind}): {exc}"
            ) from None
    check_vmlinux(out, expected)


def _manifest_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _tree_summary(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _artifacts(kdir: Path, release: str, package_version: str) -> KernelArtifacts:
    return KernelArtifacts(
        version=release,
        package_version=package_version,
        dir=kdir,
        bzimage=kdir / "bzImage",
        vmlinux=kdir / "vmlinux",
        modules_dir=kdir / "lib" / "modules" / release,
        config=kdir / "config",
    )


def verify_kernel(art: KernelArtifacts, *, deep: bool = True) -> bool:
    """True when the cached kernel matches its manifest (sizes; hashes when ``deep``)."""
    try:
        manifest = json.loads((art.dir / "kernel.json").read_text())
        if manifest.get("layout") != KERNEL_LAYOUT_VERSION:
            return False
        for name, path in (("bzImage", art.bzimage), ("vmlinux", art.vmlinux)):
            entry = manifest["files"][name]
            if path.stat().st_size != entry["size"]:
                return False
            if deep and sha256_file(path) != entry["sha256"]:
                return False
        if _tree_summary(art.modules_dir) != manifest["modules"]:
            return False
        return (art.modules_dir / "modules.dep").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def kernel_dir(cache_dir: Path, release: str, package_version: str) -> Path:
    return cache_dir / "kernels" / f"{release}_{package_version}"


def ensure_kernel(
    cache_dir: Path,
    progress: Progress = no_progress,
    *,
    release: str = DEFAULT_KERNEL_RELEASE,
    package_version: str = DEFAULT_KERNEL_PACKAGE_VERSION,
) -> KernelArtifacts:
    """Return the cached kernel ``release``, downloading and unpacking it if needed.

    ``cache_dir`` is lobsterd's cache directory (``cfg.paths.cache_dir``). Safe to call
    concurrently from several processes and to re-run after a crash.
    """
    kdir = kernel_dir(cache_dir, release, package_version)
    art = _artifacts(kdir, release, package_version)
    if verify_kernel(art):
        progress("kernel", f"{release} ({package_version}) cached")
        return art
    kernels = cache_dir / "kernels"
    with build_lock(kernels / ".lock", "kernel"):
        if verify_kernel(art):  # another process finished it while we waited
            return art
        clean_stale_tmp(kernels)
        tmp = new_tmp_dir(kernels, f"{release}_{package_version}")
        try:
            _build_kernel(cache_dir, tmp, release, package_version, progress)
            publish_dir(tmp, kdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not verify_kernel(art):
        raise ImageBuildFailed(f"kernel {release} failed verification right after unpacking")
    return art


def _build_kernel(
    cache_dir: Path, tmp: Path, release: str, package_version: str, progress: Progress
) -> None:
    package = f"linux-image-{release}"
    progress("kernel", f"downloading {package} {package_version} from Debian's archive")
    archive = DebianArchive(cache_dir / "apt" / "bookworm")
    deb = archive.download(package, package_version, tmp / "download")
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"], timeout=60).stdout
    if f"Package: {package}" not in fields or f"Version: {package_version}" not in fields:
        raise ImageBuildFailed(f"downloaded file is not {package} {package_version}")

    progress("kernel", "unpacking the package")
    unpacked = tmp / "unpacked"
    run(["dpkg-deb", "-x", str(deb), str(unpacked)], timeout=300)
    bz_src = unpacked / "boot" / f"vmlinuz-{release}"
    mod_src = unpacked / "lib" / "modules" / release
    if not bz_src.is_file() or not mod_src.is_dir():
        raise ImageBuildFailed(f"{package} does not contain the kernel and modules of {release}")
    art = _artifacts(tmp, release, package_version)
    os.replace(bz_src, art.bzimage)
    shutil.copyfile(unpacked / "boot" / f"config-{release}", art.config)
    art.modules_dir.parent.mkdir(parents=True)
    os.replace(mod_src, art.modules_dir)
    shutil.rmtree(unpacked)
    shutil.rmtree(tmp / "download")

    progress("kernel", "extracting the ELF vmlinux from the bzImage")
    extract_vmlinux(art.bzimage, art.vmlinux)

    progress("kernel", "indexing module dependencies")
    try:
        run(["depmod", "-b", str(tmp), release], timeout=300)
    except ExecFailed as exc:
        raise ImageBuildFailed(f"depmod failed: {exc.message}", hint="install kmod") from None
    for path in (art.bzimage, art.vmlinux, art.config):
        path.chmod(0o644)
    manifest = {
        "layout": KERNEL_LAYOUT_VERSION,
        "release": release,
        "package": package,
        "package_version": package_version,
        "files": {"bzImage": _manifest_entry(art.bzimage), "vmlinux": _manifest_entry(art.vmlinux)},
        "modules": _tree_summary(art.modules_dir),
    }
    (tmp / "kernel.json").write_text(json.dumps(manifest, indent=2) + "\n")
