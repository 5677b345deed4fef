"""Attacks on the dispatch features (nearby trucks; geofences and their exactly-once enter/exit
events), black-box against the production app on the real PostgreSQL and Redis; two apps on one
database and one Redis are two pods.

Each test is a finding: it fails against the code it was written for (8d2139a) and passes once
the fix named in its docstring is made. The promises attacked (/work/shared/API.md, "Dispatch
(v1.1)"): every committed ping that takes a trip into or out of a fence makes one event, none
missed when a trip's batches land on different pods; no input is a 500; and one org's fences
cannot make the service slow or costly for the others.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingest.typedefs import BUFFER, GEOFENCES

from .conftest import ClientFactory, auth, flush_held, iso, now_ms, post_ping, state_reached
from .test_geofences import FENCES, INSIDE, LAT0, LON0, OUTSIDE, SQUARE, dispatcher

Client = TestClient[web.Request, web.Application]


async def create(
    client: Client, geometry: dict[str, Any], org: str = "org_1", name: str = "Depot", **extra: Any
) -> tuple[int, Any]:
    r = await client.post(
        FENCES, json={"name": name, "geometry": geometry, **extra}, headers=dispatcher(org)
    )
    return r.status, await r.json()


async def fence(
    client: Client, geometry: dict[str, Any] = SQUARE, org: str = "org_1", name: str = "Depot"
) -> str:
    status, answer = await create(client, geometry, org, name)
    assert status == 201, answer
    return str(answer["id"])


async def drive(
    client: Client, points: list[tuple[float, float]], start_ms: int, trip: str = "trip_1",
    driver: str = "drv_1", org: str = "org_1", step_ms: int = 1000,
) -> dict[str, Any]:  # fmt: skip
    """Post one batch of ``points`` (lat, lon), ``step_ms`` apart; 200 or 202 expected."""
    body = {
        "tripId": trip, "driverId": driver, "batchId": str(uuid.uuid4()),
        "locations": [
            {"latitude": lat, "longitude": lon, "timestamp": iso(start_ms + i * step_ms)}
            for i, (lat, lon) in enumerate(points)
        ],
    }  # fmt: skip
    status, answer = await post_ping(client, body, **auth("driver", driver, org))
    assert status in (200, 202), answer
    return dict(answer)


async def settled(*clients: Client, evaluated: bool = True) -> None:
    """Until every pod has committed what it buffered and (``evaluated``) evaluated each
    commit."""
    for client in clients:
        app = client.server.app
        quiet = 0
        for _ in range(500):
            busy = app[BUFFER].depth or (evaluated and app[GEOFENCES].pending)
            quiet = 0 if busy else quiet + 1
            if quiet == 3:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the pod never caught up")


async def events(client: Client, fence_id: str, org: str = "org_1") -> list[tuple[str, int]]:
    """(event, epoch ms) of each event of the fence, in the listing's order."""
    r = await client.get(
        f"{FENCES}/{fence_id}/events", params={"limit": "5000"}, headers=dispatcher(org)
    )
    assert r.status == 200, await r.text()
    return [
        (e["event"], round(datetime.fromisoformat(e["timestamp"]).timestamp() * 1000))
        for e in (await r.json())["events"]
    ]


async def events_within(
    client: Client, fence_id: str, expected: list[tuple[str, int]], seconds: float
) -> list[tuple[str, int]]:
    """The fence's events once they are ``expected``, or what they are after ``seconds``."""
    deadline = time.monotonic() + seconds
    got = await events(client, fence_id)
    while got != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        got = await events(client, fence_id)
    return got


