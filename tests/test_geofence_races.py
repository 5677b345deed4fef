"""Geofence evaluations racing each other and fence changes, on the real PostgreSQL: two pods
(two apps on one database) or a test session holding a row lock where another pod's evaluation
or a fence create or delete would. Each test steers the interleaving with locks and waits for
a state (a backend blocked on a lock), never for a duration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ingest import geofence_events
from ingest.geofence_events import GeofenceEvaluator
from ingest.query import MAX_TIME
from ingest.records import Record
from ingest.typedefs import GEOFENCES

from .conftest import now_ms
from .test_geofences import (
    FENCES,
    INSIDE,
    OUTSIDE,
    dispatcher,
    drive,
    events,
    fence,
    kinds,
    settled,
)

STATE = 'SELECT "evaluatedTo", "inside" FROM "GeofenceState" WHERE "orgId" = $1 AND "tripId" = $2'
LOCK_STATE = """
SELECT 1 FROM "GeofenceState" WHERE "orgId" = $1 AND "tripId" = $2 FOR UPDATE
"""
# Backends of this database waiting for a lock that ``$1`` holds (or, $1 NULL, for any lock).
BLOCKED = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
  AND cardinality(pg_blocking_pids(pid)) > 0 AND ($1::int IS NULL OR $1 = ANY(pg_blocking_pids(pid)))
  AND NOT ($2::int IS NOT NULL AND $2 = ANY(pg_blocking_pids(pid)))
"""


@pytest.fixture
async def sessions(database: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Three more sessions on the test's database (each plays another pod or a fence change)."""
    conns = [await asyncpg.connect(database) for _ in range(3)]
    yield conns
    for c in conns:
        await c.close()


async def blocked(
    db: asyncpg.Connection, by: asyncpg.Connection | None = None,
    not_by: asyncpg.Connection | None = None, at_least: int = 1,
    unless_done: asyncio.Future[Any] | None = None,
) -> None:  # fmt: skip
    """Until ``at_least`` backends wait for a lock held by ``by`` (any holder if None) and not
    by ``not_by`` (or ``unless_done`` is done)."""
    by_pid = by.get_server_pid() if by is not None else None
    not_pid = not_by.get_server_pid() if not_by is not None else None
    for _ in range(1000):
        if unless_done is not None and unless_done.done():
            return
        # Inside a transaction, pg_stat_activity is read once and kept: read it again.
        await db.execute("SELECT pg_stat_clear_snapshot()")
        if await db.fetchval(BLOCKED, by_pid, not_pid) >= at_least:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no evaluation got blocked")


def ts(ms: int, us: int = 0) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC) + timedelta(microseconds=us)


def ping(trip: str, org: str, at: datetime, point: tuple[float, float] = OUTSIDE) -> Record:
    return (trip, "drv_1", org, point[0], point[1], None, None, None, None, at, None)


def evaluator(client: Any) -> GeofenceEvaluator:
    ev = client.server.app[GEOFENCES]
    assert isinstance(ev, GeofenceEvaluator)
    ev._fenced_at = -1e9  # look the orgs with fences up again at the next evaluation
    return ev


async def test_an_evaluation_waiting_for_a_trips_lock_sees_the_state_committed_meanwhile(
    client, db
):
    """Another pod evaluates the trip (state: evaluated to t + 1 s, inside the fence) while this
    pod's evaluation waits for the row: the waiting one must start from that state (the SELECT
    FOR UPDATE's recheck of the updated row), so its outside ping at t + 2 s is an exit."""
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    async with db.transaction():
        await db.fetchval(LOCK_STATE, "org_1", "trip_1")
        await drive(client, [OUTSIDE], t + 2000, settle=False)
        await blocked(db, by=db)
        await db.execute(
            'UPDATE "GeofenceState" SET "evaluatedTo" = $3, "inside" = $4'
            ' WHERE "orgId" = $1 AND "tripId" = $2',
            "org_1", "trip_1", ts(t + 1000), [fid],
        )  # fmt: skip
    await drive(client, [OUTSIDE], t + 3000)
    assert kinds(await events(client, fid)) == [("exit", t + 2000)]
    assert await db.fetchrow(STATE, "org_1", "trip_1") == (ts(t + 3000), [])


