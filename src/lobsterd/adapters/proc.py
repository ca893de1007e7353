"""Running host commands: always an argv list, always a timeout."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lobsterd.errors import ExecFailed, ExecTimeout

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Result:
    """Run ``argv``; with ``check`` a non-zero exit raises :class:`ExecFailed`.

    Output is captured as text. A timeout kills the process and raises
    :class:`ExecTimeout` (checked or not: a hung command is never a normal result).
    """
    args = tuple(str(a) for a in argv)
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ExecTimeout(f"command timed out after {timeout:g}s: {' '.join(args)}") from None
    except OSError as exc:
        raise ExecFailed(f"cannot execute {args[0]}: {exc.strerror or exc}") from None
    res = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        tail = detail[-1] if detail else ""
        raise ExecFailed(f"command failed (exit {proc.returncode}): {' '.join(args)}: {tail}")
    return res
