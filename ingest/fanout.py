"""One Redis pub/sub listener per pod, forwarding each message's bytes to local sockets.

A message arrives already encoded as the WebSocket text message; it is framed once and the
same frame is written to every subscriber's transport: no decode, no re-encode, no await
per subscriber. A socket whose unsent data exceeds WS_SEND_BUFFER_BYTES is closed (1013)
so a dashboard that stopped reading never slows the others or grows memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from . import metrics

log = logging.getLogger("ingest.fanout")

_PUBLISHED_AT = b'{"type":"locations","publishedAt":'


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

    __slots__ = ("close_slow", "fleet", "org", "transport", "trips")

    def __init__(self, transport: asyncio.Transport, org: str, close_slow: Callable[[], None]):
        self.transport = transport
        self.org = org
        self.trips: set[str] = set()
        self.fleet = False
        self.close_slow = close_slow


class Fanout:
    def __init__(self, redis: aioredis.Redis, send_buffer_bytes: int) -> None:
        self.redis = redis
        self.limit = send_buffer_bytes
        self.channels: dict[bytes, set[Subscriber]] = {}
        self.patterns: dict[bytes, set[Subscriber]] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self.connected = asyncio.Event()
        self._stopping = False
        self.frames_built = 0  # counted by tests: one per message, whatever the subscribers

    # -- subscriptions -------------------------------------------------------------------

    async def add(self, sub: Subscriber, channel: str) -> None:
        await self._add(self.channels, sub, channel.encode(), pattern=False)

    async def add_pattern(self, sub: Subscriber, pattern: str) -> None:
        await self._add(self.patterns, sub, pattern.encode(), pattern=True)

    def remove(self, sub: Subscriber, channel: str) -> None:
        self._remove(self.channels, sub, channel.encode(), pattern=False)

    def remove_pattern(self, sub: Subscriber, pattern: str) -> None:
        self._remove(self.patterns, sub, pattern.encode(), pattern=True)

    async def _add(
        self, table: dict[bytes, set[Subscriber]], sub: Subscriber, name: bytes, pattern: bool
    ) -> None:
        subs = table.get(name)
        if subs is not None:
            subs.add(sub)
            waiter = self._confirmed.get(name)
            if waiter is not None:
                await asyncio.shield(waiter)
            return
        table[name] = {sub}
        metrics.WS_SUBSCRIPTIONS.inc()
        if self._pubsub is None or not self.connected.is_set():
            return  # the listener subscribes everything when it (re)connects
        waiter = asyncio.get_running_loop().create_future()
        self._confirmed[name] = waiter
        try:
            if pattern:
                await self._pubsub.psubscribe(name)
            else:
                await self._pubsub.subscribe(name)
            await asyncio.wait_for(asyncio.shield(waiter), 5.0)
        except Exception as exc:
            log.warning("subscribe_failed", extra={"error": repr(exc)})
        finally:
            self._confirmed.pop(name, None)

    def _remove(
        self, table: dict[bytes, set[Subscriber]], sub: Subscriber, name: bytes, pattern: bool
    ) -> None:
        subs = table.get(name)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if subs:
            return
        del table[name]
        metrics.WS_SUBSCRIPTIONS.dec()
        if self._pubsub is not None and self.connected.is_set():
            cmd = self._pubsub.punsubscribe if pattern else self._pubsub.unsubscribe
            task = asyncio.ensure_future(cmd(name))
            task.add_done_callback(_ignore_result)

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, kind: bytes | str, name: bytes, data: bytes) -> None:
        if kind in ("message", b"message"):
            subs = self.channels.get(name)
        else:
            subs = self.patterns.get(name)
        if not subs:
            return
        frame = text_frame(data)
        self.frames_built += 1
        limit, sent, fleet_only = self.limit, 0, kind in ("message", b"message")
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
                for waiter in self._confirmed.values():
                    if not waiter.done():
                        waiter.set_result(None)
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
        await pubsub.subscribe("__ingest_keepalive__")
        if self.channels:
            await pubsub.subscribe(*self.channels)
        if self.patterns:
            await pubsub.psubscribe(*self.patterns)
        self._pubsub = pubsub
        self.connected.set()
        log.info("pubsub_connected", extra={"channels": len(self.channels)})
        deliver = self.deliver
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
            elif kind in ("subscribe", "psubscribe"):
                waiter = self._confirmed.get(msg["channel"])
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)


def _ignore_result(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()
