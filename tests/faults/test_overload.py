"""Overload at several times the sustainable rate: 503 + Retry-After, bounded memory, and a
full recovery once the surge is over.

Storage is made slow on purpose so that the sustainable rate is low and known, whatever the
machine: a statement trigger on "TripLocation" (in this test's own database only) sleeps
in every flush's COPY, so the service can commit at most BUFFER_MAX_ROWS rows per SLOW_FLUSH_S.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg

from devtools.procs import rss_mib

from .conftest import slow_storage
from .load import Fleet, audit, report, scrape

SLOW_FLUSH_S = 0.25
BUFFER_MAX_ROWS = 1000
# Offered: 6000 pings/s. The buffer's limit counts rows waiting and rows being flushed, so
# the service commits about BUFFER_MAX_ROWS / 2 per slow flush: some 1500-2000 pings/s.
RATE, PINGS, SURGE_S = 60, 100, 3.0


async def test_overload_sheds_with_503_and_bounded_memory_then_recovers(
    services, shared_env, database
):
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(slow_storage(SLOW_FLUSH_S))
    finally:
        await conn.close()
    svc = await services(
        shared_env(
            BUFFER_MAX_ROWS=BUFFER_MAX_ROWS, FLUSH_MAX_ROWS=BUFFER_MAX_ROWS // 2,
            ACK_TIMEOUT_MS=3000, FLUSH_INTERVAL_MS=20,
        )
    )  # fmt: skip
    await asyncio.sleep(0.5)
    baseline = rss_mib(svc.pid)
    samples: list[tuple[float, float, float | None]] = []  # (time, rss MiB, buffer rows)

    async def sample(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rows = await scrape(session, svc.url, "ingest_buffer_rows")
            samples.append((time.monotonic(), rss_mib(svc.pid), rows))
            await asyncio.sleep(0.1)

    async with Fleet(
        [svc.url], name="overload", drivers=16, pings=PINGS, retry_after_cap=5.0, give_up_s=60,
        request_timeout=10,
    ) as fleet:  # fmt: skip
        assert fleet.session is not None
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample(fleet.session, stop))
        started = time.monotonic()
        await fleet.run(rate=RATE, duration=SURGE_S)
        surge_end = time.monotonic()
        await fleet.finish(60)
        drained_at = time.monotonic()
        stop.set()
        await sampler
        ready = await fleet.session.get(f"{svc.url}/readyz")
        ready.release()
        rows_after = await scrape(fleet.session, svc.url, "ingest_buffer_rows")
        probe = fleet.make_batch(pings=10)
        t0 = time.monotonic()
        await fleet.deliver(probe)
        probe_s = time.monotonic() - t0
    a = await audit(database, fleet)
    acks_in_surge = [
        b for b in fleet.batches if b.ack is not None and b.ack.ended <= surge_end
    ]  # fmt: skip
    stored_rate = sum(b.acked_pings for b in acks_in_surge) / (surge_end - started)
    offered = RATE * PINGS
    shed = [at for at in fleet.attempts() if at.status == 503]
    peak_rss = max(s[1] for s in samples)
    end_rss = samples[-1][1]
    max_rows = max((s[2] for s in samples if s[2] is not None), default=0)
    report(
        "overload", a, offered_pings_per_s=offered, acked_pings_per_s_in_surge=round(stored_rate),
        overload_factor=round(offered / max(stored_rate, 1), 1), answered_503=len(shed),
        rss_baseline_mib=round(baseline, 1), rss_peak_mib=round(peak_rss, 1),
        rss_end_mib=round(end_rss, 1), buffer_rows_max=max_rows,
        backlog_drained_s=round(drained_at - surge_end, 1), probe_ack_s=round(probe_s, 2),
    )  # fmt: skip
    assert offered >= 2.5 * stored_rate, "the surge was several times what the service can take"
    assert shed and all(at.retry_after for at in shed)
    assert set(a.outcomes) <= {"200", "503:overloaded", "503:storage_unavailable"}, a.outcomes
    assert max_rows <= BUFFER_MAX_ROWS
    assert peak_rss - baseline < 100, (baseline, peak_rss)
    # Full recovery: every batch acknowledged, nothing lost or doubled, the service idle and
    # ready, and a new batch acknowledged at once.
    assert a.lost == 0 and a.duplicated == 0 and a.count_mismatches == 0
    assert a.acked == a.sent == a.stored
    assert ready.status == 200 and rows_after == 0
    assert probe.ack is not None and probe.ack.status == 200 and probe_s < 2 * SLOW_FLUSH_S + 1
