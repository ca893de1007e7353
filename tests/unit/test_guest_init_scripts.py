"""The initramfs /init (busybox sh) and lobster-init (PID 1): syntax, helpers, supervision.

The shell script is only ever *sourced* here (LOBSTER_INITRAMFS_LIB=1): its main part
mounts and powers off, so it refuses to run unless it is PID 1. lobster-init runs in its
dry-run mode, which never mounts, never signals anything but its own children and
exits instead of powering off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lobsterd.guest import lobster_init as li
from tests.helpers import need_binary

GUEST = Path(li.__file__).parent
SCRIPT = GUEST / "initramfs_init.sh"


def _sh_argv(shell: str) -> list[str]:
    return ["busybox", "sh"] if shell == "busybox" else [shell]


def run_lib(shell: str, body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Source the script's functions in ``shell`` and run ``body``."""
    prog = f". {SCRIPT}\n{textwrap.dedent(body)}"
    return subprocess.run(
        [*_sh_argv(shell), "-c", prog],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": os.environ["PATH"], "LOBSTER_INITRAMFS_LIB": "1"},
        cwd=tmp_path,
        check=False,
    )


@pytest.fixture(params=["busybox", "dash"])
def shell(request: pytest.FixtureRequest) -> str:
    need_binary(request.param)
    return str(request.param)


# --------------------------------------------------------------------------- initramfs


