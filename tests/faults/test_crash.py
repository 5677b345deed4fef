"""kill -9 of the service in the middle of the load, then a restart on the same address."""

from __future__ import annotations

import asyncio
import time

from .load import Fleet, audit, report, scrape


async def test_kill_9_with_durable_acks_loses_nothing_acknowledged(services, shared_env, database):
    # A flush interval long enough that the kill finds requests waiting for their commit.
    svc = await services(shared_env(ACK_MODE="durable", FLUSH_INTERVAL_MS=200))
    async with Fleet([svc.url], name="kill9-durable", pings=25) as fleet:
        load = asyncio.ensure_future(fleet.run(rate=30, duration=7))
        await asyncio.sleep(3)
        svc.kill9()
        killed_at = time.monotonic()
        assert await svc.wait(5) == -9
        restart_s = await svc.start()
        await load
        await fleet.finish(40)
    a = await audit(database, fleet)
    cut = fleet.outcomes(killed_at - 0.01, killed_at + 0.5)
    report(
        "kill9_durable", a, restart_s=round(restart_s, 2),
        unanswered_at_kill=cut["disconnected"] + cut["timeout"],
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0
    assert a.count_mismatches == 0
    assert a.acked == a.sent, "every batch is acknowledged once the service is back"
    assert a.stored == a.sent


async def test_kill_9_with_buffered_acks_loses_at_most_what_was_buffered(
    services, shared_env, database
):
    interval_ms, buffer_max = 300, 5000
    svc = await services(
        shared_env(ACK_MODE="buffered", FLUSH_INTERVAL_MS=interval_ms, BUFFER_MAX_ROWS=buffer_max)
    )
    async with Fleet([svc.url], name="kill9-buffered", pings=25) as fleet:
        load = asyncio.ensure_future(fleet.run(rate=30, duration=7))
        await asyncio.sleep(3)
        assert fleet.session is not None
        buffered = await scrape(fleet.session, svc.url, "ingest_buffer_rows")
        svc.kill9()
        killed_at = time.monotonic()
        assert await svc.wait(5) == -9
        restart_s = await svc.start()
        await load
        await fleet.finish(40)
    a = await audit(database, fleet)
    # How long before the kill the oldest lost ping was sent: an upper bound on how long it
    # was held in memory before the process died.
    window_ms = max(
        (round((killed_at - b.ack.started) * 1000) for b, _ in a.lost_stamps if b.ack), default=0
    )
    report(
        "kill9_buffered", a, restart_s=round(restart_s, 2), buffer_rows_before_kill=buffered,
        loss_window_ms=window_ms, flush_interval_ms=interval_ms,
    )  # fmt: skip
    assert a.duplicated == 0
    assert a.lost <= buffer_max
    # Only pings still in memory can be lost: acknowledged within the last flush interval
    # plus the time one flush takes (generous on a shared machine).
    assert window_ms <= interval_ms + 1500, window_ms
    assert a.stored + a.lost == a.sent, "only the buffered-and-acked pings are missing"