# -- a 500 from a body ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "geometry",
    [
        {"type": "Point", "coordinates": [LON0, LAT0], "properties": {"note": "a\u0000b"}},
        {"type": "Point", "coordinates": [LON0, LAT0], "a\u0000b": 1},
    ],
    ids=["in_a_value", "in_a_key"],
)
async def test_a_nul_inside_the_geometry_is_never_a_500(client: Client, geometry) -> None:
    """SEVERITY medium. ``GeofenceIn.geometry`` is ``dict[str, Any]`` and parse_shape reads only
    "type" and "coordinates": every other member (GeoJSON's "foreign members") is stored as
    given in the jsonb column. PostgreSQL's jsonb refuses the escape \\u0000 (a NUL is no
    text), asyncpg raises UntranslatableCharacterError inside create(), and the dispatcher
    gets 500 internal_error. The name is guarded against control characters; the geometry is
    not.

    Fix (ingest/geofences_api.py, create): store only what the service uses, i.e. build the
    stored geometry from the parsed shape ({"type", "coordinates"}), which also closes the next
    finding; if foreign members are to be kept, refuse a body whose encoded geometry contains
    ``\\u0000`` with 400 invalid_payload naming $.geometry.
    """
    status, answer = await create(client, geometry, radiusM=100)
    if status == 201:  # stored without the foreign member: a fix too
        r = await client.get(f"{FENCES}/{answer['id']}", headers=dispatcher())
        assert r.status == 200 and "\\u0000" not in await r.text()
        return
    assert status == 400, answer
    assert answer["error"] == "invalid_payload" and "$.geometry" in answer["detail"], answer


# -- cost ----------------------------------------------------------------------------------


async def test_a_fence_stores_no_more_than_its_shape(client: Client) -> None:
    """SEVERITY medium (memory and bandwidth without the bound the limits promise). The vertex
    and fence limits (GEOFENCE_MAX_VERTICES, GEOFENCE_MAX_PER_ORG) suggest a bounded fence set,
    but any foreign member of the geometry is stored and served back: a one-point circle can
    carry ~1 MiB (MAX_BODY_BYTES) of junk. With the default 1000 fences per org, one
    GET /api/v1/geofences (unpaginated) then makes the pod fetch and encode ~1 GiB in memory,
    and every pod's evaluator reads and decodes each fence's 1 MiB of JSON (_FENCES) when the
    org's version moves.

    Fix (ingest/geofences_api.py, create): store {"type", "coordinates"} only (plus radiusM),
    or refuse a geometry with other members; and paginate GET /api/v1/geofences (limit/cursor,
    as the events).
    """
    junk = {"type": "Point", "coordinates": [LON0, LAT0], "properties": {"x": "x" * 900_000}}
    status, made = await create(client, junk, radiusM=100)
    if status == 400:
        return  # refusing foreign members is a fix too
    assert status == 201, made
    r = await client.get(f"{FENCES}/{made['id']}", headers=dispatcher())
    body = await r.read()
    assert r.status == 200 and len(body) < 4096, f"a one-point fence is {len(body)} bytes"


def comb(positions: int = 1000, half: float = 0.05) -> dict[str, Any]:
    """A valid polygon whose every edge spans (almost) its whole height: a comb of teeth
    around (LAT0, LON0). Polygon's latitude bands then each hold every edge."""
    west, south, width = LON0 - half, LAT0 - half, 2 * half
    teeth = (positions - 4) // 2
    step = width / teeth
    ring: list[list[float]] = []
    for i in range(teeth):
        x = west + i * step
        ring += [[x, south + width], [x + step / 2, south + 0.001]]
    ring += [[west + width, south + width], [west + width, south], [west, south]]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


