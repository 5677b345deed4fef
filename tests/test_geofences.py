"""Geofences: CRUD per org, enter/exit events exactly once (replays, late uploads, two pods,
a pod whose evaluation never ran), live delivery to fleet subscribers only, two orgs with the
same ids, hostile input."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from ingest import metrics
from ingest.typedefs import GEOFENCES

from .conftest import auth, iso, now_ms, post_ping, token

FENCES = "/api/v1/geofences"
LAT0, LON0 = 12.97, 77.59
# A 0.02 degree square (about 2.2 km) around (LAT0, LON0).
SQUARE = {
    "type": "Polygon",
    "coordinates": [[
        [LON0 - 0.01, LAT0 - 0.01], [LON0 + 0.01, LAT0 - 0.01], [LON0 + 0.01, LAT0 + 0.01],
        [LON0 - 0.01, LAT0 + 0.01], [LON0 - 0.01, LAT0 - 0.01],
    ]],
}  # fmt: skip
INSIDE, OUTSIDE = (LAT0, LON0), (LAT0 - 0.05, LON0)


def dispatcher(org: str = "org_1") -> dict[str, str]:
    return auth("dispatcher", "disp_1", org)


async def create(client, body: dict[str, Any], org: str = "org_1") -> tuple[int, Any]:
    r = await client.post(FENCES, json=body, headers=dispatcher(org))
    return r.status, await r.json()


async def fence(client, geometry=SQUARE, name="Depot", org="org_1", **extra) -> str:
    status, answer = await create(client, {"name": name, "geometry": geometry, **extra}, org)
    assert status == 201, answer
    return str(answer["id"])


def pings(points: list[tuple[float, float]], start_ms: int, step_ms: int = 1000) -> list[dict]:
    return [
        {"latitude": lat, "longitude": lon, "timestamp": iso(start_ms + i * step_ms)}
        for i, (lat, lon) in enumerate(points)
    ]


async def drive(
    client, points, start_ms, trip="trip_1", driver="drv_1", org="org_1", batch_id=None,
    step_ms=1000, settle=True,
) -> dict[str, Any]:  # fmt: skip
    body = {
        "tripId": trip, "driverId": driver, "batchId": batch_id or str(uuid.uuid4()),
        "locations": pings(points, start_ms, step_ms),
    }  # fmt: skip
    status, answer = await post_ping(client, body, **auth("driver", driver, org))
    assert status == 200, answer
    if settle:
        await settled(client)
    return answer


# Pings are timestamped from a second after the fence's creation on (now_ms(1)): a fence
# applies to pings from its creation on.


async def settled(*clients) -> None:
    """Until every pod has evaluated each of its commits (the evaluation runs after the ack)."""
    for client in clients:
        evaluator = client.server.app[GEOFENCES]
        for _ in range(250):
            if not evaluator.pending:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the geofence evaluation never caught up")


async def events(client, fence_id: str, org="org_1", **query) -> list[dict[str, Any]]:
    r = await client.get(f"{FENCES}/{fence_id}/events", params=query, headers=dispatcher(org))
    assert r.status == 200, await r.text()
    return (await r.json())["events"]


def kinds(evs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(event, epoch ms) of each event."""
    return [(e["event"], round(datetime.fromisoformat(e["timestamp"]).timestamp() * 1000))
            for e in evs]  # fmt: skip


# -- CRUD --------------------------------------------------------------------------------


