"""LIMIT: the bare group-commit pipeline. Decode, append the rows to a list, and await the
flush: one COPY commits everything appended, then every waiting request is answered. The
service's flush policy (ingest/buffer.py), so the two differ only by what the service adds: a
flush starts at once when none is in flight, rows arriving during one go into the next, which
starts once half as long as that flush took has passed again (or FLUSH_MAX_ROWS rows wait, or
the oldest waited FLUSH_INTERVAL_MS); below FLUSH_CONCURRENCY flushes in flight, a further one
starts when FLUSH_MAX_ROWS rows wait or the oldest waited FLUSH_INTERVAL_MS. Nothing else: no
auth, validation, dedup, Redis, metrics or backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence

import asyncpg
import msgspec
from aiohttp import web

from .httpserve import serve
from .wire import json_batch_decoder

COLUMNS = ("tripId", "driverId", "orgId", "latitude", "longitude", "accuracy", "speed",
           "heading", "altitude", "timestamp", "batchId")  # fmt: skip
# The service's defaults.
INTERVAL_S = int(os.environ.get("FLUSH_INTERVAL_MS", "50")) / 1000
MAX_ROWS = int(os.environ.get("FLUSH_MAX_ROWS", "5000"))
CONCURRENCY = int(os.environ.get("FLUSH_CONCURRENCY", "1"))
GATHER = 0.5  # ingest/buffer.py's


class Pipeline:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.rows: list[tuple[object, ...]] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.first = 0.0  # when the oldest waiting row arrived
        self.in_flight = 0
        self.gather_until = 0.0  # after a flush, the next waits until then
        self.wakeup = asyncio.Event()
        self.flushes, self.flushed_rows, self.flush_s = 0, 0, 0.0  # for GET /stats

    def add(self, rows: Sequence[tuple[object, ...]]) -> asyncio.Future[None]:
        if not self.rows:
            self.first = asyncio.get_running_loop().time()
            self.wakeup.set()
        self.rows.extend(rows)
        if len(self.rows) >= MAX_ROWS:
            self.wakeup.set()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout: float | None = None  # None: until add() or a flush ends
            if self.rows and not self.in_flight:
                timeout = min(self.gather_until, self.first + INTERVAL_S) - loop.time()
                if timeout <= 0 or len(self.rows) >= MAX_ROWS:
                    await self._flush(loop)
                    continue
            elif self.rows and self.in_flight < CONCURRENCY:
                timeout = self.first + INTERVAL_S - loop.time()
                if timeout <= 0 or len(self.rows) >= MAX_ROWS:
                    await self._flush(loop)
                    continue
            self.wakeup.clear()
            if timeout is None:
                await self.wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout)

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        rows, waiters = self.rows, self.waiters
        self.rows, self.waiters = [], []
        self.in_flight += 1
        started = loop.time()
        try:
            async with self.pool.acquire() as conn:
                await conn.copy_records_to_table("TripLocation", records=rows, columns=COLUMNS)
        finally:
            self.in_flight -= 1
            now = loop.time()
            self.gather_until = now + min((now - started) * GATHER, INTERVAL_S)
            self.wakeup.set()
        for w in waiters:
            w.set_result(None)
        self.flushes += 1
        self.flushed_rows += len(rows)
        self.flush_s += loop.time() - started


PIPELINE: web.AppKey[Pipeline] = web.AppKey("pipeline")


async def post_ping(request: web.Request) -> web.Response:
    try:
        b = json_batch_decoder.decode(await request.read())
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return web.json_response({"error": "invalid_payload", "detail": str(exc)}, status=400)
    rows = [
        (b.tripId, b.driverId, "bench", p.latitude, p.longitude, p.accuracy, p.speed, p.heading,
         p.altitude, p.timestamp, b.batchId)
        for p in b.locations
    ]  # fmt: skip
    await request.app[PIPELINE].add(rows)
    return web.Response(body=b'{"accepted":%d}' % len(rows), content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    p = request.app[PIPELINE]
    n = p.flushes or 1
    return web.json_response({"flushes": p.flushes, "mean_flush_ms": round(p.flush_s / n * 1000, 2),
                              "mean_rows_per_flush": round(p.flushed_rows / n)})  # fmt: skip


async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"], min_size=1, max_size=CONCURRENCY + 1
    )
    app[PIPELINE] = Pipeline(pool)
    task = asyncio.create_task(app[PIPELINE].run())
    yield
    task.cancel()
    await pool.close()


def create_app() -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app.cleanup_ctx.append(pipeline_ctx)
    app.router.add_post("/api/v1/tracking/ping", post_ping)
    app.router.add_get("/stats", stats)
    return app


if __name__ == "__main__":
    serve(create_app())
