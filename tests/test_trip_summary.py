"""GET .../trips/{tripId}/summary: distance along a meridian, an outlier skipped, a stop,
speeds, two orgs with the same trip id, driver tokens, replays, hostile clients."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ingest.trip_summary import EARTH_RADIUS_M, Summarizer, haversine_m
from ingest.typedefs import EXPORT_SLOTS

from .conftest import auth, iso, now_ms, post_ping

DEG_M = EARTH_RADIUS_M * math.pi / 180  # one degree of latitude: 111,195.08 m


def ms_of(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def summary_url(trip: str) -> str:
    return f"/api/v1/tracking/trips/{trip}/summary"


def body(
    points: list[dict[str, Any]], trip: str = "trip_1", driver: str = "drv_1"
) -> dict[str, Any]:
    return {"tripId": trip, "driverId": driver, "batchId": str(uuid.uuid4()), "locations": points}


def pt(lat: float, lon: float, ms: int, **extra: Any) -> dict[str, Any]:
    return {"latitude": lat, "longitude": lon, "timestamp": iso(ms), **extra}


async def post(client, points, trip="trip_1", driver="drv_1", org="org_1") -> dict[str, Any]:
    status, answer = await post_ping(
        client, body(points, trip, driver), **auth("driver", driver, org)
    )
    assert status == 200, answer
    return answer


async def get_summary(client, trip="trip_1", role="dispatcher", sub="disp_1", org="org_1"):
    r = await client.get(summary_url(trip), headers=auth(role, sub, org))
    return r.status, await r.json()


def test_haversine_along_a_meridian_and_the_equator():
    assert haversine_m(0, 10, 1, 10) == pytest.approx(DEG_M, abs=1e-6)
    assert haversine_m(0, 0, 0, 1) == pytest.approx(DEG_M, abs=1e-6)
    assert haversine_m(45, 179.9, 45, -179.9) == pytest.approx(haversine_m(45, 0, 45, 0.2))
    assert haversine_m(90, 0, -90, 0) == pytest.approx(math.pi * EARTH_RADIUS_M)


async def test_distance_duration_and_speeds_along_a_meridian(client):
    t0 = now_ms(-3600)
    # 0.01 degree (1,111.95 m) a minute: 18.5 m/s, 11 points over 10 minutes.
    await post(client, [pt(i * 0.01, 10.0, t0 + i * 60_000, speed=15.0 + i) for i in range(11)])
    status, s = await get_summary(client)
    assert status == 200, s
    assert s["tripId"] == "trip_1" and s["driverId"] == "drv_1" and s["pings"] == 11
    assert s["distanceM"] == pytest.approx(0.1 * DEG_M, abs=0.1)  # 11,119.5 m
    assert s["durationS"] == 600.0
    assert ms_of(s["start"]) == t0 and ms_of(s["end"]) == t0 + 600_000
    assert s["maxSpeed"] == 25.0  # the highest reported speed
    assert s["avgSpeed"] == pytest.approx(0.1 * DEG_M / 600, abs=1e-3)
    assert s["stops"] == [] and s["stopsTruncated"] is False


async def test_an_impossible_jump_is_skipped(client):
    t0 = now_ms(-3600)
    # A, then X 1 degree north 10 s later (11 km/s), then B 0.001 degree north of A.
    await post(
        client, [pt(0.0, 20.0, t0), pt(1.0, 20.0, t0 + 10_000), pt(0.001, 20.0, t0 + 20_000)]
    )
    _, s = await get_summary(client)
    assert s["pings"] == 3  # stored, only not counted
    assert s["distanceM"] == pytest.approx(0.001 * DEG_M, abs=0.1)  # A -> B, 111.2 m


async def test_a_jump_at_a_plausible_speed_counts(client):
    t0 = now_ms(-7200)
    # 1 degree (111 km) in 20 min: 92.7 m/s, under the 100 m/s limit.
    await post(client, [pt(0.0, 20.0, t0), pt(1.0, 20.0, t0 + 1_200_000)])
    _, s = await get_summary(client)
    assert s["distanceM"] == pytest.approx(DEG_M, abs=0.1)


async def test_a_stop_is_found_with_its_start_end_and_place(client):
    t0 = now_ms(-3600)
    drive_in = [pt(0.0, 30.0 + i * 0.001, t0 + i * 10_000) for i in range(5)]  # 11 m/s east
    # Parked from +40 s to +220 s: jitter within 10 m of the first point of the stop.
    parked = [pt(0.00005 * (i % 2), 30.004, t0 + 50_000 + i * 30_000) for i in range(6)]
    drive_out = [pt(0.0, 30.005 + i * 0.001, t0 + 240_000 + i * 10_000) for i in range(5)]
    await post(client, drive_in + parked + drive_out)
    _, s = await get_summary(client)
    assert len(s["stops"]) == 1, s["stops"]
    stop = s["stops"][0]
    # The run starts at the last drive-in point (+40 s, lon 30.004), ends at the last parked one.
    assert ms_of(stop["start"]) == t0 + 40_000 and ms_of(stop["end"]) == t0 + 200_000
    assert stop["durationS"] == 160.0
    assert stop["location"]["latitude"] == 0.0 and stop["location"]["longitude"] == 30.004


async def test_a_short_halt_is_no_stop_and_speed_null_when_never_reported(client):
    t0 = now_ms(-3600)
    # 100 s still (under 120 s), then on: no stop. No speed reported anywhere.
    points = [pt(0.0, 40.0, t0 + i * 20_000) for i in range(6)]
    points += [pt(0.0, 40.01 + i * 0.001, t0 + 120_000 + i * 10_000) for i in range(3)]
    await post(client, points)
    _, s = await get_summary(client)
    assert s["stops"] == [] and s["maxSpeed"] is None
    single = [pt(1.0, 1.0, t0)]
    await post(client, single, trip="trip_single")
    _, one = await get_summary(client, "trip_single")
    assert one["pings"] == 1 and one["durationS"] == 0 and one["avgSpeed"] is None
    assert one["distanceM"] == 0


async def test_two_orgs_with_the_same_trip_id_never_mix(client):
    t0 = now_ms(-3600)
    await post(client, [pt(i * 0.01, 10.0, t0 + i * 60_000) for i in range(3)], org="org_1")
    await post(
        client,
        [pt(i * 0.02, 10.0, t0 + i * 120_000) for i in range(5)],
        driver="drv_9",
        org="org_2",
    )
    _, a = await get_summary(client, org="org_1")
    _, b = await get_summary(client, org="org_2")
    assert (a["pings"], a["driverId"]) == (3, "drv_1")
    assert (b["pings"], b["driverId"]) == (5, "drv_9")
    assert a["distanceM"] == pytest.approx(0.02 * DEG_M, abs=0.1)
    assert b["distanceM"] == pytest.approx(0.08 * DEG_M, abs=0.1)
    status, other = await get_summary(client, org="org_3")
    assert status == 404 and other["error"] == "not_found"


async def test_driver_tokens_see_their_own_trip_only(client):
    t0 = now_ms(-3600)
    await post(client, [pt(0, 0, t0), pt(0.001, 0, t0 + 10_000)])
    status, own = await get_summary(client, role="driver", sub="drv_1")
    assert status == 200 and own["pings"] == 2
    status, other = await get_summary(client, role="driver", sub="drv_2")
    assert status == 404 and other == {"error": "not_found", "detail": "no trip 'trip_1'"}
    status, _ = await get_summary(client, role="driver", sub="drv_1", org="org_2")
    assert status == 404


async def test_a_replay_changes_nothing(client):
    t0 = now_ms(-3600)
    b = body([pt(i * 0.001, 5.0, t0 + i * 10_000) for i in range(20)])
    assert (await post_ping(client, b))[1]["accepted"] == 20
    _, before = await get_summary(client)
    status, again = await post_ping(client, b)
    assert status == 200 and again["accepted"] == 0 and again["duplicates"] == 20
    b2 = {**b, "batchId": str(uuid.uuid4())}  # the same pings under a new batch id
    assert (await post_ping(client, b2))[1]["accepted"] == 0
    _, after = await get_summary(client)
    assert after == before and after["pings"] == 20


async def test_pages_are_summed_as_one_stream():
    """Split anywhere, the pages give the same summary as one page (outlier and stop state
    carry over from page to page)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(300):
        lat = 1.0 if i == 120 else (0.0 if 50 <= i < 80 else (i * 0.0005))
        rows.append(("drv", lat, 0.0, t0 + timedelta(seconds=5 * i), float(i % 7), None))
    whole = Summarizer()
    whole.add(rows)  # type: ignore[arg-type]
    for size in (1, 7, 64):
        paged = Summarizer()
        for k in range(0, len(rows), size):
            paged.add(rows[k : k + size])  # type: ignore[arg-type]
        assert paged.result("t") == whole.result("t")
    assert len(whole.result("t").stops) == 1


