"""After each commit: evaluate the stored pings against their org's geofences, store each
enter and exit once, and send it once to the org's fleet subscribers.

Exactly once across replays and pods rests on one row per trip in "GeofenceState": the time
its pings are evaluated up to and the fences it was then inside. Each flush's evaluation runs
in its own transaction, off the ack path, on the pod that committed the pings, and waits
GEOFENCE_SETTLE_MS after the commit, so that a trip's batches committed out of order on two
pods within that time are evaluated in time order:

1. lock the org rows of "GeofenceOrg" (FOR SHARE) and read their fence versions: a fence set
   older than the cached one is never used, and no fence is deleted under the evaluation;
2. in the same statement, lock the trips' state rows (FOR UPDATE, no new row version), in
   (org, trip) order (no deadlock between pods). A trip's first evaluation makes its row
   first, committed on its own (holding no lock), and then locks it with the others: a row
   made under the locks would be taken out of that order;
3. read back the stored pings between the state and the flush's first ping, in a statement
   after the locks: those of a flush (on any pod) whose own evaluation has not run yet.
   Usually there are none, and this is one index probe per trip;
4. walk each trip's pings in time order through the fence index, noting every change (and
   yielding the event loop every few milliseconds: an org's fences never hold the pod);
5. update the states and insert the events (their key is a second guard) in one statement,
   commit; then publish the events that were inserted.

One org's fences can make an event per fence per ping (a million per request), and its walk
can take seconds: a transaction is cut before the ping that would take it past
EVENTS_PER_TRANSACTION events, or once it has walked for _TRANSACTION_WALK_S. Step 5 then
stores the states of the trips walked, the one cut short at its last ping walked, and the
rest (trips not walked first, then the one cut short) goes through steps 1 to 5 again in
another transaction with the rows it was given, as a flush's rows do: the read-back then
covers what was read but not walked, and what another pod committed meanwhile (never carried
over, so the rows held stay bounded). Each transaction commits its events with the states
that account for them, so a later one failing loses or doubles nothing: the memory held, the
statement's size and the time the org rows stay locked (fence changes wait for them) are
bounded. A flush that failed is retried org by org (each in transactions of its own, locks
released by the failed one), so that one org's failure never holds another org's events; so
is the sweep's work.

A sweep (one pod at a time, every few seconds) evaluates the trips with stored pings that no
evaluation took in time: those of a pod that died between its commit and its evaluation, or
of a flush given up or dropped. Dropping a flush makes the state rows its trips lack
(evaluated never) and refreshes the time of the others, so the sweep finds a new trip, and one
last evaluated long ago, too. A swept trip with nothing to evaluate (its pings older than
every fence) has its state moved to the read-back's lower bound, so no later sweep finds it
again (and trips of orgs sorting after it are reached). A replayed batch stores no ping, so it
is never evaluated. A ping older than its trip's evaluated time (a late upload) makes no
event: the crossing is noticed at the next evaluated ping instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import operator
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
from redis.asyncio.cluster import RedisCluster

from . import metrics
from .constants import GEOFENCE_SWEEP_LOCK_ID
from .geofence_shapes import FenceIndex, Shape, stored_shape
from .live import Live
from .query import MAX_TIME
from .records import ACC, ALT, DRIVER, HEADING, LAT, LON, ORG, SPEED, TRIP, TS, Record
from .schema import LiveGeofence, StoredLocation
from .sql_arrays import columns, ids, numbers, split

log = logging.getLogger("ingest.geofences")

BACKLOG_FLUSHES = 256
_UNMADE_MAX = 100_000  # trips of dropped flushes noted for their state rows, at most
# At most this many rows are evaluated in one transaction.
_GROUP_ROWS = 25_000
# At most this many events are held at once and stored by one transaction (one statement, a
# few MB and tens of ms): one org's fences can make up to GEOFENCE_MAX_PER_ORG events per ping,
# a million per request. A transaction that would hold more is cut before the ping that would
# pass the bound (it takes at least one ping: up to max(this, the org's fences) events), its
# trips' states advanced to their last ping walked, and the rest goes to the next transaction.
EVENTS_PER_TRANSACTION = 5_000
# ... and one that has walked pings for this long is cut the same way: an evaluation holds its
# locks (the org rows a fence change waits for) about this long at most, whatever the fences.
_TRANSACTION_WALK_S = 0.5
# Orgs with fences are looked up this often; a flush of other orgs costs no query. Shorter than
# GEOFENCE_SETTLE_MS's default: the look-up an evaluation uses then follows its commit.
ORGS_REFRESH_S = 1.0
# A trip's first evaluation also reads back its pings of this long before the flush (another
# pod's, not evaluated yet).
GAP_FIRST = timedelta(minutes=10)
_US = timedelta(microseconds=1)
# Exact for epoch microseconds below 2**53 (the year 2255): int8 * interval goes by float8.
_US_SQL = "('epoch'::timestamptz + {} * interval '1 microsecond')"
# At most this many pings read back per trip (the newest ones) after a long pause.
GAP_MAX_PINGS = 10_000
# ... and about this many per transaction (at most twice it): after an outage, 500 swept trips
# (or a flush of hundreds) of GAP_MAX_PINGS each would be millions of rows in memory at once.
# Trips past it are read in the next transaction.
READ_BACK_MAX = 50_000
_RETRY_MIN_S, _RETRY_MAX_S = 0.1, 5.0
# Pings walked through the index between looks at the clock, and the time after which the
# evaluation lets the event loop run.
_CHUNK = 16
_PUBLISH_CHUNK = 500
_SLICE_S = 0.004
# ... and how long it then leaves the loop to the rest (requests, the flusher, sockets).
_PAUSE_S = 0.001
SWEEP_INTERVAL_S = 2.0
# The sweep looks at trips evaluated within this long; beyond it, the trip's next ping.
_SWEEP_WINDOW = timedelta(hours=1)
_SWEEP_MAX_TRIPS = 500
_GIVE_UP_AFTER = 8  # failed attempts at one flush (about 15 s of backoff)

FENCED_ORGS = 'SELECT "orgId" FROM "GeofenceOrg" WHERE "fences" > 0'
# Steps 1 and 2 in one statement: the org rows (FOR SHARE) and then the trips' state rows (FOR
# UPDATE), each in key order (no deadlock between pods). Locking a state row makes no new row
# version (an upsert would: two versions per trip per flush, with the update after). A trip
# with no state row yet is not returned: _MAKE_STATES makes it, outside the transaction.
_LOCK = f"""
WITH o AS (
    SELECT "orgId", "version" FROM "GeofenceOrg"
    WHERE "orgId" = ANY($1::text[]) AND "fences" > 0
    ORDER BY "orgId" FOR SHARE
), s AS (
    SELECT "orgId", "tripId", "evaluatedTo", "inside" FROM "GeofenceState"
    WHERE ("orgId", "tripId") IN (SELECT * FROM unnest({split("$2")}, {split("$3")}))
    ORDER BY "orgId", "tripId" FOR UPDATE
)
SELECT "orgId", NULL AS "tripId", "version", NULL AS "evaluatedTo", NULL AS "inside" FROM o
UNION ALL
SELECT "orgId", "tripId", NULL, "evaluatedTo", "inside" FROM s
"""
_FENCE_IDS = 'SELECT "id" FROM "Geofence" WHERE "orgId" = $1'
_FENCES = """
SELECT "id", "name", "geometry", "radiusM", "createdAt" FROM "Geofence"
WHERE "orgId" = $1 AND "id" = ANY($2::text[])
"""
_INSERT_STATES = f"""
INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside")
SELECT o, t, NULL, '{{}}' FROM unnest({split("$1")}, {split("$2")}) AS u(o, t) ORDER BY o, t
ON CONFLICT ("orgId", "tripId") DO"""
# A trip's first evaluation: its state row made, in autocommit, before the transaction that
# locks it (sorted, holding no other lock: it waits at most for another pod's same insert).
_MAKE_STATES = _INSERT_STATES + " NOTHING"
# The trips of a dropped flush: made, or their time refreshed, so that the sweep (which looks
# at rows updated within _SWEEP_WINDOW) finds a trip last evaluated long ago too. Rare: the
# common path (_MAKE_STATES) makes no row version for an existing row.
_REFRESH_STATES = _INSERT_STATES + ' UPDATE SET "updatedAt" = now()'
# Only if a row made so is gone again when locked (retention deleted it): made and locked under
# the locks (another pod's made meanwhile is locked and returned as it is).
_NEW_STATES = (
    _INSERT_STATES
    + """ UPDATE SET "updatedAt" = now()
