"""Attacks on trip ownership found by a review (2026-12-05), each failing before its fix:
a token subject that differs by blanks posting as another driver through the phone apps, ids
ending in a newline (msgspec's pattern anchor let them through), and a replayed batch that
stored nothing but still claimed the new trip it named."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from .conftest import against_another_pod, auth, batch, in_one_flush, iso, now_ms, token
from .test_ops import Delta, scrape

PING = "/api/v1/tracking/ping"
HANDOVER = "/api/v1/tracking/trips/{}/driver"


def _overland_feature(ts_ms: int, device: str) -> dict[str, object]:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [77.5, 12.9]},
            "properties": {"timestamp": iso(ts_ms), "device_id": device}}  # fmt: skip


async def _post_through(
    client: TestClient, app: str, tok: str, device: str, ts_ms: int
) -> ClientResponse:
    if app == "overland":
        return await client.post(
            "/api/v1/ingest/overland", json={"locations": [_overland_feature(ts_ms, device)]},
            headers={"Authorization": f"Bearer {tok}"},
        )  # fmt: skip
    if app == "owntracks":
        basic = base64.b64encode(f"x:{tok}".encode()).decode()
        body = {"_type": "location", "lat": 12.9, "lon": 77.5, "tst": ts_ms // 1000}
        return await client.post(
            "/api/v1/ingest/owntracks", data=json.dumps(body),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json",
                     "X-Limit-D": device},
        )  # fmt: skip
    params = {"token": tok, "id": device, "lat": "12.9", "lon": "77.5", "timestamp": str(ts_ms)}
    return await client.post("/api/v1/ingest/osmand", params=params)


@pytest.mark.parametrize("app", ["overland", "owntracks", "osmand"])
@pytest.mark.parametrize("blank", [" ", "\u00a0", "\u3000"], ids=["space", "nbsp", "ideographic"])
async def test_a_subject_that_differs_by_blanks_is_another_driver_in_the_phone_apps(
    client, db, app, blank
):
    """drv_1 owns truck_7. The token of "drv_1 " (another subject) is refused on it natively;
    through a phone app its subject was stripped to "drv_1", and it posted as drv_1."""
    start = now_ms(-600) // 1000 * 1000
    r = await client.post(PING, json=batch(1, trip="truck_7", start_ms=start), headers=auth())
    assert r.status == 200, await r.text()
    other = "drv_1" + blank
    r = await _post_through(client, app, token("driver", other, "org_1"), "truck_7", start + 7000)
    assert r.status == 403, await r.text()
    drivers = await db.fetch(
        """SELECT DISTINCT "driverId" FROM "TripLocation"
           WHERE "orgId" = 'org_1' AND "tripId" = 'truck_7'"""
    )
    assert [d[0] for d in drivers] == ["drv_1"]
    # Its own device's trip is its own, under its exact subject.
    r = await _post_through(client, app, token("driver", other, "org_1"), "van_8", start + 8000)
    assert r.status == 200, await r.text()
    owner = await db.fetchval("""SELECT "driverId" FROM "IngestTrip" WHERE "tripId" = 'van_8'""")
    assert owner == other


async def test_ids_ending_in_a_newline_are_refused(client, db):
    """A trip id "truck_5\\n" was stored (200) and could then never be read or handed over;
    a handover to "drv_2\\n" gave the trip to a driver no token has."""
    r = await client.post(PING, json=batch(2, trip="truck_5\n"), headers=auth())
    assert r.status == 400, await r.text()
    assert "tripId" in (await r.json())["detail"]
    stored = await db.fetchval(
        """SELECT count(*) FROM "TripLocation" WHERE "tripId" LIKE 'truck_5%'"""
    )
    assert stored == 0
    r = await client.post(PING, json=batch(1, trip="truck_9"), headers=auth())
    assert r.status == 200
    dispatcher = auth("dispatcher", "disp_1", "org_1")
    r = await client.put(
        HANDOVER.format("truck_9"), json={"driverId": "drv_2\n"}, headers=dispatcher
    )
    assert r.status == 400, await r.text()
    assert "driverId" in (await r.json())["detail"]
    owner = await db.fetchval("""SELECT "driverId" FROM "IngestTrip" WHERE "tripId" = 'truck_9'""")
    assert owner == "drv_1"


async def test_a_replay_naming_a_new_trip_claims_no_trip(client, db):
    """drv_1 resends batch b-1 naming truck_42: a replay, which stores nothing, and now owns
    nothing either (before, truck_42 became drv_1's, with no ping to show for it, and drv_2
    was refused on it)."""
    start = now_ms(-600)
    r = await client.post(
        PING, json=batch(1, trip="t_own", start_ms=start, batch_id="b-1"), headers=auth()
    )
    assert r.status == 200
    r = await client.post(
        PING, json=batch(1, trip="truck_42", start_ms=start, batch_id="b-1"), headers=auth()
    )
    ack = await r.json()
    assert (r.status, ack["accepted"], ack["duplicates"]) == (200, 0, 1), ack
    owner = await db.fetchval("""SELECT "driverId" FROM "IngestTrip" WHERE "tripId" = 'truck_42'""")
    assert owner is None
    r = await client.post(
        PING, json=batch(1, trip="truck_42", driver="drv_2", start_ms=start),
        headers=auth("driver", "drv_2"),
    )  # fmt: skip
    assert r.status == 200, await r.text()
    owner = await db.fetchval("""SELECT "driverId" FROM "IngestTrip" WHERE "tripId" = 'truck_42'""")
    assert owner == "drv_2"


async def test_a_replay_in_the_same_flush_takes_a_new_trip_from_no_one(client, db):
    """In one flush: drv_1 resends batch b-1 naming truck_42 (new), and drv_2 posts truck_42
    afresh. Before, the replay claimed the trip first: drv_2 was refused (403), then the claim
    was dropped with the replay, leaving the trip to nobody. Now drv_2 starts it, and the
    replay is refused as any request on another driver's trip is. org_2's drv_1, whose b-1 is
    not stored, posting truck_42 in the same flush, is no replay: a batch id is the org's."""
    start = now_ms(-600)
    r = await client.post(
        PING, json=batch(1, trip="t_own", start_ms=start, batch_id="b-1"), headers=auth()
    )
    assert r.status == 200
    answers = await in_one_flush(
        client,
        client.post(
            PING, json=batch(1, trip="truck_42", start_ms=start, batch_id="b-1"), headers=auth()
        ),
        client.post(
            PING, json=batch(2, trip="truck_42", driver="drv_2", start_ms=start),
            headers=auth("driver", "drv_2"),
        ),
        client.post(
            PING, json=batch(3, trip="truck_42", start_ms=start, batch_id="b-1"),
            headers=auth("driver", "drv_1", "org_2"),
        ),
    )  # fmt: skip
    acks = [(r.status, await r.json()) for r in answers]
    assert [(s, a.get("error"), a.get("accepted")) for s, a in acks] == [
        (403, "trip_owned_by_another_driver", None), (200, None, 2), (200, None, 3)
    ], acks  # fmt: skip
    owners = await db.fetch(
        """SELECT "orgId", "driverId" FROM "IngestTrip" WHERE "tripId" = 'truck_42' ORDER BY 1"""
    )
    assert [tuple(o) for o in owners] == [("org_1", "drv_2"), ("org_2", "drv_1")]


