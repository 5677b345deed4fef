"""Geofences of an org: create, list, read, delete, and the events of one fence.

Dispatcher tokens only; another org's fence answers 404, as an unknown one. Every create and
delete bumps the org's fence version in the same transaction (row-locked), so evaluations
(geofence_events.py) see a fence set no older than the one before, and a delete waits for an
evaluation that is using the fence. A fence's events go with it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import asyncpg
import msgspec
from aiohttp import web

from . import auth, maintenance, metrics
from .body import read_body
from .geofence_shapes import Circle, GeometryError, geojson, parse_shape, vertices
from .query import MAX_TIME, MIN_TIME, BadQuery, parse_limit, parse_time
from .responses import error, json_response, retry_later
from .schema import (
    DECODE_ERRORS,
    Geofence,
    GeofenceEvent,
    GeofenceEvents,
    GeofenceIn,
    GeofenceList,
    StoredLocation,
    storable_id,
)  # fmt: skip
from .typedefs import GEOFENCE_CHANGES_LIMITER, POOL, SETTINGS

log = logging.getLogger("ingest.geofences")

DEFAULT_EVENTS = 1000
MAX_EVENTS = 5000
_NO_STORE = {"Cache-Control": "no-store"}
# A cursor before every event.
_BEFORE_ALL = (MIN_TIME - timedelta(days=1), "", "")
_decoder = msgspec.json.Decoder(GeofenceIn)
_json = msgspec.json.Encoder()
# Polygon validation (up to GEOFENCE_MAX_VERTICES * ~10 us of pure Python) runs here, not on
# the event loop. It holds the GIL, but the loop takes it back within the switch interval
# (5 ms) whenever it has work, so it keeps at least half the core; one thread, so that a burst
# of creates queues behind it instead of crowding the loop out with more threads.
_VALIDATION = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geofence-validation")
# ... and at most this many of one org's validations queued or running there: beyond, 503
# geofence_busy, so that one org's burst of creates never holds the thread from the others.
VALIDATIONS_PER_ORG = 2
_validating: dict[str, int] = {}
_COUNT = 'SELECT "fences" FROM "GeofenceOrg" WHERE "orgId" = $1'

# The org's row, made if need be, then locked: creates and deletes of one org run one at a
# time, each checks what is committed, and each changes the version with the counts.
_ORG_ROW = """
INSERT INTO "GeofenceOrg" ("orgId", "version", "fences", "vertices") VALUES ($1, 0, 0, 0)
ON CONFLICT ("orgId") DO NOTHING
"""
# Evaluations lock it (FOR SHARE) before inserting events that refer to a fence: the same order
# as a delete's, so no deadlock, and a delete waits for an evaluation using the fence.
_LOCK_ORG = 'SELECT "fences", "vertices" FROM "GeofenceOrg" WHERE "orgId" = $1 FOR UPDATE'
# A create or delete waits at most this long (and at most half FLUSH_TIMEOUT_S, the command
# timeout) for a lock: evaluations hold the org row for a transaction of about 0.5 s at most
# (geofence_events._TRANSACTION_WALK_S), but several pods' may follow one another. Then 503
# with Retry-After, never the command timeout's 500.
CHANGE_LOCK_WAIT_S = 2.0
_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, true)"
_CHANGE = """
UPDATE "GeofenceOrg"
SET "version" = "version" + 1, "fences" = "fences" + $2, "vertices" = "vertices" + $3
WHERE "orgId" = $1
"""
_INSERT = """
INSERT INTO "Geofence" ("orgId", "id", "name", "geometry", "radiusM", "vertices")
VALUES ($1, $2, $3, $4::jsonb, $5, $6) RETURNING "createdAt"
"""
_COLS = '"id", "name", "geometry"::text, "createdAt", "radiusM"'
_LIST = f'SELECT {_COLS} FROM "Geofence" WHERE "orgId" = $1 ORDER BY "createdAt", "id"'
_ONE = f'SELECT {_COLS} FROM "Geofence" WHERE "orgId" = $1 AND "id" = $2'
_VERTICES = 'SELECT "vertices" FROM "Geofence" WHERE "orgId" = $1 AND "id" = $2'
_DELETE = 'DELETE FROM "Geofence" WHERE "orgId" = $1 AND "id" = $2'
_EVENTS = """
SELECT "geofenceId", "event", "tripId", "driverId", "timestamp", "latitude", "longitude",
       "accuracy", "speed", "heading", "altitude"