async def test_create_list_read_and_delete_a_polygon_and_a_circle(client):
    status, made = await create(client, {"name": "Depot", "geometry": SQUARE})
    assert status == 201 and made["id"].startswith("gf_"), made
    assert made["name"] == "Depot" and made["geometry"] == SQUARE and "createdAt" in made
    point = {"type": "Point", "coordinates": [LON0, LAT0]}
    status, circle = await create(client, {"name": "Gate", "geometry": point, "radiusM": 150})
    assert status == 201 and circle["radiusM"] == 150.0 and circle["geometry"] == point
    r = await client.get(FENCES, headers=dispatcher())
    listed = (await r.json())["geofences"]
    assert r.status == 200 and [f["id"] for f in listed] == [made["id"], circle["id"]]
    r = await client.get(f"{FENCES}/{circle['id']}", headers=dispatcher())
    assert r.status == 200 and await r.json() == circle
    r = await client.delete(f"{FENCES}/{made['id']}", headers=dispatcher())
    assert r.status == 204
    for method in ("get", "delete"):
        r = await client.request(method, f"{FENCES}/{made['id']}", headers=dispatcher())
        assert r.status == 404 and (await r.json())["error"] == "not_found"
    r = await client.get(FENCES, headers=dispatcher())
    assert [f["id"] for f in (await r.json())["geofences"]] == [circle["id"]]


async def test_another_org_cannot_see_touch_or_list_a_fence(client):
    mine = await fence(client, org="org_1")
    theirs = await fence(client, org="org_2")  # the same name and shape in another org
    for method, path in [("get", mine), ("delete", mine), ("get", f"{mine}/events")]:
        r = await client.request(method, f"{FENCES}/{path}", headers=dispatcher("org_2"))
        assert r.status == 404, (method, path)
    r = await client.get(FENCES, headers=dispatcher("org_2"))
    assert [f["id"] for f in (await r.json())["geofences"]] == [theirs]
    r = await client.get(f"{FENCES}/{mine}", headers=dispatcher("org_1"))
    assert r.status == 200  # untouched by org_2's delete


async def test_drivers_get_403_and_anonymous_clients_401(client):
    fid = await fence(client)
    for method, path in [("post", ""), ("get", ""), ("get", f"/{fid}"), ("delete", f"/{fid}"),
                         ("get", f"/{fid}/events")]:  # fmt: skip
        r = await client.request(method, FENCES + path, json={}, headers=auth("driver"))
        assert r.status == 403 and (await r.json())["error"] == "forbidden", (method, path)
        r = await client.request(method, FENCES + path, json={})
        assert r.status == 401, (method, path)


BOWTIE = [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"name": "x", "geometry": {"type": "Polygon", "coordinates": BOWTIE}},
         "$.geometry.coordinates[0]"),
        ({"name": "x", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]}},
         "$.geometry.coordinates[0]"),
        ({"name": "x", "geometry": {"type": "Point", "coordinates": [1, 2]}}, "$.radiusM"),
        ({"name": "x", "geometry": {"type": "Point", "coordinates": [1, 2]}, "radiusM": -5},
         "$.radiusM"),
        ({"name": "x", "geometry": {"type": "Point", "coordinates": [1, 2]}, "radiusM": True},
         "$.radiusM"),
        ({"name": "x", "geometry": {"type": "Point", "coordinates": [200, 2]}, "radiusM": 10},
         "$.geometry.coordinates"),
        ({"name": "x", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}},
         "$.geometry.type"),
        ({"name": "x", "geometry": "Polygon"}, "$.geometry"),
        ({"name": "", "geometry": SQUARE}, "$.name"),
        ({"name": "x" * 201, "geometry": SQUARE}, "$.name"),
        ({"name": "a\u0000b", "geometry": SQUARE}, "$.name"),
        ({"geometry": SQUARE}, "name"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_400_naming_the_field(client, body, named):
    status, answer = await create(client, body)
    assert status == 400 and answer["error"] == "invalid_payload", answer
    assert named in answer["detail"], answer


async def test_degenerate_and_intricate_polygons_are_a_400_not_a_500(client):
    """A subnormal latitude once made the band scale inf (int(0 * inf): a 500); a comb whose
    teeth span its height, a polygon every ping would test against 250 edges, is refused by the
    band rule (linear) before the crossing check, off the event loop."""
    sliver = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0.5, 1e-310], [0, 0]]]}
    status, answer = await create(client, {"name": "sliver", "geometry": sliver})
    assert status == 400 and answer["error"] == "invalid_payload", answer
    assert answer["detail"].startswith("$.geometry.coordinates[0]: ring has zero area"), answer
    west, south, step = LON0 - 0.05, LAT0 - 0.05, 0.1 / 124
    ring = [[west, south]]
    for i in range(124):
        ring += [[west + i * step, south + 0.1], [west + (i + 0.5) * step, south + 0.001]]
    ring += [[west + 0.1, south + 0.1], [west + 0.1, south], [west, south]]
    status, answer = await create(client, {"name": "comb", "geometry": {
        "type": "Polygon", "coordinates": [ring]}})  # fmt: skip
    assert status == 400, answer
    assert answer["detail"].startswith("$.geometry.coordinates: too intricate: a point would be")
    assert await list_ids(client) == []


