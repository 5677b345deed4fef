"""A SUBSCRIBE that Redis does not confirm in time is reported to the client, never acked."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from devtools.services import PrivateRedis
from ingest import metrics
from ingest.typedefs import FANOUT, LIVE

from ..conftest import auth, batch, token
from ..conftest import next_message as reply
from ..test_ws_limits import subscribe


async def test_unconfirmed_subscribe_is_reported_and_not_acked(make_client, private_redis):
    r: PrivateRedis = private_redis
    client = await make_client(redis_url=r.url, ws_subscribe_timeout_s=0.5)
    fanout = client.server.app[FANOUT]
    for _ in range(100):
        if fanout.connected.is_set():
            break
        await asyncio.sleep(0.05)
    resp = await client.post("/api/v1/tracking/ping", json=batch(1), headers=auth())
    assert resp.status == 200, await resp.text()
    for _ in range(100):  # published (after the ack): trip_1 has a latest location
        if await client.server.app[LIVE].latest("org_1", "trip_1") is not None:
            break
        await asyncio.sleep(0.02)
    ws = await client.ws_connect(f"/api/v1/live?access_token={token('dispatcher', 'disp_1')}")
    assert (await subscribe(ws, trips=["trip_1"]))[-1]["trips"] == ["trip_1"]
    # Its snapshot is sent: the socket waits on nothing in Redis when the pause starts.
    assert (await reply(ws))["type"] == "snapshot"

    admin = aioredis.from_url(r.url)
    failed_before = metrics.WS_SUBSCRIBE_FAILED._value.get()
    try:
        # Redis holds every command for 2 s: the SUBSCRIBE is not confirmed within 0.5 s.
        await admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        got = await subscribe(ws, trips=["trip_2", "trip_3"], fleet=True)
        failure, acked = got[0], got[-1]
        assert failure["type"] == "error" and failure["error"] == "subscribe_failed", got
        assert failure["trips"] == ["trip_2", "trip_3"] and failure["fleet"] is True
        assert "trip_2, trip_3" in failure["detail"] and "fleet" in failure["detail"]
        assert acked == {"type": "subscribed", "trips": ["trip_1"], "fleet": False}
        assert metrics.WS_SUBSCRIBE_FAILED._value.get() == failed_before + 3
        # The pod holds no trace of them: nothing half-subscribed is delivered later.
        assert len(fanout.channels) == 1 and not fanout.patterns

        await asyncio.sleep(2.0)  # the pause is over: a retry succeeds, and live data flows
        acked = (await subscribe(ws, trips=["trip_2"]))[-1]
        assert acked == {"type": "subscribed", "trips": ["trip_1", "trip_2"], "fleet": False}
        resp = await client.post(
            "/api/v1/tracking/ping", json=batch(2, trip="trip_2"), headers=auth()
        )
        assert resp.status == 200, await resp.text()
        while (msg := await reply(ws))["type"] != "locations":
            pass
        assert msg["tripId"] == "trip_2"
    finally:
        await admin.aclose()
        await ws.close()
