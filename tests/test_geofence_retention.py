"""Retention of geofence events (ingest/maintenance.py): with RETENTION_MONTHS set, events older
than the first month kept go with the pings of their month, by time alone, in chunks; without
it, none goes. And a fence's events deleted in chunks before the fence itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest import maintenance, metrics
from ingest.partitions import add_months, month_start

RETENTION = 2  # months kept before this one; the accepted ping window (31 days) is within them


def first_kept_at() -> datetime:
    m = add_months(month_start(datetime.now(UTC)), -RETENTION)
    return datetime(m.year, m.month, 1, tzinfo=UTC)


async def fence(db: asyncpg.Connection, org: str, fence_id: str) -> None:
    await db.execute(
        'INSERT INTO "Geofence" ("orgId", "id", "name", "geometry", "radiusM", "vertices")'
        """ VALUES ($1, $2, 'depot', '{"type": "Point", "coordinates": [2, 1]}', 50, 1)""",
        org,
        fence_id,
    )


async def events(
    db: asyncpg.Connection, org: str, fence_id: str, times: Iterable[datetime], trip: str = "t1"
) -> None:
    await db.executemany(
        'INSERT INTO "GeofenceEvent" ("orgId", "geofenceId", "timestamp", "tripId", "event",'
        ' "driverId", "latitude", "longitude") VALUES ($1, $2, $3, $4, \'enter\', \'drv_1\', 1, 2)',
        [(org, fence_id, t, trip) for t in times],
    )


async def left(db: asyncpg.Connection) -> list[tuple[str, str, datetime]]:
    rows = await db.fetch(
        'SELECT "orgId", "geofenceId", "timestamp" FROM "GeofenceEvent" ORDER BY 1, 2, 3'
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_events_before_the_first_month_kept_go_newer_ones_stay(make_settings, db):
    """The cut-off is the partitions': the first instant of the first month kept."""
    cut = first_kept_at()
    now = datetime.now(UTC).replace(microsecond=0)
    await fence(db, "org_a", "gf_1")
    await events(db, "org_a", "gf_1", [cut - timedelta(days=40), cut - timedelta(seconds=1)])
    await events(db, "org_a", "gf_1", [cut, cut + timedelta(seconds=1), now])
    before = metrics.GEOFENCE_EVENTS_EXPIRED._value.get()
    done = await maintenance.run_once(db, make_settings(retention_months=RETENTION))
    assert done["geofence_events_expired"] == 2
    assert metrics.GEOFENCE_EVENTS_EXPIRED._value.get() - before == 2
    assert [r[2] for r in await left(db)] == [cut, cut + timedelta(seconds=1), now]
    again = await maintenance.run_once(db, make_settings(retention_months=RETENTION))
    assert again["geofence_events_expired"] == 0


async def test_events_go_by_time_alone_in_every_org(make_settings, db):
    """Two orgs, the same fence id, events at the same times: each org loses exactly its events
    older than the first month kept (the cut-off of the partitions); the rest of both stays."""
    cut = first_kept_at()
    now = datetime.now(UTC).replace(microsecond=0)
    old = [cut - timedelta(days=40), cut - timedelta(seconds=1)]
    kept = [cut, cut + timedelta(seconds=1), now]
    for org in ("org_a", "org_b"):
        await fence(db, org, "gf_1")
        await events(db, org, "gf_1", old + kept)
    await fence(db, "org_a", "gf_old")  # only old events: all go, org_b's gf_1 is untouched
    await events(db, "org_a", "gf_old", old)
    await fence(db, "org_b", "gf_new")  # only new events: all stay
    await events(db, "org_b", "gf_new", kept)
    done = await maintenance.run_once(db, make_settings(retention_months=RETENTION))
    assert done["geofence_events_expired"] == 3 * len(old)
    assert await left(db) == sorted(
        [("org_a", "gf_1", t) for t in kept]
        + [("org_b", "gf_1", t) for t in kept]
        + [("org_b", "gf_new", t) for t in kept]
    )


async def test_more_old_events_than_a_chunk_all_go_in_one_run(make_settings, db, monkeypatch):
    """Chunks of 7 events, pages of 2 fences: many chunks per page, pages with nothing old,
    a fence with no event at all; one run deletes every old event and nothing newer."""
    monkeypatch.setattr(maintenance, "EVENT_CHUNK", 7)
    monkeypatch.setattr(maintenance, "FENCE_PAGE", 2)
    cut = first_kept_at()
    new = cut + timedelta(hours=1)
    plan = {  # (org, fence): old events
        ("org_a", "gf_1"): 23, ("org_a", "gf_2"): 0, ("org_a", "gf_3"): 7,
        ("org_a", "gf_4"): 0, ("org_b", "gf_0"): 1, ("org_b", "gf_1"): 30,
    }  # fmt: skip
    for (org, fence_id), n in plan.items():
        await fence(db, org, fence_id)
        await events(db, org, fence_id, [cut - timedelta(minutes=i + 1) for i in range(n)])
        await events(db, org, fence_id, [new])
    await fence(db, "org_c", "gf_empty")
    done = await maintenance.run_once(db, make_settings(retention_months=RETENTION))
    assert done["geofence_events_expired"] == sum(plan.values())
    assert await left(db) == sorted((org, f, new) for org, f in plan)


