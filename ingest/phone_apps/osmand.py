"""The OsmAnd protocol, as Traccar Client and the OsmAnd app speak it:
GET or POST /api/v1/ingest/osmand, one fix per request.

Two shapes: query (or form) fields `id, lat, lon, timestamp, speed, bearing, altitude,
accuracy, batt...` (speed in knots, as Traccar defines the protocol), or, from Traccar
Client 9 on, a JSON body `{device_id, location: {timestamp, coords: {...}, battery}}`
(speed in m/s). The apps keep a fix and send it again until they get a 2xx, so 200 is
answered only once it is committed; overload and outages get 503 with Retry-After.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import msgspec
from aiohttp import web
from multidict import MultiDict, MultiMapping

from .. import auth
from ..auth import Principal
from ..responses import json_response
from ..schema import DECODE_ERRORS, Location, PingAck, PingBatch
from ..submit import rate_limited, rate_wait, submit
from ..typedefs import SETTINGS
from .common import (
    KMH,
    KNOT,
    FormatError,
    Outcome,
    course,
    epoch_ms,
    failure,
    fold,
    identity,
    invalid,
    number,
    read_body,
    time_ms,
    unknown_if_negative,
)

PATH = "/api/v1/ingest/osmand"
# `speed` is knots in the OsmAnd protocol (Traccar Client sends knots); the OsmAnd app's
# {5} placeholder is m/s, so its URL adds speed_unit=mps.
_SPEED_UNITS = {"kn": KNOT, "knots": KNOT, "mps": 1.0, "m/s": 1.0, "kmh": KMH, "km/h": KMH}
# A form body: the apps send about 20 short fields (a few hundred bytes). parse_qsl costs
# ~0.6 us a field and ~0.5 us a '%' byte, run on the event loop: unbounded, a gzipped 1 KB
# (1 MiB inflated) took ~0.3-0.5 s. At most what the same fields could carry as a query
# (aiohttp's request line is at most 8190 bytes): a few ms at worst.
MAX_FORM_BYTES = 8192
MAX_FORM_FIELDS = 100

# -- query / form fields -----------------------------------------------------------------------

Params = MultiMapping[str]


def form_fields(body: bytes) -> list[tuple[str, str]]:
    """The fields of a form body, within MAX_FORM_BYTES and MAX_FORM_FIELDS."""
    if len(body) > MAX_FORM_BYTES:
        raise FormatError(
            f"form body: {len(body)} bytes; at most {MAX_FORM_BYTES} (an OsmAnd fix is a few"
            " short fields)"
        )
    try:
        return parse_qsl(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        )
    except ValueError:  # the only ValueError parse_qsl raises without strict_parsing
        raise FormatError(f"form body: more than {MAX_FORM_FIELDS} fields") from None


def _optional(params: Params, *names: str) -> float | None:
    for name in names:
        text = params.get(name)
        if text is not None and text.strip():
            return number(text, name)
    return None


def from_params(params: Params) -> tuple[str | None, str, Location]:
    """(device id, the field it came from, the fix) of a query or form request."""
    device, field = params.get("id"), "id"
    if not device:
        device, field = params.get("deviceid"), "deviceid"
    if "location" in params and "lat" not in params:  # location=<lat>,<lon>
        lat_text, _, lon_text = params["location"].partition(",")
        lat, lon = number(lat_text, "location"), number(lon_text, "location")
    else:
        for name in ("lat", "lon"):
            if not params.get(name, "").strip():
                raise FormatError(f"{name}: required")
        lat, lon = number(params["lat"], "lat"), number(params["lon"], "lon")
    stamp = params.get("timestamp", "")
    if not stamp.strip():  # deduplication needs the phone's time of the fix
        raise FormatError("timestamp: required")
    unit = params.get("speed_unit", "kn").strip().lower()
    if unit not in _SPEED_UNITS:
        raise FormatError(f"speed_unit: expected one of kn, mps, kmh, got {unit[:20]!r}")
    speed = unknown_if_negative(_optional(params, "speed"))
    location = Location(
        latitude=lat,
        longitude=lon,
        timestamp=time_ms(stamp, "timestamp"),
        accuracy=_optional(params, "accuracy"),
        speed=None if speed is None else speed * _SPEED_UNITS[unit],
        heading=course(_optional(params, "bearing", "heading")),
        altitude=_optional(params, "altitude"),
    )
    return device, field, location


# -- the JSON body of Traccar Client 9+ --------------------------------------------------------


# gc=False: never in a cycle, and a 1 MiB body's ~20k objects would run the collector.
class Coords(msgspec.Struct, gc=False):
    latitude: float
    longitude: float
    accuracy: float | None = None  # m
    speed: float | None = None  # m/s, -1 unknown
    heading: float | None = None  # degrees, -1 unknown
    altitude: float | None = None  # m


class JsonFix(msgspec.Struct, gc=False):
    """Also carries is_moving, odometer, event, battery {level, is_charging}, activity,
    extras: all ignored."""

    timestamp: str | int  # ISO 8601, or epoch seconds / milliseconds
    coords: Coords


class JsonBody(msgspec.Struct, gc=False):
    location: JsonFix | list[JsonFix]
    device_id: str | int | None = None


_json_body = msgspec.json.Decoder(JsonBody)


def from_json(body: bytes, limit: int) -> tuple[str | None, list[Location]]:
    doc = _json_body.decode(body)
    fixes = doc.location if isinstance(doc.location, list) else [doc.location]
    if not fixes:
        raise FormatError("$.location: at least one location")
    if len(fixes) > limit:  # before converting them: ~2 us each
        raise FormatError(f"$.location: at most {limit} locations per request")
    out = []
    for i, fix in enumerate(fixes):
        where = "$.location" + (f"[{i}]" if isinstance(doc.location, list) else "")
        c = fix.coords
        if isinstance(fix.timestamp, int):
            stamp = epoch_ms(fix.timestamp, f"{where}.timestamp")
        else:
            stamp = time_ms(fix.timestamp, f"{where}.timestamp")
        out.append(
            Location(
                latitude=c.latitude,
                longitude=c.longitude,
                timestamp=stamp,
                accuracy=c.accuracy,
                speed=unknown_if_negative(c.speed),
                heading=course(c.heading),
                altitude=c.altitude,
            )
        )
    device = None if doc.device_id is None else str(doc.device_id)
    return device, out


# -- the endpoint ------------------------------------------------------------------------------


def _is_json(request: web.Request, body: bytes) -> bool:
    return request.content_type == "application/json" or body.lstrip()[:1] == b"{"


def parse(request: web.Request, principal: Principal, body: bytes, limit: int) -> PingBatch:
    """The fix(es) of a request; ``limit`` is MAX_PINGS_PER_BATCH."""
    query = request.query
    if body and _is_json(request, body):
        device, locations = from_json(body, limit)
        field = "$.device_id"
        if device is None:  # the id may also come in the URL
            device, field = query.get("id") or query.get("deviceid"), "id"
    else:
        params: Params = query
        if body:  # form fields, as Traccar reads them: a query string in the body
            form = MultiDict(query)
            form.extend(form_fields(body))
            params = form
        device, field, location = from_params(params)
        locations = [location]
    trip, driver = identity(principal, device, field)
    return PingBatch(trip, driver, locations)


async def track(request: web.Request) -> web.Response:
    app = request.app
    principal = auth.authenticate_app(request)
    auth.require(principal, auth.POST_PINGS)
    if wait := rate_wait(request.app, principal):
        return rate_limited(wait)
    body = await read_body(request) if request.body_exists else b""
    if isinstance(body, web.Response):
        return body
    try:
        batch = parse(request, principal, body, app[SETTINGS].max_pings_per_batch)
    except (*DECODE_ERRORS, FormatError) as exc:
        return invalid(exc)
    out = fold([(batch, await submit(app, principal, batch, None))], "osmand")
    return answer(out)


def answer(out: Outcome) -> web.Response:
    """200 (the app's cue to forget the fix) with the native ack; else the native error."""
    if out.done:
        ack = PingAck(None, out.accepted, out.duplicates, out.rejected)
        return json_response(ack, headers=out.headers())
    return failure(out)
