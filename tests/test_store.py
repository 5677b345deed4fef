"""The batch id itself is the idempotency key (issue 13, item 15), black-box.

An identical replay is caught by the per-ping guard on ("orgId", "tripId", "timestamp") as
well, so it cannot tell whether batch ids are remembered at all. These tests replay a batch
id with *other* pings: "a batchId already stored stores nothing again" (API.md), so they are
answered as duplicates and store nothing. The key is ("orgId", "driverId", "batchId"): the
same id from another driver or another org is a new batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from .conftest import auth, batch, in_one_flush, now_ms, token

Client = TestClient[web.Request, web.Application]
Factory = Callable[..., Awaitable[Client]]

PING = "/api/v1/tracking/ping"
LATEST = "/api/v1/tracking/trips/{}/latest"
A, B = "org_a", "org_b"
BID = "0f8fad5b-d9cb-469f-a165-70867728950e"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(value: str | datetime) -> int:
    ts = datetime.fromisoformat(value) if isinstance(value, str) else value
    return (ts - _EPOCH) // timedelta(milliseconds=1)


def other_pings(body: dict[str, Any], later_s: float = 300) -> dict[str, Any]:
    """A batch under ``body``'s ids (tripId, driverId, batchId) with other timestamps and
    places: nothing in it is a duplicate ping."""
    n = len(body["locations"])
    out = batch(n, body["tripId"], body["driverId"], ms(body["locations"][0]["timestamp"]) +
                int(later_s * 1000), body["batchId"])  # fmt: skip
    for loc in out["locations"]:
        loc["latitude"] += 1.0
    return out


def old_app(body: dict[str, Any]) -> dict[str, Any]:
    """The old driver app's form: the batch id on every location instead of at the top."""
    out = {k: v for k, v in body.items() if k != "batchId"}
    out["locations"] = [{**loc, "batchId": body["batchId"]} for loc in body["locations"]]
    return out


async def answer(client: Client, body: dict[str, Any], org: str = A) -> dict[str, Any]:
    resp = await client.post(PING, json=body, headers=auth("driver", body["driverId"], org))
    got: dict[str, Any] = await resp.json()
    assert resp.status == 200, got
    return got


def ack(accepted: int, duplicates: int, batch_id: str = BID) -> dict[str, Any]:
    return {"batchId": batch_id, "accepted": accepted, "duplicates": duplicates, "rejected": []}


async def stored(db: asyncpg.Connection, org: str = A) -> list[tuple[str, str, float, int]]:
    rows = await db.fetch(
        'SELECT "tripId", "driverId", "latitude", "timestamp" FROM "TripLocation"'
        ' WHERE "orgId" = $1 ORDER BY "tripId", "timestamp"',
        org,
    )
    return [(r[0], r[1], r[2], ms(r[3])) for r in rows]


def rows_of(*bodies: dict[str, Any]) -> list[tuple[str, str, float, int]]:
    out = [
        (b["tripId"], b["driverId"], loc["latitude"], ms(loc["timestamp"]))
        for b in bodies
        for loc in b["locations"]
    ]
    return sorted(out, key=lambda r: (r[0], r[3]))


@pytest.mark.parametrize("form", ["top_level", "old_app"])
async def test_a_stored_batch_id_with_other_pings_stores_nothing(
    client: Client, db: asyncpg.Connection, form: str
) -> None:
    def shape(body: dict[str, Any]) -> dict[str, Any]:
        return old_app(body) if form == "old_app" else body

    first = batch(3, batch_id=BID, start_ms=now_ms(-600))
    assert await answer(client, shape(first)) == ack(3, 0)
    # Same driver, same batch id, pings never seen before (newer ones: they would move latest).
    assert await answer(client, shape(other_pings(first))) == ack(0, 3)
    assert await stored(db) == rows_of(first)
    latest = await client.get(LATEST.format("trip_1"), headers=auth("dispatcher", "d", A))
    assert ms((await latest.json())["location"]["timestamp"]) == rows_of(first)[-1][3]
    # The key is the driver's, whatever trip the replay names.
    elsewhere = other_pings(first, 120)
    elsewhere["tripId"] = "trip_2"
    assert await answer(client, shape(elsewhere)) == ack(0, 3)
    assert await stored(db) == rows_of(first)