def test_script_syntax(shell: str) -> None:
    res = subprocess.run(
        [*_sh_argv(shell), "-n", str(SCRIPT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode == 0, res.stderr


def test_script_has_busybox_shebang() -> None:
    assert SCRIPT.read_text().startswith("#!/bin/busybox sh\n")


def test_script_refuses_to_run_unless_pid_1(shell: str) -> None:
    res = subprocess.run(
        [*_sh_argv(shell), str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": os.environ["PATH"]},
        check=False,
    )
    assert res.returncode == 2
    assert "not PID 1" in res.stderr


def test_parse_cmdline(shell: str, tmp_path: Path) -> None:
    res = run_lib(
        shell,
        """
        parse_cmdline "quiet lobster.ip=10.200.0.6/30 lobster.gw=10.200.0.5 \
lobster.agent_hash=abc lobster.name=alpha panic=1"
        echo "$LOBSTER_IP|$LOBSTER_GW|$LOBSTER_NAME"
        parse_cmdline "quiet"
        echo "[$LOBSTER_IP]"
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["10.200.0.6/30|10.200.0.5|alpha", "[]"]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.200.0.6/30", True),
        ("0.0.0.0/0", True),
        ("255.255.255.255/32", True),
        ("10.200.0.6", False),
        ("10.200.0.6/33", False),
        ("10.200.0.6/", False),
        ("10.200.0/30", False),
        ("10.200.0.256/30", False),
        ("10..0.6/30", False),
        ("a.b.c.d/30", False),
        ("10.0.0.6/3x", False),
        ("", False),
    ],
)
def test_valid_cidr(shell: str, tmp_path: Path, value: str, ok: bool) -> None:
    res = run_lib(shell, f'valid_cidr "{value}" && echo yes || echo no', tmp_path)
    assert res.stdout.strip() == ("yes" if ok else "no"), res.stderr


@pytest.mark.parametrize(
    ("value", "ok"),
    [("10.200.0.5", True), ("1.2.3", False), ("1.2.3.4.5", False), (".1.2.3", False)],
)
def test_valid_ipv4(shell: str, tmp_path: Path, value: str, ok: bool) -> None:
    res = run_lib(shell, f'valid_ipv4 "{value}" && echo yes || echo no', tmp_path)
    assert res.stdout.strip() == ("yes" if ok else "no"), res.stderr


def test_module_file_resolution(shell: str, tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    (mods / "kernel").mkdir(parents=True)
    (mods / "virtio.ko").write_bytes(b"")
    (mods / "kernel" / "virtio_net.ko.xz").write_bytes(b"")
    (mods / "overlay.ko.zst").write_bytes(b"")
    res = run_lib(
        shell,
        """
        for e in virtio virtio.ko kernel/virtio_net kernel/virtio_net.ko.xz overlay.ko \
missing; do
            module_file "$PWD/mods" "$e" || echo "none:$e"
        done
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    m = str(mods)
    assert res.stdout.splitlines() == [
        f"{m}/virtio.ko",
        f"{m}/virtio.ko",
        f"{m}/kernel/virtio_net.ko.xz",
        f"{m}/kernel/virtio_net.ko.xz",
        f"{m}/overlay.ko.zst",
        "none:missing",
    ]


def test_load_modules_in_order_and_decompresses(shell: str, tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    for name in ("virtio_ring.ko", "virtio.ko", "virtio_net.ko.xz", "overlay.ko"):
        (mods / name).write_text(name)
    (tmp_path / "order").write_text(
        "# comment\nvirtio_ring.ko\n\nvirtio.ko\nnot_there.ko\nvirtio_net.ko\noverlay.ko\n"
    )
    res = run_lib(
        shell,
        """
        MODULE_DIR="$PWD/mods"; MODULE_ORDER="$PWD/order"; MODULE_TMP="$PWD/module.ko"
        insmod() { echo "insmod $(cat "$1")" >> "$PWD/calls"; }
        unxz() { sed 's/[.]xz$/ (decompressed)/' "$2"; }
        say() { echo "say: $*" >> "$PWD/calls"; }
        load_modules
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "insmod virtio_ring.ko",
        "insmod virtio.ko",
        f"say: module not_there.ko not found in {mods}",
        "insmod virtio_net.ko (decompressed)",
        "insmod overlay.ko",
    ]
    assert not (tmp_path / "module.ko").exists()


# --------------------------------------------------------------------------- lobster-init helpers


def test_init_shebang() -> None:
    assert (GUEST / "lobster_init.py").read_text().startswith("#!/usr/bin/python3\n")


def test_init_cmdline_helpers() -> None:
    p = li.parse_cmdline("quiet lobster.ip=10.0.0.6/30 lobster.name=alpha x=a=b")
    assert li.guest_ip(p) == "10.0.0.6"
    assert p["x"] == "a=b"
    assert li.guest_ip({"lobster.ip": "10.0.0.300/30"}) is None
    assert li.guest_ip({"lobster.ip": "0.0.0.0/0"}) == "0.0.0.0"
    assert li.guest_ip({}) is None


def test_dropbear_argv() -> None:
    assert li.dropbear_argv("/usr/sbin/dropbear", "10.0.0.6") == [
        "/usr/sbin/dropbear",
        "-R",
        "-F",
        "-E",
        "-s",
        "-j",
        "-k",
        "-p",
        "10.0.0.6:22",
    ]


def test_backoff() -> None:
    delay, nxt = li.next_backoff(li.BACKOFF_MIN_S, ran_s=0.1)
    assert (delay, nxt) == (li.BACKOFF_MIN_S, 2 * li.BACKOFF_MIN_S)
    cur = li.BACKOFF_MIN_S
    for _ in range(20):
        delay, cur = li.next_backoff(cur, ran_s=0.1)
    assert delay == cur == li.BACKOFF_MAX_S
    assert li.next_backoff(li.BACKOFF_MAX_S, ran_s=li.STABLE_S)[0] == li.BACKOFF_MIN_S


def test_mount_points_and_hostnames() -> None:
    text = "proc /proc proc rw 0 0\ntmpfs /run/with\\040space tmpfs rw 0 0\n"
    assert li.mount_points(text) == {"/proc", "/run/with space"}
    assert li.valid_hostname("alpha-1")
    for bad in ("", "-x", "x-", "UPPER", "a.b", "x" * 64):
        assert not li.valid_hostname(bad)


def test_init_refuses_without_pid_1_or_dry_run() -> None:
    res = subprocess.run(
        [sys.executable, str(GUEST / "lobster_init.py")],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": os.environ["PATH"]},
        check=False,
    )
    assert res.returncode == 2 and "PID 1" in res.stderr


# --------------------------------------------------------------------------- supervision


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _exists(pid: int) -> bool:
    """True while the process exists at all (a zombie nobody reaped still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_init_supervises_restarts_and_stops(tmp_path: Path) -> None:
    pidfile = tmp_path / "agent.pid"
    fake_agent = tmp_path / "fake_agent.py"
    fake_agent.write_text(
        "import os, signal, sys, time\n"
        f"open({str(pidfile)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "print('fake agent up', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        # A grandchild orphaned on purpose: init (a sub-reaper in dry-run) must reap it.
        "child = os.fork()\n"
        "if child == 0:\n"
        "    if os.fork() == 0:\n"
        f"        open({str(tmp_path / 'orphan')!r}, 'w').write(str(os.getpid()))\n"
        "        time.sleep(0.3)\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "time.sleep(60)\n"
    )
    (tmp_path / "cmdline").write_text("lobster.ip=127.0.0.1/30 lobster.name=alpha\n")
    env = {
        "PATH": os.environ["PATH"],
        "LOBSTER_INIT_DRY_RUN": "1",
        "LOBSTER_CMDLINE_FILE": str(tmp_path / "cmdline"),
        "LOBSTER_AGENT_CMD": f"{sys.executable} {fake_agent}",
        "LOBSTER_DROPBEAR": str(tmp_path / "no-dropbear"),
        "LOBSTER_LOG_DIR": str(tmp_path / "log"),
    }
    proc = subprocess.Popen([sys.executable, str(GUEST / "lobster_init.py")], env=env)
    try:
        _wait(pidfile.exists, 10, "agent never started")
        first = int(pidfile.read_text())
        _wait((tmp_path / "orphan").exists, 5, "orphan never started")
        orphan = int((tmp_path / "orphan").read_text())
        _wait(lambda: not _exists(orphan), 5, "orphan was not reaped")
        os.kill(first, signal.SIGKILL)
        _wait(
            lambda: pidfile.exists() and int(pidfile.read_text()) != first,
            5,
            "agent was not restarted",
        )
        second = int(pidfile.read_text())
        assert _alive(second)
        assert proc.poll() is None
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=6) == 0
        _wait(lambda: not _alive(second), 2, "agent survived the shutdown")
        log = (tmp_path / "log" / "init.log").read_text()
        assert "[agent] fake agent up" in log
        assert "[agent] to stderr" in log
        assert "dropbear not installed" in log
        assert "agent exited (killed by SIGKILL)" in log
        assert "shutting down" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pidfile.exists():
            pid = int(pidfile.read_text())
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_default_agent_command_imports_the_installed_agent(tmp_path: Path) -> None:
    """lobster-init's default command (module import, bytecode cached) starts a real agent."""
    from lobsterd.adapters.agent_client import AgentClient
    from lobsterd.guest.agent import token_hash

    argv = [a.replace("/usr/lib/lobster", str(GUEST)) for a in li.DEFAULT_AGENT_CMD]
    argv[0] = sys.executable
    assert argv[1] == "-S"  # no site-packages: the standard library must be enough
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
    (tmp_path / "cmdline").write_text(
        f"lobster.ip=127.0.0.1/30 lobster.agent_hash={token_hash('t0k')} "
        f"lobster.agent_port={ports[0]} lobster.health_port={ports[1]}\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "LOBSTER_CMDLINE_FILE": str(tmp_path / "cmdline"),
        "LOBSTER_LOG_DIR": str(tmp_path / "log"),
        "LOBSTER_RUN_DIR": str(tmp_path / "run"),
        "LOBSTER_GUEST_ROOT": str(tmp_path / "guest"),
    }
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    try:
        client = AgentClient("127.0.0.1", ports[0], ports[1], "t0k", timeout_s=2)
        client.wait_ready(timeout_s=15)
        assert "lobster.agent_hash" in client.get_cmdline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
