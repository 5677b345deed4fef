"""Migrations (ingest/migrate.py): `python -m ingest migrate` applies each file once, pods that
start together are serialised; migration 003 (org-scoped keys, trip owners) on a database with
rows in the old schema: nothing lost, nothing merged, and the new guards hold afterwards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from ingest import partitions
from ingest.constants import MIGRATION_LOCK_ID
from ingest.migrate import migrate, migration_files

from .conftest import PG_URL, db_url, run_cli
from .old_schema import old_schema_database

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
async def old_db(tmp_path: Path) -> AsyncIterator[asyncpg.Connection]:
    """A database at the schema before tenancy, with a partition for each month ROWS fall in."""
    async with old_schema_database(tmp_path) as (conn, _):
        # From the rows themselves: a fixed offset missed a month when CI ran at 00:03 on the 6th.
        months = {partitions.month_start(T0 + timedelta(minutes=row[3])) for row in ROWS}
        await partitions.ensure(conn, sorted(months))
        yield conn


ROWS = [
    # org, trip, driver, minutes after T0, batch
    ("org_a", "trip_1", "drv_1", 0, "b1"),
    ("org_a", "trip_1", "drv_1", 1, "b1"),
    ("org_a", "trip_1", "drv_2", 2, "b2"),  # a second driver later: the first one owns it
    ("org_b", "trip_2", "drv_1", 0, "b9"),  # drv_1 in org_b too
    ("org_b", "trip_3", "drv_3", -60 * 24 * 35, "b3"),  # in last month's partition
    (None, "legacy", "drv_x", 5, None),  # imported without an org
]


async def _insert_old(conn: asyncpg.Connection) -> None:
    await conn.executemany(
        """INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude", "longitude",
           "timestamp", "batchId") VALUES ($1, $2, $3, 1.0, 2.0, $4, $5)""",
        [(o, t, d, T0 + timedelta(minutes=m), b) for o, t, d, m, b in ROWS],
    )
    await conn.executemany(
        'INSERT INTO "IngestBatch" ("driverId", "batchId") VALUES ($1, $2)',
        [("drv_1", "b1"), ("drv_2", "b2"), ("drv_1", "b9"), ("drv_3", "b3"),
         ("drv_3", "b_all_dups"), ("drv_1", "b_ambiguous"), ("drv_nobody", "b_unknown")],
    )  # fmt: skip


async def test_003_moves_rows_in_place_and_scopes_the_guards(old_db: asyncpg.Connection) -> None:
    conn = old_db
    await _insert_old(conn)
    before = await conn.fetch(
        'SELECT "orgId", "tripId", "driverId", "timestamp", "batchId" FROM "TripLocation" ORDER BY 2, 4'
    )
    applied = await migrate(conn)
    assert "003_org_scoped_keys.sql" in applied

    after = await conn.fetch(
        'SELECT "orgId", "tripId", "driverId", "timestamp", "batchId" FROM "TripLocation" ORDER BY 2, 4'
    )
    assert len(after) == len(before) == len(ROWS)  # nothing lost, nothing merged
    assert [tuple(r)[1:] for r in after] == [tuple(r)[1:] for r in before]
    assert {r["orgId"] for r in after if r["tripId"] == "legacy"} == {""}

    batches = {
        (r["driverId"], r["batchId"]): r["orgId"]
        for r in await conn.fetch('SELECT "orgId", "driverId", "batchId" FROM "IngestBatch"')
    }
    assert batches == {
        ("drv_1", "b1"): "org_a",  # from the rows the batch stored
        ("drv_2", "b2"): "org_a",
        ("drv_1", "b9"): "org_b",
        ("drv_3", "b3"): "org_b",
        ("drv_3", "b_all_dups"): "org_b",  # drv_3 is known in one org only
        ("drv_1", "b_ambiguous"): "",  # drv_1 is in two orgs: unattributed
        ("drv_nobody", "b_unknown"): "",
    }
    owners = {
        (r["orgId"], r["tripId"]): r["driverId"]
        for r in await conn.fetch('SELECT "orgId", "tripId", "driverId" FROM "IngestTrip"')
    }
    assert owners == {
        ("org_a", "trip_1"): "drv_1",
        ("org_b", "trip_2"): "drv_1",
        ("org_b", "trip_3"): "drv_3",
        ("", "legacy"): "drv_x",
    }

    # The guard is per org now: org_b may store org_a's (trip, timestamp); org_a may not twice.
    insert = """INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude",
                "longitude", "timestamp") VALUES ($1, 'trip_1', 'drv_1', 0, 0, $2)"""
    await conn.execute(insert, "org_b", T0)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(insert, "org_a", T0)
    with pytest.raises(asyncpg.NotNullViolationError):
        await conn.execute(insert, None, T0 + timedelta(seconds=1))
    # Partitions created after the migration get the new guard too.
    await partitions.ensure(conn, [partitions.add_months(partitions.month_start(T0), 1)])
    later = partitions.add_months(partitions.month_start(T0), 1)
    ts = datetime(later.year, later.month, 2, tzinfo=UTC)
    await conn.execute(insert, "org_a", ts)
    await conn.execute(insert, "org_b", ts)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(insert, "org_b", ts)
    # Batch ids per org: the same driver and batch id in another org is a new claim.
    await conn.execute(
        """INSERT INTO "IngestBatch" ("orgId", "driverId", "batchId") VALUES ('org_b', 'drv_1', 'b1')"""
    )
    # The CHECKs that proved NOT NULL are gone; the old guard is gone.
    names = {r[0] for r in await conn.fetch("SELECT conname FROM pg_constraint")}
    assert not [n for n in names if n.endswith("_orgId_not_null")]
    assert "TripLocation_tripId_timestamp_key" not in names


_BATCH_INDEXES = """
SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE a.attname = 'batchId' AND i.indrelid IN (
    SELECT 'public."TripLocation"'::regclass
    UNION ALL SELECT inhrelid FROM pg_inherits WHERE inhparent = 'public."TripLocation"'::regclass)