async def test_hostile_requests(client):
    t0 = now_ms(-3600)
    await post(client, [pt(0, 0, t0)])
    r = await client.get(summary_url("trip_1"))
    assert r.status == 401
    r = await client.get(summary_url("x" * 4000), headers=auth("dispatcher", "d"))
    assert r.status == 404 and (await r.json())["error"] == "not_found"
    for trip in ("%00", "%F0%9F%9A%9A", "'%3B%20DROP%20TABLE", "..%2F..%2Flatest"):
        r = await client.get(summary_url(trip), headers=auth("dispatcher", "d"))
        assert r.status == 404, trip


async def test_beyond_the_export_slots_a_503_with_retry_after(make_client):
    client = await make_client(export_max_concurrent=1)
    await post(client, [pt(0, 0, now_ms(-60))])
    slots = client.server.app[EXPORT_SLOTS]
    assert slots.try_acquire("org_9")  # an export in progress holds the only slot
    try:
        r = await client.get(summary_url("trip_1"), headers=auth("dispatcher", "d"))
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["error"] == "too_many_exports"
    finally:
        slots.release("org_9")
    status, _ = await get_summary(client)
    assert status == 200 and slots.used == 0


async def test_an_org_holding_all_it_may_leaves_a_slot_to_the_others(make_client):
    """org_a's exports in progress take every slot they may (all but one of the default 2):
    org_1's summary is served, org_a's own summary waits its turn."""
    client = await make_client()
    await post(client, [pt(0, 0, now_ms(-60))])
    await post(client, [pt(0, 0, now_ms(-60))], driver="drv_a", org="org_a")
    slots = client.server.app[EXPORT_SLOTS]
    held = 0
    while held < slots.limit and slots.try_acquire("org_a"):
        held += 1
    try:
        status, s = await get_summary(client)
        assert status == 200 and s["pings"] == 1, s
        assert held == 1
        status, refused = await get_summary(client, org="org_a")
        assert status == 503 and refused["error"] == "too_many_exports"
        assert "this org already runs 1" in refused["detail"]
    finally:
        for _ in range(held):
            slots.release("org_a")
    status, _ = await get_summary(client, org="org_a")
    assert status == 200 and slots.used == 0
