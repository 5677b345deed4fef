"""The benchmark's own PostgreSQL database and Redis prefix: create, migrate, reset, drop.

Every run creates a throwaway database on the given server and a unique Redis key prefix,
so it never touches a developer's data and can run beside the test suite.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from ingest.migrate import SQL_DIR, migrate
from ingest.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parent.parent
TABLE = '"TripLocation"'


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any of the service's settings (a developer's shell may export
    some), plus ``extra``: every process under test gets only the settings we give it."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env.update(extra)
    return env


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def drop_databases(server_url: str, *names: str) -> None:
    """Drop each database of ``names`` (if it exists), ending its sessions."""
    admin = await asyncpg.connect(server_url)
    try:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def migrated_database(
    server_url: str, name: str, sql_dir: str | Path = SQL_DIR
) -> asyncpg.Connection:
    """A connection to database ``name``, made again (dropped first) and migrated in process
    by the service's migrations in ``sql_dir``."""
    await drop_databases(server_url, name)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(with_database(server_url, name))
    try:
        await migrate(conn, sql_dir)
    except BaseException:
        await conn.close()
        raise
    return conn


class BenchDB:
    """A database of its own on the server of ``server_url``, migrated by the service's
    own ``python -m ingest migrate``."""

    def __init__(self, server_url: str, name: str) -> None:
        self.server_url = server_url
        self.name = name
        self.url = with_database(server_url, name)
        self._conn: asyncpg.Connection | None = None

    async def create(self, jwt_secret: str) -> None:
        admin = await asyncpg.connect(self.server_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()
        env = clean_env(DATABASE_URL=self.url, JWT_SECRET=jwt_secret, LOG_LEVEL="WARNING")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingest", "migrate", cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"migrate failed: {err.decode().strip()}")
        self._conn = await asyncpg.connect(self.url)

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None, "create() first"
        return self._conn

    async def reset(self) -> None:
        """Empty tables and a fresh checkpoint, so every contender starts alike."""
        await self.conn.execute(f'TRUNCATE {TABLE}, "IngestBatch", "IngestTrip"')
        await self.conn.execute("CHECKPOINT")

    async def count(self) -> int:
        return int(await self.conn.fetchval(f"SELECT count(*) FROM {TABLE}"))

    async def count_between(self, t0: float, t1: float) -> int:
        """Rows committed by transactions that started in [t0, t1) (epoch seconds):
        "createdAt" defaults to now(), the start of the inserting transaction."""
        return int(
            await self.conn.fetchval(
                f'SELECT count(*) FROM {TABLE} WHERE "createdAt" >= to_timestamp($1)'
                ' AND "createdAt" < to_timestamp($2)',
                t0,
                t1,
            )
        )

    async def backend_pids(self) -> list[int]:
        """Server processes serving this database, except our own connection."""
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.name,
        )
        return [r[0] for r in rows]

    async def drop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await drop_databases(self.server_url, self.name)


async def drop_redis_prefix(url: str, prefix: str) -> int:
    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
        return len(keys)
    finally:
        await client.aclose()
