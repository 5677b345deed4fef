"""LIMIT: bare asyncpg binary COPY of the same rows into the same table, no HTTP.

One connection, one COPY (its own transaction) after another, each of ROWS_PER_COPY rows
shaped like the load generator's (trips of BATCH pings, 1 ms apart), for DURATION_S
seconds. Prints "started <epoch>" when the first COPY begins.

    python -m bench.contenders.limit_copy DATABASE_URL DURATION_S ROWS_PER_COPY BATCH
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import uvloop

from .limit_pipeline import COLUMNS


def chunk(copy_no: int, rows: int, batch: int, start: datetime) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for b in range(rows // batch):
        trip, driver = f"copy_{copy_no}_{b}", f"drv{b:05d}"
        batch_id = f"copy-{copy_no}-{b}"
        for k in range(batch):
            out.append((trip, driver, "bench", 12.9 + k * 1e-6, 77.5, 4.5, 11.2, 87.0, 921.0,
                        start + timedelta(milliseconds=k), batch_id))  # fmt: skip
    return out


async def main(url: str, duration_s: float, rows: int, batch: int) -> None:
    conn = await asyncpg.connect(url)
    start = datetime.now(UTC) - timedelta(minutes=5)
    started = time.time()
    print(f"started {started}", flush=True)
    n = 0
    while time.time() - started < duration_s:
        records = chunk(n, rows, batch, start)
        await conn.copy_records_to_table("TripLocation", records=records, columns=COLUMNS)
        n += 1
    await conn.close()


if __name__ == "__main__":
    url, duration, rows, batch = sys.argv[1:5]
    uvloop.run(main(url, float(duration), int(rows), int(batch)))
