"""Master key loading, key derivation, sealing and the chunked STREAM file format."""

from __future__ import annotations

import base64
import io
import os
import secrets
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lobsterd.config import Config
from lobsterd.errors import DecryptionFailed, MasterKeyError
from lobsterd.security.crypto import (
    ENV_MASTER_KEY,
    STREAM_HEADER_LEN,
    MasterKey,
    decrypt_file,
    decrypt_stream,
    encrypt_file,
    encrypt_stream,
    ensure_master_key,
    open_,
    seal,
)

CHUNK = 1024
TAG = 16


def _key() -> bytes:
    return secrets.token_bytes(32)


# ---------------------------------------------------------------- seal / open_


def test_seal_round_trip_and_fresh_nonce() -> None:
    k = _key()
    a = seal(k, b"payload", b"aad")
    b = seal(k, b"payload", b"aad")
    assert a != b  # random nonce
    assert open_(k, a, b"aad") == b"payload"
    assert b"payload" not in a


def test_seal_detects_every_single_bit_flip() -> None:
    k = _key()
    blob = seal(k, b"some secret text", b"ctx")
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(DecryptionFailed):
                open_(k, bytes(bad), b"ctx")


def test_seal_wrong_key_wrong_aad_truncated() -> None:
    k = _key()
    blob = seal(k, b"x" * 50, b"scope\x00name")
    with pytest.raises(DecryptionFailed):
        open_(_key(), blob, b"scope\x00name")
    with pytest.raises(DecryptionFailed):
        open_(k, blob, b"scope\x00other")
    with pytest.raises(DecryptionFailed):
        open_(k, blob[:-1], b"scope\x00name")
    with pytest.raises(DecryptionFailed):
        open_(k, blob[:10], b"scope\x00name")
    with pytest.raises(DecryptionFailed):
        open_(k, blob + b"\x00", b"scope\x00name")
    with pytest.raises(ValueError):
        seal(b"short", b"x")


# ---------------------------------------------------------------- master key


def test_derive_is_deterministic_and_separated() -> None:
    m = MasterKey(_key())
    assert m.derive("secrets") == m.derive("secrets")
    assert len(m.derive("secrets")) == 32
    keys = {
        m.derive("secrets"),
        m.derive("audit"),
        m.derive("snapshot:alice"),
        m.derive("snapshot:bob"),
        m.derive("ab", b"c"),
        m.derive("a", b"bc"),
        m.derive("secrets", b"ctx"),
    }
    assert len(keys) == 7
    assert MasterKey(_key()).derive("secrets") != m.derive("secrets")


def test_key_id_reveals_nothing_and_repr_hides_key() -> None:
    raw = _key()
    m = MasterKey(raw, "test")
    assert len(m.key_id) == 16
    assert m.key_id == MasterKey(raw).key_id
    assert m.key_id != MasterKey(_key()).key_id
    assert m.key_id not in raw.hex()
    for text in (repr(m), str(m), f"{m}"):
        assert raw.hex() not in text
        assert base64.b64encode(raw).decode() not in text
        assert m.key_id in text


def test_check_key_id_mismatch_names_both_ids() -> None:
    a, b = MasterKey(_key()), MasterKey(_key())
    a.check_key_id(a.key_id)
    with pytest.raises(MasterKeyError) as ei:
        a.check_key_id(b.key_id)
    msg = str(ei.value)
    assert "does not match" in msg
    assert a.key_id in msg and b.key_id in msg


def test_load_missing_key_says_run_init(tmp_config: Config) -> None:
    with pytest.raises(MasterKeyError) as ei:
        MasterKey.load(tmp_config, environ={})
    assert "lobsterd init" in str(ei.value)
    assert MasterKey.try_load(tmp_config, environ={}) is None


@pytest.mark.parametrize("encode", [
    lambda b: b.hex(),
    lambda b: b.hex().upper(),
    lambda b: base64.b64encode(b).decode(),
    lambda b: base64.urlsafe_b64encode(b).decode(),
    lambda b: base64.b64encode(b).decode() + "\n",
])
def test_load_from_env(tmp_config: Config, encode: object) -> None:
    raw = _key()
    text = encode(raw)  # type: ignore[operator]
    m = MasterKey.load(tmp_config, environ={ENV_MASTER_KEY: text})
    assert m.key_id == MasterKey(raw).key_id
    assert ENV_MASTER_KEY in m.source


@pytest.mark.parametrize("bad", ["tooshort", "zz" * 32, "A" * 43, "a" * 63])
def test_load_from_env_rejects_garbage_without_echoing_it(tmp_config: Config, bad: str) -> None:
    with pytest.raises(MasterKeyError) as ei:
        MasterKey.load(tmp_config, environ={ENV_MASTER_KEY: bad})
    assert bad not in str(ei.value)
    assert ENV_MASTER_KEY in str(ei.value)


