"""Bounded in-memory buffer of validated pings, and the group-commit futures (no I/O here).

Requests append their records and, in durable mode, await a future that the flusher
resolves once the flush holding those records has committed.

Group commit, as databases do it: a flush starts at once when none is in flight, and rows
arriving meanwhile gather for the next one, which starts once that flush has ended and half
as long again has passed (GATHER: the clients it answered come back in time to share it). So
a lone ping is committed without waiting, and under load each flush takes everything that
came during the one before. FLUSH_MAX_ROWS waiting, or the oldest row having waited
FLUSH_INTERVAL_MS, cuts the gathering short: the interval caps how long a row waits.
With FLUSH_CONCURRENCY above 1, a further flush may start while others are in flight, once
FLUSH_MAX_ROWS rows wait or the oldest waited FLUSH_INTERVAL_MS.
"""

from __future__ import annotations

import asyncio
import contextlib

from .records import ORG, TRIP, Record

# After a flush, the next one gathers for this fraction of the time it took (next_batch).
GATHER = 0.5


class BufferFull(Exception):
    """More rows are held than BUFFER_MAX_ROWS allows: answer 503."""


class Closed(Exception):
    """The buffer stopped taking work (shutdown): answer 503."""


class AckTimeout(Exception):
    """Not committed within ACK_TIMEOUT_MS: answer 503; the rows stay and will be committed."""


class Refused(Exception):
    """The flush refused a request's rows for good, storing none of them (4xx)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class Pending:
    """One request's share of a flush: its slice of rows (one org, one trip, one driver) and,
    once committed, its counts, or why it was refused."""

    __slots__ = (
        "accepted", "arrived", "batch_id", "count", "driver_id", "duplicates", "future", "org",
        "refused", "start", "trip",
    )  # fmt: skip

    def __init__(
        self, org: str, trip: str, driver_id: str, batch_id: str | None, start: int, count: int,
        future: asyncio.Future[None] | None, arrived: float,
    ) -> None:  # fmt: skip
        self.arrived = arrived  # loop time
        self.org = org
        self.trip = trip
        self.driver_id = driver_id
        self.batch_id = batch_id
        self.start = start
        self.count = count
        self.future = future
        self.accepted = 0
        self.duplicates = 0
        self.refused: Refused | None = None

    def reset(self) -> None:
        """Forget the outcome of a commit that did not happen, before it is tried again."""
        self.accepted = self.duplicates = 0
        self.refused = None


class FlushBatch:
    """What one flush commits: rows in arrival order and the requests they belong to; while
    committing, the transaction's id and what it stores (to resolve a lost COMMIT reply)."""

    __slots__ = ("backend_pid", "flush_id", "pending", "rows", "stored", "taken", "xid")

    def __init__(self, rows: list[Record], pending: list[Pending], taken: float = 0.0) -> None:
        self.rows = rows
        self.pending = pending
        self.taken = taken  # loop time
        self.flush_id = 0  # the "IngestFlush" row of the current attempt (store.py)
        self.xid: str | None = None  # its transaction, once it has one
        self.backend_pid = 0
        self.stored: list[Record] = []

    def rows_of(self, p: Pending) -> list[Record]:
        return self.rows[p.start : p.start + p.count]


