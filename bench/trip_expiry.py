"""Trip-owner expiry at scale: how long maintenance.expire_trips takes over a large "IngestTrip".

On a database of its own, migrated by the service's migrations, with 13 monthly partitions
holding ``--pings`` pings of other trips: ``--trips`` trips in 50 orgs, of which every tenth has
a ping in a kept month. Three timed runs, with the first month kept 12 months back:
- the trips created now: nothing to forget, what an hourly run costs in the steady state;
- the same trips made old (created 400 days ago): the first run after RETENTION_MONTHS is set,
  which forgets the nine in ten with no ping;
- again: the old trips that still have pings, read and kept.

    .venv/bin/python -m bench.trip_expiry [--trips 1000000] [--pings 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta

from ingest import maintenance, partitions

from .infra import drop_databases, migrated_database

DATABASE = "bench_trip_expiry"
_TRIPS = """
INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId", "createdAt")
SELECT 'org_' || (g % 50), 'trip_' || g, 'drv_' || (g % 1000), $2::timestamptz
FROM generate_series(1, $1) g
"""
# Every tenth trip: one ping, somewhere in the last 300 days.
_TRIP_PINGS = """
INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude", "longitude", "timestamp")
SELECT 'org_' || (g % 50), 'trip_' || g, 'drv_' || (g % 1000), 0, 0,
       $2::timestamptz - (g % 300) * interval '1 day'
FROM generate_series(1, $1, 10) g
"""
_OTHER_PINGS = """
INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude", "longitude", "timestamp")
SELECT 'org_x', 'live_' || (g % 5000), 'drv_x', 0, 0,
       $2::timestamptz - (g % 360) * interval '1 day' - g * interval '1 ms'
FROM generate_series(1, $1) g
"""


async def run(server_url: str, trips: int, pings: int) -> dict[str, float | int]:
    conn = await migrated_database(server_url, DATABASE)
    try:
        now = datetime.now(UTC)
        months = {partitions.month_start(now - timedelta(days=30 * i)) for i in range(13)}
        await partitions.ensure(conn, months)
        await conn.execute(_TRIPS, trips, now)
        await conn.execute(_TRIP_PINGS, trips, now)
        await conn.execute(_OTHER_PINGS, pings, now)
        await conn.execute("VACUUM ANALYZE")
        first = partitions.add_months(partitions.month_start(now), -12)
        first_kept = datetime(first.year, first.month, first.day, tzinfo=UTC)
        out: dict[str, float | int] = {"trips": trips, "pings": pings}
        for name in ("steady_s", "first_s", "again_s"):
            if name == "first_s":
                await conn.execute(
                    'UPDATE "IngestTrip" SET "createdAt" = $1', now - timedelta(days=400)
                )
                await conn.execute('VACUUM ANALYZE "IngestTrip"')
            started = time.perf_counter()
            forgotten, _ = await maintenance.expire_trips(conn, first_kept)
            out[name] = round(time.perf_counter() - started, 2)
            out[name.replace("_s", "_forgotten")] = forgotten
        return out
    finally:
        await conn.close()
        await drop_databases(server_url, DATABASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=1_000_000)
    parser.add_argument("--pings", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    r = asyncio.run(run(args.database_url, args.trips, args.pings))
    print(
        f"{r['trips']:,} trips, {r['pings']:,} other pings over 13 partitions:"
        f" created now {r['steady_s']} s ({r['steady_forgotten']} forgotten);"
        f" made old {r['first_s']} s ({r['first_forgotten']:,} forgotten);"
        f" again {r['again_s']} s ({r['again_forgotten']} forgotten)"
    )


if __name__ == "__main__":
    main()
