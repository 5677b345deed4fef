"""The geofence worker process (GEOFENCE_EVALUATION=process, the default): evaluation off the
pod's event loop, its metrics served by the pod, a worker killed or stopped, the pod's
shutdown, and the inline mode beside it. Every other geofence test runs through the worker
too (tests/test_geofences.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import Counter

from ingest import geofence_events, geofence_worker, metrics
from ingest.geofence_events import GeofenceEvaluator
from ingest.geofence_worker import REPORTED, GeofenceWorker
from ingest.keyspace import keyspace
from ingest.live import Live
from ingest.shutdown import shutdown
from ingest.typedefs import GEOFENCES, SETTINGS

from .conftest import REDIS_URL, SECRET, now_ms, state_reached
from .test_geofences import INSIDE, OUTSIDE, drive, events, fence, kinds, settled


def count(counter: object, **labels: str) -> float:
    """This process's value of a counter (the tests of one worker share the registry)."""
    [family] = counter.collect()  # type: ignore[attr-defined]
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels == labels)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_child_evaluates_and_the_pod_serves_its_metrics(make_client):
    client = await make_client()
    pod = client.server.app[GEOFENCES]
    # No fence anywhere: nothing is handed over, and no process is started.
    await drive(client, [OUTSIDE, INSIDE], now_ms(-60))
    assert pod.pid is None
    evaluated, starts = count(metrics.GEOFENCE_EVALUATED), count(metrics.GEOFENCE_WORKER_STARTS)
    enters = count(metrics.GEOFENCE_EVENTS, event="enter")
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE, INSIDE, INSIDE, OUTSIDE], t)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 3000)]
    pid = pod.pid
    assert pid is not None and pid != os.getpid() and alive(pid)
    # The child's counts reach the pod's registry (its report follows each flush it finishes).
    await state_reached(lambda: count(metrics.GEOFENCE_EVALUATED) - evaluated >= 4)
    assert count(metrics.GEOFENCE_EVENTS, event="enter") - enters == 1
    assert count(metrics.GEOFENCE_WORKER_STARTS) - starts == 1
    text = await (await client.get("/metrics")).text()
    assert "ingest_geofence_worker_starts_total" in text


async def test_only_the_rows_of_orgs_with_fences_are_handed_over(client):
    """org_2 has no fence: its pings (same trip id) are never sent to the child."""
    fid = await fence(client, org="org_1")
    t = now_ms(1)
    evaluated = count(metrics.GEOFENCE_EVALUATED)
    await drive(client, [OUTSIDE, INSIDE, OUTSIDE], t, org="org_2")
    await drive(client, [OUTSIDE, INSIDE], t, org="org_1")
    await state_reached(lambda: count(metrics.GEOFENCE_EVALUATED) - evaluated >= 2)
    await asyncio.sleep(0.3)
    assert count(metrics.GEOFENCE_EVALUATED) - evaluated == 2
    assert kinds(await events(client, fid)) == [("enter", t + 1000)]


async def test_the_childs_sweep_leaves_alone_what_waits_out_its_settle_time_in_the_pod(
    make_client,
):
    """The child's sweep looks for pings stored more than the settle time ago and not
    evaluated: rows the pod still holds for GEOFENCE_SETTLE_MS are not read back by it."""
    client = await make_client(geofence_settle_ms=3000)
    fid = await fence(client)
    pod = client.server.app[GEOFENCES]
    await state_reached(lambda: pod.pid is not None, timeout=10)  # the idle look starts it
    t = now_ms(1)
    await drive(client, [OUTSIDE], t, settle=False)
    await settled(client)  # the trip has a state: the sweep looks at it from now on
    gap = count(metrics.GEOFENCE_GAP_PINGS)
    await drive(client, [INSIDE, OUTSIDE], t + 1000, settle=False)
    await asyncio.sleep(2.5)  # a sweep (every 2 s) ran more than a second after the commit
    await settled(client)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 2000)]
    assert count(metrics.GEOFENCE_GAP_PINGS) - gap == 0


