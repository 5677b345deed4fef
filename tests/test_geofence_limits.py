"""Geofence evaluation under one org's abuse, on the real PostgreSQL and Redis: its events are
stored in bounded transactions and never hold another org's; a fence change waiting behind an
evaluation's locks is answered 503, not 500; the sweep is not starved by trips it cannot
evaluate, and finds an old trip whose flush was dropped."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from ingest import geofence_events, geofences_api, metrics
from ingest.geofence_events import GeofenceEvaluator
from ingest.keyspace import keyspace
from ingest.live import Live
from ingest.typedefs import GEOFENCES, LIVE

from .conftest import REDIS_URL, in_one_flush, now_ms, post_ping
from .test_geofence_worker import count
from .test_geofences import FENCES, INSIDE, LAT0, LON0, SQUARE, auth, dispatcher, fence, pings

FAR = (LAT0 + 2.0, LON0)  # about 220 km north: outside every circle below


async def published(pubsub: Any, until: float) -> list[dict[str, Any]]:
    """The geofence messages received until loop time ``until``."""
    got = []
    loop = asyncio.get_running_loop()
    while (left := until - loop.time()) > 0:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 0.1))
        if msg is not None:
            body = json.loads(msg["data"])
            if body.get("type") == "geofence":
                got.append(body)
    return got


async def test_one_orgs_flood_of_events_is_stored_in_bounded_transactions(
    make_client, db, redis, monkeypatch
):
    """Org a: 10 co-located circles and a batch alternating between their centre and 220 km
    away (10 events per ping, 200 in all), in the same flush as one ping of org b. Each
    transaction holds at most EVENTS_PER_TRANSACTION events (scaled down here); every event
    of a is stored once and published once, and b's one event too."""
    bound = 25
    monkeypatch.setattr(geofence_events, "EVENTS_PER_TRANSACTION", bound)
    client = await make_client(geofence_evaluation="inline")
    circle = {"type": "Point", "coordinates": [LON0, LAT0]}
    a_fences = [
        await fence(client, circle, name=f"c{i}", org="org_a", radiusM=50_000) for i in range(10)
    ]
    b_fence = await fence(client, SQUARE, org="org_b")
    keys = client.server.app[LIVE].keys
    pubsub = redis.pubsub()
    await pubsub.subscribe(
        keys.geofence_channel("org_a", "trip_a"), keys.geofence_channel("org_b", "trip_b")
    )
    cuts = count(metrics.GEOFENCE_CUTS, reason="events")
    t = now_ms(1)
    a_batch = {
        "tripId": "trip_a", "driverId": "drv_a", "batchId": "a-1",
        "locations": pings([INSIDE if i % 2 == 0 else FAR for i in range(20)], t),
    }  # fmt: skip
    b_batch = {"tripId": "trip_b", "driverId": "drv_b", "batchId": "b-1",
               "locations": pings([INSIDE], t)}  # fmt: skip
    answers = await in_one_flush(
        client,
        post_ping(client, a_batch, **auth("driver", "drv_a", "org_a")),
        post_ping(client, b_batch, **auth("driver", "drv_b", "org_b")),
    )
    assert [status for status, _ in answers] == [200, 200], answers
    evaluator = client.server.app[GEOFENCES]
    for _ in range(500):
        if not evaluator.pending:
            break
        await asyncio.sleep(0.02)
    msgs = await published(pubsub, asyncio.get_running_loop().time() + 0.5)
    await pubsub.aclose()

    stored = await db.fetch('SELECT "orgId", "geofenceId", "event" FROM "GeofenceEvent"')
    a_stored = [r for r in stored if r["orgId"] == "org_a"]
    assert len(a_stored) == 200 and {r["geofenceId"] for r in a_stored} == set(a_fences)
    assert [(r["geofenceId"], r["event"]) for r in stored if r["orgId"] == "org_b"] == [
        (b_fence, "enter")
    ]
    a_msgs = [m for m in msgs if m["tripId"] == "trip_a"]
    assert len(a_msgs) == 200
    assert len({(m["geofenceId"], m["timestamp"], m["event"]) for m in a_msgs}) == 200
    assert [(m["geofenceId"], m["event"]) for m in msgs if m["tripId"] == "trip_b"] == [
        (b_fence, "enter")
    ]
    # No transaction held more than the bound (each took whole pings of 10 events: at most
    # 20 of 25), so it took at least 201 / 20 of them: 10, 9 of them cut short.
    assert count(metrics.GEOFENCE_CUTS, reason="events") - cuts >= 9


