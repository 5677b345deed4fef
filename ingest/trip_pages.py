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

from .reads import rows_readable, run_read
from .responses import retry_later
from .schema import storable_id
from .typedefs import POOL

PAGE_ROWS = 1000  # about 0.6 MB while decoded; 5000 were no faster (docs/bench.md)
# Open ends of a range, inside PostgreSQL's timestamptz range.
FIRST = datetime(1970, 1, 1, tzinfo=UTC)
LAST = datetime(9999, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Column indexes of a page's rows.
DRIVER, LAT, LON, TS, SPEED, ALTITUDE = range(6)


# Keyed by whether a driver token reads (reads.rows_readable): $1 org, $2 trip, $3 driver.
_PAGE_SQL = {
    by_driver: f"""
SELECT "driverId", "latitude", "longitude", "timestamp", "speed", "altitude"
FROM "TripLocation"
WHERE "orgId" = $1 AND "tripId" = $2 AND {rows_readable("$1", "$2", "$3", by_driver=by_driver)}
  AND "timestamp" >= $4 AND "timestamp" < $5
ORDER BY "timestamp" LIMIT $6
"""
    for by_driver in (False, True)
}


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
            _PAGE_SQL[driver is not None], org, trip, driver, lower, end, page_rows
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
    """At most ``limit`` whole-trip reads (summaries and exports) at once in this pod, and at
    most ``per_org`` of them for one org: beyond either, 503 at once rather than a queue, so
    they cannot starve ingest's connections, and one org's downloads (a driver's slow ones
    included) always leave a slot to the others. ``per_org`` is all but one slot; with a
    single slot (EXPORT_MAX_CONCURRENT=1) there is nothing to share and an org may hold it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.per_org = max(1, limit - 1)
        self.used = 0
        self._held: dict[str, int] = {}  # org -> slots it holds; orgs holding none are dropped

    def held(self, org: str) -> int:
        return self._held.get(org, 0)

    def try_acquire(self, org: str) -> bool:
        held = self._held.get(org, 0)
        if self.used >= self.limit or held >= self.per_org:
            return False
        self.used += 1
        self._held[org] = held + 1
        return True

    def release(self, org: str) -> None:
        self.used -= 1
        held = self._held[org] - 1
        if held:
            self._held[org] = held
        else:
            del self._held[org]

    def refusal(self, org: str) -> web.Response:
        """The 503 for a ``try_acquire(org)`` that failed: which limit was reached."""
        if self.used >= self.limit:
            detail = "every export slot of this pod is busy (EXPORT_MAX_CONCURRENT)"
        else:
            detail = (
                f"this org already runs {self.held(org)} of this pod's summaries and exports,"
                " as many as one org may (all but one of EXPORT_MAX_CONCURRENT)"
            )
        return retry_later("too_many_exports", detail)
