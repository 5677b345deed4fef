"""Timestamps of any year, offset or magnitude, on every path that parses one.

API.md, "Tenancy and ownership": a timestamp outside the accepted window is that ping's
rejection, never a 500, and the other pings of the batch are kept; a `from`/`to` outside the
representable range is a 400. Timestamps are compared at millisecond precision: digits below
the millisecond are dropped (never rounded) before any comparison.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import msgspec
import pytest

from .conftest import auth, batch, now_ms, token

PING = "/api/v1/tracking/ping"
HISTORY = "/api/v1/tracking/trips/{}/locations"
OSMAND = "/api/v1/ingest/osmand"
OVERLAND = "/api/v1/ingest/overland"
OWNTRACKS = "/api/v1/ingest/owntracks"

# The audit's values, and their neighbours at the ends of every representable range.
FAR_STRINGS = [
    "0001-01-01T00:00:00+01:00",  # 0000-12-31T23:00Z: before year 1 in UTC
    "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
    "0001-01-01T00:00:00-23:59",
    "9999-12-31T23:59:59.9999999+23:59",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
]
FAR_INTS = [10**20, -(10**20), 2**63, -(2**63) - 1, 2**64, 10**300, -(10**300), -1, 0]
PACKABLE_INTS = [2**64 - 1, 2**63, -(2**63), -(2**62), -1, 0]  # msgpack: 64 bits at most


def second_ago(minutes: int = 10) -> str:
    """A whole second some minutes ago, as 'YYYY-MM-DDTHH:MM:SS' (UTC, no offset yet)."""
    return (datetime.now(UTC) - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def post(client: Any, body: dict[str, Any], fmt: str = "json") -> tuple[int, Any]:
    data = msgspec.json.encode(body) if fmt == "json" else msgspec.msgpack.encode(body)
    headers = {**auth(), "Content-Type": f"application/{fmt}"}
    resp = await client.post(PING, data=data, headers=headers)
    return resp.status, await resp.json()


async def stored(db: Any) -> list[datetime]:
    return [r[0] for r in await db.fetch('SELECT "timestamp" FROM "TripLocation" ORDER BY 1')]


# -- the native endpoint -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_far_timestamps_are_per_ping_rejections_the_good_pings_are_kept(client, db, fmt):
    far: list[Any] = [*FAR_STRINGS, *(FAR_INTS if fmt == "json" else PACKABLE_INTS)]
    body = batch(len(far) + 3)
    good = {0, 7, len(far) + 2}  # first, in the middle, last
    stamps = iter(far)
    for i, loc in enumerate(body["locations"]):
        if i not in good:
            loc["timestamp"] = next(stamps)
    status, resp = await post(client, body, fmt)
    assert status == 200, resp
    assert resp["accepted"] == 3
    assert [r["index"] for r in resp["rejected"]] == sorted(set(range(len(far) + 3)) - good)
    assert all("timestamp" in r["reason"] for r in resp["rejected"]), resp["rejected"]
    want = sorted(at(body["locations"][i]["timestamp"].replace("Z", "+00:00")) for i in good)
    assert await stored(db) == want


async def test_a_batch_of_only_far_timestamps_is_422(client, db):
    body = batch(4)
    for loc, stamp in zip(body["locations"], [*FAR_STRINGS[:2], 10**20, -(10**20)], strict=True):
        loc["timestamp"] = stamp
    status, resp = await post(client, body)
    assert status == 422 and resp["error"] == "no_valid_pings", resp
    assert [r["index"] for r in resp["rejected"]] == [0, 1, 2, 3]
    assert all("timestamp" in r["reason"] for r in resp["rejected"])
    assert await stored(db) == []


async def test_msgpack_timestamp_extension_out_of_range_and_sub_ms(client, db):
    """msgpack's timestamp extension (-1), 96-bit form: nanoseconds, then int64 seconds."""
    base = int((datetime.now(UTC) - timedelta(minutes=10)).timestamp())

    def ext(seconds: int, nanos: int) -> msgspec.msgpack.Ext:
        return msgspec.msgpack.Ext(-1, struct.pack(">Iq", nanos, seconds))

    body = batch(3)
    body["locations"][0]["timestamp"] = ext(base, 999_999_999)  # .999999999: never the next s
    body["locations"][1]["timestamp"] = ext(2**62, 0)  # far beyond year 9999
    body["locations"][2]["timestamp"] = ext(-(2**62), 0)
    status, resp = await post(client, body, "msgpack")
    assert status == 200 and resp["accepted"] == 1, resp
    assert [r["index"] for r in resp["rejected"]] == [1, 2]
    assert await stored(db) == [datetime.fromtimestamp(base, UTC) + timedelta(milliseconds=999)]


