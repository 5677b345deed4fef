"""Property tests: whatever JSON (or msgpack) arrives, the decoder and the validator raise only
their documented errors, and the running service answers with a documented status, never 500.

Hypothesis runs in a worker thread where the test drives the app on the event loop, so the
app under test is the production factory on a real socket with PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.schema import Location, PingBatch, json_batch_decoder, msgpack_batch_decoder
from ingest.validate import BatchError, batch_id_of, parse_rfc3339, to_records

from .conftest import auth, token

pytestmark = pytest.mark.slow

PING = "/api/v1/tracking/ping"
SKEW_S, AGE_DAYS = 300, 31

# -- strategies --------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _now_ms() -> int:
    return int(time.time() * 1000)


numbers = (
    st.floats()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([1e308, -1e308, 5e-324, 90.0, -180.0, 360.0])
)


def _digits(lo: int, hi: int, width: int = 2) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).map(lambda n: f"{n:0{width}d}")


# RFC 3339 look-alikes: every field a little beyond its range, every separator and offset
# form msgspec took or not, any number of fraction digits; then maybe one character changed.
_offsets = st.one_of(
    st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+01", "+01:00:00", " Z"]),
    st.builds(
        "{}{}{}{}".format, st.sampled_from("+-"), _digits(0, 25), st.sampled_from([":", ""]),
        _digits(0, 61),
    ),
)  # fmt: skip
_years = st.sampled_from(["0001", "9999", "2026", "0000"]) | _digits(0, 9999, 4)
_rfc3339ish = st.builds(
    "{}-{}-{}{}{}:{}:{}{}{}".format,
    _years, _digits(0, 13), _digits(0, 32), st.sampled_from("Tt x"), _digits(0, 24),
    _digits(0, 60), _digits(0, 61),
    st.just("") | st.text("0123456789", max_size=12).map(lambda d: "." + d),
    _offsets,
)  # fmt: skip
# The driver app's form, which validate.to_records reads on a fast path of its own.
_app_form = st.builds(
    "{}-{}-{}T{}:{}:{}.{}Z".format,
    _years, _digits(0, 13), _digits(0, 32), _digits(0, 24), _digits(0, 60), _digits(0, 61),
    _digits(0, 999, 3),
)  # fmt: skip
# The ends of the representable range, where an offset moves the time to year 0 or 10000.
_edges = st.builds(
    "{}{}{}".format,
    st.sampled_from(["0001-01-01T00:00:00", "9999-12-31T23:59:59", "0001-01-01 23:59:59"]),
    st.just("") | st.text("0123456789", min_size=1, max_size=10).map(lambda d: "." + d),
    _offsets,
)
_odd_chars = st.sampled_from([*"0159Zz+-:.T t,W\x00\u0663\u00b2", "\ud7ff", "\U0001f600", "Z\x00"])


def _mutate(text: str, at: int, char: str, how: str) -> str:
    at %= len(text) + 1
    if how == "replace":
        return text[:at] + char + text[at + len(char) :]
    if how == "insert":
        return text[:at] + char + text[at:]
    return text[:at] + text[at + 1 :]


timestamp_texts = st.one_of(
    _rfc3339ish,
    st.builds(
        _mutate, _rfc3339ish, st.integers(0, 40), _odd_chars,
        st.sampled_from(["replace", "insert", "delete"]),
    ),
    _app_form,
    st.builds(_mutate, _app_form, st.integers(0, 23), _odd_chars, st.just("replace")),
    _edges,
    st.text(max_size=30),
)  # fmt: skip
far_ints = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**20, -(10**20), 2**63, -(2**63), 2**64 - 1, 10**400, -(10**400)]),
)
timestamps = st.one_of(
    st.integers(-(2**70), 2**70),
    timestamp_texts,
    st.integers(-40 * 86_400_000, 600_000).map(lambda d: _now_ms() + d),
    st.datetimes(timezones=st.timezones() | st.just(UTC)).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),  # no offset: a 400
    st.timedeltas(timedelta(days=-40), timedelta(minutes=10)).map(
        lambda d: (datetime.now(UTC) + d).isoformat().replace("+00:00", "Z")
    ),
    st.text(max_size=30),
)
ids = st.one_of(
    st.sampled_from(["drv_1", "trip_1", "b-1"]),
    st.text(max_size=70),
    st.text(st.characters(codec="ascii"), min_size=60, max_size=66),
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-formed value, sometimes any JSON value in its place."""
    return st.one_of(strategy, strategy, strategy, json_values)


