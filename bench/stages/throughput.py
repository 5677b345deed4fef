"""One cell of the ingest matrix: a contender, a batch size, a number of connections and an
ack mode, under closed-loop wrk load; stored pings counted in PostgreSQL.

Stored pings/s is counted in the database over a window that skips the first seconds
(connections opening, pools filling): rows whose transaction started inside the window.
CPU is the contender's process tree over the same window, from /proc; PostgreSQL's is that
of the backends serving the benchmark database (best effort: a backend that exits within
the window is missed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from devtools.procs import Process, cpu_delta, cpu_seconds, status_kib, tree

from ..contenders.registry import ALL, SERVICE, Contender
from ..context import Context
from ..load.closedloop import run_wrk
from ..procs import machine_busy_s
from .scrape import flush_summary, scrape

Hook = Callable[[Process], Awaitable[None]]


@dataclass(frozen=True)
class Cell:
    contender: str
    batch: int
    conns: int
    ack: str = "durable"

    @property
    def name(self) -> str:
        ack = "" if self.ack == "durable" else f" {self.ack}"
        return f"{self.contender}{ack} b{self.batch} c{self.conns}"


def _per_100k(cpu: float, rows: int) -> float | None:
    return round(cpu / rows * 100_000, 3) if rows else None


async def _flush_stats(contender: Contender, url: str) -> dict[str, Any] | None:
    """Flush count, mean rows and duration: the service's /metrics, the pipeline's /stats."""
    if contender is SERVICE:
        return flush_summary(await scrape(url))
    if contender.key == "pipeline":
        async with aiohttp.ClientSession() as s, s.get(url + "/stats") as r:
            return dict(await r.json())
    return None


class Sample:
    """CPU counters at one instant: the contender's, its PostgreSQL backends', the machine's."""

    def __init__(self, server: dict[int, float], pg: dict[int, float]) -> None:
        self.t = time.time()
        self.server = server
        self.pg = pg
        self.machine = machine_busy_s()


async def _sample(ctx: Context, server_pids: list[int]) -> Sample:
    pg = cpu_seconds(await ctx.db.backend_pids())
    return Sample(cpu_seconds(server_pids), pg)


def _cpu(s0: Sample, s1: Sample, pings: int, loadgen_util: float) -> dict[str, Any]:
    window = s1.t - s0.t
    server, pg = cpu_delta(s0.server, s1.server), cpu_delta(s0.pg, s1.pg)
    machine = (s1.machine - s0.machine) / window
    return {
        "window_s": round(window, 2),
        "server_cpu_s": round(server, 3), "server_cpu_per_100k": _per_100k(server, pings),
        "server_cpu_util": round(server / window, 3),
        "pg_cpu_s": round(pg, 3), "pg_cpu_per_100k": _per_100k(pg, pings) if pg else None,
        "machine_busy_cores": round(machine, 2),
        # Busy CPU not ours: other engineers' work on a shared machine (plus Redis, kernel).
        "other_busy_cores": round(max(0.0, machine - (server + pg) / window - loadgen_util), 2),
    }  # fmt: skip


async def run_cell(
    ctx: Context, cell: Cell, duration: float, warm: float, *, drivers: Path | None = None,
    start_ago_ms: int = 600_000, before: Hook | None = None, after: Hook | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One cell. Optional: ``drivers`` (a wrk data file, default the run's), how long before
    the load starts its pings' timestamps start, and what to do on the running server just
    before the load and just after it (the geofence stage creates fences, then waits for
    their evaluation)."""
    contender = ALL[cell.contender]
    await ctx.db.reset()
    if not contender.http:
        return await _run_copy(ctx, contender, cell, duration, warm)
    server = ctx.server(
        f"{cell.contender}-{cell.ack}-b{cell.batch}-c{cell.conns}", contender.argv(),
        contender.ready_path, ACK_MODE=cell.ack,
    )  # fmt: skip
    await server.start()
    try:
        if before is not None:
            await before(server)
        tag = ctx.tag()
        start_ms = int(time.time() * 1000) - start_ago_ms
        wrk = asyncio.create_task(asyncio.to_thread(
            run_wrk, server.url, drivers or ctx.lua_drivers, cell.batch, cell.conns, duration,
            tag, start_ms,
        ))  # fmt: skip
        await asyncio.sleep(warm)
        # The server's process tree: the service's geofence worker is part of the service.
        s0 = await _sample(ctx, tree(server.pid))
        await asyncio.sleep(max(0.0, duration - warm - 0.05))
        s1 = await _sample(ctx, tree(server.pid))
        w = await wrk
        if after is not None:
            await after(server)
        hwm = sum(status_kib(pid, "VmHWM") for pid in tree(server.pid)) / 1024
        flushes = await _flush_stats(contender, server.url)
    finally:
        await server.stop()
    stored = await ctx.db.count_between(s0.t, s1.t)
    acked = w.ok() * cell.batch
    loadgen_util = w.cpu_s / w.duration_s
    # CPU per 100k pings: stored ones; for the decode limit, which stores none, acked ones.
    pings = stored or round(acked / w.duration_s * (s1.t - s0.t))
    return {
        "cell": cell.name, "contender": cell.contender, "label": contender.label,
        "batch": cell.batch, "conns": cell.conns, "ack": cell.ack,
        "duration_s": round(w.duration_s, 2),
        "stored_pps": round(stored / (s1.t - s0.t)), "acked_pps": round(acked / w.duration_s),
        "stored_rows_window": stored, "stored_rows_total": await ctx.db.count(),
        "requests": w.requests, "statuses": w.statuses, "errors": w.errors,
        "latency_ms": w.latency_ms, **_cpu(s0, s1, pings, loadgen_util),
        "loadgen_cpu_s": round(w.cpu_s, 3), "loadgen_cpu_util": round(loadgen_util, 3),
        "peak_rss_mib": round(hwm, 1), "flushes": flushes,
    }  # fmt: skip


async def _run_copy(
    ctx: Context, contender: Contender, cell: Cell, duration: float, warm: float
) -> dict[str, Any]:
    rows_per_copy = 2000
    proc = await asyncio.create_subprocess_exec(
        *contender.argv(ctx.db.url, str(duration), str(rows_per_copy), str(cell.batch)),
        stdout=asyncio.subprocess.PIPE, env=ctx.env(0),
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode()
    if not line.startswith("started "):
        await proc.wait()
        raise RuntimeError(f"limit_copy did not start: {line!r}")
    started = float(line.split()[1])
    await asyncio.sleep(max(0.0, started + warm - time.time()))
    s0 = await _sample(ctx, [proc.pid])
    await asyncio.sleep(max(0.0, started + duration - 0.05 - time.time()))
    s1 = await _sample(ctx, [proc.pid])
    hwm = status_kib(proc.pid, "VmHWM") / 1024
    await proc.wait()
    stored = await ctx.db.count_between(s0.t, s1.t)
    return {
        "cell": cell.name, "contender": cell.contender, "label": contender.label,
        "batch": cell.batch, "conns": 1, "ack": "durable", "rows_per_copy": rows_per_copy,
        "duration_s": duration, "stored_pps": round(stored / (s1.t - s0.t)), "acked_pps": None,
        "stored_rows_window": stored, "stored_rows_total": await ctx.db.count(),
        "latency_ms": None, **_cpu(s0, s1, stored, 0.0),
        "loadgen_cpu_s": None, "loadgen_cpu_util": None, "peak_rss_mib": round(hwm, 1),
    }  # fmt: skip
