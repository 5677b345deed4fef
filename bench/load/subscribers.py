"""WebSocket subscribers in a process of their own (aiohttp client), driven over stdin.

    python -m bench.load.subscribers URL TOKEN SPEC_JSON

SPEC_JSON holds one list of trip ids per socket. Commands, one per line on stdin, each
answered by one JSON line on stdout:
  connect   open every socket, subscribe, wait for {"type": "subscribed"}
  reset     forget what was received so far
  collect   {"latencies_ms": [...], "messages": {"trip publishedAt": receipts}}
  close     close every socket and exit
Latency is this process's clock at receipt minus the message's publishedAt (epoch ms).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import msgspec
import uvloop


class Live(msgspec.Struct):
    type: str
    publishedAt: int = 0
    tripId: str = ""


decode = msgspec.json.Decoder(Live).decode


class Subscribers:
    def __init__(self, url: str, token: str, spec: list[list[str]]) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.spec = spec
        self.latencies: list[float] = []
        self.messages: dict[str, int] = defaultdict(int)
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None

    async def connect(self) -> dict[str, object]:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        gate = asyncio.Semaphore(64)
        started = time.monotonic()
        results = await asyncio.gather(
            *(self._open(trips, gate) for trips in self.spec), return_exceptions=True
        )
        failed = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"connected": len(self.sockets), "failed": len(failed),
                "first_error": failed[0] if failed else None,
                "seconds": round(time.monotonic() - started, 2)}  # fmt: skip

    async def _open(self, trips: list[str], gate: asyncio.Semaphore) -> None:
        assert self.session is not None
        async with gate:
            ws = await self.session.ws_connect(
                self.url,
                headers=self.headers,
                max_msg_size=1 << 20,
                timeout=aiohttp.ClientWSTimeout(ws_close=5),
            )
            await ws.send_str(json.dumps({"type": "subscribe", "trips": trips}))
            async with asyncio.timeout(30):
                while True:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"socket closed while subscribing: {msg.type!r}")
                    if decode(msg.data).type == "subscribed":
                        break
        self.sockets.append(ws)
        self.readers.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        lat, messages = self.latencies, self.messages
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                m = decode(msg.data)
                if m.type == "locations":
                    lat.append(round(time.time() * 1000 - m.publishedAt, 2))
                    messages[f"{m.tripId} {m.publishedAt}"] += 1

    def reset(self) -> dict[str, object]:
        self.latencies.clear()
        self.messages.clear()
        return {"ok": True}

    def collect(self) -> dict[str, object]:
        return {"latencies_ms": self.latencies, "messages": self.messages}

    async def close(self) -> dict[str, object]:
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        return {"closed": len(self.sockets)}


async def main(url: str, token: str, spec: list[list[str]]) -> None:
    subs = Subscribers(url, token, spec)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "connect":
            out = await subs.connect()
        elif line == "reset":
            out = subs.reset()
        elif line == "collect":
            out = subs.collect()
        else:
            out = await subs.close()
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        if line == "close":
            return


if __name__ == "__main__":
    url, token, spec_file = sys.argv[1:4]
    uvloop.run(main(url, token, json.loads(Path(spec_file).read_text())))
