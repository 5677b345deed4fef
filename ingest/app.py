"""create_app(): resources as cleanup contexts, and routes.

Each cleanup context creates a resource (and the task that works with it), yields, then makes
sure the task has ended and the resource is closed. The shutdown order and its deadline are not
here: shutdown.py drains the app step by step before these tails run, so that after it they
find nothing left to do. Without it (a failed start, a test that closes its runner), the tails
are the whole teardown: each task stopped (a second at most), each client closed, in reverse
order of creation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import (
    dashboard,
    geofences_api,
    ingest_api,
    logs,
    maintenance,
    metrics,
    nearby,
    ops,
    phone_apps,
    read_api,
    trip_summary,
    trips_api,
    ws,
)
from .auth import Verifier
from .buffer import Buffer
from .fanout import Fanout
from .fanout_cluster import ShardedFanout
from .flush import Flusher
from .geofence_events import GeofenceEvaluator
from .geofence_worker import GeofenceWorker
from .keyspace import keyspace
from .live import Live, redis_client
from .nearby import NearbySearch
from .ratelimit import RateLimiter
from .reads import PRIMARY_APP_NAME, REPLICA_APP_NAME, ReadReplica
from .records import Record
from .responses import error
from .settings import Settings
from .shutdown import Lifecycle, close_pool, stop_task
from .trip_pages import Slots
from .typedefs import (
    BUFFER,
    EXPORT_SLOTS,
    FANOUT,
    FLUSHER,
    GEOFENCE_CHANGES_LIMITER,
    GEOFENCES,
    LIFECYCLE,
    LIVE,
    NEARBY,
    POOL,
    RATE_LIMITER,
    READ_REPLICA,
    SETTINGS,
    SOCKETS,
    VERIFIER,
)  # fmt: skip

log = logging.getLogger("ingest.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Label lookups cost more than the observation: keep the children (routes x statuses, bounded).
_REQUEST_CHILDREN: dict[tuple[str, int], Any] = {}


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request latency by route and status; a request id (the client's X-Request-Id, else a
    new one) on every log line of the request and on the response; unexpected errors become
    a JSON 500. Requests in flight are counted, for the shutdown to wait for them."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    with logs.request_context(request.headers.get("X-Request-Id")) as request_id:
        if route == "/api/v1/live":
            return await handler(request)
        life = request.app[LIFECYCLE]
        life.requests += 1
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = request_id
            raise
        except Exception:
            log.exception("unhandled_error", extra={"route": route})
            return error(
                500, "internal_error", f"request {request_id} failed",
                headers={"X-Request-Id": request_id},
            )  # fmt: skip
        finally:
            life.requests -= 1
            if life.draining and not life.requests:
                life.idle.set()
            child = _REQUEST_CHILDREN.get((route, status))
            if child is None:
                child = _REQUEST_CHILDREN[(route, status)] = metrics.REQUESTS.labels(
                    route, str(status)
                )
            child.observe(time.perf_counter() - started)


async def pg_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    # min_size=0: the pod starts (not ready) even while PostgreSQL is away.
    pool = await asyncpg.create_pool(
        s.database_url, min_size=0, max_size=s.db_pool_max, command_timeout=s.flush_timeout_s,
        max_inactive_connection_lifetime=60,
        server_settings={"application_name": PRIMARY_APP_NAME},
    )  # fmt: skip
    app[POOL] = pool
    yield
    await close_pool(pool)


async def read_replica_context(app: web.Application) -> AsyncIterator[None]:
    """DATABASE_READ_URL: the replica's pool and the task that measures the replica."""
    s = app[SETTINGS]
    dsn = s.database_read_url or ""
    # min_size=0: the pod starts while the replica is away (reads use the primary meanwhile).
    pool = await asyncpg.create_pool(
        dsn, min_size=0, max_size=s.db_pool_max, command_timeout=s.flush_timeout_s,
        max_inactive_connection_lifetime=60,
        server_settings={"application_name": REPLICA_APP_NAME},
    )  # fmt: skip
    replica = ReadReplica(pool, dsn, s.read_max_lag_s)
    app[READ_REPLICA] = replica
    task = app[LIFECYCLE].start(replica.run(), "replica-monitor")
    yield
    await stop_task(task)
    await close_pool(pool)


async def redis_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    client = redis_client(s)
    live = Live(
        client, keyspace(s.redis_mode, s.redis_prefix, s.redis_cluster_buckets), s.latest_ttl_s,
        app[POOL], repair_max_trips=s.latest_repair_max_trips,
        repair_interval_s=s.latest_repair_interval_s, nearby_max_age_s=s.nearby_max_age_s,
    )  # fmt: skip
    app[LIVE] = live
    app[NEARBY] = NearbySearch(live)
    task = app[LIFECYCLE].start(live.run(), "live-publisher")
    yield
    live.stop()
    await stop_task(task, timeout=1.0)
    await client.aclose()


