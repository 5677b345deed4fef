"""PostgreSQL writes: one flush = one transaction = one binary COPY, with ownership and dedup.

In one transaction, in this order:
1. One statement records the flush's id (to resolve a lost COMMIT reply later: flush.py) and
   reads the owner of every trip in the flush, FOR SHARE, so that a handover waits for the
   flushes that read the old owner. Only a flush that starts new trips claims them, within each
   driver's daily limit; a request replaying a stored batch claims none. A request posting to
   a trip another driver owns is refused (403) and stores nothing, not even its batch id.
2. Batch ids of the allowed requests are claimed per (org, driver, batchId); a request whose
   id was stored before (or earlier in this flush) is a replay and stores nothing.
3. Fast path: COPY every row of the new requests straight into "TripLocation". Only when the
   unique guard on ("orgId", "tripId", "timestamp") fires does the flush fall back to staging
   the rows and inserting them with ON CONFLICT DO NOTHING, which tells which rows were new.

Everything a request is told (accepted, duplicates, refused) is settled before COMMIT, so a
commit whose outcome is unknown needs only to learn whether it committed (flush.py).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from .buffer import FlushBatch, Pending, Refused
from .partitions import PARENT
from .records import COLUMNS, ORG, TRIP, TS, Record
from .sql_arrays import columns, ids, split

_COLS = ", ".join(f'"{c}"' for c in COLUMNS)
# The flush's id (first row: the transaction id too), then the owner of every known trip.
_OWNERS = f"""
WITH flush AS (
    INSERT INTO "IngestFlush" ("id") VALUES ($3) RETURNING pg_current_xact_id()::xid::text
), owners AS (
    SELECT t."orgId", t."tripId", t."driverId" FROM "IngestTrip" t
    WHERE (t."orgId", t."tripId") IN (SELECT * FROM unnest({split("$1")}, {split("$2")}))
    FOR SHARE OF t
)
SELECT * FROM flush, (VALUES (NULL::text, NULL::text, NULL::text)) AS n
UNION ALL
SELECT NULL, * FROM owners
"""
# Serialises the trip starts of one driver across pods, so the daily limit holds.
_LOCK_DRIVERS = f"""
SELECT pg_advisory_xact_lock(hashtextextended(w.org || ':' || w.driver, 7))
FROM unnest({split("$1")}, {split("$2")}) AS w(org, driver)
"""
_TRIPS_STARTED = f"""
SELECT w.org, w.driver, count(t.*)::int
FROM unnest({split("$1")}, {split("$2")}) AS w(org, driver)
LEFT JOIN "IngestTrip" t ON t."orgId" = w.org AND t."driverId" = w.driver
     AND t."createdAt" > now() - interval '1 day'
GROUP BY w.org, w.driver
"""
# In key order: two pods claiming the same new trips then wait for each other in one order
# (in arrival order, each could hold a trip the other waits for: a deadlock).
_CLAIM_TRIPS = f"""
INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId")
SELECT * FROM unnest({split("$1")}, {split("$2")}, {split("$3")}) ORDER BY 1, 2
ON CONFLICT DO NOTHING
RETURNING "orgId", "tripId"
"""
_UNCLAIM_TRIPS = f"""
DELETE FROM "IngestTrip"
WHERE ("orgId", "tripId") IN (SELECT * FROM unnest({split("$1")}, {split("$2")}))
"""
# Read in a statement of its own, so that it sees trips another pod committed meanwhile.
_OWNERS_AGAIN = f"""
SELECT t."orgId", t."tripId", t."driverId"
FROM unnest({split("$1")}, {split("$2")}) AS w(org, trip)
JOIN "IngestTrip" t ON t."orgId" = w.org AND t."tripId" = w.trip
FOR SHARE OF t
"""
# Of the batch ids of requests naming new trips, those stored before: such a request is a
# replay, which claims no trip (nor one of its driver's trips a day).
_STORED_BATCHES = f"""
SELECT "orgId", "driverId", "batchId" FROM "IngestBatch"
WHERE ("orgId", "driverId", "batchId") IN (
    SELECT * FROM unnest({split("$1")}, {split("$2")}, {split("$3")}))