RETURNING "orgId", "tripId", "evaluatedTo", "inside"
"""
)
# Step 3, after the locks (a statement of its own: its snapshot sees every commit made before
# them). Times are epoch microseconds (int8): an array of them costs the client a fraction of
# what timestamptz's encoding does.
_GAP = f"""
SELECT t.i, l.* FROM unnest(
    {split("$1")}, {split("$2")}, {split("$3")}::int8[], {split("$4")}::int8[])
    WITH ORDINALITY AS t(org, trip, lo, hi, i)
CROSS JOIN LATERAL (
    SELECT "driverId", "latitude", "longitude", "accuracy", "speed", "heading", "altitude",
           "timestamp"
    FROM "TripLocation"
    WHERE "orgId" = t.org AND "tripId" = t.trip
      AND "timestamp" > {_US_SQL.format("t.lo")} AND "timestamp" < {_US_SQL.format("t.hi")}
    ORDER BY "timestamp" DESC LIMIT $5) l
LIMIT $6
"""
# Held by the sweep's connection (a session lock: the sweep is several transactions); asyncpg's
# reset of a connection given back to the pool unlocks it too.
_TRY_SWEEP_LOCK = "SELECT pg_try_advisory_lock($1)"
_SWEEP_UNLOCK = "SELECT pg_advisory_unlock($1)"
# Trips of orgs with fences, evaluated (or whose row was made, evaluated never) within
# _SWEEP_WINDOW, with a ping stored more than the settle time ago and never evaluated: after
# the evaluated time and after the org's oldest fence (as the read-back: a ping before every
# fence has nothing to evaluate, and a trip found for it would be found by every sweep).
# Each trip is one probe of its index from its evaluated time (LATERAL ... LIMIT 1: never a
# scan of the partitions, whatever the planner estimates), and the oldest fence is looked up
# once per org with a trip in the window (not for every fenced org at every sweep: 500 orgs
# of 1,000 fences cost 0.1-0.2 s a sweep). Written as a correlated EXISTS, the planner
# hash-joined every stored ping and ran the oldest-fence subquery per ping: 86 s for 1,024
# trips of 450 pings and 1,000 fences, every SWEEP_INTERVAL_S, a PostgreSQL core taken for
# good. An org whose last fence went meanwhile is not looked at (its trips would be found,
# and skipped, at every sweep until the pod's list of fenced orgs caught up).
_UNEVALUATED = """
WITH orgs AS (
    SELECT DISTINCT "orgId" FROM "GeofenceState"
    WHERE "orgId" = ANY($1::text[]) AND "updatedAt" > now() - $2::interval
), oldest AS MATERIALIZED (  -- (inlined, its subquery would run per trip)
    SELECT "orgId", (SELECT min(g."createdAt") FROM "Geofence" g WHERE g."orgId" = orgs."orgId")
        AS "at"
    FROM orgs
)
SELECT s."orgId", s."tripId" FROM "GeofenceState" s
JOIN oldest o ON o."orgId" = s."orgId" AND o."at" IS NOT NULL
CROSS JOIN LATERAL (
    SELECT 1 FROM "TripLocation" t
    WHERE t."orgId" = s."orgId" AND t."tripId" = s."tripId"
      AND t."timestamp" > greatest(s."evaluatedTo", o."at")
      AND t."createdAt" < now() - $3::interval
    LIMIT 1) found
