"""The encrypted secrets store and the redaction helpers."""

from __future__ import annotations

import io
import logging
import secrets
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lobsterd.config import Config
from lobsterd.errors import MasterKeyError, SecretsError, ValidationFailed
from lobsterd.security.crypto import ENV_MASTER_KEY, MasterKey
from lobsterd.security.redact import (
    RedactingFilter,
    SecretStr,
    redact,
    register_secret,
)
from lobsterd.security.secrets import MAX_VALUE_BYTES, SecretStore, open_store


def _value(tag: str = "") -> str:
    """A fresh secret-looking value, generated at run time (none is ever committed)."""
    return f"{tag}{secrets.token_urlsafe(24)}"


@pytest.fixture
def master() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def store(tmp_config: Config, master: MasterKey) -> SecretStore:
    return SecretStore(tmp_config, master)


def _raw_files(cfg: Config) -> bytes:
    out = b""
    for p in sorted(cfg.paths.state_dir.rglob("*")):
        if p.is_file():
            out += p.read_bytes()
    return out


def test_set_get_override_and_isolation(store: SecretStore) -> None:
    host_v, alice_v, bob_other = _value(), _value(), _value()
    store.set("OPENAI_API_KEY", host_v)
    store.set("OPENAI_API_KEY", alice_v, tenant="alice")
    store.set("ONLY_BOB", bob_other, tenant="bob")
    assert store.get("OPENAI_API_KEY") == host_v
    assert store.get("OPENAI_API_KEY", tenant="alice") == alice_v
    assert store.get("OPENAI_API_KEY", tenant="bob") is None  # exact scope, no fallback

    alice = store.resolve_for_tenant("alice")
    bob = store.resolve_for_tenant("bob")
    carol = store.resolve_for_tenant("carol")
    assert alice == {"OPENAI_API_KEY": alice_v}
    assert bob == {"OPENAI_API_KEY": host_v, "ONLY_BOB": bob_other}
    assert carol == {"OPENAI_API_KEY": host_v}
    assert bob_other not in alice.values() and alice_v not in bob.values()


def test_update_replaces_value_and_keeps_one_row(store: SecretStore) -> None:
    store.set("K", "first-value")
    store.set("K", "second-value")
    assert store.get("K") == "second-value"
    assert [i.name for i in store.list()] == ["K"]


def test_internal_secrets_never_leak_into_tenant_view(store: SecretStore) -> None:
    token = _value()
    store.set_internal("alice", "agent_token", token)
    store.set("PROVIDER", "v-provider", tenant="alice")
    assert store.get_internal("alice", "agent_token") == token
    assert token not in store.resolve_for_tenant("alice").values()
    listed = store.list("alice") + store.list(all_scopes=True)
    assert all(not i.scope.startswith("internal:") for i in listed)
    with pytest.raises(SecretsError) as ei:
        store.get_internal("bob", "agent_token")
    assert "missing" in str(ei.value)
    store.set_internal("alice", "gateway_token", _value())
    store.drop_internal("alice", "agent_token")
    with pytest.raises(SecretsError):
        store.get_internal("alice", "agent_token")
    assert store.get_internal("alice", "gateway_token")
    store.drop_internal("alice")
    store.drop_internal("alice")  # idempotent
    with pytest.raises(SecretsError):
        store.get_internal("alice", "gateway_token")


def test_list_shows_names_scopes_never_values(store: SecretStore) -> None:
    v1, v2 = _value(), _value()
    store.set("A_KEY", v1)
    store.set("B_KEY", v2, tenant="alice")
    assert [(i.name, i.scope) for i in store.list()] == [("A_KEY", "host")]
    assert [(i.name, i.scope) for i in store.list("alice")] == [("B_KEY", "tenant:alice")]
    everything = store.list(all_scopes=True)
    assert [(i.name, i.scope) for i in everything] == [("A_KEY", "host"),
                                                      ("B_KEY", "tenant:alice")]
    text = repr(everything) + str([i.to_dict() for i in everything])
    assert v1 not in text and v2 not in text


def test_rm_and_drop_tenant_are_idempotent(store: SecretStore) -> None:
    store.set("X", "value-x", tenant="alice")
    store.set("Y", "value-y", tenant="alice")
    store.set_internal("alice", "gateway_token", "tok-value")
    store.set("X", "host-x")
    assert store.rm("X", tenant="alice") is True
    assert store.rm("X", tenant="alice") is False
    assert store.drop_tenant("alice") == 2
    assert store.drop_tenant("alice") == 0
    assert store.resolve_for_tenant("alice") == {"X": "host-x"}


def test_values_are_not_stored_in_clear(tmp_config: Config, store: SecretStore) -> None:
    values = [_value("clear-check-") for _ in range(5)]
    for i, v in enumerate(values):
        store.set(f"K{i}", v, tenant="alice" if i % 2 else None)
    store.set_internal("alice", "agent_token", values[0] + "-internal")
    raw = _raw_files(tmp_config)
    assert raw  # the store exists
    for v in values:
        assert v.encode() not in raw
        assert v.encode("utf-16-le") not in raw
    assert b"clear-check-" not in raw
    assert (tmp_config.paths.secrets_db.stat().st_mode & 0o777) == 0o600


