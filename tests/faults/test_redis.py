"""Redis stopped and restarted under load: ingest goes on, live delivery resumes by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp

from ..conftest import token
from .conftest import service_env
from .load import Fleet, audit, parse_ms, report

LIVE = "/api/v1/live"


class LiveWatcher:
    """A dispatch dashboard: one WebSocket, every message kept with the time it arrived."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.closed_at: float | None = None
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append((time.monotonic(), json.loads(msg.data)))
        self.closed_at = time.monotonic()

    async def wait_for(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, m in self.messages:
                if m.get("type") == type_:
                    return m
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {type_!r} message within {timeout} s: {self.messages}")

    def stamps(self, trip: str, since: float = 0.0) -> set[int]:
        """Timestamps (epoch ms) of the pings of ``trip`` received live since ``since``."""
        out: set[int] = set()
        for t, m in self.messages:
            if t >= since and m.get("type") == "locations" and m.get("tripId") == trip:
                for loc in m["locations"]:
                    out.add(parse_ms(loc["timestamp"]))
        return out

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)


async def _ready(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}/readyz") as r:
        return r.status


async def test_redis_restart_under_load(private_redis, services, database, redis_prefix):
    """As deployed (docs/deploy.md): ROLE=ingest pods take the pings, ROLE=live pods hold the
    dashboards' WebSockets, Redis between them."""
    env = service_env(database, private_redis.url, redis_prefix)
    ingest = await services(env | {"ROLE": "ingest"}, name="ingest-pod")
    live = await services(env | {"ROLE": "live"}, name="live-pod")
    async with Fleet([ingest.url], name="redis-restart", drivers=4, pings=10) as fleet:
        assert fleet.session is not None
        trip = fleet.trips[0]
        ws = await fleet.session.ws_connect(
            f"{live.url}{LIVE}",
            headers={"Authorization": f"Bearer {token('dispatcher', 'disp-1', fleet.org)}"},
        )
        watcher = LiveWatcher(ws)
        await ws.send_json({"type": "subscribe", "trips": [trip]})
        await watcher.wait_for("subscribed")

        load = asyncio.ensure_future(fleet.run(rate=20, duration=11))
        await asyncio.sleep(3)
        await asyncio.to_thread(private_redis.stop)
        down_at = time.monotonic()
        await asyncio.sleep(1.5)
        ready_while_down = {
            "ingest": await _ready(fleet.session, ingest.url),
            "live": await _ready(fleet.session, live.url),
        }
        await asyncio.sleep(1.5)
        up_at = time.monotonic()
        await asyncio.to_thread(private_redis.start)
        await load
        await fleet.finish(30)
        await asyncio.sleep(1.0)  # the last flush's live message
        closed_by_server = watcher.closed_at
        await watcher.close()
        ready_after = {
            "ingest": await _ready(fleet.session, ingest.url),
            "live": await _ready(fleet.session, live.url),
        }

    a = await audit(database, fleet)
    while_down = fleet.outcomes(down_at, up_at)
    trip_batches = [b for b in fleet.batches if b.trip == trip and b.ack is not None]
    before = {ts for b in trip_batches if b.created < down_at - 0.5 for ts in b.stamps}
    live_before = watcher.stamps(trip, 0.0) & before
    # Live delivery resumes: the first live message after Redis came back...
    resumed = [t for t, m in watcher.messages if t >= up_at and m.get("type") == "locations"]
    resumed_after = resumed[0] - up_at if resumed else None
    # ...and from then on, every committed ping of the trip reaches the dashboard.
    settle = (resumed[0] if resumed else up_at) + 0.5
    after = {ts for b in trip_batches if b.created >= settle for ts in b.stamps}
    live_after = watcher.stamps(trip, settle)
    report(
        "redis_restart", a, outage_s=round(up_at - down_at, 2), answers_while_down=dict(while_down),
        live_before=f"{len(live_before)}/{len(before)}",
        live_resumed_after_s=resumed_after and round(resumed_after, 2),
        live_after=f"{len(after & live_after)}/{len(after)}",
        ws_closed_by_server=closed_by_server is not None, readyz_while_down=ready_while_down,
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0 and a.count_mismatches == 0
    assert a.acked == a.sent
    assert set(while_down) == {"200"}, while_down  # ingest does not need Redis
    # An ingest pod stays in the load balancer; a live pod, which cannot deliver, leaves it.
    assert ready_while_down == {"ingest": 200, "live": 503}
    assert ready_after == {"ingest": 200, "live": 200}
    assert live_before == before, "live delivery worked before the outage"
    assert closed_by_server is None, "the dashboard's socket stays open through the outage"
    assert resumed_after is not None and resumed_after < 5.0
    assert after and after <= live_after, sorted(after - live_after)[:10]
