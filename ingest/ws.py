"""GET /api/v1/live: the WebSocket protocol of dispatch dashboards.

Client messages are decoded here; server messages other than live data (snapshots, acks,
errors) are small and per socket. Live data itself is written by the fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web

from . import metrics
from .auth import AuthError
from .fanout import Fanout, Subscriber
from .ingest_api import authenticate, unauthorized
from .live import Live, fleet_pattern, trip_channel
from .responses import error
from .schema import (
    DECODE_ERRORS,
    LiveError,
    LiveSubscribed,
    Subscribe,
    Unsubscribe,
    client_message_decoder,
    encoder,
)
from .settings import Settings
from .typedefs import DRAINING, FANOUT, LIVE, SETTINGS

log = logging.getLogger("ingest.ws")

_FLEET_SNAPSHOT_MAX = 5000
_MAX_MESSAGE_BYTES = 65_536
SLOW_CONSUMER = WSCloseCode.TRY_AGAIN_LATER  # 1013
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")


class Session:
    def __init__(
        self, ws: web.WebSocketResponse, sub: Subscriber, settings: Settings,
        fanout: Fanout, live: Live,
    ) -> None:  # fmt: skip
        self.ws = ws
        self.sub = sub
        self.settings = settings
        self.fanout = fanout
        self.live = live
        self.prefix = settings.redis_prefix
        self.tokens = float(settings.ws_max_messages_per_s)
        self.last = time.monotonic()

    def allow(self) -> bool:
        """Token bucket on client messages: WS_MAX_MESSAGES_PER_S, burst of the same size."""
        now = time.monotonic()
        rate = self.settings.ws_max_messages_per_s
        self.tokens = min(rate, self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def send_error(self, code: str, detail: str) -> None:
        await self.send(encoder.encode(LiveError(code, detail)))

    async def send(self, data: bytes) -> None:
        """A text frame from already-encoded JSON (no str round trip)."""
        await self.ws.send_frame(data, WSMsgType.TEXT)

    async def handle(self, data: str | bytes) -> None:
        if not self.allow():
            await self.send_error("rate_limited", "too many messages; slow down")
            return
        try:
            msg = client_message_decoder.decode(data)
        except DECODE_ERRORS as exc:
            await self.send_error("invalid_message", str(exc))
            return
        if isinstance(msg, Subscribe):
            await self.subscribe(msg)
        else:
            self.unsubscribe(msg)

    async def subscribe(self, msg: Subscribe) -> None:
        sub = self.sub
        new = [t for t in dict.fromkeys(msg.trips) if t not in sub.trips]
        if len(sub.trips) + len(new) > self.settings.ws_max_subscriptions:
            await self.send_error(
                "too_many_subscriptions",
                f"at most {self.settings.ws_max_subscriptions} trips per connection",
            )
            return
        if msg.fleet and not sub.fleet:
            sub.fleet = True
            await self.fanout.add_pattern(sub, fleet_pattern(self.prefix, sub.org))
        for trip in new:
            sub.trips.add(trip)
            await self.fanout.add(sub, trip_channel(self.prefix, sub.org, trip))
        await self.send(encoder.encode(LiveSubscribed(sorted(sub.trips), sub.fleet)))
        await self.snapshot(new, msg.fleet)

    async def snapshot(self, trips: list[str], fleet: bool) -> None:
        """Latest known location of each newly subscribed trip (the fleet's, for fleet)."""
        try:
            if fleet:
                trips = list(
                    dict.fromkeys(
                        trips + await self.live.fleet_trips(self.sub.org, _FLEET_SNAPSHOT_MAX)
                    )
                )
            values = await self.live.latest_many(self.sub.org, trips) if trips else []
        except Exception as exc:
            metrics.REDIS_ERRORS.labels("snapshot").inc()
            await self.send_error("snapshot_unavailable", f"latest locations unavailable: {exc}")
            return
        for value in values:
            if value:  # stored as {"tripId":..,"driverId":..,"location":..}: splice, no decode
                await self.send(b'{"type":"snapshot",' + value[1:])

    def unsubscribe(self, msg: Unsubscribe) -> None:
        sub = self.sub
        for trip in msg.trips:
            if trip in sub.trips:
                sub.trips.discard(trip)
                self.fanout.remove(sub, trip_channel(self.prefix, sub.org, trip))
        if msg.fleet and sub.fleet:
            sub.fleet = False
            self.fanout.remove_pattern(sub, fleet_pattern(self.prefix, sub.org))

    def close(self) -> None:
        self.unsubscribe(Unsubscribe(trips=list(self.sub.trips), fleet=True))


async def live_socket(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    try:
        principal = authenticate(request)
    except AuthError as exc:
        return unauthorized(exc)
    if principal.role != "dispatcher":
        return error(403, "forbidden", "live locations need a dispatcher token")
    if app[DRAINING][0]:
        return error(503, "shutting_down", "this instance is shutting down, reconnect")
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s, compress=False, max_msg_size=_MAX_MESSAGE_BYTES
    )
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None

    def close_slow() -> None:
        if not ws.closed and transport is not None and not transport.is_closing():
            metrics.WS_SLOW_CLOSED.inc()
            task = asyncio.ensure_future(ws.close(code=SLOW_CONSUMER, message=b"slow consumer"))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            # Whatever is queued may never drain: drop the connection if close hangs.
            asyncio.get_running_loop().call_later(5.0, transport.abort)

    sub = Subscriber(transport, principal.org, close_slow)
    session = Session(ws, sub, settings, app[FANOUT], app[LIVE])
    app[SOCKETS].add(ws)
    metrics.WS_CONNECTIONS.inc()
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await session.handle(msg.data)
    except ConnectionResetError:
        pass
    finally:
        session.close()
        app[SOCKETS].discard(ws)
        metrics.WS_CONNECTIONS.dec()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws
