"""Geofences on the ingest path: stored pings/s with the load's org holding 0 and 1,000 fences.

The service at the matrix's headline cell (batch 20, 256 connections, durable acks), a fresh
process per round, rounds alternating 0, 1000, 0, 1000 (so that drift on a shared machine
does not decide the ratio). Each round starts with no fence at all (the geofence tables
truncated); a 1000 round then creates the fences through POST /api/v1/geofences with a
dispatcher token of the load's org: the 1,000 fences of the index benchmark (load/city.py,
seed 1: circles of 100 m - 2 km, polygons of 4 - 50 positions over a 50 km city). The load is
the matrix's (wrk/pings.lua, 1,024 drivers, one trip each), except that each trip drives a
straight line of its own across the city, 10 m per ping, from a start of its own, and the
pings' timestamps start when the load does: a fence applies to pings from its creation on.

After the load, the round waits until the evaluator (ingest/geofence_events.py, off the ack
path) has caught up, then counts the events in "GeofenceEvent". Stored pings/s and CPU per
100k stored pings (the service's and its PostgreSQL backends') are those of the throughput
cell, over the same window; the evaluation's share of them is the difference between rounds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from devtools.procs import Process
from ingest.geofence_shapes import FenceIndex, parse_shape
from ingest.geofences_api import VALIDATIONS_PER_ORG

from ..context import Context
from ..load import tokens
from ..load.city import LAYOUTS, fence_geometries, straight_lines
from ..plan import HEADLINE
from .scrape import geofence_summary, scrape
from .throughput import Cell, run_cell

FENCES = 1000
FENCE_SEED = 1  # the fences of stages/geofence_index.py
TRACK_SEED = 2
STEP_M = 10.0  # per ping: a truck at 10 m/s pinging every second
DRIVERS = 1024
# As many as the pod validates at once for one org: more would be answered 503 geofence_busy.
CREATE_INFLIGHT = VALIDATIONS_PER_ORG
CREATE_ATTEMPTS = 5
DRAIN_TIMEOUT_S = 120.0
_TRUNCATE = 'TRUNCATE "GeofenceEvent", "GeofenceState", "Geofence", "GeofenceOrg"'


def _inside_share(
    geometries: list[tuple[str, dict[str, Any], float | None]],
    lines: list[tuple[float, float, float, float]],
    pings: int,
) -> dict[str, float]:
    """What the evaluator will see, computed here with the service's own FenceIndex: the share
    of pings inside some fence, fences per ping, and crossings (events) per 1,000 pings, over
    ``pings`` pings of every track."""
    index = FenceIndex(
        (name, parse_shape(geometry, radius, 1000)) for name, geometry, radius in geometries
    )
    inside = hits = changes = total = 0
    for lat, lon, dlat, dlon in lines:
        was: frozenset[str] = frozenset()
        for k in range(pings):
            now = index.containing(lat + k * dlat, lon + k * dlon)
            inside += bool(now)
            hits += len(now)
            changes += len(now ^ was)
            was = now
            total += 1
    return {
        "share_inside": round(inside / total, 3),
        "fences_per_ping": round(hits / total, 3),
        "events_per_1k_pings": round(changes / total * 1000, 2),
    }


async def _create(
    url: str, token: str, geometries: list[tuple[str, dict[str, Any], float | None]]
) -> float:
    """POST every fence; the seconds that took."""
    gate = asyncio.Semaphore(CREATE_INFLIGHT)
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:

        async def create(name: str, geometry: dict[str, Any], radius: float | None) -> None:
            body: dict[str, Any] = {"name": name, "geometry": geometry}
            if radius is not None:
                body["radiusM"] = radius
            async with gate:
                for _ in range(CREATE_ATTEMPTS):  # a 503 or 429 is retried as its Retry-After says
                    async with s.post(url + "/api/v1/geofences", json=body, headers=headers) as r:
                        if r.status == 201:
                            return
                        answer = f"{r.status} {await r.text()}"
                        if r.status not in (429, 503):
                            break
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                raise RuntimeError(f"creating a fence: {answer}")

        await asyncio.gather(*(create(*g) for g in geometries))
    return time.monotonic() - started


async def _drain(server: Process) -> dict[str, Any]:
    """Wait until the evaluator's count of evaluated pings has not moved for a second; what it
    did over the whole process, and how long the wait took."""
    started = time.monotonic()
    last, still_since = -1, started
    while True:
        m = await scrape(server.url)
        n = int(m.get("ingest_geofence_pings_evaluated_total", 0))
        now = time.monotonic()
        if n != last:
            last, still_since = n, now
        elif now - still_since >= 1.0 or now - started > DRAIN_TIMEOUT_S:
            out = geofence_summary(m)
            out["drain_s"] = round(still_since - started, 2)
            out["flushed_rows"] = int(m.get("ingest_flush_rows_sum", 0))
            return out
        await asyncio.sleep(0.25)


async def run(
    ctx: Context, rounds: tuple[int, ...], duration: int, warm: float, layout: str = "city"
) -> dict[str, Any]:
    geometries = fence_geometries(random.Random(FENCE_SEED), FENCES, layout)
    lines = straight_lines(random.Random(TRACK_SEED), DRIVERS, STEP_M)
    pairs = tokens.drivers(ctx.secret, DRIVERS, prefix="gdrv")
    data = tokens.write_lua(ctx.work / "drivers_city.lua", pairs, lines)
    dispatcher = tokens.sign(ctx.secret, "dispatcher1", "dispatcher")
    b, c = HEADLINE
    cell = Cell("service", b, c)
    out: dict[str, Any] = {"fences": FENCES, "layout": layout, "radii_m": LAYOUTS[layout],
                           "step_m": STEP_M, "drivers": DRIVERS, "batch": b, "conns": c,
                           "rounds": []}  # fmt: skip
    for fences in rounds:
        r = await _round(ctx, cell, duration, warm, data, geometries[:fences], dispatcher)
        out["rounds"].append(r)
        ctx.say(f"{layout}: {_line(r)}")
    # The last round's fences would stay on the load's org for the stages after this one
    # (the profile was taken with 1,000 fences evaluating every flush).
    await ctx.db.conn.execute(_TRUNCATE)
    # Every track's pings the way a round drives them: what share lies inside some fence.
    per_trip = max((r["stored_rows_total"] for r in out["rounds"]), default=0) // DRIVERS
    out["expected"] = _inside_share(geometries, lines, max(1, per_trip))
    out["expected"]["pings_per_trip"] = per_trip
    out.update(_compare(out["rounds"]))
    return out


async def _round(
    ctx: Context, cell: Cell, duration: int, warm: float, data: Path,
    fences: list[tuple[str, dict[str, Any], float | None]], dispatcher: str,
) -> dict[str, Any]:  # fmt: skip
    """One throughput cell on a fresh process with ``fences`` created just before the load."""
    await ctx.db.conn.execute(_TRUNCATE)
    seen: dict[str, Any] = {}

    async def before(server: Process) -> None:
        if fences:
            seen["create_s"] = round(await _create(server.url, dispatcher, fences), 2)

    async def after(server: Process) -> None:
        seen.update(await _drain(server))

    r = await run_cell(ctx, cell, duration, warm, drivers=data, start_ago_ms=0,
                       before=before, after=after)  # fmt: skip
    events = await ctx.db.conn.fetch(
        'SELECT "event", count(*) FROM "GeofenceEvent" GROUP BY "event"'
    )
    r.update(fences=len(fences), geofences=seen, events_stored=dict(events))
    r["events"] = sum(n for _, n in events)
    return r


def _line(r: dict[str, Any]) -> str:
    g = r["geofences"]
    return (
        f"geofences {r['fences']:>4} fences: {r['stored_pps']:>7,} stored pings/s"
        f"  cpu {r['server_cpu_per_100k']} s/100k  pg {r['pg_cpu_per_100k']} s/100k"
        f"  events {r['events']:,}  evaluated {g['pings_evaluated']:,} of {g['flushed_rows']:,}"
        f" (gap {g['gap_pings']:,}, dropped flushes {g['dropped_flushes']}, drain {g['drain_s']} s)"
        f"  (others busy: {r['other_busy_cores']} cores)"
    )


def _compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means per fence count, their ratio, the ratio of each 1000 round to the 0 round just
    before it, and the bracketed ratios with their confidence interval (see _interval)."""

    def mean(fences: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["fences"] == fences and r[key] is not None]
        return round(statistics.fmean(vals), 3) if vals else None

    by = {
        str(n): {k: mean(n, k) for k in ("stored_pps", "server_cpu_per_100k", "pg_cpu_per_100k")}
        for n in sorted({r["fences"] for r in rows})
    }
    pairs = [
        round(b["stored_pps"] / a["stored_pps"], 3)
        for a, b in itertools.pairwise(rows)
        if a["fences"] == 0 and b["fences"] > 0 and a["stored_pps"]
    ]
    base, fenced = by.get("0", {}).get("stored_pps"), by.get(str(FENCES), {}).get("stored_pps")
    ratio = round(fenced / base, 3) if base and fenced else None
    bracketed = _bracketed(rows)
    return {"by_fences": by, "ratio_pps": ratio, "pair_ratios": pairs,
            "bracketed_ratios": [round(x, 3) for x in bracketed],
            "interval": _interval(bracketed)}  # fmt: skip


