"""Partition lifecycle: the partitions command, months ahead, retention with detach
CONCURRENTLY under load, the maintenance advisory lock, batch-id expiry, partition metrics."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY

from ingest import maintenance, metrics, partitions
from ingest.constants import MAINTENANCE_LOCK_ID
from ingest.partitions import add_months, month_start, partition_name

from .conftest import auth, batch, run_cli, state_reached

PING = "/api/v1/tracking/ping"


def this_month() -> date:
    return month_start(datetime.now(UTC))


def mid(month: date, i: int = 0) -> datetime:
    """A timestamp inside ``month`` (the 10th, plus ``i`` seconds)."""
    return datetime(month.year, month.month, 10, tzinfo=UTC) + timedelta(seconds=i)


async def insert(conn: asyncpg.Connection, month: date, n: int, trip: str = "trip_p") -> None:
    await conn.executemany(
        'INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude", "longitude",'
        " \"timestamp\") VALUES ('org_1', $1, 'drv_1', 1.0, 2.0, $2)",
        [(trip, mid(month, i)) for i in range(n)],
    )


async def names(conn: asyncpg.Connection) -> set[str]:
    return await partitions.existing(conn)


async def count(conn: asyncpg.Connection, month: date | None = None) -> int:
    if month is None:
        return int(await conn.fetchval('SELECT count(*) FROM "TripLocation"'))
    return int(await conn.fetchval(f'SELECT count(*) FROM "{partition_name(month)}"'))


async def old_partitions(db: asyncpg.Connection, ages: range, rows: int = 3) -> list[date]:
    """Partitions ``ages`` months before this one, each with ``rows`` rows."""
    months = [add_months(this_month(), -a) for a in ages]
    await partitions.ensure(db, months)
    for m in months:
        await insert(db, m, rows)
    return months


async def test_partitions_command_shows_month_rows_and_size(database, db):
    now = this_month()
    await old_partitions(db, range(1, 2), rows=0)  # the previous month, empty
    await insert(db, now, 120)
    await insert(db, add_months(now, -1), 7)
    await db.execute('ANALYZE "TripLocation"')
    result = await asyncio.to_thread(run_cli, "partitions", DATABASE_URL=database)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["partition", "month", "rows", "(est.)", "size"]
    shown = {}
    for line in lines[1:]:
        name, month, rows, size, unit = line.split()
        assert re.fullmatch(r"\d{4}-\d{2}", month) and name.endswith(month.replace("-", "_"))
        assert unit in ("B", "kB", "MB", "GB") and int(size) > 0
        shown[name] = int(rows)
    assert set(shown) == await names(db)
    assert shown[partition_name(now)] == 120
    assert shown[partition_name(add_months(now, -1))] == 7
    assert shown[partition_name(add_months(now, 1))] == 0
    # The command never changes anything without --maintain.
    assert await names(db) == set(shown)


async def test_partitions_maintain_creates_ahead_and_drops_past_retention(database, db):
    old = await old_partitions(db, range(5, 7))
    result = await asyncio.to_thread(
        run_cli, "partitions", "--maintain", DATABASE_URL=database,
        RETENTION_MONTHS="3", PARTITIONS_AHEAD_MONTHS="4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for m in old:
        assert f"dropped {partition_name(m)}" in result.stdout
    ahead = [partition_name(add_months(this_month(), k)) for k in (3, 4)]
    for name in ahead:
        assert f"created {name}" in result.stdout
        assert f"\n{name} " in result.stdout  # and listed
    have = await names(db)
    assert not {partition_name(m) for m in old} & have
    assert set(ahead) <= have


async def test_months_ahead_are_created_and_the_metrics_set(make_settings, db):
    now = datetime.now(UTC)
    settings = make_settings(partitions_ahead_months=5)
    created_before = metrics.PARTITIONS_CREATED._value.get()
    done = await maintenance.run_once(db, settings, now)
    assert metrics.PARTITIONS_CREATED._value.get() - created_before == 3
    expected = {partition_name(add_months(this_month(), k)) for k in range(6)}
    assert expected <= await names(db)
    assert set(done["created"]) == {partition_name(add_months(this_month(), k)) for k in (3, 4, 5)}  # type: ignore[arg-type]
    again = await maintenance.run_once(db, settings, now)
    assert again["created"] == [] and again["dropped"] == []

    have = await names(db)
    first = min(m for m in (partitions.month_of(n) for n in have) if m is not None)
    assert metrics.PARTITIONS._value.get() == len(have)
    assert metrics.PARTITION_MONTHS_AHEAD._value.get() == 5
    oldest_age = (now - datetime(first.year, first.month, 1, tzinfo=UTC)).total_seconds()
    assert metrics.OLDEST_PARTITION_AGE._value.get() == pytest.approx(oldest_age)
    end = add_months(this_month(), 6)
    ahead_s = (datetime(end.year, end.month, 1, tzinfo=UTC) - now).total_seconds()
    assert metrics.NEWEST_PARTITION_AHEAD._value.get() == pytest.approx(ahead_s)
    # The same values on /metrics, as Prometheus reads them.
    assert REGISTRY.get_sample_value("ingest_partition_months_ahead") == 5
    assert REGISTRY.get_sample_value("ingest_partitions") == len(have)


async def test_months_ahead_counts_only_consecutive_months():
    now = datetime(2026, 11, 25, tzinfo=UTC)
    have = {date(2026, 11, 1), date(2026, 12, 1), date(2027, 2, 1)}
    assert maintenance.months_ahead(have, now) == 1
    assert maintenance.months_ahead({date(2026, 11, 1)}, now) == 0


async def test_retention_drops_old_months_keeps_recent_and_future(make_settings, db):
    old = await old_partitions(db, range(1, 7))  # 1 to 6 months ago, 3 rows each
    await insert(db, this_month(), 5)
    before = await names(db)
    dropped_before = metrics.PARTITIONS_DROPPED._value.get()
    done = await maintenance.run_once(db, make_settings(retention_months=2))
    assert metrics.PARTITIONS_DROPPED._value.get() - dropped_before == 4
    dropped = {partition_name(add_months(this_month(), -a)) for a in (3, 4, 5, 6)}
    assert set(done["dropped"]) == dropped  # type: ignore[arg-type]
    assert await names(db) == before - dropped
    for a in (1, 2):
        assert await count(db, old[a - 1]) == 3
    assert await count(db, this_month()) == 5
    assert partition_name(add_months(this_month(), 2)) in await names(db)  # future kept
    for name in dropped:  # dropped, not just detached
        assert await db.fetchval("SELECT to_regclass($1)", f'"{name}"') is None


async def test_retention_never_drops_a_month_inside_the_accepted_window(db):
    # RETENTION_MONTHS=1 on March 1st: the cutoff is February, but pings up to 31 days old
    # (from January 29th) are still accepted, so January stays.
    now = datetime(2026, 3, 1, 6, tzinfo=UTC)
    months = [date(2025, 12, 1), date(2026, 1, 1), date(2026, 2, 1)]
    await partitions.ensure(db, months)
    keep_from = month_start(now - timedelta(days=31))
    dropped = await partitions.drop_expired(db, now, 1, keep_from)
    assert dropped == ["TripLocation_2025_12"]
    assert {"TripLocation_2026_01", "TripLocation_2026_02"} <= await names(db)
    assert await partitions.drop_expired(db, now, 0) == []  # 0 keeps everything


async def _wait_until_blocked(admin: asyncpg.Connection, pid: int) -> None:
    for _ in range(200):
        state = await admin.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
        )
        if state == "Lock":
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the detach never waited")


async def test_inserts_during_the_drop_are_not_blocked_and_not_lost(
    make_client, make_settings, database, db
):
    """DETACH CONCURRENTLY waits for the transactions using the table; meanwhile new
    inserts into the current month (through the service and directly) go on unblocked."""
    client = await make_client()
    old = await old_partitions(db, range(3, 6))
    # A writer in the middle of a transaction when the drop starts.
    holder = await asyncpg.connect(database)
    tx = holder.transaction()
    await tx.start()
    await insert(holder, this_month(), 1, trip="held")
    dropper = await asyncpg.connect(database)
    writer = await asyncpg.connect(database)
    try:
        pid = dropper.get_server_pid()
        drop = asyncio.create_task(maintenance.run_once(dropper, make_settings(retention_months=2)))
        await _wait_until_blocked(db, pid)
        # While the detach waits: plain inserts, service pings and reads all go through.
        async with asyncio.timeout(5):
            for i in range(10):
                await insert(writer, this_month(), 1, trip=f"direct_{i}")
            bodies = [batch(4, trip=f"svc_{i}") for i in range(5)]
            acks = await asyncio.gather(
                *(client.post(PING, json=b, headers=auth()) for b in bodies)
            )
            assert [r.status for r in acks] == [200] * 5
            assert sum([(await r.json())["accepted"] for r in acks]) == 20
            assert await writer.fetchval('SELECT count(*) FROM "TripLocation"') >= 30
        assert not drop.done()  # still waiting for the open transaction
        await tx.commit()
        done = await asyncio.wait_for(drop, 10)
    finally:
        await holder.close()
        await dropper.close()
        await writer.close()
    assert set(done["dropped"]) == {partition_name(m) for m in old}  # type: ignore[arg-type]
    assert await count(db, this_month()) == 1 + 10 + 20
    assert await count(db) == 31  # the old months' 9 rows went with their partitions


async def test_an_interrupted_detach_is_finished_on_the_next_run(database, db):
    (old,) = await old_partitions(db, range(4, 5))
    name = partition_name(old)
    holder = await asyncpg.connect(database)
    detacher = await asyncpg.connect(database)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.fetchval('SELECT count(*) FROM "TripLocation"')
        task = asyncio.create_task(
            detacher.execute(f'ALTER TABLE "TripLocation" DETACH PARTITION "{name}" CONCURRENTLY')
        )
        await _wait_until_blocked(db, detacher.get_server_pid())
        await db.execute("SELECT pg_cancel_backend($1)", detacher.get_server_pid())
        with pytest.raises(asyncpg.QueryCanceledError):
            await task
        await tx.commit()
    finally:
        await holder.close()
        await detacher.close()
    assert await db.fetchval(
        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = $1::regclass", f'"{name}"'
    )
    assert await partitions.drop_expired(db, datetime.now(UTC), 2) == [name]
    assert name not in await names(db)


async def test_maintenance_waits_for_nobody_while_another_holds_the_lock(
    make_settings, database, db
):
    old = await old_partitions(db, range(4, 6))
    other = await asyncpg.connect(database)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK_ID)
        async with asyncio.timeout(5):
            done = await maintenance.run_once(db, make_settings(retention_months=2))
        assert done["dropped"] == [] and done["batch_ids_expired"] == 0
        assert {partition_name(m) for m in old} <= await names(db)
        await other.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_ID)
    finally:
        await other.close()
    done = await maintenance.run_once(db, make_settings(retention_months=2))
    assert set(done["dropped"]) == {partition_name(m) for m in old}  # type: ignore[arg-type]


async def test_concurrent_maintenance_from_two_connections_is_safe(make_settings, database, db):
    old = await old_partitions(db, range(3, 8))
    settings = make_settings(retention_months=2, partitions_ahead_months=6)
    conns = [await asyncpg.connect(database) for _ in range(2)]
    try:
        results = await asyncio.gather(*(maintenance.run_once(c, settings) for c in conns))
    finally:
        for c in conns:
            await c.close()
    created = [n for r in results for n in r["created"]]  # type: ignore[attr-defined]
    dropped = [n for r in results for n in r["dropped"]]  # type: ignore[attr-defined]
    assert sorted(created) == sorted(
        {partition_name(add_months(this_month(), k)) for k in (3, 4, 5, 6)}
    )  # each once
    assert len(dropped) == len(set(dropped))
    # A pod that found the lock taken leaves the rest to the next run; nothing is left after it.
    await maintenance.run_once(db, settings)
    assert not {partition_name(m) for m in old} & await names(db)
    assert (
        maintenance.months_ahead(
            {m for m in map(partitions.month_of, await names(db)) if m}, datetime.now(UTC)
        )
        == 6
    )


async def test_batch_ids_expire_and_pings_stay_deduplicated(make_client, make_settings, db):
    runs = metrics.MAINTENANCE_RUNS.labels("ok")
    started = runs._value.get()
    client = await make_client()
    # The pod's own maintenance runs at its start, and expires batch ids too: the rows below
    # are made once it is done (under load it ran after them, and left 1 of 3 to expire here).
    await state_reached(lambda: runs._value.get() > started, timeout=30)
    body = batch(3)
    first = await client.post(PING, json=body, headers=auth())
    assert (await first.json())["accepted"] == 3
    await db.execute(
        'INSERT INTO "IngestBatch" ("driverId", "batchId", "createdAt") VALUES'
        " ('drv_9', 'old_1', now() - interval '80 hours'),"
        " ('drv_9', 'old_2', now() - interval '73 hours'),"
        " ('drv_9', 'recent', now() - interval '71 hours')"
    )
    await db.execute(
        """UPDATE "IngestBatch" SET "createdAt" = now() - interval '100 hours'
           WHERE "batchId" = $1""",
        body["batchId"],
    )
    before = metrics.BATCH_IDS_EXPIRED._value.get()
    done = await maintenance.run_once(db, make_settings(batch_id_ttl_hours=72))
    assert done["batch_ids_expired"] == 3
    assert metrics.BATCH_IDS_EXPIRED._value.get() - before == 3
    left = {r[0] for r in await db.fetch('SELECT "batchId" FROM "IngestBatch"')}
    assert left == {"recent"}
    # The replay is no longer known by its batch id, but its pings are still not stored twice.
    replay = await client.post(PING, json=body, headers=auth())
    assert await replay.json() == {
        "batchId": body["batchId"], "accepted": 0, "duplicates": 3, "rejected": [],
    }  # fmt: skip
    assert await count(db) == 3


async def test_flush_ids_expire_by_range(make_settings, db):
    """The rows flushes write to resolve a lost COMMIT reply are kept a few hours only."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    old = (now_ms - maintenance.FLUSH_ID_TTL_S * 1000 - 60_000) << 20
    recent = (now_ms - 60_000) << 20 | 5
    await db.executemany('INSERT INTO "IngestFlush" ("id") VALUES ($1)', [(old,), (recent,)])
    await maintenance.run_once(db, make_settings())
    assert [r[0] for r in await db.fetch('SELECT "id" FROM "IngestFlush"')] == [recent]