async def test_a_replay_naming_a_new_trip_does_not_use_up_the_drivers_last_trip_of_the_day(
    make_client, db
):
    """drv_1 may start 2 trips a day and has started 1. In one flush it resends batch b-1
    naming a new trip, and posts its second trip afresh: before, the replay took the last
    trip of the day (handed back only after), and the fresh post was refused 429."""
    client = await make_client(max_trips_per_driver_per_day=2)
    start = now_ms(-600)
    r = await client.post(
        PING, json=batch(1, trip="t_1", start_ms=start, batch_id="b-1"), headers=auth()
    )
    assert r.status == 200
    answers = await in_one_flush(
        client,
        client.post(
            PING, json=batch(1, trip="t_x", start_ms=start, batch_id="b-1"), headers=auth()
        ),
        client.post(PING, json=batch(1, trip="t_2", start_ms=start), headers=auth()),
    )
    assert [r.status for r in answers] == [200, 200], [await r.text() for r in answers]
    assert [(await r.json())["accepted"] for r in answers] == [0, 1]
    trips = await db.fetch(
        """SELECT "tripId" FROM "IngestTrip" WHERE "driverId" = 'drv_1' ORDER BY 1"""
    )
    assert [t[0] for t in trips] == ["t_1", "t_2"]
    # The limit still holds: a third trip is refused.
    r = await client.post(PING, json=batch(1, trip="t_3", start_ms=start), headers=auth())
    assert r.status == 429, await r.text()


