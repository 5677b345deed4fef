"""The flusher: FLUSH_CONCURRENCY loops (one by default) that take due batches from the
buffer and commit them (when a flush is due: buffer.py).

A failed commit is retried with backoff on a fresh connection, holding the same rows, so
nothing accepted into the buffer is dropped while PostgreSQL is away (missing partitions are
created on that same retry path); requests waiting for their ack time out on their own (503)
and the phone retries with the same batchId.

A commit whose reply was lost (COMMIT sent, connection gone) has an unknown outcome; retrying
it blindly would find its own batch claims and call every ping a duplicate. It is resolved by
what the flush itself wrote: each attempt inserts a row of its own into "IngestFlush" in its
transaction; once that transaction is certainly over (its backend gone, ended if need be), the
row is there if and only if it committed. (A transaction id alone would not do: after a crash
PostgreSQL may hand the id of a transaction that never reached the WAL to another one.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable

import asyncpg

from . import metrics, partitions, store
from .buffer import Buffer, FlushBatch, Pending
from .owners import OwnerCache
from .records import TS, Record
from .settings import Settings

log = logging.getLogger("ingest.flush")

# Errors that say "this data can never be stored" rather than "try again later".
_POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
# A transaction still running this long after its connection was lost is ended, so that its
# outcome becomes known (it is aborted: the flush is then retried).
_IN_PROGRESS_LIMIT_S = 2.0

OnCommitted = Callable[[list[Record]], None]

_RUNNING = "SELECT true FROM pg_stat_activity WHERE pid = $1 AND backend_xid::text = $2"
_FLUSHED = 'SELECT true FROM "IngestFlush" WHERE "id" = $1'


def new_flush_id() -> int:
    """Unique enough, and ordered by time so that old ones are deleted by range: epoch ms in
    the high bits, 20 random bits below (a collision fails that flush's insert; it is then
    committed request by request, with new ids)."""
    return (time.time_ns() // 1_000_000) << 20 | secrets.randbits(20)


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
        self.owners = OwnerCache(settings.owner_cache_ttl_s)
        # Flushes (by id) retrying after a PostgreSQL failure. One set for all the loops: with
        # FLUSH_CONCURRENCY 2, one loop's success says nothing of the other's retries.
        self._retrying: set[int] = set()

    @property
    def db_ok(self) -> bool:
        """False while some flush is retrying after a PostgreSQL failure (readiness)."""
        return not self._retrying

    async def run(self) -> None:
        """Flush until the buffer is closed and drained (every loop returned)."""
        n = self.buffer.max_flights
        if n == 1:
            await self._loop()
            return
        async with asyncio.TaskGroup() as group:
            for i in range(n):
                group.create_task(self._loop(), name=f"flusher-{i}")

    async def _loop(self) -> None:
        buffer = self.buffer
        while (batch := await buffer.next_batch()) is not None:
            try:
                await self._commit_with_retry(batch)
            except Exception as exc:  # a bug past the commit: fail these requests, keep flushing
                log.exception("flush_crashed", extra={"rows": len(batch.rows)})
                _fail(batch.pending, exc)
            finally:
                buffer.done(batch)

    def abandon_waiters(self) -> None:
        """Shutdown: answer every request still waiting for a commit (503), keep the rows."""
        flights = [p for f in self.buffer.flights for p in f.pending]
        _fail(flights + self.buffer.pending, ShuttingDown())

    async def _commit_with_retry(self, batch: FlushBatch) -> None:
        try:
            await self._commit_until_done(batch)
        finally:
            self._retrying.discard(id(batch))

    async def _commit_until_done(self, batch: FlushBatch) -> None:
        s = self.settings
        delay = s.flush_retry_min_ms / 1000
        while True:
            started = time.perf_counter()
            batch.xid, batch.flush_id = None, new_flush_id()
            try:
                async with self.pool.acquire() as conn:
                    owners = await asyncio.wait_for(
                        store.commit(conn, batch, s.max_trips_per_driver_per_day),
                        s.flush_timeout_s,
                    )
            except store.MissingPartition as exc:
                try:
                    await self._create_partitions(exc.rows)
                except Exception as exc2:  # PostgreSQL failing right now: retry as an outage
                    delay = await self._outage(batch, exc2, delay)
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
                    single = FlushBatch(batch.rows_of(p), [p])
                    p.start = 0
                    await self._commit_with_retry(single)
                return
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                # PostgreSQL aborted this flush to end a deadlock with another pod's (retries of
                # the same pings meeting their keys in opposite orders), and said so: the
                # outcome is known, the connection sound, and the other flush goes on. Not an
                # outage: go again at once (after a random pause, so the two do not meet again).
                metrics.DB_ERRORS.labels("flush_conflict").inc()
                log.warning("flush_conflict", extra={"rows": len(batch.rows), "error": repr(exc)})
                await asyncio.sleep(random.uniform(0, s.flush_retry_min_ms / 1000))
                continue
            except Exception as exc:
                # If the transaction got as far as COMMIT before the connection was lost (or
                # timed out, or the server shut down), it may have committed: ask, then retry.
                if batch.xid is not None and await self._committed_after_all(batch, exc):
                    self._done(batch, None, started)
                    return
                delay = await self._outage(batch, exc, delay)
                continue
            self._done(batch, owners, started)
            return

    def _done(self, batch: FlushBatch, owners: store.Owners | None, started: float) -> None:
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.FLUSH_ROWS.observe(len(batch.rows))
        if owners:
            self.owners.update(owners)
        for p in batch.pending:
            if p.refused is not None:
                metrics.BATCHES_REFUSED.labels(p.refused.code).inc()
                if p.refused.status == 429:
                    self.owners.limited(p.org, p.driver_id)
        _resolve(batch.pending)
        stored = batch.stored
        if stored:
            metrics.PINGS_STORED.inc(len(stored))
            self.on_committed(stored)
        dups = sum(p.duplicates for p in batch.pending)
        if dups:
            metrics.PINGS_DUPLICATE.inc(dups)

    async def _outage(self, batch: FlushBatch, exc: BaseException, delay: float) -> float:
        """A failed flush attempt: back off (_backoff); return the next delay."""
        extra: dict[str, object] = {"rows": len(batch.rows), "retry_in_s": delay}
        return await self._backoff("flush_failed", exc, delay, extra, batch)

    async def _backoff(
        self, event: str, exc: BaseException, delay: float, extra: dict[str, object],
        batch: FlushBatch,
    ) -> float:  # fmt: skip
        """Count and log a failed PostgreSQL attempt of ``batch``, drop the pooled
        connections, sleep ``delay``; return the next delay."""
        self._retrying.add(id(batch))
        metrics.DB_ERRORS.labels("flush").inc()
        # After a failover or a silent network, no pooled connection can be trusted:
        # replace them all rather than time out on each in turn.
        await self.pool.expire_connections()
        log.warning(event, extra={"error": repr(exc), **extra})
        await asyncio.sleep(delay)
        return min(delay * 2, self.settings.flush_retry_max_ms / 1000)

    async def _committed_after_all(self, batch: FlushBatch, exc: BaseException) -> bool:
        """Whether the transaction of a flush that failed without PostgreSQL's answer committed.
        Waits until it is certainly over (its backend ending it after a lost connection, or
        ended here after _IN_PROGRESS_LIMIT_S), then looks for the flush's own row."""
        s, xid, pid, flush_id = self.settings, batch.xid, batch.backend_pid, batch.flush_id
        delay, first = s.flush_retry_min_ms / 1000, time.monotonic()
        log.warning("commit_outcome_unknown", extra={"error": repr(exc), "flush_id": flush_id})
        while True:
            try:
                async with self.pool.acquire() as conn:
                    # Our backend, still in our transaction: the pid and the transaction id
                    # both match (either alone may have been reused after a restart).
                    running = await conn.fetchval(_RUNNING, pid, xid)
                    if running and time.monotonic() - first > _IN_PROGRESS_LIMIT_S:
                        await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                    committed = None if running else await conn.fetchval(_FLUSHED, flush_id)
            except Exception as exc2:
                delay = await self._backoff("commit_outcome_check_failed", exc2, delay, {}, batch)
                continue
            if running:
                await asyncio.sleep(0.05)
                continue
            outcome = "committed" if committed else "aborted"
            metrics.COMMITS_RESOLVED.labels(outcome).inc()
            log.info("commit_outcome_resolved", extra={"flush_id": flush_id, "outcome": outcome})
            return bool(committed)

    async def _create_partitions(self, rows: list[Record]) -> None:
        months = partitions.months_of(r[TS] for r in rows)
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
            if p.refused is not None:
                f.set_exception(p.refused)
                f.exception()
            else:
                f.set_result(None)
