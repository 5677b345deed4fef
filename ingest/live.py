"""After each commit: move each trip's latest location forward in Redis (never backwards)
and publish the new pings of each trip once, as a ready-to-send WebSocket message.

Both happen in one Lua script call per flush, so a flush costs one Redis round trip
whatever the number of trips; it runs in its own task, off the ack path, with a bounded
backlog: a slow or absent Redis delays live data, never ingest.

A latest update that never reached Redis (the script call failed, or its flush was dropped
from the backlog) is remembered by (org, trip), up to LATEST_REPAIR_MAX_TRIPS, and set again
from PostgreSQL's newest row once Redis takes writes again (docs/reliability.md, "Latest
location after Redis trouble"). Nothing of this runs while Redis is healthy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import operator
import time
from collections.abc import Iterable
from datetime import UTC

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import metrics
from .keyspace import CROSS_SLOT, Keyspace, by_master
from .records import ACC, ALT, DRIVER, HEADING, LAT, LON, ORG, SPEED, TRIP, TS, Record
from .schema import LatestLocation, LiveLocations, StoredLocation
from .settings import Settings

log = logging.getLogger("ingest.live")

_BACKLOG_FLUSHES = 256
# Trips repaired per PostgreSQL query and Redis call; live publishing goes on between chunks.
_REPAIR_CHUNK = 500
_MSGPACK = msgspec.msgpack.Encoder()
_JSON = msgspec.json.Encoder()

# A missing latest key is filled straight from a flush only by a ping at most this old. An
# older ping (a late upload) might be older than what PostgreSQL holds, if Redis lost the key
# (restart without persistence, failover, TTL): then PostgreSQL's latest is looked up first.
TRUST_MISSING_MS = 120_000  # 2 min
# Fleet (and GEO) members pruned per script call at most: a flush, so many calls a second,
# each a few hundred small ZREMs at most; steady state removes only the trips ended since.
PRUNE_PER_CALL = 256

# ARGV[1]: msgpack list of
#   [latest key, ts ms, latest JSON, channel, message, fleet key, trip, org (unused by Lua),
#    fleet score ms, fleet channel, GEO key, longitude, latitude]
# ARGV[2]: TTL seconds. ARGV[3]: a missing key is set only for ts >= this (epoch ms).
# ARGV[4]: PUBLISH, or SPUBLISH in a cluster. An empty channel publishes nothing.
# ARGV[5]: a latest that moves forward enters the GEO set only with a fleet score >= this
#   (now - NEARBY_MAX_AGE_S): a late upload never puts a silent truck back into nearby.
# ARGV[6]: fleet scores below this (now - max(TTL, NEARBY_MAX_AGE_S)) are pruned, ARGV[7]
#   members at most per call, from each touched fleet set and its bucket's GEO set (same slot).
# Returns {updated, skipped, {indexes left unset}}.
# The fleet score is min(ts, the time it was written), raised only (GT): a clock running ahead
# ranks a trip as "now", never above the trucks that report after it. It is raised whether or
# not the latest moved (a trip whose latest lies ahead still reports now); the latest itself
# compares ping timestamps only, so the score never makes it go back.
# Pruning: every write refreshes the TTL of the whole fleet and GEO keys, so an org that never
# stops reporting would keep every trip it ever had. Its members silent for longer than the
# latest key lives are dropped here (fleet_trips hides them already; nearby never answers them),
# a bounded number per call since every flush calls this. A pruned trip that reports again is
# added back as new, as after its keys expired.
_UPDATE_AND_PUBLISH = """
local items = cmsgpack.unpack(ARGV[1])
local ttl = tonumber(ARGV[2])
local trust_from = tonumber(ARGV[3])
local publish = ARGV[4]
local geo_from = tonumber(ARGV[5])
local prune_below = '(' .. ARGV[6]
local prune_left = tonumber(ARGV[7])
local updated, skipped, unsure = 0, 0, {}
local fleets, geo_of = {}, {}
-- Every read before any write: on a cluster whose slot map the client had stale, a key this
-- node no longer serves fails the call here, having changed nothing, so a retry is safe.
local seen = {}
for i, it in ipairs(items) do
  seen[i] = redis.call('HGET', it[1], 'ts')
