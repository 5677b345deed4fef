"""OwnTracks, Traccar Client / OsmAnd and Overland against the running service.

The payloads are fixtures written from each app's documented format
(tests/fixtures/phone_apps/). Their fixes are dated June 2026, so these tests widen the
accepted age window (MAX_PING_AGE_DAYS) instead of rewriting the fixtures' times.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from ingest import metrics
from ingest.phone_apps.common import fold
from ingest.phone_apps.osmand import MAX_FORM_BYTES, MAX_FORM_FIELDS
from ingest.phone_apps.owntracks import MAX_HELD_PER_DRIVER
from ingest.ratelimit import RateLimiter
from ingest.schema import Location, PingBatch
from ingest.submit import Submitted
from ingest.typedefs import BUFFER

from .conftest import auth, state_reached, token

FIXTURES = Path(__file__).parent / "fixtures" / "phone_apps"
OWNTRACKS = "/api/v1/ingest/owntracks"
OSMAND = "/api/v1/ingest/osmand"
OVERLAND = "/api/v1/ingest/overland"
# Accept the fixtures' fixes (June 2026), with a window no wider than needed: the service
# creates a partition for every month of the window when it starts.
_FIXED_AT = datetime(2026, 6, 1, tzinfo=UTC)
OLD_OK = {"max_ping_age_days": (datetime.now(UTC) - _FIXED_AT).days + 2}
KNOT = 1852 / 3600


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def queries(name: str) -> list[str]:
    return (FIXTURES / name).read_text().split()


def basic_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def basic(sub: str = "drv_1", **kw: Any) -> dict[str, str]:
    """What OwnTracks sends: HTTP Basic, the driver's token as the password."""
    return basic_header(sub, token(sub=sub, **kw))


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


async def rows(db: asyncpg.Connection, trip: str | None = None) -> list[dict[str, Any]]:
    sql = 'SELECT * FROM "TripLocation"'
    args: list[Any] = []
    if trip is not None:
        sql += ' WHERE "tripId" = $1'
        args.append(trip)
    return [dict(r) for r in await db.fetch(sql + ' ORDER BY "timestamp"', *args)]


async def count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval('SELECT count(*) FROM "TripLocation"'))


async def owntracks(
    client, body: Any, headers: dict[str, str] | None = None, path: str = OWNTRACKS
):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(
        path,
        data=data,
        headers={"Content-Type": "application/json", **(basic() if headers is None else headers)},
    )


async def assert_owntracks_ok(resp) -> None:
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    assert await resp.read() == b"[]"


# -- OwnTracks ---------------------------------------------------------------------------------


async def test_owntracks_android_location_is_stored_in_native_units(make_client, db):
    client = await make_client(**OLD_OK)
    headers = {**basic(), "X-Limit-U": "drv_1", "X-Limit-D": "pixel-7"}
    resp = await owntracks(client, load("owntracks/location_android.json"), headers)
    await assert_owntracks_ok(resp)
    assert resp.headers["X-Ingest-Accepted"] == "1"
    [row] = await rows(db)
    assert (row["tripId"], row["driverId"], row["orgId"], row["batchId"]) == (
        "pixel-7", "drv_1", "org_1", None,
    )  # fmt: skip
    assert (row["latitude"], row["longitude"]) == (12.9716, 77.5946)
    assert row["timestamp"] == at("2026-06-01T10:00:00+00:00")  # tst: epoch seconds
    assert row["speed"] == pytest.approx(15.0)  # vel 54 km/h
    assert (row["heading"], row["accuracy"], row["altitude"]) == (87.0, 12.0, 921.0)

    again = await owntracks(client, load("owntracks/location_android.json"), headers)
    await assert_owntracks_ok(again)  # a resend is answered the same and stored once
    assert (again.headers["X-Ingest-Accepted"], again.headers["X-Ingest-Duplicates"]) == ("0", "1")
    assert await count(db) == 1

    latest = await client.get("/api/v1/tracking/trips/pixel-7/latest", headers=auth())
    assert latest.status == 200
    assert (await latest.json())["location"]["speed"] == pytest.approx(15.0)


