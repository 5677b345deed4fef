"""The core ingest path against a real PostgreSQL: round trip, dedup, partitions, acks."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from .conftest import auth, batch, in_one_flush, iso, now_ms

PING = "/api/v1/tracking/ping"


async def count(db: asyncpg.Connection, trip: str = "trip_1") -> int:
    return int(await db.fetchval('SELECT count(*) FROM "TripLocation" WHERE "tripId" = $1', trip))


async def test_round_trip_stores_every_field(client, db):
    body = batch(3)
    body["locations"][0].update(heading=87.0, altitude=921.0)
    resp = await client.post(PING, json=body, headers=auth())
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {
        "batchId": body["batchId"], "accepted": 3, "duplicates": 0, "rejected": [],
    }  # fmt: skip
    rows = await db.fetch('SELECT * FROM "TripLocation" ORDER BY "timestamp"')
    assert len(rows) == 3
    first = rows[0]
    assert first["tripId"] == "trip_1" and first["driverId"] == "drv_1"
    assert first["orgId"] == "org_1" and first["batchId"] == body["batchId"]
    assert (first["latitude"], first["longitude"]) == (12.9, 77.5)
    assert (first["accuracy"], first["speed"], first["heading"], first["altitude"]) == (
        4.5, 11.2, 87.0, 921.0,
    )  # fmt: skip
    sent = datetime.fromisoformat(body["locations"][0]["timestamp"])
    assert first["timestamp"] == sent
    assert rows[1]["heading"] is None and rows[1]["altitude"] is None
    assert first["createdAt"] is not None


async def test_epoch_ms_and_offsets_are_stored_to_the_millisecond(client, db):
    ms = now_ms(-60)
    body = batch(3, start_ms=ms)
    body["locations"][0]["timestamp"] = ms  # epoch milliseconds
    local = datetime.fromtimestamp((ms + 1000) / 1000, UTC).astimezone(
        __import__("datetime").timezone(timedelta(hours=5, minutes=30))
    )
    body["locations"][1]["timestamp"] = local.isoformat()  # +05:30 offset, microseconds
    body["locations"][2]["timestamp"] = iso(ms + 2000)[:-1] + "789Z"  # sub-ms digits
    resp = await client.post(PING, json=body, headers=auth())
    assert (await resp.json())["accepted"] == 3
    stamps = [r[0] for r in await db.fetch('SELECT "timestamp" FROM "TripLocation" ORDER BY 1')]
    base = datetime(1970, 1, 1, tzinfo=UTC)
    assert stamps[0] == base + timedelta(milliseconds=ms)
    assert stamps[1] == base + timedelta(milliseconds=ms + 1000)
    assert all(s.microsecond % 1000 == 0 for s in stamps)


async def test_replayed_batch_stores_nothing_again(client, db):
    body = batch(5)
    first = await (await client.post(PING, json=body, headers=auth())).json()
    again = await (await client.post(PING, json=body, headers=auth())).json()
    assert (first["accepted"], first["duplicates"]) == (5, 0)
    assert (again["accepted"], again["duplicates"]) == (0, 5)
    assert await count(db) == 5


async def test_old_app_batch_id_on_each_location_counts_as_the_batch(client, db):
    body = batch(3)
    bid = body.pop("batchId")
    for loc in body["locations"]:
        loc["batchId"] = bid
    a = await (await client.post(PING, json=body, headers=auth())).json()
    b = await (await client.post(PING, json=body, headers=auth())).json()
    assert a["batchId"] == bid and (a["accepted"], b["duplicates"]) == (3, 3)
    assert await db.fetchval('SELECT count(*) FROM "IngestBatch" WHERE "batchId" = $1', bid) == 1


async def test_same_ping_in_two_batches_is_stored_once(client, db):
    start = now_ms(-300)
    a = batch(3, start_ms=start)
    b = batch(3, start_ms=start + 1000)  # overlaps a's last two pings, one new
    ra = await (await client.post(PING, json=a, headers=auth())).json()
    rb = await (await client.post(PING, json=b, headers=auth())).json()
    assert (ra["accepted"], ra["duplicates"]) == (3, 0)
    assert (rb["accepted"], rb["duplicates"]) == (1, 2)
    assert await count(db) == 4


async def test_same_ping_twice_in_one_flush_is_stored_once(make_client, db):
    client = await make_client()
    start = now_ms(-300)
    a, b = batch(4, start_ms=start), batch(4, start_ms=start)
    ra, rb = await in_one_flush(
        client, client.post(PING, json=a, headers=auth()), client.post(PING, json=b, headers=auth())
    )
    ja, jb = await ra.json(), await rb.json()
    assert sorted([ja["accepted"], jb["accepted"]]) == [0, 4]
    assert ja["duplicates"] + jb["duplicates"] == 4
    assert await count(db) == 4


async def test_duplicate_timestamps_inside_one_batch(client, db):
    body = batch(3)
    body["locations"][2]["timestamp"] = body["locations"][1]["timestamp"]
    r = await (await client.post(PING, json=body, headers=auth())).json()
    assert (r["accepted"], r["duplicates"]) == (2, 1)
    assert await count(db) == 2


async def test_same_batch_id_twice_in_one_flush_is_a_replay(make_client, db):
    client = await make_client()
    body = batch(3)
    ra, rb = await in_one_flush(
        client, client.post(PING, json=body, headers=auth()),
        client.post(PING, json=body, headers=auth()),
    )  # fmt: skip
    got = sorted([(await r.json())["accepted"] for r in (ra, rb)])
    assert got == [0, 3]
    assert await count(db) == 3


async def test_batch_across_a_month_boundary_lands_in_both_partitions(client, db):
    now = datetime.now(UTC)
    boundary = datetime(now.year, now.month, 1, tzinfo=UTC)
    ms = int(boundary.timestamp() * 1000)
    body = batch(2, start_ms=ms - 500, step_ms=1000)  # 00:00:00.500 before and after
    if boundary + timedelta(seconds=1) > now:  # the very first second of a month
        body = batch(2, start_ms=ms - 1500, step_ms=1000)
    r = await (await client.post(PING, json=body, headers=auth())).json()
    assert r["accepted"] == 2
    parts = [
        row[0]
        for row in await db.fetch(
            'SELECT tableoid::regclass::text FROM "TripLocation" ORDER BY "timestamp"'
        )
    ]
    prev = boundary - timedelta(days=1)
    assert parts == [
        f'"TripLocation_{prev.year:04d}_{prev.month:02d}"',
        f'"TripLocation_{boundary.year:04d}_{boundary.month:02d}"',
    ]


async def test_missing_partition_is_created_on_demand(client, db):
    now = datetime.now(UTC)
    name = f"TripLocation_{now.year:04d}_{now.month:02d}"
    await db.execute(f'DROP TABLE "{name}"')
    r = await client.post(PING, json=batch(2, start_ms=now_ms(-5)), headers=auth())
    assert (await r.json())["accepted"] == 2
    assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{name}"')


async def test_buffered_ack_answers_202_then_commits(make_client, db):
    client = await make_client(ack_mode="buffered")
    body = batch(4)
    resp = await client.post(PING, json=body, headers=auth())
    assert resp.status == 202
    assert await resp.json() == {"batchId": body["batchId"], "queued": 4, "rejected": []}
    for _ in range(100):
        if await count(db) == 4:
            break
        await asyncio.sleep(0.02)
    assert await count(db) == 4


async def test_gzip_and_msgpack_bodies(client, db):
    a = batch(2, trip="t_gz")
    resp = await client.post(
        PING, data=gzip.compress(msgspec.json.encode(a)),
        headers={**auth(), "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )  # fmt: skip
    assert resp.status == 200 and (await resp.json())["accepted"] == 2
    b = batch(2, trip="t_mp")
    resp = await client.post(
        PING, data=msgspec.msgpack.encode(b),
        headers={**auth(), "Content-Type": "application/msgpack"},
    )  # fmt: skip
    assert resp.status == 200 and (await resp.json())["accepted"] == 2
    assert await count(db, "t_gz") == 2 and await count(db, "t_mp") == 2


async def test_batch_without_batch_id_is_deduplicated_by_ping(client, db):
    body = batch(3)
    del body["batchId"]
    a = await (await client.post(PING, json=body, headers=auth())).json()
    b = await (await client.post(PING, json=body, headers=auth())).json()
    assert a == {"batchId": None, "accepted": 3, "duplicates": 0, "rejected": []}
    assert (b["accepted"], b["duplicates"]) == (0, 3)
    assert await count(db) == 3


async def test_many_trips_in_one_flush(make_client, db):
    client = await make_client(flush_interval_ms=200)
    bodies = [batch(20, trip=f"trip_{i}", driver="drv_1") for i in range(30)]
    resps = await asyncio.gather(*(client.post(PING, json=b, headers=auth()) for b in bodies))
    assert [r.status for r in resps] == [200] * 30
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 600
    flushes = await db.fetchval(
        'SELECT count(DISTINCT "createdAt") FROM "TripLocation"'
    )  # one transaction = one now()
    assert flushes < 30  # group commit: far fewer transactions than requests


async def test_batch_id_records_are_scoped_per_driver(client, db):
    bid = str(uuid.uuid4())
    a = await client.post(PING, json=batch(2, batch_id=bid), headers=auth(sub="drv_1"))
    b = await client.post(
        PING, json=batch(2, trip="trip_2", driver="drv_2", batch_id=bid), headers=auth(sub="drv_2")
    )
    assert (await a.json())["accepted"] == 2 and (await b.json())["accepted"] == 2


async def test_rows_postgres_refuses_fail_only_their_request(make_client, db):
    await db.execute(
        'ALTER TABLE "TripLocation" ADD CONSTRAINT no_evil CHECK ("tripId" <> \'evil\')'
    )
    client = await make_client()
    good, evil = batch(3, trip="good"), batch(3, trip="evil")
    rg, re_ = await in_one_flush(
        client, client.post(PING, json=good, headers=auth()),
        client.post(PING, json=evil, headers=auth()),
    )  # fmt: skip
    assert rg.status == 200 and (await rg.json())["accepted"] == 3
    assert re_.status == 500 and (await re_.json())["error"] == "storage_error"
    assert await count(db, "good") == 3 and await count(db, "evil") == 0
    again = await client.post(PING, json=batch(2, trip="good2"), headers=auth())
    assert again.status == 200  # the flusher is still alive
