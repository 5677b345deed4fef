"""Periodic upkeep run by every ingest pod, made safe by advisory locks: partitions ahead of
need, partitions past retention dropped (with the geofence states of trips last evaluated
before them, the geofence events of those months and the owners of trips with no ping left),
expired batch-id and flush-id records deleted; and,
beside it, the indexes of a month no ping can go to any more rebuilt (packed).

Every pod runs it every MAINTENANCE_INTERVAL_S; whichever gets the lock does the work, the
others find nothing to do. The same run, packing aside, is
``python -m ingest partitions --maintain``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import asyncpg

from . import metrics, partitions
from .constants import MAINTENANCE_LOCK_ID, PACK_LOCK_ID
from .settings import Settings

log = logging.getLogger("ingest.maintenance")

_EXPIRE_CHUNK = 10_000  # rows per DELETE: no long transaction, no long lock
_EXPIRE_BATCHES = f"""
DELETE FROM "IngestBatch" WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM "IngestBatch"
    WHERE "createdAt" < now() - make_interval(hours => $1) LIMIT {_EXPIRE_CHUNK}))
"""
# A trip's geofence state outlives its pings by nothing: once its last evaluation is older than
# the oldest month kept, the trip starts again from no state (docs/api.md#geofences).
_EXPIRE_STATES = f"""
DELETE FROM "GeofenceState" WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM "GeofenceState" WHERE "updatedAt" < $1 LIMIT {_EXPIRE_CHUNK}))
"""
# A trip's owner (store.py) is forgotten once it was claimed, and last handed over, before the
# oldest month kept and none of its pings is left. Rows a flush holds (FOR SHARE) or a handover
# is changing are skipped; the DELETE, a statement of its own, looks again: it sees the pings a
# flush committed before the lock was taken.
_FORGETTABLE = """
t."createdAt" < $1 AND (t."handedOverAt" IS NULL OR t."handedOverAt" < $1)
AND NOT EXISTS (
    SELECT 1 FROM "TripLocation" l WHERE l."orgId" = t."orgId" AND l."tripId" = t."tripId")
"""
# The table is read once per run, a page of _EXPIRE_CHUNK rows in key order per transaction:
# no statement reads more (each old row probes every partition), deleted rows are not read
# again. A page ends _EXPIRE_CHUNK rows on, or at the last key (trip ids are never empty, so
# ('', '') is before every key).
_PAGE_END = f"""
SELECT * FROM (
    (SELECT "orgId", "tripId", false AS last FROM "IngestTrip" WHERE ("orgId", "tripId") > ($1, $2)
     ORDER BY 1, 2 OFFSET {_EXPIRE_CHUNK - 1} LIMIT 1)
    UNION ALL
    (SELECT "orgId", "tripId", true FROM "IngestTrip" ORDER BY 1 DESC, 2 DESC LIMIT 1)
) e ORDER BY last LIMIT 1
"""
_OLD_TRIPS = f"""
SELECT t."orgId", t."tripId" FROM "IngestTrip" t
WHERE (t."orgId", t."tripId") > ($2, $3) AND (t."orgId", t."tripId") <= ($4, $5) AND {_FORGETTABLE}
FOR UPDATE OF t SKIP LOCKED
"""
# The trip's geofence state goes with its owner: a driver starting the freed trip id starts from
# no state, as a new trip does (a state updated by a late upload could otherwise outlive it by up
# to a month).
_EXPIRE_TRIPS = f"""
WITH gone AS (
    DELETE FROM "IngestTrip" t USING unnest($2::text[], $3::text[]) AS w(org, trip)
    WHERE t."orgId" = w.org AND t."tripId" = w.trip AND {_FORGETTABLE}
    RETURNING t."orgId", t."tripId"
), states AS (
    DELETE FROM "GeofenceState" s USING gone
    WHERE s."orgId" = gone."orgId" AND s."tripId" = gone."tripId"
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone)::int, (SELECT count(*) FROM states)::int
"""
# Geofence events hold drivers' positions: they go with the pings of their month. Found through
# the key ("orgId", "geofenceId", "timestamp", ...), where a fence's old events begin its range:
# a fence with none costs one index descent. No index on "timestamp": migrate.py runs each file
# in a transaction, where CREATE INDEX CONCURRENTLY cannot run, and a plain build would hold the
# events' inserts (evaluation) for as long as it reads the table. Every event has its fence (the
# events of a deleted fence went with it), so the fences are walked in key order, FENCE_PAGE at a
# time (each once per run, as "IngestTrip" below); a page's old events go EVENT_CHUNK at a time,
# each DELETE a short transaction of its own. ORDER BY: the page is read through the fences'
# key, not by scanning the table.
EVENT_CHUNK = _EXPIRE_CHUNK
FENCE_PAGE = 1_000
_FENCE_PAGE_END = """
SELECT * FROM (
    (SELECT "orgId", "id", false AS last FROM "Geofence" WHERE ("orgId", "id") > ($1, $2)
     ORDER BY 1, 2 OFFSET $3 LIMIT 1)
    UNION ALL
    (SELECT "orgId", "id", true FROM "Geofence" ORDER BY 1 DESC, 2 DESC LIMIT 1)
) e ORDER BY last LIMIT 1
"""
_EXPIRE_EVENTS = """
DELETE FROM "GeofenceEvent" WHERE ctid = ANY (ARRAY(
    SELECT e.ctid FROM "Geofence" g CROSS JOIN LATERAL (
        SELECT ctid FROM "GeofenceEvent" e
        WHERE e."orgId" = g."orgId" AND e."geofenceId" = g."id" AND e."timestamp" < $1
        LIMIT $6) e
    WHERE (g."orgId", g."id") > ($2, $3) AND (g."orgId", g."id") <= ($4, $5)
    ORDER BY g."orgId", g."id" LIMIT $6))