async def test_owntracks_ios_minimal_location_token_in_url_device_from_topic(make_client, db):
    client = await make_client(**OLD_OK)
    path = f"{OWNTRACKS}?token={token()}"
    resp = await owntracks(client, load("owntracks/location_ios.json"), {}, path)
    await assert_owntracks_ok(resp)
    [row] = await rows(db)
    assert (row["tripId"], row["driverId"]) == ("iphone", "drv_1")
    assert row["timestamp"] == at("2026-06-01T10:00:05+00:00")
    assert [row[k] for k in ("accuracy", "speed", "heading", "altitude")] == [None] * 4

    # ?d= names the device; without any device name the trip is the driver's own id.
    no_topic = {k: v for k, v in load("owntracks/location_ios.json").items() if k != "topic"}
    await assert_owntracks_ok(await owntracks(client, no_topic, {}, path + "&u=x&d=ipad"))
    no_topic["tst"] += 1
    await assert_owntracks_ok(
        await owntracks(client, no_topic, {"Authorization": f"Bearer {token()}"})
    )
    assert {r["tripId"] for r in await rows(db)} == {"iphone", "ipad", "drv_1"}


async def test_owntracks_units_at_their_extremes(make_client, db):
    client = await make_client(**OLD_OK)
    for message in load("owntracks/location_extremes.json"):
        await assert_owntracks_ok(await owntracks(client, message, {**basic(), "X-Limit-D": "k7"}))
    got = [
        (r["latitude"], r["longitude"], r["speed"], r["heading"], r["accuracy"], r["altitude"])
        for r in await rows(db)
    ]
    assert got[0] == (90.0, -180.0, 0.0, 0.0, 0.0, -430.0)
    assert got[1][:2] == (-90.0, 180.0) and got[1][2] == pytest.approx(1235 / 3.6)
    assert got[1][3:] == (0.0, 5000.0, 8849.0)  # cog 360 is north
    assert got[2] == (0.0, 0.0, None, None, None, None)  # vel and cog -1: unknown


async def test_owntracks_other_messages_are_answered_and_ignored(make_client, db):
    client = await make_client(**OLD_OK)
    for message in load("owntracks/not_locations.json"):
        resp = await owntracks(client, message)
        await assert_owntracks_ok(resp)
        assert resp.headers["X-Ingest-Ignored"] == "1"
    await assert_owntracks_ok(await owntracks(client, b""))  # a deleted friend: empty body
    assert await count(db) == 0


async def test_owntracks_auth_failures(make_client, db):
    client = await make_client(**OLD_OK)
    body = load("owntracks/location_android.json")
    resp = await owntracks(client, body, {})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    assert (await owntracks(client, body, basic_header("drv_1", "not-a-jwt"))).status == 401
    assert (await owntracks(client, body, basic_header("drv_1", ""))).status == 401
    assert (await owntracks(client, body, {"Authorization": "Basic !!"})).status == 401
    resp = await owntracks(client, body, basic_header("drv_1", token(ttl_s=-3600)))
    assert resp.status == 401 and "expired" in (await resp.json())["detail"]
    dispatcher = basic_header("disp_1", token("dispatcher", "disp_1"))
    assert (await owntracks(client, body, dispatcher)).status == 403
    assert await count(db) == 0


@pytest.mark.parametrize(
    ("body", "headers", "names"),
    [
        ({"_type": "location", "lon": 1.0, "tst": 1780308000}, {}, "`lat`"),
        ({"_type": "location", "lat": "12.9", "lon": 1.0, "tst": 1780308000}, {}, "$.lat"),
        ({"_type": "location", "lat": 1.0, "lon": 1.0}, {}, "`tst`"),
        ({"lat": 1.0}, {}, "`_type`"),
        (b"{not json", {}, "JSON"),
        ({"_type": "encrypted", "data": "c2VjcmV0"}, {}, "encrypt"),
        (
            {"_type": "location", "lat": 1.0, "lon": 1.0, "tst": 1780308000},
            {"X-Limit-D": "d" * 65},
            "X-Limit-D",
        ),
    ],
)
async def test_owntracks_malformed_message_400_names_the_field(
    make_client, db, body, headers, names
):
    client = await make_client(**OLD_OK)
    resp = await owntracks(client, body, {**basic(), **headers})
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "invalid_payload" and names in answer["detail"]


async def test_owntracks_out_of_range_point_is_dropped_but_answered(make_client, db):
    client = await make_client()  # default window: 2026-06 is too old
    resp = await owntracks(client, load("owntracks/location_android.json"))
    await assert_owntracks_ok(resp)  # no error: OwnTracks would resend it forever
    assert resp.headers["X-Ingest-Rejected"] == "1"
    assert await count(db) == 0


