"""Keeping secret values out of everything lobsterd prints, logs or crashes with.

The first line of defence is that no code path ever formats a value into a message. This
module is the second: every value the secrets store hands out is registered here, and
:class:`RedactingFilter` (for ``logging`` handlers) and :func:`install_excepthook` (for
uncaught tracebacks) replace any registered value with ``***`` before text leaves the
process. :func:`redact` does the same for an explicit list of values.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from collections.abc import Iterable
from types import TracebackType

MASK = "***"
# Values shorter than this are not registered globally: masking every "1" or "on" in
# every log line would make logs unreadable while protecting nothing of value.
MIN_GLOBAL_LEN = 6

_lock = threading.Lock()
_known: set[str] = set()


class SecretStr:
    """A string that does not show itself: ``str``/``repr``/``format`` give ``***``.

    Use :meth:`reveal` at the one place the value is really needed (e.g. when building
    the agent's ``inject-secrets`` message).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretStr('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        import hmac

        if isinstance(other, SecretStr):
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> str:
        raise TypeError("SecretStr cannot be pickled")


def _variants(value: str) -> set[str]:
    """The value and the escaped forms it takes inside JSON and Python reprs."""
    out = {value}
    out.add(json.dumps(value)[1:-1])
    out.add(json.dumps(value, ensure_ascii=False)[1:-1])
    out.add(repr(value)[1:-1])
    return {v for v in out if v}


def redact(text: str, secrets: Iterable[str | SecretStr], mask: str = MASK) -> str:
    """Replace every occurrence of each value (and its JSON/repr escapes) with ``mask``."""
    values: set[str] = set()
    for s in secrets:
        raw = s.reveal() if isinstance(s, SecretStr) else s
        if raw:
            values |= _variants(raw)
    # Longest first, so a value that contains another is masked whole.
    for v in sorted(values, key=len, reverse=True):
        if v in text:
            text = text.replace(v, mask)
    return text


def register_secret(value: str | SecretStr) -> None:
    """Remember ``value`` so that log and crash output of this process masks it."""
    raw = value.reveal() if isinstance(value, SecretStr) else value
    if len(raw) >= MIN_GLOBAL_LEN:
        with _lock:
            _known.add(raw)


def redact_known(text: str) -> str:
    """Mask every value registered with :func:`register_secret`."""
    with _lock:
        known = tuple(_known)
    return redact(text, known) if known else text


class RedactingFilter(logging.Filter):
    """A handler filter that masks registered secret values in the final message.

    Attach it to *handlers* (logger filters do not see records propagated from child
    loggers). The record's message, arguments, exception text and stack are rewritten
    in place, so every formatter downstream sees only masked text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        record.msg = redact_known(msg)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_known(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_known(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: root)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _redacting_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(redact_known(text))
    sys.stderr.flush()


def install_excepthook() -> None:
    """Make uncaught tracebacks of this process mask registered values (idempotent)."""
    sys.excepthook = _redacting_excepthook
