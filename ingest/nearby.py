"""GET /api/v1/tracking/nearby: an org's trucks closest to a point, from Redis GEO.

The live step (live.py) keeps each trip's latest position in its org's GEO set, in the same
script call that moves latest forward: never backwards, and never for a ping older than
NEARBY_MAX_AGE_S. Here one script call per Redis (one per master on a cluster, merged by
distance) first sweeps out the trips that fell silent since the last sweep (their fleet score
passed the cutoff), then runs GEOSEARCH ... ASC COUNT, and checks each hit's fleet score again:
a trip silent for longer than NEARBY_MAX_AGE_S is never answered, whatever the sweep missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import operator
import time
from collections.abc import Mapping

import msgspec
from aiohttp import web
from redis.asyncio.cluster import RedisCluster

from . import auth, metrics
from .keyspace import CROSS_SLOT, by_master
from .live import Live
from .query import BadQuery, parse_limit, parse_number
from .responses import error, json_response, retry_later
from .schema import NearbyTrip, NearbyTrips
from .typedefs import NEARBY

log = logging.getLogger("ingest.nearby")

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
MAX_RADIUS_M = 200_000.0
# Redis GEO indexes these latitudes only (Web Mercator's).
GEO_MAX_LAT = 85.05112878
_NO_STORE = {"Cache-Control": "no-store"}
_MSGPACK = msgspec.msgpack.Encoder()

# ARGV[1]: msgpack list of [GEO key, fleet key, latest key prefix, sweep mark key], all of one
# node. ARGV[2..5]: lon, lat, radius (m), count. ARGV[6]: cutoff (epoch ms): a trip whose fleet
# score is below it is silent. ARGV[7]: TTL of the sweep mark (s).
# Returns per GEO set its hits {trip, distance, latest JSON}, nearest first.
_NEARBY = """
local sets = cmsgpack.unpack(ARGV[1])
local lon, lat, radius, count = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local cutoff, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {}
for _, s in ipairs(sets) do
  local geo, fleet, latest, mark_key = s[1], s[2], s[3], s[4]
  -- Sweep only what fell silent since the last sweep: O(trips gone silent), not O(fleet).
  local mark = tonumber(redis.call('GET', mark_key))
  if (not mark) or mark < cutoff then
    local low = mark and ('(' .. mark) or '-inf'
    local gone = redis.call('ZRANGE', fleet, low, '(' .. cutoff, 'BYSCORE')
    for i = 1, #gone, 500 do
      redis.call('ZREM', geo, unpack(gone, i, math.min(i + 499, #gone)))
    end
    redis.call('SET', mark_key, cutoff, 'EX', ttl)
  end
  local hits = {}
  -- A hit the sweep missed (clocks of pods apart) is removed and the search run again.
  for _ = 1, 3 do
    hits = {}
    local again = false
    local found = redis.call('GEOSEARCH', geo, 'FROMLONLAT', lon, lat, 'BYRADIUS', radius, 'm',
                             'ASC', 'COUNT', count, 'WITHDIST')
    for _, f in ipairs(found) do
      local score = tonumber(redis.call('ZSCORE', fleet, f[1]))
      local v = redis.call('HGET', latest .. f[1], 'v')
      if score and score >= cutoff and v then
        hits[#hits + 1] = {f[1], f[2], v}
      else
        redis.call('ZREM', geo, f[1])
        again = true
      end
    end
    if not again then break end
  end
  out[#out + 1] = hits
end
return out
"""


class _Latest(msgspec.Struct):
    driverId: str
    location: msgspec.Raw


_latest = msgspec.json.Decoder(_Latest)


def parse_query(query: Mapping[str, str]) -> tuple[float, float, float, int]:
    """(lat, lon, radius_m, limit); BadQuery names the parameter."""
    lat = parse_number(query, "lat", -GEO_MAX_LAT, GEO_MAX_LAT)
    lon = parse_number(query, "lon", -180, 180)
    radius = parse_number(query, "radius_m", 0, MAX_RADIUS_M)
    return lat, lon, radius, parse_limit(query, DEFAULT_LIMIT, MAX_LIMIT)


class NearbySearch:
    """The nearby read over an org's GEO sets: one script call per Redis node."""

    def __init__(self, live: Live) -> None:
        self.live = live
        cluster = live.redis if isinstance(live.redis, RedisCluster) else None
        self._cluster = cluster
        source = (CROSS_SLOT + _NEARBY) if cluster is not None else _NEARBY
        self._script = live.redis.register_script(source)

    async def search(
        self, org: str, lat: float, lon: float, radius_m: float, limit: int
    ) -> list[NearbyTrip]:
        live = self.live
        cutoff = int((time.time() - live.nearby_max_age_s) * 1000)
        args: list[float | int] = [lon, lat, radius_m, limit, cutoff, live.ttl]
        sets = live.keys.nearby_sets(org)
        if self._cluster is None:
            per_set = await self._script(args=[_MSGPACK.encode(sets), *args])
        else:
            per_set = await self._per_master(self._cluster, sets, args)
        hits = heapq.nsmallest(
            limit,
            ((float(d), t, v) for hits in per_set for t, d, v in hits),
            key=operator.itemgetter(0),
        )
        trips = []
        for distance, trip, value in hits:
            latest = _latest.decode(value)
            name = trip.decode() if isinstance(trip, bytes) else str(trip)
            trips.append(NearbyTrip(name, latest.driverId, round(distance, 1), latest.location))
        return trips

    async def _per_master(
        self, cluster: RedisCluster, sets: list[tuple[str, str, str, str]], args: list[float | int]
    ) -> list[list[list[bytes]]]:
        """One call per master for the GEO sets it serves; a failed call is retried once
        after reading the topology again (a slot moved), then raised."""
        await cluster.initialize()
        attempt = 1
        while True:
            groups = by_master(cluster, sets, operator.itemgetter(0))
            results = await asyncio.gather(
                *(
                    self._script(keys=[g[0][0]], args=[_MSGPACK.encode(g), *args])
                    for g in groups.values()
                ),
                return_exceptions=True,
            )
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is None:
                return [hits for result in results for hits in result]  # type: ignore[union-attr]
            if attempt == 2 or not isinstance(failure, Exception):
                raise failure
            attempt = 2
            with contextlib.suppress(Exception):
                await cluster.nodes_manager.initialize()


async def nearby(request: web.Request) -> web.Response:
    p = auth.authenticate(request)
    auth.require(p, auth.DISPATCH)
    try:
        lat, lon, radius, limit = parse_query(request.query)
    except BadQuery as exc:
        return error(400, "invalid_query", str(exc))
    try:
        trips = await request.app[NEARBY].search(p.org, lat, lon, radius, limit)
    except Exception as exc:
        metrics.REDIS_ERRORS.labels("nearby").inc()
        log.warning("nearby_failed", extra={"error": repr(exc)})
        return retry_later("live_unavailable", "nearby needs Redis, which did not answer")
    return json_response(NearbyTrips(trips), headers=_NO_STORE)
