"""Latest location after Redis trouble: a latest update that did not reach Redis is set again
from PostgreSQL once Redis takes writes, with no new ping; acks never wait for Redis.

The app runs in process (make_client) against a private Redis, which is made to refuse writes
(maxmemory 1, noeviction: every write is an OOM error), stopped and restarted empty, or frozen
(SIGSTOP) long enough for the publish backlog to overflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.exceptions import ResponseError

from ingest import metrics
from ingest.constants import fleet_key, latest_key
from ingest.typedefs import LIVE

from ..conftest import auth, batch, now_ms
from .load import parse_ms, report

PING = "/api/v1/tracking/ping"
ORG = "org_1"
REPAIR_WITHIN_S = 10.0
DISPATCHER = auth("dispatcher", "disp_1", ORG)


@pytest.fixture
async def admin(private_redis: Any) -> AsyncIterator[aioredis.Redis]:
    """The test's own client of the private Redis (a new connection after each restart)."""
    r = aioredis.from_url(private_redis.url)
    yield r
    with contextlib.suppress(Exception):
        await r.config_set("maxmemory", 0)
    await r.aclose()


async def post(client: TestClient, trip: str, start_ms: int, n: int = 1) -> float:
    """Post one batch (durable ack); the seconds the ack took."""
    started = time.perf_counter()
    resp = await client.post(PING, json=batch(n, trip=trip, start_ms=start_ms), headers=auth())
    took = time.perf_counter() - started
    assert resp.status == 200, await resp.text()
    return took


async def newest_stored(db: asyncpg.Connection, trips: list[str]) -> dict[str, int]:
    rows = await db.fetch(
        'SELECT "tripId", max("timestamp") FROM "TripLocation" WHERE "orgId" = $1'
        ' AND "tripId" = any($2::text[]) GROUP BY 1',
        ORG, trips,
    )  # fmt: skip
    return {r[0]: int(r[1].timestamp() * 1000) for r in rows}


async def redis_latest(r: aioredis.Redis, prefix: str, trips: list[str]) -> dict[str, Any]:
    """Per trip: (HGET ts of the latest key, ZSCORE in the fleet set)."""
    out: dict[str, Any] = {}
    for trip in trips:
        ts = await r.hget(latest_key(prefix, ORG, trip), "ts")
        score = await r.zscore(fleet_key(prefix, ORG), trip)
        out[trip] = (int(ts) if ts is not None else None, int(score) if score else None)
    return out


async def api_latest(client: TestClient, trip: str) -> int | None:
    resp = await client.get(f"/api/v1/tracking/trips/{trip}/latest", headers=DISPATCHER)
    if resp.status != 200:
        return None
    return parse_ms((await resp.json())["location"]["timestamp"])


async def wait_repaired(
    client: TestClient, db: asyncpg.Connection, r: aioredis.Redis, prefix: str, trips: list[str],
    timeout: float = REPAIR_WITHIN_S,
) -> float:  # fmt: skip
    """Seconds until, for every trip, HGET ts, the fleet score and GET .../latest all equal
    the newest stored ping (pings here are in the past, so min(ts, commit time) is ts)."""
    want = await newest_stored(db, trips)
    assert set(want) == set(trips)
    started = time.monotonic()
    while True:
        got = await redis_latest(r, prefix, trips)
        if all(got[t] == (want[t], want[t]) for t in trips):
            api = {t: await api_latest(client, t) for t in trips}
            assert api == want
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            wrong = {t: (got[t], want[t]) for t in trips if got[t] != (want[t], want[t])}
            raise AssertionError(f"latest not repaired within {timeout} s: {wrong}")
        await asyncio.sleep(0.1)


