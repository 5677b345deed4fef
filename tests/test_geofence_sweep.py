"""The sweep's statement (geofence_events._UNEVALUATED: the oldest fence once per org with a
trip in the window, each trip probed with LATERAL ... LIMIT 1) against the correlated EXISTS it
replaced (kept below as _OLD_UNEVALUATED, the reference), on the real PostgreSQL. Written by a
cold review of the change, which found the first cut reading every fenced org's fences.

What it must keep: the same trips found (an org without any fence aside), never another org's
trip, nothing found again once swept; and its plan must stay a probe per trip whatever the
data's shape (months of partitions, NULL evaluated times, generic plans, many orgs)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ingest import geofence_events, partitions

from . import test_geofence_limits
from .test_geofence_limits import (
    _FENCE,
    _GEOMETRY,
    _ORG,
    _PING,
    _STATE,
    FAR,
    INSIDE,
    _plan,
    _rows_read,
    circle_of,
)

evaluator_of = test_geofence_limits.evaluator_of  # the fixture, used here too

# The statement before, verbatim: the reference for which trips are to be found.
_OLD_UNEVALUATED = """
SELECT s."orgId", s."tripId" FROM "GeofenceState" s
WHERE s."orgId" = ANY($1::text[]) AND s."updatedAt" > now() - $2::interval
  AND EXISTS (
    SELECT 1 FROM "TripLocation" t
    WHERE t."orgId" = s."orgId" AND t."tripId" = s."tripId"
      AND t."timestamp" > greatest(s."evaluatedTo",
          (SELECT min(g."createdAt") FROM "Geofence" g WHERE g."orgId" = s."orgId"))
      AND t."createdAt" < now() - $3::interval)
ORDER BY s."orgId", s."tripId" LIMIT $4
"""
_NEW = geofence_events._UNEVALUATED
_SETTLE = timedelta(seconds=3)
_PING_AT = """
INSERT INTO "TripLocation" ("tripId", "driverId", "orgId", "latitude", "longitude", "timestamp",
    "createdAt")
