"""Group commit (ingest/buffer.py) through the service, on real PostgreSQL: a flush starts at
once when none is in flight; rows arriving during one gather for the next; with
FLUSH_CONCURRENCY 2, FLUSH_INTERVAL_MS and FLUSH_MAX_ROWS start a second flush beside a flush
held up. Flushes are held up for real, by locks taken in PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from ingest.buffer import Buffer
from ingest.typedefs import BUFFER, FLUSHER

from .conftest import batch, buffered, now_ms, post_ping, state_reached

Factory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def locker(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    yield conn
    await conn.close()


async def flights(buffer: Buffer, n: int) -> None:
    """Until ``n`` flushes are in flight."""
    await state_reached(lambda: len(buffer.flights) >= n)


async def commits(db: asyncpg.Connection) -> dict[str, set[str]]:
    """The transactions that stored each trip's rows."""
    got: dict[str, set[str]] = {}
    for r in await db.fetch('SELECT "tripId", xmin::text AS x FROM "TripLocation"'):
        got.setdefault(r["tripId"], set()).add(r["x"])
    return got


async def test_a_lone_ping_on_an_idle_service_is_committed_without_waiting_the_interval(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    client = await make_client(flush_interval_ms=60_000, ack_timeout_ms=120_000)
    async with asyncio.timeout(10):  # a sixth of the interval: it was not waited out
        status, answer = await post_ping(client, batch(1))
    assert (status, answer["accepted"]) == (200, 1)
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 1


async def test_rows_arriving_during_a_flush_are_committed_together_in_the_next(
    make_client: Factory, db: asyncpg.Connection, locker: asyncpg.Connection
) -> None:
    client = await make_client(flush_interval_ms=1)  # the interval is no reason to start one
    buffer = client.server.app[BUFFER]
    await locker.execute('BEGIN; LOCK TABLE "IngestFlush" IN ACCESS EXCLUSIVE MODE')
    first = asyncio.ensure_future(post_ping(client, batch(2, trip="t_first")))
    await flights(buffer, 1)  # its flush waits for the lock
    later: list[asyncio.Future[tuple[int, Any]]] = []
    for i in range(3):
        later.append(asyncio.ensure_future(post_ping(client, batch(3, trip=f"t_later_{i}"))))
        await buffered(buffer, i + 1)
    await asyncio.sleep(0.05)  # 50 intervals
    assert len(buffer.flights) == 1 and not any(f.done() for f in [first, *later])
    await locker.execute("ROLLBACK")
    answers = await asyncio.gather(first, *later)
    assert [(s, a["accepted"]) for s, a in answers] == [(200, 2)] + [(200, 3)] * 3
    tx = await commits(db)
    assert len(tx["t_first"]) == 1
    later_tx = set().union(*(tx[f"t_later_{i}"] for i in range(3)))
    assert len(later_tx) == 1 and later_tx != tx["t_first"]  # one flush, the next one


async def hold_trip(client: TestClient, locker: asyncpg.Connection, trip: str) -> None:
    """Store ``trip``, then lock its owner row: the trip's next flush waits for the lock."""
    assert (await post_ping(client, batch(1, trip=trip)))[0] == 200
    await locker.execute("BEGIN")
    await locker.execute('SELECT 1 FROM "IngestTrip" WHERE "tripId" = $1 FOR UPDATE', trip)


@pytest.mark.parametrize("trigger", ["interval", "max_rows"])
async def test_a_second_flush_starts_beside_one_held_up(
    make_client: Factory, db: asyncpg.Connection, locker: asyncpg.Connection, trigger: str
) -> None:
    interval = {"interval": 200, "max_rows": 60_000}[trigger]
    client = await make_client(
        flush_concurrency=2, flush_interval_ms=interval, flush_max_rows=10,
        ack_timeout_ms=120_000,
    )  # fmt: skip
    buffer = client.server.app[BUFFER]
    await hold_trip(client, locker, "t_held")
    held = asyncio.ensure_future(post_ping(client, batch(1, trip="t_held", start_ms=now_ms(-300))))
    await flights(buffer, 1)
    n = {"interval": 1, "max_rows": 10}[trigger]
    async with asyncio.timeout(10):  # the held flush waits for as long as the lock is held
        status, answer = await post_ping(client, batch(n, trip="t_free"))
    assert (status, answer["accepted"]) == (200, n)
    assert not held.done()
    await locker.execute("ROLLBACK")
    assert (await held)[0] == 200
    tx = await commits(db)
    assert len(tx["t_held"]) == 2 and tx["t_free"].isdisjoint(tx["t_held"])


async def test_with_one_flush_in_flight_at_most_a_held_flush_holds_the_next(
    make_client: Factory, locker: asyncpg.Connection
) -> None:
    client = await make_client(flush_interval_ms=1, flush_max_rows=10)
    buffer = client.server.app[BUFFER]
    await hold_trip(client, locker, "t_held")
    held = asyncio.ensure_future(post_ping(client, batch(1, trip="t_held", start_ms=now_ms(-300))))
    await flights(buffer, 1)
    free = asyncio.ensure_future(post_ping(client, batch(10, trip="t_free")))
    await buffered(buffer, 1)
    await asyncio.sleep(0.1)
    assert not free.done() and len(buffer.flights) == 1
    await locker.execute("ROLLBACK")
    assert [(await f)[0] for f in (held, free)] == [200, 200]


async def test_one_held_flush_among_two_does_not_make_the_pod_shed(
    make_client: Factory, locker: asyncpg.Connection
) -> None:
    """FLUSH_CONCURRENCY 2, one flush held up past BUFFER_MAX_WAIT_MS (500 ms) by a locked
    row: the other slot keeps committing, so new batches are still taken (no 503)."""
    client = await make_client(flush_concurrency=2, flush_interval_ms=50, ack_timeout_ms=120_000)
    buffer = client.server.app[BUFFER]
    await hold_trip(client, locker, "t_held")
    held = asyncio.ensure_future(post_ping(client, batch(1, trip="t_held", start_ms=now_ms(-300))))
    await flights(buffer, 1)
    assert (await post_ping(client, batch(1, trip="t_free_1")))[0] == 200
    await asyncio.sleep(0.6)
    status, answer = await post_ping(client, batch(1, trip="t_free_2"))
    assert status == 200, answer
    assert not held.done()
    await locker.execute("ROLLBACK")
    assert (await held)[0] == 200


async def test_the_pod_stays_unready_while_one_of_two_flushes_retries(
    make_client: Factory, locker: asyncpg.Connection
) -> None:
    """FLUSH_CONCURRENCY 2, one flush failing again and again (its lock wait outlasts
    FLUSH_TIMEOUT_S): the other slot's commits must not report the flusher healthy (readyz
    flapped between ready and not on every flush of the other slot)."""
    client = await make_client(
        flush_concurrency=2, flush_interval_ms=50, flush_timeout_s=0.3, ack_timeout_ms=120_000
    )
    flusher = client.server.app[FLUSHER]
    await hold_trip(client, locker, "t_held")
    held = asyncio.ensure_future(post_ping(client, batch(1, trip="t_held", start_ms=now_ms(-300))))
    await state_reached(lambda: not flusher.db_ok)
    for i in range(3):
        assert (await post_ping(client, batch(1, trip=f"t_free_{i}")))[0] == 200
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["checks"]["flusher"] is False
    await locker.execute("ROLLBACK")
    assert (await held)[0] == 200
    await state_reached(lambda: flusher.db_ok)
    assert (await client.get("/readyz")).status == 200
