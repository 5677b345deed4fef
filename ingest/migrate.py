"""Ordered SQL migrations from ``sql/``, each applied once, recorded, under an advisory lock."""

from __future__ import annotations

import hashlib
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


async def prepare_003(conn: asyncpg.Connection) -> None:
    """The slow part of 003_org_scoped_keys.sql, done without blocking ingest, one partition
    at a time and outside any transaction (CREATE INDEX CONCURRENTLY cannot run in one):
    NULL orgIds filled, NOT NULL proven by a validated CHECK (so SET NOT NULL needs no scan
    under its exclusive lock), the new unique index built. Safe to run again after a crash:
    an index left invalid by an interrupted build is dropped and built again."""
    for part in await _partitions(conn):
        check, index = f"{part}_orgId_not_null", f"{part}_org_trip_ts_key"
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
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f'"{index}"'
        )
        if valid is False:
            await conn.execute(f'DROP INDEX CONCURRENTLY "{index}"')
        if not valid:
            await conn.execute(
                f'CREATE UNIQUE INDEX CONCURRENTLY "{index}"'
                f' ON "{part}" ("orgId", "tripId", "timestamp")'
            )


# Work a migration needs done before its transaction, outside it, keyed by file name.
PREPARE: dict[str, Callable[[asyncpg.Connection], Awaitable[None]]] = {
    "003_org_scoped_keys.sql": prepare_003,
}


def migration_files(sql_dir: str | Path) -> list[Path]:
    files = sorted(Path(sql_dir).glob("*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {sql_dir}")
    return files


async def migrate(conn: asyncpg.Connection, sql_dir: str | Path) -> list[str]:
    """Apply pending migrations in name order; return the names applied by this call.

    A session-level advisory lock serialises pods that start together: the second waits,
    then finds everything recorded and applies nothing.
    """
    files = migration_files(sql_dir)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
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
                await prepare(conn)
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    'INSERT INTO "_ingest_migrations" ("name", "sha256") VALUES ($1, $2)',
                    path.name,
                    digest,
                )
            applied.append(path.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
