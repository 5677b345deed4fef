"""The wire types (ingest/schema.py) against hostile payloads: numbers out of range, deep
nesting, invalid UTF-8, long ids and control characters are refused as a whole with the path
they occur at, and duplicate keys cannot smuggle a value past the checks.

On an ingest-only instance (ROLE=ingest), as the public ingest path is deployed.
"""

from __future__ import annotations

import msgspec

from .conftest import batch, post_ping


def invalid(detail: str) -> dict[str, str]:
    return {"error": "invalid_payload", "detail": detail}


async def test_non_finite_and_overflowing_literals_are_400(ingest_client):
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"):
        body = msgspec.json.encode(batch(1)).replace(
            b'"latitude":12.9', b'"latitude":' + literal, 1
        )
        assert literal in body
        status, resp = await post_ping(ingest_client, body)
        if literal.endswith(b"e400"):
            assert (status, resp) == (
                400,
                invalid("Number out of range - at `$.locations[0].latitude`"),
            )
        else:
            assert status == 400 and resp["error"] == "invalid_payload", literal
            assert resp["detail"].startswith("JSON is malformed: invalid character (byte ")


async def test_deep_nesting_in_a_typed_field_is_400(ingest_client):
    deep = b"[" * 100_000 + b"]" * 100_000
    for field in (b"tripId", b"locations"):
        body = b'{"driverId":"drv_1","' + field + b'":' + deep + b"}"
        status, resp = await post_ping(ingest_client, body)
        assert status == 400 and resp["error"] == "invalid_payload", field
    assert await post_ping(ingest_client, deep) == (400, invalid("Expected `object`, got `array`"))


async def test_deep_nesting_in_an_ignored_field_is_400(ingest_client):
    """Unknown fields are skipped, but skipping still recurses: RecursionError today (500)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for data, content_type in (
        (msgspec.json.encode(batch(1))[:-1] + b',"x":' + deep + b"}", "application/json"),
        (b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0", "application/msgpack"),
    ):
        status, resp = await post_ping(ingest_client, data, **{"Content-Type": content_type})
        assert status == 400 and resp["error"] == "invalid_payload", content_type


async def test_invalid_utf8_is_400(ingest_client):
    body = msgspec.json.encode(batch(1)).replace(b'"trip_1"', b'"trip_\xff"')
    status, resp = await post_ping(ingest_client, body)
    assert status == 400 and resp["error"] == "invalid_payload"


async def test_very_long_ids_are_400_naming_the_path(ingest_client):
    for field in ("tripId", "driverId", "batchId"):
        body = batch(1)
        body[field] = "x" * 100_000
        got = await post_ping(ingest_client, msgspec.json.encode(body))
        assert got == (400, invalid(f"Expected `str` of length <= 64 - at `$.{field}`"))
    body = batch(1)
    del body["batchId"]
    body["locations"][0]["batchId"] = "y" * 65
    got = await post_ping(ingest_client, msgspec.json.encode(body))
    assert got == (400, invalid("Expected `str` of length <= 64 - at `$.locations[0].batchId`"))


async def test_control_characters_in_ids_are_400(ingest_client):
    for field in ("tripId", "driverId", "batchId"):
        for char in ("\x00", "\t", "\n", "\r", "\x1b", "\x7f"):
            body = batch(1)
            body[field] = f"id{char}x"
            status, resp = await post_ping(ingest_client, msgspec.json.encode(body))
            assert status == 400 and resp["error"] == "invalid_payload", (field, char)
            assert resp["detail"].startswith("Expected `str` matching regex")
            assert resp["detail"].endswith(f" - at `$.{field}`")


async def test_c1_control_characters_in_ids_are_400(ingest_client):
    for char in ("\x85", "\x9b"):  # NEL; CSI, which starts terminal escape sequences
        status, resp = await post_ping(
            ingest_client, msgspec.json.encode(batch(1, trip=f"trip{char}1"))
        )
        assert status == 400 and resp["detail"].endswith(" - at `$.tripId`"), char


async def test_duplicate_keys_the_last_one_wins(ingest_client, db):
    """Observed behaviour (msgspec): of duplicate keys the last one counts, at every level.
    Authorisation reads the same decoded value as storage, so a duplicate cannot smuggle a
    driverId past the subject check."""
    good = msgspec.json.encode(batch(1))
    smuggle = good.replace(b'"driverId":"drv_1"', b'"driverId":"drv_1","driverId":"drv_2"')
    forbidden = {"error": "forbidden", "detail": "driverId does not match the token's subject"}
    assert await post_ping(ingest_client, smuggle) == (403, forbidden)
    twice = good.replace(b'"driverId":"drv_1"', b'"driverId":"drv_2","driverId":"drv_1"')
    twice = twice.replace(b'"latitude":12.9', b'"latitude":99,"latitude":12.9')
    status, resp = await post_ping(ingest_client, twice)
    assert status == 200 and resp["accepted"] == 1
    assert await db.fetchval('SELECT "latitude" FROM "TripLocation"') == 12.9