async def with_child(client) -> tuple[str, GeofenceWorker, int, int]:
    """A fence, and a trip evaluated outside it at t: the fence id, the pod's worker, t and
    the child's pid."""
    fid = await fence(client)
    pod = client.server.app[GEOFENCES]
    assert isinstance(pod, GeofenceWorker)
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    pid = pod.pid
    assert pid is not None
    return fid, pod, t, pid


async def test_a_killed_child_is_started_again_and_no_event_is_lost_or_doubled(client, db):
    fid, pod, t, pid = await with_child(client)
    starts = count(metrics.GEOFENCE_WORKER_STARTS)
    os.kill(pid, signal.SIGKILL)
    await state_reached(lambda: pod.pid is None)
    # Handed over while the child is dead, or not yet started again: dropped by the pod, and
    # read back from PostgreSQL by the trip's next evaluation (or found by the sweep).
    await drive(client, [INSIDE], t + 1000)
    await drive(client, [OUTSIDE], t + 2000)
    await state_reached(lambda: pod.pid is not None, timeout=10)
    await drive(client, [OUTSIDE], t + 3000)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 2000)]
    assert count(metrics.GEOFENCE_WORKER_STARTS) - starts == 1
    stored = await db.fetchval('SELECT count(*) FROM "GeofenceEvent" WHERE "geofenceId" = $1', fid)
    assert stored == 2


async def test_a_stopped_child_never_holds_the_acks(client):
    """SIGSTOP: the child reads nothing. Ingest goes on; once it runs again it catches up."""
    fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(1, 21):
            point = INSIDE if i % 2 else OUTSIDE
            answer = await asyncio.wait_for(
                drive(client, [point], t + 1000 * i, settle=False), timeout=5
            )
            assert answer["accepted"] == 1
        await asyncio.sleep(0.2)
        assert pod.pending > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    await settled(client)
    evs = kinds(await events(client, fid, limit="100"))
    assert len(evs) == 20 and len(set(evs)) == 20
    assert evs[0] == ("enter", t + 1000) and evs[-1] == ("exit", t + 20_000)


async def test_shutdown_hands_over_what_is_left_and_waits_for_the_child(make_client, db):
    """With the settle time still running at SIGTERM, the rows are handed over at once and
    evaluated before the pod's shutdown returns; then the child is gone."""
    client = await make_client(geofence_settle_ms=60_000)
    fid = await fence(client)
    pod = client.server.app[GEOFENCES]
    t = now_ms(1)
    await drive(client, [OUTSIDE], t, settle=False)
    await state_reached(lambda: pod.pid is not None, timeout=10)  # the idle look starts it
    pid = pod.pid
    assert pid is not None
    await drive(client, [INSIDE, OUTSIDE], t + 1000, settle=False)
    assert pod.pending == 2

    app = client.server.app
    await shutdown(app, client.server.runner, app[SETTINGS].shutdown_timeout_s)
    rows = await db.fetch(
        'SELECT "event", "timestamp" FROM "GeofenceEvent" WHERE "geofenceId" = $1'
        ' ORDER BY "timestamp"',
        fid,
    )
    assert [r["event"] for r in rows] == ["enter", "exit"]
    assert not alive(pid)


async def test_inline_evaluation_gives_the_same_events(make_client):
    client = await make_client(geofence_evaluation="inline")
    fid = await fence(client)
    t = now_ms(1)
    await drive(client, [OUTSIDE, INSIDE, INSIDE, OUTSIDE], t)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 3000)]
    assert not hasattr(client.server.app[GEOFENCES], "pid")