async def test_digits_below_the_millisecond_are_dropped_not_rounded(client, db):
    second = second_ago()
    first = batch(1)
    first["locations"][0]["timestamp"] = f"{second}.250Z"
    status, resp = await post(client, first)
    assert status == 200 and resp["accepted"] == 1, resp
    for again in (f"{second}.2509999Z", f"{second}.250999999999999999999Z", f"{second}.25Z"):
        body = batch(1)
        body["locations"][0]["timestamp"] = again
        status, resp = await post(client, body)
        assert status == 200 and (resp["accepted"], resp["duplicates"]) == (0, 1), (again, resp)
    assert await stored(db) == [at(f"{second}.250+00:00")]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_999_9999_stays_in_its_second(client, db, fmt):
    second = second_ago()
    body = batch(2)
    body["locations"][0]["timestamp"] = f"{second}.9999999Z"
    body["locations"][1]["timestamp"] = f"{second}.9999999+05:30"
    status, resp = await post(client, body, fmt)
    assert status == 200 and resp["accepted"] == 2, resp
    utc = at(f"{second}.999+00:00")
    assert await stored(db) == [utc - timedelta(hours=5, minutes=30), utc]


async def test_every_rfc3339_form_accepted_before_is_accepted_to_the_ms(client, db):
    utc = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)

    def wall(hours: int, minutes: int = 0) -> str:
        """The same instant on the clock of the offset, without the offset."""
        local = utc + timedelta(hours=hours, minutes=minutes)
        return local.strftime("%Y-%m-%dT%H:%M:%S")

    s = wall(0)
    forms = {  # the text, and the stored instant's milliseconds after ``utc``
        f"{s}Z": 0,
        f"{s[:10]}t{s[11:]}.001z": 1,
        f"{s[:10]} {s[11:]}.002Z": 2,
        f"{s}.003-00:00": 3,
        f"{wall(5, 30)}.0049+0530": 4,
        f"{wall(5, 30)}.005123+05:30": 5,
        f"{wall(-7)}.6-07:00": 600,
        f"{s}.07+00:00": 70,
        f"{wall(-23, -59)}.008-23:59": 8,
    }
    body = batch(len(forms))
    for loc, text in zip(body["locations"], forms, strict=True):
        loc["timestamp"] = text
    status, resp = await post(client, body)
    assert status == 200 and resp["accepted"] == len(forms), resp
    assert await stored(db) == sorted(utc + timedelta(milliseconds=ms) for ms in forms.values())


