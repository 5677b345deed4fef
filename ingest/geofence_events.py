"""After each commit: evaluate the stored pings against their org's geofences, store each
enter and exit once, and send it once to the org's fleet subscribers.

Exactly once across replays and pods rests on one row per trip in "GeofenceState": the time
its pings are evaluated up to and the fences it was then inside. Each flush's evaluation runs
in its own transaction, off the ack path, on the pod that committed the pings:

1. lock the org rows of "GeofenceOrg" (FOR SHARE) and read their fence versions: a fence set
   older than the cached one is never used, and no fence is deleted under the evaluation;
2. lock the trips' state rows, in (org, trip) order (no deadlock between pods);
3. read back the stored pings between the state and the flush's first ping: those of a flush
   (on any pod) whose own evaluation has not run yet, or never will (its pod died). Usually
   there are none, and this is one index probe per trip;
4. walk each trip's pings in time order through the fence index, noting every change;
5. insert the events (their key is a second guard), update the states, commit; then publish
   the events that were inserted.

A replayed batch stores no ping, so it is never evaluated. A ping older than its trip's
evaluated time (a late upload, or a flush committed on another pod that evaluated a newer one
first) makes no event: the crossing is noticed at the next evaluated ping instead.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import operator
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

import asyncpg
import msgspec
from redis.asyncio.cluster import RedisCluster

from . import metrics
from .geofence_shapes import FenceIndex, Shape, parse_shape
from .live import Live
from .records import ACC, ALT, DRIVER, HEADING, LAT, LON, ORG, SPEED, TRIP, TS, Record
from .schema import LiveGeofence, StoredLocation

log = logging.getLogger("ingest.geofences")

_BACKLOG_FLUSHES = 256
# Orgs with fences are looked up this often; a flush of other orgs costs no query. A fence
# created meanwhile is still applied to those pings: a trip's first evaluation reads back its
# pings of the GAP_FIRST before the flush.
ORGS_REFRESH_S = 1.0
GAP_FIRST = timedelta(minutes=10)
# At most this many pings read back per trip (the newest ones) after a long pause.
GAP_MAX_PINGS = 10_000
_RETRY_MIN_S, _RETRY_MAX_S = 0.1, 5.0
_GIVE_UP_AFTER = 8  # failed attempts at one flush (about 15 s of backoff)

_FENCED_ORGS = 'SELECT "orgId" FROM "GeofenceOrg" WHERE "fences" > 0'
_LOCK_ORGS = """
SELECT "orgId", "version" FROM "GeofenceOrg" WHERE "orgId" = ANY($1::text[]) AND "fences" > 0
ORDER BY "orgId" FOR SHARE
"""
_FENCE_IDS = 'SELECT "id" FROM "Geofence" WHERE "orgId" = $1'
_FENCES = """
SELECT "id", "name", "geometry", "radiusM", "createdAt" FROM "Geofence"
WHERE "orgId" = $1 AND "id" = ANY($2::text[])
"""
_LOCK_STATES = """
INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside")
SELECT o, t, NULL, '{}' FROM unnest($1::text[], $2::text[]) AS u(o, t) ORDER BY o, t
ON CONFLICT ("orgId", "tripId") DO UPDATE SET "updatedAt" = now()
RETURNING "orgId", "tripId", "evaluatedTo", "inside"
"""
_GAP = """
SELECT t.i, l.* FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
    WITH ORDINALITY AS t(org, trip, lo, hi, i)
CROSS JOIN LATERAL (
    SELECT "driverId", "latitude", "longitude", "accuracy", "speed", "heading", "altitude",
           "timestamp"
    FROM "TripLocation"
    WHERE "orgId" = t.org AND "tripId" = t.trip AND "timestamp" > t.lo AND "timestamp" < t.hi
    ORDER BY "timestamp" DESC LIMIT $5) l
