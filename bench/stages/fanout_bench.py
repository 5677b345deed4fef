"""Fan-out: N WebSocket subscribers (in other processes) on one server process, one message
at a time to all of them on one hot trip, or spread over N/100 trips of 100 subscribers.

Every socket subscribes once to all the trips of the plan (hot<N> and one spread<N>_<k>
per size it belongs to), so one set of connections serves every phase. Per phase: the
server's CPU time over the phase, receipts and publish-to-receive latency (receipt clock
minus the message's publishedAt). The service publishes what it commits, so its messages
are made by posting one ping per trip per tick; its time per subscriber per message is net
of a baseline phase that posts the same way to trips nobody subscribes to. The contender
server (bench/contenders/fanout_server.py) publishes on its own timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import sys
import time
import uuid
from typing import Any

import aiohttp

from devtools.procs import Process

from ..contenders.registry import SERVICE
from ..context import Context
from ..load import tokens
from ..load.openloop import percentile
from ..procs import machine_busy_s

PER_SPREAD_TRIP = 100
CLIENT_PROCS = 2


def rate_for(n: int) -> float:
    """Messages per second per trip: about 10-20k deliveries/s, whatever N."""
    return 10.0 if n <= 1000 else 2.0


def subscriptions(sizes: tuple[int, ...]) -> list[list[str]]:
    return [
        [t for n in sizes if i < n for t in (f"hot{n}", f"spread{n}_{i % (n // PER_SPREAD_TRIP)}")]
        for i in range(max(sizes))
    ]


def phase_trips(kind: str, n: int, prefix: str = "") -> list[str]:
    if kind == "hot":
        return [f"{prefix}hot{n}"]
    return [f"{prefix}spread{n}_{k}" for k in range(n // PER_SPREAD_TRIP)]


class Clients:
    """The subscriber processes (bench/load/subscribers.py)."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, ctx: Context, url: str, token: str, spec: list[list[str]]) -> Clients:
        procs = []
        for k in range(CLIENT_PROCS):
            path = ctx.work / f"subs{k}.json"
            path.write_text(json.dumps(spec[k::CLIENT_PROCS]))
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.load.subscribers", url, token, str(path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 27,
            ))  # fmt: skip
        return cls(procs)

    async def cmd(self, command: str) -> list[dict[str, Any]]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(command.encode() + b"\n")
            await p.stdin.drain()
        out = []
        for p in self.procs:
            assert p.stdout is not None
            line = await p.stdout.readline()
            if not line:
                raise RuntimeError("a subscriber process died")
            out.append(json.loads(line))
        return out

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError):
            await asyncio.wait_for(self.cmd("close"), 30)
        for p in self.procs:
            if p.returncode is None:
                p.kill()
            await p.wait()


