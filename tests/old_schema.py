"""A database of its own at the schema before tenancy (migrations 001 and 002 only), for the
tests of migration 003."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from ingest.migrate import SQL_DIR

from .conftest import PG_URL, db_url

BEFORE_TENANCY = ("001_trip_location.sql", "002_ingest_batch.sql")


@contextlib.asynccontextmanager
async def old_schema_database(tmp_path: Path) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection to a new database migrated to 002, and its URL; dropped afterwards."""
    name = f"ingest_m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    old_sql = tmp_path / "sql_before_tenancy"
    old_sql.mkdir()
    for f in BEFORE_TENANCY:
        shutil.copy(SQL_DIR / f, old_sql / f)
    conn = await asyncpg.connect(db_url(name))
    try:
        from ingest.migrate import migrate

        assert await migrate(conn, old_sql) == list(BEFORE_TENANCY)
        yield conn, db_url(name)
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
