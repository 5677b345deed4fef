"""Geofence evaluation under one org's abuse, on the real PostgreSQL and Redis: its events are
stored in bounded transactions and never hold another org's; a fence change waiting behind an
evaluation's locks is answered 503, not 500; the sweep is not starved by trips it cannot
evaluate, and finds an old trip whose flush was dropped."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
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
        for _ in range(250):  # (b's retry may come before or after a's, as the flush's rows)
            failed = count(metrics.GEOFENCE_FAILURES) - failures
            if failed >= 2 and await db.fetchval('SELECT count(*) FROM "GeofenceEvent"'):
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
        await evaluation.fetch(geofence_events._LOCK, ["org_a", "org_b"], "", "")
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


_GEOMETRY = json.dumps({"type": "Point", "coordinates": [LON0, LAT0]})  # as stored: 5 km


async def circle_of(db, org: str, created: datetime) -> str:
    """A 5 km circle at INSIDE, created at ``created``: its id."""
    fid = f"gf_{org}"
    await db.execute(_FENCE, org, fid, _GEOMETRY, created)
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


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


async def _plan(db, statement: str, *args: Any) -> list[dict[str, Any]]:
    """The nodes of the statement's plan, run (EXPLAIN ANALYZE)."""
    text = await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, *args)
    return _plan_nodes(json.loads(text)[0]["Plan"])


def _rows_read(nodes: list[dict[str, Any]], relation: str) -> float:
    """Rows the plan's scans of ``relation`` returned or filtered out, over all loops."""
    return sum(
        (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)) * n.get("Actual Loops", 0)
        for n in nodes
        if n.get("Relation Name") == relation
    )


async def test_the_sweep_probes_each_trip_and_reads_the_fences_once(evaluator_of, db):
    """An org of 200 fences and 300 trips with 40 pings each in their settle time (stored,
    not evaluated yet) after 20 evaluated, as under load, and one trip with a ping no
    evaluation took. The sweep finds only that trip, and its statement reads each fence once
    and each trip's pings by its index (before: the oldest fence was looked up per stored
    ping, and every stored ping hash-joined: 86 s per sweep at 1,024 trips x 450 pings x
    1,000 fences, every 2 s)."""
    now = datetime.now(UTC).replace(microsecond=0)  # (stored times are in milliseconds)
    fences = 200
    await db.executemany(_FENCE, [
        ("b", f"gf_{i}", _GEOMETRY, now - timedelta(hours=1)) for i in range(fences)
    ])  # fmt: skip
    await db.execute(_ORG, "b")
    evaluated_to = now - timedelta(minutes=5)
    trips = [f"busy_{i}" for i in range(300)]
    await db.executemany(_STATE, [("b", t, evaluated_to, now) for t in [*trips, "dropped"]])
    # Each trip: 20 pings evaluated a while ago, then 40 in their settle time (stored, not
    # evaluated yet).
    await db.copy_records_to_table(
        "TripLocation",
        columns=["tripId", "driverId", "orgId", "latitude", "longitude", "timestamp", "createdAt"],
        records=[
            (t, "drv_1", "b", *FAR, evaluated_to + timedelta(seconds=k), now - timedelta(seconds=10 * (k < 1)))
            for t in trips
            for k in range(-19, 41)
        ],
    )  # fmt: skip
    await db.execute(_PING, "dropped", "b", *INSIDE, evaluated_to + timedelta(seconds=1))
    await db.execute('ANALYZE "Geofence", "GeofenceState", "TripLocation"')
    window = timedelta(seconds=3)
    args = (["b"], geofence_events._SWEEP_WINDOW, window, geofence_events._SWEEP_MAX_TRIPS)
    assert [tuple(r) for r in await db.fetch(geofence_events._UNEVALUATED, *args)] == [
        ("b", "dropped")
    ]
    nodes = await _plan(db, geofence_events._UNEVALUATED, *args)
    fence_rows = _rows_read(nodes, "Geofence")
    assert fence_rows <= fences, f"the fences were read {fence_rows / fences:.0f} times"
    # (Empty partitions, months ahead, may be scanned: nothing to read.)
    scanned = sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
        for n in nodes
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name", "").startswith("TripLocation")
    )
    assert scanned == 0, f"{scanned} stored pings scanned"
    evaluator = evaluator_of(waited=True)
    assert await evaluator.sweep() == 200  # one enter per circle, on the dropped trip only


