"""The HTTP server, hardened against clients that hold connections without finishing requests.

aiohttp has no request-head timeout and no connection cap: a client that opens connections
and sends each request head a byte at a time (slowloris) holds a file descriptor per
connection until accept() fails and even /readyz stops answering. Here (docs/security.md):

- HTTP_HEADER_TIMEOUT_S: a request head must arrive whole within this time of the moment it
  was due: the connection opened, or the first byte of a next request arrived on a kept-alive
  one. Otherwise the connection is closed. One lazily re-armed timer per connection: a
  keep-alive request costs a few attribute writes, not a timer.
- HTTP_MAX_CONNECTIONS: a new connection over the cap closes the one that has waited longest
  for its client (idle between requests, still sending its head, or trickling its body), so a
  probe connecting during an attack is served. A connection whose request is being handled,
  and a WebSocket, is never chosen; when every connection is busy the new one is closed.
- HTTP_BODY_TIMEOUT_S is applied where bodies are read (body.read_body), which calls
  ``waiting_for_body`` and ``body_timed_out`` below.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from . import metrics
from .settings import Settings

log = logging.getLogger("ingest.http")

# File descriptors kept for everything but client connections: PostgreSQL and Redis
# connections, the listening socket, the event loop's own, log output.
FD_RESERVE = 256
_REPORT_EVERY_S = 10.0  # at most one log line per this long about closed connections

_SERVERS: weakref.WeakSet[GuardedServer] = weakref.WeakSet()


def _open_connections() -> float:
    return sum(server.open for server in _SERVERS)


metrics.HTTP_CONNECTIONS.set_function(_open_connections)  # counted at scrape, not per connection


class Limits(msgspec.Struct, frozen=True):
    header_timeout_s: float
    max_connections: int


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit above the kernel's cap
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(wanted: int, fd_limit: int) -> int:
    """HTTP_MAX_CONNECTIONS, lowered if needed so that the open-files limit is never reached:
    at the cap, a new connection is still accepted (then one is closed), and the service keeps
    descriptors for its own connections."""
    return max(1, min(wanted, fd_limit - max(FD_RESERVE, fd_limit // 10)))


class _Connection(RequestHandler):
    """aiohttp's HTTP/1 protocol, with the request-head deadline and the bookkeeping the
    connection cap needs (is this connection waiting for its client?)."""

    __slots__ = ("_body", "_guard", "_head_deadline", "_head_timer")

    def __init__(self, guard: GuardedServer, **kwargs: Any) -> None:
        super().__init__(guard, **kwargs)
        self._guard: GuardedServer | None = guard
        self._head_deadline = 0.0  # loop time; 0: no head is due
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the payload of the latest request head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._guard is not None
        self._arm()
        self._guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        guard, self._guard = self._guard, None
        super().connection_lost(exc)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if guard is not None:
            guard.lost(self)
        # The payload refers back to this protocol: a cycle only the cyclic GC would free,
        # and gc.freeze() with a high threshold (cli.py) leaves it for hundreds of thousands
        # of connections, their buffers with them.
        self._body = None

    def data_received(self, data: bytes) -> None:
        if self._payload_parser is not None or self._upgraded:
            super().data_received(data)  # WebSocket frames, or bytes behind an upgrade
            return
        count = self._request_count
        body = self._body
        # Bytes after a complete request (body included) begin the next request's head.
        starts_head = self._head_deadline == 0.0 and (body is None or body.is_eof())
        super().data_received(data)
        if self._request_count != count:  # a head arrived whole: the request is handled now
            self._head_deadline = 0.0
            self._body = self._messages[-1][1]
            if self._guard is not None:
                self._guard.busy(self)
        elif starts_head and data:
            self._arm()

    def log_access(self, request: Any, response: Any, time: float | None) -> None:
        # Called once per request, when its response has been written: unless pipelined
        # requests are queued, the connection now waits for its client again.
        super().log_access(request, response, time)
        if not self._messages and self.transport is not None and self._guard is not None:
            self._guard.waiting(self)

    def _arm(self) -> None:
        assert self._guard is not None
        loop = self._loop
        self._head_deadline = loop.time() + self._guard.limits.header_timeout_s
        if self._head_timer is None:  # else it fires earlier and moves itself on
            self._head_timer = loop.call_at(self._head_deadline, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline == 0.0 or self._guard is None or self.transport is None:
            return
        if self._loop.time() < deadline:
            self._head_timer = self._loop.call_at(deadline, self._head_timeout)
            return
        self._head_deadline = 0.0
        self._guard.close(self, "header_timeout")


class GuardedServer(web.Server):
    """aiohttp's Server (the factory of connections) with the connection cap."""

    def __init__(self, base: web.Server, limits: Limits) -> None:
        # ``base`` is the server aiohttp built for the app (handler, request factory, the
        # app's handler_args); this one serves the same, through _Connection.
        super().__init__(
            base.request_handler, request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation, loop=base._loop, **base._kwargs,
        )  # fmt: skip
        self.limits = limits
        self.open: int = 0  # transports connected and not yet lost
        # Connections waiting for their client, the longest-waiting first.
        self._waiting: OrderedDict[_Connection, None] = OrderedDict()
        self._unreported: Counter[str] = Counter()
        self._report: asyncio.TimerHandle | None = None
        _SERVERS.add(self)

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def opened(self, conn: _Connection) -> None:
        self.open += 1
        if self.open > self.limits.max_connections:
            oldest = self._oldest_waiting()
            if oldest is None:
                self.close(conn, "over_capacity")
                return
            self.close(oldest, "evicted")
        self._waiting[conn] = None

    def lost(self, conn: _Connection) -> None:
        self.open -= 1
        self._waiting.pop(conn, None)

    def busy(self, conn: _Connection) -> None:
        self._waiting.pop(conn, None)

    def waiting(self, conn: _Connection) -> None:
        self._waiting[conn] = None
        self._waiting.move_to_end(conn)

    def close(self, conn: _Connection, reason: str) -> None:
        self._waiting.pop(conn, None)
        conn.force_close()
        self.count(reason)

    def count(self, reason: str) -> None:
        metrics.HTTP_CLOSED_BY[reason].inc()
        self._unreported[reason] += 1
        if self._report is None:
            self._report_closed()

    def _oldest_waiting(self) -> _Connection | None:
        while self._waiting:
            conn, _ = self._waiting.popitem(last=False)
            if conn.transport is not None:  # else it is closing already
                return conn
        return None

    def _report_closed(self) -> None:
        """One line now, then at most one per _REPORT_EVERY_S while connections are closed:
        an attack makes thousands of them."""
        self._report = None
        if self._unreported:
            self._log_closed()
            self._report = self._loop.call_later(_REPORT_EVERY_S, self._report_closed)

    def _log_closed(self) -> None:
        # A few timeouts are ordinary (a browser's unused preconnection); a full house is not.
        full = self._unreported["evicted"] or self._unreported["over_capacity"]
        log.log(
            logging.WARNING if full else logging.INFO,
            "http_connections_closed",
            extra={"closed": dict(self._unreported), "open": self.open,
                   "max_connections": self.limits.max_connections},
        )  # fmt: skip
        self._unreported.clear()

    async def shutdown(self, timeout: float | None = None) -> None:
        await super().shutdown(timeout)
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if self._unreported:
            self._log_closed()