locations = st.fixed_dictionaries(
    {"latitude": maybe(numbers), "longitude": maybe(numbers), "timestamp": maybe(timestamps)},
    optional={
        "accuracy": maybe(numbers | st.none()),
        "speed": maybe(numbers | st.none()),
        "heading": maybe(numbers | st.none()),
        "altitude": maybe(numbers | st.none()),
        "batchId": maybe(ids | st.none()),
        "battery": json_values,
    },
)
batches = st.fixed_dictionaries(
    {
        "tripId": maybe(ids),
        "driverId": maybe(st.just("drv_1") | ids),
        "locations": maybe(st.lists(locations, max_size=6)),
    },
    optional={"batchId": maybe(ids | st.none()), "appVersion": json_values},
)
# Batches that pass: the storage path (COPY, dedup, replay) gets its share of the examples.
fresh_ms = st.integers(-30 * 86_400_000, 60_000).map(lambda d: _now_ms() + d)
valid_locations = st.fixed_dictionaries(
    {
        "latitude": st.floats(-90, 90),
        "longitude": st.floats(-180, 180),
        "timestamp": fresh_ms
        | fresh_ms.map(lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat()),
    },
    optional={
        "accuracy": st.floats(0, 1e308),
        "heading": st.floats(0, 359.9),
        "altitude": st.floats(-1e308, 1e308),
    },
)
valid_batches = st.fixed_dictionaries(
    {
        "tripId": st.sampled_from(["trip_1", "trip_2", "trip_\u00e9"]),
        "driverId": st.just("drv_1"),
        "locations": st.lists(valid_locations, min_size=1, max_size=6),
    },
    optional={"batchId": st.sampled_from(["b1", "b2"]) | st.uuids().map(str)},
)
documents = valid_batches | batches | batches | json_values


def encode(doc: Any, fmt: str, ascii_only: bool) -> bytes | None:
    """The document in the wire format; None if that format cannot carry it."""
    if fmt == "json":
        return json.dumps(doc, allow_nan=True, ensure_ascii=ascii_only).encode()
    try:
        return msgspec.msgpack.encode(doc)
    except OverflowError:  # an integer beyond 64 bits
        return None


DECODERS = {"json": json_batch_decoder, "msgpack": msgpack_batch_decoder}


# -- the decoder and the validator -------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(doc=documents, fmt=st.sampled_from(["json", "msgpack"]), ascii_only=st.booleans())
def test_decoder_and_validator_raise_only_documented_errors(doc, fmt, ascii_only):
    raw = encode(doc, fmt, ascii_only)
    if raw is None:
        return
    try:
        batch = DECODERS[fmt].decode(raw)
    except msgspec.ValidationError as exc:
        assert str(exc)  # the 400's detail
        return
    except msgspec.DecodeError as exc:  # the encoder wrote valid JSON but for these literals
        text = raw.decode() if fmt == "json" else ""
        assert "NaN" in text or "Infinity" in text, exc
        return
    try:
        batch_id = batch_id_of(batch)
    except BatchError as exc:
        assert str(exc).startswith("$.locations[")
        return
    now = datetime.now(UTC)
    try:
        records, rejected = to_records(batch, "org_1", batch_id, now, SKEW_S, AGE_DAYS)
    except BatchError as exc:  # a string that is not an RFC 3339 time with an offset
        assert re.match(r"\$\.locations\[\d+\]\.timestamp: ", str(exc)), exc
        return
    assert len(records) + len(rejected) == len(batch.locations)
    assert [r.index for r in rejected] == sorted({r.index for r in rejected})
    assert all(r.reason for r in rejected)
    lo, hi = now - timedelta(days=AGE_DAYS), now + timedelta(seconds=SKEW_S)
    for rec in records:
        trip, driver, org, lat, lon, acc, speed, heading, alt, ts, bid = rec
        assert (trip, driver, org, bid) == (batch.tripId, batch.driverId, "org_1", batch_id)
        assert -90 <= lat <= 90 and -180 <= lon <= 180
        assert acc is None or 0 <= acc < float("inf")
        assert speed is None or 0 <= speed < float("inf")
        assert heading is None or 0 <= heading < 360
        assert alt is None or abs(alt) < float("inf")
        assert ts.tzinfo is not None and ts.microsecond % 1000 == 0
        assert lo - timedelta(milliseconds=1) <= ts <= hi


