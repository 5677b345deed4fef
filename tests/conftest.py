"""Fixtures: a real PostgreSQL database and a Redis key prefix per test, the production app.

Every test gets its own database, cloned from a migrated template, and its own Redis
prefix (keys and channels), so tests can run in parallel (pytest -n).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from devtools import procs
from devtools import services as devservices
from devtools.services import PrivatePostgres, PrivateRedis, postgres_bindir
from ingest import maintenance
from ingest.app import create_app
from ingest.auth import issue_token
from ingest.migrate import migrate
from ingest.settings import Settings, load_settings
from ingest.shutdown import shutdown
from ingest.typedefs import LIFECYCLE, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
# TEST_DATABASE_URL / TEST_REDIS_URL when set; else servers listening on the default local
# ports; else throwaway ones started for this session (see ingest/devservices.py).
PG_URL, REDIS_URL = devservices.for_tests()
SECRET = "test-secret-0123456789abcdef0123456789"


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


def token(role: str = "driver", sub: str = "drv_1", org: str = "org_1", **kw: Any) -> str:
    s = load_settings({}, jwt_secret=SECRET)
    return issue_token(s, sub, role, org, **kw)  # type: ignore[arg-type]


def auth(role: str = "driver", sub: str = "drv_1", org: str = "org_1") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sub, org)}"}


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
