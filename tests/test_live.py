"""Live locations: latest in Redis, history pages, and the WebSocket fan-out."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from datetime import UTC, datetime, timedelta

import aiohttp

from devtools import procs
from ingest import constants as keys
from ingest import live as live_module
from ingest.typedefs import FANOUT, LIVE

from .conftest import REDIS_URL, SECRET, auth, batch, iso, now_ms, token

PING = "/api/v1/tracking/ping"


def dispatcher(org: str = "org_1") -> dict[str, str]:
    return auth("dispatcher", "disp_1", org)


async def ping(client, body, sub="drv_1", org="org_1"):
    resp = await client.post(PING, json=body, headers=auth("driver", sub, org))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def connect(client_or_url, org: str = "org_1"):
    tok = token("dispatcher", "disp_1", org)
    if isinstance(client_or_url, str):
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"{client_or_url}/api/v1/live?access_token={tok}")
        ws._test_session = session  # type: ignore[attr-defined]
        return ws
    return await client_or_url.ws_connect(f"/api/v1/live?access_token={tok}")


async def subscribe(ws, trips=(), fleet=False) -> list[dict]:
    """Subscribe; return the messages up to and including the 'subscribed' ack, plus snapshots
    that follow it within a short wait."""
    await ws.send_json({"type": "subscribe", "trips": list(trips), "fleet": fleet})
    got = []
    while True:
        msg = json.loads((await ws.receive(timeout=5)).data)
        got.append(msg)
        if msg["type"] == "subscribed":
            break
    while True:
        try:
            got.append(json.loads((await ws.receive(timeout=0.3)).data))
        except TimeoutError:
            return got


async def receive_locations(ws, n: int, timeout: float = 5.0) -> list[dict]:
    out = []
    while len(out) < n:
        msg = json.loads((await ws.receive(timeout=timeout)).data)
        if msg["type"] == "locations":
            out.append(msg)
    return out


async def published(client, trip: str, org: str = "org_1") -> None:
    """Wait until the publisher (which runs after the ack) has written the trip's latest."""
    live = client.server.app[LIVE]
    for _ in range(100):
        if await live.latest(org, trip) is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{trip} never published")


async def nothing_more(ws, wait: float = 0.5) -> bool:
    try:
        msg = await ws.receive(timeout=wait)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message {msg.data!r}")


# -- latest ------------------------------------------------------------------------------


async def test_latest_never_moves_backwards(client):
    newer = batch(3, start_ms=now_ms(-60))
    older = batch(3, start_ms=now_ms(-3600))  # an offline phone uploading late
    await ping(client, newer)
    await ping(client, older)
    resp = await client.get("/api/v1/tracking/trips/trip_1/latest", headers=dispatcher())
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["tripId"] == "trip_1" and body["driverId"] == "drv_1"
    newest = newer["locations"][-1]
    assert datetime.fromisoformat(body["location"]["timestamp"]) == datetime.fromisoformat(
        newest["timestamp"]
    )
    assert body["location"]["latitude"] == newest["latitude"]


async def test_latest_falls_back_to_postgres_and_404s_unknown(client, redis, redis_prefix):
    await ping(client, batch(2))
    from_redis = await (
        await client.get("/api/v1/tracking/trips/trip_1/latest", headers=dispatcher())
    ).json()
    await asyncio.sleep(0.1)
    deleted = await redis.delete(keys.latest_key(redis_prefix, "org_1", "trip_1"))
    assert deleted == 1
    resp = await client.get("/api/v1/tracking/trips/trip_1/latest", headers=dispatcher())
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    from_pg = await resp.json()
    assert from_pg["location"]["latitude"] == from_redis["location"]["latitude"]
    assert datetime.fromisoformat(from_pg["location"]["timestamp"]) == datetime.fromisoformat(
        from_redis["location"]["timestamp"]
    )
    missing = await client.get("/api/v1/tracking/trips/nope/latest", headers=dispatcher())
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"