async def test_one_batch_id_twice_in_one_flush_with_other_pings_stores_one(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    client = await make_client()
    first = batch(3, batch_id=BID)
    second = other_pings(first)
    got = await in_one_flush(client, answer(client, first), answer(client, second))
    assert sorted(g["accepted"] for g in got) == [0, 3]
    assert sorted(g["duplicates"] for g in got) == [0, 3]
    winner = first if got[0]["accepted"] == 3 else second
    assert await stored(db) == rows_of(winner)


async def test_a_batch_id_stored_through_one_pod_stores_nothing_through_another(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """Two app instances on one database and one Redis prefix: two pods."""
    pod1, pod2 = await make_client(), await make_client()
    first = batch(3, batch_id=BID, start_ms=now_ms(-900))
    assert await answer(pod1, first) == ack(3, 0)
    assert await answer(pod2, other_pings(first)) == ack(0, 3)
    assert await stored(db) == rows_of(first)
    # Both pods at once, each with other pings under one new id: one batch is stored.
    bid = "second-batch"
    one = batch(2, start_ms=now_ms(-300), batch_id=bid)
    two = other_pings(one, 60)
    got = await asyncio.gather(answer(pod1, one), answer(pod2, two))
    assert sorted((g["accepted"], g["duplicates"]) for g in got) == [(0, 2), (2, 0)]
    winner = one if got[0]["accepted"] == 2 else two
    assert await stored(db) == rows_of(first, winner)


async def test_the_same_batch_id_from_another_driver_or_org_is_a_new_batch(
    client: Client, db: asyncpg.Connection
) -> None:
    first = batch(3, batch_id=BID)
    assert await answer(client, first) == ack(3, 0)
    # Another driver of the org (on its own trip: trip_1 is drv_1's).
    colleague = other_pings(first)
    colleague.update(tripId="trip_2", driverId="drv_2")
    assert await answer(client, colleague) == ack(3, 0)
    # Another org: the very same body, ids, timestamps and all.
    assert await answer(client, first, B) == ack(3, 0)
    assert await stored(db, A) == rows_of(first, colleague)
    assert await stored(db, B) == rows_of(first)
    # Each is now remembered under its own key.
    for body, org in ((other_pings(first, 600), A), (other_pings(colleague), A)):
        assert await answer(client, body, org) == ack(0, 3)
    assert await answer(client, other_pings(first, 600), B) == ack(0, 3)
    assert len(await stored(db, A)) == len(await stored(db, B)) * 2 == 6


async def test_a_replayed_batch_id_is_not_published_again(client: Client) -> None:
    ws = await client.ws_connect(f"/api/v1/live?access_token={token('dispatcher', 'd', A)}")
    await ws.send_json({"type": "subscribe", "trips": ["trip_1"]})
    assert json.loads((await ws.receive(timeout=5)).data)["type"] == "subscribed"
    first = batch(3, batch_id=BID)
    assert await answer(client, first) == ack(3, 0)
    assert await answer(client, first) == ack(0, 3)  # identical replay
    assert await answer(client, other_pings(first)) == ack(0, 3)  # same id, other pings
    fresh = other_pings(first, 400)
    fresh["batchId"] = "next-batch"
    assert await answer(client, fresh) == ack(3, 0, "next-batch")
    got = []
    while True:
        try:
            msg = await ws.receive(timeout=1.0)
        except TimeoutError:
            break
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        got.append(json.loads(msg.data))
    await ws.close()
    # One message per stored batch, in order: the first, then the fresh one; no replay.
    assert [m["type"] for m in got] == ["locations", "locations"], got
    assert [[ms(loc["timestamp"]) for loc in m["locations"]] for m in got] == [
        [ms(loc["timestamp"]) for loc in b["locations"]] for b in (first, fresh)
    ]