"""


async def test_005_drops_the_batch_id_index_everywhere_and_keeps_the_column(
    old_db: asyncpg.Connection,
) -> None:
    conn = old_db
    await _insert_old(conn)
    assert len(await conn.fetch(_BATCH_INDEXES)) == 3  # the parent's and both partitions'
    applied = await migrate(conn)
    assert "005_drop_batch_index.sql" in applied
    assert await conn.fetch(_BATCH_INDEXES) == []
    stored = await conn.fetch('SELECT "batchId" FROM "TripLocation" ORDER BY "batchId"')
    assert [r[0] for r in stored] == [*sorted(b for *_, b in ROWS if b), None]
    # A partition made afterwards has none either.
    later = partitions.add_months(partitions.month_start(T0), 1)
    await partitions.ensure(conn, [later])
    assert await conn.fetch(_BATCH_INDEXES) == []
    assert await migrate(conn) == []


async def test_003_resumes_after_an_interrupted_prepare(old_db: asyncpg.Connection) -> None:
    """A pod killed halfway through the concurrent index build leaves an invalid index and a
    half-made CHECK: running the migration again finishes the job."""
    conn = old_db
    await _insert_old(conn)
    part = partitions.partition_name(partitions.month_start(T0))
    await conn.execute(
        f'ALTER TABLE "{part}" ADD CONSTRAINT "{part}_orgId_not_null" CHECK ("orgId" IS NOT NULL) NOT VALID'
    )
    await conn.execute(f'UPDATE "{part}" SET "orgId" = \'\' WHERE "orgId" IS NULL')
    await conn.execute(
        f'CREATE UNIQUE INDEX "{part}_org_trip_ts_key" ON "{part}" ("orgId", "tripId", "timestamp")'
    )
    await conn.execute(  # what an interrupted CREATE INDEX CONCURRENTLY leaves behind
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass",
        f'"{part}_org_trip_ts_key"',
    )
    assert "003_org_scoped_keys.sql" in await migrate(conn)
    assert await conn.fetchval(
        "SELECT bool_and(indisvalid) FROM pg_index WHERE indexrelid::regclass::text LIKE '%org_trip_ts_key%'"
    )
    assert await conn.fetchval('SELECT count(*) FROM "TripLocation"') == len(ROWS)


@pytest.fixture
async def empty_database():
    name = f"ingest_e_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield db_url(name)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def test_migrate_applies_each_file_once_and_says_so(empty_database):
    first = await asyncio.to_thread(run_cli, "migrate", DATABASE_URL=empty_database)
    assert first.returncode == 0, first.stderr
    assert "applied 001_trip_location.sql" in first.stdout
    assert "applied 002_ingest_batch.sql" in first.stdout
    assert "created partition TripLocation_" in first.stdout
    second = await asyncio.to_thread(run_cli, "migrate", DATABASE_URL=empty_database)
    assert second.returncode == 0 and "nothing to apply" in second.stdout


async def test_concurrent_migrations_are_serialised(empty_database):
    # The test holds the lock until all four are waiting for it, so the winner builds its
    # indexes CONCURRENTLY while three others wait: a waiter blocked in pg_advisory_lock would
    # deadlock with that build (it waits for every open transaction, theirs included).
    holder = await asyncpg.connect(empty_database)
    await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    runs = asyncio.gather(
        *(asyncio.to_thread(run_cli, "migrate", DATABASE_URL=empty_database) for _ in range(4))
    )
    for _ in range(200):
        waiting = await holder.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        if waiting == 4:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    await holder.close()
    results = await runs
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    files = len(migration_files())
    applied = sum(r.stdout.count("applied 0") for r in results)
    assert applied == files  # each file once, whichever pod got there first
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval('SELECT count(*) FROM "_ingest_migrations"') == files
    finally:
        await conn.close()