async def test_hostile_bodies_and_ids(make_client):
    client = await make_client(geofence_max_vertices=10, geofence_max_per_org=2)
    ring = [[LON0 + 0.01 * i, LAT0 + (0.01 if i % 2 else 0)] for i in range(12)]
    ring += [[LON0 + 0.11, LAT0 - 0.05], [LON0, LAT0 - 0.05], ring[0]]
    status, answer = await create(client, {"name": "zigzag", "geometry": {
        "type": "Polygon", "coordinates": [ring]}})  # fmt: skip
    assert status == 400 and "$.geometry.coordinates" in answer["detail"], answer
    assert "10" in answer["detail"]  # the limit, named
    r = await client.post(FENCES, data=b"{not json", headers=dispatcher())
    assert r.status == 400 and (await r.json())["error"] == "invalid_payload"
    await fence(client, name="one")
    await fence(client, name="two")
    status, answer = await create(client, {"name": "three", "geometry": SQUARE})
    assert status == 409 and answer["error"] == "too_many_geofences", answer
    for bad in ["a%00b", "x" * 500, "%E2%80%AE"]:
        for method in ("get", "delete"):
            r = await client.request(method, f"{FENCES}/{bad}", headers=dispatcher())
            assert r.status == 404, (method, bad)
        r = await client.get(f"{FENCES}/{bad}/events", headers=dispatcher())
        assert r.status == 404, bad
    fid = (await (await client.get(FENCES, headers=dispatcher())).json())["geofences"][0]["id"]
    for query, named in [({"from": "yesterday"}, "from"), ({"to": "99999999999999999999999"}, "to"),
                         ({"limit": "0"}, "limit"), ({"limit": "5001"}, "limit"),
                         ({"cursor": "bm9wZQ"}, "cursor"), ({"cursor": "%%%"}, "cursor")]:  # fmt: skip
        r = await client.get(f"{FENCES}/{fid}/events", params=query, headers=dispatcher())
        answer = await r.json()
        assert r.status == 400 and answer["detail"].startswith(named), (query, answer)


# -- events ------------------------------------------------------------------------------


async def test_a_polygon_crossing_makes_one_enter_and_one_exit_in_time_order(client):
    fid = await fence(client)
    t = now_ms(1)
    # out, in, in, out, out: enter at the 2nd ping, exit at the 4th.
    await drive(client, [OUTSIDE, INSIDE, INSIDE, OUTSIDE, OUTSIDE], t)
    evs = await events(client, fid)
    assert kinds(evs) == [("enter", t + 1000), ("exit", t + 3000)]
    enter = evs[0]
    assert enter["tripId"] == "trip_1" and enter["driverId"] == "drv_1"
    assert enter["geofenceId"] == fid
    assert enter["location"]["latitude"] == INSIDE[0]
    assert enter["location"]["longitude"] == INSIDE[1]
    # from/to select by time; limit and the cursor page.
    assert kinds(await events(client, fid, **{"from": iso(t + 2000)})) == [("exit", t + 3000)]
    assert kinds(await events(client, fid, to=iso(t + 3000))) == [("enter", t + 1000)]
    r = await client.get(f"{FENCES}/{fid}/events", params={"limit": "1"}, headers=dispatcher())
    page = await r.json()
    assert kinds(page["events"]) == [("enter", t + 1000)] and page["nextCursor"]
    rest = await events(client, fid, limit="1", cursor=page["nextCursor"])
    assert kinds(rest) == [("exit", t + 3000)]


