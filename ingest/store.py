"""PostgreSQL writes: one flush = one transaction = one binary COPY, with dedup.

Fast path (no duplicates): record the flush's batch ids, COPY every row of the new batches
straight into "TripLocation". Only when the unique guard on ("tripId", "timestamp") fires
does the flush fall back to staging the rows in a temporary table and inserting them with
ON CONFLICT DO NOTHING, which tells exactly which rows were new.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from .buffer import FlushBatch, Pending
from .partitions import PARENT
from .validate import COLUMNS, TRIP, TS, Record

_COLS = ", ".join(f'"{c}"' for c in COLUMNS)
_CLAIM_BATCHES = """
INSERT INTO "IngestBatch" ("driverId", "batchId")
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
RETURNING "driverId", "batchId"
"""
_STAGE = "_ingest_stage"
_CREATE_STAGE = (
    f'CREATE TEMP TABLE IF NOT EXISTS "{_STAGE}" '
    f'(LIKE "{PARENT}" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
)
_INSERT_NEW = f"""
INSERT INTO "{PARENT}" ({_COLS})
SELECT {_COLS} FROM "{_STAGE}"
ON CONFLICT ("tripId", "timestamp") DO NOTHING
RETURNING "tripId", "timestamp"
"""


class MissingPartition(Exception):
    """A row fell in a month without a partition; create it and retry the flush."""

    def __init__(self, rows: list[Record]) -> None:
        super().__init__("no partition for some rows")
        self.rows = rows


def _split_replays(pending: list[Pending], new_keys: set[tuple[str, str]]) -> list[Pending]:
    """Mark the batches whose id was stored before (or earlier in this flush) as replays."""
    fresh, seen = [], set()
    for p in pending:
        if p.batch_id is None:
            fresh.append(p)
            continue
        key = (p.driver_id, p.batch_id)
        if key in new_keys and key not in seen:
            seen.add(key)
            fresh.append(p)
        else:
            p.accepted, p.duplicates = 0, p.count
    return fresh


async def commit(conn: asyncpg.Connection, batch: FlushBatch) -> list[Record]:
    """Commit one flush; fill each Pending's accepted/duplicates; return the rows newly stored."""
    rows, pending = batch.rows, batch.pending
    async with conn.transaction():
        # Sorted, so two pods claiming the same ids lock them in the same order (no deadlock).
        keyed = sorted(
            (p for p in pending if p.batch_id is not None),
            key=lambda p: (p.driver_id, p.batch_id or ""),
        )
        if keyed:
            claimed = await conn.fetch(
                _CLAIM_BATCHES, [p.driver_id for p in keyed], [p.batch_id for p in keyed]
            )
            fresh = _split_replays(pending, {(r[0], r[1]) for r in claimed})
            if len(fresh) != len(pending):
                rows = [r for p in fresh for r in batch.rows[p.start : p.start + p.count]]
        else:
            fresh = pending
        if not rows:
            return rows
        try:
            async with conn.transaction():  # savepoint: a conflict falls back, not aborts
                await conn.copy_records_to_table(PARENT, records=rows, columns=COLUMNS)
        except asyncpg.UniqueViolationError:
            return await _insert_new_only(conn, batch, fresh)
        except asyncpg.CheckViolationError as exc:
            if "no partition" in str(exc):
                raise MissingPartition(rows) from exc
            raise
        for p in fresh:
            p.accepted, p.duplicates = p.count, 0
        return rows


async def _insert_new_only(
    conn: asyncpg.Connection, batch: FlushBatch, fresh: list[Pending]
) -> list[Record]:
    """The slow path: stage, INSERT ... ON CONFLICT DO NOTHING, attribute rows to requests."""
    await conn.execute(_CREATE_STAGE)
    rows = [r for p in fresh for r in batch.rows[p.start : p.start + p.count]]
    await conn.copy_records_to_table(_STAGE, records=rows, columns=COLUMNS)
    inserted: set[tuple[str, datetime]] = {(r[0], r[1]) for r in await conn.fetch(_INSERT_NEW)}
    await conn.execute(f'TRUNCATE "{_STAGE}"')
    stored: list[Record] = []
    for p in fresh:
        accepted = 0
        for r in batch.rows[p.start : p.start + p.count]:
            key = (r[TRIP], r[TS])
            if key in inserted:
                inserted.discard(key)  # a second copy in the same flush is a duplicate
                stored.append(r)
                accepted += 1
        p.accepted, p.duplicates = accepted, p.count - accepted
    return stored