async def test_fleet_ranks_a_clock_running_ahead_as_now_not_first(client, redis, redis_prefix):
    """A phone clock ahead of the server (inside MAX_CLOCK_SKEW_S) must not rank its trip above
    the trucks that report after it in the fleet snapshot order; its latest never goes back."""
    live = client.server.app[LIVE]
    key = keys.fleet_key(redis_prefix, "org_1")
    ahead = batch(1, trip="ahead", start_ms=now_ms(240))  # 4 min ahead
    await ping(client, ahead)
    await published(client, "ahead")
    assert await redis.zscore(key, "ahead") <= now_ms()
    await asyncio.sleep(0.05)
    await ping(client, batch(1, trip="real", start_ms=now_ms()))
    await published(client, "real")
    assert await live.fleet_trips("org_1", 10) == ["real", "ahead"]

    # The same phone reports again with a right clock: it ranks first again (its score rises
    # though its latest does not move), and its latest stays the newer ping from ahead.
    before = await redis.zscore(key, "ahead")
    await ping(client, batch(1, trip="ahead", start_ms=now_ms()))
    for _ in range(100):
        if await redis.zscore(key, "ahead") > before:
            break
        await asyncio.sleep(0.02)
    assert await live.fleet_trips("org_1", 10) == ["ahead", "real"]
    body = json.loads(await live.latest("org_1", "ahead") or b"{}")
    assert datetime.fromisoformat(body["location"]["timestamp"]) == datetime.fromisoformat(
        ahead["locations"][0]["timestamp"]
    )


# -- fleet and GEO sets bounded by the live trips ----------------------------------------
# Written for both keyspaces (test_redis_cluster runs them again): on a cluster a flush prunes
# the bucket sets of the trips it carries, so the old trips are taken from the live one's bucket.


def bucket_mates(live, org: str, trip: str, n: int, stem: str) -> list[str]:
    """``n`` trip ids whose fleet and GEO sets are ``trip``'s (all of them, standalone)."""
    key = live.keys.fleet_set(org, trip)
    ids = (f"{stem}_{i}" for i in itertools.count())
    return list(itertools.islice((t for t in ids if live.keys.fleet_set(org, t) == key), n))


async def seed(live, org: str, trips: list[str], score: int, lat: float = 12.9,
               lon: float = 77.5) -> None:  # fmt: skip
    """Put ``trips`` in their fleet set with ``score`` and in their GEO set, as the live step
    left them when they last reported (every one in one bucket)."""
    fleet, geo = live.keys.fleet_set(org, trips[0]), live.keys.geo_set(org, trips[0])
    await live.redis.zadd(fleet, dict.fromkeys(trips, score))
    await live.redis.geoadd(geo, [v for t in trips for v in (lon, lat, t)])


async def set_sizes(live, org: str, trip: str) -> tuple[int, int]:
    """(fleet set, GEO set) member counts of ``trip``'s bucket."""
    r, keys = live.redis, live.keys
    return await r.zcard(keys.fleet_set(org, trip)), await r.zcard(keys.geo_set(org, trip))


async def report(client, trip: str, org: str = "org_1") -> None:
    """A ping of ``trip`` at now, once the live step has written it (so one flush is done)."""
    body = batch(1, trip=trip, start_ms=now_ms())
    await ping(client, body, org=org)
    want = datetime.fromisoformat(body["locations"][0]["timestamp"])
    live = client.server.app[LIVE]
    for _ in range(200):
        latest = await live.latest(org, trip)
        if latest and datetime.fromisoformat(json.loads(latest)["location"]["timestamp"]) == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{trip} at {want} never published")


async def test_old_trips_leave_the_fleet_and_geo_sets_a_bounded_number_per_flush(client):
    """Every write refreshes the whole set's TTL: an org that never stops reporting kept every
    trip it ever had. Its trips silent for longer than LATEST_TTL_S now leave both sets, at most
    PRUNE_PER_CALL per script call."""
    live = client.server.app[LIVE]
    old = bucket_mates(live, "org_1", "live", 600, "old")
    await seed(live, "org_1", old, now_ms(-2 * live.ttl))
    await seed(live, "org_1", old[:5], now_ms(-live.ttl - 5))  # just past the TTL
    assert await set_sizes(live, "org_1", "live") == (600, 600)
    sizes = [(600, 600)]
    for _ in range(10):
        await report(client, "live")
        sizes.append(await set_sizes(live, "org_1", "live"))
        if sizes[-1] == (1, 1):
            break
    assert sizes[-1] == (1, 1), sizes  # the live trip only
    # One script call per flush here: the first one added "live" and pruned the most it may.
    assert sizes[1] == (601 - live_module.PRUNE_PER_CALL,) * 2, sizes
    assert all(f == g for f, g in sizes), sizes  # both sets, always together
    assert await live.fleet_trips("org_1", 10) == ["live"]


