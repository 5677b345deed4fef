"""Nearby: GET /api/v1/tracking/nearby on an org of 10,000 trucks, against bare Redis GEOSEARCH.

One service process. Its org "city" gets 10,000 trucks spread over a 50 km city (load/city.py),
each a trip of its own driver whose fresh pings are posted through the real ingest endpoint,
so the live step builds the GEO set as in production; three other orgs get 1,000 trucks each
over the same city (noise: other GEO sets beside it). Then, per radius (2 and 5 km, limit 10)
and closed-loop concurrency (1 and 8), for a fixed time:

- http: wrk (wrk/nearby.lua) asks the service from random points of the city with a
  dispatcher token: requests/s, p50, p99, max, trips per answer, the service's CPU per request;
- script: the service's own Redis step (ingest.nearby.NearbySearch, the script call that
  sweeps, searches and reads the hits' latest) called in this process, no HTTP, no auth;
- geosearch: bare ``GEOSEARCH key FROMLONLAT lon lat BYRADIUS r m ASC COUNT 10 WITHDIST`` on the
  same GEO set from the same client library (redis-py asyncio), the reference.

The two in-process loops share this process's event loop across their concurrent callers, as
the service's handlers do. Redis's own time per call (INFO commandstats, usec per call) is read
around each phase; Redis is shared with whatever else runs on the machine, so it is a hint.
Last, nearby again (5 km, concurrency 1 and 8) while wrk posts fresh pings at batch 20 for
1,024 more trucks of the same org driving across the city, which move in the same GEO set:
over 16 connections (a light load) and over 256 (the headline cell, which saturates the
service: a nearby request then waits in line with 256 ingest requests on one event loop).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from devtools.procs import Process
from ingest.keyspace import Keyspace
from ingest.live import Live
from ingest.nearby import NearbySearch

from ..contenders.registry import SERVICE
from ..context import Context
from ..load import tokens
from ..load.city import CENTER, HALF_SIDE_M, offset, somewhere, straight_lines
from ..load.closedloop import NEARBY_LUA, run_script, run_wrk
from ..load.openloop import percentile
from ..procs import machine_busy_s

ORG = "city"
TRUCKS = 10_000
NOISE_ORGS = 3
NOISE_TRUCKS = 1_000
RADII_M = (2_000, 5_000)
CONCURRENCY = (1, 8)
LIMIT = 10
TARGET_P99_MS = 10.0
FILL_INFLIGHT = 256
INGEST_DRIVERS = 1024  # of the same org, posting while nearby is asked
# wrk connections of that ingest (batch 20): a light load, and the headline cell's, which
# saturates the service (nearby then waits in line with 256 ingest requests).
INGEST_CONNS = (16, 256)
INGEST_STEP_M = 10.0
SEED = 3


def _half_span() -> tuple[float, float]:
    """Half the city's side in degrees of latitude and longitude, for the query points."""
    lat, lon = offset(*CENTER, HALF_SIDE_M, HALF_SIDE_M)
    return lat - CENTER[0], lon - CENTER[1]


def _summary(latencies_s: list[float], elapsed_s: float) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies_s]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    return {
        "requests": len(ms), "rps": round(len(ms) / elapsed_s, 1),
        "p50_ms": round(p50, 3) if p50 is not None else None,
        "p99_ms": round(p99, 3) if p99 is not None else None,
        "max_ms": round(max(ms), 3) if ms else None,
    }  # fmt: skip


async def _closed_loop(
    call: Callable[[float, float], Awaitable[int]], conc: int, seconds: float, seed: int
) -> dict[str, Any]:
    """``conc`` callers in this event loop, each calling again as soon as it is answered."""
    latencies: list[float] = []
    found = [0]
    half_lat, half_lon = _half_span()
    end = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        while time.perf_counter() < end:
            lat = CENTER[0] + rng.uniform(-1, 1) * half_lat
            lon = CENTER[1] + rng.uniform(-1, 1) * half_lon
            t0 = time.perf_counter()
            n = await call(lat, lon)
            latencies.append(time.perf_counter() - t0)
            found[0] += n

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(conc)))
    out = _summary(latencies, time.perf_counter() - started)
    out["trips_per_answer"] = round(found[0] / len(latencies), 2) if latencies else None
    return out


