"""REFERENCE ONLY: the naive design the service is measured against. Not the service.

What one would write without group commit, on the same stack (aiohttp, asyncpg, redis,
msgspec, PyJWT): per request, verify the token, decode the batch, INSERT its pings in
one transaction of its own (ON CONFLICT DO NOTHING for the (tripId, timestamp) guard),
then SET the trip's latest location and PUBLISH the new pings in Redis, then answer 200.

Run by the benchmark as ``python -m bench.contenders.reference_naive`` with PORT, DATABASE_URL,
REDIS_URL, REDIS_PREFIX and JWT_SECRET in the environment.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import jwt
import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from .httpserve import serve
from .wire import json_batch_decoder

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool")
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis")
SECRET = os.environ["JWT_SECRET"]
PREFIX = os.environ.get("REDIS_PREFIX", "naive:")
INSERT = """
INSERT INTO "TripLocation" ("tripId", "driverId", "orgId", "latitude", "longitude",
  "accuracy", "speed", "heading", "altitude", "timestamp", "batchId")
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT ("orgId", "tripId", "timestamp") DO NOTHING
"""
encode = msgspec.json.encode


def _epoch_ms(ts: datetime | int) -> float:
    return ts if isinstance(ts, int) else ts.timestamp() * 1000


async def post_ping(request: web.Request) -> web.Response:
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        return web.json_response({"error": "unauthorized"}, status=401)
    try:
        batch = json_batch_decoder.decode(await request.read())
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return web.json_response({"error": "invalid_payload", "detail": str(exc)}, status=400)
    if claims.get("sub") != batch.driverId:
        return web.json_response({"error": "forbidden"}, status=403)
    org, batch_id = claims.get("org"), batch.batchId
    rows = [
        (batch.tripId, batch.driverId, org, p.latitude, p.longitude, p.accuracy, p.speed,
         p.heading, p.altitude, p.timestamp, batch_id)
        for p in batch.locations
        if -90 <= p.latitude <= 90 and -180 <= p.longitude <= 180
    ]  # fmt: skip
    if not rows:
        return web.json_response({"error": "no_valid_pings"}, status=422)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await conn.executemany(INSERT, rows)
    newest = max(batch.locations, key=lambda p: _epoch_ms(p.timestamp))
    redis = request.app[REDIS]
    await redis.set(f"{PREFIX}latest:{batch.tripId}", encode(newest))
    await redis.publish(f"{PREFIX}live:{batch.tripId}", encode(batch.locations))
    return web.json_response({"batchId": batch_id, "accepted": len(rows), "duplicates": 0})


async def resources(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=10)
    app[REDIS] = aioredis.from_url(os.environ["REDIS_URL"])
    yield
    await app[REDIS].aclose()
    await app[POOL].close()


def create_app() -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app.cleanup_ctx.append(resources)
    app.router.add_post("/api/v1/tracking/ping", post_ping)
    return app


if __name__ == "__main__":
    serve(create_app())
