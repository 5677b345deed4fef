"""GET /api/v1/live: the WebSocket protocol of dispatch dashboards (docs/live.md).

Client messages are decoded here; server messages other than live data (snapshots, acks,
errors) are small and per socket. Live data itself is written by the fan-out.

A socket lives no longer than its token (exp + JWT_LEEWAY_S, as HTTP): one timer per
socket closes it with 4001, and a ``refresh`` message with a new token moves the timer.
Whoever closes a socket, it leaves the fan-out before its Close frame is queued, so no
data frame ever follows the Close (RFC 6455 section 5.5.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from aiohttp import WSCloseCode, WSMsgType, web

from . import auth, metrics
from .auth import AuthError, Principal, Verifier
from .fanout import Fanout, Subscriber, TooManySubscriptions
from .live import Live
from .responses import error
from .schema import (
    DECODE_ERRORS,
    LiveError,
    LiveRefreshed,
    LiveSubscribed,
    LiveSubscribeFailed,
    Refresh,
    Subscribe,
    Unsubscribe,
    client_message_decoder,
    encoder,
)
from .settings import Settings
from .typedefs import FANOUT, LIFECYCLE, LIVE, SETTINGS, SOCKETS, VERIFIER

log = logging.getLogger("ingest.ws")

_MAX_MESSAGE_BYTES = 65_536
_SNAPSHOT_CHUNK = 500  # latest locations read per Redis round trip while sending a snapshot
_NAMED_MAX = 20  # trips named in an error's detail (all are in its "trips")
_ABORT_AFTER_S = 5.0  # a close we start that has not finished by then drops the connection
SLOW_CONSUMER = WSCloseCode.TRY_AGAIN_LATER  # 1013
TOKEN_EXPIRED = 4001  # private-use range (RFC 6455 section 7.4.2)


class LiveSocket(web.WebSocketResponse):
    """A WebSocket whose close() takes its session out of the fan-out first, synchronously.
    aiohttp itself calls close() on the client's Close, on a protocol error and at EOF, and
    the shutdown sequence calls it with 1001: each path detaches before the Close frame is
    written."""

    session: Session | None = None

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if self.session is not None:
            self.session.detach()
        return await super().close(code=code, message=message, drain=drain)


class Session:
    def __init__(
        self, ws: LiveSocket, transport: asyncio.Transport, principal: Principal, exp: float,
        settings: Settings, fanout: Fanout, live: Live, verifier: Verifier,
    ) -> None:  # fmt: skip
        self.ws = ws
        self.sub = Subscriber(transport, principal.org, self.close_slow)
        self.principal = principal
        self.settings = settings
        self.fanout = fanout
        self.live = live
        self.verifier = verifier
        self.keys = live.keys
        self.tokens = float(settings.ws_max_messages_per_s)
        self.last = time.monotonic()
        self.expiry: asyncio.TimerHandle | None = None
        self.closing: asyncio.Task[None] | None = None
        self.exp = exp
        self.schedule(exp)

    # -- lifetime ----------------------------------------------------------------------

    def schedule(self, exp: float) -> None:
        """The socket's one expiry timer: at exp + JWT_LEEWAY_S, when HTTP refuses the token."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.exp = exp
        if not math.isinf(exp) and not self.sub.closed:
            delay = exp + self.verifier.leeway - self.verifier.clock()
            self.expiry = asyncio.get_running_loop().call_later(max(delay, 0.0), self.expire)

    def expire(self) -> None:
        self.expiry = None
        if not self.sub.closed:
            metrics.WS_TOKEN_EXPIRED.inc()
            last = LiveError("token_expired", "the token expired; reconnect with a new one")
            self.shut(TOKEN_EXPIRED, b"token expired", encoder.encode(last))

    def close_slow(self) -> None:
        """Called by the fan-out, inside delivery, when the socket's unsent data is too much."""
        if not self.sub.closed and not self.sub.transport.is_closing():
            metrics.WS_SLOW_CLOSED.inc()
            self.shut(SLOW_CONSUMER, b"slow consumer")

    def shut(self, code: int, reason: bytes, last: bytes | None = None) -> None:
        """Close from outside the receive loop: out of the fan-out now, then ``last`` (a final
        message) and the Close frame. Whatever is queued may never drain: drop the connection
        if the close has not finished in a few seconds."""
        self.detach()
        self.closing = asyncio.ensure_future(self._shut(code, reason, last))
        self.closing.add_done_callback(_retrieve)
        asyncio.get_running_loop().call_later(_ABORT_AFTER_S, self.sub.transport.abort)

    async def _shut(self, code: int, reason: bytes, last: bytes | None) -> None:
        if last is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_frame(last, WSMsgType.TEXT)
        await self.ws.close(code=code, message=reason)

    def detach(self) -> None:
        """Leave the fan-out, synchronously; nothing more is sent but a last message and the
        Close frame. Idempotent."""
        sub = self.sub
        if sub.closed:
            return
        sub.closed = True
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        # Trips being subscribed are in sub.trips already (see subscribe), so none is missed.
        self.fanout.remove(sub, [self.keys.trip_channel(sub.org, t) for t in sub.trips])
        self.leave_fleet()

    # -- messages ----------------------------------------------------------------------

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
        """A text frame from already-encoded JSON (no str round trip); none once closing."""
        if not self.sub.closed:
            await self.ws.send_frame(data, WSMsgType.TEXT)

    async def handle(self, data: str | bytes) -> None:
        if self.sub.closed:  # a message read after the close began: nothing may join now
            return
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
        elif isinstance(msg, Refresh):
            await self.refresh(msg)
        else:
            self.unsubscribe(msg)

    async def refresh(self, msg: Refresh) -> None:
        """A new token of the same subject, org and role moves the expiry; anything else is
        refused and changes nothing."""
        try:
            principal, exp = self.verifier.verify_exp(msg.token)
        except AuthError as exc:
            await self.send_error("invalid_refresh", f"{exc}; the current token still applies")
            return
        if field := auth.changed_claim(self.principal, principal):
            await self.send_error(
                "invalid_refresh",
                f"the new token's '{field}' differs from this socket's; the current token"
                " still applies",
            )
            return
        self.schedule(exp)
        await self.send(encoder.encode(LiveRefreshed(None if math.isinf(exp) else int(exp))))

    async def subscribe(self, msg: Subscribe) -> None:
        sub, settings = self.sub, self.settings
        new = [t for t in dict.fromkeys(msg.trips) if t not in sub.trips]
        if len(sub.trips) + len(new) > settings.ws_max_subscriptions:
            await self.send_error(
                "too_many_subscriptions",
                f"at most {settings.ws_max_subscriptions} trips per connection",
            )
            return
        fleet = msg.fleet and not sub.fleet
        channels = [self.keys.trip_channel(sub.org, t) for t in new]
        patterns = self.keys.fleet_subscriptions(sub.org) if fleet else []
        # In sub.trips before the wait, so that a close meanwhile (detach) leaves them too.
        # sub.fleet is the fan-out's: set once the fleet's messages reach this socket.
        sub.trips.update(new)
        try:
            failed, pfailed = await self.fanout.subscribe(
                sub, channels, patterns, settings.ws_max_subscriptions_per_pod,
                settings.ws_org_subscription_limit, settings.ws_subscribe_timeout_s,
            )  # fmt: skip
        except TooManySubscriptions as exc:
            sub.trips.difference_update(new)
            metrics.WS_REFUSED.labels("too_many_subscriptions").inc()
            if exc.setting == "WS_MAX_SUBSCRIPTIONS_PER_ORG":
                detail = (
                    f"this server holds at most {exc.limit} live subscriptions per organisation"
                    f" ({exc.setting}); nothing was subscribed, unsubscribe some first"
                )
            else:
                detail = (
                    f"this server holds at most {exc.limit} live subscriptions"
                    f" ({exc.setting}); nothing was subscribed, retry later"
                )
            await self.send_error("too_many_subscriptions", detail)
            return
        if sub.closed:
            return
        trip_of = dict(zip(channels, new, strict=True))
        lost_trips = [trip_of[c] for c in failed]
        sub.trips.difference_update(lost_trips)
        if pfailed:
            self.leave_fleet()  # a cluster's fleet is several channels: all or none
        if lost_trips or pfailed:
            await self.send_subscribe_failed(lost_trips, bool(pfailed))
        await self.send(encoder.encode(LiveSubscribed(sorted(sub.trips), sub.fleet)))
        confirmed = [t for t in new if t in sub.trips]
        await self.snapshot(confirmed, fleet and sub.fleet)

    async def send_subscribe_failed(self, trips: list[str], fleet: bool) -> None:
        what = ", ".join(trips[:_NAMED_MAX])
        if len(trips) > _NAMED_MAX:
            what += f" and {len(trips) - _NAMED_MAX} more"
        if fleet:
            what = f"{what} and the fleet" if what else "the fleet"
        detail = (
            f"Redis did not confirm the subscription within {self.settings.ws_subscribe_timeout_s}"
            f" s (WS_SUBSCRIBE_TIMEOUT_S): {what}; not subscribed, retry"
        )
        await self.send(
            encoder.encode(LiveSubscribeFailed("subscribe_failed", detail, trips, fleet))
        )

    async def snapshot(self, trips: list[str], fleet: bool) -> None:
        """Latest known location of each newly subscribed trip (and of the fleet's newest
        FLEET_SNAPSHOT_MAX trips, for fleet), read in chunks: each chunk is sent before the
        next is read, and sending waits while the socket's send buffer is full."""
        org = self.sub.org
        try:
            if fleet:
                newest = await self.live.fleet_trips(org, self.settings.fleet_snapshot_max)
                trips = list(dict.fromkeys(trips + newest))
        except Exception as exc:
            await self.snapshot_failed(exc)
            return
        for i in range(0, len(trips), _SNAPSHOT_CHUNK):
            try:
                values = await self.live.latest_many(org, trips[i : i + _SNAPSHOT_CHUNK])
            except Exception as exc:
                await self.snapshot_failed(exc)
                return
            for value in values:
                if self.sub.closed:
                    return
                if value:  # stored as {"tripId":..,"driverId":..,"location":..}: splice
                    await self.send(b'{"type":"snapshot",' + value[1:])

    async def snapshot_failed(self, exc: Exception) -> None:
        # The client gets a fixed text: redis-py's names Redis's host and port. The log gets
        # str(exc) (redis-py 8's repr is only the class), which holds no credentials, and
        # its formatter redacts every line anyway (logs.py).
        metrics.REDIS_ERRORS.labels("snapshot").inc()
        error = f"{type(exc).__name__}: {exc}"
        log.warning("snapshot_failed", extra={"org": self.sub.org, "error": error})
        await self.send_error(
            "snapshot_unavailable", "latest locations are unavailable right now; the"
            " subscription holds and live data follows",
        )  # fmt: skip

    def unsubscribe(self, msg: Unsubscribe) -> None:
        sub = self.sub
        gone = [t for t in dict.fromkeys(msg.trips) if t in sub.trips]
        sub.trips.difference_update(gone)
        self.fanout.remove(sub, [self.keys.trip_channel(sub.org, t) for t in gone])
        if msg.fleet and sub.fleet:
            self.leave_fleet()

    def leave_fleet(self) -> None:
        self.fanout.remove_patterns(self.sub, self.keys.fleet_subscriptions(self.sub.org))


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("websocket_close_failed", extra={"error": repr(exc)})