_INDEXES = """
SELECT ic.relname, pg_relation_size(ic.oid), x.indisvalid FROM pg_index x
JOIN pg_class ic ON ic.oid = x.indexrelid WHERE x.indrelid = to_regclass($1) ORDER BY 1
"""


async def test_a_closed_month_s_index_is_rebuilt_once_and_keeps_its_guard(
    make_settings, database, db
):
    now = datetime.now(UTC)
    closed, live = add_months(this_month(), -3), this_month()  # ended > MAX_PING_AGE_DAYS ago
    await partitions.ensure(db, [closed, live])
    name = partition_name(closed)
    # 50 trips reporting in turn, as a live month fills: each trip appends in the middle.
    rows = [("org_1", f"trip_{t:02d}", "drv_1", 1.0, 2.0, mid(closed, i))
            for i in range(300) for t in range(50)]  # fmt: skip
    await db.copy_records_to_table(
        "TripLocation", records=rows,
        columns=["orgId", "tripId", "driverId", "latitude", "longitude", "timestamp"],
    )  # fmt: skip
    # What an interrupted REINDEX CONCURRENTLY leaves: an invalid copy (here a build refused
    # for real: the column is not unique).
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{name}_x_ccnew" ON "{name}" ("orgId")')
    indexes = await db.fetch(_INDEXES, f'"{name}"')
    assert [r[2] for r in indexes] == [True, False]
    index, before = indexes[0][0], indexes[0][1]

    # A month about to be dropped (past RETENTION_MONTHS) is not worth it.
    assert await maintenance.pack_closed(make_settings(retention_months=2), now) is None
    packed_before = metrics.PARTITIONS_PACKED._value.get()
    # The rebuild waits for every older transaction (here one holding a snapshot for longer
    # than any statement timeout the pods use), and finishes once it has ended.
    blocker = await asyncpg.connect(database)
    await blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    await blocker.fetchval('SELECT count(*) FROM "IngestFlush"')
    packing = asyncio.ensure_future(
        maintenance.pack_closed(make_settings(flush_timeout_s=0.5), now)
    )
    await asyncio.sleep(1.5)
    assert not packing.done()
    await blocker.execute("COMMIT")
    await blocker.close()
    assert await asyncio.wait_for(packing, 30) == name
    assert metrics.PARTITIONS_PACKED._value.get() == packed_before + 1
    [(same, after, valid)] = await db.fetch(_INDEXES, f'"{name}"')  # the leftover is gone
    assert same == index and valid and after < before * 0.8, (before, after)
    assert (
        await db.fetchval("SELECT obj_description(to_regclass($1), 'pg_class')", f'"{name}"')
        == maintenance.PACKED
    )
    assert await db.fetchval(
        "SELECT obj_description(to_regclass($1), 'pg_class')", f'"{partition_name(live)}"'
    ) is None  # fmt: skip
    assert await maintenance.pack_closed(make_settings(), now) is None  # done already
    # Still the guard of the parent's key: the same ping is refused, in the parent's name.
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            'INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude", "longitude",'
            " \"timestamp\") VALUES ('org_1', 'trip_07', 'drv_1', 0, 0, $1)", mid(closed, 5),
        )  # fmt: skip
    assert await db.fetchval(
        'SELECT count(*) FROM "TripLocation" WHERE "orgId" = $1 AND "tripId" = $2', "org_1", "trip_07"
    ) == 300  # fmt: skip


