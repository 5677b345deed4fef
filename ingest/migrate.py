"""Ordered SQL migrations (``ingest/sql/``, package data), each applied once, recorded, under an
advisory lock."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from .constants import MIGRATION_LOCK_ID

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS "_ingest_migrations" (
    "name" text PRIMARY KEY,
    "sha256" text NOT NULL,
    "appliedAt" timestamptz NOT NULL DEFAULT now()
)
"""


# A migration's statements wait this long for a lock before the file is tried again.
LOCK_TIMEOUT = "2s"
LOCK_ATTEMPTS = 60


class MigrationError(Exception):
    pass


async def _partitions(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           WHERE p.relname = 'TripLocation'
             AND p.relnamespace = to_regnamespace(current_schema())
           ORDER BY c.relname"""
    )
    return [r[0] for r in rows]


_PREPARE_SECTION = re.compile(r"^-- ingest:prepare\b.*?^-- ingest:end-prepare$", re.M | re.S)
# Existing batch ids get the org of the rows their batch stored; else the one org their
# driver id is known in; else they keep '' (docs/tenancy.md).
_BATCH_ORGS = (
    """UPDATE "IngestBatch" b SET "orgId" = t."orgId"
       FROM (SELECT DISTINCT "orgId", "driverId", "batchId" FROM "TripLocation"
             WHERE "batchId" IS NOT NULL) t
       WHERE b."orgId" = '' AND t."driverId" = b."driverId" AND t."batchId" = b."batchId"
         AND t."orgId" <> ''""",
    """UPDATE "IngestBatch" b SET "orgId" = d."orgId"
       FROM (SELECT "driverId", min("orgId") AS "orgId" FROM "TripLocation"
             GROUP BY "driverId" HAVING count(DISTINCT "orgId") = 1) d
       WHERE b."orgId" = '' AND d."driverId" = b."driverId" """,
)
_TRIP_OWNERS = """
INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId", "createdAt")
SELECT DISTINCT ON ("orgId", "tripId") "orgId", "tripId", "driverId", "createdAt"
FROM "TripLocation"
ORDER BY "orgId", "tripId", "timestamp"
ON CONFLICT DO NOTHING
"""


async def _build_index(conn: asyncpg.Connection, name: str, definition: str) -> None:
    """CREATE UNIQUE INDEX CONCURRENTLY, again if an interrupted build left it invalid."""
    valid = await conn.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f'"{name}"'
    )
    if valid is False:
        await conn.execute(f'DROP INDEX CONCURRENTLY "{name}"')
    if not valid:
        await conn.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{name}" ON {definition}')


async def prepare_003(conn: asyncpg.Connection, sql: str) -> None:
    """The slow part of 003_org_scoped_keys.sql, done without blocking ingest and outside
    any transaction (CREATE INDEX CONCURRENTLY cannot run in one), each statement taking only
    short locks. Safe to run again after a crash.

    Per partition: NULL orgIds filled, NOT NULL proven by a validated CHECK (so SET NOT NULL
    needs no scan under its exclusive lock), the new unique index built. Then the batch-id
    table gets its org column (NOT NULL DEFAULT '': no rewrite), orgs for existing records and
    the new key's index; the trip-owner table is created and filled."""
    for part in await _partitions(conn):
        check = f"{part}_orgId_not_null"
        await conn.execute(f'UPDATE "{part}" SET "orgId" = \'\' WHERE "orgId" IS NULL')
        has_check = await conn.fetchval(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2",
            f'"{part}"', check,
        )  # fmt: skip
        if has_check is None:
            await conn.execute(
                f'ALTER TABLE "{part}" ADD CONSTRAINT "{check}"'
                ' CHECK ("orgId" IS NOT NULL) NOT VALID'
            )
        if not has_check:
            # SHARE UPDATE EXCLUSIVE: reads and writes go on while it scans.
            await conn.execute(f'ALTER TABLE "{part}" VALIDATE CONSTRAINT "{check}"')
        await _build_index(
            conn, f"{part}_org_trip_ts_key", f'"{part}" ("orgId", "tripId", "timestamp")'
        )
    await conn.execute(
        'ALTER TABLE "IngestBatch" ADD COLUMN IF NOT EXISTS "orgId" text NOT NULL DEFAULT \'\''
    )
    for statement in _BATCH_ORGS:
        await conn.execute(statement)
    await _build_index(
        conn, "IngestBatch_org_driver_batch_key", '"IngestBatch" ("orgId", "driverId", "batchId")'
    )
    section = _PREPARE_SECTION.search(sql)
    assert section is not None, "003_org_scoped_keys.sql lost its prepare section"
    await conn.execute(section.group(0))
    await conn.execute(_TRIP_OWNERS)


# Work a migration needs done before its transaction, outside it, keyed by file name.
PREPARE: dict[str, Callable[[asyncpg.Connection, str], Awaitable[None]]] = {
    "003_org_scoped_keys.sql": prepare_003,
}


# Shipped in the package (pyproject's package-data), so every install has them beside the code.
SQL_DIR = Path(__file__).resolve().parent / "sql"


def migration_files(sql_dir: str | Path = SQL_DIR) -> list[Path]:
    files = sorted(Path(sql_dir).glob("*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {sql_dir}")
    return files


async def migrate(conn: asyncpg.Connection, sql_dir: str | Path = SQL_DIR) -> list[str]:
    """Apply pending migrations in name order; return the names applied by this call.

    A session-level advisory lock serialises pods that start together: the second waits,
    then finds everything recorded and applies nothing.
    """
    files = migration_files(sql_dir)
    await _take_lock(conn)
    try:
        await conn.execute(_CREATE_LEDGER)
        done = {
            r["name"]: r["sha256"]
            for r in await conn.fetch('SELECT "name", "sha256" FROM "_ingest_migrations"')
        }
        applied = []
        for path in files:
            sql = path.read_text()
            digest = hashlib.sha256(sql.encode()).hexdigest()
            if path.name in done:
                if done[path.name] != digest:
                    raise MigrationError(f"{path.name} changed after it was applied")
                continue
            prepare = PREPARE.get(path.name)
            if prepare is not None:
                await prepare(conn, sql)
            await _apply(conn, path.name, sql, digest)
            applied.append(path.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def _take_lock(conn: asyncpg.Connection) -> None:
    """Poll for the advisory lock instead of blocking in pg_advisory_lock: a session blocked
    there keeps a virtual transaction open, which CREATE INDEX CONCURRENTLY in the holder's
    prepare step waits for, and PostgreSQL ends that deadlock by killing one of them."""
    pause = 0.05
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID):
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


async def _apply(conn: asyncpg.Connection, name: str, sql: str, digest: str) -> None:
    """Apply one file in one transaction whose statements wait at most LOCK_TIMEOUT for a
    lock: a migration queued behind a long reader would make every flush queue behind it.
    Tried again after a pause, up to LOCK_ATTEMPTS times."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(sql)
                await conn.execute(
                    'INSERT INTO "_ingest_migrations" ("name", "sha256") VALUES ($1, $2)',
                    name, digest,
                )  # fmt: skip
            return
        except asyncpg.LockNotAvailableError:
            if attempt == LOCK_ATTEMPTS:
                raise MigrationError(
                    f"{name}: a lock it needs stayed taken for {LOCK_ATTEMPTS} attempts"
                    " (a long transaction on these tables?); try again later"
                ) from None
            await asyncio.sleep(min(0.5 * attempt, 5.0))
