"""Operator endpoints: liveness, readiness, Prometheus metrics, the OpenAPI and AsyncAPI
documents."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics, migrate
from .asyncapi import asyncapi_json
from .openapi import openapi_document
from .responses import json_response
from .typedefs import BUFFER, FANOUT, FLUSHER, LIFECYCLE, LIVE, POOL, SETTINGS

_PROBE_TTL_S = 1.0  # answers are reused this long: probes cost at most one query a second
_PROBE_TIMEOUT_S = 1.0


class Probe:
    """A cached reachability check: at most one attempt in flight, answered within a timeout.

    A slow attempt is not cancelled (redis-py may swallow a cancellation); it goes on in
    the background and the next check after the TTL waits on it again.
    """

    def __init__(self, check: Callable[[], Awaitable[object]], on_error: Callable[[], None]):
        self.check = check
        self.on_error = on_error
        self.ok = False
        self.checked_at = float("-inf")
        self.task: asyncio.Task[object] | None = None

    async def __call__(self) -> bool:
        if time.monotonic() - self.checked_at < _PROBE_TTL_S:
            return self.ok
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.check())
            self.task.add_done_callback(_retrieve)
        task = self.task
        await asyncio.wait([task], timeout=_PROBE_TIMEOUT_S)
        ok = task.done() and not task.cancelled() and task.exception() is None
        if not ok:
            self.on_error()
        self.ok, self.checked_at = ok, time.monotonic()
        return ok


def _retrieve(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()  # a late failure is reported by the next check, not by the loop


_APPLIED = 'SELECT count(*) FROM "_ingest_migrations" WHERE "name" = ANY($1::text[])'


class SchemaBehind(Exception):
    """The database lacks migrations this code uses (the migration Job has not run yet)."""


class _Probes:
    def __init__(self, app: web.Application) -> None:
        self.database = Probe(
            lambda: app[POOL].fetchval("SELECT 1"),
            metrics.DB_ERRORS.labels("readiness").inc,
        )
        self.redis = Probe(lambda: app[LIVE].redis.ping(), metrics.REDIS_ERRORS.labels("probe").inc)
        # New pods do not wait for the migration Job: one whose code uses a column the Job
        # has not added yet stays out of the Service (and holds the rollout) until it has.
        # Migrations only go forward, so once current it is never asked again.
        self.schema = Probe(lambda: self._schema_current(app), lambda: None)
        self.schema_current = False

    async def _schema_current(self, app: web.Application) -> None:
        names = [path.name for path in migrate.migration_files()]
        if await app[POOL].fetchval(_APPLIED, names) != len(names):
            raise SchemaBehind(names)
        self.schema_current = True


_PROBES: weakref.WeakKeyDictionary[web.Application, _Probes] = weakref.WeakKeyDictionary()


def _probes(app: web.Application) -> _Probes:
    probes = _PROBES.get(app)
    if probes is None:
        probes = _PROBES[app] = _Probes(app)
    return probes


async def healthz(request: web.Request) -> web.Response:
    """Answered by the event loop itself: if this responds, the loop is alive."""
    return json_response({"status": "ok"})


async def readiness(app: web.Application) -> dict[str, bool]:
    """Each readiness condition, True when met; the pod is ready when all are."""
    settings = app[SETTINGS]
    checks: dict[str, bool] = {"draining": not app[LIFECYCLE].draining}
    probes = _probes(app)
    checks["database"] = await probes.database()
    checks["schema"] = probes.schema_current or await probes.schema()
    if settings.runs_ingest:
        buffer = app[BUFFER]
        checks["buffer"] = buffer.depth < settings.buffer_max_rows * settings.buffer_high_water
        checks["flusher"] = app[FLUSHER].db_ok
    if settings.runs_live:
        checks["redis_pubsub"] = app[FANOUT].connected.is_set()
    return checks


async def readyz(request: web.Request) -> web.Response:
    checks = await readiness(request.app)
    ok = all(checks.values())
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    """The process's metrics; the gauges of state are refreshed first."""
    app = request.app
    settings = app[SETTINGS]
    metrics.INFO.info({"role": settings.role, "ack_mode": settings.ack_mode})
    if settings.runs_ingest:
        metrics.BUFFER_ROWS.set(app[BUFFER].depth)
    checks = await readiness(app)
    metrics.READY.set(all(checks.values()))
    metrics.DATABASE_UP.set(checks["database"])
    metrics.REDIS_UP.set(await _probes(app).redis())
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


async def asyncapi(request: web.Request) -> web.Response:
    return web.Response(body=asyncapi_json(), content_type="application/json")
