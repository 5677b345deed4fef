"""The geofence worker process (GEOFENCE_EVALUATION=process, the default): evaluation off the
pod's event loop, its metrics served by the pod, a worker killed or stopped, the pod's
shutdown, and the inline mode beside it. Every other geofence test runs through the worker
too (tests/test_geofences.py)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

from prometheus_client import Counter

from ingest import geofence_events, metrics
from ingest.geofence_worker import REPORTED, GeofenceWorker
from ingest.typedefs import GEOFENCES

from .conftest import now_ms, state_reached
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
    from ingest.shutdown import shutdown
    from ingest.typedefs import SETTINGS

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