def _scaled_down(monkeypatch, events: int | None = None) -> None:
    """The read-back bounds scaled down: 50 pings per trip, about 60 per transaction."""
    monkeypatch.setattr(geofence_events, "GAP_MAX_PINGS", 50)
    monkeypatch.setattr(geofence_events, "READ_BACK_MAX", 60)
    if events is not None:
        monkeypatch.setattr(geofence_events, "EVENTS_PER_TRANSACTION", events)


def _crossings(start: datetime, n: int) -> list[tuple[str, datetime]]:
    return [("enter" if k % 2 == 0 else "exit", start + timedelta(seconds=k)) for k in range(n)]


async def _catching_up(
    db, org: str, trip: str, start: datetime, now: datetime, n: int = 30
) -> tuple[object, ...]:
    """A trip of ``org`` with ``n`` stored pings no evaluation took, in and out of the
    circle at every ping from ``start`` (an outage: their flushes dropped), and one more
    stored at ``start + n`` s: the flush row returned."""
    await db.execute(_STATE, org, trip, now - timedelta(minutes=20), now)
    await db.executemany(_PING, [
        (trip, org, *(INSIDE if k % 2 == 0 else FAR), start + timedelta(seconds=k))
        for k in range(n)
    ])  # fmt: skip
    flush_at = start + timedelta(seconds=n)
    await db.execute(_PING, trip, org, *INSIDE, flush_at)
    return _row(trip, org, flush_at)


async def _live(db, org: str, trip: str, at: datetime, now: datetime) -> tuple[object, ...]:
    """A trip of ``org`` with nothing to read back: its flush row, entering the circle."""
    await db.execute(_STATE, org, trip, now - timedelta(minutes=20), now)
    await db.execute(_PING, trip, org, *INSIDE, at)
    return _row(trip, org, at)


async def _an_outage(db, trips: int) -> tuple[datetime, list[str]]:
    """Org b's circle and ``trips`` trips catching up (see above): their start, their ids."""
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "b", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    ids = [f"trip_{i}" for i in range(trips)]
    for trip in ids:
        await _catching_up(db, "b", trip, start, now)
    return start, ids


def _recording(evaluator: GeofenceEvaluator, monkeypatch) -> list[set[tuple[str, str]]]:
    """The (org, trip) of each transaction's events, in commit order."""
    per_transaction: list[set[tuple[str, str]]] = []
    store = evaluator._store

    async def recording_store(conn, events, updates):  # type: ignore[no-untyped-def]
        per_transaction.append({(e.org, e.ping[0]) for e in events})
        return await store(conn, events, updates)

    monkeypatch.setattr(evaluator, "_store", recording_store)
    return per_transaction


def _waited(per_transaction: list[set[tuple[str, str]]], key: tuple[str, str]) -> int:
    """How many transactions stored events before the first of ``key``'s."""
    return next(i for i, keys in enumerate(per_transaction) if key in keys)


async def test_a_sweep_after_an_outage_reads_back_in_bounded_transactions(
    evaluator_of, db, monkeypatch
):
    """Six trips whose last 31 pings no evaluation took. The sweep reads them back at most
    READ_BACK_MAX pings per transaction, the other trips in the next ones; every trip's 31
    events are stored once, in time order (before: all 186 pings in one read, of up to
    500 x 10,000 pings in production)."""
    _scaled_down(monkeypatch)
    cuts = metrics.GEOFENCE_CUTS.labels("read_back")
    cuts_before = cuts._value.get()
    start, trips = await _an_outage(db, 6)
    evaluator = evaluator_of(waited=True)
    assert await evaluator.sweep() == 6 * 31
    assert cuts._value.get() - cuts_before >= 2
    for trip in trips:
        assert await _events_of(db, trip) == _crossings(start, 31)


async def test_rows_held_stay_bounded_when_the_walk_is_cut_too(evaluator_of, db, monkeypatch):
    """A sweep after an outage in an org whose events cut every transaction (scaled down to
    10 events). The trips read back and not walked go to the next transaction without their
    read-back rows (read again from their states), so the rows held stay within
    2 x READ_BACK_MAX (before: carried over, 60, 110, 160, 210, 260 rows: in production the
    whole catch-up)."""
    _scaled_down(monkeypatch, events=10)
    start, trips = await _an_outage(db, 10)
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
    assert await evaluator.sweep() == 10 * 31
    for trip in trips:
        assert await _events_of(db, trip) == _crossings(start, 31)
    assert max(held) <= 2 * geofence_events.READ_BACK_MAX, f"rows held: {held}"