def test_env_wins_over_credentials_over_file(tmp_config: Config, tmp_path: Path) -> None:
    file_key, _ = MasterKey.create(tmp_config.paths.master_key)
    creds = tmp_path / "creds"
    creds.mkdir()
    cred_raw = _key()
    (creds / "lobsterd-master-key").write_bytes(cred_raw)
    env_raw = _key()
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert MasterKey.load(tmp_config, environ=env).key_id == MasterKey(cred_raw).key_id
    env[ENV_MASTER_KEY] = env_raw.hex()
    assert MasterKey.load(tmp_config, environ=env).key_id == MasterKey(env_raw).key_id
    assert MasterKey.load(tmp_config, environ={}).key_id == file_key.key_id


def test_create_is_idempotent_0600_and_never_overwrites(tmp_config: Config) -> None:
    path = tmp_config.paths.master_key
    k1, created1 = MasterKey.create(path)
    content = path.read_bytes()
    k2, created2 = MasterKey.create(path)
    assert created1 and not created2
    assert k1.key_id == k2.key_id
    assert path.read_bytes() == content
    assert (path.stat().st_mode & 0o777) == 0o600
    assert MasterKey.load(tmp_config, environ={}).key_id == k1.key_id
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_racing_creates_agree_on_one_key(tmp_config: Config) -> None:
    ids: list[str] = []
    created: list[bool] = []

    def go() -> None:
        k, c = MasterKey.create(tmp_config.paths.master_key)
        ids.append(k.key_id)
        created.append(c)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert created.count(True) == 1


def test_file_with_loose_mode_is_refused(tmp_config: Config) -> None:
    path = tmp_config.paths.master_key
    MasterKey.create(path)
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(MasterKeyError) as ei:
            MasterKey.load(tmp_config, environ={})
        assert "chmod 600" in str(ei.value)
    path.chmod(0o400)
    MasterKey.load(tmp_config, environ={})


def test_symlinked_or_garbage_key_file_is_refused(tmp_config: Config, tmp_path: Path) -> None:
    path = tmp_config.paths.master_key
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_bytes(_key())
    target.chmod(0o600)
    path.symlink_to(target)
    with pytest.raises(MasterKeyError):
        MasterKey.load(tmp_config, environ={})
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key at all\n")
    os.close(fd)
    with pytest.raises(MasterKeyError) as ei:
        MasterKey.load(tmp_config, environ={})
    assert "does not hold" in str(ei.value)
    # And create() must not replace it either.
    with pytest.raises(MasterKeyError):
        MasterKey.create(path)
    assert path.read_bytes() == b"not a key at all\n"


def test_raw_32_byte_file_is_accepted(tmp_config: Config) -> None:
    path = tmp_config.paths.master_key
    path.parent.mkdir(parents=True)
    raw = _key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, raw)
    os.close(fd)
    assert MasterKey.load(tmp_config, environ={}).key_id == MasterKey(raw).key_id


def test_ensure_master_key(tmp_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MASTER_KEY, _key().hex())
    assert ensure_master_key(tmp_config) is False
    assert not tmp_config.paths.master_key.exists()  # env key: no file written
    monkeypatch.delenv(ENV_MASTER_KEY)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert ensure_master_key(tmp_config) is True
    assert ensure_master_key(tmp_config) is False


# ---------------------------------------------------------------- streams