async def test_a_flush_failing_for_one_org_is_retried_org_by_org(make_client, db, sessions):
    """Org a's trip row stays locked (another pod's evaluation, for real): the evaluation of a
    flush holding a ping of org a and one of org b times out at every attempt. b's event is
    stored at the first retry, while a's still fails (before: the flush was retried whole,
    and b's event waited with a's, dropped after 8 failures); a's follows once the lock goes."""
    client = await make_client(geofence_evaluation="inline", flush_timeout_s=0.5)
    a_fence = await fence(client, SQUARE, org="org_a")
    b_fence = await fence(client, SQUARE, org="org_b")
    t = now_ms(1)
    out = {"tripId": "trip_a", "driverId": "drv_a", "batchId": "a-0",
           "locations": pings([FAR], t)}  # fmt: skip
    assert (await post_ping(client, out, **auth("driver", "drv_a", "org_a")))[0] == 200
    evaluator = client.server.app[GEOFENCES]
    for _ in range(250):
        if not evaluator.pending:
            break
        await asyncio.sleep(0.02)
    a_in = {"tripId": "trip_a", "driverId": "drv_a", "batchId": "a-1",
            "locations": pings([INSIDE], t + 1000)}  # fmt: skip
    b_in = {"tripId": "trip_b", "driverId": "drv_b", "batchId": "b-1",
            "locations": pings([INSIDE], t + 1000)}  # fmt: skip
    other_pod = sessions[0]
    failures = count(metrics.GEOFENCE_FAILURES)
    async with other_pod.transaction():
        await other_pod.execute(
            'SELECT 1 FROM "GeofenceState" WHERE "orgId" = $1 AND "tripId" = $2 FOR UPDATE',
            "org_a", "trip_a",
        )  # fmt: skip
        await in_one_flush(
            client,
            post_ping(client, a_in, **auth("driver", "drv_a", "org_a")),
            post_ping(client, b_in, **auth("driver", "drv_b", "org_b")),
        )
        for _ in range(250):
            if await db.fetchval('SELECT count(*) FROM "GeofenceEvent"'):
                break
            await asyncio.sleep(0.02)
        stored = await db.fetch('SELECT "geofenceId", "event" FROM "GeofenceEvent"')
        assert [tuple(r) for r in stored] == [(b_fence, "enter")]
        assert count(metrics.GEOFENCE_FAILURES) - failures >= 2  # the group, then org a
    for _ in range(500):
        if not evaluator.pending:
            break
        await asyncio.sleep(0.02)
    stored = await db.fetch('SELECT "geofenceId", "event" FROM "GeofenceEvent" ORDER BY 1')
    assert sorted(tuple(r) for r in stored) == sorted([(a_fence, "enter"), (b_fence, "enter")])


async def test_a_fence_change_waiting_for_an_evaluations_locks_is_a_503(
    make_client, sessions, monkeypatch
):
    """Another pod's evaluation of a flush holding pings of orgs a and b holds both org rows
    (FOR SHARE, its lock statement run for real): org b's fence create and delete wait at
    most CHANGE_LOCK_WAIT_S and answer 503 with Retry-After (before: 500 at the command
    timeout); once the evaluation commits, they go through."""
    monkeypatch.setattr(geofences_api, "CHANGE_LOCK_WAIT_S", 0.5)
    client = await make_client(geofence_evaluation="inline", flush_timeout_s=3)
    b_fence = await fence(client, org="org_b")
    await fence(client, org="org_a")
    evaluation = sessions[0]
    async with evaluation.transaction():
        await evaluation.fetch(geofence_events._LOCK, ["org_a", "org_b"], [], [])
        started = time.monotonic()
        r = await client.post(
            FENCES, json={"name": "Yard", "geometry": SQUARE}, headers=dispatcher("org_b")
        )
        assert r.status == 503, await r.text()
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"] == "geofence_busy"
        r = await client.delete(f"{FENCES}/{b_fence}", headers=dispatcher("org_b"))
        assert r.status == 503, await r.text()
        assert "Retry-After" in r.headers
        assert time.monotonic() - started < 2 * geofences_api.CHANGE_LOCK_WAIT_S + 1
    r = await client.post(
        FENCES, json={"name": "Yard", "geometry": SQUARE}, headers=dispatcher("org_b")
    )
    assert r.status == 201
    r = await client.delete(f"{FENCES}/{b_fence}", headers=dispatcher("org_b"))
    assert r.status == 204