async def test_pruning_one_org_never_touches_another_with_the_same_trip_ids(client):
    live = client.server.app[LIVE]
    old = bucket_mates(live, "org_1", "live", 50, "old")  # a bucket is the trip's, any org
    for org in ("org_1", "org_2"):
        await seed(live, org, old, now_ms(-2 * live.ttl))
        await seed(live, org, ["live"], now_ms())  # org_2's own "live" reports too
    await report(client, "live", org="org_1")
    assert await set_sizes(live, "org_1", "live") == (1, 1)
    assert await set_sizes(live, "org_2", "live") == (51, 51)
    await report(client, "live", org="org_2")
    assert await set_sizes(live, "org_2", "live") == (1, 1)


async def test_a_live_trip_is_never_pruned(client):
    """Pruned: silent for longer than the latest key lives. Kept: every trip that reported
    within it, however long ago within it or whatever its ping time, in both sets."""
    live = client.server.app[LIVE]
    a, b, quiet = bucket_mates(live, "org_1", "live", 3, "kept")
    old = bucket_mates(live, "org_1", "live", 100, "old")
    await seed(live, "org_1", old, now_ms(-live.ttl - 60))
    await seed(live, "org_1", [quiet], now_ms(-live.ttl + 60))  # silent most of the TTL
    await ping(client, batch(1, trip=a, start_ms=now_ms(-30)))  # a late ping: scored 30 s ago
    await report(client, b)
    await report(client, "live")
    assert await set_sizes(live, "org_1", "live") == (4, 4)
    trips = ["live", b, a, quiet]
    assert await live.fleet_trips("org_1", 10) == trips
    assert None not in await live.redis.geopos(live.keys.geo_set("org_1", "live"), *trips)
    # GT still: a trip scored now keeps its score when an older ping comes in late.
    before = await live.redis.zscore(live.keys.fleet_set("org_1", b), b)
    await ping(client, batch(1, trip=b, start_ms=now_ms(-300)))
    await report(client, "live")
    assert await live.redis.zscore(live.keys.fleet_set("org_1", b), b) == before


# -- history -----------------------------------------------------------------------------


def month_boundary() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


async def test_history_pages_across_a_month_boundary(client):
    b = month_boundary()
    start = int(b.timestamp() * 1000) - 2500
    await ping(client, batch(5, start_ms=start, step_ms=1000))  # 3 pings before, 2 after
    url = "/api/v1/tracking/trips/trip_1/locations"
    got, cursor, pages = [], None, 0
    while True:
        q = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = await client.get(url, params=q, headers=dispatcher())
        assert resp.status == 200
        page = await resp.json()
        got += page["locations"]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert pages == 3
    stamps = [datetime.fromisoformat(p["timestamp"]) for p in got]
    assert stamps == sorted(stamps) and len(stamps) == 5
    assert stamps[2] < b <= stamps[3]
    ranged = await client.get(
        url, params={"from": iso(start + 1000), "to": str(start + 3000)}, headers=dispatcher()
    )
    assert len((await ranged.json())["locations"]) == 2  # from inclusive, to exclusive
    bad = await client.get(url, params={"from": "yesterday"}, headers=dispatcher())
    assert bad.status == 400 and "from" in (await bad.json())["detail"]
    unknown = await client.get("/api/v1/tracking/trips/nope/locations", headers=dispatcher())
    assert unknown.status == 404


async def test_history_limit_is_read_as_every_other_limit(client):
    """ASCII digits from 1 to 5000 (the cold review found int() taking "1_0", "+5", " 5" and
    full-width digits here, which nearby and the events refuse); an empty one is the default."""
    await ping(client, batch(3))
    url = "/api/v1/tracking/trips/trip_1/locations"
    for bad in ("1_0", "+5", " 5", "\uff15", "0", "5001", "abc", "1.5", "9" * 5000):
        resp = await client.get(url, params={"limit": bad}, headers=dispatcher())
        assert resp.status == 400, bad
        assert await resp.json() == {
            "error": "invalid_query", "detail": "limit: must be an integer between 1 and 5000"
        }  # fmt: skip
    for good, count in (("2", 2), ("5000", 3), ("", 3)):
        resp = await client.get(url, params={"limit": good}, headers=dispatcher())
        assert resp.status == 200, good
        assert len((await resp.json())["locations"]) == count


