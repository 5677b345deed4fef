"""Backpressure and outages: bounded memory, 503 + Retry-After, nothing acked ever lost."""

from __future__ import annotations

import asyncio

import asyncpg

from ingest.typedefs import BUFFER

from .conftest import PG_URL, auth, batch

PING = "/api/v1/tracking/ping"


async def post_until_acked(client, body, deadline_s: float = 20.0) -> dict:
    """A phone: retry the same batch on 503 until it is acknowledged."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        resp = await client.post(PING, json=body, headers=auth())
        if resp.status == 200:
            return await resp.json()
        assert resp.status == 503, await resp.text()
        assert int(resp.headers["Retry-After"]) >= 1
        assert loop.time() < end, "never acknowledged"
        await asyncio.sleep(0.2)


async def test_stalled_flushes_give_503_with_bounded_buffer(make_client, database, db):
    client = await make_client(buffer_max_rows=50, flush_max_rows=10, ack_timeout_ms=600)
    buffer = client.server.app[BUFFER]
    locker = await asyncpg.connect(database)
    tx = locker.transaction()
    await tx.start()
    await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
    bodies = [batch(10, trip=f"trip_{i}") for i in range(10)]
    resps = await asyncio.gather(*(client.post(PING, json=b, headers=auth()) for b in bodies))
    statuses = [r.status for r in resps]
    details = [(await r.json())["error"] for r in resps]
    # Five batches fit in the buffer and time out waiting for their commit; five are refused.
    assert statuses == [503] * 10
    assert details.count("overloaded") == 5
    assert details.count("storage_unavailable") == 5
    assert all("Retry-After" in r.headers for r in resps)
    assert buffer.depth == 50  # never above BUFFER_MAX_ROWS
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["checks"]["buffer"] is False

    await tx.rollback()  # the lock goes away: the stalled flush commits
    await locker.close()
    acks = [await post_until_acked(client, b) for b in bodies]
    assert sum(a["accepted"] + a["duplicates"] for a in acks) == 100
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 100
    assert buffer.depth == 0
    assert (await client.get("/readyz")).status == 200


async def test_database_outage_loses_nothing_acknowledged(make_client, database):
    client = await make_client(ack_timeout_ms=800, flush_retry_max_ms=300)
    name = database.rsplit("/", 1)[1]
    acked: dict[str, dict] = {}
    first = batch(5, trip="before")
    acked[first["batchId"]] = await post_until_acked(client, first)

    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        during = [batch(5, trip=f"during_{i}") for i in range(4)]
        resps = await asyncio.gather(*(client.post(PING, json=b, headers=auth()) for b in during))
        assert [r.status for r in resps] == [503] * 4
        assert {(await r.json())["error"] for r in resps} == {"storage_unavailable"}
        assert (await client.get("/healthz")).status == 200
        ready = await client.get("/readyz")
        assert ready.status == 503
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()

    for b in during:  # the phones retry the same batches
        acked[b["batchId"]] = await post_until_acked(client, b)
    after = batch(5, trip="after")
    acked[after["batchId"]] = await post_until_acked(client, after)

    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch('SELECT "batchId", count(*) FROM "TripLocation" GROUP BY 1')
        stored = {r[0]: r[1] for r in rows}
        dupes = await conn.fetchval(
            'SELECT count(*) FROM (SELECT 1 FROM "TripLocation" '
            'GROUP BY "tripId", "timestamp" HAVING count(*) > 1) d'
        )
    finally:
        await conn.close()
    assert stored == {bid: 5 for bid in acked}  # every acked ping, exactly once
    assert dupes == 0
    for _ in range(50):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/readyz")).status == 200


async def test_a_stalled_buffer_sheds_new_batches_before_it_fills(make_client, database):
    client = await make_client(buffer_max_rows=10_000, buffer_max_wait_ms=300, ack_timeout_ms=3000)
    locker = await asyncpg.connect(database)
    tx = locker.transaction()
    await tx.start()
    await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
    try:
        waiting = asyncio.ensure_future(client.post(PING, json=batch(5), headers=auth()))
        await asyncio.sleep(0.6)  # the oldest row has now waited longer than 300 ms
        loop = asyncio.get_running_loop()
        started = loop.time()
        resp = await client.post(PING, json=batch(5, trip="late"), headers=auth())
        assert resp.status == 503 and (await resp.json())["error"] == "overloaded"
        assert loop.time() - started < 0.5  # answered at once, not after the ack timeout
        assert "Retry-After" in resp.headers
    finally:
        await tx.rollback()
        await locker.close()
    assert (await waiting).status == 200  # the stalled batch commits once the lock goes