async def test_the_read_back_records_are_not_held_during_the_walk(evaluator_of, db, monkeypatch):
    """The rows read back (asyncpg Records, up to 2 x READ_BACK_MAX) are copied into tuples
    for the walk, and not held during it (before: twice the rows the bound says, while the
    org rows stay locked)."""
    _scaled_down(monkeypatch)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "a", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    rows = [await _catching_up(db, "a", trip, start, now) for trip in ("t0", "t1")]

    class Held(list):  # type: ignore[type-arg]
        pass

    refs: list[weakref.ref[Held]] = []
    read_back = geofence_events._read_back

    async def tracked(conn, keys, lo, hi):  # type: ignore[no-untyped-def]
        out, done = await read_back(conn, keys, lo, hi)
        held = Held(out)
        del out
        refs.append(weakref.ref(held))
        return held, done

    alive_in_walk: list[bool] = []
    walk = geofence_events._walk

    def tracked_walk(*args):  # type: ignore[no-untyped-def]
        alive_in_walk.append(any(r() is not None for r in refs))
        return walk(*args)

    monkeypatch.setattr(geofence_events, "_read_back", tracked)
    monkeypatch.setattr(geofence_events, "_walk", tracked_walk)
    evaluator = evaluator_of(waited=True)
    assert await evaluator.evaluate(rows) == 2 * 31
    assert alive_in_walk and not any(alive_in_walk), "read-back Records held during the walk"


# One org catching up (or flooding) and another org's live trip in the same flush: the live
# trip's event waits for at most one transaction of it, wherever it is in the flush, whatever
# cut the transaction (the read-back bound, the events bound or both); a's own events are
# stored once each, in time order.