async def test_malformed_timestamps_are_400_naming_the_path(client, db):
    s = second_ago()
    for text in [
        s,  # no offset
        f"{s}.250",
        "yesterday",
        "",
        f"{s[:10]}",
        f"{s[:16]}Z",  # no seconds
        f"{s}.Z",  # a dot without digits
        f"{s},250Z",
        f"{s}.25 Z",
        f"{s}.2a5Z",
        f"{s}.250Z ",
        f" {s}.250Z",
        f"{s}.250ZZ",
        f"{s}.250\x00Z",
        f"{s}.250Z\x00",
        f"{s}.250+24:00",
        f"{s}.250+01:60",
        f"{s}.250+01",
        f"{s}.250+01:00:00",
        f"{s}.25\u0660Z",  # an Arabic-Indic zero
        f"{s[:10]}x{s[11:]}Z",
        s.replace("-", "", 2).replace(":", "") + "Z",  # ISO 8601 basic format
        # ISO 8601 forms fromisoformat takes, 24 characters ending in Z like the app's own
        "2026-W47-1T10:15:00.250Z",  # a week date
        "2026W47T10:15:00.250000Z",
        "2026-W47T10:15:00.25000Z",
        "20261123T10:15:00.25000Z",  # basic format
        "2026-11-23T101500.25000Z",
        "2026-11-23T10:15:00,250Z",
        "2026-11-23x10:15:00.250Z",
        "2026-11-23T10:Z\x00:00.250Z",  # fromisoformat ends the text at a NUL after a Z
        "2026-11-23T10:Z\x00:00.250+05:30",
        "2026-02-30T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:00:60Z",  # leap seconds: msgspec never took them
        "0000-02-30T00:00:00Z",  # the year 0000 is RFC 3339 (a ping's rejection), this day not
        "0000-12-31T23:59:59",
        "+2026-01-01T00:00:00Z",
        "12026-01-01T00:00:00Z",
    ]:
        body = batch(5)
        body["locations"][3]["timestamp"] = text
        status, resp = await post(client, body)
        assert status == 400 and resp["error"] == "invalid_payload", (text, resp)
        assert "$.locations[3].timestamp" in resp["detail"], (text, resp)
    body = batch(2)
    body["locations"][1]["timestamp"] = 1.5e12  # a float is not epoch ms
    status, resp = await post(client, body)
    assert status == 400 and "$.locations[1].timestamp" in resp["detail"], resp
    assert await stored(db) == []


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_the_year_0000_is_a_per_ping_rejection(client, db, fmt):
    """Valid RFC 3339 that datetime cannot hold (fromisoformat refuses the year 0): outside
    the accepted window like any far year, never a 400 for the whole batch."""
    year_0 = [
        "0000-12-31T23:59:59-05:00",  # 0001-01-01T04:59:59Z in UTC
        "0000-01-01T00:00:00.000Z",  # the driver app's form (the fast path)
        "0000-02-29 23:59:59.9999+23:59",  # a leap year; before the year 1 in UTC
    ]
    body = batch(len(year_0) + 1)
    for loc, text in zip(body["locations"][1:], year_0, strict=True):
        loc["timestamp"] = text
    status, resp = await post(client, body, fmt)
    assert status == 200 and resp["accepted"] == 1, resp
    assert [r["index"] for r in resp["rejected"]] == [1, 2, 3], resp
    assert all("timestamp outside the accepted window" in r["reason"] for r in resp["rejected"])
    assert await stored(db) == [at(body["locations"][0]["timestamp"].replace("Z", "+00:00"))]

    alone = batch(1)
    alone["locations"][0]["timestamp"] = "0000-01-01T00:00:00Z"
    status, resp = await post(client, alone, fmt)
    assert status == 422 and resp["error"] == "no_valid_pings", resp
    assert [r["index"] for r in resp["rejected"]] == [0], resp


def test_the_parser_reads_the_year_0000_in_utc() -> None:
    from ingest.validate import parse_rfc3339

    assert parse_rfc3339("0000-12-31T23:59:59.2509-05:00") == at("0001-01-01T04:59:59.250Z")
    assert parse_rfc3339("0000-12-31 23:59:59-0100").utcoffset() == timedelta(0)
    for earlier in ("0000-01-01T00:00:00Z", "0000-12-31T23:59:59.999z", "0000-12-31T23:59:59+0001"):
        with pytest.raises(OverflowError):  # before the year 1 in UTC
            parse_rfc3339(earlier)
    for malformed in ("0000-02-30T00:00:00Z", "0000-12-31T00:30Z", "0000-12-31T23:59:59"):
        with pytest.raises(ValueError):
            parse_rfc3339(malformed)


