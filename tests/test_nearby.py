"""GET /api/v1/tracking/nearby: nearest first within the radius, never a stale or backwards
position, silent trucks left out and swept, two orgs with the same ids, hostile queries."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from ingest.trip_summary import EARTH_RADIUS_M
from ingest.typedefs import LIVE

from .conftest import auth, iso, now_ms, post_ping
from .test_live import bucket_mates, seed, set_sizes

NEARBY = "/api/v1/tracking/nearby"
DEG_M = EARTH_RADIUS_M * math.pi / 180  # one degree of latitude
# A point in Bengaluru; trucks are placed due north of it.
LAT0, LON0 = 12.97, 77.59


def north(m: float) -> float:
    return LAT0 + m / DEG_M


async def put_truck(
    client, trip: str, lat: float, lon: float = LON0, ms: int | None = None,
    driver: str = "drv_1", org: str = "org_1",
) -> None:  # fmt: skip
    body = {
        "tripId": trip, "driverId": driver, "batchId": str(uuid.uuid4()),
        "locations": [{"latitude": lat, "longitude": lon,
                       "timestamp": iso(ms if ms is not None else now_ms(-1))}],
    }  # fmt: skip
    status, answer = await post_ping(client, body, **auth("driver", driver, org))
    assert status == 200 and answer["accepted"] == 1, answer


async def nearby(client, org: str = "org_1", role: str = "dispatcher", **query: Any):
    params = {"lat": LAT0, "lon": LON0, "radius_m": 5000, **query}
    r = await client.get(NEARBY, params={k: str(v) for k, v in params.items()},
                         headers=auth(role, "disp_1", org))  # fmt: skip
    return r.status, await r.json()


async def nearby_until(
    client, pred: Callable[[list[dict[str, Any]]], bool], org: str = "org_1", **query: Any
) -> list[dict[str, Any]]:
    """The trips of a nearby answer once ``pred`` holds (the live step runs after the ack)."""
    trips: list[dict[str, Any]] = []
    for _ in range(100):
        status, answer = await nearby(client, org, **query)
        assert status == 200, answer
        trips = answer["trips"]
        if pred(trips):
            return trips
        await asyncio.sleep(0.02)
    raise AssertionError(f"never held: {trips}")


def ids(trips: list[dict[str, Any]]) -> list[str]:
    return [t["tripId"] for t in trips]


async def test_nearest_first_within_the_radius_and_limit(client):
    for trip, metres in [("far", 3000), ("near", 100), ("mid", 1000), ("outside", 6000)]:
        await put_truck(client, trip, north(metres), driver=f"drv_{trip}")
    trips = await nearby_until(client, lambda t: len(t) == 3)
    assert ids(trips) == ["near", "mid", "far"]  # "outside" lies beyond 5 km
    near = trips[0]
    assert near["driverId"] == "drv_near"
    # Redis measures on its own sphere (R 6372797.56 m): within 0.1% of ours.
    assert [t["distanceM"] for t in trips] == pytest.approx([100, 1000, 3000], rel=1e-3)
    assert near["location"]["latitude"] == pytest.approx(north(100))
    assert near["location"]["longitude"] == LON0 and "timestamp" in near["location"]
    _, answer = await nearby(client, limit=2)
    assert ids(answer["trips"]) == ["near", "mid"]
    _, answer = await nearby(client, radius_m=500)
    assert ids(answer["trips"]) == ["near"]
    _, answer = await nearby(client, lat=-33.86, lon=151.2)  # Sydney: nobody
    assert answer == {"trips": []}


async def test_a_truck_moves_and_a_late_upload_never_moves_it_back(client):
    t = now_ms(-5)
    await put_truck(client, "t1", north(2000), ms=t)
    await nearby_until(client, lambda x: ids(x) == ["t1"])
    await put_truck(client, "t1", north(200), ms=t + 1000)
    trips = await nearby_until(client, lambda x: x and x[0]["distanceM"] < 300)
    assert trips[0]["distanceM"] == pytest.approx(200, rel=1e-3)
    # An offline phone uploads an older ping, 4 km away: stored, but nearby keeps the newer.
    await put_truck(client, "t1", north(4000), ms=t - 60_000)
    await asyncio.sleep(0.3)
    _, answer = await nearby(client, radius_m=10_000)
    assert [round(x["distanceM"], -1) for x in answer["trips"]] == [200]


async def test_a_silent_truck_is_left_out_and_never_brought_back_by_a_late_upload(client):
    await put_truck(client, "fresh", north(300))
    # Last heard from 20 minutes ago (NEARBY_MAX_AGE_S is 600): latest moves, nearby does not.
    await put_truck(client, "silent", north(100), ms=now_ms(-1200))
    trips = await nearby_until(client, lambda x: ids(x) == ["fresh"])
    assert ids(trips) == ["fresh"]
    resp = await client.get("/api/v1/tracking/trips/silent/latest", headers=auth("dispatcher"))
    assert resp.status == 200  # stored and latest all the same
    await put_truck(client, "silent", north(50), ms=now_ms(-1300))  # even older: a late upload
    await asyncio.sleep(0.3)
    _, answer = await nearby(client)
    assert ids(answer["trips"]) == ["fresh"]
    await put_truck(client, "silent", north(10))  # it reports again
    trips = await nearby_until(client, lambda x: ids(x) == ["silent", "fresh"])
    assert trips[0]["distanceM"] == pytest.approx(10, abs=0.5)


async def test_a_truck_that_falls_silent_drops_out_and_is_swept(make_client, redis, redis_prefix):
    client = await make_client(nearby_max_age_s=2)
    await put_truck(client, "t1", north(100), ms=now_ms(-0.5))
    await nearby_until(client, lambda x: ids(x) == ["t1"])
    geo = client.server.app[LIVE].keys.geo_set("org_1", "t1")
    assert await redis.zscore(geo, "t1") is not None
    await asyncio.sleep(2)
    _, answer = await nearby(client)
    assert answer == {"trips": []}
    assert await redis.zscore(geo, "t1") is None  # swept out by that read


async def test_nearby_answers_the_same_once_old_trips_are_pruned(client):
    """The live step prunes trips silent for longer than LATEST_TTL_S from the fleet and GEO
    sets together; the sweep, which walks fleet scores, then simply does not meet them. A trip
    silent within the TTL is still left out and swept by the read, and a pruned trip that
    reports again is near again."""
    live = client.server.app[LIVE]
    old = bucket_mates(live, "org_1", "near", 300, "old")
    far, quiet = bucket_mates(live, "org_1", "near", 2, "kept")
    await seed(live, "org_1", old, now_ms(-2 * live.ttl), north(20), LON0)  # nearest of all
    await seed(live, "org_1", [quiet], now_ms(-1200), north(30), LON0)  # silent 20 min
    await put_truck(client, far, north(3000))
    for _ in range(20):  # flushes of one live truck prune the old ones, a bounded number each
        await put_truck(client, "near", north(100), ms=now_ms())
        await asyncio.sleep(0.05)
        if await set_sizes(live, "org_1", "near") == (3, 3):
            break
    assert await set_sizes(live, "org_1", "near") == (3, 3)  # near, far, quiet
    trips = await nearby_until(client, lambda x: len(x) == 2)
    assert ids(trips) == ["near", far]
    assert [t["distanceM"] for t in trips] == pytest.approx([100, 3000], rel=1e-3)
    assert await set_sizes(live, "org_1", "near") == (3, 2)  # quiet swept from GEO only
    await put_truck(client, old[0], north(10))
    trips = await nearby_until(client, lambda x: len(x) == 3)
    assert ids(trips) == [old[0], "near", far]


async def test_trucks_beyond_the_geo_latitudes_are_stored_but_not_near(client, redis):
    await put_truck(client, "polar", 88.0, 10.0)
    await put_truck(client, "normal", north(100))
    await nearby_until(client, lambda x: ids(x) == ["normal"])
    resp = await client.get("/api/v1/tracking/trips/polar/latest", headers=auth("dispatcher"))
    assert resp.status == 200 and (await resp.json())["location"]["latitude"] == 88.0
    # A truck that drives past 85.05112878 degrees leaves nearby instead of staying put.
    await put_truck(client, "normal", 86.0, LON0)
    await nearby_until(client, lambda x: x == [])
    status, answer = await nearby(client, lat=85.0, lon=10.0, radius_m=200_000)
    assert status == 200 and answer == {"trips": []}


async def test_two_orgs_with_the_same_ids_see_only_their_own_trucks(client):
    await put_truck(client, "trip_1", north(100), org="org_1")
    await put_truck(client, "trip_1", north(900), org="org_2")
    await put_truck(client, "only_2", north(50), org="org_2", driver="drv_2")
    one = await nearby_until(client, lambda x: len(x) == 1, org="org_1")
    assert one[0]["distanceM"] == pytest.approx(100, rel=1e-3)
    two = await nearby_until(client, lambda x: len(x) == 2, org="org_2")
    assert ids(two) == ["only_2", "trip_1"]
    assert two[1]["distanceM"] == pytest.approx(900, rel=1e-3)
    await asyncio.sleep(0.2)
    _, answer = await nearby(client, org="org_1")
    assert ids(answer["trips"]) == ["trip_1"]  # org_2's trucks never show


async def test_drivers_and_anonymous_clients_are_refused(client):
    await put_truck(client, "t1", north(100))
    status, answer = await nearby(client, role="driver")
    assert status == 403 and answer["error"] == "forbidden", answer
    r = await client.get(NEARBY, params={"lat": "1", "lon": "1", "radius_m": "10"})
    assert r.status == 401


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"lat": ""}, "lat: required"),
        ({"lat": "91"}, "lat: must be"),
        ({"lat": "85.1"}, "lat: must be"),
        ({"lat": "nan"}, "lat: must be"),
        ({"lon": "1e400"}, "lon: must be"),
        ({"lon": "east"}, "lon: not a number"),
        ({"lon": "-180.5"}, "lon: must be"),
        ({"radius_m": "-1"}, "radius_m: must be"),
        ({"radius_m": "1e9"}, "radius_m: must be"),
        ({"radius_m": "inf"}, "radius_m: must be"),
        ({"limit": "0"}, "limit: must be"),
        ({"limit": "101"}, "limit: must be"),
        ({"limit": "1.5"}, "limit: must be"),
        ({"limit": "\uff11"}, "limit: must be"),  # a full-width digit
        ({"limit": "9" * 5000}, "limit: must be"),
    ],
)
async def test_a_bad_query_is_a_400_naming_the_parameter(client, query, named):
    status, answer = await nearby(client, **query)
    assert status == 400, answer
    assert answer["error"] == "invalid_query" and answer["detail"].startswith(named), answer


async def test_redis_down_is_a_503_not_a_500(make_client, private_redis):
    client = await make_client(redis_url=private_redis.url)
    await put_truck(client, "t1", north(100))
    await nearby_until(client, lambda x: ids(x) == ["t1"])
    private_redis.stop()
    status, answer = await nearby(client)
    assert status == 503 and answer["error"] == "live_unavailable", answer