async def test_without_retention_no_event_goes(make_settings, db):
    await fence(db, "org_a", "gf_1")
    ancient = datetime(2001, 1, 1, tzinfo=UTC)
    await events(db, "org_a", "gf_1", [ancient, first_kept_at() - timedelta(days=1)])
    before = metrics.GEOFENCE_EVENTS_EXPIRED._value.get()
    done = await maintenance.run_once(db, make_settings(retention_months=0))
    assert done["geofence_events_expired"] == 0
    assert metrics.GEOFENCE_EVENTS_EXPIRED._value.get() == before
    assert len(await left(db)) == 2


async def test_event_expiry_waits_for_no_evaluation(make_settings, db, database):
    """An evaluation's open transaction (the org's row FOR SHARE, new events inserted) neither
    blocks the expiry nor is touched by it."""
    cut = first_kept_at()
    await fence(db, "org_a", "gf_1")
    await db.execute("""INSERT INTO "GeofenceOrg" VALUES ('org_a', 1, 1, 1)""")
    await events(db, "org_a", "gf_1", [cut - timedelta(days=1)])
    evaluation = await asyncpg.connect(database)
    try:
        async with evaluation.transaction():
            await evaluation.execute(
                """SELECT 1 FROM "GeofenceOrg" WHERE "orgId" = 'org_a' FOR SHARE"""
            )
            await events(evaluation, "org_a", "gf_1", [datetime.now(UTC)], trip="t2")
            done = await asyncio.wait_for(
                maintenance.run_once(db, make_settings(retention_months=RETENTION)), 10
            )
            assert done["geofence_events_expired"] == 1
    finally:
        await evaluation.close()
    assert [r[2] > cut for r in await left(db)] == [True]


async def test_a_fence_s_events_are_deleted_in_chunks_before_the_fence(db, monkeypatch):
    """delete_fence_events: every event of that fence of that org, chunk by chunk; then the
    fence's own DELETE cascades over nothing."""
    monkeypatch.setattr(maintenance, "EVENT_CHUNK", 5)
    t0 = datetime.now(UTC).replace(microsecond=0)
    for org in ("org_a", "org_b"):
        for fence_id in ("gf_1", "gf_2"):
            await fence(db, org, fence_id)
            await events(db, org, fence_id, [t0 - timedelta(seconds=i) for i in range(12)])
    assert await maintenance.delete_fence_events(db, "org_a", "gf_1") == 12
    assert await maintenance.delete_fence_events(db, "org_a", "gf_1") == 0
    await db.execute("""DELETE FROM "Geofence" WHERE "orgId" = 'org_a' AND "id" = 'gf_1'""")
    rows = await left(db)
    assert sorted({(r[0], r[1]) for r in rows}) == [
        ("org_a", "gf_2"), ("org_b", "gf_1"), ("org_b", "gf_2"),
    ]  # fmt: skip
    assert len(rows) == 36
    async with db.transaction():
        with pytest.raises(RuntimeError):
            await maintenance.delete_fence_events(db, "org_b", "gf_1")


async def test_a_busy_fence_is_deleted_with_its_events_a_chunk_per_statement(
    client, db, monkeypatch
):
    """DELETE /api/v1/geofences/{id}: the fence's events go in chunks, each its own statement,
    before the fence's own DELETE (whose cascade alone would take them all in one statement,
    past the command timeout for a busy fence: a fence that could never be deleted)."""
    from .conftest import auth

    monkeypatch.setattr(maintenance, "EVENT_CHUNK", 5)
    circle = {"name": "depot", "geometry": {"type": "Point", "coordinates": [2, 1]}, "radiusM": 50}
    ids = {}
    for org in ("org_a", "org_b"):  # the same ids and times in another org stay
        r = await client.post(
            "/api/v1/geofences", json=circle, headers=auth("dispatcher", "d", org)
        )
        assert r.status == 201, await r.text()
        ids[org] = (await r.json())["id"]
        t0 = datetime.now(UTC).replace(microsecond=0)
        await events(db, org, ids[org], [t0 - timedelta(seconds=i) for i in range(12)])
    # Rows each DELETE statement on the events takes (the cascade's included).
    await db.execute("CREATE TABLE _deleted_per_statement (n int)")
    await db.execute(
        "CREATE FUNCTION _count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " INSERT INTO _deleted_per_statement SELECT count(*) FROM old; RETURN NULL; END $$"
    )
    await db.execute(
        'CREATE TRIGGER _count_deleted AFTER DELETE ON "GeofenceEvent" REFERENCING OLD TABLE'
        " AS old FOR EACH STATEMENT EXECUTE FUNCTION _count_deleted()"
    )
    try:
        r = await client.delete(
            f"/api/v1/geofences/{ids['org_a']}", headers=auth("dispatcher", "d", "org_a")
        )
        assert r.status == 204, await r.text()
        per_statement = [r[0] for r in await db.fetch("SELECT n FROM _deleted_per_statement")]
    finally:
        await db.execute('DROP TRIGGER _count_deleted ON "GeofenceEvent"')
        await db.execute("DROP FUNCTION _count_deleted()")
        await db.execute("DROP TABLE _deleted_per_statement")
    assert sum(per_statement) == 12 and max(per_statement) <= 5, per_statement
    assert {r[0] for r in await left(db)} == {"org_b"} and len(await left(db)) == 12