def test_swapping_blobs_between_rows_fails_authentication(
    tmp_config: Config, store: SecretStore
) -> None:
    store.set("API_KEY", _value(), tenant="alice")
    store.set("API_KEY", _value(), tenant="bob")
    store.set("OTHER", _value(), tenant="bob")
    db = sqlite3.connect(tmp_config.paths.secrets_db)
    blobs = dict(db.execute("SELECT scope || '/' || name, blob FROM secrets").fetchall())
    # Give alice's row bob's blob: same name, other tenant.
    db.execute("UPDATE secrets SET blob = ? WHERE scope = 'tenant:alice'",
               (blobs["tenant:bob/API_KEY"],))
    # And bob's API_KEY row the blob of his other secret: same tenant, other name.
    db.execute("UPDATE secrets SET blob = ? WHERE scope = 'tenant:bob' AND name = 'API_KEY'",
               (blobs["tenant:bob/OTHER"],))
    db.commit()
    db.close()
    with pytest.raises(SecretsError) as ei:
        store.resolve_for_tenant("alice")
    assert "failed authentication" in str(ei.value)
    with pytest.raises(SecretsError):
        store.get("API_KEY", tenant="bob")


def test_moving_a_row_to_another_tenant_fails(tmp_config: Config, store: SecretStore) -> None:
    store.set("API_KEY", _value(), tenant="alice")
    db = sqlite3.connect(tmp_config.paths.secrets_db)
    db.execute("UPDATE secrets SET scope = 'tenant:mallory' WHERE scope = 'tenant:alice'")
    db.commit()
    db.close()
    with pytest.raises(SecretsError):
        store.resolve_for_tenant("mallory")
    # An internal token relabelled as an operator secret is refused too.
    store.set_internal("alice", "agent_token", _value())
    db = sqlite3.connect(tmp_config.paths.secrets_db)
    db.execute("UPDATE secrets SET scope = 'tenant:alice', name = 'AGENT' "
               "WHERE scope = 'internal:alice'")
    db.commit()
    db.close()
    with pytest.raises(SecretsError):
        store.resolve_for_tenant("alice")


def test_flipped_bit_in_blob_is_detected(tmp_config: Config, store: SecretStore) -> None:
    store.set("K", _value())
    db = sqlite3.connect(tmp_config.paths.secrets_db)
    (blob,) = db.execute("SELECT blob FROM secrets").fetchone()
    bad = bytearray(blob)
    bad[-1] ^= 1
    db.execute("UPDATE secrets SET blob = ?", (bytes(bad),))
    db.commit()
    db.close()
    with pytest.raises(SecretsError):
        store.get("K")


def test_wrong_master_key_is_a_clear_error_before_decrypting(
    tmp_config: Config, store: SecretStore, master: MasterKey
) -> None:
    store.set("K", _value())
    other = MasterKey.generate()
    with pytest.raises(MasterKeyError) as ei:
        SecretStore(tmp_config, other)
    msg = str(ei.value)
    assert f"key id {other.key_id}, store expects {master.key_id}" in msg
    # The right key still works afterwards.
    assert SecretStore(tmp_config, master).get("K") is not None


