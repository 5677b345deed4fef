"""The driver simulator: plausible motion, valid fixes, and an upload loop that retries with the
same batchId and delivers every fix exactly once, against a flaky server and the real service."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from devtools.simulate import BLOCK_M, Config, Driver, Fleet, Truck, parse_args

from .conftest import SECRET


def drive(seed: int, seconds: int) -> list[tuple[float, float, float, float]]:
    """(x, y, speed m/s, heading) once a second."""
    truck = Truck(random.Random(seed), 4000)
    out = []
    for _ in range(seconds):
        truck.step(1.0)
        out.append((truck.x, truck.y, truck.v, truck.heading))
    return out


def test_trucks_drive_the_street_grid_at_truck_speeds():
    for seed in range(4):
        track = drive(seed, 1800)
        speeds = [v * 3.6 for _, _, v, _ in track]
        moving = [v for v in speeds if v > 5]
        assert 30 <= max(speeds) <= 92, max(speeds)
        assert 25 <= statistics.median(moving) <= 75
        assert any(v < 1 for v in speeds), "never stopped at a red light"
        for (x0, y0, v0, _), (x1, y1, v1, _) in itertools.pairwise(track):
            assert abs(v1 - v0) <= 3.5, "acceleration beyond a truck's"
            assert math.dist((x0, y0), (x1, y1)) <= max(v0, v1) + 5.5, "jumped"
            # On a street: one coordinate is on a grid line.
            assert (
                min(
                    abs(x1 / BLOCK_M - round(x1 / BLOCK_M)), abs(y1 / BLOCK_M - round(y1 / BLOCK_M))
                )
                < 1e-6
            )
            assert abs(x1) <= 4000 + BLOCK_M and abs(y1) <= 4000 + BLOCK_M
        turns = sum(h0 != h1 for (*_, h0), (*_, h1) in itertools.pairwise(track))
        assert turns >= 5


def test_fixes_are_valid_pings_with_realistic_fields():
    cfg = Config(drivers=3, secret=SECRET)
    for i in range(3):
        d = Driver(i, cfg, random.Random(i), None)
        fixes = [d.tick(1.0, 1_800_000_000 + t) for t in range(300)]
        for f in fixes:
            assert -90 <= f["latitude"] <= 90 and -180 <= f["longitude"] <= 180
            assert (
                abs(f["latitude"] - cfg.center[0]) < 0.05
                and abs(f["longitude"] - cfg.center[1]) < 0.05
            )
            assert 2 <= f["accuracy"] <= 30 and f["speed"] >= 0
            assert "heading" not in f or 0 <= f["heading"] < 360
            assert 800 < f["altitude"] < 1000
        stamps = [f["timestamp"] for f in fixes]
        if isinstance(stamps[0], str):
            stamps = [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert Driver(2, cfg, random.Random(0), None).old_app  # some drivers run the old app


def test_cli_flags():
    cfg = parse_args(["--url", "http://h:1", "--drivers", "2", "--org", "o", "--token", "a.b.c",
                      "--token", "d.e.f", "--center", "48.85,2.35", "--interval", "2.5"])  # fmt: skip
    assert (cfg.url, cfg.drivers, cfg.org, cfg.tokens) == ("http://h:1", 2, "o", ("a.b.c", "d.e.f"))
    assert cfg.center == (48.85, 2.35) and cfg.upload_interval_s == 2.5


def fast(**kw: Any) -> Config:
    base: dict[str, Any] = dict(
        drivers=3, org="org_sim", secret=SECRET, fix_interval_s=0.05, upload_interval_s=0.15,
        offline_chance=0.0, lost_ack_chance=0.0, report_every_s=3600, timeout_s=2.0, seed=3,
    )  # fmt: skip
    base.update(kw)
    return Config(**base)


def stamp_ms(ts: int | str) -> int:
    if isinstance(ts, int):
        return ts
    return round(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


async def test_a_stop_during_the_wait_for_a_fix_takes_no_extra_fix():
    # The run may end while the GPS clock waits for its next fix. A fix taken then would come
    # moments after the last one, often in the same millisecond: the same (tripId, timestamp),
    # which the service rightly stores once, one row short of the fixes counted.
    fleet = Fleet(fast(fix_interval_s=0.1))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    last = fleet.drivers[-1]
    tick = last.tick

    def tick_then_stop(dt: float, now: float) -> dict[str, Any]:
        fix = tick(dt, now)
        if len(last.fixes) == 3:
            loop.call_soon(stop.set)  # runs while the clock waits for the 4th fix
        return fix

    last.tick = tick_then_stop  # type: ignore[method-assign]
    await fleet._gps(stop)
    assert fleet.stats.fixes == sum(len(d.fixes) for d in fleet.drivers)
    for d in fleet.drivers:
        stamps = [stamp_ms(f["timestamp"]) for f in d.fixes]
        assert len(stamps) == 3
        assert all(b - a >= 50 for a, b in itertools.pairwise(stamps)), stamps


async def test_unanswered_and_5xx_batches_are_retried_with_the_same_batch_id_and_gaps_upload_late():
    seen: dict[str, int] = {}  # batchId -> attempts
    stored: set[tuple[str, Any]] = set()
    rows = 0

    async def ping(request: web.Request) -> web.StreamResponse:
        nonlocal rows
        body = await request.json()
        batch_id = body.get("batchId") or body["locations"][0]["batchId"]
        n = seen[batch_id] = seen.get(batch_id, 0) + 1
        if n == 1 and len(seen) % 3 == 0:
            return web.json_response(
                {"error": "overloaded"}, status=503, headers={"Retry-After": "0"}
            )
        if n == 1 and len(seen) % 3 == 1:
            request.transport.close()  # type: ignore[union-attr]  # no answer at all
            return web.Response()
        new = {(body["tripId"], loc["timestamp"]) for loc in body["locations"]} - stored
        stored.update(new)
        rows += len(new)
        return web.json_response({"batchId": batch_id, "accepted": len(new),
                                  "duplicates": len(body["locations"]) - len(new), "rejected": []})  # fmt: skip

    app = web.Application()
    app.router.add_post("/api/v1/tracking/ping", ping)
    async with TestServer(app) as server:
        # The server answers at once or hangs up, so a long request timeout costs nothing; it
        # is also how long the final drain may retry, which a slow machine (debug mode) needs.
        cfg = fast(url=str(server.make_url("")), duration_s=2.0, offline_chance=0.3,
                   offline_s=(0.2, 0.5), lost_ack_chance=0.2, timeout_s=10.0)  # fmt: skip
        stats = await Fleet(cfg).run()
    assert stats.retries > 0 and stats.lost_acks > 0 and stats.late_batches > 0
    assert any(n > 1 for n in seen.values())
    assert stats.failed == 0
    # Every fix reached the server exactly once as a row, whatever the retries; each batch's
    # one heard answer counts its pings as accepted, or as duplicates after a lost answer.
    assert rows == stats.fixes == stats.accepted + stats.duplicates
    assert stats.duplicates > 0


async def test_against_the_service_every_fix_is_stored_once(make_client, db):
    client = await make_client()
    # timeout_s also bounds the final drain: with 30% of answers lost, 2 s sometimes ended it
    # with a batch still on a phone, its pings stored but never answered.
    cfg = fast(url=str(client.make_url("")), duration_s=1.5, lost_ack_chance=0.3,
               offline_chance=0.2, offline_s=(0.2, 0.4), timeout_s=5.0)  # fmt: skip
    fleet = Fleet(cfg)
    stats = await fleet.run()
    assert not any(d.outbox or d.fixes for d in fleet.drivers), "the drain ran out of time"
    assert stats.failed == 0 and stats.rejected == 0
    assert stats.lost_acks > 0 and stats.duplicates > 0
    count = await db.fetchval('SELECT count(*) FROM "TripLocation"')
    trips = await db.fetchval('SELECT count(DISTINCT "tripId") FROM "TripLocation"')
    assert count == stats.fixes == stats.accepted + stats.duplicates
    assert trips == cfg.drivers