async def test_a_circle_crossing_across_batches(client):
    point = {"type": "Point", "coordinates": [LON0, LAT0]}
    fid = await fence(client, point, name="Gate", radiusM=100)
    deg_100m = 100 / 111_195.08
    t = now_ms(1)
    await drive(client, [(LAT0 + 1.2 * deg_100m, LON0)], t)  # 120 m: outside
    await drive(client, [(LAT0 + 0.8 * deg_100m, LON0)], t + 1000)  # 80 m: inside
    await drive(client, [(LAT0 + 0.9 * deg_100m, LON0)], t + 2000)  # still inside
    await drive(client, [(LAT0 + 1.1 * deg_100m, LON0)], t + 3000)  # 110 m: outside
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 3000)]


async def test_replays_and_duplicate_pings_make_no_second_event(client):
    fid = await fence(client)
    t = now_ms(1)
    batch_id = str(uuid.uuid4())
    first = await drive(client, [OUTSIDE, INSIDE, OUTSIDE], t, batch_id=batch_id)
    assert first["accepted"] == 3
    again = await drive(client, [OUTSIDE, INSIDE, OUTSIDE], t, batch_id=batch_id)
    assert again["accepted"] == 0  # the same batch: nothing stored, nothing evaluated
    other = await drive(client, [OUTSIDE, INSIDE, OUTSIDE], t)  # new batch id, same pings
    assert other["accepted"] == 0 and other["duplicates"] == 3
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 2000)]


async def test_a_late_upload_older_than_the_evaluated_pings_makes_no_event(client):
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE, OUTSIDE], t + 60_000)
    # An offline phone uploads older pings that went in and out: stored, but evaluation has
    # passed them (docs/api.md#geofences); the state is not disturbed either.
    late = await drive(client, [OUTSIDE, INSIDE, OUTSIDE], t)
    assert late["accepted"] == 3
    assert await events(client, fid) == []
    await drive(client, [INSIDE], t + 70_000)
    assert kinds(await events(client, fid)) == [("enter", t + 70_000)]


async def test_consecutive_batches_on_two_pods_make_each_event_once(make_client):
    a, b = await make_client(), await make_client()
    fid = await fence(a)
    t = now_ms(1)
    path = [OUTSIDE, INSIDE, INSIDE, OUTSIDE, INSIDE, OUTSIDE, OUTSIDE, INSIDE]
    for i, point in enumerate(path):
        await drive(a if i % 2 else b, [point], t + i * 1000)
    await settled(a, b)
    expected = [("enter", t + 1000), ("exit", t + 3000), ("enter", t + 4000),
                ("exit", t + 5000), ("enter", t + 7000)]  # fmt: skip
    assert kinds(await events(a, fid)) == expected
    assert kinds(await events(b, fid)) == expected


async def test_pings_a_pod_committed_but_never_evaluated_are_read_back(make_client):
    """A pod that dies between its commit and its evaluation: the next evaluation of the trip,
    on another pod, reads those pings back and makes their events at their own times."""
    a, b = await make_client(), await make_client()
    fid = await fence(a)
    t = now_ms(1)
    await drive(b, [OUTSIDE], t)
    dead = a.server.app[GEOFENCES]
    dead.stop()  # its evaluation task ends: what a commits is never evaluated by a
    await drive(a, [INSIDE, INSIDE], t + 1000, settle=False)
    await drive(a, [OUTSIDE], t + 3000, settle=False)
    assert await events(b, fid) == []
    await drive(b, [OUTSIDE], t + 4000)
    assert kinds(await events(b, fid)) == [("enter", t + 1000), ("exit", t + 3000)]


