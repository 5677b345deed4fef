"""The fan-out contenders: a small aiohttp WebSocket server that publishes on a timer.

Same protocol subset as the service's /api/v1/live (subscribe to trips, "subscribed" reply,
"locations" messages carrying publishedAt). POST /bench/publish {"trips", "rate",
"duration", "mode"} publishes one message per trip per tick and answers when done. Modes:
  frame     the floor: the message encoded once, framed once, the same bytes written
            straight to each subscriber's transport (what the operating system's send costs)
  send_str  encoded once, aiohttp's ``await ws.send_str`` per subscriber
  encode    per-subscriber encode: ``json.dumps`` and ``await ws.send_str`` per subscriber
            (what serialize-once saves)
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import defaultdict

from aiohttp import WSMsgType, web

from .httpserve import serve

Entry = tuple[web.WebSocketResponse, asyncio.Transport]
SUBS: dict[str, list[Entry]] = defaultdict(list)


def frame(payload: bytes) -> bytes:
    """RFC 6455 text frame, final, unmasked (a server's frame)."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def message(trip: str, seq: int) -> dict[str, object]:
    """Shaped like the service's live message for one ping."""
    now = time.time()
    return {
        "type": "locations", "publishedAt": int(now * 1000), "tripId": trip,
        "driverId": "fdrv00000",
        "locations": [{
            "latitude": 12.9716 + seq * 1e-6, "longitude": 77.5946, "accuracy": 4.5,
            "speed": 11.2, "heading": 87.0, "altitude": 921.0,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".250Z",
        }],
    }  # fmt: skip


async def deliver(mode: str, trip: str, seq: int) -> int:
    subs = SUBS.get(trip, ())
    msg = message(trip, seq)
    if mode == "frame":
        data = frame(json.dumps(msg, separators=(",", ":")).encode())
        for _, transport in subs:
            if not transport.is_closing():
                transport.write(data)
    elif mode == "send_str":
        text = json.dumps(msg, separators=(",", ":"))
        for ws, _ in subs:
            await ws.send_str(text)
    else:
        for ws, _ in subs:
            await ws.send_str(json.dumps(msg, separators=(",", ":")))
    return len(subs)


async def publish(request: web.Request) -> web.Response:
    spec = await request.json()
    trips, rate, mode = spec["trips"], float(spec["rate"]), spec["mode"]
    ticks = max(1, round(rate * float(spec["duration"])))
    loop = asyncio.get_running_loop()
    start = loop.time()
    deliveries = 0
    for k in range(ticks):
        await asyncio.sleep(max(0.0, start + k / rate - loop.time()))
        for trip in trips:
            deliveries += await deliver(mode, trip, k)
    return web.json_response({"messages": ticks * len(trips), "deliveries": deliveries,
                              "elapsed_s": round(loop.time() - start, 3)})  # fmt: skip


async def live(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=65_536)
    await ws.prepare(request)
    assert request.transport is not None
    entry: Entry = (ws, request.transport)
    mine: list[str] = []
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                m = json.loads(msg.data)
                if m.get("type") == "subscribe":
                    for trip in m.get("trips", []):
                        SUBS[trip].append(entry)
                        mine.append(trip)
                    await ws.send_str(
                        json.dumps({"type": "subscribed", "trips": mine, "fleet": False})
                    )
    finally:
        for trip in mine:
            SUBS[trip].remove(entry)
    return ws


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/api/v1/live", live)
    app.router.add_post("/bench/publish", publish)
    return app


if __name__ == "__main__":
    serve(create_app())