async def test_owntracks_rate_limit_holds_the_request_instead_of_refusing(make_client, db):
    client = await make_client(rate_limit_per_s=5, rate_limit_burst=1, **OLD_OK)
    first, second = load("owntracks/location_extremes.json")[:2]
    await assert_owntracks_ok(await owntracks(client, first))
    await assert_owntracks_ok(await owntracks(client, second))  # waited ~0.2 s, not 429
    assert await count(db) == 2


# -- overload: OwnTracks is held, then hung up on; the others get 503 ---------------------------


async def lock_table(database: str) -> tuple[asyncpg.Connection, Any]:
    locker = await asyncpg.connect(database)
    tx = locker.transaction()
    await tx.start()
    await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
    return locker, tx


async def test_outage_owntracks_gets_no_answer_the_others_503_then_resends_store_once(
    make_client, database, db
):
    client = await make_client(ack_timeout_ms=500, **OLD_OK)
    ot = load("owntracks/location_android.json")
    osm = queries("osmand/traccar_client.query")[0]
    ovl = load("overland/batch_ios.json")
    locker, tx = await lock_table(database)
    try:
        with pytest.raises(aiohttp.ClientConnectionError):  # as if unreachable: kept on the phone
            await owntracks(client, ot)
        resp = await client.post(f"{OSMAND}?token={token()}&{osm}")
        assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
        resp = await client.post(OVERLAND, json=ovl, headers=auth())
        assert resp.status == 503 and (await resp.json()) != {"result": "ok"}
    finally:
        await tx.rollback()
        await locker.close()

    buffer = client.server.app[BUFFER]
    for _ in range(100):  # the phones retry later; by then the held pings are committed
        if buffer.depth == 0:
            break
        await asyncio.sleep(0.05)
    await assert_owntracks_ok(await owntracks(client, ot))
    assert (await client.post(f"{OSMAND}?token={token()}&{osm}")).status == 200
    resp = await client.post(OVERLAND, json=ovl, headers=auth())
    assert await resp.json() == {"result": "ok"}
    assert await count(db) == 1 + 1 + 3  # every fix exactly once


async def test_owntracks_waits_for_room_in_a_full_buffer(make_client, database, db):
    client = await make_client(buffer_max_rows=1, flush_max_rows=1, ack_timeout_ms=3000, **OLD_OK)
    locker, tx = await lock_table(database)
    first = asyncio.create_task(
        client.post(f"{OSMAND}?token={token()}&{queries('osmand/traccar_client.query')[0]}")
    )
    await asyncio.sleep(0.2)  # the buffer now holds that one row, stuck behind the lock
    held = asyncio.create_task(owntracks(client, load("owntracks/location_android.json")))
    await asyncio.sleep(0.3)
    assert not held.done()
    await tx.rollback()
    await locker.close()
    assert (await first).status == 200
    await assert_owntracks_ok(await held)
    assert await count(db) == 2


# -- Traccar Client / OsmAnd -------------------------------------------------------------------


async def test_traccar_client_query_speed_in_knots(make_client, db):
    client = await make_client(**OLD_OK)
    query = queries("osmand/traccar_client.query")[0]
    resp = await client.post(f"{OSMAND}?token={token()}&{query}")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"batchId": None, "accepted": 1, "duplicates": 0, "rejected": []}
    [row] = await rows(db)
    assert (row["tripId"], row["driverId"], row["orgId"]) == ("trip_tc", "drv_1", "org_1")
    assert row["timestamp"] == at("2026-06-01T10:00:00+00:00")
    assert row["speed"] == pytest.approx(10.0 * KNOT)  # 10 kn = 5.144 m/s
    assert (row["heading"], row["altitude"], row["accuracy"]) == (87.5, 921.0, 4.5)

    again = await client.post(f"{OSMAND}?token={token()}&{query}")
    assert again.status == 200 and (await again.json())["duplicates"] == 1
    assert await count(db) == 1


