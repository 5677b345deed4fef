"""Every validation class of the contract, with its status and body (ingest/validate.py and
the batch checks of the ingest endpoint). Body size, media types and encodings:
tests/test_body.py; hostile payloads the decoder refuses: tests/test_schema.py."""

from __future__ import annotations

import msgspec
import pytest

from .conftest import batch, now_ms, post_ping


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
    status, resp = await post_ping(client, body)
    assert status == 400
    assert resp["error"] == "invalid_payload"
    assert path in resp["detail"], resp["detail"]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


@pytest.mark.parametrize(
    "raw", [b"not json", b"", b"[1,2", b'{"tripId": NaN}', b"1e400", b'{"tripId":"t","driverId":"d","locations":[{"latitude":1e400}]}']
)  # fmt: skip
async def test_unparseable_body_is_400(client, raw):
    status, resp = await post_ping(client, raw)
    assert status == 400 and resp["error"] == "invalid_payload" and resp["detail"]


async def test_too_many_pings_is_400_naming_locations(make_client):
    client = await make_client(max_pings_per_batch=10)
    status, resp = await post_ping(client, batch(11))
    assert status == 400 and "$.locations" in resp["detail"] and "10" in resp["detail"]


async def test_ten_thousand_pings_are_400_naming_locations(ingest_client):
    """Within the default body limit (1 MiB) with short pings; the batch limit still holds."""
    start = now_ms(-600)
    pings = [{"latitude": 1, "longitude": 2, "timestamp": start + i} for i in range(10_000)]
    body = msgspec.json.encode({"tripId": "t", "driverId": "drv_1", "locations": pings})
    assert len(body) < 1_048_576
    assert await post_ping(ingest_client, body) == (
        400,
        {"error": "invalid_payload", "detail": "$.locations: at most 1000 pings per batch"},
    )


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
    status, resp = await post_ping(client, body)
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
    status, resp = await post_ping(client, body)
    assert status == 200 and resp["accepted"] == 2
    assert [r["index"] for r in resp["rejected"]] == [0, 3]
    assert all("timestamp" in r["reason"] for r in resp["rejected"])


async def test_no_ping_left_is_422_with_the_list(client, db):
    body = batch(2)
    body["locations"][0]["latitude"] = 100
    body["locations"][1]["longitude"] = -200
    status, resp = await post_ping(client, body)
    assert status == 422
    assert resp["error"] == "no_valid_pings"
    assert [r["index"] for r in resp["rejected"]] == [0, 1]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


async def test_unknown_fields_are_ignored(client):
    body = batch(2)
    body["locations"][0]["battery"] = 0.5
    body["appVersion"] = "1.2.3"
    status, resp = await post_ping(client, body)
    assert status == 200 and resp["accepted"] == 2


async def test_differing_per_location_batch_ids_are_400(client):
    body = batch(2)
    del body["batchId"]
    body["locations"][0]["batchId"] = "a"
    body["locations"][1]["batchId"] = "b"
    status, resp = await post_ping(client, body)
    assert status == 400 and "$.locations[1].batchId" in resp["detail"]


async def test_1e308_is_range_checked_per_ping(ingest_client, db):
    body = batch(3)
    body["locations"][0]["latitude"] = 1e308  # out of range: this ping only is rejected
    body["locations"][1]["altitude"] = 1e308  # finite, no range: accepted
    body["locations"][2]["speed"] = -1e308
    status, resp = await post_ping(ingest_client, msgspec.json.encode(body))
    assert status == 200
    assert resp["accepted"] == 1
    assert resp["rejected"] == [
        {"index": 0, "reason": "latitude must be a finite number in [-90, 90]"},
        {"index": 2, "reason": "speed must be a finite number >= 0"},
    ]
    assert await db.fetchval('SELECT "altitude" FROM "TripLocation"') == 1e308


async def test_nan_and_infinity_in_msgpack_are_rejected_per_ping(ingest_client, db):
    """JSON cannot carry NaN; msgpack can, and then the range rules reject the ping."""
    body = batch(4)
    body["locations"][0]["latitude"] = float("nan")
    body["locations"][1]["accuracy"] = float("inf")
    body["locations"][2]["altitude"] = float("-inf")
    msgpack = {"Content-Type": "application/msgpack"}
    status, resp = await post_ping(ingest_client, msgspec.msgpack.encode(body), **msgpack)
    assert status == 200
    assert resp["rejected"] == [
        {"index": 0, "reason": "latitude must be a finite number in [-90, 90]"},
        {"index": 1, "reason": "accuracy must be a finite number >= 0"},
        {"index": 2, "reason": "altitude must be a finite number"},
    ]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 1
