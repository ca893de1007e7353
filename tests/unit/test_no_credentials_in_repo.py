"""No credential may be committed: every git-tracked file is scanned for key-shaped text.

Tests that need keys generate them at run time. The patterns below are assembled from
pieces so that this file does not match itself. A line that is a deliberate, reviewed
exception can carry the marker ``secret-scan: allow`` (it should be rare and obvious).
"""

from __future__ import annotations

import base64
import math
import re
import secrets
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import need

REPO = Path(__file__).resolve().parents[2]
ALLOW_MARK = "secret-scan: " + "allow"
MAX_BYTES = 2 * 1024 * 1024

_PEM_BEGIN = "-----" + "BEGIN "
_PATTERNS: dict[str, re.Pattern[str]] = {
    "PEM private key": re.compile(
        re.escape(_PEM_BEGIN) + r"(?:[A-Z0-9]+ )*" + "PRIVATE" + r" KEY-----\s*"
        r"(?:[A-Za-z0-9+/=]{16,}\s*){2,}"),
    "OpenAI/Anthropic-style key": re.compile(r"\b" + "s" + r"k-(?:proj-|ant-[a-z0-9]+-)?"
                                             r"[A-Za-z0-9_-]{20,}"),
    "AWS access key id": re.compile(r"\b" + "AK" + r"IA[0-9A-Z]{16}\b"),
    "Fireworks key": re.compile(r"\b" + "f" + r"w_[A-Za-z0-9]{20,}"),
    "GitHub token": re.compile(r"\b" + "gh" + r"[pousr]_[A-Za-z0-9]{30,}|\b" + "github"
                               + r"_pat_[A-Za-z0-9_]{22,}"),
    "Slack token": re.compile(r"\b" + "xo" + r"x[baprs]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\b" + "AI" + r"za[0-9A-Za-z_-]{35}"),
}
_ASSIGN = re.compile(
    r"(?i)(?P<name>[A-Za-z0-9_.-]*(?:key|secret|token|passw(?:or)?d|pwd|credential|auth)"
    r"[A-Za-z0-9_.-]*)[\"']?\s*(?::|=|:=|=>)\s*[rbuf]?[\"'](?P<value>[A-Za-z0-9+/=_.-]{24,})"
    r"[\"']")
_HASHY_NAME = re.compile(r"(?i)hash|digest|sha|fingerprint|checksum|_id\b|kid")
_HEX = re.compile(r"[0-9a-fA-F]+")
_SECRET_FILE = re.compile(r"(^|/)(id_(rsa|dsa|ecdsa|ed25519)|[^/]+\.(key|p12|pfx)|\.env)$")


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _high_entropy_literal(name: str, value: str) -> bool:
    """A long literal assigned to a key-ish name that looks random, not like words."""
    if _HASHY_NAME.search(name):
        return False
    if _HEX.fullmatch(value):
        return len(value) >= 32 and _entropy(value) >= 3.0
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
    return classes >= 3 and _entropy(value) >= 4.0


def scan_text(text: str) -> list[tuple[int, str]]:
    """(line number, kind) for each key-shaped string in ``text``."""
    found: list[tuple[int, str]] = []
    lines = text.splitlines()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    for kind, pat in _PATTERNS.items():
        for m in pat.finditer(text):
            ln = line_of(m.start())
            if ALLOW_MARK not in lines[ln - 1]:
                found.append((ln, kind))
    for m in _ASSIGN.finditer(text):
        ln = line_of(m.start())
        if ALLOW_MARK in lines[ln - 1]:
            continue
        if _high_entropy_literal(m.group("name"), m.group("value")):
            found.append((ln, f"high-entropy literal assigned to {m.group('name')}"))
    return sorted(set(found))


def _tracked_files() -> list[str]:
    need(shutil.which("git") is not None and (REPO / ".git").exists(),
         "needs a git checkout with git on PATH")
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                         check=True, timeout=60).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_credentials_in_tracked_files() -> None:
    problems: list[str] = []
    files = _tracked_files()
    assert len(files) > 10
    scanned = 0
    for rel in files:
        if _SECRET_FILE.search(rel):
            problems.append(f"{rel}: file name of a private key or credentials file")
        path = REPO / rel
        if not path.is_file() or path.is_symlink():
            continue
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES)
        if b"\0" in data[:8192]:
            continue
        scanned += 1
        text = data.decode("utf-8", "replace")
        problems += [f"{rel}:{ln}: {kind}" for ln, kind in scan_text(text)]
    assert scanned > 10
    assert not problems, "credential-shaped strings are committed:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the scanner itself


def _pem_private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _token(n: int = 40, alphabet: str = "") -> str:
    alphabet = alphabet or "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("make", [
    lambda: _pem_private_key(),
    lambda: "s" + "k-" + _token(48),
    lambda: "s" + "k-proj-" + _token(60),
    lambda: "AK" + "IA" + _token(16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"),
    lambda: "f" + "w_" + _token(30),
    lambda: "gh" + "p_" + _token(36),
    lambda: "xo" + "xb-" + _token(12, "0123456789") + "-" + _token(24),
    lambda: 'api_key = "' + base64.b64encode(secrets.token_bytes(30)).decode() + '"',
    lambda: 'MASTER_KEY = "' + secrets.token_hex(32) + '"',
    lambda: '"gateway_token": "' + secrets.token_urlsafe(32) + '"',
    lambda: "password='" + _token(28) + "'",
])
def test_scanner_flags_generated_keys(make: object) -> None:
    sample = make()  # type: ignore[operator]
    text = f"line one\nconfig {sample}\n"
    assert scan_text(text), f"not flagged: {sample[:12]}..."
    assert scan_text(f"x = 1  # {ALLOW_MARK}\n" + text)  # the mark only covers its line


@pytest.mark.parametrize("benign", [
    'AGENT_TOKEN = "agent_token"',
    "token = os.environ['LOBSTERD_TOKEN']",
    'agent_hash = "' + "ab12" * 16 + '"',
    'token_hash = "' + secrets.token_hex(32) + '"',
    'secret_name = "OPENAI_API_KEY_FOR_THE_GATEWAY"',
    'key_file = "/etc/lobsterd/master.key.example.path"',
    "task-list-with-many-many-many-words",
    "-----" + "BEGIN " + "PRIVATE KEY-----  # a header alone, e.g. a parser constant",
    'token = "test-token-for-the-agent-unit-tests"',
])
def test_scanner_ignores_benign_text(benign: str) -> None:
    assert scan_text(benign) == []


def test_allow_mark_suppresses_one_line() -> None:
    sample = "s" + "k-" + _token(40)
    assert scan_text(f"{sample}  # {ALLOW_MARK}") == []
