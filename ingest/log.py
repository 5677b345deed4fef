"""Structured logs: one JSON object per line on stdout.

Every line has ``time`` (UTC, ms), ``level``, ``event`` (the message: a short snake_case
name, never a sentence with values in it), ``logger``, the fields passed as ``extra=``,
and ``request_id`` when logged while a request is being handled.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
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
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log is one line per request: too much for the hot path.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
