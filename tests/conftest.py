"""Fixtures: a real PostgreSQL database and a Redis key prefix per test, the production app.

Every test gets its own database, cloned from a migrated template, and its own Redis
prefix (keys and channels), so tests can run in parallel (pytest -n).

Async tests run on uvloop, the loop `python -m ingest serve` runs; INGEST_TEST_LOOP=asyncio
runs them on the standard loop instead. PYTHONASYNCIODEBUG=1 puts the test loops (and the
services the tests start) in asyncio debug mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
import uvloop
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devtools import procs
from devtools import services as devservices
from devtools.services import PrivatePostgres, PrivateRedis, postgres_bindir
from ingest import maintenance
from ingest.app import create_app
from ingest.auth import issue_token
from ingest.buffer import Buffer
from ingest.migrate import migrate
from ingest.settings import Settings, load_settings
from ingest.shutdown import shutdown
from ingest.typedefs import BUFFER, LIFECYCLE, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
# TEST_DATABASE_URL / TEST_REDIS_URL when set; else servers listening on the default local
# ports; else throwaway ones started for this session (see devtools/services.py).
PG_URL, REDIS_URL = devservices.for_tests()
SECRET = "test-secret-0123456789abcdef0123456789"
PING = "/api/v1/tracking/ping"
LIVE = "/api/v1/live"

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
TEST_LOOP = os.environ.get("INGEST_TEST_LOOP", "uvloop")


def pytest_configure(config: pytest.Config) -> None:
    if TEST_LOOP not in LOOPS:
        raise pytest.UsageError(f"INGEST_TEST_LOOP must be one of {', '.join(LOOPS)}")
    # pytest-asyncio passes debug=False to every loop it makes unless asked, which would
    # override the variable: debug mode is asked for here when the variable asks for it.
    if os.environ.get("PYTHONASYNCIODEBUG") and not sys.flags.ignore_environment:
        config.option.asyncio_debug = True


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """One loop factory, so test ids stay as they are (pytest-asyncio >= 1.4)."""
    return {TEST_LOOP: LOOPS[TEST_LOOP]}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m ingest ARGS`` with the test JWT secret and ``env`` on top of ours."""
    return procs.run_cli(*args, env={"JWT_SECRET": SECRET, **env})


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def db_url(name: str) -> str:
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(PG_URL)


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """A migrated database to clone, one per test process (pytest -n workers, concurrent runs)."""
    name = f"ingest_tmpl_{_worker()}_{os.getpid()}"

    async def build() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(db_url(name))
        try:
            await migrate(conn)
            await maintenance.run_once(conn, load_settings({}, auth_disabled=True))
        finally:
            await conn.close()

    asyncio.run(build())
    yield name

    async def drop() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(drop())