# msgspec rounds beyond the microsecond: compare with its reading of the text cut there.
_BEYOND_US = re.compile(r"(?<=:[0-9]{2}\.[0-9]{6})[0-9]+")


@settings(max_examples=3000, deadline=None)
@given(text=timestamp_texts)
def test_timestamps_are_read_as_msgspec_did_but_cut_to_the_ms(text):
    """parse_rfc3339 and to_records (with its fast path) accept exactly what msgspec's
    datetime took, with the same instant and offset, the digits below the ms dropped. Except
    the year 0000, which msgspec refused (a 400 for the batch) and the contract makes that
    ping's rejection: read in UTC where it is the year 1, else out of range (OverflowError)."""
    if text.startswith("0000"):
        batch = PingBatch("trip_1", "drv_1", [Location(1.0, 2.0, text)])
        try:
            year_0 = parse_rfc3339(text)
        except ValueError:  # malformed: the batch's 400
            with pytest.raises(BatchError):
                to_records(batch, "org_1", None, datetime.now(UTC), SKEW_S, 10**5)
            return
        except OverflowError:  # before the year 1 in UTC
            pass
        else:
            assert year_0.year == 1 and year_0.utcoffset() == timedelta(0), (text, year_0)
        records, rejected = to_records(batch, "org_1", None, datetime.now(UTC), SKEW_S, 10**5)
        assert not records and len(rejected) == 1, text
        return
    try:
        old: datetime | None = msgspec.json.decode(
            msgspec.json.encode(_BEYOND_US.sub("", text)), type=datetime
        )
    except msgspec.ValidationError:
        old = None
    if old is not None and old.tzinfo is None:
        old = None  # msgspec took it, but Meta(tz=True) refused it: a 400 too
    try:
        new = parse_rfc3339(text)
    except ValueError:
        assert old is None, (text, old)
    else:
        assert old is not None, (text, new)
        assert new == old.replace(microsecond=old.microsecond // 1000 * 1000), text
        assert new.utcoffset() == old.utcoffset(), text
    batch = PingBatch("trip_1", "drv_1", [Location(1.0, 2.0, text)])
    try:
        records, _ = to_records(batch, "org_1", None, datetime.now(UTC), SKEW_S, 10**5)
    except BatchError:
        assert old is None, (text, old)
    else:
        assert old is not None, text
        if records:
            assert records[0][-2] == new.astimezone(UTC) and records[0][-2].tzinfo is UTC


# -- through the running service -------------------------------------------------------


def in_thread(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on the test's loop from Hypothesis' worker thread."""

    def call(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    return call


ERRORS = {
    400: {"invalid_payload"},
    403: {"forbidden"},
    413: {"payload_too_large"},
    422: {"no_valid_pings"},
}


async def test_the_service_never_answers_500(client):
    call = in_thread(asyncio.get_running_loop())
    headers = auth()
    seen: Counter[int] = Counter()

    async def post(raw: bytes, content_type: str, gz: bool) -> tuple[int, Any]:
        h = {**headers, "Content-Type": content_type}
        if gz:
            raw, h["Content-Encoding"] = gzip.compress(raw), "gzip"
        resp = await client.post(PING, data=raw, headers=h)
        return resp.status, await resp.json()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        doc=documents, fmt=st.sampled_from(["json", "msgpack"]), ascii_only=st.booleans(),
        gz=st.booleans(),
    )  # fmt: skip
    def prop(doc: Any, fmt: str, ascii_only: bool, gz: bool) -> None:
        raw = encode(doc, fmt, ascii_only)
        if raw is None:
            return
        status, body = call(post(raw, f"application/{fmt}", gz))
        seen[status] += 1
        if status == 200:
            stored = body["accepted"] + body["duplicates"]
            assert stored + len(body["rejected"]) == len(doc["locations"])
            return
        assert status in ERRORS, (status, body)
        assert body["error"] in ERRORS[status] and isinstance(body["detail"], str), body

    await asyncio.to_thread(prop)
    assert seen[200] and seen[400], seen  # both the storage and the rejection paths ran


async def test_no_timestamp_of_any_form_or_size_gives_a_500(client):
    """The native endpoint (JSON, msgpack), the history's from/to, OsmAnd and Overland."""
    call = in_thread(asyncio.get_running_loop())
    headers = auth()
    reader = auth("dispatcher", "disp_1")
    counter = iter(range(10**9))
    seen: Counter[tuple[str, int]] = Counter()

    async def exchange(stamp: str | int) -> None:
        good = {"latitude": 1.0, "longitude": 2.0, "timestamp": _now_ms() - next(counter)}
        doc = {"tripId": "trip_1", "driverId": "drv_1",
               "locations": [{"latitude": 1.0, "longitude": 2.0, "timestamp": stamp}, good]}  # fmt: skip
        for fmt in ("json", "msgpack"):
            raw = encode(doc, fmt, True)
            if raw is None:
                continue
            resp = await client.post(
                PING, data=raw, headers={**headers, "Content-Type": f"application/{fmt}"}
            )
            body = await resp.json()
            seen[(fmt, resp.status)] += 1
            if resp.status == 200:
                assert body["accepted"] + body["duplicates"] == 2 - len(body["rejected"])
                assert [r["index"] for r in body["rejected"]] in ([], [0]), body
            else:
                assert resp.status == 400 and body["error"] == "invalid_payload", body
                assert "$.locations[0].timestamp" in body["detail"], body
        text = str(stamp)
        if text.strip():
            for name in ("from", "to"):
                resp = await client.get(
                    "/api/v1/tracking/trips/trip_1/locations", params={name: text}, headers=reader
                )
                seen[(name, resp.status)] += 1
                assert resp.status in (200, 400), (text, resp.status, await resp.text())
                if resp.status == 400:
                    assert (await resp.json())["detail"].startswith(f"{name}:")
            resp = await client.post(
                "/api/v1/ingest/osmand",
                params={"id": "trip_1", "lat": "1", "lon": "2", "timestamp": text},
                headers=headers,
            )
            seen[("osmand", resp.status)] += 1
            assert resp.status in (200, 400), (text, resp.status, await resp.text())
        if isinstance(stamp, str):
            point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [2.0, 1.0]},
                     "properties": {"timestamp": stamp, "device_id": "trip_1"}}  # fmt: skip
            resp = await client.post(
                "/api/v1/ingest/overland", json={"locations": [point]}, headers=headers
            )
            seen[("overland", resp.status)] += 1
            assert resp.status in (200, 400), (text, resp.status, await resp.text())

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stamp=timestamp_texts | far_ints)
    def prop(stamp: str | int) -> None:
        call(exchange(stamp))

    await asyncio.to_thread(prop)
    assert seen[("json", 200)] and seen[("json", 400)] and seen[("from", 400)], seen