def test_every_counter_the_evaluation_updates_is_reported():
    """A counter the evaluation updates in the child and the child does not report would
    stay at zero on the pod's /metrics."""
    source = Path(geofence_events.__file__).read_text()
    used = {getattr(metrics, name) for name in re.findall(r"metrics\.([A-Z_]+)", source)}
    assert {m for m in used if isinstance(m, Counter)} == set(REPORTED)
    assert metrics.GEOFENCE_SECONDS in used  # sent as each report's durations


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_the_backlog_keeps_its_bound_while_the_fenced_orgs_cannot_be_looked_up(
    make_client, db, mode
):
    """A lock on "GeofenceOrg" (a migration queued behind a long transaction) times the
    look-up out at every hand-over while flushes commit: the pod holds at most the backlog's
    bound (found by an attacker's review: the hand-over put back more than it took)."""
    client = await make_client(flush_timeout_s=0.5, geofence_evaluation=mode)
    await fence(client)
    pod = client.server.app[GEOFENCES]
    t = now_ms(1)
    await drive(client, [OUTSIDE], t)
    dropped = count(metrics.GEOFENCE_DROPPED)
    held, i = 0, 0
    async with db.transaction():
        await db.execute('LOCK TABLE "GeofenceOrg" IN ACCESS EXCLUSIVE MODE')
        while i < geofence_events.BACKLOG_FLUSHES + 64:  # more flushes than the bound
            i += 1
            answer = await drive(client, [INSIDE if i % 2 else OUTSIDE], t + i * 50, settle=False)
            assert answer["accepted"] == 1  # ingest goes on
            held = max(held, len(pod._backlog) + len(getattr(pod, "_handing", ())))
    assert held <= geofence_events.BACKLOG_FLUSHES
    assert count(metrics.GEOFENCE_DROPPED) - dropped >= i - geofence_events.BACKLOG_FLUSHES


async def test_a_setting_of_inf_reaches_the_child_as_inf(make_client):
    """RATE_LIMIT_PER_S=inf (no per-driver limit) is a setting the pod takes; JSON would have
    sent it to the child as null, which it refused at every start: no event, ever."""
    client = await make_client(rate_limit_per_s=float("inf"))
    fid, pod, t, pid = await with_child(client)
    await drive(client, [INSIDE], t + 1000)
    await drive(client, [OUTSIDE], t + 2000)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 2000)]
    assert pod.pid == pid  # the one child, never restarted


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


async def test_the_child_gets_no_credential_of_the_pods(make_client, monkeypatch):
    """The child verifies no token: neither its settings nor its environment hold the JWT
    secret the deployment gives the pod (envFrom: the ingest-secrets Secret)."""
    monkeypatch.setenv("JWT_SECRET", SECRET)
    client = await make_client()
    _fid, _pod, _t, pid = await with_child(client)
    environ = _environ(pid)
    assert [v for v in environ if SECRET.encode() in v] == []
    assert [v for v in environ if v.startswith(b"JWT_")] == []
    assert any(v.startswith(b"PATH=") for v in environ)


async def test_no_file_descriptor_left_for_the_childs_pipe_is_tried_again_later(client):
    """EMFILE when the child is to be started (a flood of connections at the open-files
    limit), for real: the start is put off, the pod's task lives on, and a later start works
    (before, the OSError ended the pod's geofence task for good)."""
    fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGKILL)
    await state_reached(lambda: pod.pid is None)
    await pod._child()  # (it sees the death: a restart is due after the backoff)
    pod._restart_at = 0.0  # due now
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = min(set(range(soft)) - {int(fd) for fd in os.listdir("/proc/self/fd")})
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        assert await pod._child() is None  # os.pipe() failed: no fd below the limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert pod._restart_at > asyncio.get_running_loop().time()
    pod._restart_at = 0.0  # (instead of waiting out _RESTART_MAX_S)
    await drive(client, [INSIDE], t + 1000)
    await drive(client, [OUTSIDE], t + 2000)
    assert pod.pid is not None
    assert kinds(await events(client, fid))[-1] == ("exit", t + 2000)


async def test_a_new_trips_only_batch_dropped_while_the_child_restarts_is_swept(client, db):
    """A van's whole run in one upload, committed while no child runs: the pod drops the
    flush, and makes the new trip's state row (evaluated never), so the sweep finds and
    evaluates it (found by an attacker's review: the sweep only knew trips evaluated before)."""
    fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGKILL)
    await state_reached(lambda: pod.pid is None)
    dropped = count(metrics.GEOFENCE_DROPPED)
    await drive(client, [OUTSIDE, INSIDE], t + 1000, trip="van_9", driver="drv_9", settle=False)
    await state_reached(lambda: count(metrics.GEOFENCE_DROPPED) > dropped)
    await state_reached(lambda: pod.pid is not None, timeout=10)  # started again

    async def van_events() -> list[tuple[str, int]]:
        return kinds([e for e in await events(client, fid) if e["tripId"] == "van_9"])

    for _ in range(100):  # the restart, then a sweep: at most 10 s
        if found := await van_events():
            break
        await asyncio.sleep(0.1)
    assert found == [("enter", t + 2000)]
    # Swept once: a later sweep finds it evaluated.
    await asyncio.sleep(geofence_events.SWEEP_INTERVAL_S * 1.5)
    assert await van_events() == [("enter", t + 2000)]


