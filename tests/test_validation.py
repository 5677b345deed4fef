"""Every validation class of the contract, with its status and body."""

from __future__ import annotations

import msgspec
import pytest

from .conftest import auth, batch, now_ms

PING = "/api/v1/tracking/ping"


async def post(client, body, **headers):
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    h = {**auth(), "Content-Type": "application/json", **headers}
    resp = await client.post(PING, data=data, headers=h)
    return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda b: b["locations"][1].update(latitude="north"), "$.locations[1].latitude"),
        (lambda b: b["locations"][0].pop("timestamp"), "$.locations[0]"),
        (lambda b: b.pop("tripId"), "tripId"),
        (lambda b: b.update(locations=[]), "$.locations"),
        (lambda b: b.update(locations={"a": 1}), "$.locations"),
        (lambda b: b.update(tripId="x" * 65), "$.tripId"),
        (lambda b: b.update(driverId=""), "$.driverId"),
        (lambda b: b.update(tripId="bad\u0007id"), "$.tripId"),
        (lambda b: b["locations"][0].update(timestamp="2026-11-23T10:15:00"), "$.locations[0].timestamp"),
        (lambda b: b["locations"][0].update(timestamp="yesterday"), "$.locations[0].timestamp"),
        (lambda b: b["locations"][0].update(speed=True), "$.locations[0].speed"),
        (lambda b: b.update(batchId="b" * 65), "$.batchId"),
    ],
)  # fmt: skip
async def test_malformed_batch_is_rejected_whole_with_its_path(client, db, mutate, path):
    body = batch(3)
    mutate(body)
    status, resp = await post(client, body)
    assert status == 400
    assert resp["error"] == "invalid_payload"
    assert path in resp["detail"], resp["detail"]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


@pytest.mark.parametrize(
    "raw", [b"not json", b"", b"[1,2", b'{"tripId": NaN}', b"1e400", b'{"tripId":"t","driverId":"d","locations":[{"latitude":1e400}]}']
)  # fmt: skip
async def test_unparseable_body_is_400(client, raw):
    status, resp = await post(client, raw)
    assert status == 400 and resp["error"] == "invalid_payload" and resp["detail"]


async def test_too_many_pings_is_400_naming_locations(make_client):
    client = await make_client(max_pings_per_batch=10)
    status, resp = await post(client, batch(11))
    assert status == 400 and "$.locations" in resp["detail"] and "10" in resp["detail"]


@pytest.mark.parametrize(
    ("field", "value", "reason_word"),
    [
        ("latitude", 91.0, "latitude"),
        ("latitude", -90.5, "latitude"),
        ("longitude", 180.01, "longitude"),
        ("accuracy", -1.0, "accuracy"),
        ("speed", -0.1, "speed"),
        ("heading", 360.0, "heading"),
        ("heading", -1.0, "heading"),
        ("speed", 1e308 * 10 if False else -1e308, "speed"),
    ],
)  # fmt: skip
async def test_range_errors_drop_only_the_bad_ping(client, db, field, value, reason_word):
    body = batch(4)
    body["locations"][2][field] = value
    status, resp = await post(client, body)
    assert status == 200
    assert resp["accepted"] == 3
    assert len(resp["rejected"]) == 1
    assert resp["rejected"][0]["index"] == 2
    assert reason_word in resp["rejected"][0]["reason"]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 3


async def test_timestamps_outside_the_window_are_rejected_per_ping(make_client, db):
    client = await make_client(max_clock_skew_s=60, max_ping_age_days=2)
    body = batch(4)
    body["locations"][0]["timestamp"] = now_ms(+3600)  # an hour ahead
    body["locations"][3]["timestamp"] = now_ms(-3 * 86400)  # three days old
    status, resp = await post(client, body)
    assert status == 200 and resp["accepted"] == 2
    assert [r["index"] for r in resp["rejected"]] == [0, 3]
    assert all("timestamp" in r["reason"] for r in resp["rejected"])


async def test_no_ping_left_is_422_with_the_list(client, db):
    body = batch(2)
    body["locations"][0]["latitude"] = 100
    body["locations"][1]["longitude"] = -200
    status, resp = await post(client, body)
    assert status == 422
    assert resp["error"] == "no_valid_pings"
    assert [r["index"] for r in resp["rejected"]] == [0, 1]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


async def test_unknown_fields_are_ignored(client):
    body = batch(2)
    body["locations"][0]["battery"] = 0.5
    body["appVersion"] = "1.2.3"
    status, resp = await post(client, body)
    assert status == 200 and resp["accepted"] == 2


async def test_differing_per_location_batch_ids_are_400(client):
    body = batch(2)
    del body["batchId"]
    body["locations"][0]["batchId"] = "a"
    body["locations"][1]["batchId"] = "b"
    status, resp = await post(client, body)
    assert status == 400 and "$.locations[1].batchId" in resp["detail"]


async def test_unsupported_media_type_is_415(client):
    status, resp = await post(client, batch(1), **{"Content-Type": "text/plain"})
    assert status == 415 and resp["error"] == "unsupported_media_type"
    status, resp = await post(client, batch(1), **{"Content-Encoding": "br-bomb"})
    assert status == 415


async def test_body_over_the_limit_is_413(make_client):
    client = await make_client(max_body_bytes=2000)
    status, resp = await post(client, batch(40))
    assert status == 413 and resp["error"] == "payload_too_large"