@pytest.fixture
async def sessions(database):
    conns = [await asyncpg.connect(database)]
    yield conns
    for c in conns:
        await c.close()


@pytest.fixture
async def evaluator_of(database):
    """GeofenceEvaluators on a pool of the test's database, driven by hand (as in
    test_geofence_worker.py)."""
    pool = await asyncpg.create_pool(database, min_size=0, max_size=2)
    redis = aioredis.from_url(REDIS_URL)
    live = Live(redis, keyspace("standalone", "unused:", 1), 60, None)
    try:
        yield lambda **kw: GeofenceEvaluator(pool, live, 0.0, **kw)
    finally:
        await pool.close()
        await redis.aclose()


# -- the sweep -------------------------------------------------------------------------------

_FENCE = """
INSERT INTO "Geofence" ("orgId", "id", "name", "geometry", "radiusM", "vertices", "createdAt")
VALUES ($1, $2, 'Depot', $3::jsonb, 5000, 1, $4)
"""
_ORG = """
INSERT INTO "GeofenceOrg" ("orgId", "version", "fences", "vertices") VALUES ($1, 1, 1, 1)
"""
_PING = """
INSERT INTO "TripLocation" ("tripId", "driverId", "orgId", "latitude", "longitude", "timestamp",
    "createdAt")
VALUES ($1, 'drv_1', $2, $3, $4, $5, now() - interval '1 minute')
"""
_STATE = """
INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside", "updatedAt")
VALUES ($1, $2, $3, '{}', $4)
"""


async def circle_of(db, org: str, created: datetime) -> str:
    """A 5 km circle at INSIDE, created at ``created``: its id."""
    fid = f"gf_{org}"
    geometry = json.dumps({"type": "Point", "coordinates": [LON0, LAT0]})
    await db.execute(_FENCE, org, fid, geometry, created)
    await db.execute(_ORG, org)
    return fid


def _row(trip: str, org: str, at: datetime) -> tuple[object, ...]:
    return (trip, "drv_1", org, INSIDE[0], INSIDE[1], None, None, None, None, at, None)


async def _events_of(db, trip: str) -> list[tuple[str, datetime]]:
    rows = await db.fetch(
        'SELECT "event", "timestamp" FROM "GeofenceEvent" WHERE "tripId" = $1', trip
    )
    return [(r[0], r[1]) for r in rows]


async def test_trips_with_nothing_to_evaluate_do_not_starve_the_sweep(
    evaluator_of, db, monkeypatch
):
    """Org a deleted its only fence, its trips kept posting, then it made a new fence: more
    trips than the sweep takes at once have pings between their state and the new fence
    (nothing to evaluate). Org b's new trip, whose only flush was dropped, sorts after them:
    its event is stored within two sweeps (before: a's trips were found by every sweep, and
    b's never)."""
    monkeypatch.setattr(geofence_events, "_SWEEP_MAX_TRIPS", 3)
    now = datetime.now(UTC)
    await circle_of(db, "a", now)
    await circle_of(db, "b", now - timedelta(minutes=5))
    for i in range(4):
        await db.execute(_STATE, "a", f"stuck_{i}", now - timedelta(minutes=20), now)
        await db.execute(_PING, f"stuck_{i}", "a", *INSIDE, now - timedelta(minutes=10))
    ping_at = (now - timedelta(minutes=2)).replace(microsecond=0)
    await db.execute(_PING, "new", "b", *INSIDE, ping_at)
    evaluator = evaluator_of(waited=True)
    evaluator._dropped([_row("new", "b", ping_at)])
    await evaluator._make_states(evaluator.pool)
    for _ in range(2):
        await evaluator.sweep()
    assert await _events_of(db, "new") == [("enter", ping_at)]
    assert await _events_of(db, "stuck_0") == []


async def test_a_dropped_flush_of_a_trip_evaluated_long_ago_is_swept(evaluator_of, db):
    """A trip last evaluated two hours ago (outside the sweep's window) posts again and its
    flush is dropped: the state row's time is refreshed, so the sweep finds the trip and its
    event is stored (before: it waited for the trip's next ping, for ever if it had none)."""
    now = datetime.now(UTC)
    fid = await circle_of(db, "b", now - timedelta(hours=3))
    long_ago = now - timedelta(hours=2)
    await db.execute(_STATE, "b", "old", long_ago, long_ago)
    ping_at = (now - timedelta(minutes=2)).replace(microsecond=0)
    await db.execute(_PING, "old", "b", *INSIDE, ping_at)
    evaluator = evaluator_of(waited=True)
    evaluator._dropped([_row("old", "b", ping_at)])
    await evaluator._make_states(evaluator.pool)
    assert await evaluator.sweep() == 1
    assert await _events_of(db, "old") == [("enter", ping_at)]
    assert await db.fetchval('SELECT "geofenceId" FROM "GeofenceEvent"') == fid


