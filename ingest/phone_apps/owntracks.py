"""OwnTracks in HTTP mode: POST /api/v1/ingest/owntracks, one JSON message per request.

OwnTracks drops a message once the endpoint answers anything, even a 5xx; only a request
that gets no HTTP answer at all stays queued on the phone and is sent again. So `[]` (200)
is sent only once the point is committed. When it cannot be committed now, the request is
held instead: through the driver's rate limit (at most MAX_HELD_PER_DRIVER requests of a
driver at once) and a full buffer for up to ACK_TIMEOUT_MS, then for the commit for up to
ACK_TIMEOUT_MS more; if that fails too (database away, shutting down, too many held), the
connection is closed without an answer.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from aiohttp import web

from .. import auth
from ..auth import Principal
from ..schema import DECODE_ERRORS, Location, PingBatch
from ..submit import Submitted, submit
from ..typedefs import RATE_LIMITER, SETTINGS
from .common import (
    KMH,
    FormatError,
    Outcome,
    course,
    epoch_ms,
    failure,
    fold,
    identity,
    invalid,
    read_body,
    unknown_if_negative,
)

log = logging.getLogger("ingest.phone_apps")

PATH = "/api/v1/ingest/owntracks"
# OwnTracks reads a 200 body as a list of messages for the phone (friends' cards and
# locations); we have none to send.
_NOTHING = b"[]"
# Requests of one driver held for its rate limit at once; more are hung up on at once. A
# phone sends its queue one message after another, so this leaves room for a few phones
# sharing a token, while one token cannot hold more than this many connections busy.
MAX_HELD_PER_DRIVER = 4


class _Envelope(msgspec.Struct):
    type: str = msgspec.field(name="_type")


class OwnTracksLocation(msgspec.Struct):
    """_type=location. Other fields (batt, bs, conn, t, m, SSID, inregions...) are ignored."""

    lat: float
    lon: float
    tst: float  # epoch seconds of the fix
    acc: float | None = None  # m
    alt: float | None = None  # m
    vel: float | None = None  # km/h
    cog: float | None = None  # degrees
    tid: str | None = None
    topic: str | None = None  # iOS: "owntracks/<user>/<device>"


_envelope = msgspec.json.Decoder(_Envelope)
_location = msgspec.json.Decoder(OwnTracksLocation)


def device_of(request: web.Request, loc: OwnTracksLocation) -> tuple[str | None, str]:
    """The device name (X-Limit-D header, ?d=, or the topic's last level) and where it came from.

    The two-letter tid is not used: it is display initials, shared by many phones.
    """
    if device := request.headers.get("X-Limit-D"):
        return device, "X-Limit-D"
    if device := request.query.get("d"):
        return device, "d"
    parts = (loc.topic or "").split("/")
    if len(parts) >= 3 and parts[2]:
        return parts[2], "$.topic"
    return None, "device"


def to_batch(request: web.Request, principal: Principal, loc: OwnTracksLocation) -> PingBatch:
    device, field = device_of(request, loc)
    trip, driver = identity(principal, device, field)
    location = Location(
        latitude=loc.lat,
        longitude=loc.lon,
        timestamp=epoch_ms(loc.tst, "$.tst"),
        accuracy=loc.acc,
        speed=None if (v := unknown_if_negative(loc.vel)) is None else v * KMH,
        heading=course(loc.cog),
        altitude=loc.alt,
    )
    return PingBatch(trip, driver, [location])


def hang_up(request: web.Request, status: int, reason: str) -> web.Response:
    """Close the connection without an answer, so that OwnTracks keeps the message and sends
    it again later. The response returned is never sent; only the request metrics see it."""
    log.warning("owntracks_hung_up", extra={"reason": reason})
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=status)


def _take_rate(request: web.Request, principal: Principal, deadline: float) -> float | None:
    """The seconds to wait for the driver's rate limit (one sleep: the bucket reserves the
    token, no polling), or None if that is past the deadline or MAX_HELD_PER_DRIVER of the
    driver's requests already wait (so one token cannot pin the pod's connections)."""
    limiter = request.app[RATE_LIMITER]
    room = min(deadline - asyncio.get_running_loop().time(), MAX_HELD_PER_DRIVER / limiter.rate)
    return limiter.reserve((principal.org, principal.sub), room)  # submit.rate_wait's key


async def _submit_holding(
    app: web.Application, principal: Principal, batch: PingBatch, deadline: float
) -> Submitted:
    """submit(), trying again while the buffer is full, until the deadline."""
    loop = asyncio.get_running_loop()
    delay = 0.05
    while True:
        result = await submit(app, principal, batch, None)
        full = result.status == 503 and (result.error or ("",))[0] == "overloaded"
        if not full or loop.time() + delay > deadline:
            return result
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def post_message(request: web.Request) -> web.Response:
    app = request.app
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app[SETTINGS].ack_timeout_ms / 1000
    principal = auth.authenticate_app(request, auth.BASIC)
    auth.require(principal, auth.POST_PINGS)
    wait = _take_rate(request, principal, deadline)
    if wait is None:  # the phone keeps the message and sends it again later
        return hang_up(request, 429, "rate_limited")
    if wait:
        await asyncio.sleep(wait)
    body = await read_body(request)
    if isinstance(body, web.Response):
        return body
    if not body.strip():  # a friend was deleted: OwnTracks posts an empty message
        return _answer(ignored=1)
    try:
        kind = _envelope.decode(body).type
        if kind == "encrypted":
            raise FormatError("$._type: encrypted messages are not supported; turn off encryption")
        if kind != "location":  # lwt, transition, waypoint(s), card, status, steps, ...
            return _answer(ignored=1)
        batch = to_batch(request, principal, _location.decode(body))
    except (*DECODE_ERRORS, FormatError) as exc:
        return invalid(exc)

    result = await _submit_holding(app, principal, batch, deadline)
    out = fold([(batch, result)], "owntracks")
    if out.done:
        return _answer(out)
    if out.status == 503:
        return hang_up(request, 503, out.error[0])
    return failure(out)  # 500: PostgreSQL refused the row; resending would not help


def _answer(out: Outcome | None = None, ignored: int = 0) -> web.Response:
    headers = (out or Outcome()).headers(ignored)
    return web.Response(body=_NOTHING, content_type="application/json", headers=headers)