WHERE s."updatedAt" > now() - $2::interval
ORDER BY s."orgId", s."tripId" LIMIT $4
"""
# Step 5 in one statement: the states updated and the events inserted (those inserted are
# returned: a key already stored is not again). Fence ids are the service's own ("gf_" +
# URL-safe base64): never a space.
_UPDATE_AND_INSERT = f"""
WITH updated AS (
    UPDATE "GeofenceState" s
    SET "evaluatedTo" = {_US_SQL.format("u.us")}, "inside" = string_to_array(u.inside, ' '),
        "updatedAt" = now()
    FROM unnest({split("$1")}, {split("$2")}, {split("$3")}::int8[], $4::text[])
        AS u(o, t, us, inside)
    WHERE s."orgId" = u.o AND s."tripId" = u.t
)
INSERT INTO "GeofenceEvent" ("orgId", "geofenceId", "timestamp", "tripId", "event", "driverId",
    "latitude", "longitude", "accuracy", "speed", "heading", "altitude")
SELECT * FROM unnest($5::text[], $6::text[], $7::timestamptz[], $8::text[], $9::text[],
    $10::text[], $11::float8[], $12::float8[], $13::float8[], $14::float8[], $15::float8[],
    $16::float8[])
ON CONFLICT DO NOTHING
RETURNING "orgId", "geofenceId", "timestamp", "tripId", "event"
"""

_JSON = msgspec.json.Encoder()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The new states: orgs, trips, evaluated-to times (epoch us), fences inside (space-separated).
_Updates = tuple[list[str], list[str], list[int], list[str]]
_EMPTY: frozenset[str] = frozenset()
_TRIP_OF = operator.itemgetter(ORG, TRIP)
_TS_OF = operator.itemgetter(TS)


class _NoStates(Exception):
    """Trips evaluated for the first time: their state rows are to be made (_MAKE_STATES)
    before the transaction that locks them."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__(len(keys))
        self.keys = keys


class _TimeSlice:
    """Lets the event loop run for _PAUSE_S after every _SLICE_S of work: costly fences slow
    their org's events, never the pod's requests."""

    def __init__(self) -> None:
        self._until = time.perf_counter() + _SLICE_S

    async def check(self) -> None:
        if time.perf_counter() > self._until:
            await asyncio.sleep(_PAUSE_S)
            self._until = time.perf_counter() + _SLICE_S


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
        # No ping older than every fence can be in one: nothing older is read back.
        self.oldest = min((f.created for f in fences.values()), default=MAX_TIME)

    def existing(self, found: frozenset[str], ts: datetime) -> frozenset[str]:
        """Those of ``found`` created by ``ts``."""
        fences = self.fences
        return frozenset(f for f in found if fences[f].created <= ts)


class Event(msgspec.Struct, array_like=True, gc=False):
    org: str
    fence: str
    kind: str  # enter | exit
    ping: Record