async def test_a_new_trips_only_batch_held_by_a_child_that_dies_is_swept(client):
    """The flush reached the child, which died before evaluating it (stopped, then killed):
    the pod makes the new trip's state row, as for a flush it dropped, and the sweep finds it.
    Before, the pod forgot what it had sent: the van's run made no event until its next
    batch, and none at all if it had no other."""
    fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGSTOP)
    try:
        dropped = count(metrics.GEOFENCE_DROPPED)
        await drive(client, [OUTSIDE, INSIDE], t + 1000, trip="van_9", driver="drv_9", settle=False)
        await state_reached(lambda: pod.pending == 1 and len(pod._in_child) == 1)
    finally:
        os.kill(pid, signal.SIGKILL)
    await state_reached(lambda: pod.pid not in (None, pid), timeout=10)  # started again
    assert count(metrics.GEOFENCE_DROPPED) - dropped == 1

    async def van_events() -> list[tuple[str, int]]:
        return kinds([e for e in await events(client, fid) if e["tripId"] == "van_9"])

    for _ in range(100):  # a sweep: at most SWEEP_INTERVAL_S
        if found := await van_events():
            break
        await asyncio.sleep(0.1)
    assert found == [("enter", t + 2000)]


@pytest.fixture
async def evaluator_of(database):
    """Makes GeofenceEvaluators on a pool of the test's database (not run: driven by hand)."""
    pool = await asyncpg.create_pool(database, min_size=0, max_size=2)
    redis = aioredis.from_url(REDIS_URL)
    live = Live(redis, keyspace("standalone", "unused:", 1), 60, None)
    try:
        yield lambda **kw: GeofenceEvaluator(pool, live, 0.0, **kw)
    finally:
        await pool.close()
        await redis.aclose()


def _flush(trip: str, org: str = "org_1") -> list[tuple[object, ...]]:
    return [(trip, "drv_1", org, 12.9, 77.5, None, None, None, None, datetime.now(UTC), None)]


async def _state_rows(pool: asyncpg.Pool, trip: str) -> int:
    return await pool.fetchval('SELECT count(*) FROM "GeofenceState" WHERE "tripId" = $1', trip)


async def test_a_dropped_flush_is_not_reported_done_before_its_state_rows_exist(evaluator_of):
    """The child reports how many flushes it is done with, and the pod forgets those. A flush
    the child dropped (its backlog full, or given up) was counted done at once, though its
    trips' state rows were made only at the child's next turn: a child dying in between lost
    a new trip's only batch. It now counts as done once its rows are made (and the flushes
    evaluated after it, which leave in order, wait with it). The worker's child notes the
    trips of what it drops even before it has looked up the orgs with fences (the pod sent
    it only rows of such orgs)."""
    evaluator = evaluator_of(waited=True)
    for i in range(geofence_events.BACKLOG_FLUSHES + 1):
        evaluator.committed(_flush(f"t_{i}"))
    assert evaluator.pending == geofence_events.BACKLOG_FLUSHES  # t_0's flush dropped
    assert evaluator.done == 0
    await evaluator._make_states(evaluator.pool)
    assert evaluator.done == 1
    assert await _state_rows(evaluator.pool, "t_0") == 1


async def test_state_rows_not_made_are_tried_again_and_hold_the_count(evaluator_of, database):
    """PostgreSQL refuses the state rows (here: a closed pool): the trips are kept for the
    next turn, and the dropped flush is still not done (before, both were forgotten)."""
    evaluator = evaluator_of(waited=True)
    for i in range(geofence_events.BACKLOG_FLUSHES + 1):
        evaluator.committed(_flush(f"t_{i}"))
    closed = await asyncpg.create_pool(database, min_size=0, max_size=1)
    await closed.close()
    await evaluator._make_states(closed)
    assert evaluator.done == 0
    await evaluator._make_states(evaluator.pool)
    assert evaluator.done == 1
    assert await _state_rows(evaluator.pool, "t_0") == 1


