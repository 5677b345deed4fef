"""Two orgs' ids in one flush, passed to PostgreSQL as one joined text per list
(ingest/sql_arrays.py), stay on their own rows (from a cold attacker review).

No id a client or a signed token can bring reaches those parameters empty or holding the
separator: every ingest path refuses a control character (400/401) or strips it off a device
id's ends. What is left to check: ids that SQL or an array literal would treat specially,
valid ones, shared by two orgs in one flush, keep every org's trip, driver and batch id on
their own row, through the owner check, the trip claim, the replay look-up, the unclaim, the
batch-id claim and the geofence evaluator.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .conftest import auth, batch, in_one_flush, iso, now_ms, post_ping
from .test_geofences import INSIDE, OUTSIDE, SQUARE, settled

# Valid ids (1-64 characters, no control character) that an array literal, an escape string,
# string_to_array's NULL handling or a lookalike of the separator would read specially.
TRICKY = [
    "\\x1f",
    "E'\\x1f'",
    "a,b",
    "{a}",
    '"q"',
    "NULL",
    "\u241f",
    "\u00a0nbsp\u00a0",
    " ",
    "tr\u00e9s",
    "tre\u0301s",
    "\U0001f69a" * 16,
    "x\\",
    "'; --",
]
A, B = "org_a", "org_b"


async def post(client: Any, body: dict[str, Any], org: str) -> tuple[int, Any]:
    return await post_ping(client, body, **auth("driver", body["driverId"], org))


async def test_tricky_ids_of_two_orgs_in_one_flush_stay_on_their_own_rows(
    client: Any, db: asyncpg.Connection
) -> None:
    start = now_ms(-600)
    # A batch id stored by org A (trip "first"): resent naming a new trip, it is a replay.
    replayed = batch(trip="first", driver="NULL", batch_id="\\x1f", start_ms=start - 60_000)
    assert (await post(client, replayed, A))[0] == 200
    posts, expected_trips, expected_batches = [], set(), set()
    for i, ident in enumerate(TRICKY):
        a_body = batch(1, trip=ident, driver=TRICKY[-1 - i], batch_id=ident, start_ms=start + i)
        b_body = batch(1, trip=ident, driver=TRICKY[i - 1], batch_id=TRICKY[-1 - i],
                       start_ms=start + i)  # fmt: skip
        posts += [post(client, a_body, A), post(client, b_body, B)]
        expected_trips |= {(A, ident, TRICKY[-1 - i]), (B, ident, TRICKY[i - 1])}
        expected_batches |= {(A, TRICKY[-1 - i], ident), (B, TRICKY[i - 1], TRICKY[-1 - i])}
    # Org A's replay names a trip nobody owns; org B posts fresh to that trip, same ids.
    replay = {**replayed, "tripId": "new_trip"}
    fresh_b = {**replayed, "tripId": "new_trip"}
    posts += [post(client, replay, A), post(client, fresh_b, B)]
    expected_trips |= {(A, "first", "NULL"), (B, "new_trip", "NULL")}
    expected_batches |= {(A, "NULL", "\\x1f"), (B, "NULL", "\\x1f")}

    # Org A sends one new batch twice in the flush, each copy naming a new trip: the copy is
    # a replay found at the batch-id claim, and its trip is unclaimed again.
    twice = batch(1, trip="u,1", driver="{d}", batch_id="NULL", start_ms=start - 30_000)
    posts += [post(client, twice, A), post(client, {**twice, "tripId": "{u2}"}, A)]
    expected_trips |= {(A, "u,1", "{d}")}
    expected_batches |= {(A, "{d}", "NULL")}

    answers = await in_one_flush(client, *posts)
    assert answers[-2][1]["accepted"] == 1 and answers[-1][1]["duplicates"] == 1, answers[-2:]
    answers = answers[:-2]
    for status, answer in answers[:-2]:
        assert (status, answer["accepted"]) == (200, 1), answer
    assert answers[-2][0] == 200 and answers[-2][1]["duplicates"] == 3, answers[-2]
    assert answers[-1][0] == 200 and answers[-1][1]["accepted"] == 3, answers[-1]

    trips = {
        tuple(r) for r in await db.fetch('SELECT "orgId", "tripId", "driverId" FROM "IngestTrip"')
    }
    batches = {
        tuple(r) for r in await db.fetch('SELECT "orgId", "driverId", "batchId" FROM "IngestBatch"')
    }
    assert trips == expected_trips
    assert batches == expected_batches
    stored = {
        tuple(r)
        for r in await db.fetch(
            'SELECT "orgId", "tripId", "driverId", "batchId" FROM "TripLocation"'
        )
    }
    assert (A, "new_trip", "NULL", "\\x1f") not in stored
    assert (B, "new_trip", "NULL", "\\x1f") in stored


async def test_geofence_states_and_events_of_tricky_trip_ids_stay_with_their_org(
    client: Any, db: asyncpg.Connection
) -> None:
    fences = {}
    for org in (A, B):
        r = await client.post(
            "/api/v1/geofences", json={"name": "Depot", "geometry": SQUARE},
            headers=auth("dispatcher", "disp", org),
        )  # fmt: skip
        assert r.status == 201, await r.text()
        fences[org] = (await r.json())["id"]
    start = now_ms(1)
    posts, expected = [], set()
    for i, ident in enumerate(TRICKY):
        # Org A's trip goes in and stays; org B's same trip id goes in and out again.
        for org, points in ((A, [OUTSIDE, INSIDE]), (B, [OUTSIDE, INSIDE, OUTSIDE])):
            body = {
                "tripId": ident, "driverId": "drv", "batchId": f"{org}-{i}",
                "locations": [
                    {"latitude": lat, "longitude": lon, "timestamp": iso(start + i * 10 + k)}
                    for k, (lat, lon) in enumerate(points)
                ],
            }  # fmt: skip
            posts.append(post(client, body, org))
        expected |= {(A, fences[A], ident, "enter"), (B, fences[B], ident, "enter"),
                     (B, fences[B], ident, "exit")}  # fmt: skip
    for status, answer in await in_one_flush(client, *posts):
        assert status == 200, answer
    await settled(client)
    events = {
        tuple(r)
        for r in await db.fetch(
            'SELECT "orgId", "geofenceId", "tripId", "event" FROM "GeofenceEvent"'
        )
    }
    assert events == expected
    states = {
        (r[0], r[1]): list(r[2])
        for r in await db.fetch('SELECT "orgId", "tripId", "inside" FROM "GeofenceState"')
    }
    assert states == {
        **{(A, t): [fences[A]] for t in TRICKY},
        **{(B, t): [] for t in TRICKY},
    }
