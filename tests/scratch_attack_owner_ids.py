"""Scratch repros: id normalisation on the ownership paths."""

from __future__ import annotations

import base64
import json

import pytest

from .conftest import auth, batch, iso, now_ms, token

PING = "/api/v1/tracking/ping"
HANDOVER = "/api/v1/tracking/trips/{}/driver"
HISTORY = "/api/v1/tracking/trips/{}/locations"
LATEST = "/api/v1/tracking/trips/{}/latest"
OVERLAND = "/api/v1/ingest/overland"
OWNTRACKS = "/api/v1/ingest/owntracks"
OSMAND = "/api/v1/ingest/osmand"


def _feature(ts_ms, device):
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [77.5, 12.9]},
            "properties": {"timestamp": iso(ts_ms), "device_id": device}}


@pytest.mark.parametrize("app", ["overland", "owntracks", "osmand"])
@pytest.mark.parametrize("suffix", [" ", "\u00a0", "\u3000"], ids=["space", "nbsp", "ideographic"])
async def test_a_token_whose_sub_differs_by_whitespace_posts_as_the_other_driver(
    client, db, app, suffix
):
    """drv_1 owns truck_7. A *different* principal, sub "drv_1<ws>", is refused natively (its
    driverId must be its sub, and truck_7 is drv_1's), but through a phone app its sub is
    strip()ped to "drv_1": it posts to drv_1's trip and its pings are stored as drv_1's."""
    start = now_ms(-600) // 1000 * 1000
    r = await client.post(PING, json=batch(1, trip="truck_7", driver="drv_1", start_ms=start),
                          headers=auth())
    assert r.status == 200, await r.text()

    evil = "drv_1" + suffix
    # Natively: posting as drv_1 is 403 forbidden; as itself, the trip is another driver's.
    r = await client.post(PING, json=batch(1, trip="truck_7", driver="drv_1", start_ms=start + 5000),
                          headers=auth("driver", evil, "org_1"))
    assert r.status == 403
    r = await client.post(PING, json=batch(1, trip="truck_7", driver=evil, start_ms=start + 5000),
                          headers=auth("driver", evil, "org_1"))
    assert (r.status, (await r.json())["error"]) == (403, "trip_owned_by_another_driver")

    tok = token("driver", evil, "org_1")
    ts = start + 7000
    if app == "overland":
        r = await client.post(OVERLAND, json={"locations": [_feature(ts, "truck_7")]},
                              headers={"Authorization": f"Bearer {tok}"})
    elif app == "owntracks":
        basic = base64.b64encode(f"x:{tok}".encode()).decode()
        r = await client.post(OWNTRACKS, data=json.dumps(
            {"_type": "location", "lat": 12.9, "lon": 77.5, "tst": ts // 1000}),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json",
                     "X-Limit-D": "truck_7"})
    else:
        r = await client.post(OSMAND, params={"token": tok, "id": "truck_7", "lat": "12.9",
                                               "lon": "77.5", "timestamp": str(ts)})
    body = await r.text()
    rows = await db.fetch(
        """SELECT "driverId", "timestamp" FROM "TripLocation"
           WHERE "orgId" = 'org_1' AND "tripId" = 'truck_7' ORDER BY "timestamp" """)
    assert r.status == 403, (
        f"sub {evil!r} posted to drv_1's trip via {app}: {r.status} {body}; rows={rows}")


async def test_handover_to_a_driver_id_with_a_trailing_newline_is_400(client):
    """API: a body without a valid driverId (no control characters) is 400. msgspec's
    pattern '^[^...]+$' lets a trailing '\\n' through ('$' matches before it)."""
    r = await client.post(PING, json=batch(1, trip="truck_9"), headers=auth())
    assert r.status == 200
    disp = auth("dispatcher", "disp_1", "org_1")
    r = await client.put(HANDOVER.format("truck_9"), json={"driverId": "drv_2\n"}, headers=disp)
    text = await r.text()
    # Consequence if 200: the real drv_2 is refused on its own trip.
    r2 = await client.post(PING, json=batch(1, trip="truck_9", driver="drv_2",
                                            start_ms=now_ms(-100)), headers=auth("driver", "drv_2"))
    assert r.status == 400, (
        f"handover to 'drv_2\\n': {r.status} {text}; then drv_2 posts: {r2.status} {await r2.text()}")


async def test_a_trip_id_with_a_trailing_newline_is_400_not_stored_unreadable(client, db):
    r = await client.post(PING, json=batch(2, trip="truck_5\n"), headers=auth())
    text = await r.text()
    n = await db.fetchval("""SELECT count(*) FROM "TripLocation" WHERE "tripId" = E'truck_5\\n'""")
    disp = auth("dispatcher", "disp_1", "org_1")
    h = await client.get(HISTORY.format("truck_5%0A"), headers=disp)
    ho = await client.put(HANDOVER.format("truck_5%0A"), json={"driverId": "drv_2"}, headers=disp)
    assert r.status == 400, (
        f"post tripId 'truck_5\\n': {r.status} {text}; rows stored={n}; "
        f"history -> {h.status}; handover -> {ho.status}")
