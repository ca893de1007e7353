"""The host master key, per-purpose key derivation, and authenticated encryption.

Everything lobsterd encrypts at rest (the secrets store, suspend snapshots, ``snap``
archives) and the audit chain's HMAC hang off one 32-byte **host master key**. It is
never used directly: :meth:`MasterKey.derive` runs HKDF-SHA256 with a purpose label
("secrets", "audit", "snapshot:<tenant>", ...) so a key leaked from one purpose says
nothing about another, and per-tenant keys fall out of the context argument.

Where the master key comes from, first match wins:

1. ``$LOBSTERD_MASTER_KEY`` — 32 bytes as 64 hex digits or base64;
2. ``$CREDENTIALS_DIRECTORY/lobsterd-master-key`` — systemd ``LoadCredential=``;
3. ``cfg.paths.master_key`` — a root-owned 0600 file written by ``lobsterd init``.

A key is identified by a *key id*: the first 8 bytes of SHA-256 over a subkey derived for
that purpose alone, so the id can be stored next to data (and printed in errors) without
revealing anything about the key. Stores remember the id they were created under and
compare it before decrypting, which turns "wrong key" into a clear error instead of a
puzzling authentication failure (or, worse, garbage).

Formats (all versioned by a leading byte so they can evolve):

* :func:`seal` / :func:`open_`: ``0x01 || nonce(12) || AES-256-GCM(ciphertext || tag)``
  for small values; a random 96-bit nonce per message.
* :func:`encrypt_stream` / :func:`decrypt_stream`: the STREAM construction (Hoang et al.,
  "Online authenticated-encryption and its nonce-reuse misuse-resistance") over
  AES-256-GCM for files of any size. The header carries a random 16-byte salt from which
  a per-file key is derived (so nonces never repeat across files, however many are
  written under one key), a random 7-byte nonce prefix, the chunk size, and a key check
  value that tells a wrong key apart from tampering. Chunk *i* is sealed under the nonce
  ``prefix(7) || i(4, big-endian) || last(1)`` with the header, *i*, the final-chunk flag
  and the caller's AAD as associated data, so reordering, dropping, duplicating,
  truncating or appending chunks all fail authentication.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets as pysecrets
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lobsterd.errors import DecryptionFailed, MasterKeyError, StorageError

if TYPE_CHECKING:
    from lobsterd.config import Config

KEY_LEN = 32
ENV_MASTER_KEY = "LOBSTERD_MASTER_KEY"
CREDENTIAL_NAME = "lobsterd-master-key"

_HKDF_SALT = b"lobsterd master key v1"
_NONCE_LEN = 12
_TAG_LEN = 16
_SEAL_VERSION = 1

_STREAM_MAGIC = b"LBSE"
_STREAM_VERSION = 1
_STREAM_SALT_LEN = 16
_STREAM_PREFIX_LEN = 7
_STREAM_CHECK_LEN = 16
# magic(4) version(1) reserved(3) chunk_size(4) salt(16) prefix(7) reserved(1) check(16)
_STREAM_HEADER = struct.Struct(">4sB3xI16s7sx16s")
STREAM_HEADER_LEN = _STREAM_HEADER.size
DEFAULT_CHUNK = 1 << 20
MIN_CHUNK = 1 << 10
MAX_CHUNK = 1 << 26
_MAX_CHUNKS = 1 << 32


# --------------------------------------------------------------------------- master key


def _hkdf(ikm: bytes, info: bytes, length: int = KEY_LEN, salt: bytes = _HKDF_SALT) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _decode_key_text(text: str) -> bytes | None:
    """32 bytes from 64 hex digits or base64 (standard or URL-safe); None if neither."""
    text = text.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    if b"-" in data or b"_" in data:
        data = data.replace(b"-", b"+").replace(b"_", b"/")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LEN else None


def _decode_key_file(data: bytes) -> bytes | None:
    """A key file holds the raw 32 bytes, or the key as hex/base64 text (one line)."""
    if len(data) == KEY_LEN:
        return data
    try:
        return _decode_key_text(data.decode("ascii"))
    except UnicodeDecodeError:
        return None


class MasterKey:
    """The host master key. ``repr``/``str`` show only its key id and where it came from."""

    __slots__ = ("_key", "key_id", "source")

    def __init__(self, key: bytes, source: str = "memory") -> None:
        if len(key) != KEY_LEN:
            raise MasterKeyError(f"master key from {source} is not {KEY_LEN} bytes")
        self._key = bytes(key)
        self.source = source
        self.key_id = hashlib.sha256(self.derive("key-id")).digest()[:8].hex()

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id}, source={self.source})"

    __str__ = __repr__

    @classmethod
    def generate(cls) -> MasterKey:
        """A fresh random key held in memory only (tests, tools)."""
        return cls(pysecrets.token_bytes(KEY_LEN), "generated")

    def derive(self, purpose: str, context: bytes = b"", length: int = KEY_LEN) -> bytes:
        """A subkey for ``purpose`` (e.g. "secrets", "audit", "snapshot:<tenant>").

        The purpose is length-prefixed in the HKDF info so ("ab", b"c") and ("a", b"bc")
        can never yield the same key.
        """
        label = purpose.encode("utf-8")
        if not label or len(label) > 255:
            raise ValueError("purpose must be 1-255 bytes")
        info = b"lobsterd/v1\x00" + bytes([len(label)]) + label + context
        return _hkdf(self._key, info, length)

    def check_key_id(self, expected: str, what: str = "this store") -> None:
        """Raise unless this key is the one ``expected`` (a stored key id) names."""
        if not hmac.compare_digest(self.key_id, expected):
            raise MasterKeyError(
                f"master key does not match the one {what} was created with "
                f"(key id {self.key_id}, store expects {expected})",
                hint=f"supply the original master key (${ENV_MASTER_KEY}, the credentials "
                "directory or the key file); the key in use came from " + self.source,
            )

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def load(cls, cfg: Config, environ: Mapping[str, str] | None = None) -> MasterKey:
        """Load the key from the first source present; raise :class:`MasterKeyError`."""
        key = cls.try_load(cfg, environ)
        if key is None:
            raise MasterKeyError(
                f"no master key: ${ENV_MASTER_KEY} is unset, there is no "
                f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}, and {cfg.paths.master_key} "
                "does not exist",
                hint="run lobsterd init to create one",
            )
        return key

    @classmethod
    def try_load(cls, cfg: Config, environ: Mapping[str, str] | None = None) -> MasterKey | None:
        """Like :meth:`load` but None when no source exists (a bad source still raises)."""
        env = os.environ if environ is None else environ
        text = env.get(ENV_MASTER_KEY)
        if text:
            raw = _decode_key_text(text)
            if raw is None:
                raise MasterKeyError(
                    f"${ENV_MASTER_KEY} is not a {KEY_LEN}-byte key in hex or base64",
                    hint="generate one with: head -c 32 /dev/urandom | base64",
                )
            return cls(raw, f"${ENV_MASTER_KEY}")
        creds = env.get("CREDENTIALS_DIRECTORY")
        if creds:
            path = Path(creds) / CREDENTIAL_NAME
            if path.exists():
                return cls(_read_key_file(path, check_owner=False), f"credential {path}")
        path = cfg.paths.master_key
        try:
            os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. an unreadable config dir: not the same as "missing"
            raise MasterKeyError(f"cannot read master key {path}: {exc.strerror or exc}",
                                 hint="run as root") from None
        return cls(_read_key_file(path, check_owner=True), str(path))

    @classmethod
    def create(cls, path: Path) -> tuple[MasterKey, bool]:
        """Create a new key file at ``path`` unless one exists; returns (key, created).

        Never overwrites: the key is written to an ``O_EXCL`` 0600 temporary file,
        fsynced, then hard-linked into place (``link`` fails if ``path`` exists, so two
        racing inits agree on one key and a crash never leaves a half-written key file).
        """
        try:
            os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MasterKeyError(f"cannot read master key {path}: {exc.strerror or exc}",
                                 hint="run as root") from None
        else:
            return cls(_read_key_file(path, check_owner=True), str(path)), False
        raw = pysecrets.token_bytes(KEY_LEN)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{pysecrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, raw.hex().encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
        except OSError as exc:
            raise MasterKeyError(
                f"cannot create master key {path}: {exc.strerror or exc}",
                hint="run lobsterd init as root",
            ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _fsync_dir(path.parent)
        if not created:
            return cls(_read_key_file(path, check_owner=True), str(path)), False
        return cls(raw, str(path)), True


def _read_key_file(path: Path, *, check_owner: bool) -> bytes:
    """Read a key file, refusing symlinks, non-files, foreign owners and loose modes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        hint = "run as root" if exc.errno in (1, 13) else "run lobsterd init"
        raise MasterKeyError(f"cannot read master key {path}: {exc.strerror or exc}",
                             hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(f"master key {path} is not a regular file")
        if check_owner:
            if st.st_uid not in (0, os.geteuid()):
                raise MasterKeyError(
                    f"master key {path} is owned by uid {st.st_uid}, not root",
                    hint=f"chown root:root {path}",
                )
            if st.st_mode & 0o077:
                raise MasterKeyError(
                    f"master key {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                    "it must be readable by its owner only",
                    hint=f"chmod 600 {path}",
                )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    raw = _decode_key_file(data)
    if raw is None:
        raise MasterKeyError(
            f"master key {path} does not hold a {KEY_LEN}-byte key (raw, hex or base64)",
            hint="restore it from backup; a new key cannot read existing secrets",
        )
    return raw


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_master_key(cfg: Config) -> bool:
    """Make sure a master key exists (called by ``lobsterd init``); True if one was created.

    A key supplied by the environment or a credentials directory wins and no file is
    written. Otherwise the key file is created once and never replaced.
    """
    existing = MasterKey.try_load(cfg)
    if existing is not None:
        return False
    _key, created = MasterKey.create(cfg.paths.master_key)
    return created


# --------------------------------------------------------------------------- small AEAD


def _check_key(key: bytes) -> AESGCM:
    if len(key) != KEY_LEN:
        raise ValueError(f"AES-256-GCM needs a {KEY_LEN}-byte key")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate ``plaintext``; ``aad`` is bound but not stored."""
    nonce = os.urandom(_NONCE_LEN)
    return bytes([_SEAL_VERSION]) + nonce + _check_key(key).encrypt(nonce, plaintext, aad)


def open_(key: bytes, blob: bytes, aad: bytes = b"") -> bytes:
    """Reverse :func:`seal`; any change to blob, key or aad raises DecryptionFailed."""
    aead = _check_key(key)
    if len(blob) < 1 + _NONCE_LEN + _TAG_LEN or blob[0] != _SEAL_VERSION:
        raise DecryptionFailed("encrypted value is malformed or of an unknown version")
    try:
        return aead.decrypt(blob[1:1 + _NONCE_LEN], blob[1 + _NONCE_LEN:], aad)
    except InvalidTag:
        raise DecryptionFailed(
            "encrypted value failed authentication: it was modified, moved, or sealed "
            "under another key"
        ) from None


# --------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class _StreamHeader:
    chunk_size: int
    salt: bytes
    prefix: bytes
    check: bytes

    def pack(self) -> bytes:
        return _STREAM_HEADER.pack(_STREAM_MAGIC, _STREAM_VERSION, self.chunk_size,
                                   self.salt, self.prefix, self.check)


def _stream_keys(key: bytes, salt: bytes) -> tuple[AESGCM, bytes]:
    """The per-file AEAD and its key check value (HMAC, so it reveals nothing)."""
    _check_key(key)
    file_key = _hkdf(key, b"lobsterd stream v1 file key", salt=salt)
    check = hmac.new(file_key, b"lobsterd stream v1 key check", hashlib.sha256).digest()
    return AESGCM(file_key), check[:_STREAM_CHECK_LEN]


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _chunk_aad(header: bytes, index: int, last: bool, aad: bytes) -> bytes:
    return header + struct.pack(">QB", index, 1 if last else 0) + aad


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes unless EOF comes first (pipes return short reads)."""
    first = src.read(n)
    if not first or len(first) == n:
        return first or b""
    parts = [first]
    got = len(first)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def encrypt_stream(
    key: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    aad: bytes = b"",
    chunk_size: int = DEFAULT_CHUNK,
) -> int:
    """Encrypt ``src`` to ``dst`` in authenticated chunks; returns the plaintext length."""
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be within {MIN_CHUNK}..{MAX_CHUNK}")
    salt = os.urandom(_STREAM_SALT_LEN)
    aead, check = _stream_keys(key, salt)
    header = _StreamHeader(chunk_size, salt, os.urandom(_STREAM_PREFIX_LEN), check)
    hdr = header.pack()
    dst.write(hdr)
    total = 0
    index = 0
    current = _read_full(src, chunk_size)
    while True:
        following = _read_full(src, chunk_size) if len(current) == chunk_size else b""
        last = not following
        if index >= _MAX_CHUNKS:
            raise StorageError("file too large for one encrypted stream")
        dst.write(aead.encrypt(_nonce(header.prefix, index, last), current,
                               _chunk_aad(hdr, index, last, aad)))
        total += len(current)
        if last:
            return total
        index += 1
        current = following


def _parse_header(raw: bytes) -> _StreamHeader:
    if len(raw) < STREAM_HEADER_LEN:
        raise DecryptionFailed("encrypted file is truncated (incomplete header)")
    magic, version, chunk_size, salt, prefix, check = _STREAM_HEADER.unpack(raw)
    if magic != _STREAM_MAGIC:
        raise DecryptionFailed("not a lobsterd encrypted file (bad magic)")
    if version != _STREAM_VERSION:
        raise DecryptionFailed(f"encrypted file has unknown format version {version}")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise DecryptionFailed("encrypted file header is corrupt (chunk size out of range)")
    return _StreamHeader(chunk_size, salt, prefix, check)


def decrypt_stream(key: bytes, src: BinaryIO, dst: BinaryIO, aad: bytes = b"") -> int:
    """Decrypt what :func:`encrypt_stream` wrote; returns the plaintext length.

    Plaintext is written chunk by chunk as each one authenticates, so on failure
    ``dst`` holds a prefix of the data: write to a temporary file and rename it only
    when this returns (see :func:`decrypt_file`).
    """
    raw = _read_full(src, STREAM_HEADER_LEN)
    hdr = _parse_header(raw)
    aead, check = _stream_keys(key, hdr.salt)
    if not hmac.compare_digest(check, hdr.check):
        raise DecryptionFailed(
            "encrypted file was written under a different key (key check failed)")
    ct_len = hdr.chunk_size + _TAG_LEN
    total = 0
    index = 0
    current = _read_full(src, ct_len)
    while True:
        following = _read_full(src, ct_len) if len(current) == ct_len else b""
        last = not following
        if len(current) < _TAG_LEN:
            raise DecryptionFailed(f"encrypted file is truncated (chunk {index})")
        try:
            plain = aead.decrypt(_nonce(hdr.prefix, index, last), current,
                                 _chunk_aad(raw, index, last, aad))
        except InvalidTag:
            raise DecryptionFailed(
                f"encrypted file failed authentication at chunk {index}: it was modified, "
                "truncated, reordered or extended, or its associated data differs"
            ) from None
        dst.write(plain)
        total += len(plain)
        if last:
            return total
        index += 1
        if index >= _MAX_CHUNKS:
            raise DecryptionFailed("encrypted file has too many chunks")
        current = following


def _atomic_output(dst_path: Path) -> tuple[int, Path]:
    tmp = dst_path.with_name(f".{dst_path.name}.{pysecrets.token_hex(6)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    return fd, tmp


_StreamFn = Callable[[bytes, BinaryIO, BinaryIO, bytes], int]


def _transform_file(src_path: Path, dst_path: Path, fn: _StreamFn, key: bytes,
                    aad: bytes) -> int:
    fd, tmp = _atomic_output(dst_path)
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as dst:
            n = fn(key, src, dst, aad)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, dst_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dst_path.parent)
    return n


def encrypt_file(key: bytes, src_path: Path, dst_path: Path, aad: bytes = b"") -> int:
    """Encrypt a file into ``dst_path`` (0600) atomically: a crash leaves no partial file."""
    return _transform_file(src_path, dst_path, encrypt_stream, key, aad)


def decrypt_file(key: bytes, src_path: Path, dst_path: Path, aad: bytes = b"") -> int:
    """Decrypt into ``dst_path`` (0600); it appears only if every chunk authenticated."""
    return _transform_file(src_path, dst_path, decrypt_stream, key, aad)