def test_the_parser_matches_msgspec_where_msgspec_was_exact() -> None:
    """Up to 6 fraction digits msgspec did not round: same value, truncated to the ms."""
    from ingest.validate import parse_rfc3339

    s = "2026-11-23T10:15:00"
    for text in [f"{s}Z", f"{s}.250999z", f"{s[:10]} {s[11:]}.1+0530", f"{s}.123456-23:59"]:
        old = msgspec.json.decode(msgspec.json.encode(text), type=datetime)
        new = parse_rfc3339(text)
        assert new == old.replace(microsecond=old.microsecond // 1000 * 1000), text
        assert new.utcoffset() == old.utcoffset()


# -- the history endpoint ----------------------------------------------------------------


async def test_history_from_and_to_out_of_range_are_400_naming_the_parameter(client):
    headers = auth("dispatcher", "disp_1")
    url = HISTORY.format("trip_1")
    for value in [
        "0001-01-01T00:00:00+01:00",  # beyond the years 1-9999 once in UTC
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00.999+23:59",
        "9999-12-31T23:59:59.9999999-23:59",
        "-62135596800001",  # a ms before 0001-01-01T00:00:00Z
        "253402300800000",  # 10000-01-01T00:00:00Z
        "100000000000000000000",
        "-100000000000000000000",
        "1" * 5000,  # more digits than int() parses
        "--5",
        "\u0663",  # an Arabic-Indic three
        "2026-01-01T00:00:00",
        "2026-W01-1T00:00:57.250Z",
        "2026-01-01T00:00:57.250+01:60",
    ]:
        for name in ("from", "to"):
            resp = await client.get(url, params={name: value}, headers=headers)
            assert resp.status == 400, (name, value, await resp.text())
            answer = await resp.json()
            assert answer["error"] == "invalid_query", answer
            assert answer["detail"].startswith(f"{name}:"), (name, value, answer)
    for cursor in ["djE6MTAwMDAwMDAwMDAwMDAwMDAwMDAwMA", "djE6LTEwMDAwMDAwMDAwMDAwMDAwMDAw", "x"]:
        resp = await client.get(url, params={"cursor": cursor}, headers=headers)
        assert resp.status == 400 and (await resp.json())["detail"].startswith("cursor:")
    for value in (
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00-23:59",
        "0000-12-31T23:59:59-05:00",  # 0001-01-01T04:59:59Z
        "9999-12-31T23:59:59.9999999Z",
        "9999-12-31T23:59:59.999+23:59",
        "-62135596800000",
        "253402300799999",
    ):
        resp = await client.get(url, params={"from": value, "to": value}, headers=headers)
        assert resp.status == 404, (value, await resp.text())  # representable: a valid range
    zeros = "-" + "0" * 4400 + "1"  # more digits than int() parses, but -1 ms
    resp = await client.get(url, params={"from": zeros}, headers=headers)
    assert resp.status == 404, await resp.text()


async def test_history_range_ends_are_cut_to_the_ms(client, db):
    second = second_ago()
    body = batch(1)
    body["locations"][0]["timestamp"] = f"{second}.250Z"
    assert (await post(client, body))[0] == 200
    url, headers = HISTORY.format("trip_1"), auth("dispatcher", "disp_1")

    async def count(**params: str) -> int:
        resp = await client.get(url, params=params, headers=headers)
        assert resp.status == 200, await resp.text()
        return len((await resp.json())["locations"])

    assert await count(**{"from": f"{second}.2509999Z"}) == 1  # from is inclusive: .250
    assert await count(to=f"{second}.2509999Z") == 0  # to is exclusive: .250
    assert await count(to=f"{second}.2510001Z") == 1


# -- the phone-app endpoints -------------------------------------------------------------


async def test_osmand_far_times_are_dropped_with_200(client, db):
    for value in [*FAR_STRINGS, *map(str, FAR_INTS), "1" + "0" * 400, "-1e300", "1e300"]:
        resp = await client.post(
            f"{OSMAND}?token={token()}&id=t1&lat=1&lon=2&timestamp={quote(value)}"
        )
        assert resp.status == 200, (value, await resp.text())
        answer = await resp.json()
        assert answer["accepted"] == 0 and "timestamp" in answer["rejected"][0]["reason"]
    for stamp in [10**20, -(10**20), 10**400, "9999-12-31T23:59:59-01:00"]:
        fix = {"timestamp": stamp, "coords": {"latitude": 1, "longitude": 2}}
        resp = await client.post(
            f"{OSMAND}?token={token()}",
            data=msgspec.json.encode({"device_id": "t1", "location": fix}),
            headers={"Content-Type": "application/json"},
        )
        assert resp.status == 200, (stamp, await resp.text())
        assert "timestamp" in (await resp.json())["rejected"][0]["reason"]
    assert await stored(db) == []


async def test_osmand_times_are_cut_to_the_ms(client, db):
    second = second_ago()
    epoch = int(at(f"{second}+00:00").timestamp())
    values = [
        f"{second}.2509999Z",
        f"{second}.250Z",
        f"{second}.250999999999+00:00",
        f"{epoch}.2509999",  # epoch seconds: cut, not rounded to .251 as float() * 1000 did
        f"{epoch}250.9999",  # epoch ms
    ]
    for value in values:
        resp = await client.post(
            f"{OSMAND}?token={token()}&id=t1&lat=1&lon=2&timestamp={quote(value)}"
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["accepted"] == (value == values[0]), (value, await resp.text())
    assert await stored(db) == [at(f"{second}.250+00:00")]


async def test_overland_far_times_are_dropped_the_rest_stored(client, db):
    second = second_ago()

    def feature(stamp: str) -> dict[str, Any]:
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [2.0, 1.0]},
            "properties": {"timestamp": stamp},
        }

    stamps = [f"{second}.9999999Z", *FAR_STRINGS, f"{second}.2509999+05:30"]
    resp = await client.post(
        OVERLAND, json={"locations": [feature(s) for s in stamps]}, headers=auth()
    )
    assert await resp.json() == {"result": "ok"}, await resp.text()
    assert resp.headers["X-Ingest-Rejected"] == str(len(FAR_STRINGS))
    utc = at(f"{second}+00:00")
    want = [utc - timedelta(hours=5, minutes=30) + timedelta(milliseconds=250)]
    assert await stored(db) == [*want, utc + timedelta(milliseconds=999)]


