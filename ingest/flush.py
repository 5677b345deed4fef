"""The flusher: one task that takes due batches from the buffer and commits them.

A failed commit is retried with backoff on a fresh connection, holding the same rows, so
nothing accepted into the buffer is dropped while PostgreSQL is away; requests waiting
for their ack time out on their own (503) and the phone retries with the same batchId.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from . import metrics, partitions, store
from .buffer import Buffer, FlushBatch, Pending
from .settings import Settings
from .validate import Record

log = logging.getLogger("ingest.flush")

# Errors that say "this data can never be stored" rather than "try again later".
_POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

OnCommitted = Callable[[list[Record]], None]


class Flusher:
    def __init__(
        self, settings: Settings, buffer: Buffer, pool: asyncpg.Pool, on_committed: OnCommitted
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.pool = pool
        self.on_committed = on_committed
        self.db_ok = True  # false from a failed flush until the next successful one
        self.lost_on_shutdown = 0

    async def run(self) -> None:
        """Flush until the buffer is closed and drained."""
        while (batch := await self.buffer.next_batch()) is not None:
            try:
                await self._commit_with_retry(batch)
            finally:
                self.buffer.done(batch)

    async def _commit_with_retry(self, batch: FlushBatch) -> None:
        s = self.settings
        delay = s.flush_retry_min_ms / 1000
        while True:
            started = time.perf_counter()
            try:
                async with self.pool.acquire() as conn:
                    stored = await asyncio.wait_for(store.commit(conn, batch), s.flush_timeout_s)
            except store.MissingPartition as exc:
                await self._create_partitions(exc.rows)
                continue
            except _POISON:
                log.exception("flush_poison", extra={"rows": len(batch.rows)})
                await self._commit_one_by_one(batch)
                return
            except Exception as exc:
                self.db_ok = False
                metrics.DB_ERRORS.labels("flush").inc()
                log.warning(
                    "flush_failed",
                    extra={"error": repr(exc), "rows": len(batch.rows), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.flush_retry_max_ms / 1000)
                continue
            self.db_ok = True
            metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
            metrics.FLUSH_ROWS.observe(len(batch.rows))
            _resolve(batch.pending)
            if stored:
                metrics.PINGS_STORED.inc(len(stored))
                self.on_committed(stored)
            dups = sum(p.duplicates for p in batch.pending)
            if dups:
                metrics.PINGS_DUPLICATE.inc(dups)
            return

    async def _create_partitions(self, rows: list[Record]) -> None:
        months = partitions.months_of(r[9] for r in rows)
        async with self.pool.acquire() as conn:
            created = await partitions.ensure(conn, months)
        log.info("partitions_created", extra={"partitions": created})

    async def _commit_one_by_one(self, batch: FlushBatch) -> None:
        """Isolate the request whose rows PostgreSQL refuses; commit the others."""
        for p in batch.pending:
            single = FlushBatch(batch.rows[p.start : p.start + p.count], [p])
            p.start = 0
            try:
                await self._commit_with_retry_single(single)
            except _POISON as exc:
                if p.future is not None and not p.future.done():
                    p.future.set_exception(exc)

    async def _commit_with_retry_single(self, batch: FlushBatch) -> None:
        async with self.pool.acquire() as conn:
            stored = await store.commit(conn, batch)
        _resolve(batch.pending)
        if stored:
            metrics.PINGS_STORED.inc(len(stored))
            self.on_committed(stored)

    def now(self) -> datetime:
        return datetime.now(UTC)


def _resolve(pending: list[Pending]) -> None:
    for p in pending:
        f = p.future
        if f is not None and not f.done():
            f.set_result(None)