async def test_a_batch_id_repeated_in_one_flush_takes_no_new_trip_from_a_fresh_post(
    make_client, db
):
    """In one flush: drv_1 posts batch b-x on t_a, then b-x again naming truck_43 (new), and
    drv_2 posts truck_43 afresh; drv_1 may start 2 trips a day and also posts t_b afresh.
    The repeat is most likely a replay, decided only when batch ids are claimed: it now
    claims after every other request, so drv_2 starts truck_43 and drv_1 its t_b (before, the
    repeat took truck_43 and drv_1's last trip of the day: 403 and 429, and the trip was left
    to nobody once the repeat turned out a replay)."""
    client = await make_client(max_trips_per_driver_per_day=2)
    start = now_ms(-600)
    answers = await in_one_flush(
        client,
        client.post(PING, json=batch(1, trip="t_a", start_ms=start, batch_id="b-x"), headers=auth()),
        client.post(PING, json=batch(1, trip="truck_43", start_ms=start, batch_id="b-x"), headers=auth()),
        client.post(
            PING, json=batch(2, trip="truck_43", driver="drv_2", start_ms=start),
            headers=auth("driver", "drv_2"),
        ),
        client.post(PING, json=batch(1, trip="t_b", start_ms=start), headers=auth()),
    )  # fmt: skip
    statuses = [r.status for r in answers]
    assert statuses == [200, 403, 200, 200], [await r.text() for r in answers]
    owners = await db.fetch("""SELECT "tripId", "driverId" FROM "IngestTrip" ORDER BY 1""")
    assert [tuple(o) for o in owners] == [("t_a", "drv_1"), ("t_b", "drv_1"), ("truck_43", "drv_2")]


async def test_a_replay_of_a_batch_another_pod_is_committing_claims_no_trip(client, db, database):
    """The batch id is being stored by another pod (uncommitted) when this pod's flush looks
    for stored ones: the replay is found only when its id is claimed, after it claimed its new
    trip; that claim is dropped in the same transaction."""
    store_batch = """INSERT INTO "IngestBatch" ("orgId", "driverId", "batchId")
                     VALUES ('org_1', 'drv_1', 'b-9')"""
    body = batch(1, trip="t_new", start_ms=now_ms(-600), batch_id="b-9")
    [r] = await against_another_pod(
        client, db, database, lambda: db.execute(store_batch), None,
        client.post(PING, json=body, headers=auth()),
    )  # fmt: skip
    ack = await r.json()
    assert (r.status, ack["accepted"], ack["duplicates"]) == (200, 0, 1), ack
    owner = await db.fetchval("""SELECT "driverId" FROM "IngestTrip" WHERE "tripId" = 't_new'""")
    assert owner is None


async def test_pods_claiming_the_same_new_trips_in_opposite_orders_do_not_deadlock(
    client, db, database
):
    """Another pod has claimed t_a (uncommitted) and goes on to claim t_b; this pod's flush
    starts t_b then t_a. Claimed in arrival order, this pod held t_b while it waited for t_a:
    PostgreSQL found a deadlock after deadlock_timeout and aborted the flush, which counted as
    an outage (every pooled connection dropped). Claimed in key order, the flush waits for t_a
    before it touches t_b, and the other pod goes on."""
    claim = (
        """INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId") VALUES ('org_1', $1, 'drv_2')"""
    )
    before = await scrape(client)
    start = now_ms(-600)
    answers = await against_another_pod(
        client, db, database,
        lambda: db.execute(claim, "t_a"),
        lambda: db.execute(claim, "t_b"),  # raised DeadlockDetectedError, or waited it out
        client.post(PING, json=batch(1, trip="t_b", start_ms=start), headers=auth()),
        client.post(PING, json=batch(1, trip="t_a", start_ms=start), headers=auth()),
    )  # fmt: skip
    assert [r.status for r in answers] == [403, 403]  # drv_2 started both
    # The deadlock, when the flush was the side PostgreSQL aborted: a failed flush.
    assert Delta(before, await scrape(client))("ingest_db_errors_total", operation="flush") == 0
