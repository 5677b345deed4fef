"""Paced load on the service: ack latency at a light load (1,000 pings/s, one per request)
and at half the sustainable rate, and 3x overload.

Both use the open-loop generator (bench/load/openloop.py) at batch 20 with durable acks. The
sustainable rate is the service's stored pings/s at batch 20 and 256 connections measured
earlier in the same run. Overload: 3x that for OVERLOAD seconds, the service's RSS sampled
every second; then closed-loop wrk at 256 connections shows whether it is back to full rate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from devtools.procs import Process

from ..contenders.registry import PIPELINE, SERVICE, Contender
from ..context import Context
from ..load import openloop
from ..load.closedloop import run_wrk
from ..procs import machine_busy_s
from .scrape import flush_summary, scrape

BATCH = 20
MAX_INFLIGHT = 4096  # requests the overload generator keeps outstanding at most
FLUSH_INTERVAL_MS = 50


LIGHT_PPS, LIGHT_BATCH = 1000, 1  # phones posting each ping as it comes
LIGHT_P50_MS = 10.0  # issue 17: a lone ping is committed at once, not after FLUSH_INTERVAL_MS


async def light(ctx: Context, duration_s: float) -> dict[str, Any]:
    """Ack latency at LIGHT_PPS pings/s, one ping per request: the service is mostly idle,
    so this is what group commit costs a lone ping."""
    r = await _paced(ctx, LIGHT_PPS / LIGHT_BATCH, LIGHT_BATCH, duration_s, "light")
    p50 = r["latency_ms"]["p50"]
    return {**r, "target_p50_ms": LIGHT_P50_MS, "met": p50 is not None and p50 <= LIGHT_P50_MS}


async def half_rate(ctx: Context, sustainable_pps: float, duration_s: float) -> dict[str, Any]:
    r = await _paced(ctx, sustainable_pps / 2 / BATCH, BATCH, duration_s, "half-rate")
    target = FLUSH_INTERVAL_MS + 50
    p99 = r["latency_ms"]["p99"]
    return {**r, "target_p99_ms": target, "met": p99 is not None and p99 <= target}


async def _paced(
    ctx: Context, rate: float, batch: int, duration_s: float, name: str
) -> dict[str, Any]:
    await ctx.db.reset()
    server = ctx.server(f"service-{name}", SERVICE.argv(), SERVICE.ready_path)
    await server.start()
    try:
        busy0, cpu0 = machine_busy_s(), sum(server.cpu().values())
        r = await openloop.run(
            server.url, str(ctx.json_drivers), rate, batch, duration_s, ctx.tag(), workers=1,
            max_inflight=1024,
        )  # fmt: skip
        # Includes the generator's one-second start-up: a slight underestimate of busy cores.
        wall = duration_s + 1.0
        busy = (machine_busy_s() - busy0) / wall
        service = (sum(server.cpu().values()) - cpu0) / wall
        inside = flush_summary(await scrape(server.url))
    finally:
        await server.stop()
    return {
        "rate_pings_s": round(rate * batch), "rate_req_s": round(rate, 1), "batch": batch,
        "duration_s": duration_s, "totals": r["totals"], "latency_ms": r["latency_ms"],
        "loadgen_cpu_s": r["loadgen_cpu_s"],
        "service_cpu_util": round(service, 3), "machine_busy_cores": round(busy, 2),
        "service_metrics": inside,
    }  # fmt: skip


async def _sample_rss(server: Process, out: list[dict[str, float]], t0: float) -> None:
    while True:
        out.append({"t": round(time.time() - t0, 1), "rss_mib": round(server.rss_mib(), 1)})
        await asyncio.sleep(1.0)


async def _metrics(server: Process, contender: Contender) -> dict[str, float]:
    return await scrape(server.url) if contender is SERVICE else {}


async def _closed_loop(
    ctx: Context, server: Process, seconds: float, contender: Contender
) -> dict[str, Any]:
    """wrk at b20 c256 on the running contender: stored pings/s (after a short warm-up), the
    answers, and the service's flushes over just this stretch."""
    m0 = await _metrics(server, contender)
    t0, busy0 = time.time(), machine_busy_s()
    w = await asyncio.to_thread(
        run_wrk, server.url, ctx.lua_drivers, BATCH, 256, seconds, ctx.tag(),
        int(time.time() * 1000) - 600_000,
    )  # fmt: skip
    t1 = time.time()
    busy = (machine_busy_s() - busy0) / (t1 - t0)
    m1 = await _metrics(server, contender)
    warm = min(1.0, seconds / 4)
    stored = await ctx.db.count_between(t0 + warm, t1)
    return {
        "stored_pps": round(stored / (t1 - t0 - warm)), "statuses": w.statuses,
        "latency_ms": w.latency_ms, "machine_busy_cores": round(busy, 2),
        "service_metrics": flush_summary({k: v - m0.get(k, 0.0) for k, v in m1.items()})
        if m1 else None,
        "table_rows": await ctx.db.count(),
    }  # fmt: skip


