"""Microbenchmark: what evaluating a flush's pings against 1,000 fences costs, in process.

The service's own ``GeofenceEvaluator.evaluate`` (steps 1 to 5 of ingest/geofence_events.py:
locks, read-back probe, the walk through the fence index, states and events stored, events
published), on a database of its own and a Redis prefix of its own, fed flushes of the
headline cell's shape: 256 trips x 20 pings (``--pings``) of 1,024 trucks driving straight
lines across the city of the geofence stage (``--step-m`` metres per ping), each trip in every
fourth flush, as the wrk load sends them. The flush's rows are COPYed first, as the service
commits them before evaluating. Python's CPU (this process: the evaluator, asyncpg, redis-py)
and the CPU of the PostgreSQL backends serving the database are read around each ``evaluate``
call and given per trip and per ping. ``--profile`` adds cProfile's top functions.

    .venv/bin/python -m bench.stages.geofence_eval [--flushes 60] [--layout city|sites]
        [--step-m 10] [--pings 20] [--fences 1000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from devtools.procs import cpu_seconds
from ingest import partitions
from ingest.geofence_events import GeofenceEvaluator
from ingest.geofence_shapes import parse_shape, vertices
from ingest.keyspace import keyspace
from ingest.live import Live, redis_client
from ingest.records import COLUMNS, Record
from ingest.settings import load_settings

from ..infra import drop_databases, drop_redis_prefix, migrated_database, with_database
from ..load.city import fence_geometries, straight_lines
from .geofences_bench import FENCE_SEED, TRACK_SEED

TRIPS, TRUCKS = 256, 1024
ORG = "org_bench"


def _cpu_s(pids: list[int]) -> float:
    return sum(cpu_seconds(pids).values())


async def _fences(conn: asyncpg.Connection, count: int, layout: str) -> None:
    geometries = fence_geometries(random.Random(FENCE_SEED), count, layout)
    rows = []
    for i, (name, geometry, radius) in enumerate(geometries):
        shape = parse_shape(geometry, radius, 1000)
        rows.append((ORG, f"gf_{i}", name, json.dumps(geometry), radius, vertices(shape)))
    await conn.executemany(
        'INSERT INTO "Geofence" ("orgId", "id", "name", "geometry", "radiusM", "vertices")'
        " VALUES ($1, $2, $3, $4::jsonb, $5, $6)",
        rows,
    )
    await conn.execute(
        'INSERT INTO "GeofenceOrg" VALUES ($1, 1, $2, $3)', ORG, count, sum(r[5] for r in rows)
    )


def _flush(
    n: int, lines: list[tuple[float, float, float, float]], start: datetime, pings: int
) -> list[Record]:
    """Flush ``n``: trips n % 4 * 256 ... + 255, each its next ``pings`` pings, a second
    apart."""
    rows: list[Record] = []
    first, upload = (n % 4) * TRIPS, n // 4
    for t in range(first, first + TRIPS):
        lat, lon, dlat, dlon = lines[t]
        for k in range(upload * pings, (upload + 1) * pings):
            rows.append((
                f"trip-{t}", f"drv-{t}", ORG, lat + k * dlat, lon + k * dlon, 5.0, 10.0, 90.0,
                None, start + timedelta(seconds=k), f"b-{n}-{t}",
            ))  # fmt: skip
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"ingest_geofence_eval_{uuid.uuid4().hex[:8]}"
    prefix = f"gfeval{os.getpid()}:"
    conn = await migrated_database(args.database_url, name)
    s = load_settings(
        {}, database_url=with_database(args.database_url, name), redis_url=args.redis_url,
        redis_prefix=prefix, jwt_secret="x" * 32,
    )  # fmt: skip
    pool = redis = None
    try:
        start = datetime.now(UTC) + timedelta(seconds=5)  # after every fence's creation
        await partitions.ensure(conn, [start.date(), (start + timedelta(days=1)).date()])
        await _fences(conn, args.fences, args.layout)
        pool = await asyncpg.create_pool(s.database_url, min_size=2, max_size=2)
        backends = [
            r[0]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        ]
        redis = redis_client(s)
        live = Live(redis, keyspace("standalone", prefix, 1), 60, None)
        evaluator = GeofenceEvaluator(pool, live, 0.0, waited=True)
        lines = straight_lines(random.Random(TRACK_SEED), TRUCKS, args.step_m)
        python: list[float] = []
        postgres: list[float] = []
        events = 0
        profile = cProfile.Profile() if args.profile else None
        gc.freeze()  # as the service does after start-up (docs/bench.md)
        for n in range(args.flushes + 4):  # the first 4: every trip's first evaluation
            rows = _flush(n, lines, start, args.pings)
            await conn.copy_records_to_table("TripLocation", records=rows, columns=COLUMNS)
            cpu0, pg0 = time.process_time(), _cpu_s(backends)
            if profile is not None and n >= 4:
                profile.enable()
            got = await evaluator.evaluate(rows)
            if profile is not None:
                profile.disable()
            if n >= 4:
                python.append(time.process_time() - cpu0)
                postgres.append(_cpu_s(backends) - pg0)
                events += got
        if profile is not None:
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    finally:
        await conn.close()
        if pool is not None:
            await pool.close()
        if redis is not None:
            await redis.aclose()
        await drop_databases(args.database_url, name)
        await drop_redis_prefix(args.redis_url, prefix)
    per_trip = lambda xs: round(statistics.mean(xs) / TRIPS * 1e6, 1)  # noqa: E731
    return {
        "flushes": args.flushes,
        "python_us_per_trip": per_trip(python),
        "postgres_us_per_trip": per_trip(postgres),
        "python_us_per_ping": round(per_trip(python) / args.pings, 2),
        "postgres_us_per_ping": round(per_trip(postgres) / args.pings, 2),
        "events_per_1k_pings": round(events / (args.flushes * TRIPS * args.pings) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flushes", type=int, default=60)
    parser.add_argument("--fences", type=int, default=1000)
    parser.add_argument("--layout", choices=("city", "sites"), default="city")
    parser.add_argument("--step-m", type=float, default=10.0)
    parser.add_argument("--pings", type=int, default=20, help="per trip per flush")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    res = asyncio.run(run(args))
    print(
        f"{args.fences} {args.layout} fences, {args.step_m:g} m per ping, {TRIPS} trips x"
        f" {args.pings} pings per flush, {res['flushes']} flushes:"
        f" Python {res['python_us_per_trip']} us per trip ({res['python_us_per_ping']} per ping),"
        f" PostgreSQL"
        f" {res['postgres_us_per_trip']} us per trip ({res['postgres_us_per_ping']} per ping),"
        f" {res['events_per_1k_pings']} events per 1,000 pings"
    )


if __name__ == "__main__":
    main()