class Usage:
    """CPU counters at one instant: the machine's, the service's, Redis's (INFO; Redis may
    serve others too), this process's, and Redis's time per command (INFO commandstats)."""

    def __init__(self, server: Process, redis_cpu: dict[str, Any], cmds: dict[str, Any]) -> None:
        self.t = time.monotonic()
        self.machine = machine_busy_s()
        self.service = sum(server.cpu().values())
        self.me = time.process_time()
        self.redis = float(redis_cpu["used_cpu_sys"]) + float(redis_cpu["used_cpu_user"])
        self.cmds = {
            name: (int(cmds[f"cmdstat_{name}"]["calls"]), int(cmds[f"cmdstat_{name}"]["usec"]))
            for name in ("evalsha", "geosearch")
            if f"cmdstat_{name}" in cmds
        }

    @classmethod
    async def sample(cls, server: Process, client: aioredis.Redis) -> Usage:
        return cls(server, await client.info("cpu"), await client.info("commandstats"))

    def until(self, end: Usage, client_cpu_s: float | None = None) -> dict[str, Any]:
        """Cores used between two samples; the client's CPU is wrk's if given, else ours."""
        wall = end.t - self.t
        client = client_cpu_s if client_cpu_s is not None else end.me - self.me
        used = {
            "service": (end.service - self.service) / wall,
            "redis": (end.redis - self.redis) / wall,
            "client": client / wall,
        }
        machine = (end.machine - self.machine) / wall
        per_call = {}
        for name, (calls, usec) in end.cmds.items():
            c0, u0 = self.cmds.get(name, (0, 0))
            if calls > c0:
                per_call[name] = round((usec - u0) / (calls - c0), 1)
        return {
            **{f"{k}_cpu_util": round(v, 3) for k, v in used.items()},
            "machine_busy_cores": round(machine, 2),
            # Busy CPU not ours: other work on a shared machine (and PostgreSQL, kernel).
            "other_busy_cores": round(max(0.0, machine - sum(used.values())), 2),
            "redis_usec_per_call": per_call,
        }


async def _fill(ctx: Context, url: str) -> dict[str, Any]:
    """Every truck posts two fresh pings, a second apart, through the ingest endpoint."""
    rng = random.Random(SEED)
    fleets = [(ORG, "ndrv", TRUCKS)] + [
        (f"noise{k}", f"x{k}drv", NOISE_TRUCKS) for k in range(NOISE_ORGS)
    ]
    posts = [
        (driver, token, somewhere(rng))
        for org, prefix, n in fleets
        for driver, token in tokens.drivers(ctx.secret, n, prefix, org)
    ]
    rng.shuffle(posts)  # the orgs' trucks arrive mixed, as they would
    gate = asyncio.Semaphore(FILL_INFLIGHT)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=FILL_INFLIGHT)) as s:

        async def post(driver: str, token: str, where: tuple[float, float]) -> None:
            now = int(time.time() * 1000)
            locations = [
                {"latitude": where[0] + dlat, "longitude": where[1], "timestamp": now - ago,
                 "accuracy": 4.5, "speed": 8.0, "heading": 0.0}
                for ago, dlat in ((1000, -1e-4), (0, 0.0))
            ]  # fmt: skip
            body = {"batchId": f"fill-{driver}", "tripId": f"t_{driver}", "driverId": driver,
                    "locations": locations}  # fmt: skip
            async with gate, s.post(
                url + "/api/v1/tracking/ping", json=body,
                headers={"Authorization": f"Bearer {token}"},
            ) as r:  # fmt: skip
                if r.status != 200:
                    raise RuntimeError(f"fill: {r.status} {await r.text()}")

        await asyncio.gather(*(post(*p) for p in posts))
    return {"trucks": len(posts), "fill_s": round(time.monotonic() - started, 2)}


async def _geo_count(client: aioredis.Redis, key: str, want: int, timeout_s: float) -> int:
    """ZCARD of the GEO set once it holds ``want`` members (the live step runs after each
    commit, off the ack path), or whatever it holds after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        n = int(await client.zcard(key))
        if n >= want or time.monotonic() > end:
            return n
        await asyncio.sleep(0.1)


async def _http(
    server: Process, client: aioredis.Redis, token: str, radius: int, conc: int, seconds: float
) -> dict[str, Any]:
    half_lat, half_lon = _half_span()
    args = [token, str(CENTER[0]), str(CENTER[1]), str(half_lat), str(half_lon), str(radius),
            str(LIMIT), str(SEED)]  # fmt: skip
    u0 = await Usage.sample(server, client)
    w = await asyncio.to_thread(run_script, server.url, NEARBY_LUA, args, conc, seconds)
    u1 = await Usage.sample(server, client)
    ok = sum(n for code, n in w.statuses.items() if code == 200)
    found = w.raw.get("trips", 0)
    assert isinstance(found, int)
    cpu = u1.service - u0.service
    return {
        "requests": w.requests, "rps": round(w.requests / w.duration_s, 1),
        "p50_ms": w.latency_ms["p50"], "p99_ms": w.latency_ms["p99"],
        "max_ms": w.latency_ms["max"], "statuses": w.statuses, "errors": w.errors,
        "trips_per_answer": round(found / ok, 2) if ok else None,
        "service_cpu_us_per_request": round(cpu / w.requests * 1e6, 1) if w.requests else None,
        **u0.until(u1, w.cpu_s),
    }  # fmt: skip


async def _during_ingest(
    ctx: Context, server: Process, client: aioredis.Redis, token: str, conc: int, conns: int,
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Nearby (5 km) while wrk posts pings over ``conns`` connections for INGEST_DRIVERS more
    trucks of the org (new trips each time: the GEO set grows by as many)."""
    pairs = tokens.drivers(ctx.secret, INGEST_DRIVERS, "mdrv", ORG)
    lines = straight_lines(random.Random(SEED), INGEST_DRIVERS, INGEST_STEP_M)
    data = tokens.write_lua(ctx.work / "nearby_movers.lua", pairs, lines)
    warm = 1.5
    t0 = time.time()
    ingest = asyncio.create_task(asyncio.to_thread(
        run_wrk, server.url, data, 20, conns, seconds + 2 * warm, ctx.tag(),
        int(time.time() * 1000),
    ))  # fmt: skip
    await asyncio.sleep(warm)
    t1 = time.time()
    r = await _http(server, client, token, RADII_M[1], conc, seconds)
    t2 = time.time()
    w = await ingest
    stored = await ctx.db.count_between(t1, t2)
    r.update(
        kind=f"http, ingest c{conns}", radius_m=RADII_M[1], concurrency=conc, ingest_conns=conns,
        ingest_stored_pps=round(stored / (t2 - t1)),
        ingest_statuses=w.statuses, ingest_p99_ms=w.latency_ms["p99"],
        ingest_s=round(time.time() - t0, 1),
        service_cpu_us_per_request=None,  # the service also ingested meanwhile
    )  # fmt: skip
    return r


