"""The shutdown sequence, from SIGTERM to exit: in order, within one deadline.

Modelled on uvicorn's ``Server.shutdown``: stop accepting, close the connections, wait with a
limit, cancel what is left and say how much. Answers and commits happen before the deadline,
SHUTDOWN_TIMEOUT_S after SIGTERM; after it, only publishing the last commit, cancelling and
closing, for at most CLOSE_S. T is SHUTDOWN_TIMEOUT_S:

| step                                                              | ends by (after SIGTERM) |
|-------------------------------------------------------------------|-------------------------|
| 1. draining: /readyz 503, new WebSockets refused                  | at once                 |
| 2. stop accepting: listening sockets, idle keep-alive connections | at once                 |
| 3. new pings 503, buffered pings flushed at once, maintenance off | at once                 |
| 4. WebSockets closed with 1001                                    | 5 s, and 0.5 T          |
| 5. in-flight requests: 503 at 0.5 T to those waiting for a commit | 0.6 T: the rest cancelled |
| 6. final flush; what it could not commit is counted               | T                       |
| 7. publish (and evaluate against geofences) what it committed    | T, or 1 s past it       |
| 8. stop the pub/sub listener                                      | T + CLOSE_S             |
| 9. close Redis, then PostgreSQL                                   | T + CLOSE_S             |
| 10. log what was left: rows not committed, what was cancelled     |                         |

The cleanup contexts of app.py create each resource and close it after their ``yield``; after
this sequence that is a no-op, and it is the whole teardown when the app is closed without it
(a failed start, a test that closes its runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import WSCloseCode, web

from .typedefs import (
    BUFFER,
    FANOUT,
    FLUSHER,
    GEOFENCES,
    LIFECYCLE,
    LIVE,
    POOL,
    READ_REPLICA,
    SOCKETS,
)

log = logging.getLogger("ingest.shutdown")

# Shares of SHUTDOWN_TIMEOUT_S (from SIGTERM): requests still waiting for a commit then get
# 503 (retry elsewhere); handlers still running a moment later are cancelled.
HANDLER_SHARE = 0.5
HANDLERS_END = 0.6
WEBSOCKETS_CLOSE_S = 5.0  # a Close handshake longer than this is cut (step 5 drops the socket)
# After the deadline: cancelling what still runs and closing the clients, at most this long.
CLOSE_S = 3.0
# A grace period (Kubernetes terminationGracePeriodSeconds, compose stop_grace_period) must
# exceed the preStop pause + SHUTDOWN_TIMEOUT_S + this: CLOSE_S, then the process's exit.
GRACE_MARGIN_S = CLOSE_S + 2.0
_CANCEL_WAIT_S = 1.0  # a cancelled task or handler gets this long to end
_POOL_CLOSE_S = 2.0  # then the PostgreSQL connections still busy are dropped


@dataclass(eq=False)
class Lifecycle:
    """The app's state of life (app[LIFECYCLE]), read by the handlers, set by ``shutdown``."""

    draining: bool = False  # from SIGTERM on: /readyz answers 503, new WebSockets are refused
    requests: int = 0  # HTTP requests being handled (counted by app.observe; not WebSockets)
    # Set when, draining, the last request in flight has ended.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Background tasks by name ("flusher", "ack-sweeper", "maintenance", "live-publisher",
    # "pubsub-listener", "replica-monitor"), started by the cleanup contexts, ended here.
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks[name] = task
        return task


