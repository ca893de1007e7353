"""``lobsterd secrets`` and ``lobsterd audit`` end to end, as root: real files, modes,
owners, processes. Every value is generated at run time and must never show up in
output, argv, the audit log or any file in clear.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lobsterd.config import Config, load_config
from lobsterd.security.crypto import ENV_MASTER_KEY, ensure_master_key
from lobsterd.security.secrets import SecretStore, open_store
from tests.helpers import need_root

pytestmark = pytest.mark.integration

NOBODY = 65534


_SCRUB = (ENV_MASTER_KEY, "CREDENTIALS_DIRECTORY", "LOBSTERD_CONFIG")


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Host:
    root: Path
    config: Path
    env: dict[str, str]

    def run(self, *args: str, stdin: str | None = None,
            extra_env: dict[str, str] | None = None) -> Ran:
        """Run the CLI in-process (fast); :meth:`spawn` runs it as a real process."""
        from click.testing import CliRunner

        from lobsterd.cli.main import cli

        env: dict[str, str | None] = {k: None for k in _SCRUB}
        env.update(extra_env or {})
        saved = sys.excepthook
        try:
            res = CliRunner(mix_stderr=False).invoke(
                cli, ["--config", str(self.config), *args], input=stdin, env=env)
        finally:
            sys.excepthook = saved
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        return Ran(res.exit_code, res.stdout, res.stderr)

    def spawn(self, *args: str, stdin: str | None = None) -> Ran:
        proc = subprocess.run(
            [sys.executable, "-m", "lobsterd", "--config", str(self.config), *args],
            input=stdin, capture_output=True, text=True, env=self.env, timeout=60, check=False)
        return Ran(proc.returncode, proc.stdout, proc.stderr)

    def store(self) -> SecretStore:
        return open_store(load_config(self.config))

    def all_bytes(self, exclude: tuple[Path, ...] = ()) -> bytes:
        out = b""
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and p not in exclude:
                out += p.read_bytes()
        return out


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    need_root()
    root = tmp_path / "host"
    root.mkdir()
    os.chmod(tmp_path, 0o755)  # "nobody" may reach the root-only dirs, not into them
    os.chmod(root, 0o755)
    config = root / "lobsterd.toml"
    config.write_text(
        "[paths]\n"
        f'config_dir = "{root / "etc"}"\n'
        f'state_dir = "{root / "state"}"\n'
        f'run_dir = "{root / "run"}"\n'
        f'cache_dir = "{root / "cache"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    yield Host(root, config, env)


def _init(host: Host) -> None:
    assert ensure_master_key(load_config(host.config)) is True


def _value(tag: str) -> str:
    return f"{tag}-{secrets.token_urlsafe(24)}"


def _no_leak(proc: Ran, *values: str) -> None:
    for v in values:
        assert v not in proc.stdout and v not in proc.stderr


def test_without_master_key_set_says_run_init(host: Host) -> None:
    v = _value("nokey")
    proc = host.spawn("secrets", "set", "API_KEY", stdin=v)
    assert proc.returncode == 1
    assert "error[MASTER_KEY_ERROR]" in proc.stderr and "run lobsterd init" in proc.stderr
    _no_leak(proc, v)


def test_set_from_stdin_file_env_and_tenant_override(host: Host) -> None:
    _init(host)
    from_stdin, from_file, from_env, for_alice = (_value(t) for t in ("in", "file", "env", "al"))
    value_file = host.root / "value.txt"
    fd = os.open(value_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, from_file.encode() + b"\n")
    os.close(fd)

    procs = [
        host.run("secrets", "set", "OPENAI_API_KEY", stdin=from_stdin + "\n"),
        host.run("secrets", "set", "FIREWORKS_API_KEY", "--from-file", str(value_file)),
        host.run("secrets", "set", "OTHER_KEY", "--from-env", "MY_VAR",
                 extra_env={"MY_VAR": from_env}),
        host.run("secrets", "set", "OPENAI_API_KEY", "--tenant", "alice", stdin=for_alice),
    ]
    for p in procs:
        assert p.returncode == 0, p.stderr
        _no_leak(p, from_stdin, from_file, from_env, for_alice)
    assert "set OPENAI_API_KEY (tenant:alice)" in procs[3].stdout

    store = host.store()
    assert store.resolve_for_tenant("alice") == {
        "OPENAI_API_KEY": for_alice, "FIREWORKS_API_KEY": from_file, "OTHER_KEY": from_env}
    assert store.resolve_for_tenant("bob")["OPENAI_API_KEY"] == from_stdin

    listing = host.run("secrets", "list", "--all")
    as_json = host.run("secrets", "list", "--all", "--json")
    alice = host.run("secrets", "list", "--tenant", "alice")
    for p in (listing, as_json, alice):
        assert p.returncode == 0, p.stderr
        _no_leak(p, from_stdin, from_file, from_env, for_alice)
    rows = json.loads(as_json.stdout)
    assert {(r["name"], r["scope"]) for r in rows} == {
        ("OPENAI_API_KEY", "host"), ("FIREWORKS_API_KEY", "host"), ("OTHER_KEY", "host"),
        ("OPENAI_API_KEY", "tenant:alice")}
    assert all(set(r) == {"name", "scope", "updated_at"} for r in rows)
    assert "tenant:alice" in alice.stdout and "host" not in alice.stdout.split("\n", 1)[1]

    # Nothing on disk holds a value in clear (except the file we wrote it in).
    raw = host.all_bytes(exclude=(value_file,))
    for v in (from_stdin, from_file, from_env, for_alice):
        assert v.encode() not in raw


def test_value_is_never_accepted_on_argv(host: Host) -> None:
    _init(host)
    v = _value("argv")
    attempts = [
        ("secrets", "set", "API_KEY", "--value", v),
        ("secrets", "set", "API_KEY", f"--value={v}"),
        ("secrets", "set", "API_KEY", v),
        ("secrets", "set", v),
    ]
    for i, args in enumerate(attempts):
        proc = (host.spawn if i == 0 else host.run)(*args, stdin="")
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        _no_leak(proc, v)
    assert host.store().list(all_scopes=True) == []
    helptext = host.run("secrets", "set", "--help").stdout
    assert "--value" not in helptext and "--from-env" in helptext


def test_running_process_argv_has_no_value(host: Host) -> None:
    _init(host)
    v = _value("ps")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lobsterd", "--config", str(host.config), "secrets", "set",
         "API_KEY"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=host.env, text=True)
    try:
        cmdline = b""
        deadline = time.monotonic() + 10
        while b"secrets" not in cmdline and time.monotonic() < deadline:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            time.sleep(0.02)
        out, err = proc.communicate(v, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"API_KEY" in cmdline and v.encode() not in cmdline
    assert v not in out and v not in err
    assert host.store().get("API_KEY") == v


def test_files_are_root_only(host: Host) -> None:
    _init(host)
    assert host.run("secrets", "set", "API_KEY", stdin=_value("m")).returncode == 0
    cfg = load_config(host.config)
    for path in (cfg.paths.master_key, cfg.paths.secrets_db, cfg.paths.audit_log,
                 cfg.paths.audit_log.with_name("audit.log.head")):
        st = path.stat()
        assert (st.st_mode & 0o777) == 0o600, path
        assert st.st_uid == 0 and st.st_gid == 0, path
    assert (cfg.paths.state_dir.stat().st_mode & 0o077) == 0

    # An unprivileged user can open none of them, and lobsterd says so clearly.
    assert _as_nobody(_nobody_probe, cfg) == 0


def _nobody_probe(cfg: Config) -> int:
    """Runs as uid 65534: 0 when every file is unreadable and every error is clear."""
    from lobsterd.errors import LobsterError
    from lobsterd.security.audit import AuditLog
    from lobsterd.security.crypto import MasterKey

    for path in (cfg.paths.master_key, cfg.paths.secrets_db, cfg.paths.audit_log):
        try:
            open(path, "rb").close()
            return 10
        except PermissionError:
            pass
    calls: tuple[Callable[[], object], ...] = (
        lambda: MasterKey.load(cfg, environ={}),
        lambda: MasterKey.create(cfg.paths.master_key),
        lambda: SecretStore(cfg, MasterKey.generate()),
        lambda: AuditLog(cfg.paths.audit_log).tail(5),
        lambda: AuditLog(cfg.paths.audit_log).record("init", tenant=None, outcome="ok"),
    )
    for i, call in enumerate(calls):
        try:
            call()
            return 20 + i
        except LobsterError as exc:
            if "Permission denied" not in str(exc) or "as root" not in str(exc):
                return 30 + i
    return 0


def _as_nobody(fn: Callable[[Config], int], cfg: Config) -> int:
    """Run ``fn(cfg)`` in a forked child that dropped to uid/gid 65534; its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = fn(cfg)
        except BaseException:
            import traceback

            os.write(2, ("nobody probe crashed: " + traceback.format_exc()).encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_loose_or_foreign_master_key_is_refused(host: Host) -> None:
    _init(host)
    key = load_config(host.config).paths.master_key
    key.chmod(0o644)
    proc = host.run("secrets", "list")
    assert proc.returncode == 1 and "chmod 600" in proc.stderr and "0644" in proc.stderr
    key.chmod(0o600)
    os.chown(key, NOBODY, NOBODY)
    try:
        proc = host.run("secrets", "list")
        assert proc.returncode == 1 and f"owned by uid {NOBODY}, not root" in proc.stderr
    finally:
        os.chown(key, 0, 0)
    assert host.run("secrets", "list").returncode == 0


def test_wrong_master_key_is_a_clear_error(host: Host) -> None:
    _init(host)
    v = _value("wk")
    assert host.run("secrets", "set", "API_KEY", stdin=v).returncode == 0
    other = secrets.token_bytes(32).hex()
    proc = host.run("secrets", "list", extra_env={ENV_MASTER_KEY: other})
    assert proc.returncode == 1
    assert "does not match" in proc.stderr and "key id" in proc.stderr
    assert other not in proc.stderr
    bad = host.run("secrets", "list", extra_env={ENV_MASTER_KEY: "not-a-key"})
    assert bad.returncode == 1 and "not-a-key" not in bad.stderr
    _no_leak(proc, v)


def test_oversized_value_error_has_no_value(host: Host) -> None:
    _init(host)
    big = secrets.token_hex(40_000)
    proc = host.run("secrets", "set", "API_KEY", stdin=big)
    assert proc.returncode == 2 and "larger than" in proc.stderr
    assert big[:16] not in proc.stderr


def test_set_and_rm_are_audited_by_name_only(host: Host) -> None:
    _init(host)
    v = _value("audit")
    assert host.run("secrets", "set", "API_KEY", "-t", "alice", stdin=v).returncode == 0
    assert host.run("secrets", "rm", "API_KEY", "-t", "alice").returncode == 0
    missing = host.run("secrets", "rm", "API_KEY", "-t", "alice")
    assert missing.returncode == 1 and "no secret" in missing.stderr

    tail = host.run("audit", "tail", "--json")
    assert tail.returncode == 0, tail.stderr
    recs = json.loads(tail.stdout)
    assert [(r["action"], r["outcome"], r["error_code"]) for r in recs] == [
        ("secrets.set", "ok", None), ("secrets.rm", "ok", None),
        ("secrets.rm", "error", "SECRETS_ERROR")]
    assert all(r["tenant"] == "alice" and r["details"]["name"] == "API_KEY" for r in recs)
    assert recs[0]["details"]["source"] == "stdin"
    assert all(r["alg"] == "hmac-sha256" and r["actor"]["uid"] == 0 for r in recs)

    human = host.run("audit", "tail", "-n", "2", "--tenant", "alice")
    assert human.returncode == 0 and human.stdout.count("secrets.rm") == 2
    assert "secrets.set" not in human.stdout

    cfg = load_config(host.config)
    assert v.encode() not in cfg.paths.audit_log.read_bytes()

    ok = host.run("audit", "verify")
    assert ok.returncode == 0 and "3 records intact" in ok.stdout

    lines = cfg.paths.audit_log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"outcome":"ok"', b'"outcome":"denied"')
    cfg.paths.audit_log.write_bytes(b"".join(lines))
    bad = host.run("audit", "verify")
    assert bad.returncode == 1
    assert "line 2: modified" in bad.stderr
    as_json = json.loads(host.run("audit", "verify", "--json").stdout)
    assert as_json["ok"] is False
    assert as_json["problems"][0]["line"] == 2 and as_json["problems"][0]["kind"] == "modified"
