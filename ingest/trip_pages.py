"""A whole trip read in keyset pages, and the per-pod bound on such reads (docs/api.md).

Summaries and exports read every stored ping of a trip, a million of them for a long one.
They never load it whole, and never hold a pool connection between pages (a slow or gone
client would pin it; ingest shares the pool): each page is one query on read_pool(), served
by the ("orgId", "tripId", "timestamp") unique index, and is consumed before the next one
is fetched.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta

import asyncpg
from aiohttp import web

from .reads import run_read
from .schema import storable_id
from .typedefs import POOL

PAGE_ROWS = 1000  # about 0.6 MB while decoded; 5000 were no faster (docs/bench.md)
# Open ends of a range, inside PostgreSQL's timestamptz range.
FIRST = datetime(1970, 1, 1, tzinfo=UTC)
LAST = datetime(9999, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Column indexes of a page's rows.
DRIVER, LAT, LON, TS, SPEED, ALTITUDE = range(6)


_PAGE_SQL = """
SELECT "driverId", "latitude", "longitude", "timestamp", "speed", "altitude"
FROM "TripLocation"
WHERE "orgId" = $1 AND "tripId" = $2 AND ($3::text IS NULL OR "driverId" = $3)
  AND "timestamp" >= $4 AND "timestamp" < $5
ORDER BY "timestamp" LIMIT $6
"""


async def pages(
    pool: asyncpg.Pool,
    org: str,
    trip: str,
    driver: str | None,
    start: datetime = FIRST,
    end: datetime = LAST,
    page_rows: int = PAGE_ROWS,
) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The trip's pings in [start, end) in time order, a page at a time; ``driver`` (a
    driver token's) keeps only that driver's rows. The connection goes back to the pool
    after each page, before the caller sees it."""
    if not storable_id(trip):
        return
    lower = start
    while True:
        rows: list[asyncpg.Record] = await pool.fetch(
            _PAGE_SQL, org, trip, driver, lower, end, page_rows
        )
        if not rows:
            return
        yield rows
        if len(rows) < page_rows:
            return
        # Timestamps are stored to the millisecond: the next one is at least this.
        lower = rows[-1][TS] + _MS


Pages = AsyncGenerator[list[asyncpg.Record], None]


async def open_pages(
    app: web.Application, org: str, trip: str, driver: str | None,
    start: datetime = FIRST, end: datetime = LAST,
) -> tuple[list[asyncpg.Record] | None, Pages]:  # fmt: skip
    """The first page (None: no such pings) and the generator of the rest, read on the
    replica when it can serve, as history is: a replica that fails under the first page, or
    has not replayed the trip yet, hands the read to the primary."""

    async def first(pool: asyncpg.Pool) -> tuple[list[asyncpg.Record] | None, Pages]:
        rest = pages(pool, org, trip, driver, start, end)
        try:
            return await anext(rest, None), rest
        except BaseException:
            await rest.aclose()
            raise

    (rows, rest), on_replica = await run_read(app, first)
    if rows is None and on_replica:
        await rest.aclose()
        rows, rest = await first(app[POOL])
    return rows, rest


class Slots:
    """At most ``limit`` whole-trip reads (summaries and exports) at once in this pod:
    beyond it, 503 at once rather than a queue, so they cannot starve ingest's connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def try_acquire(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1