"""
# One fence's events, for its delete: through the key's ("orgId", "geofenceId") prefix.
_DELETE_FENCE_EVENTS = """
DELETE FROM "GeofenceEvent" WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM "GeofenceEvent" WHERE "orgId" = $1 AND "geofenceId" = $2 LIMIT $3))
"""
# Flush ids (flush.py) are needed only while a flush resolves a lost COMMIT reply: minutes.
FLUSH_ID_TTL_S = 6 * 3600
_EXPIRE_FLUSHES = 'DELETE FROM "IngestFlush" WHERE "id" < $1'
# A partition whose indexes were rebuilt once closed says so in its comment.
PACKED = "ingest: indexes packed"
_UNPACKED = """
SELECT c.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass('"TripLocation"')
  AND obj_description(c.oid, 'pg_class') IS DISTINCT FROM $1
ORDER BY c.relname
"""
# What an interrupted REINDEX CONCURRENTLY leaves behind: invalid copies named *_ccnew/_ccold.
_LEFTOVERS = r"""
SELECT ic.relname FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
WHERE x.indrelid = to_regclass($1) AND NOT x.indisvalid AND ic.relname ~ '_cc(new|old)\d*$'
"""


async def run_once(
    conn: asyncpg.Connection, settings: Settings, now: datetime | None = None
) -> dict[str, object]:
    """One maintenance pass; returns what it did: ``created`` and ``dropped`` partition names,
    and the rows expired. (Packing runs beside it: pack_forever.)"""
    now = now or datetime.now(UTC)
    months = partitions.needed_months(
        now, settings.max_ping_age_days, settings.partitions_ahead_months
    )
    created = await partitions.ensure(conn, months)
    # Never drop a month that pings inside the accepted window may still go to.
    keep_from = partitions.month_start(now - timedelta(days=settings.max_ping_age_days))
    dropped = await partitions.drop_expired(conn, now, settings.retention_months, keep_from)
    expired = await expire_batch_ids(conn, settings.batch_id_ttl_hours)
    states = trips = 0
    first_kept: datetime | None = None  # with retention: what is older has no ping left
    if settings.retention_months:
        kept_from = partitions.add_months(partitions.month_start(now), -settings.retention_months)
        first = min(kept_from, keep_from)
        first_kept = datetime(first.year, first.month, first.day, tzinfo=UTC)
        states = await expire_geofence_states(conn, first_kept)
    cutoff_ms = int((now.timestamp() - FLUSH_ID_TTL_S) * 1000)
    await conn.execute(_EXPIRE_FLUSHES, cutoff_ms << 20)  # by primary-key range: cheap
    await update_partition_metrics(conn, now)
    events = 0
    if first_kept is not None:
        events = await expire_geofence_events(conn, first_kept)
        # Last: it reads the whole "IngestTrip" table.
        trips, trip_states = await expire_trips(conn, first_kept)
        states += trip_states
    return {
        "created": created, "dropped": dropped, "batch_ids_expired": expired,
        "geofence_states_expired": states, "geofence_events_expired": events,
        "trips_expired": trips,
    }  # fmt: skip


async def pack_closed(settings: Settings, now: datetime | None = None) -> str | None:
    """Rebuild the indexes of the oldest month that no ping can go to any more (it ended more
    than MAX_PING_AGE_DAYS ago), is kept (RETENTION_MONTHS) and is not packed yet; its name, or
    None (also when another pod is packing).

    While a month is live its unique index is about a third empty: each trip appends at the
    end of its own keys, in the middle of the index, and the pages that split there stay half
    full. REINDEX CONCURRENTLY writes it anew, full, without blocking reads or writes. It reads
    the whole partition, and waits for every older transaction: on a connection of its own with
    no statement timeout, under a lock of its own (partitions are created and dropped
    meanwhile), a month at a time."""
    now = now or datetime.now(UTC)
    closed_before = partitions.month_start(now - timedelta(days=settings.max_ping_age_days))
    kept_from = (
        partitions.add_months(partitions.month_start(now), -settings.retention_months)
        if settings.retention_months
        else date.min
    )
    conn = await asyncpg.connect(
        settings.database_url, command_timeout=None,
        server_settings={"application_name": "ingest-pack", "statement_timeout": "0"},
    )  # fmt: skip
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PACK_LOCK_ID):
            return None
        for (name,) in await conn.fetch(_UNPACKED, PACKED):
            month = partitions.month_of(name)
            if (
                month is None
                or month < kept_from
                or partitions.add_months(month, 1) > closed_before
            ):
                continue
            for (leftover,) in await conn.fetch(_LEFTOVERS, f'"{name}"'):
                await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{leftover}"')
            started = time.monotonic()
            await conn.execute(f'REINDEX TABLE CONCURRENTLY "{name}"')
            await conn.execute(f"COMMENT ON TABLE \"{name}\" IS '{PACKED}'")
            metrics.PARTITIONS_PACKED.inc()
            took = round(time.monotonic() - started, 1)
            log.info("partition_packed", extra={"partition": name, "seconds": took})
            return str(name)
        return None
    finally:
        await conn.close()  # the session's advisory lock goes with it


async def pack_forever(settings: Settings) -> None:
    """pack_closed every MAINTENANCE_INTERVAL_S, beside run_forever (most runs find nothing
    to pack: a month becomes packable once a month)."""
    while True:
        try:
            await pack_closed(settings)
        except Exception as exc:
            metrics.DB_ERRORS.labels("maintenance").inc()
            log.warning("partition_pack_failed", extra={"error": repr(exc)})
        await asyncio.sleep(settings.maintenance_interval_s)


async def expire_batch_ids(conn: asyncpg.Connection, ttl_hours: int) -> int:
    """Delete batch-id records older than ``ttl_hours``, in chunks, under the maintenance lock
    (0 if another connection holds it). Pings stay deduplicated by ("tripId", "timestamp")."""
    expired = await _delete_in_chunks(conn, _EXPIRE_BATCHES, ttl_hours)
    metrics.BATCH_IDS_EXPIRED.inc(expired)
    return expired


async def expire_geofence_states(conn: asyncpg.Connection, before: datetime) -> int:
    """Delete the geofence states of trips last evaluated before ``before`` (the first month
    kept), in chunks, under the maintenance lock (0 if another connection holds it)."""
    expired = await _delete_in_chunks(conn, _EXPIRE_STATES, before)
    metrics.GEOFENCE_STATES_EXPIRED.inc(expired)
    return expired


async def expire_geofence_events(conn: asyncpg.Connection, before: datetime) -> int:
    """Delete the geofence events that happened before ``before`` (the first month kept), a
    page of fences at a time, in chunks, under the maintenance lock (0 if another connection
    holds it). Ingest and evaluation go on: they insert newer events, which no chunk locks."""
    after = ("", "")  # the last fence of the pages before (fence ids are never empty)
    end: asyncpg.Record | None = None  # the last fence of this page, and whether it is the last

    async def chunk() -> tuple[int, bool]:
        nonlocal after, end
        if end is None:
            end = await conn.fetchrow(_FENCE_PAGE_END, *after, FENCE_PAGE - 1)
            if end is None:  # no fence at all
                return 0, False
        status = await conn.execute(_EXPIRE_EVENTS, before, *after, end[0], end[1], EVENT_CHUNK)
        n = int(status.split()[-1])
        if n == EVENT_CHUNK:  # this page may have more
            return n, True
        if end[2]:
            return n, False
        after, end = (end[0], end[1]), None
        return n, True

    expired = await _in_chunks(conn, chunk)
    metrics.GEOFENCE_EVENTS_EXPIRED.inc(expired)
    return expired


async def delete_fence_events(conn: asyncpg.Connection, org_id: str, fence_id: str) -> int:
    """Delete every event of one fence, EVENT_CHUNK at a time, each DELETE a transaction of its
    own; the rows deleted. For a fence's delete, before it: its ON DELETE CASCADE would otherwise
    delete them all in one statement, which for a busy fence outlasts the command timeout. Events
    stored meanwhile still go with the fence. Must not run inside a transaction."""
    if conn.is_in_transaction():
        raise RuntimeError("delete_fence_events: one transaction per chunk, not one for all")
    deleted = 0
    while True:
        status = await conn.execute(_DELETE_FENCE_EVENTS, org_id, fence_id, EVENT_CHUNK)
        n = int(status.split()[-1])
        deleted += n
        if n < EVENT_CHUNK:
            return deleted


async def expire_trips(conn: asyncpg.Connection, before: datetime) -> tuple[int, int]:
    """Forget the owners of trips created and last handed over before ``before`` (the first
    month kept) that have no ping left, and their geofence states, in chunks, under the
    maintenance lock (nothing if another connection holds it). The trip id is then free in its
    org: the next driver posting to it owns it. Returns (owners, states) deleted."""
    after = ("", "")  # the last key of the page before
    states = 0

    async def chunk() -> tuple[int, bool]:
        nonlocal after, states
        async with conn.transaction():
            end = await conn.fetchrow(_PAGE_END, *after)
            if end is None:  # no trip at all
                return 0, False
            old = await conn.fetch(_OLD_TRIPS, before, *after, end[0], end[1])
            deleted = 0
            if old:
                orgs, trips = [r[0] for r in old], [r[1] for r in old]
                deleted, gone = await conn.fetchrow(_EXPIRE_TRIPS, before, orgs, trips)
                states += gone
        after = (end[0], end[1])
        return deleted, not end[2]  # end[2]: that page ended at the last key

    expired = await _in_chunks(conn, chunk)
    metrics.TRIPS_EXPIRED.inc(expired)
    metrics.GEOFENCE_STATES_EXPIRED.inc(states)
    return expired, states


async def _delete_in_chunks(conn: asyncpg.Connection, sql: str, arg: object) -> int:
    """Run ``sql`` (a DELETE of at most _EXPIRE_CHUNK rows) until it deletes fewer; the rows
    deleted. One connection at a time: 0 if another holds the maintenance lock."""

    async def chunk() -> tuple[int, bool]:
        n = int((await conn.execute(sql, arg)).split()[-1])
        return n, n == _EXPIRE_CHUNK

    return await _in_chunks(conn, chunk)


async def _in_chunks(
    conn: asyncpg.Connection, chunk: Callable[[], Awaitable[tuple[int, bool]]]
) -> int:
    """Run ``chunk`` (rows deleted, whether there may be more) until there are no more; the
    rows deleted. One connection at a time: 0 if another holds the maintenance lock."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_ID):
        return 0
    deleted = 0
    try:
        while True:
            n, more = await chunk()
            deleted += n
            if not more:
                break
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_ID)
    return deleted


