"""Operator endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics
from .openapi import openapi_document
from .responses import json_response
from .typedefs import BUFFER, DRAINING, FANOUT, FLUSHER, POOL, SETTINGS

_DB_CHECK_TTL_S = 1.0
_DB_CHECK: web.AppKey[list[float | bool]] = web.AppKey("db_check")  # [checked at, ok]


async def healthz(request: web.Request) -> web.Response:
    """Answered by the event loop itself: if this responds, the loop is alive."""
    return json_response({"status": "ok"})


async def _db_reachable(app: web.Application) -> bool:
    state = app.setdefault(_DB_CHECK, [0.0, False])  # type: ignore[arg-type]
    if time.monotonic() - float(state[0]) < _DB_CHECK_TTL_S:
        return bool(state[1])
    try:
        async with asyncio.timeout(1.0):
            await app[POOL].fetchval("SELECT 1")
        ok = True
    except Exception:
        metrics.DB_ERRORS.labels("readiness").inc()
        ok = False
    state[:] = [time.monotonic(), ok]
    return ok


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    checks: dict[str, bool] = {"draining": not app[DRAINING][0]}
    checks["database"] = await _db_reachable(app)
    if settings.runs_ingest:
        buffer = app[BUFFER]
        checks["buffer"] = buffer.depth < settings.buffer_max_rows * settings.buffer_high_water
        checks["flusher"] = app[FLUSHER].db_ok
    if settings.runs_live:
        checks["redis_pubsub"] = app[FANOUT].connected.is_set()
    ok = all(checks.values())
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    app = request.app
    if app[SETTINGS].runs_ingest:
        metrics.BUFFER_ROWS.set(app[BUFFER].depth)
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")
