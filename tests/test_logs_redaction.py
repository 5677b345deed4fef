"""No credential in any log line: tokens, Authorization and Cookie values, DSN passwords are
masked by the JSON formatter, whoever logs them (the HTTP server's log of a malformed
request, tracebacks, our own fields)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import procs
from ingest import logs

from .conftest import REDIS_URL, ROOT, SECRET, run_cli, token

JWT = token("driver", "drv_secret", "org_secret")
HEADER, PAYLOAD, SIGNATURE = JWT.split(".")
BASIC = base64.b64encode(b"drv_7:Hunter2-basic-pw").decode()


def jwt_leaked(text: str) -> bool:
    """Any recognisable piece of the token's claims or signature."""
    return PAYLOAD[:12] in text or SIGNATURE[:12] in text


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The service's log setup on a buffer; pytest's own handlers put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.setup("DEBUG", stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("text", "secrets", "kept"),
    [
        # aiohttp's own errors for malformed requests (bytes reprs, \r\n escaped)
        (f"b'GET /x?access_token={JWT}&x=1 HTTP/1.1\\x00'", [PAYLOAD, SIGNATURE],
         "access_token=[REDACTED]&x=1 HTTP/1.1"),
        ("b'G@T /live?token=tok-q-123 HTTP/1.1'", ["tok-q-123"], "token=[REDACTED] HTTP"),
        (f"b'Authorization: Bearer {JWT}\\x01'", [PAYLOAD], "Authorization: [REDACTED]\\x01"),
        (f"b'Host: x\\r\\nAuthorization: Basic {BASIC}\\r\\nCookie: sid=c00kie; a=b\\r\\n'",
         [BASIC, "c00kie"], "Host: x\\r\\nAuthorization: [REDACTED]\\r\\nCookie: [REDACTED]\\r\\n"),
        (f"Got more than 8190 bytes when reading: b'Bearer {JWT[:90]}...'", [PAYLOAD[:20]],
         "reading: b'Bearer [REDACTED]'"),
        ("bytearray(b'/x?password=pw-in-url-1aaaa...')", ["pw-in-url"], "password=[REDACTED]'"),
        ("Proxy-Authorization: Basic cHJveHk6cHc=", ["cHJveHk6cHc"], "Proxy-Authorization: [R"),
        # keys in reprs and JSON, any case
        ("{'Authorization': 'Bearer abc.def', 'X': 1}", ["abc.def"], "'Authorization': '[RED"),
        ('{"client_secret": "cs-1", "jwt": "j-1", "apiKey": "k-1"}', ["cs-1", "j-1", "k-1"],
         '"client_secret": "[REDACTED]"'),
        ("refresh_token=rt-1; Path=/; session=s-1", ["rt-1", "s-1"], "refresh_token=[REDACTED];"),
        # a JWT wherever it is
        (f"bad token {JWT} (expired)", [PAYLOAD, SIGNATURE], "bad token [REDACTED] (expired)"),
        # passwords in connection strings, as asyncpg, redis-py and libpq show them
        ("postgresql://ingest:pg-pw-1@db1:5432,db2:5432/ingest?target_session_attrs=read-write",
         ["pg-pw-1"], "postgresql://ingest:[REDACTED]@db1:5432,db2:5432/ingest?target"),
        ("redis://:redis-pw-1@cache:6379/0 and rediss://u:p%40ss@c:6380", ["redis-pw-1", "p%40ss"],
         "redis://:[REDACTED]@cache:6379/0"),
        ("host=db user=ingest password='pg pw' dbname=x", ["pg pw"], "password='[REDACTED]'"),
    ],
)  # fmt: skip
def test_redact_masks_credentials_and_keeps_the_rest(text, secrets, kept):
    out = logs.redact(text)
    for secret in secrets:
        assert secret not in out, out
    assert kept in out, out


@pytest.mark.parametrize(
    "text",
    [
        '{"event":"listening","port":8080,"role":"all","ack_mode":"durable"}',
        "AUTH_DISABLED=true: every request is accepted without a token. Development only!",
        "redis://127.0.0.1:6379/0 postgresql://postgres@127.0.0.1:5432/postgres",
        "ConnectionRefusedError(111, 'Connect call failed ('127.0.0.1', 5432)')",
        "missing Authorization header; token expired; basic_auth",
    ],
)
def test_redact_leaves_lines_without_credentials_alone(text):
    assert logs.redact(text) == text