FROM "GeofenceEvent"
WHERE "orgId" = $1 AND "geofenceId" = $2 AND "timestamp" >= $3 AND "timestamp" < $4
  AND ("timestamp", "tripId", "event") > ($5, $6, $7)
ORDER BY "timestamp", "tripId", "event" LIMIT $8
"""


class _Cursor(msgspec.Struct, array_like=True):
    us: int  # microseconds since MIN_TIME
    trip: str
    event: str


def _not_found(fence_id: str) -> web.Response:
    return error(404, "not_found", f"no geofence {fence_id!r}", headers=_NO_STORE)


def _fence(row: asyncpg.Record) -> Geofence:
    return Geofence(row[0], row[1], msgspec.Raw(row[2].encode()), row[3], row[4])


def _too_many(detail: str) -> web.Response:
    return error(409, "too_many_geofences", detail)


async def _bound_lock_wait(conn: asyncpg.Connection, request: web.Request) -> None:
    wait_s = min(CHANGE_LOCK_WAIT_S, request.app[SETTINGS].flush_timeout_s / 2)
    await conn.execute(_LOCK_TIMEOUT, f"{max(1, round(wait_s * 1000))}ms")


def _busy_is_503(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A lock not had within the bound (or a statement timed out): 503 and Retry-After."""
    operation = handler.__name__

    @functools.wraps(handler)
    async def bounded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except (asyncpg.LockNotAvailableError, TimeoutError):
            metrics.GEOFENCE_CHANGES_BUSY.labels(operation).inc()
            return retry_later(
                "geofence_busy", "the org's geofences are being evaluated or changed; retry"
            )

    return bounded


def _dispatcher(request: web.Request) -> auth.Principal:
    principal = auth.authenticate(request)
    auth.require(principal, auth.DISPATCH)
    return principal


def _change_limited(request: web.Request, org: str) -> web.Response | None:
    """Spend one of the org's fence changes: None, or the 429 saying when one is free."""
    wait = request.app[GEOFENCE_CHANGES_LIMITER].take(org)
    if not wait:
        return None
    metrics.RATE_LIMITED.inc()
    return error(
        429, "rate_limited", "too many geofence changes for this org (GEOFENCE_CHANGES_PER_S)",
        headers={"Retry-After": str(math.ceil(wait))},
    )  # fmt: skip


@_busy_is_503
async def create(request: web.Request) -> web.Response:
    p = _dispatcher(request)
    if limited := _change_limited(request, p.org):
        return limited
    settings = request.app[SETTINGS]
    body = await read_body(request, settings.max_body_bytes)
    if isinstance(body, web.Response):
        return body
    try:
        fence = _decoder.decode(body)
    except DECODE_ERRORS as exc:
        return error(400, "invalid_payload", str(exc))
    # An org at its limit is told so before its polygon costs the validation thread anything.
    count = await request.app[POOL].fetchval(_COUNT, p.org)
    if count is not None and count >= settings.geofence_max_per_org:
        return _too_many(f"the org has {count} geofences, the most GEOFENCE_MAX_PER_ORG allows")
    if _validating.get(p.org, 0) >= VALIDATIONS_PER_ORG:
        metrics.GEOFENCE_CHANGES_BUSY.labels("create").inc()
        return retry_later(
            "geofence_busy", "this org's other geofences are being validated; retry", 1
        )
    _validating[p.org] = _validating.get(p.org, 0) + 1
    try:
        shape = await asyncio.get_running_loop().run_in_executor(
            _VALIDATION, parse_shape, fence.geometry, fence.radiusM, settings.geofence_max_vertices
        )
    except GeometryError as exc:
        return error(400, "invalid_payload", str(exc))
    finally:
        if held := _validating[p.org] - 1:
            _validating[p.org] = held
        else:
            del _validating[p.org]
    fence_id = "gf_" + secrets.token_urlsafe(12)
    radius = shape.radius_m if isinstance(shape, Circle) else None
    # Only what the shape is: a member the client added (a NUL, a megabyte of junk) is not kept.
    geometry = _json.encode(geojson(shape))
    size = vertices(shape)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await _bound_lock_wait(conn, request)
        await conn.execute(_ORG_ROW, p.org)
        count, total = await conn.fetchrow(_LOCK_ORG, p.org)
        # Refused before any change: the version stays, so no pod reloads the org's fences.
        if count >= settings.geofence_max_per_org:
            return _too_many(f"the org has {count} geofences, the most GEOFENCE_MAX_PER_ORG allows")
        if total + size > settings.geofence_max_vertices_per_org:
            return _too_many(
                f"the org's geofences hold {total} positions; this one would take them past"
                f" GEOFENCE_MAX_VERTICES_PER_ORG ({settings.geofence_max_vertices_per_org})"
            )
        created = await conn.fetchval(
            _INSERT, p.org, fence_id, fence.name, geometry.decode(), radius, size
        )
        await conn.execute(_CHANGE, p.org, 1, size)
    metrics.GEOFENCE_CHANGES.labels("create").inc()
    log.info("geofence_created", extra={"geofence": fence_id})
    out = Geofence(fence_id, fence.name, msgspec.Raw(geometry), created, radius)
    return json_response(out, 201, headers={"Location": f"/api/v1/geofences/{fence_id}"})


