"""Open-loop load: requests are sent on a fixed schedule whatever the answers, so a slow
server meets a growing queue instead of a politely waiting client (wrk2 is not packaged).

Latency is measured from each request's scheduled time, so time spent waiting for a free
connection counts. At most MAX_INFLIGHT requests per worker are outstanding; a request
that finds the cap reached is not sent and is counted as ``shed``. Workers are separate
processes with a minimal HTTP/1.1 keep-alive client (an asyncio Protocol): aiohttp's client
would cost the server more CPU than the load itself on 2 cores.

    python -m bench.load.openloop URL DRIVERS_JSON RATE_REQ_S BATCH DURATION_S START_AT TAG \
        WORKER WORKERS MAX_INFLIGHT

prints one JSON object: counts per second and status, and the latencies in ms.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

from .bodies import Trips

TICK_S = 0.002


class Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        length, i = 0, head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            length = int(head[i + 15 : j if j >= 0 else len(head)])
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        del self.buf[: end + 4 + length]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def send(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Worker:
    def __init__(self, url: str, trips: Trips, max_inflight: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.trips = trips
        self.max_inflight = max_inflight
        self.idle: list[Conn] = []
        self.inflight = 0
        self.by_second: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.latencies: list[float] = []

    async def _conn(self) -> Conn:
        while self.idle:
            c = self.idle.pop()
            if not c.lost:
                return c
        loop = asyncio.get_running_loop()
        _, c = await loop.create_connection(Conn, self.host, self.port)
        return c

    async def one(self, scheduled: float, second: int, data: bytes) -> None:
        counts = self.by_second[second]
        conn = None
        try:
            conn = await self._conn()
            status = await conn.send(data)
            self.idle.append(conn)
            counts[str(status)] += 1
            if 200 <= status < 300 and second >= 1:  # second 0 opens the connections
                self.latencies.append(round((time.time() - scheduled) * 1000, 2))
        except OSError:
            counts["error"] += 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
        finally:
            self.inflight -= 1

    async def run(self, rate: float, duration: float, start_at: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        sent = 0
        total = int(rate * duration)
        while sent < total:
            now = time.time()
            due = min(total, int((now - start_at) * rate) + 1)
            while sent < due:
                scheduled = start_at + sent / rate
                second = int(scheduled - start_at)
                sent += 1
                self.by_second[second]["offered"] += 1
                if self.inflight >= self.max_inflight:
                    self.by_second[second]["shed"] += 1
                    continue
                self.inflight += 1
                t = asyncio.create_task(self.one(scheduled, second, self.trips.request()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            # A fixed 2 ms tick: shorter sleeps spin on the loop's 1 ms timer resolution.
            # Latency counts from the scheduled time, so the tick's delay is not hidden.
            await asyncio.sleep(TICK_S)
        if tasks:  # answers still missing 30 s after the last request count as timeouts
            await asyncio.wait(tasks, timeout=30.0)
            for t in tasks:
                t.cancel()
            self.by_second[int(duration)]["timeout"] += len(tasks)


def main(argv: list[str]) -> None:
    url, drivers_json, rate, batch, duration, start_at, tag, worker, workers, cap, out_path = argv
    pairs = json.loads(Path(drivers_json).read_text())[int(worker) :: int(workers)]
    host = urlsplit(url).netloc
    trips = Trips(pairs, int(batch), f"{tag}w{worker}", host)
    w = Worker(url, trips, int(cap))
    cpu0 = time.process_time()
    uvloop.run(w.run(float(rate), float(duration), float(start_at)))
    result = {
        "by_second": {k: dict(v) for k, v in sorted(w.by_second.items())},
        "latencies_ms": w.latencies,
        "cpu_s": round(time.process_time() - cpu0, 3),
    }
    # To a file, not stdout: read through a pipe, a result of more than 128 KiB arrived
    # truncated in one overload run of three (its latencies: 8 bytes each).
    Path(out_path).write_text(json.dumps(result))


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


async def run(
    url: str, drivers_json: str, rate_req_s: float, batch: int, duration_s: float, tag: str,
    workers: int = 2, max_inflight: int = 256,
) -> dict[str, object]:  # fmt: skip
    """Run ``workers`` processes sharing ``rate_req_s``; merge what they saw."""
    start_at = time.time() + 1.0  # all workers start together, after their imports
    procs = []
    with tempfile.TemporaryDirectory(prefix="openloop") as tmp:
        paths = [Path(tmp) / f"worker{i}.json" for i in range(workers)]
        for i, path in enumerate(paths):
            args = [url, drivers_json, str(rate_req_s / workers), str(batch), str(duration_s),
                    str(start_at), tag, str(i), str(workers), str(max_inflight // workers),
                    str(path)]  # fmt: skip
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.load.openloop", *args
                )
            )
        for p in procs:
            if await p.wait() != 0:
                raise RuntimeError(f"open-loop worker exited with {p.returncode}")
        outs = [json.loads(path.read_text()) for path in paths]
    by_second: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for o in outs:
        for sec, counts in o["by_second"].items():
            for k, v in counts.items():
                by_second[int(sec)][k] += v
    lat = [x for o in outs for x in o["latencies_ms"]]
    totals: dict[str, int] = defaultdict(int)
    for counts in by_second.values():
        for k, v in counts.items():
            totals[k] += v
    return {
        "start_at": start_at, "rate_req_s": rate_req_s, "batch": batch, "duration_s": duration_s,
        "totals": dict(totals),
        "by_second": [{"t": s, **by_second[s]} for s in sorted(by_second)],
        "latency_ms": {"p50": percentile(lat, 50), "p90": percentile(lat, 90),
                       "p99": percentile(lat, 99), "max": max(lat) if lat else None},
        "loadgen_cpu_s": round(sum(o["cpu_s"] for o in outs), 3),
    }  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
