"""WebSocket lifetime and limits: token expiry and refresh, sockets per subject, subscriptions
per pod, nothing sent after the Close frame, and the fleet snapshot (docs/live.md)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from ingest import constants as keys
from ingest import metrics
from ingest import ws as ws_module
from ingest.shutdown import shutdown
from ingest.typedefs import SOCKETS

from .conftest import auth, batch, cancel, next_message, now_ms, quiet, state_reached, token

LIVE = "/api/v1/live"
CLOSE, TEXT = 0x8, 0x1


def dispatcher_token(sub: str = "disp_1", org: str = "org_1", ttl_s: int = 3600) -> str:
    return token("dispatcher", sub, org, ttl_s=ttl_s)


def exp_of(tok: str) -> int:
    return int(jwt.decode(tok, options={"verify_signature": False})["exp"])


async def connect(client: TestClient, tok: str | None = None) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect(f"{LIVE}?access_token={tok or dispatcher_token()}")


async def subscribe(ws: aiohttp.ClientWebSocketResponse, **body: Any) -> list[dict[str, Any]]:
    """Send a subscribe; the replies up to and including 'subscribed'."""
    await ws.send_json({"type": "subscribe", **body})
    got = []
    while not got or got[-1]["type"] != "subscribed":
        got.append(await next_message(ws))
    return got


async def publish_loop(redis: aioredis.Redis, channel: str, size: int, every_s: float) -> None:
    """A live message on ``channel`` every ``every_s`` (as another pod's flush publishes it)."""
    pad = "x" * size
    while True:
        body = {"type": "locations", "publishedAt": now_ms(), "tripId": "trip_1",
                "driverId": "drv_1", "locations": [], "pad": pad}  # fmt: skip
        await redis.publish(channel, json.dumps(body))
        await asyncio.sleep(every_s)


class RawSocket:
    """A WebSocket client on a plain TCP socket: frames exactly as the server wrote them, a
    receive window as small as asked, no reading unless asked, no automatic reply to Close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, tok: str, rcvbuf: int | None = None) -> RawSocket:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(
            f"GET {LIVE}?access_token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += await reader.readexactly(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def stop_reading(self) -> None:
        """Take no more bytes from the kernel: the server's unsent data piles up."""
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def start_reading(self) -> None:
        self.writer.transport.resume_reading()  # type: ignore[attr-defined]

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        """A masked client frame (an all-zero mask: valid, and the payload stays readable)."""
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.writer.write(header + b"\0\0\0\0" + payload)

    def send_json(self, obj: object) -> None:
        self.send(json.dumps(obj).encode())

    async def frame(self, timeout: float) -> tuple[int, bytes] | None:
        """The next frame (opcode, payload), or None at EOF or when nothing came in time."""
        try:
            async with asyncio.timeout(timeout):
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                return b0 & 0x0F, await self.reader.readexactly(n)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None

    async def text_until(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while (f := await self.frame(end - time.monotonic())) is not None:
            if f[0] == TEXT and (msg := json.loads(f[1]))["type"] == type_:
                return msg
        raise AssertionError(f"no {type_!r} message")

    async def frames_through_close(
        self, after_s: float, pace_s: float = 0.0, timeout: float = 15.0
    ) -> list[int]:
        """Read every frame up to the Close frame (one per ``pace_s``: a slow reader) and for
        ``after_s`` after it (or to EOF), without answering the Close; the opcodes."""
        opcodes: list[int] = []
        end = time.monotonic() + timeout
        while CLOSE not in opcodes and time.monotonic() < end:
            f = await self.frame(end - time.monotonic())
            if f is None:
                break
            opcodes.append(f[0])
            await asyncio.sleep(pace_s)
        stop = time.monotonic() + after_s
        while CLOSE in opcodes and (left := stop - time.monotonic()) > 0:
            f = await self.frame(left)
            if f is None:
                break
            opcodes.append(f[0])
        return opcodes

    def close(self) -> None:
        self.writer.transport.abort()


def assert_close_is_last(opcodes: list[int]) -> None:
    assert CLOSE in opcodes, f"no Close frame among {len(opcodes)} frames"
    after = len(opcodes) - 1 - opcodes.index(CLOSE)
    assert after == 0, f"{after} frame(s) after the Close frame: {opcodes[-after:]}"


def server_transport(client: TestClient) -> asyncio.Transport:
    """The server's side of the test's one WebSocket."""
    (ws,) = client.server.app[SOCKETS]
    assert isinstance(ws, ws_module.LiveSocket) and ws.session is not None
    return ws.session.sub.transport


def small_kernel_buffer(client: TestClient) -> asyncio.Transport:
    """Shrink the kernel's send buffer of the server's side (autotuned up to megabytes on
    loopback), so unsent data piles up in the process after a few KiB, as it does behind a
    slow mobile link."""
    transport = server_transport(client)
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return transport


# -- token lifetime --------------------------------------------------------------------


async def test_socket_closes_with_4001_when_its_token_expires(make_client):
    client = await make_client(jwt_leeway_s=0)
    tok = dispatcher_token(ttl_s=2)
    exp = exp_of(tok)
    ws = await connect(client, tok)
    await subscribe(ws, trips=["trip_1"])
    msg = await next_message(ws, timeout=5)
    at = time.time()
    assert msg["type"] == "error" and msg["error"] == "token_expired", msg
    assert exp - 0.05 <= at <= exp + 1.5, (at, exp)
    closing = await ws.receive(timeout=3)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001
    assert ws.close_code == 4001
    # HTTP refuses the same token from the same moment.
    resp = await client.get("/api/v1/tracking/trips/trip_1/latest",
                            headers={"Authorization": f"Bearer {tok}"})  # fmt: skip
    assert resp.status == 401


async def test_expiry_honours_the_leeway(make_client):
    client = await make_client(jwt_leeway_s=2)
    tok = dispatcher_token(ttl_s=1)
    exp = exp_of(tok)
    ws = await connect(client, tok)
    with pytest.raises(TimeoutError):  # still open at exp + 1 (leeway 2)
        await ws.receive(timeout=max(0.1, exp + 1 - time.time()))
    msg = await next_message(ws, timeout=3)
    assert msg["error"] == "token_expired" and time.time() >= exp + 2 - 0.05
    assert (await ws.receive(timeout=3)).data == 4001


async def test_refresh_moves_the_expiry(make_client):
    client = await make_client(jwt_leeway_s=0)
    first = dispatcher_token(ttl_s=2)
    ws = await connect(client, first)
    later = dispatcher_token(ttl_s=4)
    await ws.send_json({"type": "refresh", "token": later})
    assert await next_message(ws) == {"type": "refreshed", "exp": exp_of(later)}
    # Open past the first token's exp: a live message still arrives.
    await asyncio.sleep(max(0.0, exp_of(first) + 0.5 - time.time()))
    await subscribe(ws, trips=["trip_1"])
    resp = await client.post("/api/v1/tracking/ping", json=batch(1), headers=auth())
    assert resp.status == 200
    assert (await next_message(ws))["type"] == "locations"
    msg = await next_message(ws, timeout=5)
    assert msg["error"] == "token_expired" and time.time() >= exp_of(later) - 0.05
    assert (await ws.receive(timeout=3)).data == 4001


async def test_refresh_with_a_token_of_another_subject_org_or_role_is_refused(make_client):
    client = await make_client(jwt_leeway_s=0)
    tok = dispatcher_token(ttl_s=3)
    exp = exp_of(tok)
    ws = await connect(client, tok)
    refused = {
        "sub": dispatcher_token(sub="disp_2", ttl_s=60),
        "org": dispatcher_token(org="org_2", ttl_s=60),
        "role": token("driver", "disp_1", "org_1", ttl_s=60),
        "invalid token": dispatcher_token(ttl_s=60)[:-4] + "AAAA",
        "token expired": dispatcher_token(ttl_s=-5),
    }
    for why, other in refused.items():
        await ws.send_json({"type": "refresh", "token": other})
        msg = await next_message(ws)
        assert msg["type"] == "error" and msg["error"] == "invalid_refresh", msg
        assert why in msg["detail"], (why, msg)
        assert other not in msg["detail"]
    # Nothing moved: the socket still closes at the first token's exp.
    msg = await next_message(ws, timeout=5)
    assert msg["error"] == "token_expired" and exp - 0.05 <= time.time() <= exp + 1.5
    assert (await ws.receive(timeout=3)).data == 4001


# -- limits ------------------------------------------------------------------------------


async def test_sockets_per_subject_are_capped_before_the_upgrade(make_client):
    client = await make_client(ws_max_sockets_per_subject=3)
    refused_before = metrics.WS_REFUSED.labels("too_many_sockets")._value.get()
    mine = [await connect(client) for _ in range(3)]
    resp = await client.get(f"{LIVE}?access_token={dispatcher_token()}")
    assert resp.status == 429
    body = await resp.json()
    assert body["error"] == "too_many_sockets" and "WS_MAX_SOCKETS_PER_SUBJECT" in body["detail"]
    assert "3" in body["detail"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(client)
    assert refused.value.status == 429
    assert metrics.WS_REFUSED.labels("too_many_sockets")._value.get() == refused_before + 2
    # Another subject, and the same subject in another org, still connect.
    others = [
        await connect(client, dispatcher_token(sub="disp_2")),
        await connect(client, dispatcher_token(org="org_2")),
    ]
    assert (await subscribe(others[0], trips=["t"]))[-1]["trips"] == ["t"]
    # A closed socket frees its place.
    await mine.pop().close()
    for _ in range(50):
        if client.server.app[ws_module.FANOUT].sockets.get(("org_1", "disp_1")) == 2:
            break
        await asyncio.sleep(0.02)
    mine.append(await connect(client))
    for w in mine + others:
        await w.close()


async def test_subscriptions_per_pod_are_capped_and_the_socket_stays_open(make_client):
    client = await make_client(ws_max_subscriptions_per_pod=3, ws_max_subscriptions_per_org=3)
    a = await connect(client)
    b = await connect(client, dispatcher_token(sub="disp_2"))
    assert (await subscribe(a, trips=["trip_a", "trip_b"]))[-1]["trips"] == ["trip_a", "trip_b"]
    assert (await subscribe(b, trips=["trip_b"]))[-1]["trips"] == ["trip_b"]  # a channel held
    # trip_c and trip_d would make 4 channels on this pod: refused whole, named.
    await b.send_json({"type": "subscribe", "trips": ["trip_c", "trip_d"]})
    msg = await next_message(b)
    assert msg["type"] == "error" and msg["error"] == "too_many_subscriptions", msg
    assert "3" in msg["detail"] and "WS_MAX_SUBSCRIPTIONS_PER_POD" in msg["detail"]
    # The socket stays open and usable; a fleet pattern counts as one more.
    assert (await subscribe(b, trips=["trip_c"]))[-1]["trips"] == ["trip_b", "trip_c"]
    await a.send_json({"type": "subscribe", "fleet": True})
    assert (await next_message(a))["error"] == "too_many_subscriptions"
    await a.send_json({"type": "unsubscribe", "trips": ["trip_a"]})
    assert (await subscribe(a, fleet=True))[-1] == {
        "type": "subscribed", "trips": ["trip_b"], "fleet": True,
    }  # fmt: skip
    resp = await client.post("/api/v1/tracking/ping", json=batch(1, trip="trip_c"), headers=auth())
    assert resp.status == 200
    assert (await next_message(b))["tripId"] == "trip_c"
    await a.close()
    await b.close()


async def test_one_org_cannot_take_the_subscriptions_another_org_needs(make_client):
    """Made-up trip ids cost a channel each (a trip may start later): one org filling the
    pod with them would leave another org's dispatchers without live data."""
    client = await make_client(ws_max_subscriptions_per_pod=10, ws_max_subscriptions_per_org=6)
    a1 = await connect(client, dispatcher_token("disp_1", "org_a"))
    a2 = await connect(client, dispatcher_token("disp_2", "org_a"))
    made_up = [f"made_up_{i}" for i in range(10)]
    assert (await subscribe(a1, trips=made_up[:4]))[-1]["trips"] == made_up[:4]
    # A channel both sockets follow counts once: org_a holds 6 now, its share.
    shared = [made_up[0], *made_up[4:6]]
    assert (await subscribe(a2, trips=shared))[-1]["trips"] == shared
    for ws, body in ((a2, {"trips": made_up[6:]}), (a1, {"fleet": True})):
        await ws.send_json({"type": "subscribe", **body})
        msg = await next_message(ws)
        assert msg["type"] == "error" and msg["error"] == "too_many_subscriptions", msg
        assert "6" in msg["detail"] and "WS_MAX_SUBSCRIPTIONS_PER_ORG" in msg["detail"], msg
    # Another org still gets its fleet and its trips (9 of the pod's 10).
    b = await connect(client, dispatcher_token("disp_1", "org_b"))
    assert (await subscribe(b, fleet=True, trips=["trip_1", "trip_2"]))[-1] == {
        "type": "subscribed", "trips": ["trip_1", "trip_2"], "fleet": True,
    }  # fmt: skip
    # org_a may share what it holds, and a channel it lets go frees its place (one socket's
    # messages are handled in order: the unsubscribe before the subscribe).
    assert (await subscribe(a1, trips=[made_up[4]]))[-1]["trips"] == made_up[:5]
    await a1.send_json({"type": "unsubscribe", "trips": [made_up[1]]})
    after = [made_up[0], *made_up[2:5], made_up[6]]
    assert (await subscribe(a1, trips=[made_up[6]]))[-1]["trips"] == after
    for ws in (a1, a2, b):
        await ws.close()


async def unsubscribe_calls(admin: aioredis.Redis) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_unsubscribe", {}).get("calls", 0))


async def test_leaving_many_trips_is_one_unsubscribe(make_client, private_redis, redis_prefix):
    """An unsubscribe message, and a close, cost Redis one UNSUBSCRIBE however many trips
    they leave (a Redis of the test's own: its command counts are the test's alone)."""
    client = await make_client(redis_url=private_redis.url)
    await state_reached(client.server.app[ws_module.FANOUT].connected.is_set)
    admin = aioredis.from_url(private_redis.url)
    trips = [f"trip_{i}" for i in range(300)]

    async def held() -> int:
        return len(await admin.pubsub_channels(f"{redis_prefix}*"))

    try:
        ws = await connect(client)
        for leave in ("unsubscribe", "close"):
            await subscribe(ws, trips=trips)
            assert await held() == 300
            before = await unsubscribe_calls(admin)
            if leave == "unsubscribe":
                await ws.send_json({"type": "unsubscribe", "trips": trips})
            else:
                await ws.close()
            for _ in range(200):
                if not await held():
                    break
                await asyncio.sleep(0.01)
            assert await held() == 0, leave
            assert await unsubscribe_calls(admin) - before == 1, leave
    finally:
        await admin.aclose()


async def test_following_a_trip_then_its_fleet_gets_each_message_once(
    make_client, private_redis, redis_prefix
):
    """The socket follows trip_1, then subscribes to the fleet. Redis is paused so that one
    message is published before the fleet pattern's PSUBSCRIBE and one after it, both
    delivered in one go: the first arrives through the trip channel only (it must not be
    skipped), the second through both (it must be sent once)."""
    client = await make_client(redis_url=private_redis.url, ws_subscribe_timeout_s=10)
    fanout = client.server.app[ws_module.FANOUT]
    await state_reached(fanout.connected.is_set)
    ws = await connect(client)
    await subscribe(ws, trips=["trip_1"])
    channel = keys.trip_channel(redis_prefix, "org_1", "trip_1")
    pause, before, after = (aioredis.from_url(private_redis.url) for _ in range(3))
    try:
        for r in (pause, before, after):
            await r.ping()  # connected before the pause
        await pause.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        body = '{"type":"locations","tripId":"trip_1","seq":%d}'
        first = asyncio.ensure_future(before.publish(channel, body % 1))
        await asyncio.sleep(0.1)  # read (and held) by Redis
        await ws.send_json({"type": "subscribe", "fleet": True})
        await state_reached(lambda: bool(fanout.patterns))
        await asyncio.sleep(0.1)  # the PSUBSCRIBE too
        second = asyncio.ensure_future(after.publish(channel, body % 2))
        # Received by the trip channel; then by the trip channel and the pattern: in order.
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [1, 2]
        got = await quiet(ws, 0.5)
    finally:
        for r in (pause, before, after):
            await r.aclose()
    assert {"type": "subscribed", "trips": ["trip_1"], "fleet": True} in got
    assert [m["seq"] for m in got if m["type"] == "locations"] == [1, 2]


# -- nothing after the Close frame ----------------------------------------------------------


async def test_no_data_frame_after_the_close_of_a_slow_consumer(make_client, redis, redis_prefix):
    # A limit well above what aiohttp waits for when it drains the Close frame (16 KiB).
    client = await make_client(ws_send_buffer_bytes=262_144)
    raw = await RawSocket.open(client.server.port, dispatcher_token(), rcvbuf=4096)
    raw.send_json({"type": "subscribe", "trips": ["trip_1"]})
    await raw.text_until("subscribed")
    small_kernel_buffer(client)
    raw.stop_reading()
    channel = keys.trip_channel(redis_prefix, "org_1", "trip_1")
    closed_before = metrics.WS_SLOW_CLOSED._value.get()
    for _ in range(100):  # until the socket's unsent data passes the limit
        await redis.publish(channel, json.dumps({"type": "locations", "pad": "x" * 30_000}))
        await asyncio.sleep(0.005)
        if metrics.WS_SLOW_CLOSED._value.get() > closed_before:
            break
    assert metrics.WS_SLOW_CLOSED._value.get() > closed_before
    # Live messages go on while the client reads what was queued, and after the Close.
    publisher = asyncio.create_task(publish_loop(redis, channel, 100, 0.01))
    raw.start_reading()
    try:
        opcodes = await raw.frames_through_close(after_s=1.0, pace_s=0.02)
    finally:
        await cancel(publisher)
        raw.close()
    assert_close_is_last(opcodes)


async def test_no_data_frame_after_the_token_expiry_close(make_client, redis, redis_prefix):
    client = await make_client(jwt_leeway_s=0)
    raw = await RawSocket.open(client.server.port, dispatcher_token(ttl_s=2))
    raw.send_json({"type": "subscribe", "trips": ["trip_1"]})
    await raw.text_until("subscribed")
    channel = keys.trip_channel(redis_prefix, "org_1", "trip_1")
    publisher = asyncio.create_task(publish_loop(redis, channel, 100, 0.01))
    try:
        assert (await raw.text_until("error", timeout=5))["error"] == "token_expired"
        opcodes = await raw.frames_through_close(after_s=1.0)
    finally:
        await cancel(publisher)
        raw.close()
    assert_close_is_last(opcodes)


async def test_no_data_frame_after_the_shutdown_close(make_client, redis, redis_prefix):
    client = await make_client()
    raw = await RawSocket.open(client.server.port, dispatcher_token(), rcvbuf=4096)
    raw.send_json({"type": "subscribe", "trips": ["trip_1"]})
    await raw.text_until("subscribed")
    raw.stop_reading()
    channel = keys.trip_channel(redis_prefix, "org_1", "trip_1")
    transport = small_kernel_buffer(client)
    # Unsent data above what aiohttp waits on (so the Close waits behind it), below the
    # slow-consumer limit (so the socket is not closed for that).
    for _ in range(100):
        if transport.get_write_buffer_size() > 200_000:
            break
        await redis.publish(channel, json.dumps({"type": "locations", "pad": "x" * 20_000}))
        await asyncio.sleep(0.005)
    assert 200_000 < transport.get_write_buffer_size() < 1_048_576
    stopping = asyncio.create_task(shutdown(client.server.app, client.server.runner, 5.0))
    publisher = asyncio.create_task(publish_loop(redis, channel, 100, 0.01))
    try:
        await asyncio.sleep(0.3)
        raw.start_reading()
        opcodes = await raw.frames_through_close(after_s=1.0)
    finally:
        await cancel(publisher)
        raw.close()
        await stopping
    assert_close_is_last(opcodes)


# -- fleet snapshot -------------------------------------------------------------------------


async def fill_fleet(redis: aioredis.Redis, prefix: str, n: int) -> None:
    """``n`` trips of org_1 with a latest location, as the publisher stores them."""
    now = now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            trip = f"fleet_{i:05d}"
            value = json.dumps({
                "tripId": trip, "driverId": "drv_1",
                "location": {"latitude": 12.9, "longitude": 77.5,
                             "timestamp": "2026-01-01T00:00:00.000Z", "accuracy": 4.5},
            })  # fmt: skip
            pipe.hset(keys.latest_key(prefix, "org_1", trip), mapping={"ts": now, "v": value})
            pipe.zadd(keys.fleet_key(prefix, "org_1"), {trip: now - n + i})
        await pipe.execute()


async def test_fleet_snapshot_is_capped_by_fleet_snapshot_max(make_client, redis, redis_prefix):
    client = await make_client(fleet_snapshot_max=7)
    await fill_fleet(redis, redis_prefix, 12)
    ws = await connect(client)
    await subscribe(ws, fleet=True)
    got = []
    while True:
        try:
            got.append(await next_message(ws, timeout=0.5))
        except TimeoutError:
            break
    assert [m["type"] for m in got] == ["snapshot"] * 7
    assert {m["tripId"] for m in got} == {f"fleet_{i:05d}" for i in range(5, 12)}  # newest
    await ws.close()


async def test_fleet_snapshot_never_fills_the_send_buffer(make_client, redis, redis_prefix):
    """A fleet snapshot much larger than WS_SEND_BUFFER_BYTES, to a client that reads late,
    while live messages arrive: the socket is not closed as a slow consumer, and every
    snapshot arrives."""
    n = 3000
    client = await make_client(ws_send_buffer_bytes=16_384)
    await fill_fleet(redis, redis_prefix, n)
    raw = await RawSocket.open(client.server.port, dispatcher_token(), rcvbuf=4096)
    await asyncio.sleep(0.1)  # upgraded
    small_kernel_buffer(client)
    raw.stop_reading()
    raw.send_json({"type": "subscribe", "fleet": True})
    channel = keys.trip_channel(redis_prefix, "org_1", "fleet_00001")
    closed_before = metrics.WS_SLOW_CLOSED._value.get()
    publisher = asyncio.create_task(publish_loop(redis, channel, 100, 0.05))
    try:
        await asyncio.sleep(1.0)  # not reading: the snapshot waits for the client
        raw.start_reading()
        snapshots = live = 0
        while (snapshots < n or not live) and (f := await raw.frame(timeout=1.0)) is not None:
            assert f[0] == TEXT, f  # a Close (1013) would end the snapshot early
            kind = json.loads(f[1])["type"]
            snapshots += kind == "snapshot"
            live += kind == "locations"
    finally:
        await cancel(publisher)
        raw.close()
    assert metrics.WS_SLOW_CLOSED._value.get() == closed_before
    assert snapshots == n and live > 0


async def test_snapshot_unavailable_names_no_redis_address(make_client, private_redis, caplog):
    """Redis refusing connections when a snapshot is read: the client is told so in fixed
    words (redis-py's error names Redis's host and port); the error is logged here."""
    client = await make_client(redis_url=private_redis.url)
    await state_reached(client.server.app[ws_module.FANOUT].connected.is_set)
    first = await connect(client)
    await subscribe(first, trips=["trip_1"])
    private_redis.stop()
    # trip_1's channel is held already: the subscribe needs no Redis, its snapshot does.
    second = await connect(client, dispatcher_token(sub="disp_2"))
    await subscribe(second, trips=["trip_1"])
    msg = await next_message(second, timeout=10)
    assert msg["type"] == "error" and msg["error"] == "snapshot_unavailable", msg
    port = str(private_redis.url.rsplit(":", 1)[1].split("/")[0])
    assert "127.0.0.1" not in msg["detail"] and port not in msg["detail"], msg
    assert "connect" not in msg["detail"].lower(), msg
    logged = [r for r in caplog.records if r.getMessage() == "snapshot_failed"]
    assert logged and port in logged[0].error  # type: ignore[attr-defined]
    for ws in (first, second):
        await ws.close()