async def overload(
    ctx: Context,
    sustainable_pps: float,
    duration_s: float,
    recovery_s: float,
    contender: Contender = SERVICE,
) -> dict[str, Any]:
    """Before (closed loop), 3x open-loop overload, after (closed loop): one process and one
    table throughout, so "after" is compared with "before" on the same state."""
    rate = 3 * sustainable_pps / BATCH
    await ctx.db.reset()
    server = ctx.server(f"{contender.key}-overload", contender.argv(), contender.ready_path)
    await server.start()
    rss: list[dict[str, float]] = []
    try:
        ctx.say(f"overload ({contender.key}): before, closed loop (wrk b20 c256)")
        before = await _closed_loop(ctx, server, recovery_s, contender)
        t0 = time.time() + 1.0  # the generator starts one second after it is spawned
        sampler = asyncio.create_task(_sample_rss(server, rss, t0))
        progress = asyncio.create_task(_progress(ctx, rss, duration_s))
        m0, cpu0, busy0 = await _metrics(server, contender), server.cpu(), machine_busy_s()
        r = await openloop.run(
            server.url, str(ctx.json_drivers), rate, BATCH, duration_s, ctx.tag(), workers=2,
            max_inflight=MAX_INFLIGHT,
        )  # fmt: skip
        cpu = sum(server.cpu().values()) - sum(cpu0.values())
        busy = (machine_busy_s() - busy0) / (duration_s + 1.0)
        m1 = await _metrics(server, contender)
        progress.cancel()
        await asyncio.sleep(1.0)  # let the last answers and flushes finish
        ctx.say(f"overload ({contender.key}): after, closed loop (wrk b20 c256)")
        after = await _closed_loop(ctx, server, recovery_s, contender)
        sampler.cancel()
        hwm = server.hwm_mib()
    finally:
        await server.stop()
    during = [s for s in rss if s["t"] <= duration_s]
    tail = [s["rss_mib"] for s in during if s["t"] >= duration_s - min(30.0, duration_s / 2)]
    after["of_before"] = (
        round(after["stored_pps"] / before["stored_pps"], 3) if before["stored_pps"] else None
    )
    after["of_sustainable"] = round(after["stored_pps"] / sustainable_pps, 3)
    return {
        "rate_pings_s": round(rate * BATCH), "rate_req_s": round(rate), "batch": BATCH,
        "duration_s": duration_s, "max_inflight": MAX_INFLIGHT, "totals": r["totals"],
        "by_second": r["by_second"], "latency_ms": r["latency_ms"],
        "loadgen_cpu_s": r["loadgen_cpu_s"], "server_cpu_util": round(cpu / duration_s, 3),
        "machine_busy_cores": round(busy, 2),
        "service_metrics": flush_summary({k: v - m0.get(k, 0.0) for k, v in m1.items()})
        if m1 else None,
        "rss": rss, "peak_rss_mib": round(hwm, 1),
        "tail_rss_min_mib": min(tail) if tail else None, "tail_rss_max_mib": max(tail) if tail else None,
        "tail_window_s": min(30.0, duration_s / 2),
        "before": before, "recovery": after,
    }  # fmt: skip


async def _progress(ctx: Context, rss: list[dict[str, float]], duration_s: float) -> None:
    await asyncio.sleep(1.0)
    while True:
        await asyncio.sleep(10.0)
        if rss:
            ctx.say(
                f"overload: t={rss[-1]['t']:.0f}/{duration_s:.0f} s, service RSS {rss[-1]['rss_mib']} MiB"
            )


async def overload_both(
    ctx: Context, sustainable_pps: float, duration_s: float, recovery_s: float
) -> dict[str, Any]:
    """The service's overload run, then the bare pipeline's under the same offered rate: how
    much of the service's loss after the overload the table's growth alone explains."""
    res = await overload(ctx, sustainable_pps, duration_s, recovery_s)
    pipe = await overload(ctx, sustainable_pps, duration_s, recovery_s, PIPELINE)
    res["pipeline"] = {k: pipe[k] for k in ("totals", "latency_ms", "before", "recovery",
                                             "server_cpu_util", "peak_rss_mib")}  # fmt: skip
    s, p = res["recovery"].get("of_before"), pipe["recovery"].get("of_before")
    res["recovery_vs_pipeline"] = round(s / p, 3) if s and p else None
    return res