async def test_owntracks_far_times_are_dropped_with_an_answer(client, db):
    for tst in (1e300, -1e300, 10**20, -(10**20), 1e15):
        msg = {"_type": "location", "lat": 1.0, "lon": 2.0, "tst": tst, "topic": "o/u/phone"}
        resp = await client.post(
            OWNTRACKS,
            data=msgspec.json.encode(msg),
            headers={"Content-Type": "application/json", **auth()},
        )
        assert resp.status == 200, (tst, await resp.text())
        assert resp.headers["X-Ingest-Rejected"] == "1"
    assert await stored(db) == []


async def test_epoch_ms_at_the_window_edges_are_exact(client, db):
    """Integer epoch ms are stored exactly (no float rounding on the way)."""
    base = now_ms(-600) // 1000 * 1000
    body = batch(3)
    for i, ms in enumerate((base + 1, base + 999, base + 123_457)):
        body["locations"][i]["timestamp"] = ms
    status, resp = await post(client, body)
    assert status == 200 and resp["accepted"] == 3, resp
    base_dt = datetime.fromtimestamp(base // 1000, UTC)
    assert await stored(db) == [base_dt + timedelta(milliseconds=d) for d in (1, 999, 123_457)]


async def test_phone_app_iso_times_with_a_nul_are_400(client, db):
    """fromisoformat ends the text at a NUL after a 'Z': "10:Z<NUL>:00Z" would be 10:00Z."""
    day = second_ago()[:10]
    stamp = f"{day}T10:Z\x00:00.250Z"
    point = {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [2.0, 1.0]},
        "properties": {"timestamp": stamp},
    }
    resp = await client.post(OVERLAND, json={"locations": [point]}, headers=auth())
    assert resp.status == 400, await resp.text()
    assert "$.locations[0].properties.timestamp" in (await resp.json())["detail"]
    resp = await client.post(f"{OSMAND}?token={token()}&id=t1&lat=1&lon=2&timestamp={quote(stamp)}")
    assert resp.status == 400 and "timestamp" in (await resp.json())["detail"]
    assert await stored(db) == []