async def list_all(request: web.Request) -> web.Response:
    p = _dispatcher(request)
    rows = await request.app[POOL].fetch(_LIST, p.org)
    return json_response(GeofenceList([_fence(r) for r in rows]), headers=_NO_STORE)


async def get_one(request: web.Request) -> web.Response:
    p = _dispatcher(request)
    fence_id = request.match_info["id"]
    if not storable_id(fence_id):
        return _not_found(fence_id)
    row = await request.app[POOL].fetchrow(_ONE, p.org, fence_id)
    if row is None:
        return _not_found(fence_id)
    return json_response(_fence(row), headers=_NO_STORE)


@_busy_is_503
async def delete(request: web.Request) -> web.Response:
    p = _dispatcher(request)
    fence_id = request.match_info["id"]
    if not storable_id(fence_id):
        return _not_found(fence_id)
    if limited := _change_limited(request, p.org):
        return limited
    async with request.app[POOL].acquire() as conn:
        # A busy fence's events first, a chunk per transaction: the DELETE's cascade would take
        # them in one statement, past the command timeout (a fence that could never be deleted).
        # The cascade then meets only those stored meanwhile. Scoped by org like the rest.
        await maintenance.delete_fence_events(conn, p.org, fence_id)
        async with conn.transaction():
            await _bound_lock_wait(conn, request)
            # An unknown id changes nothing (no version bump: every pod would reload the org's set).
            await conn.execute(_LOCK_ORG, p.org)
            size = await conn.fetchval(_VERTICES, p.org, fence_id)
            if size is None:
                return _not_found(fence_id)
            await conn.execute(_DELETE, p.org, fence_id)
            await conn.execute(_CHANGE, p.org, -1, -size)
    metrics.GEOFENCE_CHANGES.labels("delete").inc()
    log.info("geofence_deleted", extra={"geofence": fence_id})
    return web.Response(status=204)


def _encode_cursor(ts: datetime, trip: str, event: str) -> str:
    raw = msgspec.msgpack.encode(_Cursor((ts - MIN_TIME) // timedelta(microseconds=1), trip, event))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        c = msgspec.msgpack.decode(raw, type=_Cursor)
        if c.event not in ("enter", "exit") or not storable_id(c.trip):
            raise ValueError(c.event)
        return MIN_TIME + timedelta(microseconds=c.us), c.trip, c.event
    except (ValueError, msgspec.DecodeError, OverflowError):
        raise BadQuery("cursor: not a cursor this service issued") from None


async def events(request: web.Request) -> web.Response:
    p = _dispatcher(request)
    fence_id = request.match_info["id"]
    q = request.query
    try:
        start = parse_time(q["from"], "from") if q.get("from") else MIN_TIME
        end = parse_time(q["to"], "to") if q.get("to") else MAX_TIME
        after = _decode_cursor(q["cursor"]) if q.get("cursor") else _BEFORE_ALL
        limit = parse_limit(q, DEFAULT_EVENTS, MAX_EVENTS)
    except BadQuery as exc:
        return error(400, "invalid_query", str(exc))
    if not storable_id(fence_id):
        return _not_found(fence_id)
    pool = request.app[POOL]
    rows = await pool.fetch(_EVENTS, p.org, fence_id, start, end, *after, limit + 1)
    if not rows and await pool.fetchval(_VERTICES, p.org, fence_id) is None:
        return _not_found(fence_id)
    more = len(rows) > limit
    rows = rows[:limit]
    out = [
        GeofenceEvent(
            r[0], r[1], r[2], r[3], r[4], StoredLocation(r[5], r[6], r[4], r[7], r[8], r[9], r[10])
        )
        for r in rows
    ]
    cursor = _encode_cursor(rows[-1][4], rows[-1][2], rows[-1][1]) if more else None
    return json_response(GeofenceEvents(out, cursor), headers=_NO_STORE)