async def test_a_dropped_flush_of_orgs_without_fences_is_done_at_once(evaluator_of):
    """In the pod's own evaluator (inline), a dropped flush with no trip of an org with
    fences needs no state row: it must not hold the count until some later drop's rows are
    made (that froze the count, and the pod's record of what the child holds grew)."""
    evaluator = evaluator_of()
    evaluator._fenced = frozenset({"org_1"})
    for i in range(geofence_events.BACKLOG_FLUSHES + 1):
        evaluator.committed(_flush(f"t_{i}", org="org_2"))
    assert evaluator.done == 1
    assert not evaluator._unmade


async def test_a_new_trip_held_by_a_child_found_dead_at_shutdown_gets_its_state_row(client, db):
    """The child died holding a new trip's only batch, and the pod stopped before it looked
    at its child again: the shutdown makes the trip's state row, for another pod's sweep."""
    _fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGSTOP)
    try:
        await drive(client, [INSIDE], t + 1000, trip="van_5", driver="drv_5", settle=False)
        await state_reached(lambda: len(pod._in_child) == 1)
    finally:
        os.kill(pid, signal.SIGKILL)
    app = client.server.app
    await shutdown(app, client.server.runner, app[SETTINGS].shutdown_timeout_s)
    made = await db.fetchval('SELECT count(*) FROM "GeofenceState" WHERE "tripId" = $1', "van_5")
    assert made == 1


async def test_a_child_stuck_at_the_shutdown_deadline_leaves_state_rows_for_what_it_held(
    make_client, db
):
    """SIGTERM while the child is stuck (stopped, for real) holding a new trip's only batch:
    at the deadline the pod kills it and makes the trip's state row, for another pod's sweep
    (before, the shutdown's cancellation skipped that)."""
    client = await make_client(shutdown_timeout_s=1)
    _fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGSTOP)
    try:
        await drive(client, [INSIDE], t + 1000, trip="van_6", driver="drv_6", settle=False)
        await state_reached(lambda: len(pod._in_child) == 1)
        app = client.server.app
        await shutdown(app, client.server.runner, app[SETTINGS].shutdown_timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    made = await db.fetchval('SELECT count(*) FROM "GeofenceState" WHERE "tripId" = $1', "van_6")
    assert made == 1


async def test_a_dropped_flush_makes_state_rows_for_the_fenced_org_only(client, db):
    """The same new trip id in two orgs, in flushes dropped while no child runs: only the org
    with fences gets a state row, and the ack waited for none of it."""
    _fid, pod, _t, pid = await with_child(client)
    os.kill(pid, signal.SIGKILL)
    await state_reached(lambda: pod.pid is None)
    t = now_ms(1)
    for org in ("org_1", "org_2"):
        await drive(client, [INSIDE], t, trip="shared", driver="drv_7", org=org, settle=False)

    async def orgs_with_state() -> list[str]:
        rows = await db.fetch(
            'SELECT "orgId" FROM "GeofenceState" WHERE "tripId" = $1 ORDER BY 1', "shared"
        )
        return [r[0] for r in rows]

    for _ in range(100):
        if await orgs_with_state():
            break
        await asyncio.sleep(0.05)
    assert await orgs_with_state() == ["org_1"]


async def test_a_frozen_child_is_replaced(client, monkeypatch):
    """A child stopped for good (SIGSTOP, for real) sends no report: after _STALLED_S the pod
    kills it (ending its transaction, and the sweep's lock if it held it) and a new child
    evaluates (found by an attacker's review: a frozen child was never replaced)."""
    monkeypatch.setattr(geofence_worker, "_STALLED_S", 1.5, raising=False)
    fid, pod, t, pid = await with_child(client)
    os.kill(pid, signal.SIGSTOP)
    try:
        await drive(client, [INSIDE], t + 1000, settle=False)
        await state_reached(lambda: pod.pid not in (None, pid), timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    await state_reached(lambda: not alive(pid), timeout=5)
    await drive(client, [OUTSIDE], t + 2000)
    assert kinds(await events(client, fid)) == [("enter", t + 1000), ("exit", t + 2000)]
