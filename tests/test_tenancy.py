"""Tenancy and trip ownership (API.md, "Tenancy and ownership (v1.1)"), black-box.

Org A and org B use the same tripId, driverId and batchId, and even the same timestamps.
Whatever org B does (post, replay, reuse ids, hand over, subscribe, read, post through a
phone app), org A's rows, latest location, history, live stream and answers stay exactly
as they were. Within an org a trip belongs to the driver whose ping created it, until a
dispatcher hands it over. Hostile clients (huge ids, too many trips, future timestamps)
can neither break nor crowd anything.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingest.typedefs import LIVE

from .conftest import (
    auth,
    batch,
    in_one_flush,
    iso,
    next_message,
    now_ms,
    quiet,
    subscribed,
    token,
    ws_connect,
)

Client = TestClient[web.Request, web.Application]
Factory = Callable[..., Awaitable[Client]]
Socket = aiohttp.ClientWebSocketResponse

PING = "/api/v1/tracking/ping"
LATEST = "/api/v1/tracking/trips/{}/latest"
HISTORY = "/api/v1/tracking/trips/{}/locations"
HANDOVER = "/api/v1/tracking/trips/{}/driver"
SUMMARY = "/api/v1/tracking/trips/{}/summary"
OWNTRACKS = "/api/v1/ingest/owntracks"
OSMAND = "/api/v1/ingest/osmand"
OVERLAND = "/api/v1/ingest/overland"
PHONE_APPS = ("owntracks", "osmand", "overland")

A, B = "org_a", "org_b"
TRIP, DRIVER, OTHER, BATCH = "trip_1", "drv_1", "drv_2", "batch-0001"
OWNED = "trip_owned_by_another_driver"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- helpers -----------------------------------------------------------------------------------


def ms(value: str | datetime) -> int:
    """Epoch milliseconds of an RFC 3339 string or a datetime."""
    ts = datetime.fromisoformat(value) if isinstance(value, str) else value
    return (ts - _EPOCH) // timedelta(milliseconds=1)


def second(offset_s: float = -600) -> int:
    """A whole second, as epoch ms: OwnTracks sends whole seconds."""
    return now_ms(offset_s) // 1000 * 1000


def moved(body: dict[str, Any], by: float = 1.0) -> dict[str, Any]:
    """The same ids and timestamps, other places."""
    out = copy.deepcopy(body)
    for loc in out["locations"]:
        loc["latitude"] += by
        loc["longitude"] += by
    return out


def dispatcher(org: str) -> dict[str, str]:
    return auth("dispatcher", "disp_1", org)


async def post(
    client: Client, body: dict[str, Any], org: str, sub: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST a batch with a driver token of ``org`` (the batch's own driver unless ``sub``)."""
    headers = auth("driver", sub or body["driverId"], org)
    resp = await client.post(PING, json=body, headers=headers)
    return resp.status, await resp.json()


async def stored_as(client: Client, body: dict[str, Any], org: str) -> tuple[int, int]:
    """POST a batch that must be answered 200; (accepted, duplicates)."""
    status, answer = await post(client, body, org)
    assert status == 200, answer
    assert answer["batchId"] == body["batchId"] and answer["rejected"] == []
    return answer["accepted"], answer["duplicates"]


async def refused(client: Client, body: dict[str, Any], org: str, sub: str | None = None) -> None:
    """The batch is refused: its trip belongs to another driver of the org."""
    status, answer = await post(client, body, org, sub)
    assert (status, answer["error"]) == (403, OWNED), answer


async def hand_over(client: Client, org: str, trip: str, driver: str) -> None:
    resp = await client.put(
        HANDOVER.format(trip), json={"driverId": driver}, headers=dispatcher(org)
    )
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert (answer["tripId"], answer["driverId"]) == (trip, driver)


Row = tuple[str, str, float, float, int, str | None]


def rows_of(*bodies: dict[str, Any]) -> list[Row]:
    """The rows these batches store, ordered as stored() returns them."""
    out = [
        (b["tripId"], b["driverId"], loc["latitude"], loc["longitude"], ms(loc["timestamp"]),
         b.get("batchId"))
        for b in bodies for loc in b["locations"]
    ]  # fmt: skip
    return sorted(out, key=lambda r: (r[0], r[4]))


async def stored(db: asyncpg.Connection, org: str, trip: str | None = None) -> list[Row]:
    """Every row of ``org`` (of one trip if given) in "TripLocation"."""
    found = await db.fetch(
        'SELECT "tripId", "driverId", "latitude", "longitude", "timestamp", "batchId"'
        ' FROM "TripLocation" WHERE "orgId" = $1 AND ($2::text IS NULL OR "tripId" = $2)'
        ' ORDER BY "tripId", "timestamp"',
        org, trip,
    )  # fmt: skip
    return [(r[0], r[1], r[2], r[3], ms(r[4]), r[5]) for r in found]


