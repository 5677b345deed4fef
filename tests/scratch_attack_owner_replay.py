"""Scratch: a replayed batch (stores nothing) still claims the new trip it names."""

from __future__ import annotations

from .conftest import auth, batch, now_ms

PING = "/api/v1/tracking/ping"


async def test_a_replay_stores_nothing_not_even_a_trip_owner(client, db):
    start = now_ms(-600)
    r = await client.post(PING, json=batch(1, trip="t_own", start_ms=start, batch_id="b-1"),
                          headers=auth())
    assert r.status == 200
    # drv_1 replays the batch id, naming drv_2's future trip: answered as a full duplicate...
    r = await client.post(PING, json=batch(1, trip="truck_42", start_ms=start, batch_id="b-1"),
                          headers=auth())
    ack = await r.json()
    assert (r.status, ack["accepted"], ack["duplicates"]) == (200, 0, 1), ack
    pings = await db.fetchval("""SELECT count(*) FROM "TripLocation" WHERE "tripId" = 'truck_42'""")
    owner = await db.fetchval("""SELECT "driverId" FROM "IngestTrip" WHERE "tripId" = 'truck_42'""")
    r2 = await client.post(PING, json=batch(1, trip="truck_42", driver="drv_2", start_ms=start),
                           headers=auth("driver", "drv_2"))
    assert owner is None, (
        f"replay stored {pings} pings but claimed truck_42 for {owner!r}; "
        f"drv_2 then gets {r2.status} {await r2.text()}")
