"""Read API: a trip's latest location (Redis, else PostgreSQL) and its history (keyset pages)."""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timedelta

import asyncpg
import msgspec
from aiohttp import web

from . import auth, metrics, trip_export
from .query import INTEGER, MAX_TIME, MIN_TIME, BadQuery, parse_limit, parse_time
from .reads import rows_readable, run_read
from .responses import error, json_response
from .schema import LatestLocation, LocationPage, StoredLocation, storable_id
from .typedefs import LIVE, POOL

log = logging.getLogger("ingest.read")

DEFAULT_PAGE = 500
MAX_PAGE = 5000
_NO_STORE = {"Cache-Control": "no-store"}
_LOC_COLS = '"latitude", "longitude", "timestamp", "accuracy", "speed", "heading", "altitude"'
# Each keyed by whether a driver token reads (reads.rows_readable): $1 trip, $2 org, $3 driver.
_LATEST_SQL = {
    by_driver: f"""
SELECT "driverId", {_LOC_COLS} FROM "TripLocation"
WHERE "tripId" = $1 AND "orgId" = $2 AND {rows_readable("$2", "$1", "$3", by_driver=by_driver)}
ORDER BY "timestamp" DESC LIMIT 1
"""
    for by_driver in (False, True)
}
_PAGE_SQL = {
    by_driver: f"""
SELECT {_LOC_COLS} FROM "TripLocation"
WHERE "tripId" = $1 AND "orgId" = $2 AND {rows_readable("$2", "$1", "$3", by_driver=by_driver)}
  AND "timestamp" >= $4 AND "timestamp" < $5 AND "timestamp" > $6
ORDER BY "timestamp" LIMIT $7
"""
    for by_driver in (False, True)
}
_EXISTS_SQL = {
    by_driver: f"""
SELECT 1 FROM "TripLocation"
WHERE "tripId" = $1 AND "orgId" = $2 AND {rows_readable("$2", "$1", "$3", by_driver=by_driver)}
LIMIT 1
"""
    for by_driver in (False, True)
}
_MIN, _MAX = MIN_TIME, MAX_TIME
_latest_decoder = msgspec.json.Decoder(LatestLocation)


def _not_found(trip: str) -> web.Response:
    return error(404, "not_found", f"no trip {trip!r}", headers=_NO_STORE)


async def latest(request: web.Request) -> web.Response:
    p = auth.authenticate(request)
    driver = auth.driver_filter(p)
    trip = request.match_info["tripId"]
    if not storable_id(trip):
        return _not_found(trip)
    try:
        value = await request.app[LIVE].latest(p.org, trip)
    except Exception as exc:
        metrics.REDIS_ERRORS.labels("latest").inc()
        log.warning("latest_redis_failed", extra={"error": repr(exc)})
        value = None
    if value is not None and (driver is None or _latest_decoder.decode(value).driverId == driver):
        return web.Response(body=value, content_type="application/json", headers=_NO_STORE)
    # The primary, not read_pool: after a Redis miss the answer must include the last commit.
    row = await request.app[POOL].fetchrow(_LATEST_SQL[driver is not None], trip, p.org, driver)
    if row is None:
        return _not_found(trip)
    loc = StoredLocation(*row[1:])
    return json_response(LatestLocation(trip, row[0], loc), headers=_NO_STORE)


def encode_cursor(ts: datetime) -> str:
    us = (ts - _MIN) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"v1:{us}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> datetime:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, us = raw.split(":")
        if version != "v1" or not INTEGER.fullmatch(us) or len(us) > 30:
            raise ValueError(version)
        return _MIN + timedelta(microseconds=int(us))
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise BadQuery("cursor: not a cursor this service issued") from None


async def history(request: web.Request) -> web.StreamResponse:
    p = auth.authenticate(request)
    trip = request.match_info["tripId"]
    q = request.query
    fmt = q.get("format") or "json"
    if fmt not in trip_export.FORMATS:
        return error(400, "invalid_query", "format: must be json, geojson or gpx")
    try:
        start = parse_time(q["from"], "from") if q.get("from") else _MIN
        end = parse_time(q["to"], "to") if q.get("to") else _MAX
        after = decode_cursor(q["cursor"]) if q.get("cursor") else _MIN - timedelta(days=1)
        limit = parse_limit(q, DEFAULT_PAGE, MAX_PAGE)
    except BadQuery as exc:
        return error(400, "invalid_query", str(exc))
    if not storable_id(trip):
        return _not_found(trip)
    if fmt != "json":  # the whole trip (or from/to), streamed; limit and cursor do not apply
        return await trip_export.export(request, p, trip, fmt, start, end)
    # (an empty cursor is a first page too: it must not skip the look for the trip)
    driver, first_page = auth.driver_filter(p), not q.get("cursor")
    by_driver = driver is not None

    async def page(pool: asyncpg.Pool) -> list[asyncpg.Record] | None:
        """The page's rows; None when there is no such trip (asked on a first page only)."""
        rows: list[asyncpg.Record] = await pool.fetch(
            _PAGE_SQL[by_driver], trip, p.org, driver, start, end, after, limit + 1
        )
        if (
            not rows
            and first_page
            and await pool.fetchval(_EXISTS_SQL[by_driver], trip, p.org, driver) is None
        ):
            return None
        return rows

    found, on_replica = await run_read(request.app, page)
    if found is None and on_replica:  # a trip just started may not have reached the replica
        found = await page(request.app[POOL])
    if found is None:
        return _not_found(trip)
    rows = found
    more = len(rows) > limit
    rows = rows[:limit]
    locs = [StoredLocation(*r) for r in rows]
    cursor = encode_cursor(rows[-1]["timestamp"]) if more else None
    return json_response(LocationPage(trip, locs, cursor), headers=_NO_STORE)