async def test_a_sweep_after_an_outage_reads_back_in_bounded_transactions(
    evaluator_of, db, monkeypatch
):
    """Six trips whose last 30 pings no evaluation took (an outage: their flushes dropped),
    each going in and out of the circle at every ping. The sweep reads them back at most
    READ_BACK_MAX pings per transaction (scaled down: 60, GAP_MAX_PINGS 50), the other trips
    in the next ones; every trip's 30 events are stored once, in time order (before: all 180
    pings in one read, of up to 500 x 10,000 pings in production)."""
    monkeypatch.setattr(geofence_events, "GAP_MAX_PINGS", 50)
    monkeypatch.setattr(geofence_events, "READ_BACK_MAX", 60)
    cuts = metrics.GEOFENCE_CUTS.labels("read_back")
    cuts_before = cuts._value.get()
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "b", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    trips = [f"trip_{i}" for i in range(6)]
    for trip in trips:
        await db.execute(_STATE, "b", trip, now - timedelta(minutes=20), now)
        await db.executemany(_PING, [
            (trip, "b", *(INSIDE if k % 2 == 0 else FAR), start + timedelta(seconds=k))
            for k in range(30)
        ])  # fmt: skip
    evaluator = evaluator_of(waited=True)
    assert await evaluator.sweep() == 6 * 30
    assert cuts._value.get() - cuts_before >= 2
    for trip in trips:
        assert await _events_of(db, trip) == [
            ("enter" if k % 2 == 0 else "exit", start + timedelta(seconds=k)) for k in range(30)
        ]