"""
_CLAIM_BATCHES = f"""
INSERT INTO "IngestBatch" ("orgId", "driverId", "batchId")
SELECT * FROM unnest({split("$1")}, {split("$2")}, {split("$3")})
ON CONFLICT DO NOTHING
RETURNING "orgId", "driverId", "batchId"
"""
_STAGE = "_ingest_stage"
_CREATE_STAGE = (
    f'CREATE TEMP TABLE IF NOT EXISTS "{_STAGE}" '
    f'(LIKE "{PARENT}" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
)
_INSERT_NEW = f"""
INSERT INTO "{PARENT}" ({_COLS})
SELECT {_COLS} FROM "{_STAGE}"
ON CONFLICT ("orgId", "tripId", "timestamp") DO NOTHING
RETURNING "orgId", "tripId", "timestamp"
"""

Owners = dict[tuple[str, str], str]


class MissingPartition(Exception):
    """A row fell in a month without a partition; create it and retry the flush."""

    def __init__(self, rows: list[Record]) -> None:
        super().__init__("no partition for some rows")
        self.rows = rows


def _owned_by_another(trip: str) -> Refused:
    return Refused(
        403, "trip_owned_by_another_driver",
        f"trip {trip!r} belongs to another driver; a dispatcher can hand it over",
    )  # fmt: skip


def _too_many_trips(limit: int) -> Refused:
    return Refused(
        429, "too_many_trips", f"this driver started {limit} trips in the last 24 hours (the limit)"
    )


BatchKey = tuple[str, str, str]


async def _owners(
    conn: asyncpg.Connection, batch: FlushBatch, pending: list[Pending], trips_per_day: int
) -> tuple[Owners, set[tuple[str, str]], set[BatchKey]]:
    """The owner of every trip in ``pending``, claiming each new trip for the first driver
    posting to it, not in a replay, who has started fewer than ``trips_per_day`` trips in the
    last day; the trips claimed here; the replays seen among the requests naming new trips."""
    keys = list(dict.fromkeys((p.org, p.trip) for p in pending))
    rows = await conn.fetch(_OWNERS, *columns(keys, 2), batch.flush_id)
    owners: Owners = {}
    for r in rows:
        if r[1] is None:  # the flush's own row
            batch.xid, batch.backend_pid = r[0], conn.get_server_pid()
        else:
            owners[(r[1], r[2])] = r[3]
    if len(owners) == len(keys):
        return owners, set(), set()
    # New trips (rare: a trip's first flush).
    new = [p for p in pending if (p.org, p.trip) not in owners]
    replays = await _stored_batches(conn, new)
    if replays:
        new = [p for p in new if (p.org, p.driver_id, p.batch_id) not in replays]
    if len(new) > 1:
        new = _repeats_last(pending, new)
    drivers = sorted({(p.org, p.driver_id) for p in new})  # sorted: pods lock in one order
    driver_keys = columns(drivers, 2)
    await conn.execute(_LOCK_DRIVERS, *driver_keys)
    started = {(r[0], r[1]): r[2] for r in await conn.fetch(_TRIPS_STARTED, *driver_keys)}
    claim: list[tuple[str, str, str]] = []
    claimed: set[tuple[str, str]] = set()
    for p in new:
        key = (p.org, p.trip)
        if key not in claimed and started[(p.org, p.driver_id)] < trips_per_day:
            started[(p.org, p.driver_id)] += 1
            claimed.add(key)
            claim.append((p.org, p.trip, p.driver_id))
    won: set[tuple[str, str]] = set()
    if claim:
        won = {(r[0], r[1]) for r in await conn.fetch(_CLAIM_TRIPS, *columns(claim, 3))}
        owners.update({(org, trip): driver for org, trip, driver in claim if (org, trip) in won})
        lost = [(org, trip) for org, trip, _ in claim if (org, trip) not in won]
        if lost:  # another pod started the same trip meanwhile: its driver owns it
            for r in await conn.fetch(_OWNERS_AGAIN, *columns(lost, 2)):
                owners[(r[0], r[1])] = r[2]
    return owners, won, replays


def _repeats_last(pending: list[Pending], new: list[Pending]) -> list[Pending]:
    """``new`` with the requests whose batch id came earlier in this flush last: most likely
    replays of it (_split_replays decides), they claim a trip only after every other request,
    so they never take one, or a driver's last trip of the day, from a fresh post."""
    seen: set[BatchKey] = set()
    repeats: set[int] = set()
    for p in pending:
        if p.batch_id is not None:
            key = (p.org, p.driver_id, p.batch_id)
            if key in seen:
                repeats.add(id(p))
            seen.add(key)
    if not repeats:
        return new
    return [p for p in new if id(p) not in repeats] + [p for p in new if id(p) in repeats]


async def _stored_batches(conn: asyncpg.Connection, pending: list[Pending]) -> set[BatchKey]:
    """The (org, driver, batch id) of ``pending`` already stored. One stored meanwhile by
    another pod is not seen: that replay is found when its batch id is claimed, as usual."""
    keyed = [p for p in pending if p.batch_id is not None]
    if not keyed:
        return set()
    return {(r[0], r[1], r[2]) for r in await conn.fetch(_STORED_BATCHES, *_batch_keys(keyed))}