def months_ahead(months: set[date], now: datetime) -> int:
    """How many consecutive months after the current one have a partition."""
    current, n = partitions.month_start(now), 0
    while partitions.add_months(current, n + 1) in months:
        n += 1
    return n


async def update_partition_metrics(conn: asyncpg.Connection, now: datetime) -> None:
    names = await partitions.existing(conn)
    metrics.PARTITIONS.set(len(names))
    months = {m for m in (partitions.month_of(n) for n in names) if m is not None}
    metrics.PARTITION_MONTHS_AHEAD.set(months_ahead(months, now))
    if months:
        oldest, newest = min(months), max(months)
        start = datetime(oldest.year, oldest.month, 1, tzinfo=UTC)
        end = partitions.add_months(newest, 1)
        metrics.OLDEST_PARTITION_AGE.set((now - start).total_seconds())
        metrics.NEWEST_PARTITION_AHEAD.set(
            (datetime(end.year, end.month, 1, tzinfo=UTC) - now).total_seconds()
        )


async def run_forever(pool: asyncpg.Pool, settings: Settings) -> None:
    while True:
        try:
            async with pool.acquire() as conn:
                done = await run_once(conn, settings)
        except Exception as exc:
            metrics.MAINTENANCE_RUNS.labels("failed").inc()
            metrics.DB_ERRORS.labels("maintenance").inc()
            log.warning("maintenance_failed", extra={"error": repr(exc)})
            delay = min(10.0, settings.maintenance_interval_s)
        else:
            metrics.MAINTENANCE_RUNS.labels("ok").inc()
            metrics.MAINTENANCE_LAST_SUCCESS.set(time.time())
            if (
                done["created"] or done["dropped"] or done["batch_ids_expired"]
                or done["geofence_events_expired"]
            ):  # fmt: skip
                # Not extra=done: "created" is a LogRecord attribute and may not be overwritten.
                log.info(
                    "maintenance",
                    extra={
                        "partitions_created": done["created"],
                        "partitions_dropped": done["dropped"],
                        "batch_ids_expired": done["batch_ids_expired"],
                        "geofence_events_expired": done["geofence_events_expired"],
                    },
                )
            delay = settings.maintenance_interval_s
        await asyncio.sleep(delay)
