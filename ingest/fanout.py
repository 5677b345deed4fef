"""One Redis pub/sub listener per pod, forwarding each message's bytes to local sockets.

A message arrives already encoded as the WebSocket text message; it is framed once and the
same frame is written to every subscriber's transport: no decode, no re-encode, no await
per subscriber. A socket whose unsent data exceeds WS_SEND_BUFFER_BYTES is closed (1013)
so a dashboard that stopped reading never slows the others or grows memory.

A closing socket leaves every channel table synchronously (``detach``) before its Close
frame is queued: delivery then never sees it, at no cost per subscriber per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis

from . import metrics

log = logging.getLogger("ingest.fanout")

_PUBLISHED_AT = b'{"type":"locations","publishedAt":'
_KEEPALIVE = "__ingest_keepalive__"


def text_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed, final WebSocket text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class Subscriber:
    """A socket's side of the fan-out: where to write, and how much it may lag."""

    __slots__ = ("close_slow", "closed", "fleet", "fleet_pending", "org", "transport", "trips")

    def __init__(self, transport: asyncio.Transport, org: str, close_slow: Callable[[], None]):
        self.transport = transport
        self.org = org
        self.trips: set[str] = set()
        # Set by the fan-out, not by the socket: True from the moment the fleet's messages
        # reach it (every fleet name it joined is confirmed by Redis), when deliver() starts
        # skipping trip-channel copies. Earlier would lose trip messages, later duplicate them.
        self.fleet = False
        self.fleet_pending = 0  # fleet names it joined that Redis has not confirmed yet
        self.close_slow = close_slow
        self.closed = False  # set (with detach) before the socket's Close frame is queued