# -- the WebSocket -----------------------------------------------------------------------

trip_lists = st.lists(maybe(ids), max_size=5)
client_messages = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["subscribe", "unsubscribe"])},
        optional={"trips": maybe(trip_lists), "fleet": maybe(st.booleans())},
    ),
    st.fixed_dictionaries({"type": json_values}),
    json_values,
)
LIVE_ERRORS = {"invalid_message", "too_many_subscriptions", "snapshot_unavailable"}


async def test_the_websocket_answers_any_message_and_stays_open(make_client):
    client = await make_client(ws_max_messages_per_s=100_000, ws_max_subscriptions=50)
    ws = await client.ws_connect(f"/api/v1/live?access_token={token('dispatcher', 'disp_1')}")
    call = in_thread(asyncio.get_running_loop())
    counter = iter(range(10**9))
    seen: Counter[str] = Counter()

    async def exchange(frame: str) -> list[dict[str, Any]]:
        """Send the frame, then a marker message; return what came before the marker's error."""
        marker = f"marker-{next(counter)}"
        await ws.send_str(frame)
        await ws.send_str(json.dumps({"type": marker}))
        got = []
        while True:
            msg = json.loads((await ws.receive(timeout=10)).data)
            if msg.get("type") == "error" and marker in msg.get("detail", ""):
                return got
            got.append(msg)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(msg=client_messages)
    def prop(msg: Any) -> None:
        for answer in call(exchange(json.dumps(msg, allow_nan=True))):
            seen[answer.get("error", answer["type"])] += 1
            assert answer["type"] in ("subscribed", "snapshot", "error"), answer
            if answer["type"] == "error":
                assert answer["error"] in LIVE_ERRORS and answer["detail"], answer

    await asyncio.to_thread(prop)
    assert seen["subscribed"] and seen["invalid_message"], seen
    assert not ws.closed
    await ws.close()
