"""python -m bench: set up, run every stage of the plan, write the results, clean up.

Progress goes to stderr; a JSON summary (targets and headline figures) to stdout; the
full results, a Markdown report and PNG plots to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import infra
from . import plan as plans
from .context import RESULTS, Context
from .load import tokens
from .load.closedloop import check_wrk
from .report.machine import loadavg, machine
from .report.targets import add_ratios, targets
from .report.write import write
from .stages import fanout_bench, geofences_bench, nearby_bench, overload, profiles, storage
from .stages.throughput import Cell, run_cell

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
N_DRIVERS = 1024
STAGES = (
    "ingest",
    "light",
    "latency",
    "fanout",
    "overload",
    "nearby",
    "geofences",
    "storage",
    "profile",
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="headline cell only, 1k subscribers, 10 s overload, short nearby cases, no"
        " geofence rounds (unless --only names them): about a minute and a half",
    )
    mode.add_argument("--full", action="store_true", help="the whole matrix (about 15 minutes)")
    p.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
        or DEFAULT_PG,
        help="PostgreSQL server to create the throwaway database on; its database name is"
        " replaced (env BENCH_DATABASE_URL, then DATABASE_URL; default %(default)s)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL") or os.environ.get("REDIS_URL") or DEFAULT_REDIS,
        help="Redis, used under a unique key prefix (env BENCH_REDIS_URL, then REDIS_URL)",
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="results directory (default bench/results)"
    )
    p.add_argument(
        "--sustainable",
        type=float,
        help="pings/s for the latency and overload stages when the ingest stage does not run"
        " (default: 40000)",
    )
    p.add_argument("--only", default="", help=f"comma-separated stages of {','.join(STAGES)}")
    p.add_argument(
        "--cells",
        default="",
        help="comma-separated ingest cells CONTENDER:BATCH:CONNS[:ACK] instead of the plan's,"
        " e.g. service:1:64,naive:1:64,pipeline:1:64",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every process under test (service and limit_pipeline), e.g."
        " FLUSH_CONCURRENCY=2; repeatable",
    )
    p.add_argument(
        "--geofence-pairs",
        type=int,
        metavar="N",
        help="geofence rounds 0, 1000, 0, ... with N rounds of 1000 fences, in each layout"
        " (default: the plan's); more pairs narrow the confidence interval of the ratio",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --quick: also profile the service (default and --full always do)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    check_wrk()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is missing: run bench/install.sh", file=sys.stderr)
        return 2
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    plan = plans.quick() if args.quick else plans.full() if args.full else plans.default()
    if args.cells:
        cells = [c.split(":") for c in args.cells.split(",")]
        plan = dataclasses.replace(
            plan, cells=tuple(Cell(k, int(b), int(c), *rest) for k, b, c, *rest in cells)
        )
    if args.geofence_pairs:
        rounds = plans.bracketed_rounds(args.geofence_pairs)
        plan = dataclasses.replace(plan, geofence_rounds=rounds, geofence_site_rounds=rounds)
    settings = dict(s.split("=", 1) for s in args.set)
    only = set(filter(None, args.only.split(",")))
    if unknown := only - set(STAGES):
        print(f"unknown stage(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    skip = ({"geofences"} | (set() if args.profile else {"profile"})) if args.quick else set()
    stages = only or set(STAGES) - skip
    secret = tokens.new_secret()
    db = infra.BenchDB(args.database_url, f"ingest_bench_{os.getpid()}")
    prefix = f"bench{os.getpid()}:"
    res: dict[str, Any] = {"plan": plan.name, "settings": settings, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "machine": machine()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = Path(tmp)
        pairs = tokens.drivers(secret, N_DRIVERS)
        ctx = Context(
            db=db, redis_url=args.redis_url, redis_prefix=prefix, secret=secret, work=work,
            lua_drivers=tokens.write_lua(work / "drivers.lua", pairs),
            json_drivers=tokens.write_json(work / "drivers.json", pairs), quick=args.quick,
            settings=settings,
        )  # fmt: skip
        ctx.say(f"plan {plan.name}: stages {', '.join(s for s in STAGES if s in stages)};"
                f" database {db.name}, redis prefix {prefix!r}")  # fmt: skip
        await db.create(secret)
        try:
            await _stages(ctx, plan, stages, args, res)
        finally:
            await db.drop()
            await infra.drop_redis_prefix(args.redis_url, prefix)
        res["elapsed_s"] = round(time.monotonic() - ctx.started, 1)
        res["loadavg_end"] = loadavg()
        write(ctx, args.out, res)
    return 0


async def _stages(
    ctx: Context, plan: plans.Plan, stages: set[str], args: argparse.Namespace, res: dict[str, Any]
) -> None:
    if "ingest" in stages:
        res["ingest"] = [await _cell(ctx, plan, c) for c in plan.cells]
        add_ratios(res["ingest"])
    if "light" in stages:
        r = res["light"] = await overload.light(ctx, plan.half_rate_s)
        ctx.say(f"light: p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms"
                f" at {r['rate_pings_s']:,} pings/s, batch {r['batch']} (target p50 <= {r['target_p50_ms']} ms)")  # fmt: skip
    sustainable = _sustainable(res, args.sustainable)
    if "latency" in stages:
        ctx.say(f"latency: open loop at half of {sustainable:,.0f} pings/s")
        r = res["half_rate"] = await overload.half_rate(ctx, sustainable, plan.half_rate_s)
        ctx.say(f"latency: p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms"
                f" at {r['rate_pings_s']:,} pings/s (target p99 <= {r['target_p99_ms']} ms)")  # fmt: skip
    if "fanout" in stages:
        res["fanout"] = await fanout_bench.run(
            ctx, plan.fanout_sizes, plan.fanout_modes, plan.fanout_phase_s
        )
    if "overload" in stages:
        ctx.say(f"overload: 3x {sustainable:,.0f} pings/s for {plan.overload_s:.0f} s")
        r = res["overload"] = await overload.overload_both(
            ctx, sustainable, plan.overload_s, plan.recovery_s
        )
        ctx.say(f"overload: answers {r['totals']}, peak RSS {r['peak_rss_mib']} MiB,"
                f" after: {r['recovery']['stored_pps']:,} pings/s = {r['recovery']['of_before']:.0%} of before;"
                f" the pipeline's after: {r['pipeline']['recovery']['of_before']:.0%} of its before")  # fmt: skip
    if "nearby" in stages:
        ctx.say("nearby: one org of 10,000 trucks")
        res["nearby"] = await nearby_bench.run(
            ctx, plan.nearby_s, plan.nearby_ref_s, plan.nearby_during_s
        )
    if "geofences" in stages:
        for key, layout, rounds in (("geofences", "city", plan.geofence_rounds),
                                    ("geofences_sites", "sites", plan.geofence_site_rounds)):  # fmt: skip
            ctx.say(
                f"geofences ({layout}): rounds of {', '.join(map(str, rounds))} fences at b20 c256"
            )
            g = res[key] = await geofences_bench.run(
                ctx, rounds, plan.duration_s, plan.warm_s, layout
            )
            ctx.say(
                f"geofences ({layout}): 1000 ÷ 0 fences, stored pings/s: {g['ratio_pps']}"
                f" (pairs {g['pair_ratios']}; bracketed {g['bracketed_ratios']},"
                f" 95% interval {g['interval']})"
            )
    if "storage" in stages:
        ctx.say(f"storage: {plan.storage_rows:,} rows per fill, before and after migration 005")
        res["storage"] = await storage.run(ctx.db.server_url, plan.storage_rows)
        for r in res["storage"]["results"]:
            ctx.say(storage.line(r))
    res["targets"] = targets(res)
    if "profile" in stages:
        b, c = plans.HEADLINE
        ctx.say(
            f"profile: py-spy on the service, then the pipeline, at b{b} c{c} for {plan.profile_s:.0f} s each"
        )
        args.out.mkdir(parents=True, exist_ok=True)
        res["profile"] = pr = await profiles.run(ctx, b, c, plan.profile_s, args.out)
        for row in pr.get("per_ping_us", [])[:6]:
            ctx.say(f"profile: {row[0]}: service {row[1]} µs/ping, pipeline {row[2]}")


def _sustainable(res: dict[str, Any], given: float | None) -> float:
    """The service's stored pings/s at the headline cell; else as given; else a guess."""
    b, c = plans.HEADLINE
    for r in res.get("ingest", []):
        if r["contender"] == "service" and (r["batch"], r["conns"], r["ack"]) == (b, c, "durable"):
            return float(r["stored_pps"])
    return given or 40_000.0


async def _cell(ctx: Context, plan: plans.Plan, cell: Cell) -> dict[str, Any]:
    r = await run_cell(ctx, cell, plan.duration_s, plan.warm_s)
    lat = r["latency_ms"] or {}
    pps = r["stored_pps"] or r["acked_pps"]
    ctx.say(
        f"ingest {r['cell']:<26} {pps:>8,} pings/s {'stored' if r['stored_pps'] else 'acked '}"
        f"  p50 {lat.get('p50', '-')} ms  p99 {lat.get('p99', '-')} ms"
        f"  cpu {r['server_cpu_per_100k']} s/100k  rss {r['peak_rss_mib']} MiB  (others busy: {r['other_busy_cores']} cores)"
    )
    return r