async def live_socket(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    principal, exp = auth.authenticate_exp(request)
    auth.require(principal, auth.WATCH_LIVE)
    if app[LIFECYCLE].draining:
        return error(503, "shutting_down", "this instance is shutting down, reconnect")
    fanout = app[FANOUT]
    subject = (principal.org, principal.sub)
    limit = settings.ws_max_sockets_per_subject
    if not fanout.admit(subject, limit):
        metrics.WS_REFUSED.labels("too_many_sockets").inc()
        return error(
            429, "too_many_sockets",
            f"at most {limit} live sockets per token subject on one server"
            " (WS_MAX_SOCKETS_PER_SUBJECT); close one first",
        )  # fmt: skip
    try:
        return await _serve(request, principal, exp)
    finally:
        fanout.release(subject)


async def _serve(request: web.Request, principal: Principal, exp: float) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    # Snapshots are sent with awaits: aiohttp waits for the send buffer to drain past these
    # marks, kept well below WS_SEND_BUFFER_BYTES, above which the fan-out closes the socket.
    budget = min(65_536, settings.ws_send_buffer_bytes // 4)
    ws = LiveSocket(
        heartbeat=settings.ws_heartbeat_s, compress=False, max_msg_size=_MAX_MESSAGE_BYTES,
        writer_limit=budget,
    )  # fmt: skip
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    transport.set_write_buffer_limits(high=budget)

    session = Session(
        ws, transport, principal, exp, settings, app[FANOUT], app[LIVE], app[VERIFIER]
    )  # fmt: skip
    ws.session = session
    app[SOCKETS].add(ws)
    metrics.WS_CONNECTIONS.inc()
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await session.handle(msg.data)
    except ConnectionResetError:
        pass
    finally:
        session.detach()
        app[SOCKETS].discard(ws)
        metrics.WS_CONNECTIONS.dec()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws
