"""PUT /api/v1/tracking/trips/{tripId}/driver: a dispatcher hands a trip over to a driver.

A trip belongs to the driver whose ping first created it (store.py claims it in the flush
that stores that ping). From the handover's commit on, every flush on every pod checks the
new owner, so only the new driver's pings are stored.
"""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from . import auth, metrics
from .body import read_body
from .responses import error, json_response
from .schema import DECODE_ERRORS, Handover, TripOwner, storable_id
from .typedefs import FLUSHER, POOL, SETTINGS

log = logging.getLogger("ingest.trips")

_HAND_OVER = """
UPDATE "IngestTrip" SET "driverId" = $3, "handedOverAt" = now()
WHERE "orgId" = $1 AND "tripId" = $2
RETURNING "driverId"
"""


_decoder = msgspec.json.Decoder(Handover)


async def hand_over(request: web.Request) -> web.Response:
    app = request.app
    principal = auth.authenticate(request)
    auth.require(principal, auth.HAND_OVER)
    trip = request.match_info["tripId"]
    body = await read_body(request, app[SETTINGS].max_body_bytes)
    if isinstance(body, web.Response):
        return body
    try:
        new_driver = _decoder.decode(body).driverId
    except DECODE_ERRORS as exc:
        return error(400, "invalid_payload", str(exc))
    row = None
    if storable_id(trip):
        row = await app[POOL].fetchrow(_HAND_OVER, principal.org, trip, new_driver)
    if row is None:
        return error(404, "not_found", f"no trip {trip!r}")
    if FLUSHER in app:
        app[FLUSHER].owners.forget(principal.org, trip)
    metrics.TRIP_HANDOVERS.inc()
    log.info("trip_handed_over", extra={"trip": trip, "driver": new_driver})
    return json_response(TripOwner(trip, new_driver))