async def test_a_batch_with_late_and_new_pings_still_reads_back_what_lies_between(make_client):
    """A batch holding a ping older than its trip's state (late) and a newer one: the pings
    another pod stored in between, not evaluated yet, are read back from the state on, not
    from the late ping (the read-back that ends at the flush's oldest ping finds nothing)."""
    a, b = await make_client(), await make_client()
    fid = await fence(a)
    t = now_ms(1)
    await drive(b, [OUTSIDE], t + 5000)
    a.server.app[GEOFENCES].stop()  # what a commits is never evaluated by a
    await drive(a, [INSIDE, INSIDE, OUTSIDE], t + 6000, settle=False)
    await drive(b, [OUTSIDE, OUTSIDE], t, step_ms=10_000)  # t (late) and t + 10 s
    assert kinds(await events(b, fid)) == [("enter", t + 6000), ("exit", t + 8000)]


async def test_concurrent_batches_on_two_pods_alternate_and_never_repeat(make_client, db):
    a, b = await make_client(), await make_client()
    fid = await fence(a)
    t = now_ms(1)

    async def trip(n: int) -> None:
        for i in range(12):
            point = INSIDE if (i // 2) % 2 else OUTSIDE
            client = a if (i + n) % 2 else b
            await drive(client, [point], t + i * 1000, trip=f"trip_{n}", driver=f"drv_{n}")

    await asyncio.gather(*(trip(n) for n in range(6)))
    await settled(a, b)
    evs = await events(a, fid, limit="5000")
    per_trip: dict[str, list[str]] = {}
    for e in evs:
        per_trip.setdefault(e["tripId"], []).append(e["event"])
    assert set(per_trip) == {f"trip_{n}" for n in range(6)}
    for trip_id, seq in per_trip.items():
        # inside at pings 2-3, 6-7, 10-11: three enters, two exits, alternating.
        assert seq == ["enter", "exit", "enter", "exit", "enter"], (trip_id, seq)
    keys = Counter((e["tripId"], e["timestamp"], e["event"]) for e in evs)
    assert max(keys.values()) == 1
    stored = await db.fetchval('SELECT count(*) FROM "GeofenceEvent" WHERE "orgId" = $1', "org_1")
    assert stored == len(evs) == 30


async def test_events_go_live_to_the_fleet_subscribers_of_the_org_only(client):
    fid = await fence(client)
    await fence(client, org="org_2")
    fleet = await client.ws_connect(
        f"/api/v1/live?access_token={token('dispatcher', 'd', 'org_1')}"
    )
    trip_only = await client.ws_connect(
        f"/api/v1/live?access_token={token('dispatcher', 'd', 'org_1')}"
    )
    other = await client.ws_connect(
        f"/api/v1/live?access_token={token('dispatcher', 'd', 'org_2')}"
    )
    for ws, msg in [(fleet, {"fleet": True}), (trip_only, {"trips": ["trip_1"]}),
                    (other, {"fleet": True})]:  # fmt: skip
        await ws.send_json({"type": "subscribe", **msg})
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "subscribed"
    t = now_ms(1)
    await drive(client, [OUTSIDE, INSIDE], t)
    await drive(client, [OUTSIDE, INSIDE], t, org="org_2")  # same ids in org_2

    async def messages(ws, wait: float = 0.5) -> list[dict[str, Any]]:
        got = []
        while True:
            try:
                got.append(json.loads((await ws.receive(timeout=wait)).data))
            except TimeoutError:
                return got

    got = [m for m in await messages(fleet) if m["type"] == "geofence"]
    assert len(got) == 1, got
    (msg,) = got
    assert msg["event"] == "enter" and msg["geofenceId"] == fid and msg["geofenceName"] == "Depot"
    assert msg["tripId"] == "trip_1" and msg["driverId"] == "drv_1"
    assert msg["location"]["latitude"] == INSIDE[0]
    assert round(datetime.fromisoformat(msg["timestamp"]).timestamp() * 1000) == t + 1000
    assert all(m["type"] != "geofence" for m in await messages(trip_only, 0.2))
    theirs = [m for m in await messages(other, 0.2) if m["type"] == "geofence"]
    assert len(theirs) == 1 and theirs[0]["geofenceId"] != fid
    for ws in (fleet, trip_only, other):
        await ws.close()


async def test_two_orgs_with_the_same_trip_ids_never_share_state_or_events(client):
    one = await fence(client, org="org_1")
    two = await fence(client, org="org_2")
    t = now_ms(1)
    await drive(client, [OUTSIDE, INSIDE], t, org="org_1")  # org_1's trip_1 goes in
    await drive(client, [OUTSIDE, OUTSIDE, OUTSIDE], t, org="org_2")  # org_2's stays out
    assert kinds(await events(client, one)) == [("enter", t + 1000)]
    assert await events(client, two, org="org_2") == []
    await drive(client, [INSIDE], t + 5000, org="org_2")
    await drive(client, [INSIDE], t + 5000, org="org_1")  # still inside: nothing new
    assert kinds(await events(client, two, org="org_2")) == [("enter", t + 5000)]
    assert kinds(await events(client, one)) == [("enter", t + 1000)]


async def test_a_fence_created_around_a_truck_enters_at_its_next_ping(client, db):
    t = now_ms(-60)
    await drive(client, [INSIDE], t)
    assert await db.fetchval('SELECT count(*) FROM "GeofenceState"') == 0  # no fence: no work
    fid = await fence(client)
    await asyncio.sleep(1.1)  # the orgs-with-fences look-up is refreshed every second
    await drive(client, [INSIDE], now_ms(1))
    (enter,) = await events(client, fid)
    assert enter["event"] == "enter"  # at the ping after the creation, not the one before
    assert round(datetime.fromisoformat(enter["timestamp"]).timestamp() * 1000) > t


async def test_a_deleted_fence_takes_its_events_and_makes_no_exit(client, db):
    fid = await fence(client)
    keep = await fence(client, {"type": "Point", "coordinates": [LON0, LAT0]}, "Gate", radiusM=50)
    t = now_ms(1)
    await drive(client, [OUTSIDE, INSIDE], t)
    assert kinds(await events(client, fid)) == [("enter", t + 1000)]
    assert kinds(await events(client, keep)) == [("enter", t + 1000)]
    r = await client.delete(f"{FENCES}/{fid}", headers=dispatcher())
    assert r.status == 204
    await drive(client, [OUTSIDE], t + 2000)
    assert kinds(await events(client, keep)) == [("enter", t + 1000), ("exit", t + 2000)]
    left = await db.fetchval('SELECT count(*) FROM "GeofenceEvent" WHERE "geofenceId" = $1', fid)
    assert left == 0
    r = await client.get(f"{FENCES}/{fid}/events", headers=dispatcher())
    assert r.status == 404


async def test_a_blocked_evaluation_never_delays_the_ack_and_catches_up_once(client, db):
    fid = await fence(client)
    t = now_ms(1)
    # Another session holds the state table: the evaluation waits, the ack must not.
    async with db.transaction():
        await db.execute('LOCK TABLE "GeofenceState" IN ACCESS EXCLUSIVE MODE')
        answer = await drive(client, [OUTSIDE, INSIDE], t, settle=False)
        assert answer["accepted"] == 2
        await asyncio.sleep(0.3)
        assert client.server.app[GEOFENCES].pending == 1
    await settled(client)
    assert kinds(await events(client, fid)) == [("enter", t + 1000)]


def evaluations() -> float:
    """Evaluation transactions this process has run (the duration histogram's count)."""
    [family] = metrics.GEOFENCE_SECONDS.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))


