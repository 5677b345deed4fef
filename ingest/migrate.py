"""Ordered SQL migrations from ``sql/``, each applied once, recorded, under an advisory lock."""

from __future__ import annotations

import hashlib
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