async def published(r: aioredis.Redis, prefix: str, trips: list[str]) -> None:
    for _ in range(100):
        got = await redis_latest(r, prefix, trips)
        if all(ts is not None for ts, _ in got.values()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never published: {got}")


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def refuse_writes(r: aioredis.Redis) -> None:
    await r.config_set("maxmemory-policy", "noeviction")
    await r.config_set("maxmemory", 1)
    with pytest.raises(ResponseError, match="maxmemory"):  # an OOM error
        await r.set("write-probe", 1)


async def test_latest_repaired_after_redis_refused_writes(make_client, db, private_redis, admin,
                                                          redis_prefix):  # fmt: skip
    client = await make_client(redis_url=private_redis.url)
    live = client.server.app[LIVE]
    trips = ["moving", "ending"]
    start = now_ms(-120)
    baseline = [await post(client, t, start) for t in trips]
    baseline += [await post(client, "quiet", start + 1000 * i) for i in range(1, 6)]
    await published(admin, redis_prefix, [*trips, "quiet"])
    before = await redis_latest(admin, redis_prefix, trips)
    repaired_before = metrics.LATEST_REPAIRED._value.get()
    repair_errors = metrics.REDIS_ERRORS.labels("repair")
    repair_errors_before = repair_errors._value.get()

    await refuse_writes(admin)
    during = []
    for i in range(1, 11):  # "ending" sends its last ping during the outage
        during.append(await post(client, "moving", start + 5000 * i))
        if i <= 3:
            during.append(await post(client, "ending", start + 5000 * i))
    during.append(await post(client, "moving", start - 3_600_000))  # a late upload
    await asyncio.sleep(1.5)
    assert await redis_latest(admin, redis_prefix, trips) == before, "Redis took no write"
    # Repair attempts failed meanwhile, and forgot nothing.
    assert repair_errors._value.get() > repair_errors_before
    assert live.repair_pending == 2
    rows = await db.fetchval('SELECT count(*) FROM "TripLocation"')
    assert rows == 2 + 5 + 10 + 3 + 1

    await admin.config_set("maxmemory", 0)
    took = await wait_repaired(client, db, admin, redis_prefix, trips)
    assert live.repair_pending == 0
    assert metrics.LATEST_REPAIRED._value.get() - repaired_before == 2
    report(
        "latest_repair_oom", None, repaired_after_s=round(took, 2),
        ack_median_ms_before=round(statistics.median(baseline) * 1000, 1),
        ack_median_ms_during=round(statistics.median(during) * 1000, 1),
        ack_max_ms_during=round(max(during) * 1000, 1),
    )  # fmt: skip
    # Acks do not wait for Redis: refused writes cost them nothing.
    assert max(during) < 1.0, during
    assert statistics.median(during) < 3 * statistics.median(baseline) + 0.05, (baseline, during)


async def test_latest_repaired_after_redis_restart_lost_its_keys(make_client, db, private_redis,
                                                                 redis_prefix):  # fmt: skip
    client = await make_client(redis_url=private_redis.url)
    live = client.server.app[LIVE]
    trips = ["moving", "ending"]
    start = now_ms(-120)
    for t in [*trips, "quiet"]:
        await post(client, t, start)
    r = aioredis.from_url(private_redis.url)
    try:
        await published(r, redis_prefix, [*trips, "quiet"])
    finally:
        await r.aclose()

    await asyncio.to_thread(private_redis.stop)
    during = []
    for i in range(1, 6):
        during.append(await post(client, "moving", start + 5000 * i))
        if i <= 2:
            during.append(await post(client, "ending", start + 5000 * i))
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 3 + 5 + 2
    # Every publish of the outage has failed (redis-py's retries included) before Redis is back.
    await until(lambda: live.repair_pending == 2 and not live._backlog)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(private_redis.start)  # empty: no persistence

    r = aioredis.from_url(private_redis.url)
    try:
        took = await wait_repaired(client, db, r, redis_prefix, trips)
        # A trip quiet during the outage lost its key with the restart and had no failed
        # write to repair: GET .../latest still answers right, from PostgreSQL.
        assert await api_latest(client, "quiet") == start
    finally:
        await r.aclose()
    report(
        "latest_repair_restart", None, repaired_after_s=round(took, 2),
        ack_max_ms_during=round(max(during) * 1000, 1),
    )  # fmt: skip
    assert max(during) < 1.0, during  # no Redis call on the ack path: not even a reconnect


# 257 flushes must pile up within the publisher's Redis socket timeout (5 s): a premise about
# the machine's speed that debug mode breaks.
@pytest.mark.timing
async def test_latest_repaired_after_backlog_overflow_while_redis_hung(
    make_client, db, private_redis, admin, redis_prefix
):
    """Redis frozen (SIGSTOP): the publisher waits on its reply while flushes pile up past
    the backlog bound; the flushes dropped from the backlog are repaired after SIGCONT."""
    client = await make_client(
        redis_url=private_redis.url, flush_interval_ms=1, max_trips_per_driver_per_day=1000
    )
    live = client.server.app[LIVE]
    start = now_ms(-60)
    await post(client, "first", start)
    await published(admin, redis_prefix, ["first"])
    dropped_before = metrics.PUBLISH_DROPPED._value.get()
    trips = [f"t{i:03d}" for i in range(300)]
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        acks = [await post(client, t, start) for t in trips]  # one flush each
        dropped = metrics.PUBLISH_DROPPED._value.get() - dropped_before
        pending = live.repair_pending
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    assert dropped >= 300 - 256 - 1 and pending >= dropped, (dropped, pending)
    took = await wait_repaired(client, db, admin, redis_prefix, trips)
    report(
        "latest_repair_backlog", None, trips=len(trips), dropped_from_backlog=int(dropped),
        repaired_after_s=round(took, 2), ack_max_ms_while_hung=round(max(acks) * 1000, 1),
    )  # fmt: skip
    assert max(acks) < 1.0, max(acks)


async def test_repair_bound_overflow_is_counted(make_client, db, private_redis, admin,
                                                redis_prefix):  # fmt: skip
    """LATEST_REPAIR_MAX_TRIPS reached: the trips first lost are repaired, later ones are only
    counted (they heal at their next ping); the bound holds."""
    client = await make_client(redis_url=private_redis.url, latest_repair_max_trips=2)
    live = client.server.app[LIVE]
    trips = ["a", "b", "c", "d"]
    start = now_ms(-120)
    for t in trips:
        await post(client, t, start)
    await published(admin, redis_prefix, trips)
    overflow_before = metrics.LATEST_REPAIR_OVERFLOW._value.get()
    await refuse_writes(admin)
    for t in trips:  # one flush each, in this order
        await post(client, t, start + 1000)
    # The publisher runs after the ack.
    await until(lambda: metrics.LATEST_REPAIR_OVERFLOW._value.get() - overflow_before >= 2)
    assert metrics.LATEST_REPAIR_OVERFLOW._value.get() - overflow_before == 2
    assert live.repair_pending == 2
    await admin.config_set("maxmemory", 0)
    await wait_repaired(client, db, admin, redis_prefix, ["a", "b"])
    stale = await redis_latest(admin, redis_prefix, ["c", "d"])
    assert stale == {"c": (start, start), "d": (start, start)}
    assert live.repair_pending == 0