"""
_INSERT_EVENTS = """
INSERT INTO "GeofenceEvent" ("orgId", "geofenceId", "timestamp", "tripId", "event", "driverId",
    "latitude", "longitude", "accuracy", "speed", "heading", "altitude")
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
    $6::text[], $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[],
    $12::float8[])
ON CONFLICT DO NOTHING
RETURNING "orgId", "geofenceId", "timestamp", "tripId", "event"
"""
# Fence ids are the service's own ("gf_" + URL-safe base64): never a space.
_UPDATE_STATES = """
UPDATE "GeofenceState" s
SET "evaluatedTo" = u.ts, "inside" = string_to_array(u.inside, ' '), "updatedAt" = now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[]) AS u(o, t, ts, inside)
WHERE s."orgId" = u.o AND s."tripId" = u.t
"""

_JSON = msgspec.json.Encoder()
_EMPTY: frozenset[str] = frozenset()
_TRIP_OF = operator.itemgetter(ORG, TRIP)
_TS_OF = operator.itemgetter(TS)


class Fence(msgspec.Struct, frozen=True, gc=False):
    name: str
    shape: Shape
    created: datetime


class FenceSet:
    """An org's fences at one version, and their index."""

    def __init__(self, version: int, fences: dict[str, Fence]) -> None:
        self.version = version
        self.fences = fences
        self.index = FenceIndex((fid, f.shape) for fid, f in fences.items())
        # A fence applies to pings from its creation on: older pings (a late upload, or the
        # pings read back before a trip's first evaluation) do not see it.
        self.newest = max((f.created for f in fences.values()), default=None)

    def containing(self, ping: Record) -> frozenset[str]:
        found = self.index.containing(ping[LAT], ping[LON])
        newest, ts = self.newest, ping[TS]
        if found and newest is not None and ts < newest:
            fences = self.fences
            found = frozenset(f for f in found if fences[f].created <= ts)
        return found


class Event(msgspec.Struct, array_like=True, gc=False):
    org: str
    fence: str
    kind: str  # enter | exit
    ping: Record


def crossings(
    org: str, pings: Iterable[Record], inside: frozenset[str], fences: FenceSet
) -> tuple[list[Event], frozenset[str]]:
    """The enter and exit events of ``pings`` (one trip, time order) starting ``inside``
    those fences, and the fences inside after the last ping. Exits come before enters."""
    events: list[Event] = []
    containing = fences.containing
    for ping in pings:
        now = containing(ping)
        if now != inside:
            events += [Event(org, f, "exit", ping) for f in sorted(inside - now)]
            events += [Event(org, f, "enter", ping) for f in sorted(now - inside)]
            inside = now
    return events, inside


