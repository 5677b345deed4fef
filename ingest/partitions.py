"""Monthly partitions of "TripLocation": create ahead of need, list, drop past retention."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import asyncpg
import msgspec

from . import metrics
from .constants import MAINTENANCE_LOCK_ID

PARENT = "TripLocation"


class PartitionInfo(msgspec.Struct):
    name: str
    month: str
    rows_estimate: int
    size_bytes: int


def month_start(d: date | datetime) -> date:
    return date(d.year, d.month, 1)


def add_months(d: date, n: int) -> date:
    y, m = divmod(d.month - 1 + n, 12)
    return date(d.year + y, m + 1, 1)


def partition_name(month: date) -> str:
    return f"{PARENT}_{month.year:04d}_{month.month:02d}"


def months_between(first: date, last: date) -> list[date]:
    months, m = [], month_start(first)
    while m <= last:
        months.append(m)
        m = add_months(m, 1)
    return months


def needed_months(now: datetime, max_age_days: int, ahead: int) -> list[date]:
    """Every month a ping inside the accepted window can fall in, plus ``ahead`` more."""
    first = month_start(now - timedelta(days=max_age_days))
    return months_between(first, add_months(month_start(now), ahead))


async def existing(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           WHERE p.relname = $1 AND p.relnamespace = to_regnamespace(current_schema())""",
        PARENT,
    )
    return {r[0] for r in rows}


async def ensure(conn: asyncpg.Connection, months: Iterable[date]) -> list[str]:
    """Create the partitions of ``months`` that are missing; return the names created.

    Runs under a transaction-level advisory lock so that pods starting together do not race.
    """
    wanted = sorted(set(months))
    have = await existing(conn)
    if all(partition_name(m) in have for m in wanted):
        return []
    created = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MAINTENANCE_LOCK_ID)
        have = await existing(conn)
        for m in wanted:
            name = partition_name(m)
            if name in have:
                continue
            lo = datetime(m.year, m.month, 1, tzinfo=UTC)
            nxt = add_months(m, 1)
            hi = datetime(nxt.year, nxt.month, 1, tzinfo=UTC)
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF "{PARENT}" '
                f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
            )
            created.append(name)
    metrics.PARTITIONS_CREATED.inc(len(created))
    return created


async def list_partitions(conn: asyncpg.Connection) -> list[PartitionInfo]:
    """Every partition with its month, an estimate of its rows and its size on disk.

    The estimate is the planner's (reltuples, kept by ANALYZE and autovacuum); before a
    partition's first ANALYZE it falls back to the statistics collector's live-row count.
    """
    rows = await conn.fetch(
        """SELECT c.relname,
                  CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint
                       ELSE coalesce(s.n_live_tup, 0) END,
                  pg_total_relation_size(c.oid)
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
           WHERE p.relname = $1 AND p.relnamespace = to_regnamespace(current_schema())
           ORDER BY c.relname""",
        PARENT,
    )
    out = []
    for name, rows_est, size in rows:
        suffix = name[len(PARENT) + 1 :]
        out.append(PartitionInfo(name, suffix.replace("_", "-"), rows_est, size))
    return out


def month_of(name: str) -> date | None:
    try:
        y, m = name[len(PARENT) + 1 :].split("_")
        return date(int(y), int(m), 1)
    except ValueError:
        return None


async def _detach_pending(conn: asyncpg.Connection) -> set[str]:
    """Partitions whose DETACH CONCURRENTLY was interrupted (pod killed, connection lost)."""
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           WHERE p.relname = $1 AND p.relnamespace = to_regnamespace(current_schema())
             AND i.inhdetachpending""",
        PARENT,
    )
    return {r[0] for r in rows}


async def drop_expired(
    conn: asyncpg.Connection, now: datetime, retention_months: int, keep_from: date | None = None
) -> list[str]:
    """Drop the partitions whose whole month is older than ``retention_months`` (0 keeps
    all): with retention 3 in November, August to November are kept and July is dropped.
    Months from ``keep_from`` on (the accepted ping window) are never dropped.

    Each is first detached CONCURRENTLY (PostgreSQL 14+): readers and writers of the other
    partitions are not blocked, and the detach waits for the transactions using it; then it
    is dropped. A detach left half-done by a killed pod is finished (FINALIZE) first.

    One connection at a time does this, under the maintenance advisory lock; if another
    holds it, this returns at once, dropping nothing. Must not run inside a transaction.
    """
    if retention_months <= 0:
        return []
    cutoff = add_months(month_start(now), -retention_months)
    if keep_from is not None:
        cutoff = min(cutoff, month_start(keep_from))
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_ID):
        return []  # another pod is doing it
    dropped = []
    try:
        pending = await _detach_pending(conn)
        for name in sorted(await existing(conn)):  # listed under the lock: nobody races us
            month = month_of(name)
            if month is None or month >= cutoff:
                continue
            how = "FINALIZE" if name in pending else "CONCURRENTLY"
            await conn.execute(f'ALTER TABLE "{PARENT}" DETACH PARTITION "{name}" {how}')
            await conn.execute(f'DROP TABLE "{name}"')
            dropped.append(name)
            metrics.PARTITIONS_DROPPED.inc()
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_ID)
    return dropped


def months_of(timestamps: Iterable[datetime]) -> set[date]:
    return {month_start(ts.astimezone(UTC)) for ts in timestamps}
