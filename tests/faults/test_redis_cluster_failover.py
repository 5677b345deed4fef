"""A Redis Cluster master dies under load: its replica takes over, and the service follows
without a restart (docs/scaling.md, "Redis Cluster")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
from redis.crc import key_slot

from devtools.redis_cluster import PrivateRedisCluster
from ingest.typedefs import FANOUT, LIVE

from ..conftest import auth, batch, now_ms, subscribed, token, ws_connect

pytestmark = [pytest.mark.slow]
PING = "/api/v1/tracking/ping"


@pytest.fixture
def cluster() -> Iterator[PrivateRedisCluster]:
    with PrivateRedisCluster(masters=3, replicas=1) as c:
        yield c


async def test_a_master_killed_under_load_fails_over_and_sockets_keep_receiving(
    make_client, cluster: PrivateRedisCluster
) -> None:
    client = await make_client(redis_url=cluster.url, redis_mode="cluster")
    app = client.server.app
    await asyncio.wait_for(app[FANOUT].connected.wait(), 10)
    keys = app[LIVE].keys
    trips = [f"trip_{i}" for i in range(12)]
    # The trips whose channel (and latest key) the victim serves.
    slot_of = {t: key_slot(keys.trip_channel("org_1", t).encode()) for t in trips}
    victim = cluster.master_of_slot(slot_of[trips[0]])
    on_victim = [t for t in trips if cluster.master_of_slot(slot_of[t]) == victim]
    tok = token("dispatcher", "d", "org_1")
    fleet, by_trip = await ws_connect(client, tok), await ws_connect(client, tok)
    await subscribed(fleet, fleet=True, settle=0)
    await subscribed(by_trip, trips=on_victim, settle=0)
    received: dict[str, list[tuple[float, str]]] = {"fleet": [], "trip": []}

    async def read(ws: aiohttp.ClientWebSocketResponse, into: list[tuple[float, str]]) -> None:
        async for msg in ws:
            body = json.loads(msg.data)
            if body["type"] == "locations":
                into.append((time.monotonic(), body["tripId"]))

    stop = asyncio.Event()
    acked = 0

    async def load() -> None:
        nonlocal acked
        while not stop.is_set():
            for t in trips:
                resp = await client.post(PING, json=batch(1, trip=t, start_ms=now_ms()),
                                         headers=auth())  # fmt: skip
                assert resp.status == 200, await resp.text()
                acked += 1
            await asyncio.sleep(0.05)

    readers = [
        asyncio.create_task(read(fleet, received["fleet"])),
        asyncio.create_task(read(by_trip, received["trip"])),
    ]
    loader = asyncio.create_task(load())
    try:
        await asyncio.sleep(1.0)
        assert {t for _, t in received["fleet"]} == set(trips)  # all flowing before
        cluster.kill(victim)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.wait_failover, victim, slot_of[trips[0]])
        failed_over_at = time.monotonic()
        await asyncio.sleep(4.0)  # the service finds the new master by itself
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await loader
    assert acked > 0 and loader.exception() is None  # ingest never depended on Redis
    settled = failed_over_at + 3.0
    after = {t for at, t in received["fleet"] if at > settled}
    assert after == set(trips), f"fleet stopped receiving {set(trips) - after}"
    mine_after = {t for at, t in received["trip"] if at > settled}
    assert mine_after == set(on_victim), f"trip sockets stopped: {set(on_victim) - mine_after}"
    assert app[FANOUT].connected.is_set()
    assert victim not in {int(name.split(":")[1]) for name in app[FANOUT].shards}
    # Latest of the victim's trips: repaired from PostgreSQL, then moved on by new flushes.
    live = app[LIVE]
    for _ in range(100):
        if not live.repair_pending:
            break
        await asyncio.sleep(0.05)
    assert live.repair_pending == 0
    for t in on_victim:
        resp = await client.get(f"/api/v1/tracking/trips/{t}/latest", headers=auth())
        latest = (await resp.json())["location"]["timestamp"]
        resp = await client.get(f"/api/v1/tracking/trips/{t}/locations?limit=5000", headers=auth())
        newest = (await resp.json())["locations"][-1]["timestamp"]
        assert latest == newest, t
    for ws in (fleet, by_trip):
        await ws.close()
    for task in readers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 2)
    print(f"failover took {failed_over_at - killed_at:.2f} s")