async def test_retention_forgets_geofence_states_last_evaluated_before_the_first_month_kept(
    make_settings, db
):
    now = datetime.now(UTC)
    first_kept = add_months(this_month(), -2)
    first_kept_at = datetime(first_kept.year, first_kept.month, 1, tzinfo=UTC)
    states = [  # (org, trip, last evaluated): the same trip id in two orgs
        ("org_a", "trip_1", first_kept_at - timedelta(seconds=1)),
        ("org_b", "trip_1", now),
        ("org_a", "trip_2", first_kept_at + timedelta(seconds=1)),
    ]
    await db.executemany(
        'INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside", "updatedAt")'
        " VALUES ($1, $2, $3, '{gf_x}', $3)",
        states,
    )
    kept_forever = await maintenance.run_once(db, make_settings(retention_months=0))
    assert kept_forever["geofence_states_expired"] == 0
    before = metrics.GEOFENCE_STATES_EXPIRED._value.get()
    done = await maintenance.run_once(db, make_settings(retention_months=2))
    assert done["geofence_states_expired"] == 1
    assert metrics.GEOFENCE_STATES_EXPIRED._value.get() - before == 1
    left = await db.fetch('SELECT "orgId", "tripId" FROM "GeofenceState" ORDER BY 1, 2')
    assert [tuple(r) for r in left] == [("org_a", "trip_2"), ("org_b", "trip_1")]