async def test_osmand_app_get_template_ms_and_mps_and_form_posts(make_client, db):
    client = await make_client(**OLD_OK)
    query = queries("osmand/osmand_app.query")[0]
    resp = await client.get(f"{OSMAND}?token={token()}&{query}")  # the OsmAnd app uses GET
    assert resp.status == 200, await resp.text()
    [row] = await rows(db, "trip_osm")
    assert row["timestamp"] == at("2026-06-01T10:00:05+00:00")  # timestamp in ms
    assert row["speed"] == 12.5  # speed_unit=mps: as sent
    assert (row["heading"], row["accuracy"], row["altitude"]) == (270.0, 3.9, 920.5)

    form = queries("osmand/traccar_client.query")[0]  # the same fields as a form body
    resp = await client.post(
        f"{OSMAND}?token={token()}", data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert resp.status == 200, await resp.text()
    [row] = await rows(db, "trip_tc")
    assert row["speed"] == pytest.approx(10.0 * KNOT)


async def test_osmand_units_and_time_forms_at_their_extremes(make_client, db):
    client = await make_client(**OLD_OK)
    for query in queries("osmand/extremes.query"):
        resp = await client.post(f"{OSMAND}?{query}", headers=auth())  # Bearer works too
        assert resp.status == 200, await resp.text()
    got = [
        (
            r["timestamp"],
            r["latitude"],
            r["longitude"],
            r["speed"],
            r["heading"],
            r["accuracy"],
            r["altitude"],
        )
        for r in await rows(db, "trip_x")
    ]
    assert got[0] == (at("2026-06-01T10:00:10+00:00"), 90.0, -180.0, 0.0, 0.0, 0.0, -430.0)
    assert got[1][:3] == (at("2026-06-01T10:00:15+00:00"), -90.0, 180.0)  # ISO 8601 with Z
    assert got[1][3] == pytest.approx(666.8 * KNOT) and got[1][4:] == (0.0, 5000.0, 8849.0)
    assert got[2] == (at("2026-06-01T10:01:00+00:00"), 0.0, 0.0, None, None, None, None)
    assert got[3] == (at("2026-06-01T10:02:00+00:00"), 1.5, 2.5, None, None, None, None)


async def test_traccar_client_json_bodies(make_client, db):
    client = await make_client(**OLD_OK)
    url = f"{OSMAND}?token={token()}"
    for name in (
        "traccar_client.json",
        "traccar_client_unknowns.json",
        "traccar_client_batch.json",
    ):
        resp = await client.post(url, json=load(f"osmand/{name}"))
        assert resp.status == 200, await resp.text()
    got = [
        (r["timestamp"], r["speed"], r["heading"], r["accuracy"], r["altitude"])
        for r in await rows(db, "trip_tcj")
    ]
    assert got == [
        (at("2026-06-01T10:00:00.250+00:00"), 15.0, 87.5, 4.5, 921.0),  # m/s: as sent
        (at("2026-06-01T10:00:05+00:00"), None, None, None, None),  # -1: unknown
        (at("2026-06-01T10:01:00+00:00"), 0.0, 0.0, 5.0, 920.0),
        (at("2026-06-01T10:02:00+00:00"), 343.0, 359.9, 5.0, 919.0),
    ]
    resp = await client.post(url, json=load("osmand/traccar_client.json"))
    assert (await resp.json())["duplicates"] == 1
    assert await count(db) == 4


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("id=t&lon=1&timestamp=1780308000", "lat: required"),
        ("id=t&lat=abc&lon=1&timestamp=1780308000", "lat: expected a number"),
        ("id=t&lat=nan&lon=1&timestamp=1780308000", "lat: must be a finite number"),
        ("id=t&lat=1&lon=1", "timestamp: required"),
        ("id=t&lat=1&lon=1&timestamp=yesterday", "timestamp: expected epoch seconds"),
        ("id=t&lat=1&lon=1&timestamp=1780308000&speed=fast", "speed: expected a number"),
        ("id=t&lat=1&lon=1&timestamp=1780308000&speed=1&speed_unit=furlongs", "speed_unit"),
        ("id=" + "x" * 65 + "&lat=1&lon=1&timestamp=1780308000", "id: must be 1-64 characters"),
    ],
)
async def test_osmand_malformed_fix_400_names_the_field(make_client, db, query, names):
    client = await make_client(**OLD_OK)
    resp = await client.post(f"{OSMAND}?token={token()}&{query}")
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "invalid_payload" and names in answer["detail"], answer


async def test_traccar_client_json_malformed_400_names_the_field(make_client, db):
    client = await make_client(**OLD_OK)
    body = load("osmand/traccar_client.json")
    del body["location"]["coords"]["latitude"]
    resp = await client.post(f"{OSMAND}?token={token()}", json=body)
    assert resp.status == 400 and "latitude" in (await resp.json())["detail"]
    body = load("osmand/traccar_client.json")
    body["location"]["timestamp"] = "soon"
    resp = await client.post(f"{OSMAND}?token={token()}", json=body)
    assert resp.status == 400 and "$.location.timestamp" in (await resp.json())["detail"]


