"""Closed-loop load with wrk (Debian's package) and a script of bench/load/wrk/: pings.lua
(ingest), nearby.lua (the nearby read).

wrk runs in its own process with one thread: on 2 cores every cycle it spends is taken
from the contender, so its CPU time is measured (wait4 rusage) and reported beside the
contender's, to show it is not the bottleneck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LUA = Path(__file__).resolve().parent / "wrk" / "pings.lua"
NEARBY_LUA = LUA.with_name("nearby.lua")


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu_s: float
    started: float  # epoch seconds, just before wrk was started
    raw: dict[str, object] = field(default_factory=dict)

    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)


def check_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: run bench/install.sh (apt-get install -y wrk)")
    return path


def run_wrk(
    url: str, data_file: Path, batch: int, conns: int, duration_s: float, tag: str,
    start_ms: int, threads: int = 1, timeout_s: float = 10.0,
) -> WrkResult:  # fmt: skip
    """Blocking: post pings (wrk/pings.lua) for ``duration_s``."""
    args = [str(data_file), str(batch), tag, str(start_ms), str(threads)]
    return run_script(
        url + "/api/v1/tracking/ping", LUA, args, conns, duration_s, threads, timeout_s
    )


def run_script(
    url: str, script: Path, args: list[str], conns: int, duration_s: float, threads: int = 1,
    timeout_s: float = 10.0,
) -> WrkResult:  # fmt: skip
    """Blocking: run wrk with ``script`` for ``duration_s`` and parse its BENCH_JSON line."""
    argv = [
        check_wrk(), "-t", str(threads), "-c", str(conns), "-d", f"{round(duration_s)}s",
        "--timeout", f"{timeout_s:g}s", "-s", str(script), url, "--", *args,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        started = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode()
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr or out}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    lat = raw["latency_us"]
    return WrkResult(
        requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6,
        statuses={int(k): v for k, v in raw["statuses"].items()},
        errors=raw["errors"],
        latency_ms={k: round(v / 1000, 3) for k, v in lat.items()},
        cpu_s=usage.ru_utime + usage.ru_stime,
        started=started,
        raw=raw,
    )
