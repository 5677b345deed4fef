"""Scratch: trips whose id cannot be addressed in a URL cannot be handed over."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from yarl import URL

from .conftest import auth, batch

PING = "/api/v1/tracking/ping"


@pytest.mark.parametrize("trip", ["a/b", "a\\b", "%2F", "a?b", "a#b", " a"])
async def test_every_stored_trip_can_be_handed_over(client, trip):
    r = await client.post(PING, json=batch(1, trip=trip), headers=auth())
    assert r.status == 200, await r.text()
    url = URL("/api/v1/tracking/trips/" + quote(trip, safe="") + "/driver", encoded=True)
    r = await client.put(url, json={"driverId": "drv_2"},
                         headers=auth("dispatcher", "disp_1", "org_1"))
    assert r.status == 200, (trip, r.status, await r.text())


@pytest.mark.parametrize("trip", ["..", "."])
async def test_dot_trips_percent_encoded(client, trip):
    r = await client.post(PING, json=batch(1, trip=trip), headers=auth())
    assert r.status == 200, await r.text()
    enc = trip.replace(".", "%2E")
    disp = auth("dispatcher", "disp_1", "org_1")
    r = await client.put(URL(f"/api/v1/tracking/trips/{enc}/driver", encoded=True),
                         json={"driverId": "drv_2"}, headers=disp)
    h = await client.get(URL(f"/api/v1/tracking/trips/{enc}/locations", encoded=True), headers=disp)
    assert r.status == 200, (trip, r.status, await r.text(), "history:", h.status)