async def test_history_reads_only_the_partitions_of_the_range(db):
    from ingest.read_api import _PAGE_SQL

    b = month_boundary()
    start, end = b + timedelta(days=1), b + timedelta(days=2)
    this_month = f"TripLocation_{b.year:04d}_{b.month:02d}"
    for by_driver in (False, True):
        await db.execute(
            f"PREPARE page{by_driver:d}(text, text, text, timestamptz, timestamptz, timestamptz,"
            f" bigint) AS {_PAGE_SQL[by_driver]}"
        )
    times = f"'{start.isoformat()}', '{end.isoformat()}', '-infinity', 100"
    for mode, page in itertools.product(  # planner and executor pruning, for either token
        ("force_custom_plan", "force_generic_plan"),
        (f"page0('t', 'o', NULL, {times})", f"page1('t', 'o', 'd', {times})"),
    ):
        await db.execute(f"SET plan_cache_mode = {mode}")
        plan = "\n".join(
            r[0] for r in await db.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE {page}")
        )
        touched = {
            word.strip('"(),')
            for word in plan.split()
            if word.strip('"(').startswith("TripLocation_2")
        }
        assert touched, plan
        assert all(t.startswith(this_month) for t in touched), plan


# -- WebSocket ---------------------------------------------------------------------------


async def test_subscriber_gets_exactly_the_committed_pings_of_its_trips(client):
    ws = await connect(client)
    first = batch(2, trip="trip_a")
    await ping(client, first)
    await published(client, "trip_a")
    hello = await subscribe(ws, ["trip_a"])
    assert hello[0] == {"type": "subscribed", "trips": ["trip_a"], "fleet": False}
    snap = hello[1]
    assert snap["type"] == "snapshot" and snap["tripId"] == "trip_a"
    assert snap["location"]["latitude"] == first["locations"][-1]["latitude"]

    a = batch(3, trip="trip_a", start_ms=now_ms(-100))
    await ping(client, batch(3, trip="trip_b"))  # not subscribed
    await ping(client, a)
    (msg,) = await receive_locations(ws, 1)
    assert msg["tripId"] == "trip_a" and msg["driverId"] == "drv_1"
    assert [loc["latitude"] for loc in msg["locations"]] == [
        loc["latitude"] for loc in a["locations"]
    ]
    await ping(client, a)  # a replay stores nothing, so publishes nothing
    assert await nothing_more(ws)
    await ws.send_json({"type": "unsubscribe", "trips": ["trip_a"]})
    await asyncio.sleep(0.1)
    await ping(client, batch(2, trip="trip_a", start_ms=now_ms(-10)))
    assert await nothing_more(ws)
    await ws.close()


async def test_fleet_subscriber_sees_only_its_org(client):
    ws = await connect(client, org="org_1")
    await subscribe(ws, fleet=True)
    await ping(client, batch(2, trip="other_org_trip", driver="drv_9"), sub="drv_9", org="org_2")
    await ping(client, batch(2, trip="mine"))
    (msg,) = await receive_locations(ws, 1)
    assert msg["tripId"] == "mine"
    assert await nothing_more(ws)
    # The same trip id in another org is another trip.
    await ws.send_json({"type": "subscribe", "trips": ["other_org_trip"]})
    await ping(client, batch(2, trip="other_org_trip", driver="drv_9", start_ms=now_ms(-5)),
               sub="drv_9", org="org_2")  # fmt: skip
    msgs = []
    while True:
        try:
            msgs.append(json.loads((await ws.receive(timeout=0.5)).data))
        except TimeoutError:
            break
    assert [m["type"] for m in msgs] == ["subscribed"]
    await ws.close()


async def test_fleet_and_trip_subscription_deliver_once(client):
    ws = await connect(client)
    await subscribe(ws, ["trip_1"], fleet=True)
    await ping(client, batch(2))
    (msg,) = await receive_locations(ws, 1)
    assert msg["tripId"] == "trip_1"
    assert await nothing_more(ws)


