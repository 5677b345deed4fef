"""A connection cut at the worst moments of a flush, for real (a TCP proxy in front of
PostgreSQL): after COMMIT was sent but before its answer came back, and while the flusher
creates a missing partition. Nothing acknowledged is lost, nothing is stored twice, and what
the client is told matches what was stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from ingest import partitions

from ..conftest import auth, batch, now_ms
from .proxy import BlackholeProxy

PING = "/api/v1/tracking/ping"


@pytest.fixture
async def proxy(database: str) -> AsyncIterator[BlackholeProxy]:
    u = urlsplit(database)
    p = BlackholeProxy(u.hostname or "127.0.0.1", u.port or 5432)
    await p.start()
    yield p
    await p.close()


def via(proxy: BlackholeProxy, database: str) -> str:
    u = urlsplit(database)
    return urlunsplit(u._replace(netloc=f"{u.username}@127.0.0.1:{proxy.port}"))


async def test_a_lost_commit_reply_is_resolved_by_what_was_stored(
    make_client, proxy, database, db, redis, redis_prefix
):
    client = await make_client(database_url=via(proxy, database))
    warm = await client.post(PING, json=batch(2, start_ms=now_ms(-900)), headers=auth())
    assert warm.status == 200  # connections open, trip claimed

    cut = proxy.cut_after(b"COMMIT")
    body = batch(5, start_ms=now_ms(-600))
    r = await client.post(PING, json=body, headers=auth())
    assert cut.done()
    assert r.status == 200, await r.text()
    ack = await r.json()
    # The flush committed: its pings are new, not duplicates of themselves.
    assert (ack["accepted"], ack["duplicates"]) == (5, 0)
    rows = await db.fetchval(
        'SELECT count(*) FROM "TripLocation" WHERE "batchId" = $1', body["batchId"]
    )
    assert rows == 5
    # ... and it was published: latest is the newest ping of that batch.
    newest = body["locations"][-1]["timestamp"]
    for _ in range(50):
        latest = await redis.hget(f"{redis_prefix}latest:org_1:trip_1", "v")
        if latest and newest[:19] in latest.decode():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"latest not moved to {newest}: {latest!r}")
    # A resend of the same batch is a replay.
    again = await (await client.post(PING, json=body, headers=auth())).json()
    assert (again["accepted"], again["duplicates"]) == (0, 5)


async def test_a_commit_cut_before_commit_is_retried(make_client, proxy, database, db):
    """Cut while the rows are on their way (COPY): the transaction is aborted, the flush is
    retried, and the pings are stored once and reported new."""
    client = await make_client(database_url=via(proxy, database))
    assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    cut = proxy.cut_after(b"COPY")  # the rows, before COMMIT
    body = batch(4, start_ms=now_ms(-500))
    r = await client.post(PING, json=body, headers=auth())
    assert cut.done()
    ack = await r.json()
    assert (r.status, ack["accepted"], ack["duplicates"]) == (200, 4, 0)
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 5


async def test_partition_creation_failing_is_retried_and_buffered_pings_kept(
    make_client, proxy, database, db
):
    """ACK_MODE=buffered answers 202 before the flush: a flush whose partition is missing,
    and whose partition creation then loses its connection, must still store the pings."""
    client = await make_client(database_url=via(proxy, database), ack_mode="buffered")
    assert (await client.get("/readyz")).status == 200  # maintenance ran at start
    month = partitions.month_start(partitions.datetime.now(partitions.UTC))
    name = partitions.partition_name(month)
    await db.execute(f'DROP TABLE "{name}"')
    cut = proxy.cut_after(b"CREATE TABLE")
    body = batch(3, start_ms=now_ms(-60))
    r = await client.post(PING, json=body, headers=auth())
    assert r.status == 202
    await asyncio.wait_for(cut, 10)
    for _ in range(100):
        n = await db.fetchval(
            'SELECT count(*) FROM "TripLocation" WHERE "batchId" = $1', body["batchId"]
        )
        if n == 3:
            break
        await asyncio.sleep(0.1)
    assert n == 3