class ServicePublisher:
    """Makes the service publish: one ping per trip per tick, each trip's own driver."""

    def __init__(self, ctx: Context, url: str) -> None:
        self.url = url + "/api/v1/tracking/ping"
        self.drivers = tokens.drivers(ctx.secret, 128, prefix="fdrv")
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def _post(self, trip: str, driver: tuple[str, str]) -> None:
        body = {"batchId": uuid.uuid4().hex, "tripId": trip, "driverId": driver[0],
                "locations": [{"latitude": 12.9716, "longitude": 77.5946, "accuracy": 4.5,
                               "speed": 11.2, "heading": 87.0, "altitude": 921.0,
                               "timestamp": int(time.time() * 1000)}]}  # fmt: skip
        headers = {"Authorization": f"Bearer {driver[1]}"}
        async with self.session.post(self.url, json=body, headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"publish post answered {r.status}: {await r.text()}")

    async def run(self, trips: list[str], rate: float, duration: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start, ticks = loop.time(), max(1, round(rate * duration))
        for k in range(ticks):
            await asyncio.sleep(max(0.0, start + k / rate - loop.time()))
            posts = zip(trips, itertools.cycle(self.drivers))
            await asyncio.gather(*(self._post(t, d) for t, d in posts))
        return {"messages": ticks * len(trips), "elapsed_s": round(loop.time() - start, 3)}

    async def close(self) -> None:
        await self.session.close()


async def _phase(
    ctx: Context, server: Process, clients: Clients, publish: Any, n: int, kind: str,
    phase_s: float, record: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Publish one phase, wait for the last receipts, measure."""
    if record:
        await clients.cmd("reset")
    settle = 0.5 + n / 20_000
    cpu0, busy0 = sum(server.cpu().values()), machine_busy_s()
    t0 = time.monotonic()
    pub = await publish()
    await asyncio.sleep(settle)
    wall = time.monotonic() - t0
    cpu = sum(server.cpu().values()) - cpu0
    busy = (machine_busy_s() - busy0) / wall
    out: dict[str, Any] = {"cpu_s": cpu, "wall_s": wall, "publish": pub,
                           "machine_busy_cores": round(busy, 2)}  # fmt: skip
    if not record:
        return out
    replies = await clients.cmd("collect")
    lat = [x for r in replies for x in r["latencies_ms"]]
    messages: dict[str, int] = {}
    for r in replies:
        for k, v in r["messages"].items():
            messages[k] = messages.get(k, 0) + v
    per_trip = n if kind == "hot" else PER_SPREAD_TRIP
    by_all = sum(c >= per_trip for c in messages.values()) / len(messages) if messages else 0.0
    elapsed = pub["elapsed_s"]
    out.update({
        "subscribers": n, "pattern": kind, "trips": len(phase_trips(kind, n)),
        "rate_per_trip": rate_for(n), "receipts": len(lat), "messages_seen": len(messages),
        "messages_published": pub.get("messages"), "received_by_all": round(by_all, 4),
        "deliveries_per_s": round(len(lat) / elapsed) if elapsed else None,
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                       "max": max(lat) if lat else None},
    })  # fmt: skip
    return out


def _per_delivery_us(cpu_s: float, receipts: int) -> float | None:
    return round(cpu_s / receipts * 1e6, 2) if receipts else None


async def _connect(ctx: Context, server: Process, spec: list[list[str]], token: str) -> Clients:
    ws_url = server.url.replace("http://", "ws://") + "/api/v1/live"
    clients = await Clients.start(ctx, ws_url, token, spec)
    replies = await clients.cmd("connect")
    connected = sum(r["connected"] for r in replies)
    secs = max(r["seconds"] for r in replies)
    ctx.say(f"fanout {server.name}: {connected}/{len(spec)} subscribers connected in {secs} s")
    if connected != len(spec):
        await clients.close()
        first = next((r["first_error"] for r in replies if r["first_error"]), None)
        raise RuntimeError(f"only {connected} of {len(spec)} subscribed: {first}")
    return clients


def _say(ctx: Context, name: str, r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    ctx.say(
        f"fanout {name:<9} {r['pattern']:<6} {r['subscribers']:>6} subs:"
        f" {r['us_per_delivery']} us/sub/msg, p50 {lat['p50']} ms p99 {lat['p99']} ms,"
        f" {r['deliveries_per_s']:,} msgs/s, received by all {r['received_by_all']:.0%}"
    )


async def _service(
    ctx: Context, spec: list[list[str]], token: str, sizes: tuple[int, ...], phase_s: float
) -> list[dict[str, Any]]:
    results = []
    # Every subscriber socket uses one dispatcher token: lift the per-subject socket cap; and
    # the pod's connection cap (10,000 by default) above the largest fleet of subscribers, so
    # that the publisher's own connections are not the ones closed to make room.
    server = ctx.server(
        "service-fanout", SERVICE.argv(), SERVICE.ready_path, WS_MAX_SOCKETS_PER_SUBJECT="1000000",
        HTTP_MAX_CONNECTIONS=str(max(sizes) + 2000),
    )  # fmt: skip
    await server.start()
    try:
        clients = await _connect(ctx, server, spec, token)
        pub = ServicePublisher(ctx, server.url)
        try:
            for n in sizes:
                for kind in ("hot", "spread"):
                    rate = rate_for(n)
                    base_trips, trips = phase_trips(kind, n, "base"), phase_trips(kind, n)
                    base = await _phase(
                        ctx, server, clients, functools.partial(pub.run, base_trips, rate, phase_s),
                        n, kind, phase_s, record=False,
                    )  # fmt: skip
                    r = await _phase(
                        ctx, server, clients, functools.partial(pub.run, trips, rate, phase_s),
                        n, kind, phase_s,
                    )  # fmt: skip
                    net = r["cpu_s"] - base["cpu_s"] / base["wall_s"] * r["wall_s"]
                    r.update(
                        server="service", mode="service", baseline_cpu_s=round(base["cpu_s"], 3),
                        us_per_delivery=_per_delivery_us(net, r["receipts"]),
                        us_per_delivery_raw=_per_delivery_us(r["cpu_s"], r["receipts"]),
                    )  # fmt: skip
                    _say(ctx, "service", r)
                    results.append(r)
        finally:
            await pub.close()
            await clients.close()
    finally:
        await server.stop()
    return results


async def _post_publish(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with session.post(url + "/bench/publish", json=body, timeout=timeout) as resp:
        return dict(await resp.json())


async def _contenders(
    ctx: Context, spec: list[list[str]], token: str, sizes: tuple[int, ...],
    modes: tuple[str, ...], phase_s: float,
) -> list[dict[str, Any]]:  # fmt: skip
    results = []
    argv = [sys.executable, "-m", "bench.contenders.fanout_server"]
    server = ctx.server("fanout-contenders", argv, "/healthz")
    await server.start()
    try:
        clients = await _connect(ctx, server, spec, token)
        session = aiohttp.ClientSession()
        try:
            for mode in modes:
                for n in sizes:
                    for kind in ("hot", "spread"):
                        body = {"trips": phase_trips(kind, n), "rate": rate_for(n),
                                "duration": phase_s, "mode": mode}  # fmt: skip
                        publish = functools.partial(_post_publish, session, server.url, body)
                        r = await _phase(ctx, server, clients, publish, n, kind, phase_s)
                        us = _per_delivery_us(r["cpu_s"], r["receipts"])
                        r.update(server="contender", mode=mode, baseline_cpu_s=0.0,
                                 us_per_delivery=us, us_per_delivery_raw=us)  # fmt: skip
                        _say(ctx, mode, r)
                        results.append(r)
        finally:
            await session.close()
            await clients.close()
    finally:
        await server.stop()
    return results


async def run(
    ctx: Context, sizes: tuple[int, ...], modes: tuple[str, ...], phase_s: float
) -> list[dict[str, Any]]:
    """The service's phases, then the contender server's, on the same subscriptions."""
    spec = subscriptions(sizes)
    token = tokens.sign(ctx.secret, "dispatcher1", "dispatcher")
    await ctx.db.reset()
    results = await _service(ctx, spec, token, sizes, phase_s)
    results += await _contenders(ctx, spec, token, sizes, modes, phase_s)
    for r in results:
        r["cpu_s"] = round(r["cpu_s"], 3)
        r["wall_s"] = round(r["wall_s"], 2)
    return results