class Runner(web.AppRunner):
    """AppRunner whose server is a GuardedServer."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._limits)


async def start(
    app: web.Application, settings: Settings, *, max_connections: int | None = None,
    **runner_kwargs: Any,
) -> Runner:  # fmt: skip
    """Serve ``app`` on HOST:PORT (PORT 0: any free port, see ``runner.addresses``)."""
    limits = Limits(
        settings.http_header_timeout_s, max_connections or settings.http_max_connections
    )
    runner = Runner(app, limits, handle_signals=False, access_log=None, **runner_kwargs)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port, backlog=4096).start()
    return runner


# -- for body.read_body --------------------------------------------------------------------


def _guarded(request: web.BaseRequest) -> tuple[_Connection, GuardedServer] | None:
    conn = request.protocol
    if isinstance(conn, _Connection) and conn._guard is not None:
        return conn, conn._guard
    return None  # a plain aiohttp server (aiohttp's TestServer), or the connection is lost


@contextmanager
def waiting_for_body(request: web.BaseRequest) -> Iterator[None]:
    """While the rest of a body is on its way, the connection waits for its client: the
    connection cap may close it, as it would an idle one."""
    guarded = _guarded(request)
    if guarded is not None:
        guarded[1].waiting(guarded[0])
    try:
        yield
    finally:
        if guarded is not None:
            guarded[1].busy(guarded[0])


def body_timed_out(request: web.BaseRequest) -> None:
    """Count a body not received in time; the connection closes once its 408 is written,
    instead of reading the rest of the trickle for aiohttp's lingering time."""
    guarded = _guarded(request)
    if guarded is None:
        metrics.HTTP_CLOSED_BY["body_timeout"].inc()
        return
    guarded[0]._lingering_time = 0.0
    guarded[1].count("body_timeout")
