"""Per-tenant SSH keys for ``exec``: generated in-process, never leave the host's state dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def key_dir(ssh_root: Path, tenant: str) -> Path:
    return ssh_root / tenant


def generate_keypair(ssh_root: Path, tenant: str) -> str:
    """Create ``<ssh_root>/<tenant>/id_ed25519`` (0600) and return the public key line.

    Generating with ``cryptography`` instead of ``ssh-keygen`` saves a process start on
    the spawn path. An existing key is replaced: a re-spawned tenant gets a fresh one.
    """
    d = key_dir(ssh_root, tenant)
    ssh_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    d.mkdir(exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{public.decode()} lobsterd-{tenant}"
    path = d / "id_ed25519"
    tmp = d / "id_ed25519.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, private)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    (d / "id_ed25519.pub").write_text(line + "\n")
    return line


def remove_keypair(ssh_root: Path, tenant: str) -> None:
    shutil.rmtree(key_dir(ssh_root, tenant), ignore_errors=True)


def ssh_argv(
    ssh_root: Path, tenant: str, guest_ip: str, command: list[str], tty: bool
) -> list[str]:
    """argv for an interactive ``ssh`` into the guest as root (used by ``exec``)."""
    argv = [
        "ssh",
        "-i", str(key_dir(ssh_root, tenant) / "id_ed25519"),
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=10",
        "-o", "IdentitiesOnly=yes",
    ]
    if tty:
        argv.append("-t")
    argv.append(f"root@{guest_ip}")
    argv.extend(command)
    return argv