async def test_an_evaluation_waiting_for_a_trips_lock_never_moves_its_state_back(client, db):
    """The other pod's evaluation went past this batch (evaluated to t + 5 s): the waiting
    evaluation's ping at t + 2 s is late, makes no event and leaves the state as it is."""
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    async with db.transaction():
        await db.fetchval(LOCK_STATE, "org_1", "trip_1")
        await drive(client, [INSIDE], t + 2000, settle=False)
        await blocked(db, by=db)
        await db.execute(
            'UPDATE "GeofenceState" SET "evaluatedTo" = $3 WHERE "orgId" = $1 AND "tripId" = $2',
            "org_1", "trip_1", ts(t + 5000),
        )  # fmt: skip
    await drive(client, [OUTSIDE], t + 6000)
    assert await events(client, fid) == []
    assert await db.fetchrow(STATE, "org_1", "trip_1") == (ts(t + 6000), [])


async def test_a_trips_first_state_made_by_another_pod_meanwhile_is_the_one_used(client, db):
    """Two pods make a trip's first state at once: the other pod's (uncommitted) row is not
    seen by this evaluation's lock; it must wait for it and start from it (inside the fence,
    evaluated to t + 1 s), not from no state."""
    fid = await fence(client)
    t = now_ms(1)
    async with db.transaction():
        await db.execute(
            'INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside")'
            " VALUES ($1, $2, $3, $4)",
            "org_1", "trip_1", ts(t + 1000), [fid],
        )  # fmt: skip
        await drive(client, [OUTSIDE], t + 2000, settle=False)
        await blocked(db, by=db)
    await drive(client, [OUTSIDE], t + 3000)
    assert kinds(await events(client, fid)) == [("exit", t + 2000)]
    assert await db.fetchrow(STATE, "org_1", "trip_1") == (ts(t + 3000), [])


async def test_the_org_row_is_locked_before_the_state_rows(client, db, sessions):
    """While a fence create or delete holds the org row, an evaluation waiting for it holds
    no state row (the other order could deadlock with a change that waits for the evaluation)."""
    await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    change = sessions[0]
    async with change.transaction():
        await change.execute('SELECT 1 FROM "GeofenceOrg" WHERE "orgId" = $1 FOR UPDATE', "org_1")
        await drive(client, [INSIDE], t + 1000, settle=False)
        await blocked(db, by=change)
        async with db.transaction():
            assert await db.fetchval(LOCK_STATE + " NOWAIT", "org_1", "trip_1") == 1
    await settled(client)


async def test_the_orgs_last_fence_deleted_while_an_evaluation_waits(client, db, sessions):
    """The org's last fence is deleted while the evaluation waits for the org row: it
    evaluates nothing for that org (no event for a deleted fence, no failure)."""
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    failures = geofence_events.metrics.GEOFENCE_FAILURES._value.get()
    change = sessions[0]
    async with change.transaction():
        await change.execute('SELECT 1 FROM "GeofenceOrg" WHERE "orgId" = $1 FOR UPDATE', "org_1")
        await drive(client, [INSIDE], t + 1000, settle=False)
        await blocked(db, by=change)
        await change.execute('DELETE FROM "Geofence" WHERE "orgId" = $1', "org_1")
        await change.execute(
            'UPDATE "GeofenceOrg" SET "version" = "version" + 1, "fences" = 0, "vertices" = 0'
            ' WHERE "orgId" = $1',
            "org_1",
        )
    await drive(client, [INSIDE], t + 2000)
    assert geofence_events.metrics.GEOFENCE_FAILURES._value.get() == failures
    assert await db.fetchval('SELECT count(*) FROM "GeofenceEvent"') == 0
    assert await db.fetchrow(STATE, "org_1", "trip_1") == (ts(t), [])
    r = await client.get(f"{FENCES}/{fid}/events", headers=dispatcher())
    assert r.status == 404