def test_every_line_is_redacted_whoever_logs_it_and_stays_json(captured):
    dsn = "postgresql://ingest:pg-pw-2@db:5432/ingest"
    logging.getLogger("aiohttp.server").error(
        "Error handling request from %s", f"{JWT} via {dsn}"
    )  # fmt: skip
    logging.getLogger("ingest.test").warning(
        "odd_request",
        extra={"headers": {"Authorization": f"Bearer {JWT}", "Cookie": "sid=ck-2"},
               "url": f"/live?access_token={JWT}", "argv": [f"b'Basic {BASIC}\\r\\n'"],
               "dsn": dsn},
    )  # fmt: skip
    try:
        raise ConnectionError(f"cannot connect to {dsn} with {JWT!r}")
    except ConnectionError:
        logging.getLogger("asyncpg.pool").exception("pool_failed")
    out = captured.getvalue()
    lines = [json.loads(line) for line in out.splitlines()]  # every line is still JSON
    assert [line["event"] for line in lines] == [
        "Error handling request from [REDACTED] via postgresql://ingest:[REDACTED]@db:5432/ingest",
        "odd_request", "pool_failed",
    ]  # fmt: skip
    assert lines[1]["headers"] == {"Authorization": "[REDACTED]", "Cookie": "[REDACTED]"}
    assert "ConnectionError: cannot connect to" in lines[2]["exception"]
    for secret in ("pg-pw-2", "ck-2", BASIC):
        assert secret not in out
    assert not jwt_leaked(out)


def test_a_record_that_cannot_be_formatted_still_shows_no_credential(captured, capsys):
    """A bad %-format: logging's default would print the raw arguments to stderr."""
    record = logging.makeLogRecord(
        {"name": "redis", "levelno": 40, "msg": "%s %s", "args": (f"Cookie: sid=ck-3 {JWT}",)}
    )
    (handler,) = [  # the service's, not pytest's
        h for h in logging.getLogger().handlers if isinstance(h.formatter, logs.JsonFormatter)
    ]
    handler.handle(record)
    out = captured.getvalue()
    assert json.loads(out)["event"] == "log_format_failed"
    assert "ck-3" not in out + "".join(capsys.readouterr())


CRASHES = """
import threading, warnings
from ingest import logs
logs.setup("INFO")
logs.capture_stderr()

class Leaky:
    def __del__(self):
        raise ValueError("redis://:del-pw@cache:6379/0")

Leaky()

def boom():
    raise RuntimeError("Authorization: Bearer thread-tok")

thread = threading.Thread(target=boom, name="worker")
thread.start()
thread.join()
warnings.warn("retrying with password=warn-pw")
raise RuntimeError("cannot reach postgresql://u:crash-pw@db/x")
"""


def test_what_python_prints_by_itself_goes_through_the_redacting_log() -> None:
    """An exception in __del__, in a thread, a warning, the service crashing: Python would
    print each to stderr itself; once ``serve`` has set up logging they are log lines."""
    done = subprocess.run(
        [sys.executable, "-c", CRASHES], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    for secret in ("del-pw", "thread-tok", "warn-pw", "crash-pw"):
        assert secret not in done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["level"], line["event"].split(":")[0]) for line in lines] == [
        ("error", "unraisable_exception"),
        ("error", "uncaught_exception"),
        ("warning", "<string>"),  # warnings' own text: "<file>:<line>: UserWarning: ..."
        ("critical", "uncaught_exception"),
    ]
    assert lines[1]["thread_name"] == "worker"
    assert "password=[REDACTED]" in lines[2]["event"]
    assert "RuntimeError: cannot reach postgresql://u:[REDACTED]@db/x" in lines[3]["exception"]


# -- the real server, as a process, and malformed requests on raw sockets -------------------

