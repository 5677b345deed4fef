"""The buffer alone (no I/O): bounded; a flush is due at once when none is in flight, and a
further one (FLUSH_CONCURRENCY) at FLUSH_MAX_ROWS or the interval."""

from __future__ import annotations

import asyncio

import pytest

from ingest.buffer import AckTimeout, Buffer, BufferFull, Closed


def rows(n: int, tag: str) -> list:
    # Stand-ins for records: the buffer reads only the trip (0) and org (2) of the first one.
    return [(tag, "drv", "org", i) for i in range(n)]


async def test_take_takes_every_waiting_request_in_order():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=1)
    for tag, n in (("a", 4), ("b", 30)):
        buf.add(rows(n, tag), "drv", None, durable=True)
    batch = buf.take()
    assert batch.rows == rows(4, "a") + rows(30, "b")
    assert [(p.start, p.count) for p in batch.pending] == [(0, 4), (4, 30)]
    buf.add(rows(2, "c"), "drv", None, durable=True)
    assert buf.depth == 36  # rows being flushed still count
    assert buf.take().pending[0].start == 0
    buf.done(batch)
    assert buf.depth == 2


async def test_the_limit_counts_rows_being_flushed():
    buf = Buffer(max_rows=10, flush_max_rows=5, flush_interval_s=1)
    buf.add(rows(5, "a"), "drv", None, durable=False)
    batch = buf.take()
    buf.add(rows(5, "b"), "drv", None, durable=False)
    with pytest.raises(BufferFull):
        buf.add(rows(1, "c"), "drv", None, durable=False)
    buf.done(batch)
    buf.add(rows(1, "c"), "drv", None, durable=False)
    buf.close()
    with pytest.raises(Closed):
        buf.add(rows(1, "d"), "drv", None, durable=False)


async def test_a_flush_starts_at_once_when_none_is_in_flight():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=10)
    waiter = asyncio.ensure_future(buf.next_batch())
    await asyncio.sleep(0)
    assert not waiter.done()  # nothing waits: nothing to flush
    buf.add(rows(1, "a"), "drv", None, durable=True)
    # Far sooner than the 10 s interval: taken as soon as the flusher runs.
    batch = await asyncio.wait_for(waiter, 1.0)
    assert batch is not None and batch.rows == rows(1, "a")
    buf.done(batch)
    buf.close()
    assert await buf.next_batch() is None


async def test_rows_arriving_during_a_flush_gather_for_the_next():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=0.01)
    buf.add(rows(1, "a"), "drv", None, durable=True)
    flight = await buf.next_batch()
    assert flight is not None
    waiter = asyncio.ensure_future(buf.next_batch())
    for tag in "bcd":
        buf.add(rows(4, tag), "drv", None, durable=True)  # 12 rows: past FLUSH_MAX_ROWS
    await asyncio.sleep(0.05)  # past the interval too
    assert not waiter.done()  # one flush in flight at most (max_flights=1)
    assert buf.waited() >= 0.04  # the flight's oldest row (loop time in whole ms)
    buf.done(flight)
    batch = await asyncio.wait_for(waiter, 1.0)
    assert batch is not None and batch.rows == rows(4, "b") + rows(4, "c") + rows(4, "d")
    assert [p.start for p in batch.pending] == [0, 4, 8]
    buf.done(batch)
    assert buf.waited() == 0.0


async def test_after_a_flush_the_next_gathers_for_half_as_long_as_it_took():
    """Under load the clients a flush answers send again right away: they share the next flush
    with the rows that arrived during it, instead of alternating with them in two halves."""
    buf = Buffer(max_rows=1000, flush_max_rows=100, flush_interval_s=10)
    buf.add(rows(1, "a"), "drv", None, durable=True)
    flight = await buf.next_batch()
    assert flight is not None
    buf.add(rows(2, "b"), "drv", None, durable=True)  # arrived during the flush
    await asyncio.sleep(1.0)  # the flush takes 1 s: the next gathers for 0.5 s after it
    waiter = asyncio.ensure_future(buf.next_batch())
    buf.done(flight)
    await asyncio.sleep(0.05)
    assert not waiter.done()
    buf.add(rows(3, "c"), "drv", None, durable=True)  # a client it answered, back
    batch = await asyncio.wait_for(waiter, 5.0)
    assert batch is not None and batch.rows == rows(2, "b") + rows(3, "c")
    await asyncio.sleep(0.1)
    buf.done(batch)  # a flush of 0.1 s: the next gathers for 0.05 s
    buf.add(rows(1, "d"), "drv", None, durable=True)
    taker = asyncio.ensure_future(buf.next_batch())
    await asyncio.sleep(0)
    assert not taker.done()
    assert (await asyncio.wait_for(taker, 1.0)) is not None


