"""Microbenchmark: where a flush's time goes, statement by statement, against a bare COPY.

The service's flush (``ingest.store.commit``) at the headline cell's size (256 requests of 20
pings, every trip known, new batch ids) beside the bare pipeline's flush (the same rows, one
COPY in autocommit), alternating, on a database of its own. Each statement the flush sends is
timed on the client, from the call to the answer; "transaction" is what is left of the
flush: BEGIN, the savepoint around the COPY, its release and COMMIT (with its WAL flush).

    .venv/bin/python -m bench.stages.flush_steps [--rounds 40] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest import partitions, store
from ingest.buffer import FlushBatch, Pending
from ingest.flush import new_flush_id
from ingest.records import COLUMNS, Record

from ..infra import drop_databases, migrated_database

REQUESTS, PINGS = 256, 20
_STEPS = {
    "WITH flush": "owners (and the flush's row)",
    'INSERT INTO "IngestBatch"': "batch-id claim",
}


class _Timed:
    """The connection, with the time of each fetch and COPY summed by step."""

    def __init__(self, conn: asyncpg.Connection, times: dict[str, float]) -> None:
        self._conn = conn
        self._times = times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in ("fetch", "copy_records_to_table"):
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                step = "COPY" if name == "copy_records_to_table" else _step(args[0])
                self._times[step] = self._times.get(step, 0.0) + time.perf_counter() - started

        return timed


def _step(sql: str) -> str:
    head = sql.strip()
    return next((label for prefix, label in _STEPS.items() if head.startswith(prefix)), head[:30])


def _flush(month: datetime, n: int, loop: asyncio.AbstractEventLoop) -> FlushBatch:
    rows: list[Record] = []
    pending = []
    for d in range(REQUESTS):
        first = month + timedelta(seconds=n * PINGS)
        rows_of = [
            (f"trip-{d}", f"drv-{d}", "org_bench", 12.9 + d / 1e4, 77.5, 5.0, 3.0, 90.0, None,
             first + timedelta(seconds=k), f"b-{n}-{d}")
            for k in range(PINGS)
        ]  # fmt: skip
        pending.append(
            Pending("org_bench", f"trip-{d}", f"drv-{d}", f"b-{n}-{d}", len(rows), PINGS, None,
                    loop.time())
        )  # fmt: skip
        rows.extend(rows_of)
    batch = FlushBatch(rows, pending)
    batch.flush_id = new_flush_id()
    return batch


async def run(server_url: str, rounds: int = 40) -> dict[str, Any]:
    month = datetime(2026, 11, 1, tzinfo=UTC)
    name = f"ingest_flush_steps_{uuid.uuid4().hex[:8]}"
    conn = await migrated_database(server_url, name)
    steps: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {"service flush": [], "bare COPY": []}
    try:
        await partitions.ensure(conn, [month.date()])
        loop = asyncio.get_running_loop()
        await store.commit(conn, _flush(month, 0, loop), 1_000)  # the trips get their owners
        for n in range(1, rounds + 1):
            times: dict[str, float] = {}
            batch = _flush(month, 2 * n, loop)
            started = time.perf_counter()
            await store.commit(_Timed(conn, times), batch, 1_000)  # type: ignore[arg-type]
            total = time.perf_counter() - started
            times["transaction (BEGIN, savepoint, COMMIT)"] = total - sum(times.values())
            for step, took in times.items():
                steps.setdefault(step, []).append(took)
            totals["service flush"].append(total)
            bare = _flush(month, 2 * n + 1, loop).rows
            started = time.perf_counter()
            await conn.copy_records_to_table("TripLocation", records=bare, columns=COLUMNS)
            totals["bare COPY"].append(time.perf_counter() - started)
    finally:
        await conn.close()
        await drop_databases(server_url, name)
    ms = lambda xs: round(statistics.median(xs) * 1000, 2)  # noqa: E731
    return {
        "rows": REQUESTS * PINGS,
        "rounds": rounds,
        "median_ms": {k: ms(v) for k, v in totals.items()},
        "steps_median_ms": {k: ms(v) for k, v in steps.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    res = asyncio.run(run(args.database_url, args.rounds))
    print(f"{res['rows']:,} rows per flush, median of {res['rounds']} rounds:")
    for k, v in res["median_ms"].items():
        print(f"  {k:<42} {v:8.2f} ms")
    for k, v in res["steps_median_ms"].items():
        print(f"    {k:<40} {v:8.2f} ms")


if __name__ == "__main__":
    main()