async def test_osmand_auth_failures_and_rate_limit(make_client, db):
    client = await make_client(rate_limit_per_s=0.5, rate_limit_burst=1, **OLD_OK)
    query = queries("osmand/traccar_client.query")[0]
    resp = await client.post(f"{OSMAND}?{query}")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.post(f"{OSMAND}?token=nope&{query}")).status == 401
    assert (
        await client.post(f"{OSMAND}?{query}", headers={"Authorization": "Digest x"})
    ).status == 401
    assert (
        await client.post(f"{OSMAND}?token={token('dispatcher', 'disp_1')}&{query}")
    ).status == 403
    assert (await client.post(f"{OSMAND}?token={token()}&{query}")).status == 200
    limited_before = metrics.RATE_LIMITED._value.get()
    resp = await client.post(f"{OSMAND}?token={token()}&{query}")
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert metrics.RATE_LIMITED._value.get() == limited_before + 1  # counted like the native 429
    assert await count(db) == 1


async def test_osmand_out_of_range_fix_is_dropped_with_200(make_client, db):
    client = await make_client()  # default window: 2026-06 is too old
    query = queries("osmand/traccar_client.query")[0]
    resp = await client.post(f"{OSMAND}?token={token()}&{query}")
    assert resp.status == 200  # an error would make the app resend it forever
    answer = await resp.json()
    assert answer["accepted"] == 0 and "timestamp" in answer["rejected"][0]["reason"]
    assert resp.headers["X-Ingest-Rejected"] == "1"
    assert await count(db) == 0


async def test_auth_disabled_device_is_the_driver(make_client, db):
    client = await make_client(auth_disabled=True, jwt_secret=None, **OLD_OK)
    query = queries("osmand/traccar_client.query")[0]
    assert (await client.post(f"{OSMAND}?{query}")).status == 200
    [row] = await rows(db)
    assert (row["tripId"], row["driverId"], row["orgId"]) == ("trip_tc", "trip_tc", "dev")


# -- Overland ----------------------------------------------------------------------------------


async def test_overland_batch_is_stored_and_answered_exactly_ok(make_client, db):
    client = await make_client(**OLD_OK)
    body = load("overland/batch_ios.json")
    resp = await client.post(OVERLAND, json=body, headers=auth())
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b'{"result":"ok"}'
    assert resp.headers["X-Ingest-Ignored"] == "2"  # the visit and the app event
    got = [
        (
            r["tripId"],
            r["driverId"],
            r["timestamp"],
            r["latitude"],
            r["longitude"],
            r["speed"],
            r["accuracy"],
            r["altitude"],
        )
        for r in await rows(db)
    ]
    assert got == [
        ("trip_ovl", "drv_1", at("2026-06-01T10:00:00+00:00"), 12.9716, 77.5946, 15.0, 5.0, 921.0),
        ("trip_ovl", "drv_1", at("2026-06-01T10:00:05+00:00"), 12.972, 77.595, None, 65.0, 0.0),
        ("trip_ovl", "drv_1", at("2026-06-01T10:00:10+00:00"), 12.973, 77.596, 0.0, 10.0, 925.0),
    ]  # GeoJSON [lon, lat] swapped back; -0700 and +05:30 offsets; speed -1 unknown

    again = await client.post(OVERLAND, json=body, headers=auth())
    assert await again.json() == {"result": "ok"}  # a resend is answered ok and stored once
    assert again.headers["X-Ingest-Duplicates"] == "3"
    assert await count(db) == 3


async def test_overland_minimal_points_and_device_ids(make_client, db):
    client = await make_client(max_pings_per_batch=2, **OLD_OK)
    body = load("overland/batch_minimal.json")
    for second in (2, 3, 4):  # a second device id in the same batch
        point = json.loads(json.dumps(body["locations"][0]))
        point["properties"].update(device_id="van-2", timestamp=f"2026-06-01T11:00:0{second}Z")
        body["locations"].append(point)
    resp = await client.post(
        OVERLAND, json=body, headers={"Authorization": f"Bearer {token(sub='drv_9')}"}
    )
    assert await resp.json() == {"result": "ok"}
    got = [
        (r["tripId"], r["driverId"], r["timestamp"], r["altitude"], r["speed"])
        for r in await rows(db)
    ]
    assert got[:2] == [
        ("drv_9", "drv_9", at("2026-06-01T11:00:00+00:00"), None, None),  # no device id
        ("drv_9", "drv_9", at("2026-06-01T11:00:01.500+00:00"), 12.5, None),  # [lon, lat, alt]
    ]
    assert [g[0] for g in got[2:]] == ["van-2"] * 3  # three points, split into batches of 2