async def _one_flush(db, evaluator_of, monkeypatch, order: str, a_trips: int, b_other=False):
    """Org a's ``a_trips`` trips catching up and org b's live trip, in the flush in
    ``order`` ("b first", "b last" or "b second"); with ``b_other``, first a trip of b
    with one ping to read back. Evaluates the flush: the transactions b's event waited."""
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "a", now - timedelta(hours=3))
    await circle_of(db, "b", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    flush_at = start + timedelta(seconds=30)
    a = [await _catching_up(db, "a", f"trip_{i}", start, now) for i in range(a_trips)]
    b = await _live(db, "b", "live", flush_at, now)
    rows = {"b first": [b, *a], "b last": [*a, b], "b second": [a[0], b, *a[1:]]}[order]
    if b_other:
        await db.execute(_PING, "other", "b", *FAR, flush_at - timedelta(seconds=1))
        rows.insert(0, await _live(db, "b", "other", flush_at, now))
    evaluator = evaluator_of(waited=True)
    per_transaction = _recording(evaluator, monkeypatch)
    assert await evaluator.evaluate(rows) == 1 + b_other + a_trips * 31
    assert len(per_transaction) >= 3  # the bounds did cut
    assert await _events_of(db, "live") == [("enter", flush_at)]
    for i in range(a_trips):
        assert await _events_of(db, f"trip_{i}") == _crossings(start, 31)
    return _waited(per_transaction, ("b", "live"))


async def test_a_read_back_cut_holds_another_orgs_live_trip_for_one_transaction(
    evaluator_of, db, monkeypatch
):
    """b's trip first in the flush; before, the read-back followed the sorted trips, so b,
    sorting after a, was deferred in every transaction until all of a's catch-up was read."""
    _scaled_down(monkeypatch)
    assert await _one_flush(db, evaluator_of, monkeypatch, "b first", 6) == 0


async def test_a_read_back_cut_holds_a_later_orgs_live_trip_for_one_transaction(
    evaluator_of, db, monkeypatch
):
    """b's trip last (requests arrive in any order; an older flush of a's catch-up is chained
    before b's): deferred, it goes first in the next transaction, b having been given no
    rows (before: behind a's remaining trips in every transaction, in the 5th of 5)."""
    _scaled_down(monkeypatch)
    assert await _one_flush(db, evaluator_of, monkeypatch, "b last", 10) <= 1


async def test_a_live_trip_of_an_org_that_read_back_a_ping_waits_one_transaction(
    evaluator_of, db, monkeypatch
):
    """b's other trip read back one ping in the first transaction (another pod's flush not
    evaluated yet: the usual case), a sixty: b's deferred trip goes first in the next
    (before: any row read put b with a, and its event was stored in the third)."""
    _scaled_down(monkeypatch)
    assert await _one_flush(db, evaluator_of, monkeypatch, "b last", 10, b_other=True) <= 1


async def test_a_read_back_cut_and_a_walk_cut_hold_another_orgs_live_trip_for_one(
    evaluator_of, db, monkeypatch
):
    """The first transaction is cut by the read-back bound after b's trip and by the events
    bound in a's first trip: b's trip, read but not walked, goes first in the next (before:
    after the trips the read-back deferred, deferred again there, stored in the third)."""
    _scaled_down(monkeypatch, events=10)
    assert await _one_flush(db, evaluator_of, monkeypatch, "b second", 10) <= 1


async def test_a_walk_cut_over_several_trips_holds_a_later_orgs_live_trip_for_one(
    evaluator_of, db, monkeypatch
):
    """No read-back cut, the events bound cuts each transaction in one of a's three trips:
    b's trip, given no work, goes first in the next (before: the flush's order, so it waited
    behind every one of a's trips, stored in the 4th transaction)."""
    monkeypatch.setattr(geofence_events, "EVENTS_PER_TRANSACTION", 10)
    assert await _one_flush(db, evaluator_of, monkeypatch, "b last", 3) <= 1


async def _flooding(db, org: str, trip: str, start: datetime, now: datetime, n: int) -> list:
    """A trip of ``org`` whose ``n`` flushed pings go in and out of the circle (one event
    each), none to read back: its flush rows."""
    await db.execute(_STATE, org, trip, start - timedelta(minutes=1), now)
    rows = []
    for k in range(n):
        lat, lon = INSIDE if k % 2 == 0 else FAR
        at = start + timedelta(seconds=k)
        await db.execute(_PING, trip, org, lat, lon, at)
        rows.append((trip, "drv_1", org, lat, lon, None, None, None, None, at, None))
    return rows


async def test_a_trip_read_back_and_not_walked_waits_for_one_transaction_of_a_flood(
    evaluator_of, db, monkeypatch
):
    """Org f floods (one event per transaction, scaled down: it walks one ping in each); org
    s's trip after it reads back 2 pings and is not walked. f, having made the events that
    cut, goes last: s's event is in the second transaction (before, when orgs were ordered
    by rows read plus pings walked, s's 2 rows put it after f's 1 ping every time: it
    waited for all 20 of f's transactions)."""
    monkeypatch.setattr(geofence_events, "EVENTS_PER_TRANSACTION", 1)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "f", now - timedelta(hours=3))
    await circle_of(db, "s", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    rows = await _flooding(db, "f", "flood", start, now, 20)
    rows.append(await _catching_up(db, "s", "slow", start, now, n=2))
    evaluator = evaluator_of(waited=True)
    per_transaction = _recording(evaluator, monkeypatch)
    assert await evaluator.evaluate(rows) == 20 + 3
    assert await _events_of(db, "flood") == _crossings(start, 20)
    assert await _events_of(db, "slow") == _crossings(start, 3)
    assert _waited(per_transaction, ("s", "slow")) <= 1


async def test_an_orgs_trip_waits_for_one_transaction_of_a_flood_cutting_on_a_tie(
    evaluator_of, db, monkeypatch
):
    """Org g's first trip makes one event, org f's flood one and cuts (scaled down to 2
    events); g's second trip, last, is not walked. On the tie the org cut short goes last:
    g's second event is in the second transaction (before: g's 2 rows of work against f's 1
    ping put f first again, and g waited for two of f's transactions)."""
    monkeypatch.setattr(geofence_events, "EVENTS_PER_TRANSACTION", 2)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "f", now - timedelta(hours=3))
    await circle_of(db, "g", now - timedelta(hours=3))
    start = now - timedelta(minutes=10)
    g1 = await _catching_up(db, "g", "one", start, now, n=1)
    flood = await _flooding(db, "f", "flood", start, now, 8)
    g2 = await _live(db, "g", "two", start, now)
    evaluator = evaluator_of(waited=True)
    per_transaction = _recording(evaluator, monkeypatch)
    assert await evaluator.evaluate([g1, *flood, g2]) == 1 + 8 + 1
    assert await _events_of(db, "flood") == _crossings(start, 8)
    assert _waited(per_transaction, ("g", "two")) <= 1