def test_open_store_without_master_key_says_run_init(
    tmp_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_MASTER_KEY, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(MasterKeyError) as ei:
        open_store(tmp_config)
    assert "run lobsterd init" in str(ei.value)
    assert not tmp_config.paths.secrets_db.exists()


def test_corrupt_database_is_a_clear_error(tmp_config: Config, master: MasterKey) -> None:
    tmp_config.paths.state_dir.mkdir(parents=True)
    tmp_config.paths.secrets_db.write_bytes(b"this is not sqlite" * 100)
    tmp_config.paths.secrets_db.chmod(0o600)
    with pytest.raises(SecretsError) as ei:
        SecretStore(tmp_config, master)
    assert "corrupt" in str(ei.value)


@pytest.mark.parametrize("name", ["lower", "1ABC", "A-B", "A B", "", "A" * 65, "ÄPI",
                                  "OPENCLAW_GATEWAY_TOKEN", "SSH_AUTHORIZED_KEY",
                                  "TLS_SERVER_KEY", "LOBSTER_X", "LOBSTERD_MASTER_KEY"])
def test_bad_or_reserved_names_are_refused(store: SecretStore, name: str) -> None:
    with pytest.raises(ValidationFailed):
        store.set(name, "value-1")


def test_rejected_name_is_not_echoed(store: SecretStore) -> None:
    """A value pasted where the name belongs must not end up in the error message."""
    pasted = "sk-" + secrets.token_hex(20)
    with pytest.raises(ValidationFailed) as ei:
        store.set(pasted, "x" * 8)
    assert pasted not in str(ei.value)
    assert pasted[:10] not in str(ei.value)


def test_valid_names() -> None:
    from lobsterd.security.secrets import validate_secret_name

    for name in ("A", "OPENAI_API_KEY", "X9", "A" * 64, "FIREWORKS_API_KEY"):
        assert validate_secret_name(name) == name


@pytest.mark.parametrize("value", ["", "a\x00b", "x" * (MAX_VALUE_BYTES + 1),
                                   "é" * (MAX_VALUE_BYTES // 2 + 1)])
def test_bad_values_are_refused_without_echo(store: SecretStore, value: str) -> None:
    with pytest.raises(ValidationFailed) as ei:
        store.set("K", value)
    if value:
        assert value[:8] not in str(ei.value)


def test_max_size_value_round_trips(store: SecretStore) -> None:
    big = "v" * MAX_VALUE_BYTES
    store.set("BIG", big)
    assert store.get("BIG") == big


def test_tenant_names_are_validated(store: SecretStore) -> None:
    with pytest.raises(ValidationFailed):
        store.set("K", "v-value", tenant="Bad_Name")
    with pytest.raises(ValidationFailed):
        store.resolve_for_tenant("../etc")


def test_store_works_across_instances_and_processes(
    tmp_config: Config, master: MasterKey
) -> None:
    a = SecretStore(tmp_config, master)
    b = SecretStore(tmp_config, master)
    a.set("SHARED", "from-a-123")
    assert b.get("SHARED") == "from-a-123"


# ---------------------------------------------------------------- redaction


def test_redact_masks_values_and_escaped_forms() -> None:
    v = 'p@ss"w\\ord-' + secrets.token_hex(8)
    import json

    text = f"raw={v} json={json.dumps({'k': v})} repr={v!r}"
    out = redact(text, [v])
    assert v not in out
    assert json.dumps(v)[1:-1] not in out
    assert repr(v)[1:-1] not in out
    assert out.count("***") == 3


def test_redact_longest_first_and_secretstr() -> None:
    inner = "abcdef123"
    outer = "xx" + inner + "yy"
    assert redact(f"{outer} {inner}", [inner, SecretStr(outer)]) == "*** ***"


def test_secretstr_hides_itself() -> None:
    v = _value()
    s = SecretStr(v)
    for text in (str(s), repr(s), f"{s}", f"{s!r}", f"{s:>10}", str([s]), str({"k": s})):
        assert v not in text
    assert s.reveal() == v
    assert s == SecretStr(v) and s != SecretStr(v + "x")
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_logging_filter_masks_registered_values() -> None:
    v = _value("log-")
    register_secret(v)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("lobsterd.test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.error("calling provider with %s", v)
        try:
            raise RuntimeError(f"provider rejected {v}")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = buf.getvalue()
    assert "calling provider with ***" in out
    assert "provider rejected ***" in out
    assert v not in out


def test_store_registers_values_for_redaction(store: SecretStore) -> None:
    from lobsterd.security.redact import redact_known

    v = _value("reg-")
    store.set("K", v)
    assert redact_known(f"oops {v}") == "oops ***"


def test_crash_trace_does_not_show_secret_values(tmp_config: Config) -> None:
    """An uncaught exception that (wrongly) embeds a value prints it masked."""
    key = MasterKey.generate()
    value = _value("crash-")
    script = textwrap.dedent(f"""
        import sys
        from tests.helpers import make_config
        from pathlib import Path
        from lobsterd.security.crypto import MasterKey
        from lobsterd.security.redact import install_excepthook
        from lobsterd.security.secrets import SecretStore
        install_excepthook()
        cfg = make_config(Path({str(tmp_config.paths.state_dir.parent)!r}))
        store = SecretStore(cfg, MasterKey.load(cfg))
        store.set("K", sys.stdin.read())
        v = store.get("K")
        raise RuntimeError("provider said no to " + v)
    """)
    import os

    env = {**os.environ, ENV_MASTER_KEY: bytes(key.derive("x")).hex()}
    proc = subprocess.run([sys.executable, "-c", script], input=value, capture_output=True,
                          text=True, env=env, timeout=60, check=False,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode != 0
    assert "RuntimeError: provider said no to ***" in proc.stderr
    assert value not in proc.stderr and value not in proc.stdout


def test_cli_size_limit_matches_the_store() -> None:
    from lobsterd.cli import secrets_cmd

    assert secrets_cmd.MAX_VALUE_BYTES == MAX_VALUE_BYTES


def test_loose_database_mode_is_tightened(tmp_config: Config, master: MasterKey) -> None:
    SecretStore(tmp_config, master).set("K", "value-1")
    tmp_config.paths.secrets_db.chmod(0o644)
    SecretStore(tmp_config, master)
    assert (tmp_config.paths.secrets_db.stat().st_mode & 0o777) == 0o600