async def test_a_backlog_of_different_trips_is_evaluated_in_one_transaction(client, db):
    """Flushes that are all due when the evaluator gets to them (it was held up), of
    different trips, are evaluated together, in one transaction."""
    fid = await fence(client)
    t = now_ms(1)
    before = evaluations()
    async with db.transaction():
        await db.execute('LOCK TABLE "GeofenceState" IN ACCESS EXCLUSIVE MODE')
        await drive(client, [OUTSIDE], t, settle=False)  # its evaluation waits for the lock
        await asyncio.sleep(0.2)
        for i in range(1, 4):  # three trips, each entering the fence
            await drive(client, [OUTSIDE, INSIDE], t, trip=f"trip_{i}", driver=f"drv_{i}",
                        settle=False)  # fmt: skip
        assert client.server.app[GEOFENCES].pending == 4
    await settled(client)
    evs = await events(client, fid)
    assert sorted((e["tripId"], e["event"]) for e in evs) == [
        (f"trip_{i}", "enter") for i in range(1, 4)
    ]
    assert evaluations() - before == 2  # the first flush, then the other three at once


async def test_flushes_sharing_a_trip_are_not_evaluated_together(make_client, db):
    """Pod a commits a trip's batches 1 and 3 while its evaluator is held up; pod b commits
    batch 2 between them and dies before evaluating it. Evaluating 1 and 3 together would read
    back only what lies before 1, and b's pings would be skipped for good."""
    a, b = await make_client(), await make_client()
    fid = await fence(a)
    t = now_ms(1)
    b.server.app[GEOFENCES].stop()
    async with db.transaction():
        await db.execute('LOCK TABLE "GeofenceState" IN ACCESS EXCLUSIVE MODE')
        await drive(a, [OUTSIDE], t, trip="trip_0", driver="drv_0", settle=False)  # held up
        await asyncio.sleep(0.2)
        await drive(a, [OUTSIDE], t, settle=False)
        await drive(b, [INSIDE], t + 1000, settle=False)
        await drive(a, [OUTSIDE], t + 2000, settle=False)
    await settled(a)
    assert kinds(await events(a, fid)) == [("enter", t + 1000), ("exit", t + 2000)]