async def settled(client: Client, org: str, trip: str, ts_ms: int) -> None:
    """Wait until the publisher (it runs after the ack) has moved the trip's latest location
    in Redis to ``ts_ms``: its live message has been published by then too."""
    assert client.app is not None
    live = client.app[LIVE]
    for _ in range(250):
        value = await live.latest(org, trip)
        if value is not None and ms(json.loads(value)["location"]["timestamp"]) == ts_ms:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"latest of {org}/{trip} never reached {ts_ms}")


async def view(client: Client, db: asyncpg.Connection, org: str, trip: str = TRIP) -> Any:
    """All that ``org`` has of ``trip``: its rows, and what its dispatcher reads."""
    latest = await client.get(LATEST.format(trip), headers=dispatcher(org))
    history = await client.get(HISTORY.format(trip) + "?limit=5000", headers=dispatcher(org))
    return {
        "rows": await stored(db, org, trip),
        "latest": (latest.status, await latest.json()),
        "history": (history.status, await history.json()),
    }


def points(locations: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    return [(loc["latitude"], loc["longitude"], ms(loc["timestamp"])) for loc in locations]


async def exactly(ws: Socket, n: int) -> list[dict[str, Any]]:
    """The next ``n`` messages, then silence."""
    got = [await next_message(ws) for _ in range(n)]
    extra = await quiet(ws)
    assert extra == [], extra
    return got


async def live(
    client: Client, org: str, trips: list[str] | None = None, fleet: bool = False,
    snapshots: int = 0,
) -> Socket:  # fmt: skip
    """A dispatcher's socket of ``org``, subscribed, its ``snapshots`` (one per known trip)
    read."""
    ws = await client.ws_connect(f"/api/v1/live?access_token={token('dispatcher', 'disp_1', org)}")
    await ws.send_json({"type": "subscribe", "trips": trips or [], "fleet": fleet})
    assert (await next_message(ws))["type"] == "subscribed"
    for _ in range(snapshots):
        assert (await next_message(ws))["type"] == "snapshot"
    return ws


async def snapshot(client: Client, org: str, **subscribe: Any) -> dict[str, dict[str, Any]]:
    """What a new subscriber of ``org`` is sent right after subscribing: trip -> snapshot."""
    tok = token("dispatcher", "disp_1", org)
    ws = await client.ws_connect(f"/api/v1/live?access_token={tok}")
    await ws.send_json({"type": "subscribe", **subscribe})
    assert (await next_message(ws))["type"] == "subscribed"
    got = await quiet(ws)
    await ws.close()
    assert all(m["type"] == "snapshot" for m in got), got
    snaps = {m["tripId"]: m for m in got}
    assert len(snaps) == len(got), got  # one per trip
    return snaps


async def phone(
    client: Client, app: str, sub: str, org: str, ts_ms: int, lat: float, lon: float,
    device: str | None,
) -> tuple[int, int, int, bytes]:  # fmt: skip
    """One fix through a phone-app endpoint, with a driver token of ``org``; ``device`` is the
    app's device id (the tripId), None to send none. (status, accepted, duplicates, body)."""
    tok = token("driver", sub, org)
    if app == "owntracks":
        basic = base64.b64encode(f"{sub}:{tok}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
        if device is not None:
            headers["X-Limit-D"] = device
        message = {"_type": "location", "lat": lat, "lon": lon, "tst": ts_ms // 1000}
        resp = await client.post(OWNTRACKS, data=json.dumps(message), headers=headers)
    elif app == "osmand":
        params = {"token": tok, "lat": str(lat), "lon": str(lon), "timestamp": str(ts_ms)}
        if device is not None:
            params["id"] = device
        resp = await client.post(OSMAND, params=params)
    else:
        resp = await client.post(
            OVERLAND, json={"locations": [feature(ts_ms, lat, lon, device)]},
            headers={"Authorization": f"Bearer {tok}"},
        )  # fmt: skip
    body = await resp.read()
    if resp.status != 200:
        return resp.status, 0, 0, body
    h = resp.headers
    return 200, int(h["X-Ingest-Accepted"]), int(h["X-Ingest-Duplicates"]), body


def feature(ts_ms: int, lat: float, lon: float, device: str | None) -> dict[str, Any]:
    """One Overland GeoJSON point."""
    props: dict[str, Any] = {"timestamp": iso(ts_ms)}
    if device is not None:
        props["device_id"] = device
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": props}  # fmt: skip


# -- two orgs, the same ids ----------------------------------------------------------------------


@pytest.mark.parametrize("concurrent", [False, True], ids=["in_turn", "concurrently"])
async def test_org_b_with_the_same_ids_never_touches_org_a(
    make_client: Factory, db: asyncpg.Connection, concurrent: bool
) -> None:
    client = await make_client()
    start = second()
    mine = batch(3, TRIP, DRIVER, start, BATCH)
    theirs = moved(mine)  # same tripId, driverId, batchId and timestamps
    a_trip, a_fleet = await live(client, A, [TRIP]), await live(client, A, fleet=True)
    b_trip, b_fleet = await live(client, B, [TRIP]), await live(client, B, fleet=True)

    if concurrent:
        answers = await in_one_flush(
            client, stored_as(client, mine, A), stored_as(client, theirs, B)
        )
    else:
        answers = [await stored_as(client, mine, A), await stored_as(client, theirs, B)]
    # Neither org's pings, nor its batch id, made the other's come back as duplicates.
    assert answers == [(3, 0), (3, 0)]
    if concurrent:  # one flush, one transaction: one now()
        assert await db.fetchval('SELECT count(DISTINCT "createdAt") FROM "TripLocation"') == 1
    assert await stored(db, A) == rows_of(mine)
    assert await stored(db, B) == rows_of(theirs)
    for org, body, sockets in ((A, mine, (a_trip, a_fleet)), (B, theirs, (b_trip, b_fleet))):
        await settled(client, org, TRIP, start + 2000)
        for ws in sockets:  # each org's stream: exactly its own pings, once
            [msg] = await exactly(ws, 1)
            assert (msg["type"], msg["tripId"], msg["driverId"]) == ("locations", TRIP, DRIVER)
            assert points(msg["locations"]) == points(body["locations"])
        got = await view(client, db, org)
        assert got["latest"][0] == got["history"][0] == 200
        assert points([got["latest"][1]["location"]]) == points(body["locations"][-1:])
        assert points(got["history"][1]["locations"]) == points(body["locations"])
        # A new subscriber of the org (trip or fleet) is sent its own org's latest only.
        for subscribe in ({"trips": [TRIP]}, {"fleet": True}):
            snaps = await snapshot(client, org, **subscribe)
            assert list(snaps) == [TRIP]
            assert points([snaps[TRIP]["location"]]) == points(body["locations"][-1:])
    before = await view(client, db, A)

    # Everything org B does with the same ids.
    assert await stored_as(client, theirs, B) == (0, 3)  # a replay
    reused = moved(batch(3, TRIP, DRIVER, start + 3000, BATCH), 2.0)
    assert await stored_as(client, reused, B) == (0, 3)  # its batch id, stored before
    later = moved(batch(3, TRIP, DRIVER, start + 3000, "batch-0002"), 2.0)
    assert await stored_as(client, later, B) == (3, 0)
    await hand_over(client, B, TRIP, OTHER)
    await refused(client, moved(batch(1, TRIP, DRIVER, start + 6000)), B)
    handed = moved(batch(2, TRIP, OTHER, start + 6000, BATCH), 3.0)
    assert await stored_as(client, handed, B) == (2, 0)
    await settled(client, B, TRIP, start + 7000)
    for path in (LATEST, HISTORY):
        assert (await client.get(path.format(TRIP), headers=dispatcher(B))).status == 200
    for ws in (b_trip, b_fleet):  # later, handed
        await exactly(ws, 2)

    assert await view(client, db, A) == before
    assert await quiet(a_trip) == [] and await quiet(a_fleet) == []
    # A's trip is still drv_1's: B's handover was B's own.
    await refused(client, batch(1, TRIP, OTHER, start + 9000), A)
    # A's new pings at the instants B holds, under the batch id B just used, are all new.
    a_later = batch(3, TRIP, DRIVER, start + 3000, "batch-0002")
    assert await stored_as(client, a_later, A) == (3, 0)
    assert await stored(db, A) == rows_of(mine, a_later)
    assert await stored(db, B) == rows_of(theirs, later, handed)
    await settled(client, A, TRIP, start + 5000)
    for ws in (a_trip, a_fleet):
        [msg] = await exactly(ws, 1)
        assert points(msg["locations"]) == points(a_later["locations"])
    assert await quiet(b_trip) == [] and await quiet(b_fleet) == []
    for ws in (a_trip, a_fleet, b_trip, b_fleet):
        await ws.close()


@pytest.mark.parametrize("app", PHONE_APPS)
async def test_org_b_through_a_phone_app_never_touches_org_a(
    make_client: Factory, db: asyncpg.Connection, app: str
) -> None:
    client = await make_client()
    start = second()
    mine = batch(2, TRIP, DRIVER, start, BATCH)
    assert await stored_as(client, mine, A) == (2, 0)
    # A's driver also has the trip a phone app without a device id names: the driver's id.
    assert (await phone(client, app, DRIVER, A, start, 10.0, 20.0, None))[:3] == (200, 1, 0)
    await settled(client, A, TRIP, start + 1000)
    await settled(client, A, DRIVER, start)
    a_trips = await live(client, A, [TRIP, DRIVER], snapshots=2)
    a_fleet = await live(client, A, fleet=True, snapshots=2)
    before = [await view(client, db, A, TRIP), await view(client, db, A, DRIVER)]

    # Org B's drv_1, through the app: the same trip (and the no-device trip), same instants.
    for device, trip in ((TRIP, TRIP), (None, DRIVER)):
        for ts in (start, start + 1000):
            got = await phone(client, app, DRIVER, B, ts, 50.0, 8.0, device)
            assert got[:3] == (200, 1, 0), got
        assert (await phone(client, app, DRIVER, B, start, 50.0, 8.0, device))[:3] == (200, 0, 1)
        # B's own rule: B's drv_2 may not post to B's drv_1's trip.
        status, _, _, body = await phone(client, app, OTHER, B, start + 5000, 1.0, 1.0, trip)
        assert (status, json.loads(body)["error"]) == (403, OWNED)
        await settled(client, B, trip, start + 1000)
        assert await stored(db, B, trip) == [
            (trip, DRIVER, 50.0, 8.0, ts, None) for ts in (start, start + 1000)
        ]
    assert [await view(client, db, A, TRIP), await view(client, db, A, DRIVER)] == before
    assert await quiet(a_trips) == [] and await quiet(a_fleet) == []

    # A's rule through the app: drv_2 may not post to drv_1's trips, the owner may.
    for trip in (TRIP, DRIVER):
        status, _, _, body = await phone(client, app, OTHER, A, start + 5000, 1.0, 1.0, trip)
        assert (status, json.loads(body)["error"]) == (403, OWNED)
    assert [await view(client, db, A, TRIP), await view(client, db, A, DRIVER)] == before
    assert (await phone(client, app, DRIVER, A, start + 5000, 11.0, 21.0, TRIP))[:3] == (200, 1, 0)
    await settled(client, A, TRIP, start + 5000)
    for ws in (a_trips, a_fleet):
        [msg] = await exactly(ws, 1)
        assert (msg["tripId"], points(msg["locations"])) == (TRIP, [(11.0, 21.0, start + 5000)])
        await ws.close()


async def test_a_handover_in_one_org_is_not_one_in_another(client: Client) -> None:
    start = second()
    assert await stored_as(client, batch(2, TRIP, DRIVER, start), A) == (2, 0)
    assert await stored_as(client, batch(2, "a_only", DRIVER, start), A) == (2, 0)
    # A trip that exists only in org A is unknown to org B's dispatcher.
    for trip in ("a_only", TRIP):
        resp = await client.put(
            HANDOVER.format(trip), json={"driverId": OTHER}, headers=dispatcher(B)
        )
        assert resp.status == 404, await resp.text()
    assert await stored_as(client, batch(2, TRIP, DRIVER, start), B) == (2, 0)
    await hand_over(client, B, TRIP, OTHER)
    await refused(client, batch(1, TRIP, DRIVER, start + 5000), B)
    assert await stored_as(client, batch(1, TRIP, OTHER, start + 5000), B) == (1, 0)
    # In org A nothing moved: drv_1 still owns both trips.
    for trip in ("a_only", TRIP):
        await refused(client, batch(1, trip, OTHER, start + 6000), A)
        assert await stored_as(client, batch(1, trip, DRIVER, start + 6000), A) == (1, 0)


# -- ownership within an org ---------------------------------------------------------------------


async def test_another_driver_of_the_org_is_refused_and_nothing_is_stored(
    client: Client, db: asyncpg.Connection
) -> None:
    start = second()
    mine = batch(3, TRIP, DRIVER, start)
    assert await stored_as(client, mine, A) == (3, 0)
    await settled(client, A, TRIP, start + 2000)
    ws = await live(client, A, [TRIP], snapshots=1)
    before = await view(client, db, A)
    newer = batch(3, TRIP, OTHER, start + 5000)  # newer pings: would move latest
    await refused(client, newer, A)
    await refused(client, moved(batch(3, TRIP, OTHER, start)), A)  # the owner's instants
    await asyncio.sleep(0.2)  # a wrongly stored batch would be published by now
    assert await view(client, db, A) == before
    assert await quiet(ws) == []
    # drv_2 keeps its own trips, and the refused batch may be posted by the owner.
    assert await stored_as(client, batch(2, "trip_2", OTHER), A) == (2, 0)
    newer["driverId"] = DRIVER
    assert await stored_as(client, newer, A) == (3, 0)
    [msg] = await exactly(ws, 1)
    assert (msg["driverId"], points(msg["locations"])) == (DRIVER, points(newer["locations"]))
    await ws.close()


async def test_handover_moves_the_trip_to_the_new_driver(
    client: Client, db: asyncpg.Connection
) -> None:
    start = second()
    first = batch(2, TRIP, DRIVER, start)
    assert await stored_as(client, first, A) == (2, 0)
    body = {"driverId": OTHER}
    for sub in (DRIVER, OTHER):  # a driver cannot hand a trip over, not even its own
        resp = await client.put(HANDOVER.format(TRIP), json=body, headers=auth("driver", sub, A))
        assert resp.status == 403, await resp.text()
    resp = await client.put(HANDOVER.format("no_such_trip"), json=body, headers=dispatcher(A))
    assert resp.status == 404, await resp.text()
    assert await stored_as(client, batch(1, TRIP, DRIVER, start + 2000), A) == (1, 0)

    await hand_over(client, A, TRIP, OTHER)
    await refused(client, batch(2, TRIP, DRIVER, start + 3000), A)
    second_leg = batch(2, TRIP, OTHER, start + 5000)
    assert await stored_as(client, second_leg, A) == (2, 0)
    assert [r[1] for r in await stored(db, A)] == [DRIVER] * 3 + [OTHER] * 2
    await settled(client, A, TRIP, start + 6000)
    latest = await (await client.get(LATEST.format(TRIP), headers=dispatcher(A))).json()
    assert latest["driverId"] == OTHER

    # Handed back, it is drv_1's again.
    await hand_over(client, A, TRIP, DRIVER)
    await refused(client, batch(1, TRIP, OTHER, start + 8000), A)
    assert await stored_as(client, batch(1, TRIP, DRIVER, start + 8000), A) == (1, 0)


async def test_handover_with_a_bad_body_is_400_naming_the_field(
    client: Client, db: asyncpg.Connection
) -> None:
    start = second()
    assert await stored_as(client, batch(2, TRIP, DRIVER, start), A) == (2, 0)
    url, headers = HANDOVER.format(TRIP), dispatcher(A)
    bodies: list[tuple[Any, str]] = [
        ({}, "driverId"), ({"driverId": ""}, "driverId"), ({"driverId": None}, "driverId"),
        ({"driverId": 7}, "driverId"), ({"driverId": ["drv_2"]}, "driverId"),
        ({"driverId": "d" * 65}, "driverId"), ({"driverId": "drv\u00002"}, "driverId"),
        ({"driver": "drv_2"}, "driver"),
    ]  # fmt: skip
    for body, field in bodies:
        resp = await client.put(url, json=body, headers=headers)
        assert resp.status == 400, (body, await resp.text())
        assert field in (await resp.json())["detail"], body
    for raw in (b"{not json", b"", b"[]", b'"drv_2"'):
        resp = await client.put(
            url, data=raw, headers={**headers, "Content-Type": "application/json"}
        )
        assert resp.status == 400, (raw, await resp.text())
        assert "error" in await resp.json()
    # None of them moved the trip.
    await refused(client, batch(1, TRIP, OTHER, start + 5000), A)
    assert await stored_as(client, batch(1, TRIP, DRIVER, start + 5000), A) == (1, 0)


async def test_a_handover_on_one_pod_binds_every_pod(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """Two app instances on one database and one Redis prefix: two pods (durable acks)."""
    pod1, pod2 = await make_client(), await make_client()
    start = second()
    # Pod 2 has seen drv_1 create and post to the trip (whatever it may remember of that).
    assert await stored_as(pod2, batch(2, TRIP, DRIVER, start), A) == (2, 0)
    assert await stored_as(pod2, batch(2, TRIP, DRIVER, start + 2000), A) == (2, 0)
    await refused(pod2, batch(1, TRIP, OTHER, start + 4000), A)

    await hand_over(pod1, A, TRIP, OTHER)
    await refused(pod2, batch(2, TRIP, DRIVER, start + 5000), A)
    assert await stored_as(pod2, batch(2, TRIP, OTHER, start + 5000), A) == (2, 0)
    await refused(pod1, batch(1, TRIP, DRIVER, start + 7000), A)

    await hand_over(pod2, A, TRIP, DRIVER)  # and back, the other way round
    await refused(pod1, batch(1, TRIP, OTHER, start + 8000), A)
    await refused(pod2, batch(1, TRIP, OTHER, start + 8000), A)
    assert await stored_as(pod1, batch(1, TRIP, DRIVER, start + 8000), A) == (1, 0)
    drivers = [(r[1], r[4] - start) for r in await stored(db, A)]
    assert drivers == [(DRIVER, t) for t in range(0, 4000, 1000)] + [
        (OTHER, 5000), (OTHER, 6000), (DRIVER, 8000),
    ]  # fmt: skip


async def test_ownership_survives_a_restart(make_client: Factory, db: asyncpg.Connection) -> None:
    start = second()
    first = await make_client()
    assert await stored_as(first, batch(2, TRIP, DRIVER, start), A) == (2, 0)
    assert await stored_as(first, batch(2, "trip_2", DRIVER, start), A) == (2, 0)
    await hand_over(first, A, "trip_2", OTHER)
    await first.close()

    again = await make_client()  # a new instance: nothing left in its memory
    await refused(again, batch(1, TRIP, OTHER, start + 5000), A)
    assert await stored_as(again, batch(1, TRIP, DRIVER, start + 5000), A) == (1, 0)
    await refused(again, batch(1, "trip_2", DRIVER, start + 5000), A)
    assert await stored_as(again, batch(1, "trip_2", OTHER, start + 5000), A) == (1, 0)
    assert len(await stored(db, A)) == 6


# -- hostile clients -----------------------------------------------------------------------------


async def test_hostile_ids_and_tokens_are_refused_and_store_nothing(
    client: Client, db: asyncpg.Connection
) -> None:
    start = second()
    mine = batch(2, TRIP, DRIVER, start, BATCH)
    assert await stored_as(client, mine, A) == (2, 0)
    await settled(client, A, TRIP, start + 1000)
    before = await view(client, db, A)
    long, huge = "x" * 65, "x" * 10_000
    for field, value in (("tripId", long), ("tripId", huge), ("batchId", long)):
        body = {**batch(1, TRIP, DRIVER, start + 5000), field: value}
        status, answer = await post(client, body, A)
        assert (status, answer["error"]) == (400, "invalid_payload"), answer
        assert f"$.{field}" in answer["detail"], answer
    body = batch(1, long, long, start + 5000)  # a token whose subject is that long, too
    status, answer = await post(client, body, A)
    assert (status, answer["error"]) == (400, "invalid_payload"), answer
    old_app = batch(1, TRIP, DRIVER, start + 5000)
    old_app.pop("batchId")
    old_app["locations"][0]["batchId"] = long
    assert (await post(client, old_app, A))[0] == 400

    # Another driver's token, and a dispatcher's, may not post as drv_1.
    status, answer = await post(client, batch(1, TRIP, DRIVER, start + 5000), A, OTHER)
    assert (status, answer["error"]) == (403, "forbidden")
    resp = await client.post(PING, json=batch(1, TRIP, DRIVER, start + 5000), headers=dispatcher(A))
    assert (resp.status, (await resp.json())["error"]) == (403, "forbidden")
    # Nor hand a trip over to an id no token could carry; an id no trip can have is no trip.
    resp = await client.put(HANDOVER.format(TRIP), json={"driverId": huge}, headers=dispatcher(A))
    assert resp.status == 400
    resp = await client.put(HANDOVER.format(long), json={"driverId": OTHER}, headers=dispatcher(A))
    assert resp.status in (400, 404), await resp.text()
    await asyncio.sleep(0.1)
    assert await view(client, db, A) == before
    assert await stored(db, A) == rows_of(mine)


def overland_body(devices: list[str], ts_ms: int) -> bytes:
    features = [feature(ts_ms, 12.9, 77.5, d) for d in devices]
    return json.dumps({"locations": features}, separators=(",", ":")).encode()


async def test_a_request_names_at_most_max_trips_per_request(
    client: Client, db: asyncpg.Connection
) -> None:
    """MAX_TRIPS_PER_REQUEST (10): Overland names a trip per point (its device_id)."""
    start = second()
    truck = batch(2, "truck", DRIVER, start)
    assert await stored_as(client, truck, A) == (2, 0)
    await settled(client, A, "truck", start + 1000)
    fleet_before = await snapshot(client, A, fleet=True)
    assert list(fleet_before) == ["truck"]
    headers = {**auth("driver", "drv_9", A), "Content-Type": "application/json"}
    for n in (5_200, 11):
        data = overland_body([f"dev_{i}" for i in range(n)], start + 3000)
        assert len(data) < 1_048_576  # under MAX_BODY_BYTES: the trip limit answers
        resp = await client.post(OVERLAND, data=data, headers=headers)
        assert resp.status == 400, await resp.text()
        answer = await resp.json()
        assert answer["error"] == "invalid_payload"
        assert re.search(r"\b10\b", answer["detail"]), answer  # names the limit
    await asyncio.sleep(0.2)
    assert await stored(db, A) == rows_of(truck)
    assert await snapshot(client, A, fleet=True) == fleet_before
    # Ten is allowed, and the refused requests started no trip of drv_9's daily allowance.
    ten = [f"dev_{i}" for i in range(10)]
    resp = await client.post(OVERLAND, data=overland_body(ten, start + 3000), headers=headers)
    assert resp.status == 200, await resp.text()
    assert sorted({r[0] for r in await stored(db, A)}) == sorted([*ten, "truck"])


async def test_a_driver_starts_at_most_max_trips_per_day(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    client = await make_client(max_trips_per_driver_per_day=3)
    start = second()
    for i in range(3):
        assert await stored_as(client, batch(2, f"trip_{i}", DRIVER, start), A) == (2, 0)
    status, answer = await post(client, batch(2, "trip_3", DRIVER, start), A)
    assert (status, answer["error"]) == (429, "too_many_trips"), answer
    got = await phone(client, "overland", DRIVER, A, start, 12.9, 77.5, "trip_4")
    assert (got[0], json.loads(got[3])["error"]) == (429, "too_many_trips")
    assert {r[0] for r in await stored(db, A)} == {"trip_0", "trip_1", "trip_2"}
    # Its trips keep working; the allowance is per driver and per org.
    assert await stored_as(client, batch(2, "trip_0", DRIVER, start + 5000), A) == (2, 0)
    assert await stored_as(client, batch(2, "trip_3", OTHER, start), A) == (2, 0)
    assert await stored_as(client, batch(2, "trip_3", DRIVER, start), B) == (2, 0)
    assert len(await stored(db, A)) == 10


async def test_future_timestamps_cannot_crowd_a_truck_out_of_the_fleet_snapshot(
    make_client: Factory,
) -> None:
    """A driver posting 4 minutes ahead (inside MAX_CLOCK_SKEW_S) to more trips than
    FLEET_SNAPSHOT_MAX must not hide a truck that reports after them."""
    client = await make_client(fleet_snapshot_max=5)
    for i in range(6):
        ahead = now_ms(240)
        assert await stored_as(client, batch(1, f"ghost_{i}", "drv_9", ahead), A) == (1, 0)
        await settled(client, A, f"ghost_{i}", ahead)
    await asyncio.sleep(0.05)
    at = now_ms()
    assert await stored_as(client, batch(1, "truck", DRIVER, at), A) == (1, 0)
    await settled(client, A, "truck", at)
    snaps = await snapshot(client, A, fleet=True)
    assert "truck" in snaps, list(snaps)
    assert ms(snaps["truck"]["location"]["timestamp"]) == at
    assert len(snaps) <= 5


# -- who may write and read what --------------------------------------------------------------


async def test_driver_posts_only_as_itself(client, db):
    body = batch(2, driver="drv_2")
    resp = await client.post(PING, json=body, headers=auth("driver", "drv_1"))
    assert resp.status == 403
    assert await resp.json() == {
        "error": "forbidden",
        "detail": "driverId does not match the token's subject",
    }
    resp = await client.post(PING, json=batch(2), headers=auth("dispatcher", "drv_1"))
    assert resp.status == 403
    assert await resp.json() == {
        "error": "forbidden",
        "detail": "only driver tokens may post pings",
    }
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


async def test_pings_belong_to_the_token_org(client, db):
    await client.post(PING, json=batch(2), headers=auth("driver", "drv_1", "org_7"))
    assert await db.fetchval('SELECT array_agg(DISTINCT "orgId") FROM "TripLocation"') == ["org_7"]


async def test_reads_of_another_org_answer_like_an_unknown_trip(client):
    assert (await client.post(PING, json=batch(3), headers=auth())).status == 200
    own = auth("dispatcher", "disp_a", "org_1")
    other = auth("dispatcher", "disp_b", "org_2")
    for template in (LATEST, HISTORY):
        resp = await client.get(template.format("trip_1"), headers=own)
        assert resp.status == 200
        theirs = await client.get(template.format("trip_1"), headers=other)
        unknown = await client.get(template.format("no_such_trip"), headers=own)
        assert theirs.status == unknown.status == 404
        assert await theirs.json() == {"error": "not_found", "detail": "no trip 'trip_1'"}
        assert await unknown.json() == {"error": "not_found", "detail": "no trip 'no_such_trip'"}
        assert theirs.headers["Cache-Control"] == "no-store"
    # Range and cursor do not open another door.
    q = "?from=1970-01-01T00:00:00Z&limit=1&cursor=djE6MA"
    resp = await client.get(HISTORY.format("trip_1") + q, headers=other)
    assert resp.status == 200 and (await resp.json())["locations"] == []


async def test_a_driver_reads_only_its_own_trips(client):
    assert (await client.post(PING, json=batch(2), headers=auth())).status == 200
    for template in (LATEST, HISTORY):
        mine = await client.get(template.format("trip_1"), headers=auth("driver", "drv_1"))
        assert mine.status == 200
        colleague = await client.get(template.format("trip_1"), headers=auth("driver", "drv_2"))
        assert colleague.status == 404
        assert await colleague.json() == {"error": "not_found", "detail": "no trip 'trip_1'"}


def _pings_read(plan: list[Any]) -> int:
    """Executions of the plan's scans of "TripLocation" (EXPLAIN ANALYZE, FORMAT JSON)."""
    loops, nodes = 0, [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node.get("Relation Name", "").startswith("TripLocation"):
            loops += node["Actual Loops"]
    return loops


async def test_a_driver_asking_for_a_colleagues_trip_reads_none_of_its_pings(client, db):
    """A driver token naming a colleague's trip is told 404 without PostgreSQL walking the
    trip's pings for its own (one heap fetch each: seconds for a long trip, on the pool that
    ingest uses); a driver the trip was handed over from still reads the pings it drove."""
    from ingest import trip_pages
    from ingest.read_api import _EXISTS_SQL, _LATEST_SQL, _PAGE_SQL

    start = second()
    assert await stored_as(client, batch(3, TRIP, DRIVER, start), A) == (3, 0)
    args, end = (TRIP, A, OTHER), datetime(9999, 1, 1, tzinfo=UTC)
    page = (*args, _EPOCH, end, _EPOCH, 10)
    whole = (A, TRIP, OTHER, _EPOCH, end, 10)  # summaries and exports
    for sql, params in (
        (_LATEST_SQL, args), (_PAGE_SQL, page), (_EXISTS_SQL, args), (trip_pages._PAGE_SQL, whole)
    ):  # fmt: skip
        for mode in ("force_custom_plan", "force_generic_plan"):
            await db.execute(f"SET plan_cache_mode = {mode}")
            explained = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql[True]}", *params)
            assert _pings_read(json.loads(explained)) == 0, explained
            own = tuple(DRIVER if p == OTHER else p for p in params)
            mine = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql[True]}", *own)
            assert _pings_read(json.loads(mine)) > 0  # (the test can see a scan)
    await db.execute("RESET plan_cache_mode")
    for template in (LATEST, HISTORY, HISTORY + "?format=gpx", SUMMARY):
        colleague = await client.get(template.format(TRIP), headers=auth("driver", OTHER, A))
        assert colleague.status == 404, await colleague.text()

    # Handed over, the trip holds the pings of both: each driver reads its own, nobody else any.
    await hand_over(client, A, TRIP, OTHER)
    assert await stored_as(client, batch(2, TRIP, OTHER, start + 5000), A) == (2, 0)
    for sub, count in ((DRIVER, 3), (OTHER, 2)):
        resp = await client.get(HISTORY.format(TRIP), headers=auth("driver", sub, A))
        assert resp.status == 200, await resp.text()
        assert len((await resp.json())["locations"]) == count
        resp = await client.get(LATEST.format(TRIP), headers=auth("driver", sub, A))
        assert resp.status == 200 and (await resp.json())["driverId"] == sub
    for template in (LATEST, HISTORY):
        stranger = await client.get(template.format(TRIP), headers=auth("driver", "drv_3", A))
        assert stranger.status == 404, await stranger.text()

    # A trip handed over before handovers were dated (migration 006) reads as handed over.
    assert await stored_as(client, batch(2, "trip_old", DRIVER, start), A) == (2, 0)
    await db.execute(
        """UPDATE "IngestTrip" SET "driverId" = $3, "createdAt" = (SELECT "appliedAt"
        - interval '1 day' FROM "_ingest_migrations" WHERE "name" LIKE '006%')
        WHERE "orgId" = $1 AND "tripId" = $2""",
        A, "trip_old", OTHER,
    )  # fmt: skip
    resp = await client.get(HISTORY.format("trip_old"), headers=auth("driver", DRIVER, A))
    assert resp.status == 200, await resp.text()
    assert len((await resp.json())["locations"]) == 2


async def test_an_empty_cursor_does_not_make_an_unknown_trip_a_200(client):
    for trip in (TRIP, "no_such_trip"):  # another org's, and nobody's
        if trip == TRIP:
            assert await stored_as(client, batch(1, TRIP, DRIVER), B) == (1, 0)
        resp = await client.get(HISTORY.format(trip) + "?cursor=", headers=dispatcher(A))
        assert resp.status == 404, await resp.text()


async def test_the_dedup_guard_is_per_org_and_reads_stay_per_org(client, db):
    """The guard is on ("orgId", "tripId", "timestamp"): another org reusing a trip id, driver
    id, batch id and instant stores its own pings, learns nothing, and reads only its own."""
    body = batch(2)
    assert (await (await client.post(PING, json=body, headers=auth())).json())["accepted"] == 2
    resp = await client.post(PING, json=body, headers=auth("driver", "drv_1", "org_2"))
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 2 and (await resp.json())["duplicates"] == 0
    own = await client.get(LATEST.format("trip_1"), headers=auth("dispatcher", "d", "org_2"))
    assert own.status == 200
    counts = await db.fetch('SELECT "orgId", count(*) FROM "TripLocation" GROUP BY 1 ORDER BY 1')
    assert [tuple(r) for r in counts] == [("org_1", 2), ("org_2", 2)]


async def test_org_ids_with_a_colon_do_not_meet_in_redis(client):
    """Redis names are prefix + org + ":" + trip. Org "a" asking for trip "b:t" must not
    read org "a:b"'s trip "t", and org "a"'s fleet must not match org "a:b"'s channels."""
    fleet = await ws_connect(client, token("dispatcher", "d", "a"))
    await subscribed(fleet, fleet=True)
    body = batch(1, trip="t", driver="drv_x")
    assert (
        await client.post(PING, json=body, headers=auth("driver", "drv_x", "a:b"))
    ).status == 200
    live = client.server.app[LIVE]
    for _ in range(100):  # the latest location is published after the ack
        if await live.latest("a:b", "t") is not None:
            break
        await asyncio.sleep(0.02)
    resp = await client.get(LATEST.format("b:t"), headers=auth("dispatcher", "d", "a"))
    got = await quiet(fleet)
    await fleet.close()
    assert resp.status == 404, await resp.text()
    assert got == []


@pytest.mark.parametrize("trip", ["%00", "a%00b", "x" * 65, "%1B%5B31m"])
async def test_an_id_that_could_never_be_stored_is_an_unknown_trip_not_a_500(client, trip):
    """A NUL would fail the query (PostgreSQL text holds none); such ids are answered 404
    without asking the database."""
    own = auth("dispatcher", "disp_a", "org_1")
    for template in (LATEST, HISTORY):
        resp = await client.get(template.format(trip), headers=own)
        assert resp.status == 404, await resp.text()
        assert (await resp.json())["error"] == "not_found"
    resp = await client.put(HANDOVER.format(trip), json={"driverId": "drv_2"}, headers=own)
    assert resp.status == 404, await resp.text()
