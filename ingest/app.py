"""create_app(): resources as cleanup contexts, routes, and the shutdown order.

Cleanup contexts close in reverse order of registration, so the order below is the
shutdown order read bottom-up: stop maintenance, final flush (every buffered ping is
committed), publish what it committed, stop the pub/sub listener, close Redis, close
PostgreSQL. WebSockets are closed (1001) earlier, in on_shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp import WSCloseCode, web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import (
    dashboard,
    ingest_api,
    logs,
    maintenance,
    metrics,
    ops,
    phone_apps,
    read_api,
    trips_api,
    ws,
)
from .auth import Verifier
from .buffer import Buffer
from .fanout import Fanout
from .flush import Flusher
from .live import Live
from .ratelimit import RateLimiter
from .responses import error
from .settings import Settings
from .typedefs import (
    BUFFER,
    DRAINING,
    FANOUT,
    FLUSHER,
    LIVE,
    POOL,
    RATE_LIMITER,
    SETTINGS,
    VERIFIER,
)  # fmt: skip

log = logging.getLogger("ingest.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The shutdown deadline (loop time), set at SIGTERM; every drain step fits before it.
DEADLINE: web.AppKey[list[float]] = web.AppKey("deadline")
# Share of SHUTDOWN_TIMEOUT_S after which requests still waiting for a commit get 503.
HANDLER_SHARE = 0.5


# Label lookups cost more than the observation: keep the children (routes x statuses, bounded).
_REQUEST_CHILDREN: dict[tuple[str, int], Any] = {}


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request latency by route and status; a request id (the client's X-Request-Id, else a
    new one) on every log line of the request and on the response; unexpected errors become
    a JSON 500."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    with logs.request_context(request.headers.get("X-Request-Id")) as request_id:
        if route == "/api/v1/live":
            return await handler(request)
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
            child = _REQUEST_CHILDREN.get((route, status))
            if child is None:
                child = _REQUEST_CHILDREN[(route, status)] = metrics.REQUESTS.labels(
                    route, str(status)
                )
            child.observe(time.perf_counter() - started)


async def stop_task(task: asyncio.Task[None], timeout: float = 0.0) -> None:
    """Let ``task`` finish within ``timeout``, then cancel it; never wait forever, since a
    library may swallow a cancellation that lands inside its own code."""
    if timeout:
        await asyncio.wait([task], timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=2.0)
    if not task.done():
        log.error("task_stuck", extra={"task": task.get_name()})
    elif not task.cancelled() and task.exception() is not None:
        log.error("task_failed", extra={"task": task.get_name(), "error": repr(task.exception())})


async def pg_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    # min_size=0: the pod starts (not ready) even while PostgreSQL is away.
    pool = await asyncpg.create_pool(
        s.database_url, min_size=0, max_size=s.db_pool_max, command_timeout=s.flush_timeout_s,
        max_inactive_connection_lifetime=60,
    )  # fmt: skip
    app[POOL] = pool
    yield
    try:
        await asyncio.wait_for(pool.close(), 2.0)
    except TimeoutError:
        pool.terminate()


async def redis_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    # Retries let the first command after a Redis restart reconnect instead of failing.
    client = aioredis.from_url(
        s.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )  # fmt: skip
    live = Live(
        client, s.redis_prefix, s.latest_ttl_s, app[POOL],
        repair_max_trips=s.latest_repair_max_trips, repair_interval_s=s.latest_repair_interval_s,
    )  # fmt: skip
    app[LIVE] = live
    task = asyncio.create_task(live.run(), name="live-publisher")
    yield
    # The flusher has finished: publish what its last flushes committed, briefly.
    live.stop()
    await stop_task(task, timeout=5.0)
    await client.aclose()


async def fanout_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    # Its own client, without redis-py's retries: the listener reconnects by itself, and a
    # retry loop inside redis-py would hold it (and shutdown) while Redis is away.
    client = aioredis.from_url(s.redis_url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    fanout = Fanout(client, s.ws_send_buffer_bytes)
    app[FANOUT] = fanout
    task = asyncio.create_task(fanout.run(), name="pubsub-listener")
    yield
    await fanout.stop()
    await stop_task(task, timeout=2.0)
    await client.aclose()


async def flusher_context(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    buffer = Buffer(s.buffer_max_rows, s.flush_max_rows, s.flush_interval_ms / 1000)
    metrics.BUFFER_LIMIT.set(s.buffer_max_rows)
    flusher = Flusher(s, buffer, app[POOL], app[LIVE].committed)
    app[BUFFER], app[FLUSHER] = buffer, flusher
    task = asyncio.create_task(flusher.run(), name="flusher")
    sweeper = asyncio.create_task(_sweep_acks(buffer, s.ack_timeout_ms / 1000), name="ack-sweeper")
    yield
    await stop_task(sweeper)
    # Final flush: stop taking pings, commit everything buffered, until the shutdown deadline.
    buffer.close()
    remaining = app[DEADLINE][0] - asyncio.get_running_loop().time() if app[DEADLINE] else 0.0
    await asyncio.wait([task], timeout=max(remaining, 0.5))
    if task.done():
        log.info("drained", extra={"rows_left": buffer.depth})
    else:
        log.error("drain_timeout", extra={"rows_not_committed": buffer.depth})
        await stop_task(task)


async def _sweep_acks(buffer: Buffer, timeout_s: float) -> None:
    """Answer 503 to requests whose commit takes longer than ACK_TIMEOUT_MS (rows stay)."""
    while True:
        await asyncio.sleep(min(0.1, timeout_s / 4))
        buffer.expire_waiters(timeout_s)


async def maintenance_context(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        maintenance.run_forever(app[POOL], app[SETTINGS]), name="maintenance"
    )
    yield
    await stop_task(task)


async def on_shutdown(app: web.Application) -> None:
    """Runs after the listening sockets closed, before in-flight requests are awaited."""
    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    app[DRAINING][0] = True  # /readyz turns false; new WebSockets are refused
    app[DEADLINE][:] = [loop.time() + settings.shutdown_timeout_s]
    if BUFFER in app:
        app[BUFFER].close()  # new pings get 503; in-flight ones are flushed at once
        # Requests still waiting at half the time allowed get 503 (retry elsewhere) instead
        # of a dropped connection; their rows stay buffered for the final flush.
        loop.call_later(settings.shutdown_timeout_s * HANDLER_SHARE, app[FLUSHER].abandon_waiters)
    sockets = app[ws.SOCKETS].copy()
    if sockets:
        closing = [
            s.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for s in sockets
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 5.0)
        log.info("websockets_closed", extra={"count": len(sockets)})


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[observe],
        # Bodies are decoded by body.read_body, which answers 415 for encodings it does not
        # decode (aiohttp answers br/zstd with a text 400 before any handler runs).
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[DRAINING] = [False]
    app[DEADLINE] = []
    app[VERIFIER] = Verifier(settings)
    app[RATE_LIMITER] = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app[ws.SOCKETS] = set()
    app.cleanup_ctx.append(pg_context)
    app.cleanup_ctx.append(redis_context)
    if settings.runs_live:
        app.cleanup_ctx.append(fanout_context)
    if settings.runs_ingest:
        app.cleanup_ctx.append(flusher_context)
        app.cleanup_ctx.append(maintenance_context)
    app.on_shutdown.append(on_shutdown)

    r = app.router
    if settings.runs_ingest:
        r.add_post("/api/v1/tracking/ping", ingest_api.post_ping)
        phone_apps.add_routes(r)
    r.add_put("/api/v1/tracking/trips/{tripId}/driver", trips_api.hand_over)
    r.add_get("/api/v1/tracking/trips/{tripId}/latest", read_api.latest)
    r.add_get("/api/v1/tracking/trips/{tripId}/locations", read_api.history)
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
