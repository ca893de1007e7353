"""Throughput of lobsterd's chunked file encryption against ``openssl enc``, side by side.

Encrypts (and decrypts) the same 256 MiB file with
:func:`lobsterd.security.crypto.encrypt_stream` (AES-256-GCM, 1 MiB chunks, STREAM
construction) and with ``openssl enc -aes-256-ctr`` (unauthenticated CTR: ``enc`` has no
GCM mode, so CTR is the nearest baseline and a slightly unfair one in openssl's favour).
Runs alternate and the best of each is kept, because this kind of machine is noisy.

    /opt/lobsterd/venv/bin/python bench/crypto.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lobsterd.adapters.proc import run
from lobsterd.security.crypto import decrypt_stream, encrypt_stream


def _make_input(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(mib):
            # Vary each MiB cheaply so no layer can deduplicate or compress it.
            fh.write(i.to_bytes(8, "little") + block[8:])


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lobsterd-bench-") as tmp:
        d = Path(tmp)
        plain, ours_enc, ours_dec = d / "plain", d / "ours.enc", d / "ours.dec"
        ssl_enc, ssl_dec, pw = d / "ssl.enc", d / "ssl.dec", d / "pw"
        _make_input(plain, args.mib)
        key = secrets.token_bytes(32)
        # openssl gets its key from a 0600 file, never from argv.
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        ssl = ["openssl", "enc", "-aes-256-ctr", "-pass", f"file:{pw}", "-pbkdf2", "-iter", "1"]
        timeout = 30.0 + args.mib

        def ours_e() -> None:
            with open(plain, "rb") as s, open(ours_enc, "wb") as o:
                encrypt_stream(key, s, o, b"bench")

        def ours_d() -> None:
            with open(ours_enc, "rb") as s, open(ours_dec, "wb") as o:
                decrypt_stream(key, s, o, b"bench")

        def ssl_e() -> None:
            run([*ssl, "-e", "-in", str(plain), "-out", str(ssl_enc)], timeout=timeout)

        def ssl_d() -> None:
            run([*ssl, "-d", "-in", str(ssl_enc), "-out", str(ssl_dec)], timeout=timeout)

        best = {"ours enc": 1e9, "ours dec": 1e9, "openssl enc": 1e9, "openssl dec": 1e9}
        for _ in range(args.rounds):
            best["openssl enc"] = min(best["openssl enc"], _timed(ssl_e))
            best["ours enc"] = min(best["ours enc"], _timed(ours_e))
            best["openssl dec"] = min(best["openssl dec"], _timed(ssl_d))
            best["ours dec"] = min(best["ours dec"], _timed(ours_d))
        assert ours_dec.read_bytes() == plain.read_bytes(), "round trip failed"
        assert ssl_dec.stat().st_size == plain.stat().st_size

        mb = args.mib * (1 << 20) / 1e6
        print(f"{args.mib} MiB file, best of {args.rounds} rounds (MB/s = 10^6 bytes/s)")
        for what in ("enc", "dec"):
            ours, theirs = mb / best[f"ours {what}"], mb / best[f"openssl {what}"]
            print(f"  {what}: lobsterd AES-256-GCM STREAM {ours:8.1f} MB/s | "
                  f"openssl aes-256-ctr {theirs:8.1f} MB/s | ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
