"""Overland: POST /api/v1/ingest/overland, a batch of GeoJSON Point features.

Overland deletes a batch from the phone only when the answer is `{"result": "ok"}` and
sends it again at the next interval otherwise; so "ok" is answered once every point is
committed, or dropped for good (out of range; another device id's trip refused by the flush
while the rest was stored: common.fold), and anything else (503 + Retry-After, 500, 4xx)
makes it retry.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec
from aiohttp import web

from .. import auth
from ..auth import Principal
from ..schema import DECODE_ERRORS, Location
from ..submit import rate_limited, rate_wait
from ..typedefs import SETTINGS
from .common import (
    FormatError,
    Outcome,
    batches,
    course,
    failure,
    identity,
    invalid,
    iso_ms,
    read_body,
    submit_all,
    unknown_if_negative,
)

PATH = "/api/v1/ingest/overland"
_OK = b'{"result":"ok"}'


# gc=False: never in a cycle, and 1 MiB of tiny features is ~100k objects: with the
# collector running over them, decoding took ~5x as long.
class Point(msgspec.Struct, gc=False):
    type: str
    coordinates: list[float]  # GeoJSON order: [longitude, latitude(, altitude)]


class Properties(msgspec.Struct, gc=False):
    """Also: vertical_accuracy, motion, battery_state, battery_level, wifi, pauses,
    activity, desired_accuracy, deferred, significant_change, locations_in_payload...:
    all ignored."""

    timestamp: str | None = None  # ISO 8601
    speed: float | None = None  # m/s, -1 unknown
    course: float | None = None  # degrees, -1 unknown (sent by newer versions)
    horizontal_accuracy: float | None = None  # m
    altitude: float | None = None  # m
    device_id: str | None = None  # "" unless set in the app
    action: str | None = None  # set on app events and visits, which are not GPS fixes


class Feature(msgspec.Struct, gc=False):
    properties: Properties
    geometry: Point | None = None


class Body(msgspec.Struct, gc=False):
    """`current` (the newest point, sent again later in a batch) and `trip` are ignored."""

    locations: list[Feature]


_body = msgspec.json.Decoder(Body)


def to_location(f: Feature, where: str) -> Location:
    p, coordinates = f.properties, f.geometry.coordinates  # type: ignore[union-attr]
    if len(coordinates) < 2:
        raise FormatError(f"{where}.geometry.coordinates: expected [longitude, latitude]")
    if p.timestamp is None:
        raise FormatError(f"{where}.properties.timestamp: required")
    try:
        stamp = iso_ms(p.timestamp.strip())
    except ValueError:
        raise FormatError(
            f"{where}.properties.timestamp: expected an ISO 8601 time, got {p.timestamp[:40]!r}"
        ) from None
    altitude = p.altitude
    if altitude is None and len(coordinates) > 2:
        altitude = coordinates[2]
    return Location(
        latitude=coordinates[1],
        longitude=coordinates[0],
        timestamp=stamp,
        accuracy=p.horizontal_accuracy,
        speed=unknown_if_negative(p.speed),
        heading=course(p.course),
        altitude=altitude,
    )


def group(
    principal: Principal, body: Body, max_features: int
) -> tuple[dict[tuple[str, str], list[Location]], int]:
    """The fixes by (trip, driver), and how many features were not fixes.

    At most ``max_features`` features, ignored ones included (a 1 MiB body holds ~58k
    `{"properties":{}}`): MAX_PINGS_PER_BATCH x MAX_TRIPS_PER_REQUEST, the most fixes one
    request may be split into: ten times what MAX_BODY_BYTES holds of the app's features
    (about 1000), so only a request the app never sends is refused (400).
    """
    if len(body.locations) > max_features:
        raise FormatError(
            f"$.locations: {len(body.locations)} features in one request; at most"
            f" {max_features} (MAX_PINGS_PER_BATCH x MAX_TRIPS_PER_REQUEST)"
        )
    groups: dict[tuple[str, str], list[Location]] = defaultdict(list)
    ignored = 0
    for i, f in enumerate(body.locations):
        where = f"$.locations[{i}]"
        if f.properties.action is not None or f.geometry is None or f.geometry.type != "Point":
            ignored += 1
            continue
        key = identity(principal, f.properties.device_id, f"{where}.properties.device_id")
        groups[key].append(to_location(f, where))
    return groups, ignored


async def post_batch(request: web.Request) -> web.Response:
    app = request.app
    principal = auth.authenticate_app(request)
    auth.require(principal, auth.POST_PINGS)
    if wait := rate_wait(request.app, principal):
        return rate_limited(wait)
    body = await read_body(request)
    if isinstance(body, web.Response):
        return body
    settings = app[SETTINGS]
    try:
        most = settings.max_pings_per_batch * settings.max_trips_per_request
        groups, ignored = group(principal, _body.decode(body), most)
        parts = batches(groups, settings.max_pings_per_batch, settings.max_trips_per_request)
    except (*DECODE_ERRORS, FormatError) as exc:
        return invalid(exc)
    return answer(await submit_all(app, principal, parts, "overland"), ignored)


def answer(out: Outcome, ignored: int) -> web.Response:
    if out.done:
        return web.Response(body=_OK, content_type="application/json", headers=out.headers(ignored))
    return failure(out)
