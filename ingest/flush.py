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

import asyncpg

from . import metrics, partitions, store
from .buffer import Buffer, FlushBatch, Pending
from .settings import Settings
from .validate import Record

log = logging.getLogger("ingest.flush")

# Errors that say "this data can never be stored" rather than "try again later".
_POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

OnCommitted = Callable[[list[Record]], None]


class ShuttingDown(Exception):
    """The pod is leaving before this commit could happen: retry elsewhere (503)."""


class Flusher:
    def __init__(
        self, settings: Settings, buffer: Buffer, pool: asyncpg.Pool, on_committed: OnCommitted
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.pool = pool
        self.on_committed = on_committed
        self.db_ok = True  # false from a failed flush until the next successful one
        self._current: FlushBatch | None = None

    async def run(self) -> None:
        """Flush until the buffer is closed and drained."""
        while (batch := await self.buffer.next_batch()) is not None:
            self._current = batch
            try:
                await self._commit_with_retry(batch)
            except Exception as exc:  # a bug, not an outage: fail these requests, keep flushing
                log.exception("flush_crashed", extra={"rows": len(batch.rows)})
                _fail(batch.pending, exc)
            finally:
                self._current = None
                self.buffer.done(batch)

    def abandon_waiters(self) -> None:
        """Shutdown: answer every request still waiting for a commit (503), keep the rows."""
        pending = self.buffer.pending + (self._current.pending if self._current else [])
        _fail(pending, ShuttingDown())

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
            except _POISON as exc:
                # PostgreSQL refuses some row for good: find the request it belongs to by
                # committing each request alone; only that one fails (500).
                log.exception("flush_refused", extra={"rows": len(batch.rows)})
                metrics.DB_ERRORS.labels("flush_refused").inc()
                if len(batch.pending) == 1:
                    _fail(batch.pending, exc)
                    return
                for p in batch.pending:
                    single = FlushBatch(batch.rows[p.start : p.start + p.count], [p])
                    p.start = 0
                    await self._commit_with_retry(single)
                return
            except Exception as exc:
                self.db_ok = False
                metrics.DB_ERRORS.labels("flush").inc()
                # After a failover or a silent network, no pooled connection can be trusted:
                # replace them all rather than time out on each in turn.
                await self.pool.expire_connections()
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


def _fail(pending: list[Pending], exc: BaseException) -> None:
    for p in pending:
        f = p.future
        if f is not None and not f.done():
            f.set_exception(exc)
            f.exception()  # retrieved here: the request may have timed out already


def _resolve(pending: list[Pending]) -> None:
    for p in pending:
        f = p.future
        if f is not None and not f.done():
            f.set_result(None)
