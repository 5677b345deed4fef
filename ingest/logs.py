"""Structured logs: one JSON object per line on stdout.

Every line has ``time`` (UTC, ms), ``level``, ``event`` (the message: a short snake_case
name, never a sentence with values in it), ``logger``, the fields passed as ``extra=``,
and ``request_id`` when logged while a request is being handled.

Credentials are masked in every line, whoever logs it (our code, aiohttp's server log of a
malformed request, asyncio, redis-py, asyncpg, tracebacks): see ``redact``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

import msgspec

# The id of the request being handled by the current task (None outside a request).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# Ids taken from a client's X-Request-Id must look like ids; anything else is replaced.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# New ids: this process's random prefix and a counter, unique across pods and restarts
# without costing a random draw per request.
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_encode = msgspec.json.Encoder(enc_hook=repr).encode

MASK = "[REDACTED]"
# What gives a credential away, matched on the finished JSON line so that nothing escapes,
# whatever field or nesting it sits in. Each alternative captures what stays (one group) and
# masks what follows. No match spans a JSON string boundary (values stop at `"`, and at `\`:
# JSON escapes and the \r\n of a bytes repr), so the line stays valid JSON.
# A word starts here: not after a letter, or right after an escaped \n, \r or \t.
_START = r"(?:(?<![\w.-])|(?<=\\[nrt]))"
# Names that say credential: access_token, client_secret, PGPASSWORD, x-api-key, jwt, ...
_KEY = (
    r"(?:token|passw(?:or)?d|pwd|secret|jwt|api[_-]?key|credential|signature|session)"
    r"[\w.-]{0,24}"
)
_SECRET = re.compile(
    # URL userinfo password: postgresql://user:pw@host, redis://:pw@host.
    r"""(://[^/\s:@"'\\]*:)[^/\s"']+(?=@)"""
    # Credential headers, in a raw request, a bytes repr, a dict: the whole value.
    rf"""|({_START}(?:proxy-authorization|authorization|set-cookie|cookie|x-api-key"""
    r"""|x-auth-token|x-access-token)(?:\s*[:=]\s*(?:\\"|')?|"""
    r"""(?:"|\\"|')\s*[:=]\s*(?:"|\\"|')))[^"'\\\r\n]+"""
    # Credential names with a value: quoted (password='a b' in a DSN, 'secret': 'x' in a
    # repr), double-quoted (JSON "jwt":"x", or \"jwt\": \"x\" inside a string), or bare
    # (a query or form: ?access_token=x&...).
    rf"""|({_KEY}(?:=\s*|'\s*[:=]\s*)')[^'"\\]+"""
    rf"""|({_KEY}(?:=\s*\\"|\\"\s*[:=]\s*\\"|"\s*:\s*"))[^"\\]+"""
    rf"""|({_KEY}=\s*)[^\s"'\\&;,{{}}\[\]()<>]+"""
    # Authorization schemes wherever they appear without their header name.
    rf"""|({_START}(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+"""
    # Anything shaped like a JWT (header.payload[.signature], base64url of a JSON object).
    rf"""|({_START})eyJ[\w-]+\.[\w.-]*""",
    re.IGNORECASE,
)


def _mask(match: re.Match[str]) -> str:
    return match[match.lastindex or 0] + MASK


# A line with none of these words (nearly all lines) is not scanned by _SECRET: this check
# costs ~3 us on a usual line, the full scan 30 times more.
_HINT = re.compile(
    "://|authoriz|cookie|x-api-key|token|passw|pwd|secret|jwt|api.?key|credential|signature"
    "|session|bearer|basic|eyj"
)


def redact(text: str) -> str:
    """``text`` with every credential it shows replaced by MASK."""
    if _HINT.search(text.lower()) is None:
        return text
    return _SECRET.sub(_mask, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            return redact(self._json(record))
        except Exception as exc:  # a bad %-format or repr: still one line, still redacted
            failed = {"level": "error", "event": "log_format_failed", "logger": record.name}
            return redact(_encode({**failed, "msg": str(record.msg), "error": repr(exc)}).decode())

    def _json(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out.setdefault(key, value)  # the fields above are never overwritten
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _encode(out).decode()


class _Handler(logging.StreamHandler[TextIO]):
    def handleError(self, record: logging.LogRecord) -> None:
        # The default prints the record's raw message and arguments to stderr.
        with contextlib.suppress(Exception):
            sys.stderr.write(f"logging failed: {redact(repr(sys.exc_info()[1]))}\n")


@contextlib.contextmanager
def request_context(client_id: str | None) -> Iterator[str]:
    """Bind a request id (the client's X-Request-Id if it looks like one, else a new one) to
    the log lines of the current task while the block runs; yields the id."""
    if client_id and _CLIENT_ID.fullmatch(client_id):
        request_id = client_id
    else:
        request_id = f"{_PREFIX}-{next(_COUNTER):x}"
    token = REQUEST_ID.set(request_id)
    try:
        yield request_id
    finally:
        REQUEST_ID.reset(token)


def setup(level: str, stream: TextIO | None = None) -> None:
    """One handler, on the root logger, for every logger of the process (no library adds its
    own, so every line is redacted by JsonFormatter)."""
    handler = _Handler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log is one line per request: too much for the hot path.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def capture_stderr() -> None:
    """Send what Python would print to stderr by itself through the log (and its redaction):
    uncaught exceptions, in threads too, exceptions ignored in __del__, warnings. For the
    service process only: test runners install hooks of their own."""
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    sys.unraisablehook = _unraisable


_crash_log = logging.getLogger("ingest.crash")


def _uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    _crash_log.critical("uncaught_exception", exc_info=(kind, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        thread = args.thread.name if args.thread is not None else None
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        _crash_log.error("uncaught_exception", exc_info=exc_info, extra={"thread_name": thread})


def _unraisable(args: sys.UnraisableHookArgs) -> None:
    if args.exc_value is not None:
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        extra = {"detail": args.err_msg or "exception ignored", "object": args.object}
        _crash_log.error("unraisable_exception", exc_info=exc_info, extra=extra)