async def test_a_fence_deleted_while_an_evaluation_waits_is_not_used(client, db, sessions):
    """One of two fences is deleted while the evaluation waits for the org row: the
    evaluation uses the new fence set (an event for the deleted fence would fail its key)."""
    gone = await fence(client)
    kept = await fence(client, name="Yard")
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    change = sessions[0]
    async with change.transaction():
        await change.execute('SELECT 1 FROM "GeofenceOrg" WHERE "orgId" = $1 FOR UPDATE', "org_1")
        await drive(client, [INSIDE], t + 1000, settle=False)
        await blocked(db, by=change)
        await change.execute('DELETE FROM "Geofence" WHERE "id" = $1', gone)
        await change.execute(
            'UPDATE "GeofenceOrg" SET "version" = "version" + 1, "fences" = 1 WHERE "orgId" = $1',
            "org_1",
        )
    await drive(client, [OUTSIDE], t + 2000)
    assert kinds(await events(client, kept)) == [("enter", t + 1000), ("exit", t + 2000)]
    assert await db.fetchval('SELECT count(*) FROM "GeofenceEvent"') == 2


async def test_two_pods_making_and_locking_states_in_different_orders_do_not_deadlock(
    make_client, db, sessions
):
    """Pod e evaluates trips 1, 2 and 3 (2 and 3 new); its lock statement waits for trip 1's
    row (a third pod holds it), and meanwhile pod a makes trip 3's row, then evaluates trips 2
    and 3: it locks trip 3's row and, its fence set being read (held up by a fence change),
    has not made trip 2's yet. Pod e's lock statement, its snapshot older than trip 3's row,
    locks trip 1 only; it makes trip 2's row and waits for trip 3's, held by a; a then waits
    for trip 2's, held by e. Every evaluation must take the rows in one order: no deadlock
    (PostgreSQL would end one evaluation, which then fails and is retried)."""
    # (their evaluators called here directly: in the pod's process)
    e_client = await make_client(geofence_evaluation="inline")
    await fence(e_client, org="org_1")
    await fence(e_client, org="org_2")
    a_client = await make_client(geofence_evaluation="inline")
    e, a = evaluator(e_client), evaluator(a_client)
    t = ts(now_ms(1))
    # e knows both orgs' fences (its next evaluation reads none), and trip 1 has a row.
    await e.evaluate([ping("trip_0", "org_2", t), ping("trip_1", "org_1", t)])
    other_pod, fence_change = sessions[0], sessions[1]
    t += timedelta(seconds=1)
    await other_pod.execute("BEGIN")
    await other_pod.fetchval(LOCK_STATE, "org_1", "trip_1")
    e_task = asyncio.ensure_future(
        e.evaluate([ping(trip, org, t) for org, trip in
                    [("org_1", "trip_1"), ("org_1", "trip_2"), ("org_2", "trip_3")]])
    )  # fmt: skip
    await blocked(db, by=other_pod)
    await a.evaluate([ping("trip_3", "org_2", t)])  # a's first evaluation of trip 3
    await fence_change.execute('BEGIN; LOCK TABLE "Geofence" IN ACCESS EXCLUSIVE MODE')
    a_task = asyncio.ensure_future(
        a.evaluate([ping("trip_2", "org_1", t), ping("trip_3", "org_2", t)])
    )
    await blocked(db, by=fence_change)
    await other_pod.execute("COMMIT")  # trip 1's row is free: e goes on
    await blocked(db, not_by=fence_change, unless_done=e_task)  # until e waits for a
    await fence_change.execute("COMMIT")  # a goes on (reads org_1's fences)
    results = await asyncio.gather(e_task, a_task, return_exceptions=True)
    assert results == [0, 0], results
    states = await db.fetch('SELECT "orgId", "tripId", "evaluatedTo" FROM "GeofenceState"')
    assert sorted(tuple(s) for s in states) == [
        ("org_1", "trip_1", t), ("org_1", "trip_2", t), ("org_2", "trip_0", t - timedelta(seconds=1)),
        ("org_2", "trip_3", t),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 12, 5, 3, 39, 59, 123457, UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, UTC),
        datetime(1700, 1, 1, 0, 0, 0, 1, UTC),
        datetime(2240, 12, 31, 23, 59, 59, 999999, UTC),
        MAX_TIME,
    ],
)
async def test_times_passed_as_epoch_microseconds_arrive_unchanged(db, when):
    """Every time the evaluation passes as int8 (pings within the accepted window, at most
    +-2**33 s from 1970; fence creation times; MAX_TIME for the sweep) is the same timestamptz
    in PostgreSQL."""
    sql = f"SELECT {geofence_events._US_SQL.format('$1::int8')}"
    assert await db.fetchval(sql, geofence_events._us(when)) == when