end
for i, it in ipairs(items) do
  local cur = seen[i]
  if (cur and tonumber(cur) < it[2]) or ((not cur) and it[2] >= trust_from) then
    redis.call('HSET', it[1], 'ts', it[2], 'v', it[3])
    redis.call('EXPIRE', it[1], ttl)
    updated = updated + 1
    -- GEO indexes latitudes within +-85.05112878 only: a truck beyond leaves nearby.
    if it[9] >= geo_from and math.abs(it[13]) <= 85.05112878 then
      redis.call('GEOADD', it[11], it[12], it[13], it[7])
      redis.call('EXPIRE', it[11], ttl)
    else
      redis.call('ZREM', it[11], it[7])
    end
  elseif cur then
    skipped = skipped + 1
  else
    unsure[#unsure + 1] = i - 1
  end
  if cur or it[2] >= trust_from then
    redis.call('ZADD', it[6], 'GT', it[9], it[7])
    redis.call('EXPIRE', it[6], ttl)
  end
  if it[4] ~= '' then
    redis.call(publish, it[4], it[5])
  end
  if it[10] ~= '' then
    redis.call(publish, it[10], it[5])
  end
  if not geo_of[it[6]] then
    geo_of[it[6]] = it[11]
    fleets[#fleets + 1] = it[6]
  end
end
-- After the writes: this call's own members are judged by their new scores. The reads here
-- are of slots the HGETs above already found on this node.
for _, fleet in ipairs(fleets) do
  if prune_left <= 0 then break end
  local gone = redis.call('ZRANGE', fleet, '-inf', prune_below, 'BYSCORE', 'LIMIT', 0, prune_left)
  if #gone > 0 then
    redis.call('ZREM', fleet, unpack(gone))
    redis.call('ZREM', geo_of[fleet], unpack(gone))
    prune_left = prune_left - #gone
  end
end
return {updated, skipped, unsure}
"""
_LATEST_OF = """
SELECT t.org, t.trip, l.* FROM unnest($1::text[], $2::text[]) AS t(org, trip)
CROSS JOIN LATERAL (
    SELECT "driverId", "latitude", "longitude", "timestamp", "accuracy", "speed", "heading",
           "altitude", "createdAt"
    FROM "TripLocation" WHERE "tripId" = t.trip AND "orgId" = t.org
    ORDER BY "timestamp" DESC LIMIT 1) l
"""


_TRIP_OF = operator.itemgetter(ORG, TRIP)
_TS_OF = operator.itemgetter(TS)


def build_items(rows: list[Record], keys: Keyspace, now_ms: int) -> list[list[object]]:
    """One item per (org, trip): its latest location and its live message, each encoded once.

    Per row this is one StoredLocation and nothing else: rows arrive in runs of one request
    (grouped in C by groupby), timestamps are already UTC (validate.py), sorting is by itemgetter.
    """
    by_trip: dict[tuple[str | None, str], list[Record]] = {}
    for key, run in itertools.groupby(rows, _TRIP_OF):
        got = by_trip.get(key)
        if got is None:
            by_trip[key] = list(run)
        else:
            got.extend(run)
    items: list[list[object]] = []
    loc = StoredLocation
    for (org, trip), recs in by_trip.items():
        recs.sort(key=_TS_OF)
        locs = [loc(r[LAT], r[LON], r[TS], r[ACC], r[SPEED], r[HEADING], r[ALT]) for r in recs]
        newest, driver = recs[-1], recs[-1][DRIVER]
        ts_ms = int(newest[TS].timestamp() * 1000)
        # As str: Redis's Lua cmsgpack cannot read msgpack's bin type.
        message = _JSON.encode(LiveLocations(now_ms, trip, driver, locs)).decode()
        latest = _JSON.encode(LatestLocation(trip, driver, locs[-1])).decode()
        latest_key, channel, fleet_set, fleet_channel, geo_set = keys.names(org, trip)
        items.append([
            latest_key, ts_ms, latest, channel, message, fleet_set, trip, org or "",
            min(ts_ms, now_ms), fleet_channel, geo_set, newest[LON], newest[LAT],
        ])  # fmt: skip
    return items


def _trip_of_item(item: list[object]) -> tuple[str, str]:
    return str(item[7]), str(item[6])


def redis_client(s: Settings) -> aioredis.Redis | RedisCluster:
    """The client for latest locations and publishing (the pod's, and its geofence worker's)."""
    # Retries let the first command after a Redis restart reconnect instead of failing.
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
    if s.redis_mode == "cluster":
        # The cluster client follows MOVED/ASK and reads the topology again after a failure.
        return RedisCluster.from_url(
            s.redis_url, socket_timeout=5, socket_connect_timeout=2, retry=retry,
        )  # fmt: skip
    return aioredis.from_url(
        s.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15,
        retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )  # fmt: skip


class Live:
    """Owns the Redis client used for latest locations and publishing."""

    def __init__(
        self, redis: aioredis.Redis | RedisCluster, keys: Keyspace, latest_ttl_s: int,
        pool: asyncpg.Pool | None, repair_max_trips: int = 100_000,
        repair_interval_s: float = 1.0, nearby_max_age_s: int = 600,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.nearby_max_age_s = nearby_max_age_s
        self.pool = pool
        self.keys = keys
        self.ttl = latest_ttl_s
        if isinstance(redis, RedisCluster):
            self._cluster: RedisCluster | None = redis
            self._script = redis.register_script(CROSS_SLOT + _UPDATE_AND_PUBLISH)
        else:
            self._cluster = None
            self._script = redis.register_script(_UPDATE_AND_PUBLISH)
        self._backlog: collections.deque[list[Record]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self.redis_ok = True
        # Trips whose latest update was lost: (org, trip) -> number of the last loss that
        # named it. A repair forgets a trip only if no newer loss named it meanwhile.
        self._lost: dict[tuple[str, str], int] = {}
        self._losses = 0
        self._repair_max = repair_max_trips
        self._repair_interval = repair_interval_s
        self._repair_at = 0.0  # loop time of the next repair attempt
        # A chunk read from PostgreSQL but not yet written: retried as is while Redis refuses.
        self._chunk: tuple[list[tuple[tuple[str, str], int]], list[list[object]]] | None = None
        # Counts of the current repair episode (first loss until nothing is pending), logged
        # once at its end.
        self._episode = {"repaired": 0, "overflow": 0, "failed_attempts": 0}

    def _geo_from(self) -> int:
        return int((time.time() - self.nearby_max_age_s) * 1000)

    def _prune_below(self) -> int:
        # Past NEARBY_MAX_AGE_S too, should it exceed the TTL: pruning never changes nearby.
        return int((time.time() - max(self.ttl, self.nearby_max_age_s)) * 1000)

    @property
    def repair_pending(self) -> int:
        """Trips whose latest location waits to be set again from PostgreSQL."""
        return len(self._lost)

    def committed(self, rows: list[Record]) -> None:
        """Called by the flusher after each commit; never blocks it."""
        if len(self._backlog) >= _BACKLOG_FLUSHES:
            dropped = self._backlog.popleft()
            trips = {(r[ORG] or "", r[TRIP]) for r in dropped}
            metrics.PUBLISH_DROPPED.inc(len(trips))
            self._lose(trips)
        self._backlog.append(rows)
        self._wakeup.set()

    async def run(self) -> None:
        """Publish committed rows until stop(): then publish what is left and return. While
        some latest update is lost, also repair it, one chunk per turn, between publishes.

        Stopped by a flag, not by cancellation: redis-py may swallow a CancelledError
        that lands inside a command, which would leave the task waiting forever.
        """
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not self._lost:
                await self._wakeup.wait()
            elif (delay := self._repair_at - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
            else:
                await asyncio.sleep(0)  # between chunks: never hold the loop
            self._wakeup.clear()
            await self.drain()
            if self._lost and not self._stopping and loop.time() >= self._repair_at:
                await self.repair_step()
        if self._lost:
            log.warning("latest_repair_abandoned", extra={"trips": len(self._lost)})

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def drain(self) -> None:
        while self._backlog:
            rows = self._backlog.popleft()
            # Merge what piled up while Redis was slow: still one message per trip per call.
            while self._backlog and len(rows) < 50_000:
                rows = rows + self._backlog.popleft()
            await self.publish(rows)

    async def publish(self, rows: list[Record]) -> None:
        now_ms = int(time.time() * 1000)
        items = build_items(rows, self.keys, now_ms)
        updated, skipped, unsure, failed, exc = await self._update(items, now_ms - TRUST_MISSING_MS)
        if failed:
            self.redis_ok = False
            metrics.REDIS_ERRORS.labels("publish").inc()
            metrics.PUBLISH_DROPPED.inc(len(failed))
            log.warning("publish_failed", extra={"error": repr(exc), "trips": len(failed)})
            self._lose(_trip_of_item(items[i]) for i in failed)
            if len(failed) == len(items):
                return
        else:
            self.redis_ok = True
        metrics.PUBLISHED.inc(len(items) - len(failed))
        if unsure:
            fill = [items[i] for i in unsure]
            try:
                updated += await self._latest_from_postgres(fill)
            except Exception as exc:
                log.warning("latest_fill_failed", extra={"error": repr(exc), "trips": len(fill)})
                self._lose(map(_trip_of_item, fill))
        metrics.LATEST_UPDATED.inc(updated)
        if skipped:
            metrics.LATEST_SKIPPED.inc(skipped)

    async def _latest_from_postgres(self, items: list[list[object]]) -> int:
        """Set the latest of trips Redis has no key for from PostgreSQL, whose newest row
        is at least as new as the late upload that was just committed."""
        fixed = await self._newest_stored([_trip_of_item(it) for it in items])
        if not fixed:
            return 0
        updated, _, _, _, exc = await self._update(fixed, 0)
        if exc is not None:
            raise exc
        return updated

    async def _update(
        self, items: list[list[object]], trust_from_ms: int
    ) -> tuple[int, int, list[int], list[int], Exception | None]:
        """Run the script over ``items``: (latest updated, skipped, indexes of missing keys
        left unset, indexes whose call failed, the first failure).

        One call on a single Redis. On a cluster, one call per master, concurrently, each
        declaring one of its keys for the routing (MOVED is followed by redis-py); the script
        may touch that node's other slots (allow-cross-slot-keys). A call that fails leaves
        the other masters' items done.
        """
        if self._cluster is None:
            try:
                done, skipped, unsure = await self._script(
                    args=[
                        _MSGPACK.encode(items),
                        self.ttl,
                        trust_from_ms,
                        "PUBLISH",
                        self._geo_from(),
                        self._prune_below(),
                        PRUNE_PER_CALL,
                    ]
                )
            except Exception as exc:
                return 0, 0, [], list(range(len(items))), exc
            return int(done), int(skipped), list(unsure), [], None
        cluster = self._cluster
        try:
            # The grouping below needs the slot map: a client that has not read it yet would
            # put every item in one call, failing on every other master's keys.
            await cluster.initialize()
        except Exception as exc:
            return 0, 0, [], list(range(len(items))), exc
        updated, skipped, missing, failed, first = await self._per_master(
            cluster, items, range(len(items)), trust_from_ms
        )
        if failed:
            # A slot that moved fails its master's call without a MOVED when the declared key
            # stayed: read the topology again and retry those items once (the script changed
            # nothing before failing).
            with contextlib.suppress(Exception):
                await cluster.nodes_manager.initialize()
            u, k, m, failed, first = await self._per_master(cluster, items, failed, trust_from_ms)
            updated, skipped, missing = updated + u, skipped + k, missing + m
        return updated, skipped, missing, failed, first

    async def _per_master(
        self, cluster: RedisCluster, items: list[list[object]], indexes: Iterable[int],
        trust_from_ms: int,
    ) -> tuple[int, int, list[int], list[int], Exception | None]:  # fmt: skip
        """_update on a cluster for ``items[indexes]``: one concurrent call per master."""
        groups = by_master(cluster, indexes, lambda i: str(items[i][0]))
        calls = [
            self._script(
                keys=[str(items[g[0]][0])],
                args=[
                    _MSGPACK.encode([items[i] for i in g]),
                    self.ttl,
                    trust_from_ms,
                    "SPUBLISH",
                    self._geo_from(),
                    self._prune_below(),
                    PRUNE_PER_CALL,
                ],
            )
            for g in groups.values()
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        updated = skipped = 0
        missing: list[int] = []
        failed: list[int] = []
        first: Exception | None = None
        for g, result in zip(groups.values(), results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failed += g
                first = first or result
                continue
            updated += int(result[0])
            skipped += int(result[1])
            missing += [g[int(i)] for i in result[2]]
        return updated, skipped, missing, failed, first

    async def _newest_stored(self, trips: list[tuple[str, str]]) -> list[list[object]]:
        """Script items (no message to publish) of the newest stored row of each trip. The
        fleet score is min(ts, the row's commit time), as a flush would have written it."""
        if self.pool is None or not trips:
            return []
        rows = await self.pool.fetch(_LATEST_OF, [o for o, _ in trips], [t for _, t in trips])
        items: list[list[object]] = []
        for r in rows:
            org, trip, ts = r["org"], r["trip"], r["timestamp"]
            loc = StoredLocation(
                r["latitude"], r["longitude"], ts.astimezone(UTC), r["accuracy"], r["speed"],
                r["heading"], r["altitude"],
            )  # fmt: skip
            ts_ms = int(ts.timestamp() * 1000)
            written_ms = int(r["createdAt"].timestamp() * 1000)
            items.append([
                self.keys.latest(org, trip), ts_ms,
                _JSON.encode(LatestLocation(trip, r["driverId"], loc)).decode(), "", "",
                self.keys.fleet_set(org, trip), trip, org, min(ts_ms, written_ms), "",
                self.keys.geo_set(org, trip), r["longitude"], r["latitude"],
            ])  # fmt: skip
        return items

    # -- repair of lost latest updates ------------------------------------------------------

    def _lose(self, trips: Iterable[tuple[str, str]]) -> None:
        """Remember trips whose latest update did not reach Redis. Beyond the bound, new trips
        are counted and logged, not remembered (docs/reliability.md says why)."""
        if self.pool is None:
            return
        self._losses += 1
        n, lost = self._losses, self._lost
        room, refused = self._repair_max - len(lost), 0
        for key in trips:
            if key in lost:
                lost[key] = n  # keeps its place in the queue
            elif room > 0:
                lost[key] = n
                room -= 1
            else:
                refused += 1
        if refused:
            if not self._episode["overflow"]:
                log.warning(
                    "latest_repair_overflow",
                    extra={"max_trips": self._repair_max, "first_refused": refused},
                )
            self._episode["overflow"] += refused
            metrics.LATEST_REPAIR_OVERFLOW.inc(refused)
        metrics.LATEST_REPAIR_PENDING.set(len(lost))
        # Not at once: Redis just failed; the next attempt comes one interval later.
        self._repair_at = asyncio.get_running_loop().time() + self._repair_interval

    async def repair_step(self) -> bool:
        """Set the latest of the next chunk of lost trips from PostgreSQL's newest rows;
        forget those no newer loss named meanwhile. False if PostgreSQL or Redis failed
        (the chunk is kept and tried again after LATEST_REPAIR_INTERVAL_S)."""
        try:
            if self._chunk is None:
                chunk = list(itertools.islice(self._lost.items(), _REPAIR_CHUNK))
                self._chunk = (chunk, await self._newest_stored([k for k, _ in chunk]))
            chunk, items = self._chunk
            # Forward-only, from newest stored rows: never older than what a flush wrote.
            if items and (error := (await self._update(items, 0))[4]) is not None:
                raise error
        except Exception as exc:
            self._repair_at = asyncio.get_running_loop().time() + self._repair_interval
            if isinstance(exc, RedisError):
                metrics.REDIS_ERRORS.labels("repair").inc()
            if not self._episode["failed_attempts"]:  # once: Redis may be away for long
                log.warning("latest_repair_failed", extra={"error": repr(exc)})
            self._episode["failed_attempts"] += 1
            return False
        self._chunk = None
        self.redis_ok = True
        # Trips without a stored row (none, unless deleted) are forgotten with the rest.
        lost, before = self._lost, len(self._lost)
        for key, n in chunk:
            if lost.get(key) == n:
                del lost[key]
        repaired = before - len(lost)
        self._episode["repaired"] += repaired
        metrics.LATEST_REPAIRED.inc(repaired)
        metrics.LATEST_REPAIR_PENDING.set(len(lost))
        if not lost:
            episode, self._episode = self._episode, dict.fromkeys(self._episode, 0)
            log.info("latest_repaired", extra=episode)
        return True

    # -- reads ------------------------------------------------------------------------------

    async def latest(self, org: str, trip: str) -> bytes | None:
        """The stored latest location JSON of ``trip`` in ``org``; raises on Redis errors."""
        value = await self.redis.hget(self.keys.latest(org, trip), "v")
        return value.encode() if isinstance(value, str) else value

    async def latest_many(self, org: str, trips: list[str]) -> list[bytes | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for trip in trips:
                pipe.hget(self.keys.latest(org, trip), "v")
            result: list[bytes | None] = await pipe.execute()
        return result

    async def fleet_trips(self, org: str, limit: int) -> list[str]:
        """Trips of ``org`` with a latest location younger than the TTL, newest first (by
        min(ping time, time written): a phone clock running ahead does not rank first)."""
        min_ms = int((time.time() - self.ttl) * 1000)
        sets = self.keys.fleet_sets(org)
        if len(sets) == 1:
            raw = await self.redis.zrange(sets[0], "+inf", min_ms, desc=True, byscore=True,
                                          offset=0, num=limit)  # fmt: skip
            return [t.decode() if isinstance(t, bytes) else str(t) for t in raw]
        # A cluster's org is spread over bucket sets: the newest of each, merged.
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in sets:
                pipe.zrange(key, "+inf", min_ms, desc=True, byscore=True, offset=0, num=limit,
                            withscores=True)  # fmt: skip
            per_set: list[list[tuple[bytes, float]]] = await pipe.execute()
        ranked = heapq.nlargest(
            limit, itertools.chain.from_iterable(per_set), key=operator.itemgetter(1)
        )
        return [t.decode() if isinstance(t, bytes) else str(t) for t, _ in ranked]