async def test_message_is_encoded_once_whatever_the_subscribers(make_client, monkeypatch):
    client = await make_client(ws_max_sockets_per_subject=25)  # one subject, 25 sockets
    calls = []
    real = live_module._JSON

    class Counting:
        def encode(self, obj):
            calls.append(type(obj).__name__)
            return real.encode(obj)

    monkeypatch.setattr(live_module, "_JSON", Counting())
    sockets = [await connect(client) for _ in range(25)]
    for ws in sockets:
        await subscribe(ws, ["trip_1"])
    fanout = client.server.app[FANOUT]
    frames_before = fanout.frames_built
    await ping(client, batch(4))
    received = [await receive_locations(ws, 1) for ws in sockets]
    assert calls.count("LiveLocations") == 1
    assert fanout.frames_built - frames_before == 1
    assert len({json.dumps(r[0], sort_keys=True) for r in received}) == 1
    for ws in sockets:
        await ws.close()


async def test_a_subscriber_that_never_reads_does_not_block_the_others(make_client):
    client = await make_client(ws_send_buffer_bytes=32_768, max_pings_per_batch=1000)
    tok = token("dispatcher", "disp_1", "org_1")
    # A raw client with a tiny receive window that never reads after the handshake.
    port = client.server.port
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.sendall(
        f"GET /api/v1/live?access_token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    sub = json.dumps({"type": "subscribe", "trips": ["trip_1"]}).encode()
    mask = b"\x00\x00\x00\x00"
    raw.sendall(bytes([0x81, 0x80 | len(sub)]) + mask + sub)
    fast = await connect(client)
    await subscribe(fast, ["trip_1"])
    await asyncio.sleep(0.3)
    from ingest import metrics

    closed_before = metrics.WS_SLOW_CLOSED._value.get()
    for i in range(40):
        await ping(client, batch(1000, start_ms=now_ms(-3000 - i * 1000), step_ms=1))
        got = await receive_locations(fast, 1)
        assert len(got[0]["locations"]) == 1000
    assert metrics.WS_SLOW_CLOSED._value.get() > closed_before
    raw.close()
    await fast.close()


async def test_two_processes_share_live_data_through_redis(
    client, database, redis_prefix, tmp_path
):
    """A ping posted to an ingest-only process reaches a subscriber of another process."""
    ingest = procs.service({
        "DATABASE_URL": database, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
        "JWT_SECRET": SECRET, "ROLE": "ingest", "FLUSH_INTERVAL_MS": "20",
    }, tmp_path)  # fmt: skip
    await ingest.start()
    try:
        ws = await connect(client)
        await subscribe(ws, ["trip_1"])
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{ingest.url}{PING}", json=batch(3), headers=auth()) as r:
                assert r.status == 200
            async with s.get(f"{ingest.url}/api/v1/live") as r:
                assert r.status == 404  # ROLE=ingest serves no WebSockets
        (msg,) = await receive_locations(ws, 1)
        assert len(msg["locations"]) == 3
        await ws.close()
    finally:
        code = await ingest.stop()
        assert code == 0, ingest.log_tail()


async def test_redis_outage_ingest_goes_on_and_live_resumes(make_client, db, private_redis):
    client = await make_client(redis_url=private_redis.url)
    ws = await connect(client)
    await subscribe(ws, ["trip_1"])
    await ping(client, batch(2, start_ms=now_ms(-500)))
    await receive_locations(ws, 1)

    private_redis.stop()
    await ping(client, batch(2, start_ms=now_ms(-400)))  # PostgreSQL still commits
    resp = await client.get("/api/v1/tracking/trips/trip_1/latest", headers=dispatcher())
    assert resp.status == 200  # served from PostgreSQL
    private_redis.start()
    fanout = client.server.app[FANOUT]
    for _ in range(100):
        if fanout.connected.is_set() and (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert fanout.connected.is_set()
    await ping(client, batch(2, start_ms=now_ms(-300)))
    msgs = await receive_locations(ws, 1, timeout=10)
    assert msgs[-1]["tripId"] == "trip_1"
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 6
    await ws.close()