async def run(ctx: Context, phase_s: float, ref_s: float, during_s: float) -> dict[str, Any]:
    await ctx.db.reset()
    server = ctx.server("service-nearby", SERVICE.argv(), SERVICE.ready_path)
    await server.start()
    client = aioredis.from_url(ctx.redis_url)
    geo_key = Keyspace(ctx.redis_prefix).nearby_sets(ORG)[0][0]
    dispatcher = tokens.sign(ctx.secret, "dispatcher1", "dispatcher", ORG)
    out: dict[str, Any] = {"org_trucks": TRUCKS, "noise": f"{NOISE_ORGS} orgs x {NOISE_TRUCKS}",
                           "limit": LIMIT, "target_p99_ms": TARGET_P99_MS, "cases": []}  # fmt: skip
    try:
        ctx.say(
            f"nearby: posting {TRUCKS:,} trucks of one org and {NOISE_ORGS} x {NOISE_TRUCKS:,} of others"
        )
        out.update(await _fill(ctx, server.url))
        out["geo_set_size"] = await _geo_count(client, geo_key, TRUCKS, 30.0)
        out["side_km"] = round(2 * HALF_SIDE_M / 1000)
        out["trucks_per_km2"] = round(TRUCKS / (2 * HALF_SIDE_M / 1000) ** 2, 1)
        ctx.say(f"nearby: filled in {out['fill_s']} s; GEO set of {out['geo_set_size']:,} trucks")
        live = Live(client, Keyspace(ctx.redis_prefix), 86_400, None, nearby_max_age_s=600)
        search = NearbySearch(live)

        async def script(radius: int, lat: float, lon: float) -> int:
            return len(await search.search(ORG, lat, lon, radius, LIMIT))

        async def geosearch(radius: int, lat: float, lon: float) -> int:
            hits = await client.geosearch(
                geo_key, longitude=lon, latitude=lat, radius=radius, unit="m", sort="ASC",
                count=LIMIT, withdist=True,
            )  # fmt: skip
            return len(hits)

        for radius in RADII_M:
            for conc in CONCURRENCY:
                for kind in ("http", "script", "geosearch"):
                    if kind == "http":
                        r = await _http(server, client, dispatcher, radius, conc, phase_s)
                    else:
                        call = partial(script if kind == "script" else geosearch, radius)
                        u0 = await Usage.sample(server, client)
                        r = await _closed_loop(call, conc, ref_s, SEED)
                        r.update(u0.until(await Usage.sample(server, client)))
                    r.update(kind=kind, radius_m=radius, concurrency=conc)
                    out["cases"].append(r)
                    ctx.say(_line(r))
        for conns in INGEST_CONNS if during_s else ():
            for conc in CONCURRENCY:
                r = await _during_ingest(ctx, server, client, dispatcher, conc, conns, during_s)
                out["cases"].append(r)
                ctx.say(_line(r) + f"; ingest meanwhile {r['ingest_stored_pps']:,} stored pings/s")
        out["geo_set_size_end"] = int(await client.zcard(geo_key))
    finally:
        await client.aclose()
        await server.stop()
    return out


def _line(r: dict[str, Any]) -> str:
    return (
        f"nearby {r['kind']:<18} r={r['radius_m'] / 1000:g} km c{r['concurrency']}:"
        f" {r['rps']:>8,.0f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
        f"  max {r['max_ms']} ms  ({r['trips_per_answer']} trips per answer;"
        f" others busy: {r['other_busy_cores']} cores)"
    )