class Buffer:
    def __init__(
        self, max_rows: int, flush_max_rows: int, flush_interval_s: float, max_flights: int = 1
    ) -> None:
        self.max_rows = max_rows
        self.flush_max_rows = flush_max_rows
        self.flush_interval_s = flush_interval_s
        self.max_flights = max_flights
        self.rows: list[Record] = []
        self.pending: list[Pending] = []
        self.in_flight = 0  # rows taken by a flush that has not finished
        self.flights: list[FlushBatch] = []  # flushes not finished, in the order taken
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        # After a flush, the next waits until then (next_batch).
        self._gather_until = 0.0

    @property
    def depth(self) -> int:
        """Rows held in memory: waiting plus being flushed."""
        return len(self.rows) + self.in_flight

    def expire_waiters(self, max_wait_s: float) -> int:
        """Fail (AckTimeout) the futures of requests waiting longer than ``max_wait_s``.

        Swept a few times a second for all requests, instead of a timer per request (a timer
        costs a getpid() system call per request on Python 3.11, ~4% of the ingest CPU).
        """
        cutoff = self._loop.time() - max_wait_s
        expired = 0
        for group in [*(f.pending for f in self.flights), self.pending]:
            for p in group:  # in arrival order
                if p.arrived > cutoff:
                    return expired
                f = p.future
                if f is not None and not f.done():
                    f.set_exception(AckTimeout())
                    f.exception()  # retrieved: the request may be gone already
                    expired += 1
        return expired

    def waited(self) -> float:
        """How far behind the buffer is, in seconds: how long the oldest row has waited, of
        those not taken yet and, when every flush slot is taken, of the newest flush (0 if
        none). With FLUSH_CONCURRENCY above 1, one flush held up (a locked row) while another
        slot commits is not the pod falling behind; every slot held up is."""
        now = self._loop.time()
        behind = now - self.pending[0].arrived if self.pending else 0.0
        flights = self.flights
        if flights and len(flights) >= self.max_flights and flights[-1].pending:
            behind = max(behind, now - flights[-1].pending[0].arrived)
        return behind

    def add(
        self, records: list[Record], driver_id: str, batch_id: str | None, durable: bool
    ) -> Pending:
        if self.closed:
            raise Closed
        n = len(records)
        if self.depth + n > self.max_rows:
            raise BufferFull
        rows = self.rows
        was_empty = not rows
        loop = self._loop
        future = loop.create_future() if durable else None
        first = records[0]
        pending = Pending(
            first[ORG] or "", first[TRIP], driver_id, batch_id, len(rows), n, future, loop.time()
        )
        rows.extend(records)
        self.pending.append(pending)
        if was_empty or len(rows) >= self.flush_max_rows:
            self._wakeup.set()
        return pending

    def close(self) -> None:
        """Stop taking work; the flusher drains what is left and returns."""
        self.closed = True
        self._wakeup.set()

    def take(self) -> FlushBatch:
        """Every waiting row: one flush commits all of them. (Capping a flush at
        FLUSH_MAX_ROWS was measured: under a flood of buffered acks it cut stored pings/s from
        119k to 30k, as small flushes lost the CPU to the requests piling up behind them.)"""
        batch = FlushBatch(self.rows, self.pending, self._loop.time())
        self.rows, self.pending = [], []
        self.in_flight += len(batch.rows)
        self.flights.append(batch)
        return batch

    def done(self, batch: FlushBatch) -> None:
        self.in_flight -= len(batch.rows)
        self.flights.remove(batch)
        now = self._loop.time()
        self._gather_until = now + min((now - batch.taken) * GATHER, self.flush_interval_s)
        self._wakeup.set()

    async def next_batch(self) -> FlushBatch | None:
        """Wait until a flush is due and take it; None once closed and empty. Due: rows wait,
        no flush is in flight and the gathering after the last one is over; or, the first
        flush or below ``max_flights`` in flight, FLUSH_MAX_ROWS rows wait, the oldest waited
        FLUSH_INTERVAL_MS, or the buffer is closed (drain)."""
        loop = self._loop
        while True:
            timeout: float | None = None  # None: until add(), done() or close()
            if self.rows and (flights := len(self.flights)) < self.max_flights:
                deadline = self.pending[0].arrived + self.flush_interval_s
                if not flights:
                    # Right after a flush, gather for half as long as it took (at most the
                    # interval), so that the clients it answered send again in time to share
                    # the next one: under load, back-to-back flushes would otherwise split
                    # the clients into two halves that alternate, each flush half as large
                    # (measured at b20 c256: 15% fewer pings/s, 17% more CPU per ping).
                    # Idle, that time is long past and the flush starts at once.
                    deadline = min(self._gather_until, deadline)
                timeout = deadline - loop.time()
                if timeout <= 0 or self.closed or len(self.rows) >= self.flush_max_rows:
                    return self.take()
            elif not self.rows and self.closed:
                return None
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
