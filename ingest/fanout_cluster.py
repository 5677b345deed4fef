"""The fan-out on a Redis Cluster: sharded pub/sub, one listener connection per master.

SPUBLISH delivers a message only on the shard that owns the channel's slot, so each channel
is SSUBSCRIBEd on the master serving its slot. The topology comes from the cluster client and
is read again whenever a listener loses its connection, a master tells us it no longer serves
a channel (a server-sent ``sunsubscribe``: the slot moved or the node became a replica), and
every TOPOLOGY_CHECK_S otherwise; each channel whose master changed is subscribed on the new
one. Delivery, tables and limits are the single-Redis Fanout's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from . import metrics
from .fanout import _KEEPALIVE, Fanout
from .keyspace import master_of

log = logging.getLogger("ingest.fanout")

TOPOLOGY_CHECK_S = 10.0


class _Shard:
    """A listener connection to one master, and the channels subscribed through it."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        # No retries inside redis-py: the listener loop reconnects, or the topology moves on.
        self.client = aioredis.Redis(
            host=host, port=port, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        self.pubsub: aioredis.client.PubSub | None = None
        self.names: set[bytes] = set()
        self.task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.pubsub is not None


class ShardedFanout(Fanout):
    sharded = True

    def __init__(self, cluster: RedisCluster, send_buffer_bytes: int) -> None:
        super().__init__(cluster, send_buffer_bytes)  # type: ignore[arg-type]
        self.cluster = cluster
        self.shards: dict[str, _Shard] = {}
        self.owner: dict[bytes, _Shard] = {}  # name -> the shard it is subscribed through
        self._refresh = asyncio.Event()
        self._initialized = False

    # -- subscription commands, per shard ----------------------------------------------------

    def _send_subscribe(self, channels: list[bytes], patterns: list[bytes]) -> None:
        for name in (*channels, *patterns):
            self._place(name)

    def _send_unsubscribe(self, names: list[bytes], pattern: bool) -> None:
        # One SUNSUBSCRIBE per (master, slot): its channels must share a slot (CROSSSLOT
        # otherwise). An org's trips of one bucket share a slot, so N trips cost at most
        # REDIS_CLUSTER_BUCKETS commands.
        batches: dict[tuple[_Shard, int], list[bytes]] = {}
        for name in names:
            shard = self.owner.pop(name, None)
            if shard is None:
                continue
            shard.names.discard(name)
            if shard.pubsub is not None:
                batches.setdefault((shard, key_slot(name)), []).append(name)
        for (shard, _), batch in batches.items():
            if shard.pubsub is not None:
                self._spawn(shard.pubsub.sunsubscribe(*batch))

    def _place(self, name: bytes) -> None:
        """Subscribe ``name`` on the master that serves its slot now (unless it is there)."""
        master = master_of(self.cluster, name)
        shard = self.shards.get(master) if master is not None else None
        old = self.owner.get(name)
        if shard is old and old is not None:
            return
        if old is not None:
            old.names.discard(name)
            del self.owner[name]
            if old.pubsub is not None:
                self._spawn(old.pubsub.sunsubscribe(name))
        if shard is None:
            self._refresh.set()  # placed again once the topology is known
            return
        self.owner[name] = shard
        shard.names.add(name)
        if shard.pubsub is not None:
            self._spawn(shard.pubsub.ssubscribe(name))

    # -- topology and listeners ------------------------------------------------------------

    async def run(self) -> None:
        """Follow the cluster's masters until stop(): a listener per master, every channel
        on the master of its slot."""
        delay = 0.1
        while not self._stopping:
            self._refresh.clear()
            try:
                if self._initialized:
                    await self.cluster.nodes_manager.initialize()
                else:  # through the client, so that its aclose() closes what this opens
                    await self.cluster.initialize()
                    self._initialized = True
                masters = {n.name: n for n in self.cluster.get_primaries()}
            except Exception as exc:
                metrics.REDIS_ERRORS.labels("pubsub").inc()
                log.warning("cluster_topology_failed", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            for name, node in masters.items():
                if name not in self.shards:
                    shard = self.shards[name] = _Shard(name, node.host, int(node.port))
                    shard.task = asyncio.ensure_future(self._listen_shard(shard))
            for name in [n for n in self.shards if n not in masters]:
                await self._drop(self.shards.pop(name))
            for channel in [*self.channels, *self.patterns]:
                self._place(channel)
            self._set_connected()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), TOPOLOGY_CHECK_S)

    def _set_connected(self) -> None:
        if self.shards and all(s.connected for s in self.shards.values()):
            self.connected.set()
        else:
            self.connected.clear()

    async def _drop(self, shard: _Shard) -> None:
        """Stop listening to a node that is no longer a master; its channels move on."""
        for name in shard.names:
            if self.owner.get(name) is shard:
                del self.owner[name]
        shard.names.clear()
        if shard.task is not None:
            shard.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(shard.task, 1.0)
        with contextlib.suppress(Exception):
            await shard.client.aclose()

    async def _listen_shard(self, shard: _Shard) -> None:
        delay = 0.1
        while not self._stopping:
            pubsub = shard.client.pubsub()
            try:
                await self._listen_on(shard, pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._stopping:
                    metrics.REDIS_ERRORS.labels("pubsub").inc()
                    log.warning(
                        "pubsub_disconnected", extra={"error": repr(exc), "node": shard.name}
                    )
            finally:
                shard.pubsub = None
                self._set_connected()
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            if not self._stopping:
                self._refresh.set()  # the node may have failed over: read the topology
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _listen_on(self, shard: _Shard, pubsub: aioredis.client.PubSub) -> None:
        await pubsub.subscribe(_KEEPALIVE)
        shard.pubsub = pubsub
        names = list(shard.names)
        self._set_connected()
        for name in names:  # one by one: SSUBSCRIBE takes channels of one slot only
            await pubsub.ssubscribe(name)
        log.info("pubsub_connected", extra={"channels": len(names), "node": shard.name})
        deliver, pending, fleet_pending = self.deliver, self._pending, self._pending_patterns
        while not self._stopping:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0)
            if msg is None:
                await pubsub.ping()
                continue
            kind = msg["type"]
            if kind == "smessage":
                deliver(kind, msg["channel"], msg["data"])
            elif kind == "ssubscribe":
                name = msg["channel"]
                if (waiter := pending.pop(name, None)) is not None:
                    waiter.set_result(None)
                elif (waiter := fleet_pending.pop(name, None)) is not None:
                    waiter.set_result(None)
                    self._fleet_confirmed(name)
            elif kind == "sunsubscribe" and msg["channel"] in shard.names:
                # Not ours: the node stopped serving the slot (moved, or failed over).
                shard.names.discard(msg["channel"])
                self.owner.pop(msg["channel"], None)
                self._refresh.set()

    async def stop(self) -> None:
        self._stopping = True
        self._refresh.set()
        for shard in list(self.shards.values()):
            if shard.pubsub is not None:
                with contextlib.suppress(Exception):
                    await shard.pubsub.aclose()  # type: ignore[no-untyped-call]
        for shard in list(self.shards.values()):
            await self._drop(shard)
        self.shards.clear()