async def fanout_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    # Its own client, without redis-py's retries: the listener reconnects by itself, and a
    # retry loop inside redis-py would hold it (and shutdown) while Redis is away.
    fanout: Fanout
    if s.redis_mode == "cluster":
        cluster = RedisCluster.from_url(s.redis_url, socket_connect_timeout=2)
        fanout = ShardedFanout(cluster, s.ws_send_buffer_bytes)
        client: aioredis.Redis | RedisCluster = cluster
    else:
        client = aioredis.from_url(
            s.redis_url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        fanout = Fanout(client, s.ws_send_buffer_bytes)
    app[FANOUT] = fanout
    task = app[LIFECYCLE].start(fanout.run(), "pubsub-listener")
    yield
    await fanout.stop()
    await stop_task(task, timeout=1.0)
    await client.aclose()


async def flusher_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    buffer = Buffer(
        s.buffer_max_rows, s.flush_max_rows, s.flush_interval_ms / 1000, s.flush_concurrency
    )
    metrics.BUFFER_LIMIT.set(s.buffer_max_rows)
    live = app[LIVE]
    evaluator: GeofenceEvaluator | GeofenceWorker
    if s.geofence_evaluation == "process":
        evaluator = GeofenceWorker(app[POOL], s)
    else:
        evaluator = GeofenceEvaluator(app[POOL], live, s.geofence_settle_ms / 1000)

    def committed(rows: list[Record]) -> None:
        live.committed(rows)
        evaluator.committed(rows)

    flusher = Flusher(s, buffer, app[POOL], committed)
    app[BUFFER], app[FLUSHER], app[GEOFENCES] = buffer, flusher, evaluator
    life = app[LIFECYCLE]
    task = life.start(flusher.run(), "flusher")
    geofencing = life.start(evaluator.run(), "geofence-evaluator")
    sweeper = life.start(_sweep_acks(buffer, s.ack_timeout_ms / 1000), "ack-sweeper")
    yield
    await stop_task(sweeper)
    buffer.close()
    await stop_task(task, timeout=1.0)
    evaluator.stop()
    await stop_task(geofencing, timeout=1.0)


async def _sweep_acks(buffer: Buffer, timeout_s: float) -> None:
    """Answer 503 to requests whose commit takes longer than ACK_TIMEOUT_MS (rows stay)."""
    while True:
        await asyncio.sleep(min(0.1, timeout_s / 4))
        buffer.expire_waiters(timeout_s)


async def maintenance_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    tasks = [app[LIFECYCLE].start(maintenance.run_forever(app[POOL], s), "maintenance")]
    if s.pack_closed_partitions:
        tasks.append(app[LIFECYCLE].start(maintenance.pack_forever(s), "partition-pack"))
    yield
    for task in tasks:
        await stop_task(task)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[observe],
        # Bodies are decoded by body.read_body, which answers 415 for encodings it does not
        # decode (aiohttp answers br/zstd with a text 400 before any handler runs).
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[LIFECYCLE] = Lifecycle()
    app[VERIFIER] = Verifier(settings)
    app[RATE_LIMITER] = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app[GEOFENCE_CHANGES_LIMITER] = RateLimiter(
        settings.geofence_changes_per_s, settings.geofence_changes_burst
    )
    app[SOCKETS] = set()
    app[EXPORT_SLOTS] = Slots(settings.export_max_concurrent)
    app.cleanup_ctx.append(pg_context)
    if settings.database_read_url:
        app.cleanup_ctx.append(read_replica_context)
    app.cleanup_ctx.append(redis_context)
    if settings.runs_live:
        app.cleanup_ctx.append(fanout_context)
    if settings.runs_ingest:
        app.cleanup_ctx.append(flusher_context)
        app.cleanup_ctx.append(maintenance_context)

    r = app.router
    if settings.runs_ingest:
        r.add_post("/api/v1/tracking/ping", ingest_api.post_ping)
        phone_apps.add_routes(r)
    r.add_put("/api/v1/tracking/trips/{tripId}/driver", trips_api.hand_over)
    r.add_get("/api/v1/tracking/trips/{tripId}/latest", read_api.latest)
    r.add_get("/api/v1/tracking/trips/{tripId}/locations", read_api.history)
    r.add_get("/api/v1/tracking/trips/{tripId}/summary", trip_summary.summary)
    r.add_get("/api/v1/tracking/nearby", nearby.nearby)
    r.add_post("/api/v1/geofences", geofences_api.create)
    r.add_get("/api/v1/geofences", geofences_api.list_all)
    r.add_get("/api/v1/geofences/{id}", geofences_api.get_one)
    r.add_delete("/api/v1/geofences/{id}", geofences_api.delete)
    r.add_get("/api/v1/geofences/{id}/events", geofences_api.events)
    if settings.runs_live:
        r.add_get("/api/v1/live", ws.live_socket)
    r.add_get("/healthz", ops.healthz)
    r.add_get("/readyz", ops.readyz)
    r.add_get("/metrics", ops.metrics_view)
    r.add_get("/openapi.json", ops.openapi)
    r.add_get("/asyncapi.json", ops.asyncapi)
    r.add_get("/", dashboard.index)
    r.add_get("/static/{name}", dashboard.asset)
    return app