async def test_a_failing_evaluation_is_retried_and_stores_each_event_once(client, db):
    fid = await fence(client)
    t = now_ms(1)
    # PostgreSQL refuses every event for a while (a real refusal, not a patched call).
    await db.execute(
        'ALTER TABLE "GeofenceEvent" ADD CONSTRAINT "refuse" CHECK ("event" = \'none\') NOT VALID'
    )
    await drive(client, [OUTSIDE, INSIDE], t, settle=False)
    await asyncio.sleep(0.5)  # a few attempts fail
    assert client.server.app[GEOFENCES].pending == 1
    await db.execute('ALTER TABLE "GeofenceEvent" DROP CONSTRAINT "refuse"')
    await settled(client)
    await drive(client, [OUTSIDE], t + 2000)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 2000)]


async def test_an_orgs_positions_are_budgeted_over_all_its_fences(make_client):
    client = await make_client(geofence_max_vertices_per_org=12)
    await fence(client, org="org_1")  # 5 positions
    point = {"type": "Point", "coordinates": [LON0, LAT0]}
    await fence(client, point, "Gate", org="org_1", radiusM=50)  # a circle counts one: 6
    status, answer = await create(client, {"name": "x", "geometry": SQUARE})  # 11 of 12
    assert status == 201, answer
    status, answer = await create(client, {"name": "y", "geometry": SQUARE})
    assert status == 409 and answer["error"] == "too_many_geofences", answer
    assert "GEOFENCE_MAX_VERTICES_PER_ORG" in answer["detail"]
    await fence(client, org="org_2")  # another org's budget is its own
    oldest = (await list_ids(client))[0]
    r = await client.delete(f"{FENCES}/{oldest}", headers=dispatcher())
    assert r.status == 204  # deleting gives the positions back
    status, answer = await create(client, {"name": "y", "geometry": SQUARE})
    assert status == 201, answer


async def list_ids(client, org="org_1") -> list[str]:
    r = await client.get(FENCES, headers=dispatcher(org))
    return [f["id"] for f in (await r.json())["geofences"]]


