"""Where the service's time goes: py-spy samples it under the headline load, and the
samples are summarised by function (self and inclusive) and by package."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..contenders.registry import SERVICE
from ..context import Context
from ..load.closedloop import run_wrk

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
_PACKAGES = ("ingest", "aiohttp", "asyncpg", "msgspec", "redis", "jwt", "prometheus_client",
             "uvloop", "asyncio", "multidict", "yarl")  # fmt: skip


def _where(file: str) -> str:
    parts = Path(file).parts
    for pkg in _PACKAGES:
        if pkg in parts:
            return pkg
    return "other" if "site-packages" in parts else "stdlib/other"


def _name(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "?"
    file = m["file"]
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{m['func']} ({short})", _where(file)


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";") if f.strip()]
        # Drop the thread/process header py-spy may put first.
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        self_t[frames[-1][0]] += n
        pkg[frames[-1][1]] += n
        for name in {f[0] for f in frames}:
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
    }


async def profile_service(
    ctx: Context, batch: int, conns: int, duration: float, out: Path
) -> dict[str, Any]:
    """Run the service under wrk at (batch, conns) with py-spy attached; write the raw stacks."""
    pyspy = Path(sys.executable).with_name("py-spy")
    await ctx.db.reset()
    server = ctx.server("service-profile", SERVICE.argv(), SERVICE.ready_path)
    await server.start()
    raw_path = out / "profile_service.txt"
    try:
        wrk = asyncio.create_task(asyncio.to_thread(
            run_wrk, server.url, ctx.lua_drivers, batch, conns, duration + 1, ctx.tag(),
            int(time.time() * 1000) - 600_000,
        ))  # fmt: skip
        await asyncio.sleep(0.5)
        done = await asyncio.to_thread(
            subprocess.run,
            [str(pyspy), "record", "--pid", str(server.pid), "--duration", str(int(duration)),
             "--rate", "100", "--format", "raw", "--native", "--output", str(raw_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        await wrk
    finally:
        await server.stop()
    if done.returncode != 0 or not raw_path.exists():
        return {"error": (done.stderr or done.stdout).strip()[-500:]}
    summary = summarise(raw_path.read_text())
    summary.update(batch=batch, conns=conns, duration_s=duration, raw=raw_path.name)
    return summary