async def _read_back(
    conn: asyncpg.Connection, keys: list[tuple[str, str]], lo: list[int], hi: list[int]
) -> tuple[list[tuple[int, asyncpg.Record]], int]:
    """The pings stored between each trip's ``lo`` and ``hi`` (the newest GAP_MAX_PINGS of
    each), as (index in ``keys``, row), and how many of ``keys`` they cover: all, unless
    more than READ_BACK_MAX were found; then trips in groups until that many are read."""
    orgs, trips = [o for o, _ in keys], [t for _, t in keys]
    rows = await conn.fetch(
        _GAP, ids(orgs), ids(trips), numbers(lo), numbers(hi), GAP_MAX_PINGS, READ_BACK_MAX + 1
    )
    if len(rows) <= READ_BACK_MAX:  # nearly always: a few or none
        return [(r[0] - 1, r) for r in rows], len(keys)
    del rows  # (the groups' rows replace them: at most 2 x READ_BACK_MAX held at once)
    out: list[tuple[int, asyncpg.Record]] = []
    step = max(1, READ_BACK_MAX // GAP_MAX_PINGS)  # a group reads at most READ_BACK_MAX
    done = 0
    while done < len(keys) and len(out) < READ_BACK_MAX:
        part = slice(done, done + step)
        args = (
            ids(orgs[part]), ids(trips[part]), numbers(lo[part]), numbers(hi[part]),
            GAP_MAX_PINGS, READ_BACK_MAX,
        )  # fmt: skip
        out += [(done + r[0] - 1, r) for r in await conn.fetch(_GAP, *args)]
        done += len(orgs[part])
    return out, done


def crossings(
    org: str, pings: Sequence[Record], inside: frozenset[str], fences: FenceSet
) -> tuple[list[Event], frozenset[str]]:
    """The enter and exit events of ``pings`` (one trip, time order) starting ``inside``
    those fences, and the fences inside after the last ping. Exits come before enters."""
    events, inside, _ = _walk(org, pings, inside, fences, None)
    return events, inside


def _walk(
    org: str, pings: Sequence[Record], inside: frozenset[str], fences: FenceSet,
    room: int | None,
) -> tuple[list[Event], frozenset[str], int]:  # fmt: skip
    """crossings(), stopping before the ping whose events would make more than ``room``
    (None: no bound); also the number of pings walked."""
    events: list[Event] = []
    containing = fences.index.containing
    newest = fences.newest
    # Usually every fence is older than the pings, and the index's answer stands.
    if newest is not None and pings and pings[0][TS] >= newest:
        newest = None
    for n, ping in enumerate(pings):
        now = containing(ping[LAT], ping[LON])
        if newest is not None and now and ping[TS] < newest:
            now = fences.existing(now, ping[TS])
        if now != inside:
            if room is not None and len(events) + len(inside ^ now) > room:
                return events, inside, n
            events += [Event(org, f, "exit", ping) for f in sorted(inside - now)]
            events += [Event(org, f, "enter", ping) for f in sorted(now - inside)]
            inside = now
    return events, inside, len(pings)


def _us(ts: datetime) -> int:
    """Epoch microseconds, exactly."""
    return (ts - _EPOCH) // _US


def trips_of(rows: list[Record]) -> set[tuple[str | None, str]]:
    """The (org, trip) keys of a flush's rows."""
    return {key for key, _ in itertools.groupby(rows, _TRIP_OF)}


class CommitBacklog:
    """The flushes committed and not taken yet, each with the loop time it is due: at most
    BACKLOG_FLUSHES (beyond, the oldest is dropped), and the event that wakes the task that
    takes them. The evaluator's, and the geofence worker's in the pod."""

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._fenced: frozenset[str] = _EMPTY  # orgs with fences, as last looked up
        # Trips of flushes dropped, whose state rows are to be made (_make_states), and how
        # many flushes came before the oldest of those flushes (see GeofenceEvaluator.done).
        self._unmade: set[tuple[str | None, str]] = set()
        self._unmade_after: int | None = None
        self.received = 0  # flushes committed() was given
        self._all_fenced = False  # every row given is of an org with fences (the worker's)
        # (loop time it is due, the flush's stored rows), in commit order.
        self._backlog: collections.deque[tuple[float, list[Record]]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stopping = False

    def committed(self, rows: list[Record]) -> None:
        """Called by the flusher after each commit; never blocks it."""
        due = asyncio.get_running_loop().time() + self._delay_s
        self._backlog.append((due, rows))
        self.received += 1
        self._trim()
        self._wakeup.set()

    def _trim(self) -> None:
        """Drop the oldest flushes beyond BACKLOG_FLUSHES: their trips' next evaluation, or
        the sweep, reads their pings back."""
        backlog = self._backlog
        while len(backlog) > BACKLOG_FLUSHES:
            self._dropped(backlog.popleft()[1])

    def _dropped(self, rows: list[Record]) -> None:
        """A flush not evaluated here: count it, and note its trips of orgs with fences, so
        that each gets a state row (_make_states) even if it has none yet: the sweep finds a
        trip by its row."""
        if self._all_fenced:  # the worker process: the pod sent only rows of orgs with fences
            self._unevaluated(trips_of(rows))
            return
        fenced = self._fenced
        self._unevaluated({k for k in trips_of(rows) if k[0] in fenced} if fenced else set())

    def _unevaluated(self, trips: set[tuple[str | None, str]]) -> None:
        """A flush of these trips (of orgs with fences) will not be evaluated: count it, and
        note them for _make_states."""
        metrics.GEOFENCE_DROPPED.inc()
        if not trips:
            return
        if self._unmade_after is None:  # the flush just taken from the front of the backlog
            self._unmade_after = self.received - len(self._backlog) - 1
        if len(self._unmade) < _UNMADE_MAX:
            self._unmade.update(trips)

    async def _make_states(self, pool: asyncpg.Pool) -> None:
        """Make the state rows (evaluated never) of the trips of dropped flushes that have
        none, and refresh the others' time; best effort, off the ack path: a trip with a row
        updated within _SWEEP_WINDOW is found by the sweep."""
        keys = sorted(self._unmade)
        try:
            await pool.execute(_REFRESH_STATES, *columns([(o or "", t) for o, t in keys], 2))
        except Exception as exc:  # kept, for the next turn
            log.warning("geofence_states_not_made", extra={"trips": len(keys), "error": repr(exc)})
            return
        self._unmade.difference_update(keys)
        if not self._unmade:  # (trips of a flush dropped meanwhile wait for the next turn)
            self._unmade_after = None

    def stop(self) -> None:
        """Take what is left at once, due or not, then end run()."""
        self._stopping = True
        self._wakeup.set()

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` have passed or something was committed or stop() was called."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), seconds)
        self._wakeup.clear()


class GeofenceEvaluator(CommitBacklog):
    """Fed each flush's stored rows (committed()); evaluates them in its own task."""

    def __init__(
        self, pool: asyncpg.Pool, live: Live, settle_s: float,
        sweep_interval_s: float = SWEEP_INTERVAL_S, *, waited: bool = False,
    ) -> None:  # fmt: skip
        self.pool = pool
        self.live = live
        # The sweep leaves alone the pings committed within it (their flush's evaluation is
        # due then); ``waited``: committed() is called once it has passed (the worker process).
        super().__init__(0.0 if waited else settle_s)
        self._all_fenced = waited  # the worker process: the pod sends only orgs with fences
        self.settle_s = settle_s
        self.sweep_interval_s = sweep_interval_s
        self._fenced_at = -1e9  # loop time of the last look-up of orgs with fences
        self._sweep_at = 0.0
        self._sets: dict[str, FenceSet] = {}
        # Where each evaluation's duration goes (the worker process sends it to the pod's).
        self.observe_seconds: Callable[[float], None] = metrics.GEOFENCE_SECONDS.observe

    @property
    def pending(self) -> int:
        """Flushes committed and not evaluated yet (the one being evaluated included)."""
        return len(self._backlog)

    @property
    def done(self) -> int:
        """How many flushes, from the first received, are done with for good: evaluated, or
        dropped and their trips' state rows made (so that the sweep finds them). Flushes
        leave the backlog in the order they came, so these are the first ``done``; a flush
        evaluated after a dropped one whose rows are not made yet is not counted until then."""
        done = self.received - len(self._backlog)
        return done if self._unmade_after is None else min(done, self._unmade_after)

    async def run(self) -> None:
        """Evaluate committed rows, each once due, and sweep, until stop(); then evaluate what
        is left (one attempt each)."""
        loop = asyncio.get_running_loop()
        self._sweep_at = loop.time() + self.sweep_interval_s
        delay, failures = _RETRY_MIN_S, 0
        while True:
            if self._unmade:
                await self._make_states(self.pool)
            now = loop.time()
            if now >= self._sweep_at and not self._stopping:
                await self._sweep_safely()
                self._sweep_at = loop.time() + self.sweep_interval_s
                continue
            if not self._backlog:
                if self._stopping:
                    return
                await self._sleep(self._sweep_at - now)
                continue
            due, first = self._backlog[0]
            if due > now and not self._stopping:
                await self._sleep(min(due, self._sweep_at) - now)
                continue
            # The flushes due, evaluated together (one transaction, as a group commit shares
            # one COMMIT), as long as no two share a trip. After a failure, the oldest
            # alone, each org in transactions of its own, so that whatever fails it holds up
            # no other flush, nor another org's events.
            group = [first] if failures else self._due(now)
            try:
                if failures:
                    await self.evaluate_by_org(first)
                else:
                    await self.evaluate(group[0] if len(group) == 1 else [*itertools.chain(*group)])
            except Exception as exc:
                metrics.GEOFENCE_FAILURES.inc()
                log.warning("geofence_evaluation_failed", extra={"error": repr(exc)})
                failures += 1
                if self._stopping:  # one attempt each: the rest is dropped (state rows made)
                    while self._backlog:
                        self._dropped(self._backlog.popleft()[1])
                    continue
                if failures >= _GIVE_UP_AFTER and self._backlog and self._backlog[0][1] is first:
                    # Whatever fails this flush must not stop every later one: its trips'
                    # next evaluation, or the sweep, reads these pings back.
                    self._dropped(self._backlog.popleft()[1])
                    log.error("geofence_flush_given_up", extra={"rows": len(first)})
                    failures = 0
                await self._sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            delay, failures = _RETRY_MIN_S, 0
            done = {id(rows) for rows in group}
            # (committed() may have dropped some of them meanwhile, if the backlog was full)
            while self._backlog and id(self._backlog[0][1]) in done:
                self._backlog.popleft()

    def _due(self, now: float) -> list[list[Record]]:
        """The flushes due by ``now`` (all of them when stopping), oldest first, up to
        _GROUP_ROWS rows (at least one flush), and none sharing a trip with an earlier one: a
        trip's read-back covers the pings before its first one in the evaluation, so pings of
        another pod's flush between two of them would be skipped."""
        group: list[list[Record]] = []
        trips: set[tuple[str | None, str]] = set()
        total = 0
        for due, rows in self._backlog:
            if group:
                if (due > now and not self._stopping) or total + len(rows) > _GROUP_ROWS:
                    break
                if len(group) == 1:  # (looked at only when a second flush is due)
                    trips = trips_of(group[0])
                mine = trips_of(rows)
                if not trips.isdisjoint(mine):
                    break
                trips |= mine
            group.append(rows)
            total += len(rows)
        return group

    async def _fenced_orgs(self) -> frozenset[str]:
        now = asyncio.get_running_loop().time()
        if now - self._fenced_at >= ORGS_REFRESH_S:
            rows = await self.pool.fetch(FENCED_ORGS)
            self._fenced, self._fenced_at = frozenset(r[0] for r in rows), now
            # An org without fences any more holds no memory here.
            self._sets = {o: s for o, s in self._sets.items() if o in self._fenced}
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
        async with self.pool.acquire() as conn:
            return await self._in_transactions(conn, by_trip)

    async def evaluate_by_org(self, rows: list[Record]) -> int:
        """evaluate(), each org's rows apart: a failure (a statement timed out) holds no
        other org's events. What an earlier attempt stored is skipped (the states say so);
        raises the first failure once every org was tried."""
        by_org: dict[str | None, list[Record]] = {}
        for row in rows:
            by_org.setdefault(row[ORG], []).append(row)
        stored, failed = 0, None
        for org_rows in by_org.values():
            try:
                stored += await self.evaluate(org_rows)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        return stored

    async def sweep(self) -> int:
        """Evaluate trips whose stored pings no evaluation took (at most _SWEEP_MAX_TRIPS),
        each org's in transactions of its own; the number of events stored. One pod sweeps
        at a time."""
        fenced = await self._fenced_orgs()
        if not fenced:
            return 0
        stored = 0
        async with self.pool.acquire() as conn:
            if not await conn.fetchval(_TRY_SWEEP_LOCK, GEOFENCE_SWEEP_LOCK_ID):
                return 0  # another pod sweeps
            try:
                window = timedelta(seconds=self.settle_s + 1)
                found = await conn.fetch(
                    _UNEVALUATED, sorted(fenced), _SWEEP_WINDOW, window, _SWEEP_MAX_TRIPS
                )
                by_org: dict[str, dict[tuple[str, str], list[Record]]] = {}
                for org, trip in found:
                    by_org.setdefault(org, {})[(org, trip)] = []
                for org, by_trip in by_org.items():
                    try:
                        stored += await self._in_transactions(conn, by_trip)
                    except Exception as exc:  # the next sweep finds them again
                        metrics.GEOFENCE_FAILURES.inc()
                        log.warning("geofence_sweep_failed", extra={"org": org, "error": repr(exc)})
            finally:
                await conn.execute(_SWEEP_UNLOCK, GEOFENCE_SWEEP_LOCK_ID)
        return stored

    async def _sweep_safely(self) -> None:
        try:
            if stored := await self.sweep():
                log.info("geofence_sweep_found", extra={"events": stored})
        except Exception as exc:
            metrics.GEOFENCE_FAILURES.inc()
            log.warning("geofence_sweep_failed", extra={"error": repr(exc)})

    async def _in_transactions(
        self, conn: asyncpg.Connection, by_trip: dict[tuple[str, str], list[Record]]
    ) -> int:
        """Evaluate ``by_trip`` (steps 1 to 5), in as many transactions as the bounds take
        (usually one), publishing each one's events once it is committed; the number stored.
        Each commits its trips' states with its events: a later one failing loses or doubles
        nothing (its retry starts from those states)."""
        started = time.perf_counter()
        made = False
        total = 0
        while by_trip:
            try:
                async with conn.transaction():
                    events, updates, rest = await self._evaluate(conn, by_trip, made)
                    stored = await self._store(conn, events, updates)
            except _NoStates as new:  # rolled back: no lock held
                await conn.execute(_MAKE_STATES, *columns(new.keys, 2))
                made = True
                continue
            del events  # (only the stored ones are held while they are published)
            if stored:
                await self._publish(stored)
                total += len(stored)
            by_trip = rest
        self.observe_seconds(time.perf_counter() - started)
        return total

    async def _evaluate(
        self, conn: asyncpg.Connection, by_trip: dict[tuple[str, str], list[Record]],
        made: bool = False,
    ) -> tuple[list[Event], _Updates, dict[tuple[str, str], list[Record]]]:  # fmt: skip
        """The events of ``by_trip``'s pings, the trips' new states, and what is left for
        another transaction (see EVENTS_PER_TRANSACTION and READ_BACK_MAX): the trips not
        read back, the trips not walked, then the one cut short, each with the rows given.
        A trip given no rows (the sweep) is evaluated from its stored pings after its state,
        if it has one. Raises _NoStates for trips with pings and no state row, unless
        ``made`` (they were made before this transaction: one deleted since is made here)."""
        updates: _Updates = ([], [], [], [])
        orgs = sorted({org for org, _ in by_trip})
        keys = sorted(by_trip)
        versions: dict[str, int] = {}
        states: list[tuple[str, str, datetime | None, list[str]]] = []
        for org, trip, version, evaluated_to, was_inside in await conn.fetch(
            _LOCK, orgs, *columns(keys, 2)
        ):
            if trip is None:
                versions[org] = version
            else:
                states.append((org, trip, evaluated_to, was_inside))
        if len(states) < len(keys):
            have = {(o, t) for o, t, _, _ in states}
            new = [k for k in keys if k not in have and k[0] in versions and by_trip[k]]
            if new and not made:
                raise _NoStates(new)
            if new:
                states += await conn.fetch(_NEW_STATES, *columns(new, 2))
        sets = {org: await self._fence_set(conn, org, v) for org, v in versions.items()}
        pings: dict[tuple[str, str], list[Record]] = {}
        inside: dict[tuple[str, str], frozenset[str]] = {}
        # A swept trip's lower bound of the read-back, if after its evaluated time: where its
        # state goes if nothing is read back (no sweep finds it again for those pings).
        swept_lo: dict[tuple[str, str], datetime] = {}
        gap_keys: list[tuple[str, str]] = []
        gap_lo: list[int] = []
        gap_hi: list[int] = []
        state_of = {(org, trip): (at, was) for org, trip, at, was in states}
        del states
        # In the flush's order, as the walk below (the end says in which order what is left
        # goes on).
        for key in by_trip:
            if key not in state_of:
                continue
            org, trip = key
            evaluated_to, was_inside = state_of[key]
            fences = sets.get(org)
            if fences is None:  # the org's last fence went meanwhile
                continue
            recs = sorted(by_trip[key], key=_TS_OF)
            if evaluated_to is not None:
                recs = [r for r in recs if r[TS] > evaluated_to]  # older: a late upload
            if not recs and by_trip[key]:
                continue  # only late pings
            inside[key] = frozenset(f for f in was_inside if f in fences.fences)  # deleted
            pings[key] = recs
            hi = recs[0][TS] if recs else MAX_TIME
            if evaluated_to is not None:
                lo = evaluated_to
            else:  # a first evaluation: GAP_FIRST before its pings; the sweep's, all there are
                lo = hi - GAP_FIRST if recs else fences.oldest
            lo = max(lo, fences.oldest)
            if not recs and (evaluated_to is None or lo > evaluated_to):
                swept_lo[key] = lo
            gap_keys.append(key)
            gap_lo.append(_us(lo))
            gap_hi.append(_us(hi))
        rest: dict[tuple[str, str], list[Record]] = {}
        # How much of each bound that can cut this transaction each org took, and which cut.
        took: dict[str, dict[str, float]] = {"read_back": {}, "events": {}, "time": {}}
        read_of, made_of, spent_of = took["read_back"], took["events"], took["time"]
        cut_by: set[str] = set()
        if gap_keys:
            gap, read = await _read_back(conn, gap_keys, gap_lo, gap_hi)
            if read < len(gap_keys):
                cut_by.add("read_back")
                for key in gap_keys[read:]:
                    del pings[key]
                    swept_lo.pop(key, None)
                    rest[key] = by_trip[key]
            if gap:
                metrics.GEOFENCE_GAP_PINGS.inc(len(gap))
                before: dict[tuple[str, str], list[Record]] = {}
                for i, r in gap:
                    org, trip = gap_keys[i]
                    before.setdefault((org, trip), []).append(
                        (trip, r[1], org, r[2], r[3], r[4], r[5], r[6], r[7], r[8], None)
                    )
                del gap  # (its records are copied: not held twice during the walk)
                for key, recs in before.items():
                    recs.sort(key=_TS_OF)  # read newest first (the newest GAP_MAX_PINGS)
                    read_of[key[0]] = read_of.get(key[0], 0) + len(recs)
                    recs += pings[key]
                    pings[key] = recs
                del before
        events: list[Event] = []
        cut: tuple[str, str] | None = None  # the trip cut short (it goes on as given)
        evaluated = 0
        time_slice = _TimeSlice()
        walk_until = time.perf_counter() + _TRANSACTION_WALK_S
        for key in by_trip:
            if key not in pings:
                continue
            recs = pings[key]
            if cut is not None:
                if recs:  # as given, never with its read-back rows: read again from its state
                    rest[key] = by_trip[key]
                continue
            org, trip = key
            now_inside = inside[key]
            if not recs:
                if key in swept_lo:  # nothing to evaluate: found by no later sweep
                    updates[0].append(org)
                    updates[1].append(trip)
                    updates[2].append(_us(swept_lo[key]))
                    updates[3].append(" ".join(sorted(now_inside)))
                continue
            fences = sets[org]
            walked = 0
            started = time.perf_counter()
            if evaluated and started > walk_until:
                cut_by.add("time")
                cut = key
                continue
            events_before = len(events)
            while walked < len(recs):
                # At least one ping per transaction: it makes at most one event per fence.
                room = EVENTS_PER_TRANSACTION - len(events)
                if not events:
                    room = max(room, len(fences.fences))
                chunk = recs[walked : walked + _CHUNK]
                found, now_inside, n = _walk(org, chunk, now_inside, fences, room)
                events += found
                walked += n
                if n < len(chunk):
                    cut_by.add("events")
                    break
                await time_slice.check()
                if walked < len(recs) and time.perf_counter() > walk_until:
                    cut_by.add("time")
                    break
            spent_of[org] = spent_of.get(org, 0) + time.perf_counter() - started
            made_of[org] = made_of.get(org, 0) + len(events) - events_before
            if walked < len(recs):
                cut = key  # its state moves on: what is left is read back
            evaluated += walked
            if walked:
                updates[0].append(org)
                updates[1].append(trip)
                updates[2].append(_us(recs[walked - 1][TS]))
                updates[3].append(" ".join(sorted(now_inside)))
        if cut is not None:
            rest[cut] = by_trip[cut]
        for reason in cut_by:  # (each at most once a transaction)
            metrics.GEOFENCE_CUTS.labels(reason).inc()
        if len(rest) > 1:
            # The org that took most of each bound that cut (on a tie, the one cut short) goes
            # last in the next: another org's trip waits for one transaction of each org
            # flooding or catching up, wherever it is in the flush. The sort is stable: in an
            # org, the trips not read back, those not walked, then the one cut short.
            cut_org = cut[0] if cut is not None else None
            last = {
                max(took[b], key=lambda org: (took[b][org], org == cut_org))
                for b in cut_by
                if took[b]
            }
            rest = dict(sorted(rest.items(), key=lambda item: item[0][0] in last))
        metrics.GEOFENCE_EVALUATED.inc(evaluated)
        return events, updates, rest

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
        time_slice = _TimeSlice()
        for fid, name, geometry, radius, created in await conn.fetch(_FENCES, org, missing):
            # Checked when it was created: built as it is (never refused by a lower limit now).
            fences[fid] = Fence(name, stored_shape(msgspec.json.decode(geometry), radius), created)
            await time_slice.check()
        fence_set = FenceSet(version, fences)
        self._sets[org] = fence_set
        return fence_set

    async def _store(
        self, conn: asyncpg.Connection, events: list[Event], updates: _Updates
    ) -> list[Event]:
        """Update the trips' states and insert ``events``; the events inserted (a key already
        stored is not again)."""
        if not events and not updates[0]:
            return []
        cols: list[list[object]] = [[] for _ in range(12)]
        for e in events:
            p = e.ping
            for col, value in zip(cols, (
                e.org, e.fence, p[TS], p[TRIP], e.kind, p[DRIVER], p[LAT], p[LON], p[ACC],
                p[SPEED], p[HEADING], p[ALT],
            ), strict=True):  # fmt: skip
                col.append(value)
        orgs, trips, times, inside = updates
        states = (ids(orgs), ids(trips), numbers(times), inside)
        inserted = {tuple(r) for r in await conn.fetch(_UPDATE_AND_INSERT, *states, *cols)}
        stored = [
            e for e in events if (e.org, e.fence, e.ping[TS], e.ping[TRIP], e.kind) in inserted
        ]
        for kind, count in collections.Counter(e.kind for e in stored).items():
            metrics.GEOFENCE_EVENTS.labels(kind).inc(count)
        return stored

    async def _publish(self, events: list[Event]) -> None:
        """Send each stored event once, to its org's fleet subscribers. Best effort: the
        events are stored, and listed by the events endpoint whatever happens here."""
        live = self.live
        keys = live.keys
        for i in range(0, len(events), _PUBLISH_CHUNK):
            messages: list[tuple[str, bytes]] = []
            for e in events[i : i + _PUBLISH_CHUNK]:
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
                extra = {"error": repr(exc), "events": len(events) - i}
                log.warning("geofence_publish_failed", extra=extra)
                return
            await asyncio.sleep(0)  # many events (overlapping fences): the loop runs between
