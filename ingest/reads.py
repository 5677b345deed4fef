"""Where a read-only query goes: the replica (DATABASE_READ_URL) while it is up and close
enough behind the primary, else the primary.

A monitor task measures the replica about once a second on a connection of its own (busy
reads cannot starve it): reachable or not, and how far its replay lags. ``read_pool`` only
reads what the monitor last measured, so choosing costs no query. Without DATABASE_READ_URL
there is no monitor and no second pool: every read uses the primary, as before.

Writes, and reads that must see the latest commit (the latest location after a Redis miss,
trip owners, handover, migrations, maintenance, the latest repair), use app[POOL] directly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from aiohttp import web

from . import metrics
from .typedefs import POOL, READ_REPLICA

log = logging.getLogger("ingest.reads")

T = TypeVar("T")


# Handovers are dated from migration 006 on: a trip made before it may have been handed over
# undated (NULL), so it is read as one handed over (NULL here: no trip is taken for sure).
_HANDOVERS_KNOWN_FROM = (
    'SELECT "appliedAt" FROM "_ingest_migrations" WHERE "name" = \'006_trip_handed_over_at.sql\''
)


def rows_readable(org: str, trip: str, driver: str, *, by_driver: bool) -> str:
    """SQL: which of a trip's "TripLocation" rows a token may read, given the statement's
    parameters for the org, trip and (NULL for a dispatcher) driver. A driver reads only its
    own pings. Only a trip handed over holds pings of a driver other than its owner (a post
    to another driver's trip is refused whole), so on any other trip that is not the
    driver's, the one-time filter below answers at once: without it, PostgreSQL would walk
    every ping of a colleague's trip, one heap fetch each, to find none of this driver's
    (still so for a trip older than handovers' dates: _HANDOVERS_KNOWN_FROM)."""
    if not by_driver:
        return f'({driver}::text IS NULL OR "driverId" = {driver})'
    return (
        f'"driverId" = {driver} AND NOT EXISTS (SELECT 1 FROM "IngestTrip" i WHERE'
        f' i."orgId" = {org} AND i."tripId" = {trip} AND i."driverId" <> {driver}'
        f' AND i."handedOverAt" IS NULL AND i."createdAt" > ({_HANDOVERS_KNOWN_FROM}))'
    )


# application_name of each kind of connection, as pg_stat_activity shows it.
PRIMARY_APP_NAME = "ingest"
REPLICA_APP_NAME = "ingest-read"
MONITOR_APP_NAME = "ingest-read-monitor"

MONITOR_INTERVAL_S = 1.0
_MEASURE_TIMEOUT_S = 2.0  # a replica that does not answer by then counts as down
# A measurement older than this (the monitor stuck or dead) counts as down too.
_STALE_S = 3 * (MONITOR_INTERVAL_S + _MEASURE_TIMEOUT_S)

# Seconds of replay lag, seen from the replica. Caught up (everything received is replayed,
# and the WAL receiver streams): 0, however long the primary has been idle. Else the age of
# the last replayed commit (NULL if none yet: unknown). Not in recovery (a promoted replica,
# or the primary itself): 0. pg_stat_wal_receiver's status is NULL to a role without
# pg_read_all_stats (granted by pg_monitor): `hidden` tells, and lag then reads as growing.
_MEASURE = """
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0.0
    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
         AND (SELECT status FROM pg_stat_wal_receiver) = 'streaming' THEN 0.0
    ELSE greatest(0.0, extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::float8
END AS lag,
coalesce((SELECT status IS NULL FROM pg_stat_wal_receiver), false) AS hidden
"""

# A replica failing under a read (connection refused or lost, shutting down, too slow):
# the read is run again on the primary.
REPLICA_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)


class ReadReplica:
    """The replica's pool and what the monitor last measured of the replica."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, max_lag_s: float) -> None:
        self.pool = pool
        self.dsn = dsn
        self.max_lag_s = max_lag_s
        self.up = False
        self.lag_s = math.inf  # unknown until measured
        self.measured_at = float("-inf")
        self._conn: asyncpg.Connection | None = None
        self._warned_hidden = False
        self._down_logged = False
        metrics.READ_REPLICA_UP.set(0)
        metrics.READ_REPLICA_LAG.set(math.nan)

    def fallback_reason(self) -> str | None:
        """None while reads may use the replica; else why not: ``down`` or ``lag``."""
        if not self.up or time.monotonic() - self.measured_at > _STALE_S:
            return "down"
        return "lag" if self.lag_s > self.max_lag_s else None

    async def run(self) -> None:
        """Measure the replica every MONITOR_INTERVAL_S until cancelled."""
        try:
            while True:
                await self.measure()
                await asyncio.sleep(MONITOR_INTERVAL_S)
        finally:
            self._drop()

    async def measure(self) -> None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=_MEASURE_TIMEOUT_S,
                    server_settings={"application_name": MONITOR_APP_NAME},
                )  # fmt: skip
            row = await self._conn.fetchrow(_MEASURE, timeout=_MEASURE_TIMEOUT_S)
            assert row is not None
        except Exception as exc:
            self._drop()
            self.mark_down(exc)
            return
        lag = math.inf if row["lag"] is None else float(row["lag"])
        if row["hidden"] and not self._warned_hidden:
            self._warned_hidden = True
            log.warning("replica_lag_hidden", extra={"hint": "GRANT pg_monitor TO the read role"})
        if not self.up:  # back (or first seen): connections pooled before are not trusted
            await self.pool.expire_connections()
            log.info("replica_up", extra={"lag_s": lag})
        self.up, self.lag_s, self.measured_at = True, lag, time.monotonic()
        self._down_logged = False
        metrics.READ_REPLICA_UP.set(1)
        metrics.READ_REPLICA_LAG.set(lag if math.isfinite(lag) else math.nan)

    def mark_down(self, exc: BaseException) -> None:
        """The replica failed (the monitor's check, or a read): reads go to the primary until
        the monitor reaches it again."""
        if not self._down_logged:  # once per outage
            self._down_logged = True
            log.warning("replica_down", extra={"error": repr(exc)})
        self.up, self.lag_s = False, math.inf
        metrics.READ_REPLICA_UP.set(0)
        metrics.READ_REPLICA_LAG.set(math.nan)

    async def close(self) -> None:
        """The monitor's connection (the task's end does it too)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=_MEASURE_TIMEOUT_S)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


def read_pool(app: web.Application) -> asyncpg.Pool:
    """The pool for a read that may lag the latest commit by up to READ_MAX_LAG_S."""
    replica = app.get(READ_REPLICA)
    if replica is None:
        return app[POOL]
    reason = replica.fallback_reason()
    if reason is None:
        metrics.READS_ON_REPLICA.inc()
        return replica.pool
    metrics.READ_FALLBACKS[reason].inc()
    return app[POOL]


async def run_read(
    app: web.Application, query: Callable[[asyncpg.Pool], Awaitable[T]]
) -> tuple[T, bool]:
    """``query`` on ``read_pool(app)``; if the replica fails under it, the replica is marked
    down and ``query`` runs again on the primary. Returns the result and whether it came
    from the replica."""
    pool = read_pool(app)
    replica = app.get(READ_REPLICA)
    if replica is None or pool is not replica.pool:
        return await query(pool), False
    try:
        return await query(pool), True
    except REPLICA_FAILURES as exc:
        replica.mark_down(exc)
        metrics.READ_FALLBACKS["down"].inc()
        return await query(app[POOL]), False