async def test_a_read_back_cut_holds_another_orgs_live_trip_for_one_transaction(
    evaluator_of, db, monkeypatch
):
    """One flush: org b's live trip (nothing to read back, one ping entering its circle),
    first, and six trips of org a, each with 30 pings no evaluation took (a's outage). The
    read-back bound (scaled down as above) cuts the evaluation into transactions; b's event
    is stored in the first (before: the read-back followed the sorted trips, so b, sorting
    after a, was deferred again in every transaction until all of a's catch-up was read)."""
    monkeypatch.setattr(geofence_events, "GAP_MAX_PINGS", 50)
    monkeypatch.setattr(geofence_events, "READ_BACK_MAX", 60)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "a", now - timedelta(hours=3))
    await circle_of(db, "b", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    flush_at = start + timedelta(seconds=30)
    await db.execute(_STATE, "b", "live", now - timedelta(minutes=20), now)
    await db.execute(_PING, "live", "b", *INSIDE, flush_at)
    rows = [_row("live", "b", flush_at)]
    a_trips = [f"trip_{i}" for i in range(6)]
    for trip in a_trips:
        await db.execute(_STATE, "a", trip, start - timedelta(minutes=10), now)
        await db.executemany(_PING, [
            (trip, "a", *(INSIDE if k % 2 == 0 else FAR), start + timedelta(seconds=k))
            for k in range(30)
        ])  # fmt: skip
        await db.execute(_PING, trip, "a", *INSIDE, flush_at)
        rows.append(_row(trip, "a", flush_at))
    evaluator = evaluator_of(waited=True)
    stored_orgs: list[set[str]] = []
    store = evaluator._store

    async def recording_store(conn, events, updates):  # type: ignore[no-untyped-def]
        stored_orgs.append({e.org for e in events})
        return await store(conn, events, updates)

    monkeypatch.setattr(evaluator, "_store", recording_store)
    assert await evaluator.evaluate(rows) == 1 + 6 * 31
    assert len(stored_orgs) >= 3  # the bound did cut
    assert "b" in stored_orgs[0], stored_orgs
    assert await _events_of(db, "live") == [("enter", flush_at)]
    for trip in a_trips:  # a's own events: once each, in time order
        assert await _events_of(db, trip) == [
            ("enter" if k % 2 == 0 else "exit", start + timedelta(seconds=k)) for k in range(31)
        ]


async def test_a_read_back_cut_holds_a_later_orgs_live_trip_for_one_transaction(
    evaluator_of, db, monkeypatch
):
    """As above, but org b's live ping comes last in the flush (requests arrive in any order;
    an older flush of a's catch-up is chained before b's). Trips deferred by the cut go first
    in the next transaction, orgs given no rows first: b's event is stored in the second
    (before: behind a's remaining trips in every transaction, in the 5th of 5)."""
    monkeypatch.setattr(geofence_events, "GAP_MAX_PINGS", 50)
    monkeypatch.setattr(geofence_events, "READ_BACK_MAX", 60)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "a", now - timedelta(hours=3))
    await circle_of(db, "b", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    flush_at = start + timedelta(seconds=30)
    rows = []
    a_trips = [f"trip_{i}" for i in range(10)]
    for trip in a_trips:
        await db.execute(_STATE, "a", trip, start - timedelta(minutes=10), now)
        await db.executemany(_PING, [
            (trip, "a", *(INSIDE if k % 2 == 0 else FAR), start + timedelta(seconds=k))
            for k in range(30)
        ])  # fmt: skip
        await db.execute(_PING, trip, "a", *INSIDE, flush_at)
        rows.append(_row(trip, "a", flush_at))
    await db.execute(_STATE, "b", "live", now - timedelta(minutes=20), now)
    await db.execute(_PING, "live", "b", *INSIDE, flush_at)
    rows.append(_row("live", "b", flush_at))  # last in the flush
    evaluator = evaluator_of(waited=True)
    stored_orgs: list[set[str]] = []
    store = evaluator._store

    async def recording_store(conn, events, updates):  # type: ignore[no-untyped-def]
        stored_orgs.append({e.org for e in events})
        return await store(conn, events, updates)

    monkeypatch.setattr(evaluator, "_store", recording_store)
    assert await evaluator.evaluate(rows) == 1 + 10 * 31
    assert await _events_of(db, "live") == [("enter", flush_at)]
    first_b = next(i for i, orgs in enumerate(stored_orgs) if "b" in orgs)
    # At most one transaction of a's catch-up before b's event.
    assert first_b <= 1, f"b's event waited for {first_b} transactions of a: {stored_orgs}"


async def test_read_back_rows_held_stay_bounded_when_the_walk_is_cut_too(
    evaluator_of, db, monkeypatch
):
    """A sweep after an outage (ten trips of 30 unevaluated pings, each ping a crossing) in
    an org whose events cut every transaction (EVENTS_PER_TRANSACTION, scaled down to 10).
    The trips read back and not walked go to the next transaction without their read-back
    rows (read again from their states), so the rows held stay within 2 x READ_BACK_MAX
    (before: carried over, 60, 110, 160, 210, 260 rows: in production the whole catch-up)."""
    monkeypatch.setattr(geofence_events, "GAP_MAX_PINGS", 50)
    monkeypatch.setattr(geofence_events, "READ_BACK_MAX", 60)
    monkeypatch.setattr(geofence_events, "EVENTS_PER_TRANSACTION", 10)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "b", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    trips = [f"trip_{i}" for i in range(10)]
    for trip in trips:
        await db.execute(_STATE, "b", trip, now - timedelta(minutes=20), now)
        await db.executemany(_PING, [
            (trip, "b", *(INSIDE if k % 2 == 0 else FAR), start + timedelta(seconds=k))
            for k in range(30)
        ])  # fmt: skip
    evaluator = evaluator_of(waited=True)
    held: list[int] = []  # rows per transaction: carried in + read back
    read_back = geofence_events._read_back
    evaluate = evaluator._evaluate

    async def recording_evaluate(conn, by_trip, made=False):  # type: ignore[no-untyped-def]
        held.append(sum(len(v) for v in by_trip.values()))
        return await evaluate(conn, by_trip, made)

    async def recording_read_back(conn, keys, lo, hi):  # type: ignore[no-untyped-def]
        out, done = await read_back(conn, keys, lo, hi)
        held[-1] += len(out)
        return out, done

    monkeypatch.setattr(evaluator, "_evaluate", recording_evaluate)
    monkeypatch.setattr(geofence_events, "_read_back", recording_read_back)
    assert await evaluator.sweep() == 10 * 30
    for trip in trips:  # exactly once, in order: this holds
        assert await _events_of(db, trip) == [
            ("enter" if k % 2 == 0 else "exit", start + timedelta(seconds=k)) for k in range(30)
        ]
    bound = 2 * geofence_events.READ_BACK_MAX
    assert max(held) <= bound, f"rows held per transaction: {held}"
