"""The buffer alone (no I/O): bounded, and a flush is due at FLUSH_MAX_ROWS or the interval."""

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


async def test_a_flush_is_due_at_max_rows_or_after_the_interval():
    buf = Buffer(max_rows=100, flush_max_rows=10, flush_interval_s=0.2)
    loop = asyncio.get_running_loop()
    buf.add(rows(3, "a"), "drv", None, durable=False)
    started = loop.time()
    batch = await buf.next_batch()
    assert batch is not None and len(batch.rows) == 3
    assert loop.time() - started >= 0.15  # waited for the interval
    buf.done(batch)
    waiter = asyncio.ensure_future(buf.next_batch())
    buf.add(rows(3, "b"), "drv", None, durable=False)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    buf.add(rows(7, "c"), "drv", None, durable=False)  # 10 waiting: due now
    batch = await asyncio.wait_for(waiter, 0.1)
    assert len(batch.rows) == 10
    assert buf.waited() > 0  # being flushed still counts
    buf.done(batch)
    assert buf.waited() == 0.0
    buf.close()
    assert await buf.next_batch() is None


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