async def test_retention_forgets_the_owner_of_a_trip_with_no_ping_left(
    make_client, make_settings, db
):
    """A trip created before the first month kept loses its owner, and its geofence state, once
    none of its pings is left; the same trip id in another org, and an old trip that still has
    pings, keep theirs. The forgotten trip id is then free: another driver of its org can start
    it, from no fence state."""
    client = await make_client()
    old = datetime(*add_months(this_month(), -3).timetuple()[:3], tzinfo=UTC)
    # org_1/trip_old: old, no ping. org_2/trip_old: same id, old, with pings (posted below).
    # org_1/trip_long: old, with pings. org_1/trip_new: no ping, created now.
    for org in ("org_1", "org_2"):
        r = await client.post(PING, json=batch(2, trip="trip_old"), headers=auth(org=org))
        assert r.status == 200
    r = await client.post(PING, json=batch(2, trip="trip_long"), headers=auth())
    assert r.status == 200
    await db.execute(
        """INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId") VALUES
           ('org_1', 'trip_new', 'drv_1')"""
    )
    await db.execute(
        """UPDATE "IngestTrip" SET "createdAt" = $1 WHERE "tripId" IN ('trip_old', 'trip_long')""",
        old,
    )
    await db.execute(
        """DELETE FROM "TripLocation" WHERE "orgId" = 'org_1' AND "tripId" = 'trip_old'"""
    )
    # Geofence states evaluated lately (a late upload, say): each goes with its trip's owner only.
    await db.execute(
        """INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside") VALUES
           ('org_1', 'trip_old', now(), '{gf_depot}'), ('org_2', 'trip_old', now(), '{gf_depot}'),
           ('org_1', 'trip_long', now(), '{gf_depot}')"""
    )
    kept_forever = await maintenance.run_once(db, make_settings(retention_months=0))
    assert kept_forever["trips_expired"] == 0
    before = metrics.TRIPS_EXPIRED._value.get()
    states_before = metrics.GEOFENCE_STATES_EXPIRED._value.get()
    done = await maintenance.run_once(db, make_settings(retention_months=2))
    assert done["trips_expired"] == 1 and done["geofence_states_expired"] == 1
    assert metrics.TRIPS_EXPIRED._value.get() - before == 1
    assert metrics.GEOFENCE_STATES_EXPIRED._value.get() - states_before == 1
    left = await db.fetch('SELECT "orgId", "tripId" FROM "IngestTrip" ORDER BY 1, 2')
    assert [tuple(r) for r in left] == [
        ("org_1", "trip_long"), ("org_1", "trip_new"), ("org_2", "trip_old"),
    ]  # fmt: skip
    states = await db.fetch('SELECT "orgId", "tripId" FROM "GeofenceState" ORDER BY 1, 2')
    assert [tuple(r) for r in states] == [("org_1", "trip_long"), ("org_2", "trip_old")]
    # Free in org_1 now; still drv_1's in org_2, where drv_2 is refused.
    r = await client.post(PING, json=batch(1, trip="trip_old", driver="drv_2"),
                          headers=auth(sub="drv_2"))  # fmt: skip
    assert r.status == 200, await r.text()
    r = await client.post(PING, json=batch(1, trip="trip_old", driver="drv_2"),
                          headers=auth(sub="drv_2", org="org_2"))  # fmt: skip
    assert r.status == 403
    owners = await db.fetch(
        """SELECT "orgId", "driverId" FROM "IngestTrip" WHERE "tripId" = 'trip_old' ORDER BY 1"""
    )
    assert [tuple(r) for r in owners] == [("org_1", "drv_2"), ("org_2", "drv_1")]