async def shutdown(app: web.Application, runner: web.BaseRunner, timeout_s: float) -> None:
    """Drain and stop ``app``, served by ``runner``, within ``timeout_s`` (+ CLOSE_S)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout_s
    hard = deadline + CLOSE_S
    life = app[LIFECYCLE]
    buffer, flusher, live, fanout = app.get(BUFFER), app.get(FLUSHER), app[LIVE], app.get(FANOUT)
    tasks = life.tasks
    cancelled: list[str] = []  # tasks that had to be cancelled

    async def end(name: str, until: float | None = None) -> None:
        """Let task ``name`` end by itself until ``until``, then cancel it (and count it as
        cancelled); without ``until``, a task that runs until cancelled: cancel it now."""
        task = tasks.get(name)
        if task is None:
            return
        timeout = left(until) if until is not None else 0.0
        if await stop_task(task, timeout, min(_CANCEL_WAIT_S, left(hard))) and until is not None:
            cancelled.append(name)

    def left(until: float) -> float:
        return max(0.0, until - loop.time())

    log.info("shutting_down", extra={"timeout_s": timeout_s})

    # 1. Draining: /readyz answers 503, so load balancers stop sending requests here; new
    #    WebSockets are refused (503) and reconnect to another pod.
    life.draining = True

    # 2. Stop accepting: close the listening sockets, then the keep-alive connections that
    #    are idle (busy ones close after their response). Yield once first, as aiohttp does,
    #    so that requests that arrived just before have started and are counted.
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    await asyncio.sleep(0)
    if server is not None:
        server.pre_shutdown()

    # 3. New pings get 503 (retry elsewhere). The flusher no longer waits FLUSH_INTERVAL_MS:
    #    it commits what is buffered at once, so that in-flight requests are answered soon.
    #    Maintenance would hold a PostgreSQL connection the final flush may need: stop it.
    if buffer is not None:
        buffer.close()
    await end("maintenance")

    # 4. WebSockets: close with 1001 (going away); clients reconnect to another pod. A close
    #    whose handshake does not finish in time is cut in step 5, with its connection.
    sockets = app[SOCKETS].copy()
    if sockets:
        closing = [
            s.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for s in sockets
        ]
        until = start + min(WEBSOCKETS_CLOSE_S, HANDLER_SHARE * timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), left(until))
        log.info("websockets_closed", extra={"count": len(sockets)})

    # 5. In-flight requests: most wait for the commit of their pings, which the flusher makes
    #    now. Those still waiting at HANDLER_SHARE of the deadline are answered 503 (retry
    #    elsewhere; their rows stay buffered for the final flush), so that no phone is left
    #    with a dropped connection. Handlers still running at HANDLERS_END are cancelled, and
    #    every connection left (a WebSocket whose close did not finish) is closed.
    await _requests_done(life, start + HANDLER_SHARE * timeout_s)
    if life.requests and flusher is not None:
        flusher.abandon_waiters()
    await _requests_done(life, start + HANDLERS_END * timeout_s)
    requests_cancelled = life.requests
    if requests_cancelled:
        log.warning("requests_cancelled", extra={"count": requests_cancelled})
    if server is not None:
        await server.shutdown(_CANCEL_WAIT_S / 2)  # waits up to twice this per handler
    await end("ack-sweeper")  # nobody is left waiting for an acknowledgement

    # 6. Final flush: the buffer is closed, so the flusher returns once it has committed
    #    everything; until the deadline, and not after (a flush PostgreSQL holds is cancelled
    #    and its rows are counted as not committed).
    rows_not_committed = 0
    if buffer is not None:
        flushing = tasks["flusher"]
        await asyncio.wait([flushing], timeout=left(deadline))
        rows_not_committed = buffer.depth  # counted before a cancelled flush gives its rows up
        if flushing.done():
            log.info("drained", extra={"rows_left": rows_not_committed})
        else:
            log.error("drain_timeout", extra={"rows_not_committed": rows_not_committed})
        await end("flusher", deadline)

    # 7. Publish what the final flush committed (the publisher has been publishing every
    #    commit as it came): it returns once its backlog is empty. Until the deadline, or a
    #    moment past it when the flush took all the time.
    #    The geofence evaluator likewise evaluates what is left, one attempt per flush.
    live.stop()
    if GEOFENCES in app:
        app[GEOFENCES].stop()
    until = max(deadline, min(loop.time() + _CANCEL_WAIT_S, hard))
    await end("live-publisher", until)
    await end("geofence-evaluator", until)

    # 8. Stop the pub/sub listener: no socket is left to deliver to. stop() also closes the
    #    connection it reads from, in case redis-py swallows the cancellation.
    if fanout is not None:
        await _bounded(fanout.stop(), left(hard))
        await end("pubsub-listener", min(loop.time() + _CANCEL_WAIT_S, hard))

    # 9. Close Redis (the publisher and the listener have ended), then PostgreSQL (the final
    #    flush needed it to the end, and the publisher may read from it).
    for client in (live.redis, *([fanout.redis] if fanout is not None else [])):
        await _bounded(client.aclose(), left(hard))
    if READ_REPLICA in app:  # the read replica's monitor and pool (DATABASE_READ_URL)
        await end("replica-monitor")
        await close_pool(app[READ_REPLICA].pool, min(_POOL_CLOSE_S, left(hard)))
    await close_pool(app[POOL], min(_POOL_CLOSE_S, left(hard)))

    # 10. Say what was left, as uvicorn says how many tasks it cancelled; then aiohttp's own
    #     teardown, which finds every task ended and every client closed.
    log.info(
        "stopped",
        extra={"elapsed_s": round(loop.time() - start, 3), "rows_not_committed": rows_not_committed,
               "requests_cancelled": requests_cancelled, "tasks_cancelled": cancelled},
    )  # fmt: skip
    await runner.cleanup()


async def _requests_done(life: Lifecycle, until: float) -> None:
    loop = asyncio.get_running_loop()
    while life.requests and (timeout := until - loop.time()) > 0:
        life.idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(life.idle.wait(), timeout)


async def stop_task(
    task: asyncio.Task[None], timeout: float = 0.0, cancel_wait: float = 2.0
) -> bool:
    """Let ``task`` end within ``timeout``, then cancel it and wait ``cancel_wait`` at most;
    never wait forever, since a library may swallow a cancellation that lands inside its own
    code. Returns whether it had to be cancelled."""
    if timeout > 0 and not task.done():
        await asyncio.wait([task], timeout=timeout)
    was_running = not task.done()
    if was_running:
        task.cancel()
        await asyncio.wait([task], timeout=cancel_wait)
    if not task.done():
        log.error("task_stuck", extra={"task": task.get_name()})
    elif not task.cancelled() and task.exception() is not None:
        log.error("task_failed", extra={"task": task.get_name(), "error": repr(task.exception())})
    return was_running


async def close_pool(pool: asyncpg.Pool, timeout: float = _POOL_CLOSE_S) -> None:
    """Close the asyncpg pool, waiting for its connections ``timeout`` at most; then drop them."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        pool.terminate()


async def _bounded(coro: Coroutine[Any, Any, object], timeout: float) -> None:
    try:
        await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        log.warning("close_timeout", extra={"what": getattr(coro, "__qualname__", repr(coro))})
    except Exception as exc:  # a close that fails leaves nothing more to do
        log.warning("close_failed", extra={"error": repr(exc)})