def _enc(key: bytes, data: bytes, aad: bytes = b"", chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    assert encrypt_stream(key, io.BytesIO(data), out, aad, chunk_size=chunk) == len(data)
    return out.getvalue()


def _dec(key: bytes, blob: bytes, aad: bytes = b"") -> bytes:
    out = io.BytesIO()
    n = decrypt_stream(key, io.BytesIO(blob), out, aad)
    assert n == len(out.getvalue())
    return out.getvalue()


def _chunks(blob: bytes, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    header, body = blob[:STREAM_HEADER_LEN], blob[STREAM_HEADER_LEN:]
    step = chunk + TAG
    return header, [body[i:i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_stream_round_trip_sizes(size: int) -> None:
    k = _key()
    data = os.urandom(size)
    blob = _enc(k, data, b"tenant:alice")
    assert _dec(k, blob, b"tenant:alice") == data
    chunks = max(1, -(-size // CHUNK))
    assert len(blob) == STREAM_HEADER_LEN + size + TAG * chunks
    if size >= 16:
        assert data[:16] not in blob


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.sampled_from([1024, 2048, 4096]),
       aad=st.binary(max_size=40))
def test_stream_round_trip_property(data: bytes, chunk: int, aad: bytes) -> None:
    k = b"\x07" * 32
    assert _dec(k, _enc(k, data, aad, chunk), aad) == data


class _Trickle(io.RawIOBase):
    """A source that returns at most 100 bytes per read, like a pipe."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(min(n, 100) if n >= 0 else 100)


def test_stream_handles_short_reads() -> None:
    k = _key()
    data = os.urandom(5 * CHUNK + 3)
    out = io.BytesIO()
    encrypt_stream(k, _Trickle(data), out, chunk_size=CHUNK)  # type: ignore[arg-type]
    back = io.BytesIO()
    decrypt_stream(k, _Trickle(out.getvalue()), back)  # type: ignore[arg-type]
    assert back.getvalue() == data


def _tampered(blob: bytes) -> dict[str, bytes]:
    header, chunks = _chunks(blob)
    assert len(chunks) == 4
    flip = bytearray(blob)
    flip[STREAM_HEADER_LEN + CHUNK + TAG + 5] ^= 0x01
    return {
        "bit flip in chunk 1": bytes(flip),
        "swap chunks 0 and 1": header + chunks[1] + chunks[0] + chunks[2] + chunks[3],
        "duplicate chunk 1": header + chunks[0] + chunks[1] + chunks[1] + chunks[2] + chunks[3],
        "drop middle chunk": header + chunks[0] + chunks[2] + chunks[3],
        "drop final chunk": header + b"".join(chunks[:3]),
        "truncate mid chunk": blob[:-10],
        "truncate to header": header,
        "truncate header": blob[:STREAM_HEADER_LEN - 1],
        "append bytes": blob + b"\x00" * 20,
        "append copy of last chunk": blob + chunks[3],
        "final chunk moved earlier": header + chunks[0] + chunks[1] + chunks[3],
        "empty": b"",
    }


def test_stream_tampering_is_detected() -> None:
    k = _key()
    data = os.urandom(3 * CHUNK + 100)
    blob = _enc(k, data)
    undetected = []
    for what, bad in _tampered(blob).items():
        try:
            _dec(k, bad)
        except DecryptionFailed:
            continue
        undetected.append(what)
    assert undetected == []


def test_stream_header_fields_are_authenticated() -> None:
    k = _key()
    blob = _enc(k, os.urandom(2 * CHUNK))
    for offset in range(STREAM_HEADER_LEN):
        bad = bytearray(blob)
        bad[offset] ^= 0x80
        with pytest.raises(DecryptionFailed):
            _dec(k, bytes(bad))


def test_stream_chunk_size_forged_in_header() -> None:
    k = _key()
    blob = bytearray(_enc(k, os.urandom(4 * CHUNK)))
    struct.pack_into(">I", blob, 8, 2 * CHUNK)  # claim bigger chunks
    with pytest.raises(DecryptionFailed):
        _dec(k, bytes(blob))


def test_stream_wrong_key_is_named_and_writes_nothing() -> None:
    blob = _enc(_key(), b"secret memory" * 500)
    out = io.BytesIO()
    with pytest.raises(DecryptionFailed) as ei:
        decrypt_stream(_key(), io.BytesIO(blob), out)
    assert "different key" in str(ei.value)
    assert out.getvalue() == b""


def test_stream_wrong_aad_fails() -> None:
    k = _key()
    blob = _enc(k, b"guest memory", b"snapshot:alice")
    with pytest.raises(DecryptionFailed):
        _dec(k, blob, b"snapshot:bob")


def test_stream_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError):
        encrypt_stream(_key(), io.BytesIO(b""), io.BytesIO(), chunk_size=10)


def test_file_helpers_are_atomic(tmp_path: Path) -> None:
    k = _key()
    plain = tmp_path / "mem"
    plain.write_bytes(os.urandom(3 * 1024 * 1024 + 11))
    enc = tmp_path / "mem.enc"
    assert encrypt_file(k, plain, enc, b"a") == plain.stat().st_size
    assert (enc.stat().st_mode & 0o777) == 0o600
    out = tmp_path / "mem.out"
    decrypt_file(k, enc, out, b"a")
    assert out.read_bytes() == plain.read_bytes()
    assert (out.stat().st_mode & 0o777) == 0o600

    # Corrupt the last chunk: the output must not appear, and no temp file stays behind.
    data = bytearray(enc.read_bytes())
    data[-3] ^= 1
    enc.write_bytes(bytes(data))
    target = tmp_path / "never"
    with pytest.raises(DecryptionFailed):
        decrypt_file(k, enc, target, b"a")
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "mem.enc", "mem.out"]


def test_stream_is_not_slower_than_it_should_be() -> None:
    """A smoke bound (the real comparison with openssl is bench/crypto.py)."""
    import time

    k = _key()
    data = os.urandom(16 * 1024 * 1024)
    src, dst = io.BytesIO(data), io.BytesIO()
    t = time.perf_counter()
    encrypt_stream(k, src, dst)
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0, f"16 MiB took {elapsed:.2f}s"
