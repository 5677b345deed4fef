"""Structured logs: one JSON object per line, LOG_LEVEL respected, request ids bound."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from devtools import procs
from ingest import logs, ops

from .conftest import REDIS_URL, SECRET, auth, batch

PING = "/api/v1/tracking/ping"
GENERATED = r"[0-9a-f]{8}-[0-9a-f]+"  # a new request id: process prefix, counter


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup() takes over the root logger: put pytest's handlers and level back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access)


def lines(stream: io.StringIO) -> list[dict]:
    out = []
    for line in stream.getvalue().splitlines():
        obj = json.loads(line)  # each line is one complete JSON object
        assert isinstance(obj, dict)
        out.append(obj)
    return out


def test_each_record_is_one_json_line_with_time_level_event_and_fields(root_logging):
    stream = io.StringIO()
    logs.setup("INFO", stream)
    log = logging.getLogger("ingest.test")
    log.info("flush_failed", extra={"rows": 12, "error": "boom\nsecond line", "when": object})
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("unhandled_error", extra={"route": "/x"})
    first, second = lines(stream)
    assert set(first) == {"time", "level", "event", "logger", "rows", "error", "when"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])
    assert first["level"] == "info" and first["event"] == "flush_failed"
    assert first["logger"] == "ingest.test"
    assert first["rows"] == 12 and first["error"] == "boom\nsecond line"
    assert first["when"] == repr(object)  # what JSON cannot hold is logged as its repr
    assert second["level"] == "error" and second["route"] == "/x"
    assert "ValueError: bad\nthing" in second["exception"]
    assert len(stream.getvalue().splitlines()) == 2  # newlines inside values stay escaped


def test_fields_never_overwrite_time_level_or_event(root_logging):
    stream = io.StringIO()
    logs.setup("DEBUG", stream)
    logging.getLogger("ingest.test").warning("real_event", extra={"event": "x", "level": "y"})
    (line,) = lines(stream)
    assert line["event"] == "real_event" and line["level"] == "warning"


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("DEBUG", ["debug", "info", "warning", "error"]),
        ("INFO", ["info", "warning", "error"]),
        ("WARNING", ["warning", "error"]),
        ("ERROR", ["error"]),
    ],
)
def test_log_level_is_respected(root_logging, level, expected):
    stream = io.StringIO()
    logs.setup(level, stream)
    log = logging.getLogger("ingest.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("aiohttp.access").info("GET / 200")  # never: one line per request
    assert [line["level"] for line in lines(stream)] == expected


def test_request_id_is_bound_while_a_request_is_handled(root_logging):
    stream = io.StringIO()
    logs.setup("INFO", stream)
    log = logging.getLogger("ingest.test")
    log.info("outside")
    with logs.request_context("req-42") as rid:
        assert rid == "req-42"
        log.info("inside")
        with logs.request_context(None) as generated:
            log.info("nested")
        log.info("inside_again")
    with logs.request_context('bad id "with" spaces\n') as replaced:
        log.info("replaced")
    log.info("after")
    out = {line["event"]: line.get("request_id") for line in lines(stream)}
    assert out["outside"] is None and out["after"] is None
    assert out["inside"] == out["inside_again"] == "req-42"
    assert out["nested"] == generated and re.fullmatch(GENERATED, generated)
    assert out["replaced"] == replaced and re.fullmatch(GENERATED, replaced)
    assert replaced != generated


async def test_log_lines_of_a_request_carry_its_id(make_client, monkeypatch, root_logging):
    async def logging_handler(request):
        logging.getLogger("ingest.test").warning("inside_handler")
        return await real(request)

    real = ops.openapi
    monkeypatch.setattr(ops, "openapi", logging_handler)  # before create_app binds the route
    stream = io.StringIO()
    logs.setup("INFO", stream)
    client = await make_client()
    given = await client.get("/openapi.json", headers={"X-Request-Id": "abc-123"})
    fresh = await client.get("/openapi.json")
    assert given.status == 200 and fresh.status == 200
    assert given.headers["X-Request-Id"] == "abc-123"
    generated = fresh.headers["X-Request-Id"]
    assert re.fullmatch(GENERATED, generated)
    ids = [line.get("request_id") for line in lines(stream) if line["event"] == "inside_handler"]
    assert ids == ["abc-123", generated]


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
async def test_the_service_logs_json_lines_on_stdout_at_its_level(
    database, redis_prefix, level, tmp_path
):
    service = procs.service({
        "DATABASE_URL": database, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
        "JWT_SECRET": SECRET, "LOG_LEVEL": level.lower(), "RATE_LIMIT_PER_S": "1000",
    }, tmp_path)  # fmt: skip
    await service.start()
    try:
        import aiohttp

        async with aiohttp.ClientSession(service.url) as s:
            for i in range(10):
                async with s.post(PING, json=batch(5, trip=f"l_{i}"), headers=auth()) as r:
                    assert r.status == 200
        code = await service.stop()
    finally:
        await service.stop()
    # stdout and stderr together: every line is JSON (the harness marks each start)
    out = [line for line in service.log_text().splitlines() if not line.startswith("--- start")]
    assert code == 0, out[-5:]
    records = [json.loads(line) for line in out]
    assert all({"time", "level", "event", "logger"} <= set(r) for r in records)
    events = [r["event"] for r in records]
    if level == "INFO":
        assert {"listening", "shutting_down", "drained", "stopped"} <= set(events)
        assert len(records) < 12  # no line per request or per ping
    else:
        assert all(r["level"] in ("warning", "error") for r in records), records
        assert "listening" not in events
