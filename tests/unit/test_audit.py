"""The hash-chained audit log: writing, tamper detection, crash recovery, concurrency."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from lobsterd.config import Config
from lobsterd.errors import AuditError
from lobsterd.security.audit import (
    ALG_HMAC,
    ALG_SHA,
    GENESIS,
    AuditLog,
    VerifyReport,
    audit_log_for,
)
from lobsterd.security.crypto import ENV_MASTER_KEY, MasterKey


def _key() -> bytes:
    return secrets.token_bytes(32)


def _log(tmp_path: Path, key: bytes | None = None) -> AuditLog:
    return AuditLog(tmp_path / "state" / "audit.log", key=key, journal_socket=None)


def _fill(log: AuditLog, n: int = 6) -> list[dict[str, Any]]:
    return [log.record("spawn" if i % 2 else "secrets.set", tenant=f"t{i % 3}", outcome="ok",
                       details={"name": f"NAME_{i}"}) for i in range(n)]


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def _kinds(rep: VerifyReport) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in rep.problems]


@pytest.fixture(params=["hmac", "sha256"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> AuditLog:
    return _log(tmp_path, _key() if request.param == "hmac" else None)


# ---------------------------------------------------------------- writing


def test_records_have_every_field_and_chain(log: AuditLog) -> None:
    recs = _fill(log, 4)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["prev"] == GENESIS
    for a, b in itertools.pairwise(recs):
        assert b["prev"] == a["hash"]
    on_disk = [json.loads(line) for line in _lines(log)]
    assert on_disk == recs
    r = on_disk[0]
    for f in ("time", "seq", "actor", "action", "tenant", "outcome", "error_code",
              "request_id", "details", "alg", "prev", "hash"):
        assert f in r
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["time"])
    assert r["actor"]["uid"] == os.getuid() and r["actor"]["pid"] == os.getpid()
    assert all(line.endswith(b"\n") for line in _lines(log))
    rep = log.verify()
    assert rep.ok and rep.records == 4 and rep.problems == [] and rep.last_seq == 4


def test_alg_is_hmac_with_key_and_sha256_without(tmp_path: Path) -> None:
    key = _key()
    keyed = _log(tmp_path / "a", key).record("init", tenant=None, outcome="ok")
    plain = _log(tmp_path / "b").record("init", tenant=None, outcome="ok")
    assert keyed["alg"] == ALG_HMAC and plain["alg"] == ALG_SHA
    body = {k: v for k, v in plain.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert plain["hash"] == hashlib.sha256(canonical).hexdigest()


def test_file_modes(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.path.parent.mkdir(parents=True)
    log.path.write_text("")
    log.path.chmod(0o644)
    log.record("init", tenant=None, outcome="ok")
    assert (log.path.stat().st_mode & 0o777) == 0o600
    assert (log.head_path.stat().st_mode & 0o777) == 0o600


def test_error_fields_and_explicit_actor(log: AuditLog) -> None:
    rec = log.record("token.read", tenant="alice", outcome="denied", error_code="PERMISSION_DENIED",
                     request_id="req-1", actor={"token_id": "tok_7"})
    assert rec["actor"] == {"token_id": "tok_7"}
    assert rec["error_code"] == "PERMISSION_DENIED" and rec["request_id"] == "req-1"
    assert log.verify().ok


@pytest.mark.parametrize("details", [
    {"value": "x"}, {"name": "A", "secret": "x"}, {"nested": {"password": "x"}},
    {"list": [{"token": "x"}]}, {"Key": "x"},
])
def test_details_that_could_hold_values_are_refused(log: AuditLog, details: dict[str, Any]) -> None:
    with pytest.raises(AuditError):
        log.record("secrets.set", tenant=None, outcome="ok", details=details)
    assert not log.path.exists() or log.path.read_bytes() == b""


def test_bad_action_outcome_and_details_are_refused(log: AuditLog) -> None:
    with pytest.raises(AuditError):
        log.record("Bad Action", tenant=None, outcome="ok")
    with pytest.raises(AuditError):
        log.record("spawn", tenant=None, outcome="maybe")  # type: ignore[arg-type]
    with pytest.raises(AuditError):
        log.record("spawn", tenant=None, outcome="ok", details={"x": object()})
    with pytest.raises(AuditError):
        log.record("spawn", tenant=None, outcome="ok", details={"x": "y" * 20000})


def test_tail_filters_and_orders(log: AuditLog) -> None:
    _fill(log, 9)
    last = log.tail(3)
    assert [r["seq"] for r in last] == [7, 8, 9]
    t1 = log.tail(10, tenant="t1")
    assert [r["seq"] for r in t1] == [2, 5, 8]
    assert log.tail(2, tenant="nobody") == []


def test_tail_reads_large_logs_backwards(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for i in range(400):
        log.record("logs.read", tenant="big", outcome="ok", details={"pad": "p" * 300, "i": i})
    assert [r["details"]["i"] for r in log.tail(3)] == [397, 398, 399]
    assert log.path.stat().st_size > 100_000
    assert log.verify().ok


def test_missing_log_is_empty_and_ok(tmp_path: Path) -> None:
    log = _log(tmp_path, _key())
    assert log.tail(5) == []
    rep = log.verify()
    assert rep.ok and rep.records == 0


# ---------------------------------------------------------------- tamper detection


def test_modified_record_is_found_on_its_line(tmp_path: Path) -> None:
    log = _log(tmp_path, _key())
    _fill(log)
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"outcome":"ok"', b'"outcome":"denied"')
    _write(log, lines)
    rep = log.verify()
    assert not rep.ok
    assert _kinds(rep) == [(3, "modified")]


def test_modified_and_rehashed_sha256_record_breaks_the_chain(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _fill(log)
    lines = _lines(log)
    rec = json.loads(lines[1])
    rec["tenant"] = "someone-else"
    body = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True,
                                            separators=(",", ":")).encode()).hexdigest()
    lines[1] = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
    _write(log, lines)
    rep = log.verify()
    assert not rep.ok
    assert (3, "chain") in _kinds(rep)
    assert "modified or replaced" in rep.problems[0].message


def test_hmac_chain_resists_a_full_rewrite_without_the_key(tmp_path: Path) -> None:
    """Recompute every record with plain SHA-256 and rewrite the head: still caught."""
    key = _key()
    log = _log(tmp_path, key)
    _fill(log, 4)
    forged: list[bytes] = []
    prev = GENESIS
    for line in _lines(log):
        rec = json.loads(line)
        rec["details"] = {"name": "FORGED"}
        rec["alg"], rec["prev"] = ALG_SHA, prev
        body = {k: v for k, v in rec.items() if k != "hash"}
        rec["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                     .encode()).hexdigest()
        prev = rec["hash"]
        forged.append(json.dumps(rec).encode() + b"\n")
    _write(log, forged)
    log.head_path.write_text(json.dumps({"seq": 4, "hash": prev}))
    rep = log.verify()
    assert not rep.ok
    assert "head" in [k for _, k in _kinds(rep)]
    log.head_path.unlink()
    rep = log.verify()
    assert not rep.ok and "no-head" in [k for _, k in _kinds(rep)]
    # Without the key, the same forgery looks intact: that is why HMAC is used.
    unkeyed = _log(tmp_path, None).verify()
    assert unkeyed.ok and unkeyed.problems[0].kind == "no-head"


def test_deleted_record_is_found(log: AuditLog) -> None:
    _fill(log)
    lines = _lines(log)
    del lines[2]  # seq 3
    _write(log, lines)
    rep = log.verify()
    assert not rep.ok
    assert _kinds(rep) == [(3, "deleted")]
    assert "seq 3 missing before line 3" in rep.problems[0].message


def test_deleted_first_records_are_found(log: AuditLog) -> None:
    _fill(log)
    _write(log, _lines(log)[2:])
    rep = log.verify()
    assert _kinds(rep) == [(1, "deleted")]
    assert "seq 1-2" in rep.problems[0].message


def test_reordered_records_are_found(log: AuditLog) -> None:
    _fill(log)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    rep = log.verify()
    assert not rep.ok
    assert _kinds(rep) == [(2, "reordered"), (3, "reordered")]


def test_duplicated_record_is_found(log: AuditLog) -> None:
    _fill(log)
    lines = _lines(log)
    lines.insert(4, lines[1])
    _write(log, lines)
    rep = log.verify()
    assert _kinds(rep) == [(5, "duplicate")]


def test_truncated_tail_is_found(log: AuditLog) -> None:
    _fill(log)
    _write(log, _lines(log)[:-2])
    rep = log.verify()
    assert not rep.ok
    assert _kinds(rep) == [(5, "truncated")]
    assert "ends at seq 4" in rep.problems[0].message and "seq 6" in rep.problems[0].message


def test_truncated_mid_record_is_found(log: AuditLog) -> None:
    _fill(log)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-40])
    rep = log.verify()
    assert not rep.ok
    assert (6, "truncated") in _kinds(rep)


def test_deleted_log_with_head_is_found(log: AuditLog) -> None:
    _fill(log, 2)
    log.path.unlink()
    rep = log.verify()
    assert not rep.ok and _kinds(rep) == [(0, "truncated")]


def test_garbage_line_in_the_middle_is_corruption(log: AuditLog) -> None:
    _fill(log)
    lines = _lines(log)
    lines.insert(3, b"{not json\n")
    _write(log, lines)
    rep = log.verify()
    assert not rep.ok and _kinds(rep) == [(4, "corrupt")]


def test_hmac_log_without_key_is_unverifiable(tmp_path: Path) -> None:
    log = _log(tmp_path, _key())
    _fill(log, 3)
    rep = _log(tmp_path, None).verify()
    assert not rep.ok and _kinds(rep) == [(1, "unverifiable")]
    rep = _log(tmp_path, _key()).verify()  # another host's key
    assert not rep.ok and "modified" in [k for _, k in _kinds(rep)]


def test_plain_record_after_hmac_records_is_a_downgrade(tmp_path: Path) -> None:
    key = _key()
    _fill(_log(tmp_path, key), 2)
    _log(tmp_path, None).record("evict", tenant="x", outcome="ok")
    rep = _log(tmp_path, key).verify()
    assert not rep.ok and (3, "downgrade") in _kinds(rep)


# ---------------------------------------------------------------- crash recovery


def _tear(log: AuditLog, keep: int = 37) -> None:
    """Simulate a crash mid-write: part of a line, no newline, head not updated."""
    partial = _lines(log)[0][:keep].replace(b'"seq":1', b'"seq":9')
    with open(log.path, "ab") as fh:
        fh.write(partial)


def test_torn_last_line_is_a_warning_not_tampering(log: AuditLog) -> None:
    _fill(log, 3)
    _tear(log)
    rep = log.verify()
    assert rep.ok
    assert _kinds(rep) == [(4, "torn")]
    assert not rep.problems[0].fatal
    assert "torn final record at line 4" in rep.problems[0].message


def test_append_after_torn_line_recovers_and_chains(log: AuditLog) -> None:
    recs = _fill(log, 3)
    _tear(log)
    new = log.record("evict", tenant="t0", outcome="ok")
    assert new["seq"] == 4 and new["prev"] == recs[-1]["hash"]
    assert "torn" in new["note"]
    lines = _lines(log)
    assert json.loads(lines[-1]) == new  # started on a fresh line
    rep = log.verify()
    assert rep.ok and rep.records == 4
    assert _kinds(rep) == [(4, "torn")]
    assert "recovered by the record at line 5" in rep.problems[0].message
    log.record("evict", tenant="t1", outcome="ok")
    assert log.verify().ok


def test_record_missing_only_its_newline_is_kept(log: AuditLog) -> None:
    _fill(log, 3)
    log.path.write_bytes(log.path.read_bytes()[:-1])
    assert log.verify().ok
    rec = log.record("evict", tenant="t0", outcome="ok")
    assert rec["seq"] == 4 and "note" not in rec
    assert log.verify().ok and log.verify().problems == []


def test_head_lagging_one_record_behind_is_fine(log: AuditLog) -> None:
    """Crash after the log write but before the head update."""
    _fill(log, 3)
    head = log.head_path.read_text()
    log.record("evict", tenant="t0", outcome="ok")
    log.head_path.write_text(head)
    assert log.verify().ok


# ---------------------------------------------------------------- concurrency


def _writer(path: str, key: bytes | None, n: int, who: int) -> None:
    log = AuditLog(Path(path), key=key, journal_socket=None)
    for i in range(n):
        log.record("exec", tenant=f"w{who}", outcome="ok", details={"i": i})


@pytest.mark.timeout(120)
def test_concurrent_appends_from_processes_keep_the_chain(tmp_path: Path) -> None:
    key = _key()
    log = _log(tmp_path, key)
    log.path.parent.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(log.path), key, 25, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rep = log.verify()
    assert rep.ok, rep.problems
    assert rep.records == 100
    seqs = [json.loads(line)["seq"] for line in _lines(log)]
    assert seqs == list(range(1, 101))
    per_writer = {f"w{w}": 0 for w in range(4)}
    for line in _lines(log):
        per_writer[json.loads(line)["tenant"]] += 1
    assert set(per_writer.values()) == {25}


# ---------------------------------------------------------------- journald mirror


def _parse_journal(payload: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    i = 0
    while i < len(payload):
        nl = payload.index(b"\n", i)
        line = payload[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode()] = v.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", payload[nl + 1:nl + 9])
            fields[line.decode()] = payload[nl + 9:nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


def test_records_are_mirrored_to_journald(tmp_path: Path) -> None:
    sock_path = tmp_path / "journal.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        srv.bind(str(sock_path))
        srv.settimeout(5)
        log = AuditLog(tmp_path / "audit.log", key=_key(), journal_socket=sock_path)
        rec = log.record("secrets.set", tenant="alice", outcome="ok",
                         details={"name": "API_KEY", "multi": "line1\nline2"})
        fields = _parse_journal(srv.recv(65536))
    finally:
        srv.close()
    assert fields["SYSLOG_IDENTIFIER"] == "lobsterd-audit"
    assert fields["LOBSTERD_AUDIT_ACTION"] == "secrets.set"
    assert fields["LOBSTERD_AUDIT_TENANT"] == "alice"
    assert fields["LOBSTERD_AUDIT_SEQ"] == "1"
    assert json.loads(fields["LOBSTERD_AUDIT_RECORD"]) == rec
    assert "secrets.set" in fields["MESSAGE"]


def test_journald_trouble_never_fails_the_record(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "plain"
    not_a_socket.write_text("")
    for target in (tmp_path / "missing.sock", not_a_socket):
        log = AuditLog(tmp_path / f"{target.name}.log", journal_socket=target)
        assert log.record("init", tenant=None, outcome="ok")["seq"] == 1
    # A socket nobody reads from any more.
    sock_path = tmp_path / "dead.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.close()
    log = AuditLog(tmp_path / "dead.log", journal_socket=sock_path)
    assert log.record("init", tenant=None, outcome="ok")["seq"] == 1


# ---------------------------------------------------------------- wiring


def test_audit_log_for_uses_hmac_when_master_key_exists(
    tmp_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_MASTER_KEY, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert audit_log_for(tmp_config).alg == ALG_SHA
    MasterKey.create(tmp_config.paths.master_key)
    log = audit_log_for(tmp_config)
    assert log.alg == ALG_HMAC
    assert log.path == tmp_config.paths.audit_log