@pytest.fixture
async def database(template_db: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database of this test's own."""
    name = f"ingest_t_{uuid.uuid4().hex[:12]}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield db_url(name)
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    yield conn
    await conn.close()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    yield prefix
    r = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(REDIS_URL)
    yield r
    await r.aclose()


@pytest.fixture
def make_settings(database: str, redis_prefix: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "database_url": database,
            "redis_url": REDIS_URL,
            "redis_prefix": redis_prefix,
            "jwt_secret": SECRET,
            "flush_interval_ms": 20,
            "rate_limit_per_s": 1000,
            "rate_limit_burst": 1000,
            # Geofence events at once; the tests of the settle time set their own.
            "geofence_settle_ms": 0,
        }
        base.update(overrides)
        return load_settings({}, **base)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[ClientFactory]:
    """Start the production app (create_app) on a real socket; after the test, stopped as the
    service stops at SIGTERM (ingest.shutdown), unless the test did that itself."""
    clients: list[TestClient] = []

    async def make(settings: Settings | None = None, **overrides: Any) -> TestClient:
        s = settings or make_settings(**overrides)
        client = TestClient(TestServer(create_app(s)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in reversed(clients):
        app = c.server.app
        if c.server.runner is not None and not app[LIFECYCLE].draining:
            await shutdown(app, c.server.runner, app[SETTINGS].shutdown_timeout_s)
        await c.close()


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient:
    return await make_client()


@contextlib.asynccontextmanager
async def flush_held(client: TestClient) -> AsyncIterator[Buffer]:
    """While inside, the app's one flush slot (FLUSH_CONCURRENCY 1) is taken, as by a flush
    in flight: requests posted meanwhile wait in its buffer, and are committed together, in
    one flush, at the end. (A flush starts at once when none is in flight: without this,
    concurrent requests may or may not share one.)"""
    buffer: Buffer = client.server.app[BUFFER]
    assert buffer.max_flights == 1 and not buffer.rows and not buffer.flights
    held = buffer.take()
    try:
        yield buffer
    finally:
        buffer.done(held)


async def state_reached(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (a state, not a duration: the timeout only bounds a hang)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "state not reached"
        await asyncio.sleep(0.005)


async def buffered(buffer: Buffer, requests: int) -> None:
    """Until ``requests`` requests wait in ``buffer``."""
    await state_reached(lambda: len(buffer.pending) >= requests)


async def in_one_flush(client: TestClient, *posts: Awaitable[Any]) -> list[Any]:
    """The answers of ``posts`` (requests to ``client``), buffered in this order and committed
    in one flush."""
    async with flush_held(client) as buffer:
        tasks = []
        for i, post in enumerate(posts):
            tasks.append(asyncio.ensure_future(post))
            await buffered(buffer, i + 1)
    return list(await asyncio.gather(*tasks))


async def against_another_pod(
    client: TestClient, db: asyncpg.Connection, database: str,
    first: Callable[[], Awaitable[object]], then: Callable[[], Awaitable[object]] | None,
    *posts: Awaitable[Any],
) -> list[Any]:  # fmt: skip
    """Another pod, ``db`` in a transaction, runs ``first``; ``posts`` are committed in one
    flush, which waits on a lock it holds; the other pod then runs ``then`` and commits. The
    answers of ``posts``."""
    watch = await asyncpg.connect(database)
    try:
        other_pod = db.transaction()
        await other_pod.start()
        await first()
        flush = asyncio.ensure_future(in_one_flush(client, *posts))
        await _blocked_on_a_lock(watch, db.get_server_pid())
        if then is not None:
            await then()
        await other_pod.commit()
        return await asyncio.wait_for(flush, 10)
    finally:
        await watch.close()


async def _blocked_on_a_lock(watch: asyncpg.Connection, other_than: int) -> None:
    """Until a backend of this database, not ``other_than``, waits on a lock."""
    for _ in range(500):
        waiting = await watch.fetchval(
            """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND pid <> $1 AND wait_event_type = 'Lock'""",
            other_than,
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no backend ever waited on a lock")


def token(role: str = "driver", sub: str = "drv_1", org: str = "org_1", **kw: Any) -> str:
    s = load_settings({}, jwt_secret=SECRET)
    return issue_token(s, sub, role, org, **kw)  # type: ignore[arg-type]


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def auth(role: str = "driver", sub: str = "drv_1", org: str = "org_1") -> dict[str, str]:
    return bearer(token(role, sub, org))


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it: done before the fixtures it uses are closed. Cancelled
    again until it ends, since redis-py can swallow a cancellation that lands inside a command
    (a loop around one would then run forever)."""
    for _ in range(100):
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
        if task.done():
            break
    assert task.done(), f"{task.get_name()} does not end when cancelled"
    if not task.cancelled():
        task.exception()  # retrieved: how a helper task ended is not what the test checks


def now_ms(offset_s: float = 0) -> int:
    return int((time.time() + offset_s) * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def batch(
    n: int = 3, trip: str = "trip_1", driver: str = "drv_1", start_ms: int | None = None,
    batch_id: str | None = None, step_ms: int = 1000,
) -> dict[str, Any]:  # fmt: skip
    start = start_ms if start_ms is not None else now_ms(-600)
    body: dict[str, Any] = {
        "tripId": trip,
        "driverId": driver,
        "locations": [
            {"latitude": 12.9 + i * 1e-4, "longitude": 77.5 + i * 1e-4,
             "timestamp": iso(start + i * step_ms), "accuracy": 4.5, "speed": 11.2}
            for i in range(n)
        ],
    }  # fmt: skip
    body["batchId"] = batch_id if batch_id is not None else str(uuid.uuid4())
    return body


@pytest.fixture(autouse=True)
async def fail_on_loop_errors() -> AsyncIterator[None]:
    """Any exception the event loop reports unhandled fails the test (as asyncpg's suite does)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    if loop.get_debug():
        gc.collect()  # so a leaked transport or connection fails the test that leaked it
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not errors, [e.get("message") for e in errors]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, migrated with ``python -m ingest migrate``."""
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed")
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        result = run_cli("migrate", DATABASE_URL=pg.url)
        assert result.returncode == 0, result.stderr
        assert "created partition TripLocation_" in result.stdout, result.stdout
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    try:
        r = PrivateRedis()
    except FileNotFoundError:
        pytest.skip("redis-server not installed")
    r.start()
    try:
        yield r
    finally:
        r.stop()


# -- signing keys ------------------------------------------------------------------------


def pem_private(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def pem_public(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# -- the ingest endpoint, as the public ingest path is deployed -----------------------------


@pytest.fixture
async def ingest_client(make_client: ClientFactory) -> TestClient:
    """The app on an ingest-only instance (ROLE=ingest)."""
    return await make_client(role="ingest")


async def post_ping(
    client: TestClient, body: dict[str, Any] | bytes, **headers: str
) -> tuple[int, Any]:
    """Status and JSON answer of a POST of ``body`` (encoded as JSON unless bytes) with a
    driver token; ``headers`` add to or replace the defaults."""
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    h = {**auth(), "Content-Type": "application/json", **headers}
    resp = await client.post(PING, data=data, headers=h)
    return resp.status, await resp.json()


# -- the WebSocket -------------------------------------------------------------------------


async def ws_connect(
    client: TestClient, tok: str | None = None, **kw: Any
) -> aiohttp.ClientWebSocketResponse:
    url = LIVE if tok is None else f"{LIVE}?access_token={tok}"
    return await client.ws_connect(url, **kw)


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    decoded: dict[str, Any] = json.loads(msg.data)
    return decoded


async def quiet(ws: aiohttp.ClientWebSocketResponse, wait: float = 0.4) -> list[dict[str, Any]]:
    """Every message that arrives within ``wait``."""
    got = []
    while True:
        try:
            got.append(await next_message(ws, wait))
        except TimeoutError:
            return got


async def subscribed(
    ws: aiohttp.ClientWebSocketResponse, settle: float = 0.3, **msg: Any
) -> list[dict[str, Any]]:
    """Subscribe; the answer and whatever follows within ``settle`` (snapshots)."""
    await ws.send_json({"type": "subscribe", **msg})
    first = await next_message(ws)
    assert first["type"] == "subscribed", first
    return [first, *await quiet(ws, settle)] if settle else [first]