class GeofenceEvaluator:
    """Fed each flush's stored rows (committed()); evaluates them in its own task."""

    def __init__(self, pool: asyncpg.Pool, live: Live, max_vertices: int) -> None:
        self.pool = pool
        self.live = live
        self.max_vertices = max_vertices
        self._backlog: collections.deque[list[Record]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._fenced: frozenset[str] = _EMPTY
        self._fenced_at = -1e9  # loop time of the last look-up of orgs with fences
        self._sets: dict[str, FenceSet] = {}

    def committed(self, rows: list[Record]) -> None:
        """Called by the flusher after each commit; never blocks it."""
        if len(self._backlog) >= _BACKLOG_FLUSHES:
            self._backlog.popleft()  # its trips' next evaluation reads those pings back
            metrics.GEOFENCE_DROPPED.inc()
        self._backlog.append(rows)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        """Flushes committed and not evaluated yet (the one being evaluated included)."""
        return len(self._backlog)

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Evaluate committed rows until stop(), then what is left (one attempt each)."""
        delay, failures = _RETRY_MIN_S, 0
        while True:
            if not self._backlog:
                if self._stopping:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            rows = self._backlog[0]
            try:
                await self.evaluate(rows)
            except Exception as exc:
                metrics.GEOFENCE_FAILURES.inc()
                log.warning("geofence_evaluation_failed", extra={"error": repr(exc)})
                failures += 1
                if self._stopping:
                    self._backlog.clear()
                    return
                if failures >= _GIVE_UP_AFTER and self._backlog and self._backlog[0] is rows:
                    # Whatever fails this flush must not stop every later one: its trips'
                    # next evaluation reads these pings back.
                    self._backlog.popleft()
                    metrics.GEOFENCE_DROPPED.inc()
                    log.error("geofence_flush_given_up", extra={"rows": len(rows)})
                    failures = 0
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            delay, failures = _RETRY_MIN_S, 0
            if self._backlog and self._backlog[0] is rows:
                self._backlog.popleft()

    async def _fenced_orgs(self) -> frozenset[str]:
        now = asyncio.get_running_loop().time()
        if now - self._fenced_at >= ORGS_REFRESH_S:
            rows = await self.pool.fetch(_FENCED_ORGS)
            self._fenced, self._fenced_at = frozenset(r[0] for r in rows), now
        return self._fenced

    async def evaluate(self, rows: list[Record]) -> int:
        """Evaluate one flush's stored rows; the number of events stored."""
        fenced = await self._fenced_orgs()
        if not fenced:
            return 0
        by_trip: dict[tuple[str, str], list[Record]] = {}
        for key, run in itertools.groupby(rows, _TRIP_OF):
            if key[0] in fenced:
                by_trip.setdefault(key, []).extend(run)
        if not by_trip:
            return 0
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction():
            events = await self._evaluate(conn, by_trip)
            stored = await self._store(conn, events)
        metrics.GEOFENCE_SECONDS.observe(time.perf_counter() - started)
        if stored:
            await self._publish(stored)
        return len(stored)

    async def _evaluate(
        self, conn: asyncpg.Connection, by_trip: dict[tuple[str, str], list[Record]]
    ) -> list[Event]:
        orgs = sorted({org for org, _ in by_trip})
        versions = {r[0]: r[1] for r in await conn.fetch(_LOCK_ORGS, orgs)}
        sets = {org: await self._fence_set(conn, org, v) for org, v in versions.items()}
        keys = sorted(k for k in by_trip if k[0] in sets)
        if not keys:
            return []
        states = await conn.fetch(_LOCK_STATES, [o for o, _ in keys], [t for _, t in keys])
        pings: dict[tuple[str, str], list[Record]] = {}
        inside: dict[tuple[str, str], frozenset[str]] = {}
        gap_keys: list[tuple[str, str]] = []
        gap_lo: list[datetime] = []
        gap_hi: list[datetime] = []
        for org, trip, evaluated_to, was_inside in states:
            key = (org, trip)
            recs = sorted(by_trip[key], key=_TS_OF)
            if evaluated_to is not None:
                recs = [r for r in recs if r[TS] > evaluated_to]  # older: a late upload
            if not recs:
                continue
            pings[key] = recs
            fences = sets[org].fences
            inside[key] = frozenset(f for f in was_inside if f in fences)  # deleted: dropped
            first = recs[0][TS]
            gap_keys.append(key)
            gap_lo.append(evaluated_to if evaluated_to is not None else first - GAP_FIRST)
            gap_hi.append(first)
        if gap_keys:
            gap = await conn.fetch(
                _GAP, [o for o, _ in gap_keys], [t for _, t in gap_keys], gap_lo, gap_hi,
                GAP_MAX_PINGS,
            )  # fmt: skip
            if gap:
                metrics.GEOFENCE_GAP_PINGS.inc(len(gap))
                before: dict[tuple[str, str], list[Record]] = {}
                for r in gap:
                    org, trip = gap_keys[r[0] - 1]
                    before.setdefault((org, trip), []).append(
                        (trip, r[1], org, r[2], r[3], r[4], r[5], r[6], r[7], r[8], None)
                    )
                for key, recs in before.items():
                    recs.sort(key=_TS_OF)  # read newest first (the newest GAP_MAX_PINGS)
                    pings[key] = recs + pings[key]
        events: list[Event] = []
        updates: tuple[list[str], list[str], list[datetime], list[str]] = ([], [], [], [])
        evaluated = 0
        for (org, trip), recs in pings.items():
            found, now_inside = crossings(org, recs, inside[(org, trip)], sets[org])
            events += found
            evaluated += len(recs)
            updates[0].append(org)
            updates[1].append(trip)
            updates[2].append(recs[-1][TS])
            updates[3].append(" ".join(sorted(now_inside)))
        if updates[0]:
            await conn.execute(_UPDATE_STATES, *updates)
        metrics.GEOFENCE_EVALUATED.inc(evaluated)
        return events

    async def _fence_set(self, conn: asyncpg.Connection, org: str, version: int) -> FenceSet:
        """The org's fences at ``version``: the cached set, or one read again. Fences never
        change, so only those not cached are read and parsed."""
        cached = self._sets.get(org)
        if cached is not None and cached.version == version:
            return cached
        ids = [r[0] for r in await conn.fetch(_FENCE_IDS, org)]
        old = cached.fences if cached is not None else {}
        fences = {fid: old[fid] for fid in ids if fid in old}
        missing = [fid for fid in ids if fid not in old]
        for fid, name, geometry, radius, created in await conn.fetch(_FENCES, org, missing):
            decoded = msgspec.json.decode(geometry) if isinstance(geometry, str) else geometry
            # The limit it was created under may have been higher: never refuse a stored fence.
            shape = parse_shape(decoded, radius, max(self.max_vertices, 1_000_000))
            fences[fid] = Fence(name, shape, created)
        fence_set = FenceSet(version, fences)
        self._sets[org] = fence_set
        return fence_set

    async def _store(self, conn: asyncpg.Connection, events: list[Event]) -> list[Event]:
        """Insert ``events``; those inserted (a key already stored is not again)."""
        if not events:
            return []
        cols: list[list[object]] = [[] for _ in range(12)]
        for e in events:
            p = e.ping
            for col, value in zip(cols, (
                e.org, e.fence, p[TS], p[TRIP], e.kind, p[DRIVER], p[LAT], p[LON], p[ACC],
                p[SPEED], p[HEADING], p[ALT],
            ), strict=True):  # fmt: skip
                col.append(value)
        inserted = {tuple(r) for r in await conn.fetch(_INSERT_EVENTS, *cols)}
        stored = [
            e for e in events if (e.org, e.fence, e.ping[TS], e.ping[TRIP], e.kind) in inserted
        ]
        for e in stored:
            metrics.GEOFENCE_EVENTS.labels(e.kind).inc()
        return stored

    async def _publish(self, events: list[Event]) -> None:
        """Send each stored event once, to its org's fleet subscribers. Best effort: the
        events are stored, and listed by the events endpoint whatever happens here."""
        live = self.live
        keys = live.keys
        messages: list[tuple[str, bytes]] = []
        for e in events:
            p = e.ping
            fence = self._sets[e.org].fences.get(e.fence)
            name = fence.name if fence is not None else ""
            loc = StoredLocation(p[LAT], p[LON], p[TS], p[ACC], p[SPEED], p[HEADING], p[ALT])
            msg = LiveGeofence(e.kind, e.fence, name, p[TRIP], p[DRIVER], p[TS], loc)
            messages.append((keys.geofence_channel(e.org, p[TRIP]), _JSON.encode(msg)))
        try:
            if isinstance(live.redis, RedisCluster):
                await asyncio.gather(*(live.redis.spublish(c, m) for c, m in messages))
            else:
                async with live.redis.pipeline(transaction=False) as pipe:
                    for channel, message in messages:
                        pipe.publish(channel, message)
                    await pipe.execute()
        except Exception as exc:
            metrics.REDIS_ERRORS.labels("geofence_publish").inc()
            extra = {"error": repr(exc), "events": len(messages)}
            log.warning("geofence_publish_failed", extra=extra)