VALUES ($1, 'drv_1', $2, $3, $4, $5, $6)
"""


def _args(orgs: list[str], limit: int = geofence_events._SWEEP_MAX_TRIPS) -> tuple[Any, ...]:
    return (orgs, geofence_events._SWEEP_WINDOW, _SETTLE, limit)


async def _found(
    db, statement: str, orgs: list[str], limit: int = 10_000, settle: timedelta = _SETTLE
) -> list[tuple]:
    args = (orgs, geofence_events._SWEEP_WINDOW, settle, limit)
    return [tuple(r) for r in await db.fetch(statement, *args)]


def _months_back(now: datetime, n: int) -> list[date]:
    this = partitions.month_start(now)
    return [partitions.add_months(this, -k) for k in range(n + 1)]


async def test_finds_the_same_trips_as_the_statement_it_replaces(db):
    """Orgs a, b, c (fences at various ages), y (fences, not in $1) and z (in $1, every fence
    deleted), trips in every combination of evaluated time (NULL, before or after the oldest
    fence, recent), pings (none, before the fence, evaluated, stored in the settle time, not
    evaluated, a month back, a late upload) and state time (in the window or not), the same
    trip ids in every org. The new statement finds exactly what the old one found, less org
    z's trips, and exactly what the rule in Python says (no other org's data counts)."""
    now = datetime.now(UTC).replace(microsecond=0)
    await partitions.ensure(db, _months_back(now, 3))
    rng = random.Random(6_9_17)
    fence_age = {"a": timedelta(days=40), "b": timedelta(hours=2), "c": timedelta(minutes=30),
                 "y": timedelta(days=80)}  # fmt: skip
    oldest: dict[str, datetime] = {}
    for org, age in fence_age.items():
        for i in range(3):
            created = now - age + timedelta(minutes=i)
            await db.execute(_FENCE, org, f"gf_{org}_{i}", _GEOMETRY, created)
        oldest[org] = now - age
        await db.execute(_ORG, org)
    evaluated_choices = [
        None, timedelta(days=60), timedelta(days=35), timedelta(hours=3), timedelta(minutes=45),
        timedelta(minutes=20), timedelta(minutes=5), timedelta(seconds=1),
    ]  # fmt: skip
    ping_offsets = [  # (timestamp ago, createdAt ago)
        (timedelta(days=50), timedelta(days=50)), (timedelta(days=38), timedelta(days=38)),
        (timedelta(hours=2, minutes=30), timedelta(hours=2, minutes=30)),
        (timedelta(minutes=50), timedelta(minutes=50)),
        (timedelta(minutes=25), timedelta(minutes=25)), (timedelta(minutes=10), timedelta(seconds=30)),
        (timedelta(minutes=3), timedelta(minutes=3)), (timedelta(seconds=2), timedelta(seconds=1)),
        (timedelta(seconds=30), timedelta(seconds=1)),  # stored within the settle time
        (timedelta(days=1), timedelta(seconds=1)),  # a late upload, just stored
    ]  # fmt: skip
    states: list[tuple[str, str, datetime | None, datetime]] = []
    pings: list[tuple[str, str, datetime, datetime]] = []
    for org in ["a", "b", "c", "y", "z"]:
        for n in range(40):
            trip = f"t{n}"  # the same trip ids in every org
            if n % 13 != 12:  # (some trips have pings and no state)
                ev = rng.choice(evaluated_choices)
                updated = now - (timedelta(hours=2) if n % 7 == 6 else timedelta(minutes=1))
                states.append((org, trip, None if ev is None else now - ev, updated))
            for ts_ago, created_ago in rng.sample(ping_offsets, rng.randrange(0, 4)):
                pings.append((trip, org, now - ts_ago, now - created_ago))
    await db.executemany(
        'INSERT INTO "GeofenceState" ("orgId", "tripId", "evaluatedTo", "inside", "updatedAt") '
        "VALUES ($1, $2, $3, '{}', $4)",
        states,
    )
    await db.executemany(_PING_AT.replace("$3, $4, $5, $6", f"{FAR[0]}, {FAR[1]}, $3, $4"), pings)
    await db.execute('ANALYZE "Geofence", "GeofenceState", "TripLocation"')
    orgs = ["a", "b", "c", "z"]
    # A settle time of 10 minutes here: every ping is minutes from its bound, whenever the
    # statements run.
    settle = timedelta(minutes=10)
    old = await _found(db, _OLD_UNEVALUATED, orgs, settle=settle)
    new = await _found(db, _NEW, orgs, settle=settle)
    assert new == [k for k in old if k[0] != "z"]
    expected = sorted(
        (org, trip)
        for org, trip, ev, updated in states
        if org in oldest and org in orgs and updated > now - timedelta(hours=1)
        and any(
            p_org == org and p_trip == trip and created < now - settle
            and ts > max(ev or oldest[org], oldest[org])
            for p_trip, p_org, ts, created in pings
        )
    )  # fmt: skip
    assert new == expected
    assert {o for o, _ in new} >= {"a", "b", "c"}  # (the data exercises every org)
    # The bound: the first $4 of the same order.
    assert await _found(db, _NEW, orgs, 7, settle) == new[:7]


async def test_another_orgs_fences_and_pings_change_nothing(db):
    """Org a: a fence a day old, and trip "t" with a ping stored an hour ago, not evaluated.
    Org b: a fence 10 minutes old and trip "t" too, evaluated 20 minutes ago, with a ping 15
    minutes ago (before b's fence: nothing to evaluate). Only a's trip is found; b's is not,
    whatever a holds (a's older fence, a's ping of the same trip id); b's own ping after its
    fence makes b's found, and b's pings never make a's found."""
    now = datetime.now(UTC).replace(microsecond=0)
    await db.execute(_FENCE, "a", "gf_a", _GEOMETRY, now - timedelta(days=1))
    await db.execute(_ORG, "a")
    await db.execute(_FENCE, "b", "gf_b", _GEOMETRY, now - timedelta(minutes=10))
    await db.execute(_ORG, "b")
    await db.execute(_STATE, "a", "t", now - timedelta(hours=2), now)
    await db.execute(_STATE, "b", "t", now - timedelta(minutes=20), now)
    await db.execute(_PING, "t", "a", *INSIDE, now - timedelta(hours=1))
    await db.execute(_PING, "t", "b", *INSIDE, now - timedelta(minutes=15))
    for orgs in (["a", "b"], ["b"]):
        want = [("a", "t")] if "a" in orgs else []
        assert await _found(db, _NEW, orgs) == want
        assert await _found(db, _OLD_UNEVALUATED, orgs) == want
    await db.execute(_PING, "t", "b", *INSIDE, now - timedelta(minutes=5))
    assert await _found(db, _NEW, ["a", "b"]) == [("a", "t"), ("b", "t")]
    # a's trip evaluated past its own ping (and before b's pings of the same trip id).
    await db.execute(
        'UPDATE "GeofenceState" SET "evaluatedTo" = $1 WHERE "orgId" = \'a\'',
        now - timedelta(minutes=30),
    )
    assert await _found(db, _NEW, ["a", "b"]) == [("b", "t")]
    assert await _found(db, _NEW, ["a"]) == []


async def test_an_org_whose_fences_are_all_gone_is_not_looked_at(evaluator_of, db, monkeypatch):
    """The one change in what is found: org a, still listed as fenced by a pod (its look-up is
    up to ORGS_REFRESH_S old), deleted its last fence; its 4 trips have pings no evaluation
    took. The old statement found them (each sweep, and evaluated none: no fence set), ahead
    of org b's dropped trip when the sweep takes 3; the new one does not look at a, and b's
    event is stored at the first sweep. Nothing is lost for a: a fence applies to pings from
    its creation on, and a ping after a new fence is found again."""
    monkeypatch.setattr(geofence_events, "_SWEEP_MAX_TRIPS", 3)
    monkeypatch.setattr(geofence_events, "ORGS_REFRESH_S", 60.0)
    now = datetime.now(UTC).replace(microsecond=0)
    await circle_of(db, "b", now - timedelta(hours=1))
    await db.execute(_ORG, "a")  # its counts as a pod last read them
    for i in range(4):
        await db.execute(_STATE, "a", f"a_{i}", now - timedelta(minutes=20), now)
        await db.execute(_PING, f"a_{i}", "a", *INSIDE, now - timedelta(minutes=10))
    await db.execute(_STATE, "b", "dropped", None, now)
    ping_at = now - timedelta(minutes=2)
    await db.execute(_PING, "dropped", "b", *INSIDE, ping_at)
    assert await _found(db, _OLD_UNEVALUATED, ["a", "b"], 3) == [
        ("a", "a_0"), ("a", "a_1"), ("a", "a_2")
    ]  # fmt: skip
    assert await _found(db, _NEW, ["a", "b"], 3) == [("b", "dropped")]
    evaluator = evaluator_of(waited=True)
    assert await evaluator._fenced_orgs() == {"a", "b"}
    await db.execute('UPDATE "GeofenceOrg" SET "fences" = 0, "version" = 2 WHERE "orgId" = \'a\'')
    assert await evaluator.sweep() == 1  # the look-up of fenced orgs is still a second old
    rows = await db.fetch('SELECT "tripId", "event", "timestamp" FROM "GeofenceEvent"')
    assert [tuple(r) for r in rows] == [("dropped", "enter", ping_at)]
    assert await _found(db, _NEW, ["a", "b"]) == []
    # a makes a fence again (created 5 minutes ago, as the trips' next pings come after it).
    await db.execute(_FENCE, "a", "gf_a", _GEOMETRY, now - timedelta(minutes=5))
    await db.execute('UPDATE "GeofenceOrg" SET "fences" = 1, "version" = 3 WHERE "orgId" = \'a\'')
    assert await _found(db, _NEW, ["a", "b"]) == []  # its older pings: nothing to evaluate
    await db.execute(_PING, "a_3", "a", *INSIDE, now - timedelta(minutes=1))
    assert await _found(db, _NEW, ["a", "b"]) == [("a", "a_3")]
    assert await _found(db, _OLD_UNEVALUATED, ["a", "b"]) == [("a", "a_3")]


async def test_what_is_swept_is_not_found_again(evaluator_of, db):
    """Trips of one org (fence 40 days old, partitions of 3 months back): never evaluated
    (NULL) with pings in this month and the last ones, one with no ping, one whose pings
    are all before the fence. One sweep
    evaluates the first ones; the statement then finds nothing (no trip found by every
    sweep), and a second sweep stores nothing more."""
    now = datetime.now(UTC).replace(microsecond=0)
    await partitions.ensure(db, _months_back(now, 3))
    await circle_of(db, "b", now - timedelta(days=40))
    swept = [f"n{i}" for i in range(5)]
    for i, trip in enumerate(swept):
        await db.execute(_STATE, "b", trip, None, now)
        for days in (35 - i, 20, 1):
            at = now - timedelta(days=days, seconds=i)
            await db.execute(_PING_AT, trip, "b", *(INSIDE if days != 20 else FAR), at, at)
    await db.execute(_STATE, "b", "empty", None, now)
    await db.execute(_STATE, "b", "before", None, now)
    await db.execute(_PING, "before", "b", *INSIDE, now - timedelta(days=45))
    assert await _found(db, _NEW, ["b"]) == [("b", t) for t in swept]
    evaluator = evaluator_of(waited=True)
    assert await evaluator.sweep() == 3 * len(swept)  # enter, exit, enter each
    assert await _found(db, _NEW, ["b"]) == []
    assert await _found(db, _OLD_UNEVALUATED, ["b"]) == []
    assert await evaluator.sweep() == 0
    assert await db.fetchval('SELECT count(*) FROM "GeofenceEvent"') == 3 * len(swept)


async def test_months_of_partitions_are_each_trip_a_probe_from_its_evaluated_time(db):
    """15 months of partitions, 120 trips with 30 pings in each month, evaluated 5 minutes ago
    (20 of them never, with the org's fence a year old), in a custom plan and in a generic
    one (asyncpg's prepared statement, once PostgreSQL picks it): no partition is read whole,
    each trip's index is probed, and the months before a trip's evaluated time are not
    probed at all."""
    now = datetime.now(UTC).replace(microsecond=0)
    months = _months_back(now, 14)
    await partitions.ensure(db, months)
    await db.execute(_FENCE, "b", "gf_b", _GEOMETRY, now - timedelta(days=400))
    await db.execute(_ORG, "b")
    evaluated = now - timedelta(minutes=5)
    trips = [f"t{i:03d}" for i in range(120)]
    never = set(trips[:20])
    await db.executemany(_STATE, [("b", t, None if t in never else evaluated, now) for t in trips])
    records = []
    for t in trips:
        for m in months:
            at = max(datetime(m.year, m.month, 2, tzinfo=UTC), now - timedelta(days=420))
            at = min(at, evaluated - timedelta(minutes=1))
            records += [(t, "drv_1", "b", *FAR, at - timedelta(seconds=k), at) for k in range(30)]
    await db.copy_records_to_table(
        "TripLocation",
        columns=["tripId", "driverId", "orgId", "latitude", "longitude", "timestamp", "createdAt"],
        records=records,
    )
    await db.execute('ANALYZE "Geofence", "GeofenceState", "TripLocation"')
    args = _args(["b"])
    assert await _found(db, _NEW, ["b"]) == [("b", t) for t in sorted(never)]

    def check(nodes: list[dict[str, Any]]) -> None:
        for n in nodes:
            rel = n.get("Relation Name", "")
            if not rel.startswith("TripLocation_") or not n.get("Actual Loops"):
                continue
            assert (
                n["Node Type"] != "Seq Scan"
                or n["Actual Rows"] + n.get("Rows Removed by Filter", 0) == 0
            ), f"{rel} read whole: {n}"
            y, m = int(rel[-7:-3]), int(rel[-2:])
            if (y, m) < (evaluated.year, evaluated.month):
                # Only the trips never evaluated probe the months before this one.
                assert n["Actual Loops"] <= len(never), f"{rel} probed {n['Actual Loops']} times"

    check(await _plan(db, _NEW, *args))
    await db.execute("SET plan_cache_mode = force_generic_plan")
    try:
        await db.execute("PREPARE sweep_generic AS " + _NEW)
        execute = "EXECUTE sweep_generic('{b}', '1 hour', '3 seconds', 500)"
        rows = await db.fetch(execute)
        assert [tuple(r) for r in rows] == [("b", t) for t in sorted(never)]
        check(await _plan(db, execute))
    finally:
        await db.execute("RESET plan_cache_mode")


async def test_the_sweep_reads_no_fences_of_orgs_with_nothing_to_sweep(db):
    """60 orgs with 100 fences each (of GEOFENCE_MAX_PER_ORG 1000); one trip evaluated within
    the hour, in one org, with a ping no evaluation took. The sweep's statement runs every
    SWEEP_INTERVAL_S whatever happens, so what it reads must grow with the trips it looks at,
    not with every fence of every org: it reads at most the fences of that trip's org.

    A first cut of the fix, a CTE of every fenced org's oldest fence, read every fence of every
    fenced org at each sweep (here 6,000 rows for one trip; the old statement read 100 per
    ping). Measured at 500 orgs x 1,000 fences and one
    such trip: 1.2 ms before, ~200 ms after (a parallel scan on 2 workers), every 2 s."""
    now = datetime.now(UTC).replace(microsecond=0)
    orgs, per_org = [f"org_{i:03d}" for i in range(60)], 100
    await db.copy_records_to_table(
        "Geofence",
        columns=["orgId", "id", "name", "geometry", "radiusM", "vertices", "createdAt"],
        records=[
            (o, f"gf_{j}", "Depot", _GEOMETRY, 5000.0, 1, now - timedelta(days=1))
            for o in orgs
            for j in range(per_org)
        ],
    )
    await db.executemany(_ORG, [(o,) for o in orgs])
    await db.execute(_STATE, orgs[7], "t", now - timedelta(minutes=10), now)
    await db.execute(_PING, "t", orgs[7], *INSIDE, now - timedelta(minutes=5))
    await db.execute('ANALYZE "Geofence", "GeofenceState", "TripLocation"')
    assert await _found(db, _NEW, orgs) == [(orgs[7], "t")]
    old_read = _rows_read(await _plan(db, _OLD_UNEVALUATED, *_args(orgs)), "Geofence")
    new_read = _rows_read(await _plan(db, _NEW, *_args(orgs)), "Geofence")
    assert new_read <= per_org, (
        f"the sweep read {new_read:.0f} fence rows for one trip of one org of {per_org} fences "
        f"(the statement before: {old_read:.0f})"
    )