def _bracketed(rows: list[dict[str, Any]]) -> list[float]:
    """Each fenced round's stored pings/s over the mean of the unfenced rounds on either side
    of it (the one before, for a last round): a drift of the machine over the three rounds
    cancels out, where the ratio to the round before would take it for the fences' cost."""
    out = []
    for i, r in enumerate(rows):
        if not r["fences"] or not r["stored_pps"]:
            continue
        near = [
            rows[j]["stored_pps"]
            for j in (i - 1, i + 1)
            if 0 <= j < len(rows) and not rows[j]["fences"] and rows[j]["stored_pps"]
        ]
        if near:
            out.append(r["stored_pps"] / statistics.fmean(near))
    return out


# Student's t, two-sided 95%, by degrees of freedom (beyond the table: the normal's 1.96).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
        20: 2.086, 30: 2.042}  # fmt: skip


def _interval(ratios: list[float]) -> dict[str, Any] | None:
    """The geometric mean of ``ratios`` and its 95% confidence interval (t over their logs):
    the fences slow ingest measurably when the interval lies wholly below 1; it lies around
    1, within +-``half_width``, when they do not at this resolution."""
    if len(ratios) < 2:
        return None
    logs = [math.log(x) for x in ratios]
    df = len(logs) - 1
    t = _T95.get(df) or next((v for k, v in sorted(_T95.items()) if k >= df), 1.96)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    mid = statistics.fmean(logs)
    low, high = math.exp(mid - half), math.exp(mid + half)
    return {"n": len(logs), "ratio": round(math.exp(mid), 4), "low": round(low, 4),
            "high": round(high, 4), "half_width": round((high - low) / 2, 4),
            "measurably_slower": high < 1.0}  # fmt: skip
