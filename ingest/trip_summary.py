"""GET /api/v1/tracking/trips/{tripId}/summary: a trip's distance, duration, speeds and stops.

Computed while the trip's pings stream by in keyset pages (trip_pages), in constant memory:
the distance rule skips a point by comparing it with the last accepted one, which a window
function cannot express, and streaming measured faster than a recursive query
(docs/bench.md). The definitions are in docs/api.md#trip-summary.
"""

from __future__ import annotations

from datetime import datetime
from math import asin, cos, radians, sin, sqrt

import asyncpg
from aiohttp import web

from . import auth, trip_pages
from .reads import run_read
from .responses import error, json_response
from .schema import StoredLocation, TripStop, TripSummary
from .trip_pages import LAT, LON, SPEED, TS
from .typedefs import EXPORT_SLOTS, POOL

EARTH_RADIUS_M = 6_371_008.8  # the mean Earth radius (IUGG)
# A point implying more than this from the last accepted point is a jump, not a drive.
MAX_SPEED_MPS = 100.0  # 360 km/h
STOP_RADIUS_M = 30.0  # a stop stays this close to its first point ...
STOP_MIN_S = 120.0  # ... for at least this long
MAX_STOPS = 1000  # listed; more set stopsTruncated (a stop lasts 2 min: a 33-hour trip of stops)
_NO_STORE = {"Cache-Control": "no-store"}


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The great-circle distance between two points, in metres."""
    p1, p2 = radians(lat1), radians(lat2)
    h = sin((p2 - p1) / 2) ** 2 + cos(p1) * cos(p2) * sin(radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * asin(min(1.0, sqrt(h)))


class Summarizer:
    """Fed a trip's pings in time order, page by page; keeps a few numbers, not the pings."""

    def __init__(self) -> None:
        self.pings = 0
        self.driver = ""
        self.first: datetime | None = None
        self.last: datetime | None = None
        self.distance_m = 0.0
        self.max_speed: float | None = None
        self.stops: list[TripStop] = []
        self.stops_truncated = False
        self._anchor: asyncpg.Record | None = None  # the last accepted point
        self._run: asyncpg.Record | None = None  # the first point of the current run
        self._run_end: datetime | None = None  # the run's last point's time

    def add(self, rows: list[asyncpg.Record]) -> None:
        if not rows:
            return
        if self.first is None:
            self.first = rows[0][TS]
        self.pings += len(rows)
        self.last = rows[-1][TS]
        self.driver = rows[-1][trip_pages.DRIVER]
        top = self.max_speed
        anchor = self._anchor
        for row in rows:
            speed = row[SPEED]
            if speed is not None and (top is None or speed > top):
                top = speed
            if anchor is not None:
                d = haversine_m(anchor[LAT], anchor[LON], row[LAT], row[LON])
                # Timestamps of a trip are unique to the millisecond: dt > 0.
                if d > MAX_SPEED_MPS * (row[TS] - anchor[TS]).total_seconds():
                    continue  # an outlier: A -> X -> B counts A -> B
                self.distance_m += d
            anchor = row
            self._extend_run(row)
        self._anchor, self.max_speed = anchor, top

    def _extend_run(self, row: asyncpg.Record) -> None:
        run = self._run
        if run is not None and haversine_m(run[LAT], run[LON], row[LAT], row[LON]) <= (
            STOP_RADIUS_M
        ):
            self._run_end = row[TS]
            return
        self._close_run()
        self._run, self._run_end = row, row[TS]

    def _close_run(self) -> None:
        run, end = self._run, self._run_end
        if run is None or end is None:
            return
        duration = (end - run[TS]).total_seconds()
        if duration < STOP_MIN_S:
            return
        if len(self.stops) >= MAX_STOPS:
            self.stops_truncated = True
            return
        location = StoredLocation(run[LAT], run[LON], run[TS])
        self.stops.append(TripStop(run[TS], end, location, duration))

    def result(self, trip: str) -> TripSummary:
        """The summary once every page was added (at least one ping)."""
        assert self.first is not None and self.last is not None
        self._close_run()
        self._run = None
        duration = (self.last - self.first).total_seconds()
        return TripSummary(
            tripId=trip,
            driverId=self.driver,
            start=self.first,
            end=self.last,
            pings=self.pings,
            distanceM=round(self.distance_m, 1),
            durationS=duration,
            maxSpeed=self.max_speed,
            avgSpeed=round(self.distance_m / duration, 3) if duration > 0 else None,
            stops=self.stops,
            stopsTruncated=self.stops_truncated,
        )


async def summary(request: web.Request) -> web.Response:
    p = auth.authenticate(request)
    trip = request.match_info["tripId"]
    slots = request.app[EXPORT_SLOTS]
    if not slots.try_acquire(p.org):
        return slots.refusal(p.org)
    driver = auth.driver_filter(p)

    async def summarize(pool: asyncpg.Pool) -> Summarizer:
        s = Summarizer()
        async for rows in trip_pages.pages(pool, p.org, trip, driver):
            s.add(rows)
        return s

    try:
        # As history: a replica failing under the read, or without the trip yet, hands the
        # whole summary to the primary.
        s, on_replica = await run_read(request.app, summarize)
        if not s.pings and on_replica:
            s = await summarize(request.app[POOL])
    finally:
        slots.release(p.org)
    if not s.pings:
        return error(404, "not_found", f"no trip {trip!r}", headers=_NO_STORE)
    return json_response(s.result(trip), headers=_NO_STORE)