# Each carries its credential in the part aiohttp quotes in its error log.
MALFORMED = [
    # bad request line (a NUL after the version), token in the query
    f"GET /api/v1/live?access_token={JWT} HTTP/1.1\x00\r\nHost: x\r\n\r\n",
    # invalid method (logged at DEBUG)
    "G@T /api/v1/live?token=query-tok-3 HTTP/1.1\r\nHost: x\r\n\r\n",
    # invalid HTTP version
    "GET /api/v1/live?password=query-pw-3 HTTP/9.9\r\nHost: x\r\n\r\n",
    # bad header values: Bearer, Basic, Cookie
    f"GET /readyz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {JWT}\x01\r\n\r\n",
    f"GET /readyz HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {BASIC}\x01\r\n\r\n",
    "GET /readyz HTTP/1.1\r\nHost: x\r\nCookie: session=cookie-3\x01\r\n\r\n",
    # bad header name, after the credentials
    f"GET /readyz HTTP/1.1\r\nAuthorization: Bearer {JWT}\r\nBad Header: 1\r\n\r\n",
    # huge header value, huge request target
    f"GET /readyz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {JWT}{'x' * 9000}\r\n\r\n",
    f"GET /api/v1/live?jwt={JWT}&pad={'p' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
]


async def send_raw(port: int, request: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1"))
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


async def test_malformed_requests_are_logged_without_their_credentials(
    database: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": database, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
        "JWT_SECRET": SECRET, "LOG_LEVEL": "DEBUG",
    }  # fmt: skip
    service = procs.service(env, tmp_path)
    await service.start()
    try:
        for request in MALFORMED:
            answer = await send_raw(service.port, request)
            assert answer.startswith(b"HTTP/1.0 400 Bad Request"), (request[:60], answer[:100])
        await asyncio.sleep(0.3)
    finally:
        await service.stop()
    text = service.log_text()
    errors = service.events("Error handling request from 127.0.0.1")
    assert len(errors) == len(MALFORMED), service.log_tail()
    quoted = " ".join(str(e["exception"]) for e in errors)
    for kind in ("BadStatusLine", "BadHttpMethod", "LineTooLong", "Invalid header value char"):
        assert kind in quoted  # the event and what was wrong are still there
    assert quoted.count("[REDACTED]") >= len(MALFORMED) - 1  # the bad-name one shows no value
    assert not jwt_leaked(text)
    for secret in (BASIC, "query-tok-3", "query-pw-3", "cookie-3"):
        assert secret not in text


@pytest.mark.parametrize(
    ("name", "url", "pieces"),
    [
        ("DATABASE_URL", "postgresql://app:Xy7/Qp9#Zk2@db/ingest", ("Xy7", "Qp9", "Zk2")),
        ("DATABASE_URL", "postgresql://app:a?etPW@db:5432/ingest", ("etPW",)),
        ("DATABASE_URL", "postgresql://app:1234/abc@db/ingest", ("1234", "abc")),
        ("DATABASE_READ_URL", "postgres://app:Rp1#x@replica/ingest", ("Rp1",)),
        ("REDIS_URL", "redis://:Rd5/Tq8@redis:6379/0", ("Rd5", "Tq8")),
    ],
)
def test_a_url_whose_password_would_be_misread_is_refused_at_start_without_it(
    name: str, url: str, pieces: tuple[str, ...]
) -> None:
    """An unescaped '/', '?', '#' or '@' in a password ends the host early: every connection
    would fail with the client's parse error, which quotes the piece it took for a port or a
    query, in every log line. Refused when the pod starts, by name, quoting none of it."""
    result = run_cli("migrate", **{name: url})
    assert result.returncode != 0
    assert f"invalid setting {name}: cannot be split into user, password, host" in result.stderr
    for piece in pieces:
        assert piece not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:p%2Fw%3Fx%23y%40z@db:5432/ingest",  # the same characters, escaped
        "postgresql://app:pw@h1:5432,h2:5433/ingest?target_session_attrs=read-write",
        "postgresql:///ingest?host=/var/run/postgresql",
        "postgresql://app:pw@[::1]:5432/ingest",
        "postgresql://app:pw@db/ingest?sslrootcert=/etc/ssl/a@b.pem&user=a@corp",
    ],
)
def test_urls_that_split_cleanly_are_accepted(url: str) -> None:
    from ingest.settings import load_settings

    assert load_settings({"JWT_SECRET": SECRET, "DATABASE_URL": url}).database_url == url