async def test_an_evaluation_waiting_for_a_trips_state_reads_it_as_committed_meanwhile(
    client, database
):
    """Another pod's evaluation holds the trip's state row and moves it on (here a test
    connection, standing in for it): the evaluation that waited for the lock reads the state
    as committed, not as it was when its statement started, and makes no second enter."""
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    other = await asyncpg.connect(database)
    try:
        await other.execute("BEGIN")
        await other.execute(
            'SELECT 1 FROM "GeofenceState" WHERE "orgId" = $1 AND "tripId" = $2 FOR UPDATE',
            "org_1", "trip_1",
        )  # fmt: skip
        await drive(client, [INSIDE], t + 2000, settle=False)
        for _ in range(250):  # until the evaluation waits for the row lock
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting
        await other.execute(
            'UPDATE "GeofenceState" SET "evaluatedTo" = to_timestamp($1 / 1000.0),'
            ' "inside" = ARRAY[$2] WHERE "orgId" = $3 AND "tripId" = $4',
            t + 1000, fid, "org_1", "trip_1",
        )  # fmt: skip
        await other.execute("COMMIT")
    finally:
        await other.close()
    await settled(client)
    assert await events(client, fid) == []  # inside since t + 1000: no enter at t + 2000


async def test_one_orgs_burst_of_creates_does_not_hold_the_validation_from_another(make_client):
    """Polygons are validated on one thread per pod (up to tens of ms each): an org may have
    at most VALIDATIONS_PER_ORG of them queued or running there; beyond, 503 geofence_busy,
    and another org's create is validated as soon as the thread is free."""
    from ingest.geofences_api import VALIDATIONS_PER_ORG

    from .test_geofence_shapes import hair_comb

    client = await make_client(geofence_max_vertices=10_000)
    # Valid, and about the slowest there is to validate.
    big = {"name": "big", "geometry": {"type": "Polygon", "coordinates": [hair_comb(9_999)]}}
    burst = [client.post(FENCES, json=big, headers=dispatcher("org_a")) for _ in range(8)]
    answers = await asyncio.gather(*burst)
    got = [(r.status, await r.text()) for r in answers]
    assert all(status in (201, 503) for status, _ in got), got
    busy = [r for r in answers if r.status == 503]
    assert len(busy) >= 8 - 2 * VALIDATIONS_PER_ORG, got
    for r in busy:
        assert (await r.json())["error"] == "geofence_busy" and r.headers["Retry-After"] == "1"
    r = await client.post(FENCES, json=big, headers=dispatcher("org_b"))
    assert r.status == 201, await r.text()


async def test_an_orgs_fence_changes_are_rate_limited_and_another_orgs_are_not(make_client):
    """Each create or delete makes every pod read and index the org's fences again: a script
    churning them is told 429 with Retry-After once the org's bucket is empty; deletes spend
    it too; another org's bucket is its own, and reads are never limited."""
    client = await make_client(geofence_changes_per_s=0.5, geofence_changes_burst=3)
    ids = [await fence(client, name=f"f{i}", org="org_a") for i in range(2)]
    r = await client.delete(f"{FENCES}/{ids[0]}", headers=dispatcher("org_a"))
    assert r.status == 204
    status, answer = await create(client, {"name": "f3", "geometry": SQUARE}, "org_a")
    assert status == 429 and answer["error"] == "rate_limited", answer
    assert "GEOFENCE_CHANGES_PER_S" in answer["detail"]
    r = await client.delete(f"{FENCES}/{ids[1]}", headers=dispatcher("org_a"))
    assert r.status == 429 and r.headers["Retry-After"] in ("1", "2"), await r.text()
    assert await list_ids(client, "org_a") == [ids[1]]  # refused: nothing changed
    for i in range(3):  # the same dispatcher id in another org: its own bucket
        await fence(client, name=f"b{i}", org="org_b")
    assert len(await list_ids(client, "org_b")) == 3
    await asyncio.sleep(2.1)  # one change is free again
    r = await client.delete(f"{FENCES}/{ids[1]}", headers=dispatcher("org_a"))
    assert r.status == 204