class TooManySubscriptions(Exception):
    """The pod (WS_MAX_SUBSCRIPTIONS_PER_POD), or the org on this pod
    (WS_MAX_SUBSCRIPTIONS_PER_ORG), already holds that many channels and patterns."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(limit, setting)
        self.limit = limit
        self.setting = setting


class Fanout:
    """Subscriptions and delivery, on one pub/sub connection to a single Redis.

    The fleet names (``patterns``) are glob patterns here; ShardedFanout keeps a cluster's
    fleet channels in the same table."""

    sharded = False

    def __init__(self, redis: aioredis.Redis, send_buffer_bytes: int) -> None:
        self.redis = redis
        self.limit = send_buffer_bytes
        self.channels: dict[bytes, set[Subscriber]] = {}
        self.patterns: dict[bytes, set[Subscriber]] = {}
        # Names whose SUBSCRIBE (PSUBSCRIBE) Redis has not confirmed yet, resolved by the
        # listener; a reconnect subscribes them again, so a waiter outlives a lost connection.
        self._pending: dict[bytes, asyncio.Future[None]] = {}
        self._pending_patterns: dict[bytes, asyncio.Future[None]] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self._tasks: set[asyncio.Future[object]] = set()
        self.connected = asyncio.Event()
        self._stopping = False
        self.frames_built = 0  # counted by tests: one per message, whatever the subscribers
        self.sockets: dict[tuple[str, str], int] = {}  # open sockets per (org, sub)
        # Distinct channels and patterns per org (a name carries its org, so it has one).
        self.per_org: dict[str, int] = {}

    # -- sockets -------------------------------------------------------------------------

    def admit(self, subject: tuple[str, str], limit: int) -> bool:
        """Count one more socket of ``subject``; False (nothing counted) at ``limit``."""
        n = self.sockets.get(subject, 0)
        if n >= limit:
            return False
        self.sockets[subject] = n + 1
        return True

    def release(self, subject: tuple[str, str]) -> None:
        n = self.sockets.get(subject, 0) - 1
        if n > 0:
            self.sockets[subject] = n
        else:
            self.sockets.pop(subject, None)

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(
        self, sub: Subscriber, channels: Sequence[str], patterns: Sequence[str],
        limit: int, org_limit: int, timeout: float,
    ) -> tuple[list[str], list[str]]:  # fmt: skip
        """Add ``sub`` to each channel and pattern (all of ``sub.org``: a name carries its
        org); return the channels and patterns Redis did not confirm within ``timeout``
        seconds (``sub`` has left those again). Raises TooManySubscriptions, changing
        nothing, if the names new to this pod would take its org past ``org_limit``, or the
        pod past ``limit``, distinct channels and patterns."""
        names = [c.encode() for c in channels]
        pnames = [p.encode() for p in patterns]
        added = sum(n not in self.channels for n in names)
        added += sum(n not in self.patterns for n in pnames)
        if len(self.channels) + len(self.patterns) + added > limit:
            raise TooManySubscriptions(limit, "WS_MAX_SUBSCRIPTIONS_PER_POD")
        # Names carry their org: one org's share of the pod bounds what it takes from others.
        if self.per_org.get(sub.org, 0) + added > org_limit:
            raise TooManySubscriptions(org_limit, "WS_MAX_SUBSCRIPTIONS_PER_ORG")
        # Tables change synchronously, so concurrent subscribes count against the same limit.
        waits, new = self._join(self.channels, self._pending, sub, names)
        pwaits, pnew = self._join(self.patterns, self._pending_patterns, sub, pnames)
        if pnames:
            # Fleet names already confirmed deliver to it from now: skip trip copies at once.
            # Else the listener sets fleet when Redis confirms the last one (_fleet_confirmed).
            sub.fleet_pending += len(pwaits)
            sub.fleet = not sub.fleet_pending
        if created := len(new) + len(pnew):
            self.per_org[sub.org] = self.per_org.get(sub.org, 0) + created
            metrics.WS_SUBSCRIPTIONS.inc(created)
        if not waits and not pwaits:
            return [], []
        self._send_subscribe(new, pnew)
        await asyncio.wait([*waits.values(), *pwaits.values()], timeout=timeout)
        failed = [n for n, w in waits.items() if not w.done()]
        pfailed = [n for n, w in pwaits.items() if not w.done()]
        self._leave(self.channels, self._pending, sub, failed, pattern=False)
        self._leave(self.patterns, self._pending_patterns, sub, pfailed, pattern=True)
        if failed or pfailed:
            metrics.WS_SUBSCRIBE_FAILED.inc(len(failed) + len(pfailed))
            log.warning(
                "subscribe_failed",
                extra={"channels": len(failed) + len(pfailed), "timeout_s": timeout},
            )
        return [n.decode() for n in failed], [n.decode() for n in pfailed]

    def _join(
        self, table: dict[bytes, set[Subscriber]], pending: dict[bytes, asyncio.Future[None]],
        sub: Subscriber, names: list[bytes],
    ) -> tuple[dict[bytes, asyncio.Future[None]], list[bytes]]:  # fmt: skip
        """Add ``sub`` to each name; the confirmations still awaited, by name, and the names
        new to the table (to subscribe)."""
        waits: dict[bytes, asyncio.Future[None]] = {}
        new: list[bytes] = []
        loop = asyncio.get_running_loop()
        for name in names:
            subs = table.get(name)
            if subs is None:
                table[name] = {sub}
                waits[name] = pending[name] = loop.create_future()
                new.append(name)
            else:
                subs.add(sub)
                if (waiter := pending.get(name)) is not None:
                    waits[name] = waiter
        return waits, new

    def _fleet_confirmed(self, name: bytes) -> None:
        """The listener read Redis's confirmation of fleet name ``name``: its messages flow
        from here on, in order after every trip message before it, so each of its sockets
        whose every fleet name is confirmed now skips trip-channel copies."""
        for sub in self.patterns.get(name, ()):
            sub.fleet_pending -= 1
            if not sub.fleet_pending:
                sub.fleet = True

    def remove(self, sub: Subscriber, channels: Iterable[str]) -> None:
        """Take ``sub`` out of ``channels``; one UNSUBSCRIBE for those it held last."""
        names = [c.encode() for c in channels]
        self._leave(self.channels, self._pending, sub, names, pattern=False)

    def remove_patterns(self, sub: Subscriber, patterns: Iterable[str]) -> None:
        names = [p.encode() for p in patterns]
        self._leave(self.patterns, self._pending_patterns, sub, names, pattern=True)

    def _leave(
        self, table: dict[bytes, set[Subscriber]], pending: dict[bytes, asyncio.Future[None]],
        sub: Subscriber, names: list[bytes], pattern: bool,
    ) -> None:  # fmt: skip
        gone: list[bytes] = []
        for name in names:
            subs = table.get(name)
            if subs is None or sub not in subs:
                continue
            subs.discard(sub)
            if pattern:
                sub.fleet = False  # part of a fleet is no fleet: trip copies are its own again
                if name in pending:
                    sub.fleet_pending -= 1
            if subs:
                continue
            del table[name]
            pending.pop(name, None)
            gone.append(name)
        if not gone:
            return
        if (held := self.per_org[sub.org] - len(gone)) > 0:
            self.per_org[sub.org] = held
        else:
            del self.per_org[sub.org]
        metrics.WS_SUBSCRIPTIONS.dec(len(gone))
        # One command for all of them: the tables changed synchronously above, so a SUBSCRIBE
        # of any of these names sent later is sent after this, as with one command per name.
        self._send_unsubscribe(gone, pattern)

    def _send_subscribe(self, channels: list[bytes], patterns: list[bytes]) -> None:
        pubsub = self._pubsub
        if pubsub is not None and self.connected.is_set():
            # Else the listener subscribes every table entry when it (re)connects.
            if channels:
                self._spawn(pubsub.subscribe(*channels))
            if patterns:
                self._spawn(pubsub.psubscribe(*patterns))

    def _send_unsubscribe(self, names: list[bytes], pattern: bool) -> None:
        if self._pubsub is not None and self.connected.is_set():
            cmd = self._pubsub.punsubscribe if pattern else self._pubsub.unsubscribe
            self._spawn(cmd(*names))

    def _spawn(self, command: Awaitable[Any]) -> None:
        """Send a (P)(UN)SUBSCRIBE without waiting: its reply reaches the listener."""
        task = asyncio.ensure_future(command)
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The listener sees the broken connection too, reconnects and resubscribes.
            log.warning("pubsub_command_failed", extra={"error": repr(exc)})

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, kind: bytes | str, name: bytes, data: bytes) -> None:
        """Write one message to the sockets of its channel (``kind`` message or smessage) or
        fleet (pmessage with the pattern's name, or smessage of a cluster's fleet channel)."""
        trip_message = kind in ("message", b"message", "smessage", b"smessage")
        if trip_message:
            subs = self.channels.get(name)
            if subs is None and self.sharded:  # a cluster's fleet channel
                subs, trip_message = self.patterns.get(name), False
        else:
            subs = self.patterns.get(name)
        if not subs:
            return
        frame = text_frame(data)
        self.frames_built += 1
        limit, sent, fleet_only = self.limit, 0, trip_message
        for sub in tuple(subs):
            if fleet_only and sub.fleet:
                continue  # it receives the same message through its fleet pattern
            t = sub.transport
            if t.is_closing():
                continue
            if t.get_write_buffer_size() > limit:
                metrics.WS_DROPPED.inc()
                sub.close_slow()
                continue
            t.write(frame)
            sent += 1
        metrics.WS_SENT.inc(sent)
        if data.startswith(_PUBLISHED_AT):
            end = data.find(b",", len(_PUBLISHED_AT))
            try:
                published_ms = int(data[len(_PUBLISHED_AT) : end])
            except ValueError:
                return
            metrics.FANOUT_SECONDS.observe(max(0.0, time.time() - published_ms / 1000))

    # -- the listener ----------------------------------------------------------------------

    async def run(self) -> None:
        """Listen until stop(); reconnect and resubscribe whenever Redis goes away."""
        delay = 0.1
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.REDIS_ERRORS.labels("pubsub").inc()
                log.warning("pubsub_disconnected", extra={"error": repr(exc)})
            finally:
                self.connected.clear()
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            if not self._stopping:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def stop(self) -> None:
        """End run(): by a flag and by closing the connection it reads from, since redis-py
        can swallow a cancellation that lands inside its reconnect path."""
        self._stopping = True
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        # A placeholder channel keeps the connection in subscribed mode even with no sockets.
        await pubsub.subscribe(_KEEPALIVE)
        self._pubsub = pubsub
        # The names of now, subscribed below; a name added from here on is subscribed by
        # subscribe() itself, so none falls between the two.
        channels, patterns = list(self.channels), list(self.patterns)
        self.connected.set()
        if channels:
            await pubsub.subscribe(*channels)
        if patterns:
            await pubsub.psubscribe(*patterns)
        log.info("pubsub_connected", extra={"channels": len(channels) + len(patterns)})
        deliver, pending, pending_patterns = self.deliver, self._pending, self._pending_patterns
        while not self._stopping:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0)
            if msg is None:
                await pubsub.ping()
                continue
            kind = msg["type"]
            if kind == "message":
                deliver(kind, msg["channel"], msg["data"])
            elif kind == "pmessage":
                deliver(kind, msg["pattern"], msg["data"])
            elif kind == "subscribe":
                # A waiter is resolved only here, once popped: one in the table is not done.
                if (waiter := pending.pop(msg["channel"], None)) is not None:
                    waiter.set_result(None)
            elif (
                kind == "psubscribe"
                and (waiter := pending_patterns.pop(msg["channel"], None)) is not None
            ):
                waiter.set_result(None)
                self._fleet_confirmed(msg["channel"])
