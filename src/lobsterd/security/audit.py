"""The tamper-evident audit log: one JSON object per line, hash-chained.

File: ``cfg.paths.audit_log`` (``<state>/audit.log``), mode 0600, owned by root. Each
line is one record::

    {"time": "2026-01-02T03:04:05.123456Z", "seq": 7,
     "actor": {"uid": 0, "pid": 4242, "user": "root", "loginuid": 1000},
     "action": "secrets.set", "tenant": "alice", "outcome": "ok",
     "error_code": null, "request_id": null, "details": {"name": "OPENAI_API_KEY"},
     "alg": "hmac-sha256", "prev": "<hash of record 6>", "hash": "<hash of this record>"}

``hash`` covers every other field of the record (canonical JSON: sorted keys, no
spaces, UTF-8), including ``prev``, so each record commits to the whole history before
it. ``alg`` says how:

* ``hmac-sha256`` — HMAC with the "audit" key derived from the host master key. Used
  whenever the master key is available (i.e. after ``lobsterd init``). Someone who can
  rewrite the file but does not hold the master key cannot forge a consistent chain.
* ``sha256`` — a plain hash, used only before a master key exists. It detects accidental
  damage and naive edits, not an attacker who recomputes the chain. Once a log holds
  HMAC records, a later plain record is reported as a downgrade.

Appends are serialised across processes with an ``flock`` on the log; the record is
written with a single ``os.write`` on an ``O_APPEND`` descriptor and fsynced, so a crash
leaves at most one torn final line. That torn line is reported by :meth:`AuditLog.verify`
as a warning, and the next append starts on a fresh line, chains to the last *valid*
record and carries a ``note`` saying so (so the torn line in the middle is explained,
not mistaken for tampering).

Removing records from the end of a file leaves a valid chain, so after every append the
last ``seq`` and ``hash`` are also written to a small sidecar, ``audit.log.head``
(atomically replaced, HMAC-tagged when a key is available). ``verify`` reports a log that
ends before the head as truncated. When verifying with the master key, the head must
exist and carry a valid MAC: that is what defeats a wholesale rewrite of the log with
plain hashes. Someone able to put back an *older* log and head pair can still cut the
tail; the journald mirror (each record is also sent to ``/run/systemd/journal/socket``
when it exists, best effort) is the copy outside their reach.

Details carry names, never secret values; keys that look like they would hold a value
(``value``, ``secret``, ``password``, ``token``, ``key``) are refused outright.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets as pysecrets
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lobsterd.errors import AuditError

if TYPE_CHECKING:
    from lobsterd.config import Config

Outcome = Literal["ok", "error", "denied"]
OUTCOMES: tuple[str, ...] = ("ok", "error", "denied")
GENESIS = "0" * 64
ALG_HMAC = "hmac-sha256"
ALG_SHA = "sha256"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
MAX_DETAILS_BYTES = 16 * 1024
_ACTION_RE = re.compile(r"[a-z][a-z0-9._-]{0,63}", re.ASCII)
_FORBIDDEN_KEYS = frozenset({"value", "values", "secret", "password", "token", "key"})
_BLOCK = 64 * 1024

FIELDS = ("time", "seq", "actor", "action", "tenant", "outcome", "error_code",
          "request_id", "details", "note", "alg", "prev", "hash")


@dataclass(frozen=True)
class Problem:
    """One finding of :meth:`AuditLog.verify`; ``fatal`` False means a warning."""

    line: int
    kind: str
    message: str
    fatal: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "message": self.message,
                "fatal": self.fatal}


@dataclass
class VerifyReport:
    ok: bool
    records: int
    problems: list[Problem] = field(default_factory=list)
    last_seq: int = 0
    algs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "last_seq": self.last_seq,
                "algs": self.algs, "problems": [p.to_dict() for p in self.problems]}


def _canonical(rec: dict[str, Any]) -> bytes:
    body = {k: v for k, v in rec.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_actor() -> dict[str, Any]:
    """Who is acting: uid/pid, the user name, and the kernel login uid when known.

    ``loginuid`` is set by PAM at login and survives ``sudo``, so it names the person
    behind a root shell; it cannot be changed by the process itself.
    """
    actor: dict[str, Any] = {"uid": os.getuid(), "pid": os.getpid()}
    with contextlib.suppress(KeyError):
        actor["user"] = pwd.getpwuid(os.getuid()).pw_name
    try:
        with open("/proc/self/loginuid", encoding="ascii") as fh:
            login = int(fh.read().strip())
        if login != 0xFFFFFFFF:
            actor["loginuid"] = login
    except (OSError, ValueError):
        pass
    return actor


def _parse(seg: bytes) -> dict[str, Any] | None:
    """A record if ``seg`` is one (JSON object with int seq and str hash/prev)."""
    try:
        rec = json.loads(seg)
    except (ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(rec, dict) or not isinstance(rec.get("seq"), int)
            or not isinstance(rec.get("hash"), str) or not isinstance(rec.get("prev"), str)):
        return None
    return rec


def _check_details(obj: Any, path: str = "details") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise AuditError(f"audit {path} keys must be strings")
            if k.lower() in _FORBIDDEN_KEYS:
                raise AuditError(
                    f'audit {path} may not have a "{k}" field: record names, never values')
            _check_details(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for item in obj:
            _check_details(item, path)


def _journal_field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


class AuditLog:
    """Append, read and verify one audit log file."""

    def __init__(self, path: Path, key: bytes | None = None,
                 journal_socket: Path | None = JOURNAL_SOCKET) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._key = key
        self.journal_socket = journal_socket

    @property
    def alg(self) -> str:
        return ALG_HMAC if self._key is not None else ALG_SHA

    def _digest(self, rec: dict[str, Any], alg: str) -> str | None:
        """The hash ``rec`` should carry under ``alg``; None if it cannot be computed."""
        data = _canonical(rec)
        if alg == ALG_HMAC:
            if self._key is None:
                return None
            return hmac.new(self._key, data, hashlib.sha256).hexdigest()
        if alg == ALG_SHA:
            return hashlib.sha256(data).hexdigest()
        return None

    def _head_mac(self, seq: int, digest: str) -> str | None:
        if self._key is None:
            return None
        return hmac.new(self._key, f"head:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()

    # -- writing ---------------------------------------------------------------------

    def _open_for_append(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc.strerror or exc}",
                             hint="run as root") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise AuditError(f"audit log {self.path} is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
        return fd

    def record(
        self,
        action: str,
        *,
        tenant: str | None,
        outcome: Outcome,
        error_code: str | None = None,
        request_id: str | None = None,
        actor: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one record and return it (with its seq and hash)."""
        if not isinstance(action, str) or not _ACTION_RE.fullmatch(action):
            raise AuditError(f"invalid audit action {action!r}: lower-case a-z0-9._- only")
        if outcome not in OUTCOMES:
            raise AuditError(f"invalid audit outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
        if details is not None:
            _check_details(details)
        rec: dict[str, Any] = {
            "time": _now(),
            "seq": 0,
            "actor": actor if actor is not None else default_actor(),
            "action": action,
            "tenant": tenant,
            "outcome": outcome,
            "error_code": error_code,
            "request_id": request_id,
            "details": details,
        }
        try:
            size = len(json.dumps(details))
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit details are not JSON-serialisable: {exc}") from None
        if size > MAX_DETAILS_BYTES:
            raise AuditError(f"audit details too large ({size} bytes > {MAX_DETAILS_BYTES})")

        fd = self._open_for_append()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last, skipped, ends_clean = self._last_valid(fd)
            rec["seq"] = (last["seq"] if last else 0) + 1
            if skipped:
                after = last["seq"] if last else 0
                rec["note"] = f"recovered: torn record after seq {after} skipped"
            rec["alg"] = self.alg
            rec["prev"] = last["hash"] if last else GENESIS
            rec["hash"] = self._digest(rec, self.alg)
            line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
            data = ("" if ends_clean else "\n").encode() + line.encode("utf-8") + b"\n"
            self._write_all(fd, data)
            os.fsync(fd)
            self._write_head(rec["seq"], rec["hash"])
        except OSError as exc:
            raise AuditError(f"cannot append to audit log {self.path}: "
                             f"{exc.strerror or exc}") from None
        finally:
            os.close(fd)  # also releases the flock
        self._mirror_to_journal(rec, line)
        return rec

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def _write_head(self, seq: int, digest: str) -> None:
        head: dict[str, Any] = {"seq": seq, "hash": digest}
        mac = self._head_mac(seq, digest)
        if mac:
            head["mac"] = mac
        tmp = self.head_path.with_name(f".{self.head_path.name}.{pysecrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(head).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.head_path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _mirror_to_journal(self, rec: dict[str, Any], line: str) -> None:
        """Send the record to journald (native protocol); never fails the caller."""
        sock_path = self.journal_socket
        if sock_path is None:
            return
        try:
            if not stat.S_ISSOCK(os.stat(sock_path).st_mode):
                return
            summary = (f"lobsterd audit: {rec['action']} tenant={rec['tenant'] or '-'} "
                       f"outcome={rec['outcome']}")
            fields = {
                "MESSAGE": summary,
                "PRIORITY": "6" if rec["outcome"] == "ok" else "4",
                "SYSLOG_IDENTIFIER": "lobsterd-audit",
                "LOBSTERD_AUDIT_SEQ": str(rec["seq"]),
                "LOBSTERD_AUDIT_ACTION": rec["action"],
                "LOBSTERD_AUDIT_TENANT": rec["tenant"] or "",
                "LOBSTERD_AUDIT_OUTCOME": rec["outcome"],
                "LOBSTERD_AUDIT_RECORD": line,
            }
            payload = b"".join(_journal_field(k, v) for k, v in fields.items())
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.5)
                sock.sendto(payload, str(sock_path))
        except OSError:
            return

    # -- reading ---------------------------------------------------------------------

    @staticmethod
    def _segments_backwards(fd: int) -> Iterator[bytes]:
        """Non-empty lines of the file from the last to the first, read in blocks."""
        pos = os.fstat(fd).st_size
        rest = b""
        while pos > 0:
            step = min(_BLOCK, pos)
            pos -= step
            buf = os.pread(fd, step, pos) + rest
            parts = buf.split(b"\n")
            rest = parts[0]
            for seg in reversed(parts[1:]):
                if seg.strip():
                    yield seg
        if rest.strip():
            yield rest

    def _last_valid(self, fd: int) -> tuple[dict[str, Any] | None, bool, bool]:
        """(last parseable record, whether garbage follows it, file ends with newline)."""
        size = os.fstat(fd).st_size
        ends_clean = size == 0 or os.pread(fd, 1, size - 1) == b"\n"
        skipped = False
        for seg in self._segments_backwards(fd):
            rec = _parse(seg)
            if rec is not None:
                return rec, skipped, ends_clean
            skipped = True
        return None, skipped, ends_clean

    def _open_read(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"cannot read audit log {self.path}: {exc.strerror or exc}",
                             hint="run as root") from None

    def tail(self, n: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
        """The last ``n`` records (of ``tenant`` if given), oldest first."""
        fd = self._open_read()
        if fd is None or n <= 0:
            if fd is not None:
                os.close(fd)
            return []
        out: list[dict[str, Any]] = []
        try:
            for seg in self._segments_backwards(fd):
                rec = _parse(seg)
                if rec is None or (tenant is not None and rec.get("tenant") != tenant):
                    continue
                out.append(rec)
                if len(out) >= n:
                    break
        finally:
            os.close(fd)
        out.reverse()
        return out

    def _read_head(self) -> dict[str, Any] | None:
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"corrupt": True}
        return head if isinstance(head, dict) else {"corrupt": True}

    def verify(self) -> VerifyReport:
        """Check every record, the chain, the sequence and the head; say where it breaks."""
        fd = self._open_read()
        head = self._read_head()
        entries: list[tuple[int, dict[str, Any] | None]] = []
        if fd is not None:
            try:
                with os.fdopen(fd, "rb") as fh:
                    for ln, raw in enumerate(fh, start=1):
                        if raw.strip():
                            entries.append((ln, _parse(raw)))
            except OSError as exc:
                raise AuditError(f"cannot read audit log {self.path}: {exc}") from None

        # Last position of each seq, to tell "reordered" (it comes later) from "deleted".
        last_pos: dict[int, int] = {}
        for i, (_ln, rec_i) in enumerate(entries):
            if rec_i is not None:
                last_pos[rec_i["seq"]] = i

        walk = _Walk()
        pending_bad: list[int] = []
        for i, (ln, rec) in enumerate(entries):
            if rec is None:
                pending_bad.append(ln)
                continue
            for bad in pending_bad:
                walk.problems.append(
                    Problem(bad, "torn", f"torn record at line {bad} (recovered by the "
                            f"record at line {ln})", fatal=False) if rec.get("note") else
                    Problem(bad, "corrupt", f"line {bad} is not a valid audit record"))
            pending_bad = []
            walk.count += 1
            walk.last_line = ln
            self._check_integrity(walk, ln, rec)
            self._check_order(walk, ln, rec, i, last_pos)

        for bad in pending_bad:
            walk.problems.append(Problem(bad, "torn", f"torn final record at line {bad} (an "
                                         "interrupted write; the next append recovers)",
                                         fatal=False))
        if walk.unverifiable:
            walk.problems.append(Problem(
                walk.unverifiable_at, "unverifiable",
                f"{walk.unverifiable} records are HMAC-protected and need the master key "
                "to verify (run as root on this host)"))
        head_problem = self._check_head(head, walk, fd is not None)
        if head_problem is not None:
            walk.problems.append(head_problem)
        walk.problems.sort(key=lambda p: p.line)
        return VerifyReport(ok=not any(p.fatal for p in walk.problems), records=walk.count,
                            problems=walk.problems, last_seq=walk.prev_seq,
                            algs=sorted(walk.algs))

    def _check_integrity(self, walk: _Walk, ln: int, rec: dict[str, Any]) -> None:
        """Does the record's hash match its contents, under an algorithm we accept?"""
        alg = str(rec.get("alg"))
        walk.algs.add(alg)
        expected = self._digest(rec, alg)
        if alg == ALG_HMAC:
            walk.seen_hmac = True
            if expected is None:
                walk.unverifiable += 1
                walk.unverifiable_at = walk.unverifiable_at or ln
        elif alg == ALG_SHA and walk.seen_hmac and self._key is not None:
            walk.problems.append(Problem(
                ln, "downgrade", f"line {ln} (seq {rec['seq']}) uses a plain hash after HMAC "
                "records: it was forged or rewritten without the master key"))
        if alg not in (ALG_HMAC, ALG_SHA):
            walk.problems.append(Problem(ln, "modified", f"line {ln} has unknown alg {alg!r}"))
        elif expected is not None and not hmac.compare_digest(expected, rec["hash"]):
            walk.problems.append(Problem(ln, "modified", f"line {ln} (seq {rec['seq']}) was "
                                        "modified: its hash does not match its contents"))

    @staticmethod
    def _check_order(walk: _Walk, ln: int, rec: dict[str, Any], pos: int,
                     last_pos: dict[int, int]) -> None:
        """Is this the next seq, chained to the previous hash? If not, what happened?"""
        seq: int = rec["seq"]
        problem: Problem | None = None
        if seq == walk.prev_seq + 1:
            if rec["prev"] != walk.prev_hash:
                problem = Problem(ln, "chain", f"line {ln} (seq {seq}) does not chain to the "
                                  "record before it: that record was modified or replaced")
        elif seq <= walk.prev_seq:
            kind = "duplicate" if seq in walk.seen else "reordered"
            problem = Problem(ln, kind, f"line {ln} has seq {seq} after seq {walk.prev_seq}: "
                              f"records were {kind}")
        else:
            missing = range(walk.prev_seq + 1, seq)
            if len(missing) <= len(last_pos):
                comes_later = any(last_pos.get(m, -1) > pos for m in missing)
            else:
                comes_later = any(p > pos and s in missing for s, p in last_pos.items())
            if comes_later:
                problem = Problem(ln, "reordered", f"line {ln} has seq {seq} where "
                                  f"{walk.prev_seq + 1} was expected: records were reordered")
            else:
                span = (f"seq {missing[0]}" if len(missing) == 1
                        else f"seq {missing[0]}-{missing[-1]}")
                problem = Problem(ln, "deleted", f"{span} missing before line {ln}: records "
                                  "were deleted")
        if problem is not None:
            walk.problems.append(problem)
        if seq > walk.prev_seq:
            walk.prev_seq, walk.prev_hash = seq, rec["hash"]
        walk.seen.add(seq)
        walk.by_seq.setdefault(seq, (ln, rec["hash"]))

    def _check_head(self, head: dict[str, Any] | None, walk: _Walk,
                    exists: bool) -> Problem | None:
        """Compare the end of the log with the head sidecar (catches a cut-off tail)."""
        keyed = self._key is not None
        if head is None:
            if not walk.prev_seq:
                return None
            # With a key, a missing head means the end of the log cannot be proven: a
            # wholesale rewrite with plain hashes would otherwise pass.
            return Problem(0, "no-head", f"{self.head_path} is missing: truncation or a "
                           "rewrite of the log cannot be ruled out", fatal=keyed)
        seq, digest = head.get("seq"), head.get("hash")
        if head.get("corrupt") or not isinstance(seq, int) or not isinstance(digest, str):
            return Problem(0, "head", f"{self.head_path} is unreadable or corrupt")
        mac = self._head_mac(seq, digest)
        problem: Problem | None = None
        if mac is not None and not hmac.compare_digest(mac, str(head.get("mac", ""))):
            problem = Problem(0, "head", f"{self.head_path} is not authenticated by the "
                              "master key (forged, or written before lobsterd init)")
        elif not exists and seq > 0:
            problem = Problem(0, "truncated", f"the audit log is missing but {self.head_path} "
                              f"records seq {seq}")
        elif seq > walk.prev_seq:
            problem = Problem(
                walk.last_line + 1, "truncated",
                f"the log ends at seq {walk.prev_seq} (line {walk.last_line}) but the head "
                f"records seq {seq}: records after line {walk.last_line} were removed")
        elif seq in walk.by_seq and not hmac.compare_digest(walk.by_seq[seq][1], digest):
            ln = walk.by_seq[seq][0]
            problem = Problem(ln, "modified", f"line {ln} (seq {seq}) differs from the hash "
                              "recorded in the head: the log was rewritten")
        return problem


@dataclass
class _Walk:
    """State carried down the log by :meth:`AuditLog.verify`."""

    prev_hash: str = GENESIS
    prev_seq: int = 0
    count: int = 0
    last_line: int = 0
    seen_hmac: bool = False
    unverifiable: int = 0
    unverifiable_at: int = 0
    seen: set[int] = field(default_factory=set)
    algs: set[str] = field(default_factory=set)
    by_seq: dict[int, tuple[int, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def audit_log_for(cfg: Config) -> AuditLog:
    """The host's audit log, HMAC-chained when the master key is available."""
    from lobsterd.security.crypto import MasterKey

    master = MasterKey.try_load(cfg)
    return AuditLog(cfg.paths.audit_log, key=master.derive("audit") if master else None)