async def test_overland_errors_are_not_ok(make_client, db):
    client = await make_client(**OLD_OK)
    body = load("overland/batch_ios.json")
    resp = await client.post(OVERLAND, json=body)
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert (
        await client.post(OVERLAND, json=body, headers=auth("dispatcher", "disp_1"))
    ).status == 403
    for broken, names in [
        ({}, "`locations`"),
        (
            {
                "locations": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [1.0]},
                        "properties": {"timestamp": "2026-06-01T11:00:00Z"},
                    }
                ]
            },
            "$.locations[0].geometry.coordinates",
        ),
        (
            {
                "locations": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [1.0, 2.0]},
                        "properties": {"timestamp": "soon"},
                    }
                ]
            },
            "$.locations[0].properties.timestamp",
        ),
        (
            {
                "locations": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [1.0, 2.0]},
                        "properties": {},
                    }
                ]
            },
            "$.locations[0].properties.timestamp",
        ),
        (
            {
                "locations": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": ["a", 2.0]},
                        "properties": {},
                    }
                ]
            },
            "$.locations[0].geometry.coordinates[0]",
        ),
    ]:
        resp = await client.post(OVERLAND, json=broken, headers=auth())
        assert resp.status == 400, broken
        assert names in (await resp.json())["detail"], await resp.text()
    assert await count(db) == 0


async def test_overland_out_of_range_points_are_dropped_the_rest_stored(make_client, db):
    client = await make_client()  # default window
    now = datetime.now(UTC)
    body = load("overland/batch_minimal.json")
    body["locations"][0]["properties"]["timestamp"] = (now - timedelta(minutes=5)).isoformat()
    body["locations"][1]["geometry"]["coordinates"] = [10.0, 91.0]  # latitude 91
    body["locations"][1]["properties"]["timestamp"] = (now - timedelta(minutes=4)).isoformat()
    resp = await client.post(OVERLAND, json=body, headers=auth())
    assert await resp.json() == {"result": "ok"}
    assert (resp.headers["X-Ingest-Accepted"], resp.headers["X-Ingest-Rejected"]) == ("1", "1")
    assert await count(db) == 1


async def test_overland_year_0000_is_that_points_rejection_not_a_400(make_client, db):
    """The contract: a timestamp of any year outside the window is the ping's rejection."""
    client = await make_client()
    body = load("overland/batch_minimal.json")
    now = datetime.now(UTC)
    body["locations"][0]["properties"]["timestamp"] = (now - timedelta(minutes=5)).isoformat()
    body["locations"][1]["properties"]["timestamp"] = "0000-12-31T23:59:59-05:00"
    resp = await client.post(OVERLAND, json=body, headers=auth())
    assert await resp.json() == {"result": "ok"}
    assert (resp.headers["X-Ingest-Accepted"], resp.headers["X-Ingest-Rejected"]) == ("1", "1")
    assert await count(db) == 1


# -- hostile and mixed requests ----------------------------------------------------------------


async def test_osmand_form_bomb_is_400_naming_the_limit_and_stores_nothing(make_client, db):
    """A gzipped form of 1 KB inflating to 1 MiB of fields ('a&' * 524288) or of '%' took
    0.3-0.5 s of the event loop in parse_qsl; now refused by size before it is parsed."""
    client = await make_client(**OLD_OK)
    url = f"{OSMAND}?token={token()}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    gzipped = {**form, "Content-Encoding": "gzip"}
    for inflated in (b"a&" * 524288, b"id=t&lat=" + b"%" * 1_000_000):
        resp = await client.post(url, data=gzip.compress(inflated), headers=gzipped)
        assert resp.status == 400
        detail = (await resp.json())["detail"]
        assert detail.startswith("form body:") and f"at most {MAX_FORM_BYTES}" in detail, detail
    fix = queries("osmand/traccar_client.query")[0]
    resp = await client.post(url, data=fix + "&a" * MAX_FORM_FIELDS, headers=form)
    assert resp.status == 400
    assert f"form body: more than {MAX_FORM_FIELDS} fields" in (await resp.json())["detail"]
    assert await count(db) == 0
    resp = await client.post(url, data=fix + "&a" * 50, headers=form)  # extra fields: ignored
    assert resp.status == 200, await resp.text()
    assert await count(db) == 1