async def test_gathering_stops_at_max_rows_or_the_interval():
    for flush_max_rows, interval, extra in ((5, 10.0, 5), (100, 0.2, 1)):
        buf = Buffer(max_rows=1000, flush_max_rows=flush_max_rows, flush_interval_s=interval)
        buf.add(rows(1, "a"), "drv", None, durable=True)
        flight = await buf.next_batch()
        assert flight is not None
        buf.add(rows(extra, "b"), "drv", None, durable=True)
        await asyncio.sleep(interval + 0.3 if interval < 1 else 0.3)
        buf.done(flight)  # the flight took 0.3 s or more: gathering would last 0.15 s at least
        # FLUSH_MAX_ROWS waiting, or the oldest row past the interval: taken without waiting.
        taker = asyncio.ensure_future(buf.next_batch())
        await asyncio.sleep(0)
        assert taker.done()
        batch = taker.result()
        assert batch is not None and batch.rows == rows(extra, "b")


async def test_a_second_flight_starts_after_the_interval():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=0.2, max_flights=2)
    loop = asyncio.get_running_loop()
    buf.add(rows(1, "a"), "drv", None, durable=True)
    first = await buf.next_batch()
    assert first is not None
    second = asyncio.ensure_future(buf.next_batch())
    added = loop.time()
    buf.add(rows(3, "b"), "drv", None, durable=True)
    batch = await asyncio.wait_for(second, 5.0)
    assert batch is not None and batch.rows == rows(3, "b")
    assert loop.time() - added >= 0.19  # the interval caps waiting; it was not skipped
    third = asyncio.ensure_future(buf.next_batch())
    buf.add(rows(1, "c"), "drv", None, durable=True)
    await asyncio.sleep(0.3)
    assert not third.done()  # two in flight: the most allowed
    buf.done(first)
    assert (await asyncio.wait_for(third, 1.0)).rows == rows(1, "c")  # type: ignore[union-attr]


async def test_a_second_flight_starts_at_max_rows():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=10, max_flights=2)
    buf.add(rows(1, "a"), "drv", None, durable=True)
    first = await buf.next_batch()
    waiter = asyncio.ensure_future(buf.next_batch())
    buf.add(rows(3, "b"), "drv", None, durable=False)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    buf.add(rows(7, "c"), "drv", None, durable=False)  # 10 waiting: due now
    batch = await asyncio.wait_for(waiter, 1.0)
    assert batch is not None and len(batch.rows) == 10
    assert first is not None and buf.flights == [first, batch]


async def test_close_drains_in_a_second_flight_at_once():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=10, max_flights=2)
    buf.add(rows(1, "a"), "drv", None, durable=True)
    first = await buf.next_batch()
    waiter = asyncio.ensure_future(buf.next_batch())
    buf.add(rows(2, "b"), "drv", None, durable=True)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    buf.close()
    batch = await asyncio.wait_for(waiter, 1.0)
    assert batch is not None and batch.rows == rows(2, "b")
    assert first is not None and await buf.next_batch() is None  # other flights: theirs


async def test_waiters_past_the_ack_timeout_fail_oldest_first():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=1)
    old = buf.add(rows(2, "a"), "drv", None, durable=True)
    flight = buf.take()  # being flushed still expires
    await asyncio.sleep(0.2)
    new = buf.add(rows(2, "b"), "drv", None, durable=True)
    assert buf.expire_waiters(0.1) == 1
    with pytest.raises(AckTimeout):
        await old.future
    assert not new.future.done()
    assert buf.depth == 4  # the rows stay, to be committed
    buf.done(flight)
