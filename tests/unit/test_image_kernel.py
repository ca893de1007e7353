"""bzImage header parsing, payload location and vmlinux extraction on fabricated kernels."""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
from pathlib import Path

import pytest

from lobsterd.errors import ImageBuildFailed
from lobsterd.image.kernel import (
    check_vmlinux,
    detect_compression,
    extract_vmlinux,
    parse_bzimage_header,
)
from tests.helpers import need_binary


def fake_elf(body: int = 5000) -> bytes:
    """A minimal x86-64 ELF: header, one program header, a segment of ``body`` bytes."""
    phoff = 64
    seg_off = phoff + 56
    ehdr = bytearray(64)
    ehdr[:4] = b"\x7fELF"
    ehdr[4], ehdr[5], ehdr[6] = 2, 1, 1
    struct.pack_into("<HHI", ehdr, 16, 2, 62, 1)  # ET_EXEC, EM_X86_64, version
    struct.pack_into("<QQQ", ehdr, 24, 0x1000000, phoff, 0)  # entry, phoff, shoff
    struct.pack_into("<IHHHHHH", ehdr, 48, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, seg_off, 0x1000000, 0x1000000, body, body, 0x1000)
    return bytes(ehdr) + phdr + bytes(range(256)) * (body // 256) + b"\x90" * (body % 256)


def fake_bzimage(
    payload: bytes, setup_sects: int = 3, offset: int = 0x200, tail: int = 64
) -> bytes:
    pm = (setup_sects + 1) * 512
    data = bytearray(pm + offset + len(payload) + tail)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    struct.pack_into("<II", data, 0x248, offset, len(payload))
    data[pm + offset : pm + offset + len(payload)] = payload
    return bytes(data)


def with_size(compressed: bytes, raw: bytes) -> bytes:
    """What the kernel build does: the uncompressed size appended after the stream."""
    return compressed + struct.pack("<I", len(raw))


def test_header_locates_payload() -> None:
    payload = b"\x1f\x8b" + b"x" * 100
    img = fake_bzimage(payload, setup_sects=5, offset=0x345)
    hdr = parse_bzimage_header(img)
    assert hdr.setup_sects == 5
    assert hdr.protocol == 0x20F
    assert hdr.payload_offset == 6 * 512 + 0x345
    assert hdr.payload_length == len(payload)
    assert img[hdr.payload_offset : hdr.payload_offset + hdr.payload_length] == payload


def test_zero_setup_sects_means_four() -> None:
    img = bytearray(fake_bzimage(b"\x1f\x8babc", setup_sects=4))
    img[0x1F1] = 0
    assert parse_bzimage_header(bytes(img)).payload_offset == 5 * 512 + 0x200


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.__setitem__(slice(0x202, 0x206), b"NOPE"), "HdrS"),
        (lambda d: struct.pack_into("<H", d, 0x206, 0x207), "too old"),
        (lambda d: struct.pack_into("<I", d, 0x24C, 10**9), "outside"),
        (lambda d: struct.pack_into("<I", d, 0x24C, 0), "outside"),
    ],
)
def test_header_rejects_bad_images(mutate: object, message: str) -> None:
    img = bytearray(fake_bzimage(b"\x1f\x8b" + b"y" * 50))
    mutate(img)  # type: ignore[operator]
    with pytest.raises(ImageBuildFailed, match=message):
        parse_bzimage_header(bytes(img))


def test_header_rejects_short_input() -> None:
    with pytest.raises(ImageBuildFailed):
        parse_bzimage_header(b"\0" * 100)


@pytest.mark.parametrize(
    "magic, name",
    [
        (b"\x02\x21\x4c\x18", "lz4"),
        (b"\x1f\x8b\x08", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh9", "bzip2"),
    ],
)
def test_detect_compression(magic: bytes, name: str) -> None:
    assert detect_compression(magic + b"rest") == name


def test_detect_compression_unknown() -> None:
    with pytest.raises(ImageBuildFailed, match="unknown"):
        detect_compression(b"\x00\x01\x02\x03")


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_extract_vmlinux_in_python(tmp_path: Path, kind: str) -> None:
    elf = fake_elf(20_000)
    packed = gzip.compress(elf) if kind == "gzip" else lzma.compress(elf, lzma.FORMAT_XZ)
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(with_size(packed, elf)))
    out = tmp_path / "vmlinux"
    extract_vmlinux(bz, out)
    assert out.read_bytes() == elf


def test_extract_vmlinux_lz4_trailing_bytes(tmp_path: Path) -> None:
    """lz4 exits non-zero on the appended size; the output is still complete and accepted."""
    need_binary("lz4")
    elf = fake_elf(300_000)
    packed = subprocess.run(
        ["lz4", "-l", "-c", "-q"], input=elf, capture_output=True, check=True, timeout=30
    ).stdout
    assert packed.startswith(b"\x02\x21\x4c\x18")
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(with_size(packed, elf)))
    out = tmp_path / "vmlinux"
    extract_vmlinux(bz, out)
    assert out.read_bytes() == elf
    assert not list(tmp_path.glob("*.lz4"))


def test_extract_detects_size_mismatch(tmp_path: Path) -> None:
    elf = fake_elf(4096)
    packed = gzip.compress(elf) + struct.pack("<I", len(elf) + 1)
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(packed))
    with pytest.raises(ImageBuildFailed, match="incomplete"):
        extract_vmlinux(bz, tmp_path / "vmlinux")


def test_check_vmlinux_rejects_non_elf_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"MZ" + b"\0" * 100)
    with pytest.raises(ImageBuildFailed, match="not an ELF"):
        check_vmlinux(path)
    elf = fake_elf(10_000)
    path.write_bytes(elf[:5000])
    with pytest.raises(ImageBuildFailed, match="truncated"):
        check_vmlinux(path)
    wrong_arch = bytearray(elf)
    struct.pack_into("<H", wrong_arch, 18, 183)  # aarch64
    path.write_bytes(bytes(wrong_arch))
    with pytest.raises(ImageBuildFailed, match="x86-64"):
        check_vmlinux(path)
    path.write_bytes(elf)
    check_vmlinux(path, len(elf))