@pytest.mark.timing
async def test_an_org_with_costly_fences_never_stalls_another_orgs_ingest(
    client: Client,
) -> None:
    """SEVERITY high. Polygon.contains loops over the edges of the ping's latitude band; the
    band count is ~4 * height / (mean edge height), so a valid 1000-position comb (every tooth
    as tall as the fence) has 4 bands of 998 edges each: ~65 us per ping per fence, and the
    FenceIndex hands every fence whose box holds the ping to contains(). crossings() runs for
    every stored ping in the evaluator's task, on the event loop, without yielding. Here 40
    such fences (of the 1000 allowed) and one 1000-ping batch freeze the pod: another org's
    one-ping batch waits 3-4 s for its 200 (measured). At the defaults (1000 fences per org)
    one batch of the attacker's own driver freezes the pod for ~65 s, and each further batch
    as much: acks (ACK_TIMEOUT_MS is 10 s), WebSockets and health checks of every org stop,
    liveness probes fail, and the other orgs' events wait behind it (one evaluator per pod, in
    flush order). Each such fence also costs every pod ~200 KB of parsed shape (~200 MB per
    org at the limits; GeofenceEvaluator._sets is never evicted, not even when the org deletes
    its fences).

    Fix: bound the work per ping and keep it off the loop. (1) geofence_shapes.Polygon: refuse
    a polygon whose fullest band holds more than a few dozen edges, or index edges in a 2D
    grid (cells known fully inside/outside answer without any edge test), and budget vertices
    per org (GEOFENCE_MAX_VERTICES_PER_ORG), not per fence; (2) geofence_events: walk the
    pings in chunks with ``await asyncio.sleep(0)`` between them, or in a worker thread, and
    cap a flush's evaluation time per org so one org cannot hold the others' events.
    """
    shape = comb()
    for i in range(40):
        status, answer = await create(client, shape, "org_evil", f"comb {i}")
        if status == 400:
            return  # refusing such a polygon is a fix too
        assert status == 201, answer
    start = now_ms(1)
    points = [(LAT0 + (i % 100) * 1e-4, LON0 + (i // 100) * 1e-4) for i in range(1000)]
    await drive(client, points, start, trip="t_evil", driver="drv_evil", org="org_evil", step_ms=10)
    worst, deadline, n = 0.0, time.perf_counter() + 4.0, 0
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        await drive(client, [(1.0, 1.0)], now_ms(-1) + n, org="org_good", driver="drv_good")
        worst = max(worst, time.perf_counter() - began)
        n += 1
    await settled(client)
    assert worst < 1.0, f"org_good's one-ping batch waited {worst:.1f} s behind org_evil's fences"


async def test_a_new_fence_reads_back_no_ping_older_than_every_fence(client: Client) -> None:
    """SEVERITY low-medium (cost). While an org has no fence its trips' states stay where they
    were; when it creates one again, each trip's next evaluation reads back every ping since its
    state's evaluatedTo (_GAP, up to GAP_MAX_PINGS = 10,000 per trip) and walks them all through
    the index, though none of them can make an event: they are older than every fence
    (FenceSet.containing drops fences created after the ping, after the index work). An org that
    deletes its last fence on Friday and draws one on Monday makes every active trip's next
    flush read and evaluate 10,000 pings, on every pod, on the event loop (and through the comb
    of the finding above, at its price per ping). Here: 3000 pings read back for nothing.

    Fix (ingest/geofence_events.py, _evaluate): start the read-back at the later of the
    state's evaluatedTo and the oldest createdAt of the org's current fences (FenceSet can keep
    it): a ping older than every current fence is in none of them, and the state's "inside"
    then holds none of them either, so such pings can make no event.
    """
    first = await fence(client)
    t = now_ms(-600)
    await drive(client, [OUTSIDE], t)
    await settled(client)
    r = await client.delete(f"{FENCES}/{first}", headers=dispatcher())
    assert r.status == 204
    for k in range(3):  # the org has no fence: these are stored, never evaluated
        points = [OUTSIDE if i % 2 else INSIDE for i in range(1000)]
        await drive(client, points, t + 1000 + k * 100_000, step_ms=100)
    await settled(client)
    await fence(client)
    await asyncio.sleep(1.1)  # the orgs-with-fences look-up is refreshed every second
    before = await gap_pings(client)
    await drive(client, [OUTSIDE], now_ms(1))
    await settled(client)
    read_back = await gap_pings(client) - before
    assert read_back == 0, f"{read_back:.0f} pings older than every fence read back"


async def gap_pings(client: Client) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith("ingest_geofence_gap_pings_total "):
            return float(line.split()[1])
    return 0.0


# -- exactly once ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["buffered_one_after_another", "durable_two_in_flight"])
async def test_batches_committed_out_of_order_on_two_pods_lose_no_crossing(
    make_client: ClientFactory, mode: str
) -> None:
    """SEVERITY high (events missing, no error anywhere). With ACK_MODE=buffered a pod answers
    202 before it commits; a driver app that waits for each 202 and sends its next batch to
    another pod (any load balancer) has its batches committed in any order. The pod that
    commits the newer batch first evaluates it, its read-back (_GAP) finds nothing (the older
    batch is not committed yet) and moves the trip's evaluatedTo past it; when the older batch
    commits, _evaluate drops all its pings as "late" (``r[TS] > evaluated_to``). A truck that
    went into the depot and out again inside that batch makes no enter and no exit, ever. The
    same happens in durable mode to two batches of a trip in flight at once (an app that
    uploads its queue over two connections, or that moves on after a 503 ack timeout while the
    first attempt is still buffered and commits later): docs/api.md calls the older one
    "late"; the contract says none is missed when batches land on different pods.

    Fix (ingest/geofence_events.py): never let evaluatedTo pass pings that may still commit.
    E.g. evaluate a trip only up to a horizon older than any flush still in flight (now minus
    FLUSH_TIMEOUT_S and the buffering time), keeping the newer pings for the next round (or for
    a sweeper, see the next finding); or, when older pings commit after newer ones were
    evaluated, evaluate the trip again from the oldest of them (read back from PostgreSQL),
    store only events whose key is new, and record the corrected state.
    """
    buffered = mode.startswith("buffered")
    ack = "buffered" if buffered else "durable"
    # GEOFENCE_SETTLE_MS (default 2 s) is what orders them: longer than the slow pod's flush.
    settle = 1500
    slow = await make_client(ack_mode=ack, geofence_settle_ms=settle)
    fast = await make_client(ack_mode=ack, geofence_settle_ms=settle)
    fid = await fence(fast)
    t = now_ms(1)
    await drive(fast, [OUTSIDE], t)
    await settled(fast)
    async with flush_held(slow) as slow_buffer:  # the slow pod commits after the fast one
        if buffered:  # the app sends batch after batch, each once the previous one got its 202
            assert "queued" in await drive(slow, [INSIDE, OUTSIDE], t + 1000)  # in and out
            assert "queued" in await drive(fast, [OUTSIDE], t + 3000)
        else:  # two uploads of the app in flight at once; both are answered 200
            older = asyncio.create_task(drive(slow, [INSIDE, OUTSIDE], t + 1000))
            await state_reached(lambda: bool(slow_buffer.pending))
            await drive(fast, [OUTSIDE], t + 3000)
    if not buffered:
        assert (await older)["accepted"] == 2
    await settled(fast, slow)
    assert await events(fast, fid) == [("enter", t + 1000), ("exit", t + 2000)]


@pytest.mark.parametrize("cause", ["stale_fenced_orgs_cache", "pod_died_after_commit"])
async def test_a_committed_crossing_is_evaluated_even_if_the_trip_stops_reporting(
    make_client: ClientFactory, cause: str
) -> None:
    """SEVERITY medium (an event never stored nor sent). Pings that a pod commits but does not
    evaluate are only ever read back by the same trip's *next* evaluation. Nothing else looks
    for them, so if that trip sends nothing more (the truck parked in the depot, the shift
    ended) its last enter is never made. Two ways to get there:
    - the orgs-with-fences cache (ORGS_REFRESH_S): a flush stored within a second after the
      org's first fence was created is skipped whole on a pod that looked the orgs up just
      before (and its pings are read back later only if the next one comes within GAP_FIRST);
    - a pod that dies (OOM, node loss, or a backlog over 256 flushes dropped by committed())
      between its commit and its evaluation, as the API promise "none missed" covers.

    Fix: make the pending work durable instead of piggy-backing on the trip's next flush. In
    the flush's transaction (or a trigger on TripLocation) mark the trip as pending, e.g.
    upsert "GeofenceState"."pendingTo" = greatest(pendingTo, newest ts); every pod runs a
    sweeper (every second, FOR UPDATE SKIP LOCKED) that evaluates states whose pendingTo >
    evaluatedTo and whose updatedAt is older than a few seconds, with the read-back of
    _evaluate and no flush rows. For the cache alone: bump a Redis key on create and check it
    per flush, or evaluate the skipped rows again once the refresh finds the org.
    """
    # A settle time over the one-second orgs look-up (the default 2 s is): the evaluation then
    # runs after a look-up that follows the commit.
    other = await make_client(geofence_settle_ms=1500)
    pod = await make_client(geofence_settle_ms=1500)
    t = now_ms(1)
    if cause == "stale_fenced_orgs_cache":
        # The pod looks the orgs with fences up (none yet), then the depot is drawn.
        await drive(pod, [OUTSIDE], now_ms(-60), trip="trip_0", driver="drv_0")
        await settled(pod)
        fid = await fence(pod)
    else:
        fid = await fence(pod)
        await drive(pod, [OUTSIDE], t - 1000)
        await settled(pod)
        pod.server.app[GEOFENCES].stop()  # what it commits from now on, it never evaluates
    await drive(pod, [OUTSIDE, INSIDE], t)  # the truck drives into the depot and parks
    alive = cause != "pod_died_after_commit"
    await settled(pod, evaluated=alive)
    await asyncio.sleep(1.1)
    # The rest of the fleet keeps reporting, on both pods: the org's fence is well known.
    for i, client in enumerate((other, pod)):
        await drive(client, [OUTSIDE], now_ms(2) + i, trip="trip_9", driver="drv_9")
    await settled(other)
    await settled(pod, evaluated=alive)
    got = await events_within(other, fid, [("enter", t + 1000)], 5.0)
    assert got == [("enter", t + 1000)], f"the parked truck's enter: {got}"


@pytest.mark.timing
async def test_fences_costly_within_the_limits_slow_their_org_not_the_pod(client: Client) -> None:
    """The comb above is refused; one just within MAX_BAND_EDGES is not. 100 of them make every
    ping of the org cost ~1 ms to evaluate, a 1000-ping batch about a second: the evaluation
    lets the event loop run every few milliseconds, so another org's acks do not wait for it."""
    shape = comb(66)  # 31 teeth: 62 edges in a band, MAX_BAND_EDGES is 64
    for i in range(100):
        status, answer = await create(client, shape, "org_evil", f"comb {i}")
        assert status == 201, answer
    start = now_ms(1)
    # In the comb's back (below the teeth), in every fence: 100 enters, then nothing new; the
    # cost is the tests themselves (the flood of events is another matter).
    back = (LAT0 - 0.0495, LON0)
    await drive(
        client, [back] * 1000, start, trip="t_evil", driver="drv_evil", org="org_evil", step_ms=10
    )
    worst, n, until = 0.0, 0, time.perf_counter() + 2.0  # the evaluation takes longer
    while time.perf_counter() < until:
        began = time.perf_counter()
        await drive(client, [(1.0, 1.0)], now_ms(-1) + n, org="org_good", driver="drv_good")
        worst = max(worst, time.perf_counter() - began)
        n += 1
    await settled(client)
    (comb_0,) = [f["id"] for f in (await (await client.get(FENCES, headers=dispatcher(
        "org_evil"))).json())["geofences"] if f["name"] == "comb 0"]  # fmt: skip
    assert await events(client, comb_0, "org_evil") == [("enter", start)]  # evaluated after all
    assert worst < 0.5, f"org_good's one-ping batch waited {worst:.2f} s ({n} batches)"
