"""Periodic upkeep run by every pod, made safe by advisory locks: partitions ahead of need,
partitions past retention dropped, expired batch-id records deleted."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime

import asyncpg

from . import metrics, partitions
from .constants import MAINTENANCE_LOCK_ID
from .settings import Settings

log = logging.getLogger("ingest.maintenance")

_EXPIRE_BATCHES = """
DELETE FROM "IngestBatch" WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM "IngestBatch"
    WHERE "createdAt" < now() - make_interval(hours => $1) LIMIT 10000))
"""


async def run_once(
    conn: asyncpg.Connection, settings: Settings, now: datetime | None = None
) -> dict[str, object]:
    now = now or datetime.now(UTC)
    months = partitions.needed_months(
        now, settings.max_ping_age_days, settings.partitions_ahead_months
    )
    created = await partitions.ensure(conn, months)
    dropped = await partitions.drop_expired(conn, now, settings.retention_months)
    expired = 0
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_ID):
        try:
            while True:  # in chunks, so no long lock or transaction
                n = int(
                    (await conn.execute(_EXPIRE_BATCHES, settings.batch_id_ttl_hours)).split()[-1]
                )
                expired += n
                if n < 10000:
                    break
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_ID)
    await update_partition_metrics(conn, now)
    return {"created": created, "dropped": dropped, "batch_ids_expired": expired}


async def update_partition_metrics(conn: asyncpg.Connection, now: datetime) -> None:
    names = sorted(await partitions.existing(conn))
    metrics.PARTITIONS.set(len(names))
    months = [m for m in (partitions.month_of(n) for n in names) if m is not None]
    if months:
        oldest = datetime(months[0].year, months[0].month, 1, tzinfo=UTC)
        end: date = partitions.add_months(months[-1], 1)
        metrics.OLDEST_PARTITION_AGE.set((now - oldest).total_seconds())
        metrics.NEWEST_PARTITION_AHEAD.set(
            (datetime(end.year, end.month, 1, tzinfo=UTC) - now).total_seconds()
        )


async def run_forever(pool: asyncpg.Pool, settings: Settings) -> None:
    while True:
        try:
            async with pool.acquire() as conn:
                done = await run_once(conn, settings)
            if done["created"] or done["dropped"] or done["batch_ids_expired"]:
                log.info("maintenance", extra=done)
            delay = settings.maintenance_interval_s
        except Exception as exc:
            metrics.DB_ERRORS.labels("maintenance").inc()
            log.warning("maintenance_failed", extra={"error": repr(exc)})
            delay = min(10.0, settings.maintenance_interval_s)
        await asyncio.sleep(delay)
