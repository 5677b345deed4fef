"""Where the time goes: py-spy samples the service and the bare pipeline under the same
headline load, one after the other. Each profile is summarised by function (self and
inclusive) and by package, and every sample is put in one bucket of work (request
handling, decode, validation, the flush, the live step, ...). A bucket's share of the
samples times the process's CPU per stored ping over the same window gives its µs per
stored ping, so the two contenders' tables subtract: what the service spends that the
pipeline does not, bucket by bucket."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devtools.procs import tree, user_system_seconds

from ..contenders.registry import PIPELINE, SERVICE, Contender
from ..context import Context
from ..load.closedloop import run_wrk

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
_PACKAGES = ("ingest", "aiohttp", "asyncpg", "msgspec", "redis", "jwt", "prometheus_client",
             "uvloop", "asyncio", "multidict", "yarl")  # fmt: skip


class Frame:
    __slots__ = ("file", "func", "name", "package")

    def __init__(self, raw: str) -> None:
        m = _FRAME.match(raw.strip())
        self.func, self.file = (m["func"], m["file"]) if m else (raw.strip(), "?")
        parts = Path(self.file).parts
        short = "/".join(parts[-2:]) if len(parts) > 1 else self.file
        self.name = f"{self.func} ({short})"
        self.package = _package(parts)


def _package(parts: tuple[str, ...]) -> str:
    for pkg in _PACKAGES:
        if pkg in parts:
            return pkg
    if "contenders" in parts:
        return "ingest"  # the bench's pipeline: counted as the application
    return "other" if "site-packages" in parts else "stdlib/other"


Rule = Callable[[Frame], bool]


def _in(*files: str) -> Rule:
    return lambda f: f.package == "ingest" and Path(f.file).name in files


def _pkg(*packages: str) -> Rule:
    return lambda f: f.package in packages


def _func(*names: str) -> Rule:
    return lambda f: f.func.rsplit(".", 1)[-1] in names


_GC = ("gc_collect_main", "gc_collect_with_callback", "collect")

# A sample goes to the first bucket any of its frames matches, so work nested in a feature
# (the live step's JSON encoding, the flush's asyncpg calls) counts as that feature's.
_BUCKETS: tuple[tuple[str, Rule], ...] = (
    ("cyclic GC", _func(*_GC)),
    ("live step: latest, publish (encode, Redis)", _in("live.py")),
    ("geofence evaluation", _in("geofence_events.py")),
    ("flush: COPY, dedup, batch ids", lambda f: _in("flush.py", "store.py")(f)
     or (_in("limit_pipeline.py")(f) and f.func.endswith(("_flush", "_loop")))),
    ("request: read body", lambda f: _in("body.py")(f) or (_func("read")(f) and f.package == "aiohttp")),
    ("request: auth, rate limit", lambda f: _in("auth.py", "ratelimit.py", "jwt_keys.py")(f)
     or f.package == "jwt"),
    ("request: decode (msgspec)", lambda f: f.package == "msgspec" or _func("decode")(f)),
    ("request: validate, build rows", _in("validate.py")),
    ("request: buffer, await commit", _in("submit.py", "buffer.py")),
    ("request: handler, other", _func("post_ping")),
    ("request: middleware, metrics", lambda f: _in("app.py", "logs.py", "metrics.py", "responses.py")(f)
     or f.package == "prometheus_client"),
    ("connection guard", _in("http_server.py")),
    ("aiohttp: parse, respond", _pkg("aiohttp", "multidict", "yarl")),
    ("asyncpg protocol", _pkg("asyncpg")),
    ("redis protocol", _pkg("redis")),
    ("event loop, other", lambda f: True),
)  # fmt: skip
BUCKETS = tuple(name for name, _ in _BUCKETS)


def bucket_of(frames: Sequence[Frame]) -> str:
    for name, rule in _BUCKETS:
        if any(rule(f) for f in frames):
            return name
    return BUCKETS[-1]


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # Drop the thread/process header py-spy may put first.
        frames = [Frame(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.func.startswith(("process ", "thread "))]
        if not frames:
            continue
        n = int(count)
        total += n
        self_t[frames[-1].name] += n
        pkg[frames[-1].package] += n
        buckets[bucket_of(frames)] += n
        for name in {f.name for f in frames}:
            incl[name] += n

    def pct(c: Counter[str]) -> list[list[Any]]:
        # Frames on (nearly) every stack are the entry point and the event loop: no news.
        common = [(k, v) for k, v in c.most_common() if v < 0.8 * total]
        return [[k, round(100 * v / total, 1)] for k, v in common[:top]] if total else []

    return {
        "samples": total,
        "self_pct": pct(self_t),
        "inclusive_pct": pct(incl),
        "by_package_pct": pct(pkg),
        "bucket_share": {b: buckets[b] / total for b in BUCKETS if buckets[b]} if total else {},
    }


async def profile(
    ctx: Context, contender: Contender, batch: int, conns: int, duration: float, out: Path
) -> dict[str, Any]:
    """Run a contender under wrk at (batch, conns) with py-spy attached; write the raw stacks
    and count its CPU and stored pings over the sampled window."""
    pyspy = Path(sys.executable).with_name("py-spy")
    await ctx.db.reset()
    server = ctx.server(f"{contender.key}-profile", contender.argv(), contender.ready_path)
    await server.start()
    raw_path = out / f"profile_{contender.key}.txt"
    try:
        wrk = asyncio.create_task(asyncio.to_thread(
            run_wrk, server.url, ctx.lua_drivers, batch, conns, duration + 2, ctx.tag(),
            int(time.time() * 1000) - 600_000,
        ))  # fmt: skip
        await asyncio.sleep(1.0)
        t0, (user0, sys0) = time.time(), user_system_seconds(tree(server.pid))
        done = await asyncio.to_thread(
            subprocess.run,
            [str(pyspy), "record", "--pid", str(server.pid), "--duration", str(int(duration)),
             "--rate", "100", "--format", "raw", "--native", "--output", str(raw_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        t1, (user1, sys1) = time.time(), user_system_seconds(tree(server.pid))
        await wrk
        stored = await ctx.db.count_between(t0, t1)
    finally:
        await server.stop()
    if done.returncode != 0 or not raw_path.exists():
        return {"error": (done.stderr or done.stdout).strip()[-500:]}
    summary = summarise(raw_path.read_text())
    us = (lambda s: round(s / stored * 1e6, 2)) if stored else (lambda s: None)
    summary.update(
        contender=contender.key, batch=batch, conns=conns, duration_s=duration,
        raw=raw_path.name, stored_pps=round(stored / (t1 - t0)),
        cpu_us_per_ping=us(user1 - user0 + sys1 - sys0), sys_us_per_ping=us(sys1 - sys0),
    )  # fmt: skip
    return summary


def per_ping(service: dict[str, Any], pipeline: dict[str, Any]) -> list[list[Any]]:
    """[bucket, service µs/ping, pipeline µs/ping, extra] rows, biggest extra first, and a
    total row: each bucket's share of the samples times the CPU per stored ping."""
    s_us, p_us = service.get("cpu_us_per_ping"), pipeline.get("cpu_us_per_ping")
    if not s_us or not p_us:
        return []
    rows = []
    for b in BUCKETS:
        s = service["bucket_share"].get(b, 0.0) * s_us
        p = pipeline["bucket_share"].get(b, 0.0) * p_us
        if s or p:
            rows.append([b, round(s, 2), round(p, 2), round(s - p, 2)])
    rows.sort(key=lambda r: -r[3])
    s_sys, p_sys = service.get("sys_us_per_ping") or 0.0, pipeline.get("sys_us_per_ping") or 0.0
    return [
        *rows,
        ["total", round(s_us, 2), round(p_us, 2), round(s_us - p_us, 2)],
        ["of which in the kernel (stime)", s_sys, p_sys, round(s_sys - p_sys, 2)],
    ]


async def run(ctx: Context, batch: int, conns: int, duration: float, out: Path) -> dict[str, Any]:
    """Profile the service, then the bare pipeline, under the same load."""
    service = await profile(ctx, SERVICE, batch, conns, duration, out)
    pipeline = await profile(ctx, PIPELINE, batch, conns, duration, out)
    res: dict[str, Any] = {**service, "pipeline": pipeline}
    if "error" not in service and "error" not in pipeline:
        res["per_ping_us"] = per_ping(service, pipeline)
    return res