async def test_trip_expiry_skips_a_trip_a_flush_holds(make_settings, db, database):
    """A flush holds its trips' owners FOR SHARE until it commits: maintenance leaves such a
    trip alone (SKIP LOCKED) instead of waiting, and forgets it on a later run."""
    old = datetime(*add_months(this_month(), -3).timetuple()[:3], tzinfo=UTC)
    await db.execute(
        'INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId", "createdAt")'
        " VALUES ('org_1', 'trip_held', 'drv_1', $1), ('org_1', 'trip_free', 'drv_1', $1)",
        old,
    )
    flush = await asyncpg.connect(database)
    try:
        tx = flush.transaction()
        await tx.start()
        await flush.execute("""SELECT 1 FROM "IngestTrip" WHERE "tripId" = 'trip_held' FOR SHARE""")
        done = await asyncio.wait_for(
            maintenance.run_once(db, make_settings(retention_months=2)), 10
        )
        assert done["trips_expired"] == 1
        await tx.commit()
    finally:
        await flush.close()
    again = await maintenance.run_once(db, make_settings(retention_months=2))
    assert again["trips_expired"] == 1
    assert await db.fetchval('SELECT count(*) FROM "IngestTrip"') == 0


async def test_trip_expiry_reads_the_table_in_pages(make_settings, db):
    """More old trips than one page (_EXPIRE_CHUNK): every page is looked at once, in key
    order, and what has pings is kept wherever it falls."""
    old = datetime(*add_months(this_month(), -3).timetuple()[:3], tzinfo=UTC)
    n = 2 * maintenance._EXPIRE_CHUNK + 500
    await db.execute(
        'INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId", "createdAt")'
        " SELECT 'org_' || (i % 3), 'trip_' || lpad(i::text, 6, '0'), 'drv_1', $1"
        " FROM generate_series(1, $2) i",
        old,
        n,
    )
    kept = [("org_1", "trip_000001"), ("org_2", "trip_010001"), (f"org_{n % 3}", f"trip_{n:06d}")]
    for org, trip in kept:
        await db.execute(
            'INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude", "longitude",'
            " \"timestamp\") VALUES ($1, $2, 'drv_1', 1.0, 2.0, now())",
            org,
            trip,
        )
    done = await maintenance.run_once(db, make_settings(retention_months=2))
    assert done["trips_expired"] == n - len(kept)
    left = await db.fetch('SELECT "orgId", "tripId" FROM "IngestTrip" ORDER BY 1, 2')
    assert [tuple(r) for r in left] == sorted(kept)
    again = await maintenance.run_once(db, make_settings(retention_months=2))
    assert again["trips_expired"] == 0