async def test_overland_feature_bomb_is_400_naming_the_limit_and_stores_nothing(make_client, db):
    client = await make_client(max_pings_per_batch=10, max_trips_per_request=2, **OLD_OK)
    fixes = load("overland/batch_ios.json")["locations"]  # 3 fixes, 2 ignored features
    headers = {**auth(), "Content-Type": "application/json", "Content-Encoding": "gzip"}
    for padding in (57_000, 20 - len(fixes) + 1):  # ~1 MiB of {"properties":{}}; one too many
        body = json.dumps({"locations": fixes + [{"properties": {}}] * padding}, separators=",:")
        resp = await client.post(OVERLAND, data=gzip.compress(body.encode()), headers=headers)
        assert resp.status == 400
        detail = (await resp.json())["detail"]
        assert "at most 20 (MAX_PINGS_PER_BATCH x MAX_TRIPS_PER_REQUEST)" in detail, detail
    assert await count(db) == 0
    body = {"locations": fixes + [{"properties": {}}] * (20 - len(fixes))}  # at the limit
    resp = await client.post(OVERLAND, json=body, headers=auth())
    assert await resp.json() == {"result": "ok"}
    assert await count(db) == 3


async def test_owntracks_holds_few_requests_per_driver_hangs_up_on_the_rest(make_client, db):
    """One token cannot pin the pod's connections: beyond MAX_HELD_PER_DRIVER requests
    waiting for its rate limit, the rest are hung up on at once (kept on the phone), while
    other drivers, of this org or another, are served."""
    client = await make_client(rate_limit_per_s=2, rate_limit_burst=1, **OLD_OK)
    message = load("owntracks/location_ios.json")

    def post(i: int, sub: str = "drv_1", org: str = "org_1") -> Any:
        return owntracks(
            client,
            {**message, "tst": message["tst"] + i},
            {**basic(sub, org=org), "X-Limit-D": sub},
        )

    await assert_owntracks_ok(await post(0))  # the bucket's one token
    extra = 3
    tasks = [asyncio.ensure_future(post(i)) for i in range(1, MAX_HELD_PER_DRIVER + extra + 1)]
    await state_reached(lambda: sum(t.done() for t in tasks) >= extra)
    hung_up = [t for t in tasks if t.done()]
    assert len(hung_up) == extra
    for t in hung_up:
        assert isinstance(t.exception(), aiohttp.ClientConnectionError), t.exception()
    await assert_owntracks_ok(await post(100, sub="drv_2"))
    await assert_owntracks_ok(await post(100, org="org_2"))
    for t in tasks:
        if t not in hung_up:
            await assert_owntracks_ok(await t)  # each woken once its token is due
    got = await db.fetch('SELECT "orgId", "driverId" FROM "TripLocation"')
    assert sorted(map(tuple, got)) == sorted(
        [("org_1", "drv_1")] * (1 + MAX_HELD_PER_DRIVER) + [("org_1", "drv_2"), ("org_2", "drv_1")]
    )


def overland_fixes(*devices: tuple[str, int]) -> dict[str, Any]:
    """An Overland body: one fix per (device id, second)."""
    return {
        "locations": [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [77.59 + s / 1000, 12.97]},
                "properties": {"timestamp": f"2026-06-01T12:00:{s:02}Z", "device_id": d},
            }
            for d, s in devices
        ]
    }


