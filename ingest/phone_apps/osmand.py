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

# -- query / form fields -----------------------------------------------------------------------

Params = MultiMapping[str]


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


class Coords(msgspec.Struct):
    latitude: float
    longitude: float
    accuracy: float | None = None  # m
    speed: float | None = None  # m/s, -1 unknown
    heading: float | None = None  # degrees, -1 unknown
    altitude: float | None = None  # m


class JsonFix(msgspec.Struct):
    """Also carries is_moving, odometer, event, battery {level, is_charging}, activity,
    extras: all ignored."""

    timestamp: str | int  # ISO 8601, or epoch seconds / milliseconds
    coords: Coords


class JsonBody(msgspec.Struct):
    location: JsonFix | list[JsonFix]
    device_id: str | int | None = None


_json_body = msgspec.json.Decoder(JsonBody)


def from_json(body: bytes) -> tuple[str | None, list[Location]]:
    doc = _json_body.decode(body)
    fixes = doc.location if isinstance(doc.location, list) else [doc.location]
    if not fixes:
        raise FormatError("$.location: at least one location")
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


def parse(request: web.Request, principal: Principal, body: bytes) -> PingBatch:
    query = request.query
    if body and _is_json(request, body):
        device, locations = from_json(body)
        field = "$.device_id"
        if device is None:  # the id may also come in the URL
            device, field = query.get("id") or query.get("deviceid"), "id"
    else:
        params: Params = query
        if body:  # form fields, as Traccar reads them: a query string in the body
            form = MultiDict(query)
            form.extend(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
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
        batch = parse(request, principal, body)
    except (*DECODE_ERRORS, FormatError) as exc:
        return invalid(exc)

    limit = app[SETTINGS].max_pings_per_batch
    if len(batch.locations) > limit:
        return invalid(FormatError(f"$.location: at most {limit} locations per request"))
    out = fold([await submit(app, principal, batch, None)], "osmand")
    return answer(out)


def answer(out: Outcome) -> web.Response:
    """200 (the app's cue to forget the fix) with the native ack; else the native error."""
    if out.done:
        ack = PingAck(None, out.accepted, out.duplicates, out.rejected)
        return json_response(ack, headers=out.headers())
    return failure(out)
