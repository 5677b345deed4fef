"""Property tests: whatever JSON (or msgpack) arrives, the decoder and the validator raise only
their documented errors, and the running service answers with a documented status, never 500.

Hypothesis runs in a worker thread where the test drives the app on the event loop, so the
app under test is the production factory on a real socket with PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.schema import json_batch_decoder, msgpack_batch_decoder
from ingest.validate import BatchError, batch_id_of, to_records

from .conftest import auth, token

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
timestamps = st.one_of(
    st.integers(-(2**70), 2**70),
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
    records, rejected = to_records(batch, "org_1", batch_id, now, SKEW_S, AGE_DAYS)
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
