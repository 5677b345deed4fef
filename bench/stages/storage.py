"""STAGE: storage. Bytes per stored ping (heap and each index of "TripLocation") and COPY
rows/s, with the schema before migration 005 (the "batchId" index), after it, and with a
surrogate trip key (not built: what it would store), in the same run: each on a database of
its own, migrated by the service's own migrations (all of them, or all but 005), filled by
COPY in flush-sized chunks of the rows the service stores (one month, trips of pings a second
apart, one batch id per 20 pings).

"trip key" is the schema after 005 with an int8 "tripKey" column (one per org and trip, as
"IngestTrip" would hand out) and the unique guard on ("tripKey", "timestamp") in place of
("orgId", "tripId", "timestamp"): the lever docs/bench.md#storage weighs for the 200 B target.

Two id styles: the load's (short: "r0-17-3") and UUIDs (what many apps send). Sizes are read
after VACUUM ANALYZE; COPY rows/s is the best of the variant's fills, alternated with the other
variant's so that drift on a shared machine does not decide the ratio.

    .venv/bin/python -m bench.stages.storage [--rows 200000] [--fills 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any

import asyncpg

from ingest import partitions
from ingest.migrate import SQL_DIR, migration_files
from ingest.records import COLUMNS, Record

from ..infra import drop_databases, migrated_database

ROWS = 200_000
FILLS = 2
CHUNK = 5_000  # rows per COPY: a flush at the headline cell
TRIPS = 1_000
BATCH = 20
DROPPED_BY = "005_drop_batch_index.sql"
VARIANTS = ("before 005", "after 005", "trip key")
_TRIP_KEY = (
    'ALTER TABLE "TripLocation" ADD COLUMN "tripKey" bigint NOT NULL',
    'DROP INDEX "TripLocation_orgId_tripId_timestamp_key"',
    'CREATE UNIQUE INDEX "TripLocation_tripKey_timestamp_key" ON "TripLocation" ("tripKey", "timestamp")',
)
STYLES = ("load ids", "uuid ids")
_SIZES = """
SELECT c.relname, pg_relation_size(c.oid),
       (SELECT json_object_agg(i.relname, pg_relation_size(i.oid))
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid)
FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
WHERE h.inhparent = '"TripLocation"'::regclass AND pg_relation_size(c.oid) > 0
"""


def rows(style: str, count: int, month: datetime) -> list[Record]:
    """``count`` rows as the flusher COPYs them: TRIPS trips, each sending BATCH pings a second
    apart per upload, uploads interleaved as they arrive."""
    rng = Random(5)
    if style == "uuid ids":
        trips = [
            (str(uuid.UUID(int=rng.getrandbits(128))), f"driver-{i:06d}") for i in range(TRIPS)
        ]
        new_batch = lambda n: str(uuid.UUID(int=rng.getrandbits(128)))  # noqa: E731
    else:
        trips = [(f"trip-r0_{i}", f"r0_{i}") for i in range(TRIPS)]
        new_batch = lambda n: f"r0-{n % 4}-{n}"  # noqa: E731
    out: list[Record] = []
    upload = 0
    while len(out) < count:
        trip, driver = trips[upload % TRIPS]
        batch_id = new_batch(upload)
        first = month + timedelta(seconds=(upload // TRIPS) * BATCH)
        for k in range(BATCH):
            out.append((
                trip, driver, "org_bench", 12.9 + rng.random() / 10, 77.5 + rng.random() / 10,
                rng.uniform(3, 30), rng.uniform(0, 25), rng.uniform(0, 360), None,
                first + timedelta(seconds=k), batch_id,
            ))  # fmt: skip
        upload += 1
    return out[:count]


def with_trip_keys(data: list[Record]) -> list[tuple[Any, ...]]:
    """The rows with a key per (org, trip) appended, numbered as the trips first appear."""
    keys: dict[tuple[str | None, str], int] = {}
    return [(*r, keys.setdefault((r[2], r[0]), len(keys) + 1)) for r in data]


async def _fill(
    conn: asyncpg.Connection, data: list[Any], month: datetime, columns: tuple[str, ...]
) -> dict[str, Any]:
    await conn.execute('TRUNCATE "TripLocation"')
    await partitions.ensure(conn, [month.date()])
    await conn.execute("CHECKPOINT")
    started = time.perf_counter()
    for i in range(0, len(data), CHUNK):
        await conn.copy_records_to_table(
            "TripLocation", records=data[i : i + CHUNK], columns=columns
        )
    took = time.perf_counter() - started
    await conn.execute('VACUUM ANALYZE "TripLocation"')
    out = {"copy_rows_s": round(len(data) / took), "bytes_per_row": await _sizes(conn, len(data))}
    # The indexes of a month that is over, rebuilt (REINDEX): packed, as no ping arrives
    # in the middle of a trip's keys any more.
    await conn.execute('REINDEX TABLE "TripLocation"')
    out["packed_bytes_per_row"] = await _sizes(conn, len(data))
    return out


async def _sizes(conn: asyncpg.Connection, n: int) -> dict[str, float]:
    heap = 0
    indexes: dict[str, int] = {}
    for _, size, idx in await conn.fetch(_SIZES):
        heap += size
        for name, index_size in (json.loads(idx) if idx else {}).items():
            kind = "batchId" if "batch" in name.lower() else "unique"  # either unique guard
            indexes[kind] = indexes.get(kind, 0) + index_size
    per_row = {"heap": round(heap / n, 1)} | {k: round(v / n, 1) for k, v in indexes.items()}
    per_row["total"] = round((heap + sum(indexes.values())) / n, 1)
    return per_row


async def run(server_url: str, rows_n: int = ROWS, fills: int = FILLS) -> dict[str, Any]:
    month = datetime(2026, 11, 1, tzinfo=UTC)
    before_dir = Path(tempfile.mkdtemp(prefix="ingest-bench-sql-"))
    for path in migration_files(SQL_DIR):
        if path.name != DROPPED_BY:
            shutil.copy(path, before_dir)
    tag = uuid.uuid4().hex[:8]
    names = {v: f"ingest_storage_{tag}_{i}" for i, v in enumerate(VARIANTS)}
    conns = {
        "before 005": await migrated_database(server_url, names["before 005"], before_dir),
        "after 005": await migrated_database(server_url, names["after 005"]),
        "trip key": await migrated_database(server_url, names["trip key"]),
    }
    for statement in _TRIP_KEY:
        await conns["trip key"].execute(statement)
    out: dict[str, Any] = {"rows": rows_n, "chunk": CHUNK, "results": []}
    try:
        for style in STYLES:
            data = rows(style, rows_n, month)
            keyed = with_trip_keys(data)
            best: dict[str, dict[str, Any]] = {}
            for _ in range(fills):
                for variant in VARIANTS:
                    if variant == "trip key":
                        r = await _fill(conns[variant], keyed, month, (*COLUMNS, "tripKey"))
                    else:
                        r = await _fill(conns[variant], data, month, COLUMNS)
                    if variant not in best or r["copy_rows_s"] > best[variant]["copy_rows_s"]:
                        best[variant] = r
            before, after, key = best["before 005"], best["after 005"], best["trip key"]
            out["results"].append({
                "ids": style, "before": before, "after": after, "trip_key": key,
                "copy_ratio": round(after["copy_rows_s"] / before["copy_rows_s"], 3),
                "trip_key_copy_ratio": round(key["copy_rows_s"] / after["copy_rows_s"], 3),
            })  # fmt: skip
    finally:
        for conn in conns.values():
            await conn.close()
        await drop_databases(server_url, *names.values())
        shutil.rmtree(before_dir, ignore_errors=True)
    return out


def line(r: dict[str, Any]) -> str:
    b, a, k = r["before"], r["after"], r["trip_key"]
    return (
        f"storage ({r['ids']}): {b['bytes_per_row']['total']} -> {a['bytes_per_row']['total']}"
        f" B per ping (heap {a['bytes_per_row']['heap']}, unique {a['bytes_per_row'].get('unique')},"
        f" batchId index {b['bytes_per_row'].get('batchId')} -> none); COPY"
        f" {b['copy_rows_s']:,} -> {a['copy_rows_s']:,} rows/s ({r['copy_ratio']:.2f}x);"
        f" once the month is over and its index rebuilt: {a['packed_bytes_per_row']['total']} B"
        f" (unique {a['packed_bytes_per_row'].get('unique')}); with a trip key (not built):"
        f" {k['bytes_per_row']['total']} B (heap {k['bytes_per_row']['heap']}, unique"
        f" {k['bytes_per_row'].get('unique')}), packed {k['packed_bytes_per_row']['total']} B,"
        f" COPY {r['trip_key_copy_ratio']:.2f}x after 005's"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--fills", type=int, default=FILLS)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    res = asyncio.run(run(args.database_url, args.rows, args.fills))
    for r in res["results"]:
        print(line(r))


if __name__ == "__main__":
    main()