def _batch_keys(keyed: list[Pending]) -> tuple[str, str, str]:
    """The orgs, drivers and batch ids of ``keyed`` (all with a batch id), for unnest()."""
    batch_ids = [p.batch_id or "" for p in keyed]
    return ids([p.org for p in keyed]), ids([p.driver_id for p in keyed]), ids(batch_ids)


def _allowed(
    pending: list[Pending], owners: Owners, trips_per_day: int, replays: set[BatchKey]
) -> list[Pending]:
    """The requests whose driver owns their trip; the others are marked refused, or, replays
    naming a trip nobody owns, answered as duplicates."""
    allowed = []
    for p in pending:
        owner = owners.get((p.org, p.trip))
        if owner == p.driver_id:
            allowed.append(p)
        elif owner is None and (p.org, p.driver_id, p.batch_id) in replays:
            p.accepted, p.duplicates = 0, p.count
        elif owner is None:  # a new trip its driver may not start today
            p.refused = _too_many_trips(trips_per_day)
        else:
            p.refused = _owned_by_another(p.trip)
    return allowed


def _split_replays(pending: list[Pending], new_keys: set[tuple[str, str, str]]) -> list[Pending]:
    """Mark the batches whose id was stored before (or earlier in this flush) as replays."""
    fresh, seen = [], set()
    for p in pending:
        if p.batch_id is None:
            fresh.append(p)
            continue
        key = (p.org, p.driver_id, p.batch_id)
        if key in new_keys and key not in seen:
            seen.add(key)
            fresh.append(p)
        else:
            p.accepted, p.duplicates = 0, p.count
    return fresh


async def commit(conn: asyncpg.Connection, batch: FlushBatch, trips_per_day: int) -> Owners:
    """Commit one flush: fill each Pending's counts (or refusal) and ``batch.stored`` (the rows
    newly stored), all before COMMIT; return the trip owners seen (for the owner cache)."""
    for p in batch.pending:
        p.reset()
    batch.stored = []
    async with conn.transaction():
        owners, new_trips, replays = await _owners(conn, batch, batch.pending, trips_per_day)
        allowed = _allowed(batch.pending, owners, trips_per_day, replays)
        # Sorted, so two pods claiming the same ids lock them in the same order (no deadlock).
        keyed = sorted(
            (p for p in allowed if p.batch_id is not None),
            key=lambda p: (p.org, p.driver_id, p.batch_id or ""),
        )
        fresh = allowed
        if keyed:
            claimed = await conn.fetch(_CLAIM_BATCHES, *_batch_keys(keyed))
            fresh = _split_replays(allowed, {(r[0], r[1], r[2]) for r in claimed})
        if new_trips and (unused := new_trips - {(p.org, p.trip) for p in fresh}):
            # Trips only replays named: a replay stores nothing, so it starts no trip either
            # (it would own a trip with no ping, and use up one of the driver's trips a day).
            await conn.execute(_UNCLAIM_TRIPS, *columns(list(unused), 2))
            for key in unused:
                del owners[key]
        if len(fresh) == len(batch.pending):
            rows = batch.rows
        else:
            rows = [r for p in fresh for r in batch.rows_of(p)]
        if not rows:
            return owners
        try:
            try:
                async with conn.transaction():  # savepoint: a conflict falls back, not aborts
                    await conn.copy_records_to_table(PARENT, records=rows, columns=COLUMNS)
            except asyncpg.UniqueViolationError:
                batch.stored = await _insert_new_only(conn, batch, fresh)
                return owners
        except asyncpg.CheckViolationError as exc:  # from the COPY or the fallback INSERT
            if "no partition" in str(exc):
                raise MissingPartition(rows) from exc
            raise
        for p in fresh:
            p.accepted, p.duplicates = p.count, 0
        batch.stored = rows
    return owners


async def _insert_new_only(
    conn: asyncpg.Connection, batch: FlushBatch, fresh: list[Pending]
) -> list[Record]:
    """The slow path: stage, INSERT ... ON CONFLICT DO NOTHING, attribute rows to requests."""
    await conn.execute(_CREATE_STAGE)
    rows = [r for p in fresh for r in batch.rows_of(p)]
    await conn.copy_records_to_table(_STAGE, records=rows, columns=COLUMNS)
    inserted: set[tuple[str, str, datetime]] = {
        (r[0], r[1], r[2]) for r in await conn.fetch(_INSERT_NEW)
    }
    await conn.execute(f'TRUNCATE "{_STAGE}"')
    stored: list[Record] = []
    for p in fresh:
        accepted = 0
        for r in batch.rows_of(p):
            key = (r[ORG] or "", r[TRIP], r[TS])
            if key in inserted:
                inserted.discard(key)  # a second copy in the same flush is a duplicate
                stored.append(r)
                accepted += 1
        p.accepted, p.duplicates = accepted, p.count - accepted
    return stored