async def test_overland_batch_partly_refused_for_good_is_ok_and_stores_only_the_rest(
    make_client, db
):
    """A batch holding fixes of the driver's trip and of another driver's trip: the rest is
    stored and published before the flush refuses that part, so the answer is ok (an error
    would have Overland resend the batch forever), the refused fixes dropped and counted.
    Refused whole, nothing stored: 403 as natively. A part beyond the driver's daily limit of
    new trips is a 429 whatever else is stored: a resend later can store it. Another org
    using the same ids is untouched."""
    client = await make_client(max_trips_per_driver_per_day=2, **OLD_OK)
    mixed = overland_fixes(("trip_a", 1), ("trip_b", 2), ("trip_a", 3), ("trip_b", 4))
    org_2 = auth("driver", "drv_1", "org_2")
    assert await (await client.post(OVERLAND, json=mixed, headers=org_2)).json() == {"result": "ok"}
    before = await db.fetch("""SELECT * FROM "TripLocation" WHERE "orgId" = 'org_2' ORDER BY 1""")
    resp = await client.post(
        OVERLAND, json=overland_fixes(("trip_b", 9)), headers=auth("driver", "drv_2")
    )
    assert await resp.json() == {"result": "ok"}  # drv_2 owns org_1's trip_b

    for duplicates in (0, 2):  # and its resend
        resp = await client.post(OVERLAND, json=mixed, headers=auth())
        assert resp.status == 200 and await resp.json() == {"result": "ok"}
        assert resp.headers["X-Ingest-Accepted"] == str(2 - duplicates)
        assert resp.headers["X-Ingest-Duplicates"] == str(duplicates)
        assert resp.headers["X-Ingest-Refused"] == "2"
    got = await db.fetch(
        """SELECT "tripId", "driverId", extract(second FROM "timestamp")::int AS s
           FROM "TripLocation" WHERE "orgId" = 'org_1' ORDER BY 1, 3"""
    )
    assert [tuple(r) for r in got] == [
        ("trip_a", "drv_1", 1),
        ("trip_a", "drv_1", 3),
        ("trip_b", "drv_2", 9),
    ]

    resp = await client.post(OVERLAND, json=overland_fixes(("trip_b", 5)), headers=auth())
    assert resp.status == 403  # nothing of it stored: refused whole, as on /tracking/ping
    assert (await resp.json())["error"] == "trip_owned_by_another_driver"

    # The daily limit (2): trip_a and trip_c are drv_1's trips of the day, trip_d one too many.
    resp = await client.post(OVERLAND, json=overland_fixes(("trip_c", 10)), headers=auth())
    assert await resp.json() == {"result": "ok"}
    resp = await client.post(  # no ok: trip_d's fixes can be stored once the day is past
        OVERLAND, json=overland_fixes(("trip_a", 11), ("trip_d", 12)), headers=auth()
    )
    assert resp.status == 429 and (await resp.json())["error"] == "too_many_trips"
    resp = await client.post(OVERLAND, json=overland_fixes(("trip_d", 13)), headers=auth())
    assert resp.status == 429 and (await resp.json())["error"] == "too_many_trips"

    assert (
        await db.fetchval(
            """SELECT count(*) FROM "TripLocation" WHERE "orgId" = 'org_1' AND "tripId" IN ('trip_b', 'trip_d')
           AND "driverId" = 'drv_1'"""
        )
        == 0
    )
    after = await db.fetch("""SELECT * FROM "TripLocation" WHERE "orgId" = 'org_2' ORDER BY 1""")
    assert len(before) == 4 and [dict(r) for r in after] == [dict(r) for r in before]


def test_a_part_to_resend_wins_over_a_part_refused_for_good():
    """Overland must resend while any part is not stored (503, 500), whatever another part
    was refused for: what was stored comes back as duplicates, and nothing acked is lost."""
    part = PingBatch("t", "drv_1", [Location(1.0, 1.0, 1780308000000)])
    stored = Submitted(200, None, [], accepted=1)
    owned = Submitted(403, None, [], error=("trip_owned_by_another_driver", "x"))
    too_many = Submitted(429, None, [], error=("too_many_trips", "x"))
    later = Submitted(503, None, [], error=("storage_unavailable", "x"))
    broken = Submitted(500, None, [], error=("storage_error", "x"))
    for results, status in [
        ([stored, owned], 200),
        ([stored, too_many, owned], 429),  # the day's limit passes: resend later
        ([owned, stored, later], 503),
        ([later, owned, stored], 503),
        ([stored, owned, broken], 500),
        ([owned], 403),
        ([too_many], 429),
    ]:
        out = fold([(part, r) for r in results], "overland")
        assert out.status == status, results
        assert out.refused == (sum(r.status in (403, 429) for r in results) if status == 200 else 0)


def test_rate_reservations_hold_at_most_n_requests_each_woken_once_due():
    limiter = RateLimiter(rate_per_s=2, burst=1)
    waits = [limiter.reserve("k", MAX_HELD_PER_DRIVER / 2) for _ in range(MAX_HELD_PER_DRIVER + 3)]
    assert waits[0] == 0.0 and None not in waits[: MAX_HELD_PER_DRIVER + 1]
    assert waits[MAX_HELD_PER_DRIVER + 1 :] == [None, None]  # refused, nothing spent
    due = waits[1 : MAX_HELD_PER_DRIVER + 1]  # one token each, 1/rate apart: no herd
    assert [round(b - a, 2) for a, b in itertools.pairwise(due)] == [0.5] * (len(due) - 1)
    assert limiter.take("k") == pytest.approx(due[-1] + 0.5, abs=0.01)  # no overtaking
    assert limiter.take("other") == 0.0
