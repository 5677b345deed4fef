"""PostgreSQL replication faults: a replica that lags or goes away (reads fall back to the
primary and come back), and a failover under load (the standby promoted, the service
writing to it with no restart, every acked ping stored once)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from devtools.services import PostgresPair
from ingest.typedefs import READ_REPLICA

from ..conftest import PING, REDIS_URL, auth, batch, now_ms
from ..test_reads import history, replica_client, sample, started_pair, until
from .conftest import service_env
from .load import Fleet, audit, report


@pytest.fixture(scope="module")
def pair() -> Iterator[PostgresPair]:
    with started_pair() as p:
        yield p


async def test_a_lagging_replica_sends_reads_to_the_primary_until_it_catches_up(make_client, pair):
    client = await replica_client(make_client, pair, read_max_lag_s=1)
    replica = client.server.app[READ_REPLICA]
    trip, org = f"trip-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    driver, dispatcher = auth("driver", "drv_1", org), auth("dispatcher", "disp", org)
    r = await client.post(PING, json=batch(2, trip=trip, start_ms=now_ms(-900)), headers=driver)
    assert r.status == 200
    await asyncio.to_thread(pair.wait_replayed)

    await asyncio.to_thread(pair.query, pair.standby, "SELECT pg_wal_replay_pause()")
    try:
        r = await client.post(PING, json=batch(3, trip=trip, start_ms=now_ms(-600)), headers=driver)
        assert r.status == 200  # the standby receives the WAL (synchronous), replays none
        await until(lambda: replica.fallback_reason() == "lag")
        assert replica.lag_s > 1
        lag_before = sample("ingest_read_fallbacks_total", reason="lag")
        status, body = await history(client, trip, dispatcher)
        assert status == 200 and len(body["locations"]) == 5  # the primary's, up to date
        assert sample("ingest_read_fallbacks_total", reason="lag") == lag_before + 1
        assert sample("ingest_read_replica_lag_seconds") > 1
    finally:
        await asyncio.to_thread(pair.query, pair.standby, "SELECT pg_wal_replay_resume()")

    await until(lambda: replica.fallback_reason() is None)
    assert replica.lag_s == 0  # caught up: 0, though the primary is idle now
    on_replica = sample("ingest_replica_reads_total")
    status, body = await history(client, trip, dispatcher)
    assert status == 200 and len(body["locations"]) == 5
    assert sample("ingest_replica_reads_total") == on_replica + 1


async def test_a_replica_that_goes_down_sends_reads_to_the_primary_without_errors(
    make_client, pair
):
    client = await replica_client(make_client, pair)
    replica = client.server.app[READ_REPLICA]
    trip, org = f"trip-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    dispatcher = auth("dispatcher", "disp", org)
    r = await client.post(PING, json=batch(3, trip=trip), headers=auth("driver", "drv_1", org))
    assert r.status == 200
    await asyncio.to_thread(pair.wait_replayed)
    assert (await history(client, trip, dispatcher))[0] == 200  # a pooled replica connection

    down_before = sample("ingest_read_fallbacks_total", reason="down")
    # A crash. Nothing is written while it is down: the primary's commits would wait for
    # their synchronous standby.
    await asyncio.to_thread(pair.standby.stop, "immediate")
    try:
        # At once (the monitor may not know yet: the read fails over by itself), then after
        # the monitor has seen it: the primary answers.
        for _ in range(2):
            status, body = await history(client, trip, dispatcher)
            assert status == 200 and len(body["locations"]) == 3, body
            await until(lambda: replica.fallback_reason() == "down")
        assert sample("ingest_read_fallbacks_total", reason="down") >= down_before + 2
        assert sample("ingest_read_replica_up") == 0
    finally:
        await asyncio.to_thread(pair.standby.start)
    await asyncio.to_thread(pair.wait_sync)

    await until(lambda: replica.fallback_reason() is None)
    on_replica = sample("ingest_replica_reads_total")
    status, body = await history(client, trip, dispatcher)
    assert status == 200 and len(body["locations"]) == 3
    assert sample("ingest_replica_reads_total") == on_replica + 1


async def _watch_ready(session: aiohttp.ClientSession, url: str, seen: list[tuple[float, Any]]):
    while True:
        try:
            async with session.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(2)) as r:
                seen.append((time.monotonic(), r.status))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            seen.append((time.monotonic(), type(exc).__name__))
        await asyncio.sleep(0.1)


async def test_failover_under_load_loses_and_doubles_no_acked_ping(services, redis_prefix):
    """DATABASE_URL names both servers (target_session_attrs=read-write). Mid-load the
    primary crashes and the synchronous standby is promoted: the same process goes on
    writing to the new primary; phones retry until acked; nothing acked is lost or doubled."""
    with started_pair() as pair:
        svc = await services(
            service_env(pair.failover_url, REDIS_URL, redis_prefix, ACK_TIMEOUT_MS=1500)
        )
        ready: list[tuple[float, Any]] = []
        async with Fleet([svc.url], name="failover", pings=20, give_up_s=40) as fleet:
            assert fleet.session is not None
            watch = asyncio.ensure_future(_watch_ready(fleet.session, svc.url, ready))
            load = asyncio.ensure_future(fleet.run(rate=25, duration=8))
            await asyncio.sleep(3)
            # The primary's WAL sender frozen: the flush of that moment sends COMMIT and waits
            # for the standby, which never gets its WAL; the crash leaves its outcome unknown.
            sender = int(
                await asyncio.to_thread(
                    pair.query, pair.primary, "SELECT pid FROM pg_stat_replication"
                )
            )
            os.kill(sender, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.5)
                crash = asyncio.ensure_future(asyncio.to_thread(pair.primary.stop, "immediate"))
                await asyncio.sleep(0.3)  # the other processes are gone by now
            finally:
                os.kill(sender, signal.SIGKILL)  # a stopped process ignores the shutdown
            await crash
            down_at = time.monotonic()
            await asyncio.sleep(1.5)  # no primary at all: what a failover manager's delay is
            await asyncio.to_thread(pair.promote)
            promoted_at = time.monotonic()
            await load
            await fleet.finish(45)
            await until(lambda: bool(ready) and ready[-1][1] == 200, timeout=20)
            watch.cancel()
            await asyncio.wait([watch])
        a = await audit(pair.standby.url, fleet)
    while_down = {s for t, s in ready if down_at + 1.2 < t < promoted_at}
    first_ready = min((t for t, s in ready if t > promoted_at and s == 200), default=None)
    unacked = sum(1 for b in fleet.batches if b.ack is None)
    report(
        "postgres_failover", a, outage_s=round(promoted_at - down_at, 2),
        readyz_while_down=sorted(map(str, while_down)),
        ready_after_promote_s=first_ready and round(first_ready - promoted_at, 2),
        commit_outcomes_resolved=[e["outcome"] for e in svc.events("commit_outcome_resolved")],
        batches_never_acked=unacked,
    )  # fmt: skip
    # The flush caught in COMMIT was resolved on the new primary (aborted: its WAL never
    # left the old one; so retried, and stored once).
    assert svc.events("commit_outcome_resolved"), "no flush was caught in COMMIT"
    assert a.lost == 0 and a.duplicated == 0
    assert a.count_mismatches == 0
    assert unacked == 0 and a.acked == a.sent, "every batch is acknowledged after the failover"
    assert while_down == {503}, while_down  # not ready while there is no primary
    assert first_ready is not None
    assert svc.starts == 1 and svc.returncode is None  # the same process, no restart
