"""?format=geojson|gpx on the history endpoint: the whole trip streamed (chunked, constant
memory, no connection held), GPX valid against the GPX 1.1 schema, 404 before any byte, a
client that leaves mid-download, two orgs, driver tokens, hostile queries."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from lxml import etree

from ingest import http_server
from ingest.app import create_app
from ingest.trip_pages import Slots
from ingest.typedefs import EXPORT_SLOTS, POOL

from .conftest import auth, iso, now_ms, post_ping, state_reached, token

GPX_XSD = Path(__file__).parent / "data" / "gpx-1.1.xsd"
GPX_NS = {"g": "http://www.topografix.com/GPX/1/1"}


def url(trip: str, fmt: str | None = None) -> str:
    q = f"?format={fmt}" if fmt else ""
    return f"/api/v1/tracking/trips/{trip}/locations{q}"


def ms_of(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


async def post(client, points, trip="trip_1", driver="drv_1", org="org_1") -> None:
    body = {"tripId": trip, "driverId": driver, "batchId": str(uuid.uuid4()), "locations": points}
    status, answer = await post_ping(client, body, **auth("driver", driver, org))
    assert status == 200 and answer["accepted"] == len(points), answer


def pt(lat: float, lon: float, ms: int, **extra: Any) -> dict[str, Any]:
    return {"latitude": lat, "longitude": lon, "timestamp": iso(ms), **extra}


async def bulk(db: asyncpg.Connection, n: int, trip: str = "trip_big", org: str = "org_1") -> None:
    """``n`` pings a second apart, written straight into the table (faster than the API)."""
    await db.execute(
        """
        INSERT INTO "TripLocation" ("tripId", "driverId", "orgId", "latitude", "longitude",
                                    "speed", "altitude", "timestamp")
        SELECT $1, 'drv_1', $2, 12.0 + i * 1e-5, 77.0 + i * 1e-5, 10.5, 900 + i % 50,
               $3::timestamptz + i * interval '1 second'
        FROM generate_series(0, $4 - 1) AS i
        """,
        trip, org, datetime.now(UTC) - timedelta(days=1), n,
    )  # fmt: skip


async def test_gpx_validates_against_gpx_1_1(client):
    t0 = now_ms(-600)
    trip = "a<b>&\"c'd"  # XML-escaped in <name>
    points = [
        pt(12.5, 77.25, t0, altitude=921.5, speed=3.0),
        pt(0.00001, 180.0, t0 + 1000),  # no altitude; lon 180 is written as -180
        pt(-90.0, -180.0, t0 + 2000, altitude=-12.0),
    ]
    await post(client, points, trip=trip)
    r = await client.get(url("a%3Cb%3E%26%22c'd", "gpx"), headers=auth())
    assert r.status == 200
    assert r.content_type == "application/gpx+xml"
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.headers["Content-Disposition"] == 'attachment; filename="a_b___c_d.gpx"'
    raw = await r.read()
    doc = etree.fromstring(raw)
    schema = etree.XMLSchema(etree.parse(str(GPX_XSD)))
    schema.assertValid(doc)
    assert doc.get("version") == "1.1" and doc.get("creator") == "ingest"
    assert doc.findtext("g:trk/g:name", namespaces=GPX_NS) == trip
    trkpts = doc.findall("g:trk/g:trkseg/g:trkpt", GPX_NS)
    assert [(float(p.get("lat")), float(p.get("lon"))) for p in trkpts] == [
        (12.5, 77.25), (0.00001, -180.0), (-90.0, -180.0),
    ]  # fmt: skip
    assert [p.findtext("g:ele", namespaces=GPX_NS) for p in trkpts] == ["921.5", None, "-12.0"]
    times = [ms_of(p.findtext("g:time", namespaces=GPX_NS)) for p in trkpts]
    assert times == [t0, t0 + 1000, t0 + 2000]


async def test_geojson_is_a_linestring_feature_with_times(client):
    t0 = now_ms(-600)
    await post(client, [pt(12.0 + i * 0.001, 77.0 - i * 0.002, t0 + i * 1000) for i in range(7)])
    r = await client.get(url("trip_1", "geojson"), headers=auth("dispatcher", "disp_1"))
    assert r.status == 200 and r.content_type == "application/geo+json"
    assert r.headers["Transfer-Encoding"] == "chunked"
    doc = json.loads(await r.read())
    assert doc["type"] == "Feature" and doc["geometry"]["type"] == "LineString"
    coords = doc["geometry"]["coordinates"]
    assert coords == [[77.0 - i * 0.002, 12.0 + i * 0.001] for i in range(7)]  # [lon, lat]
    assert doc["properties"]["tripId"] == "trip_1" and doc["properties"]["driverId"] == "drv_1"
    assert [ms_of(t) for t in doc["properties"]["times"]] == [t0 + i * 1000 for i in range(7)]


async def test_without_format_or_json_the_pages_stay_as_they_were(client):
    await post(client, [pt(1.0, 2.0, now_ms(-60 + i)) for i in range(3)])
    plain = await (await client.get(url("trip_1") + "?limit=2", headers=auth())).json()
    as_json = await (await client.get(url("trip_1", "json") + "&limit=2", headers=auth())).json()
    assert plain == as_json and len(plain["locations"]) == 2 and plain["nextCursor"]


async def test_a_bad_format_is_a_400_naming_it(client):
    await post(client, [pt(1.0, 2.0, now_ms(-60))])
    for fmt in ("kml", "GPX", "geojson%00", "x" * 3000):
        r = await client.get(url("trip_1", fmt), headers=auth())
        assert r.status == 400, fmt
        answer = await r.json()
        assert answer["error"] == "invalid_query" and answer["detail"].startswith("format:")
    r = await client.get(url("trip_1", "gpx") + "&from=not-a-time", headers=auth())
    assert r.status == 400 and (await r.json())["detail"].startswith("from:")


async def test_unknown_trips_other_orgs_and_other_drivers_get_404_before_any_byte(client):
    await post(client, [pt(1.0, 2.0, now_ms(-60))])
    for fmt in ("gpx", "geojson"):
        for trip, headers in (
            ("nope", auth()),
            ("trip_1", auth("dispatcher", "disp_1", "org_2")),  # another org
            ("trip_1", auth("driver", "drv_2")),  # another driver of the org
            ("x" * 4000, auth("dispatcher", "d")),
            ("%00", auth("dispatcher", "d")),
        ):
            r = await client.get(url(trip, fmt), headers=headers)
            assert r.status == 404, (fmt, trip[:10])
            assert r.content_type == "application/json"
            assert (await r.json())["error"] == "not_found"
        assert (await client.get(url("trip_1", fmt))).status == 401


async def test_two_orgs_with_the_same_trip_id_export_their_own(client):
    t0 = now_ms(-600)
    await post(client, [pt(1.0, 1.0, t0), pt(1.1, 1.0, t0 + 1000)], org="org_1")
    await post(client, [pt(-5.0, 3.0, t0)], driver="drv_x", org="org_2")
    one = json.loads(await (await client.get(url("trip_1", "geojson"), headers=auth())).read())
    two_r = await client.get(url("trip_1", "geojson"), headers=auth("dispatcher", "d", "org_2"))
    two = json.loads(await two_r.read())
    assert one["geometry"]["coordinates"] == [[1.0, 1.0], [1.0, 1.1]]
    assert two["geometry"]["coordinates"] == [[3.0, -5.0]]
    assert two["properties"]["driverId"] == "drv_x"


async def test_from_and_to_narrow_the_export(client):
    t0 = now_ms(-600)
    await post(client, [pt(1.0, 1.0 + i, t0 + i * 1000) for i in range(5)])
    q = f"&from={t0 + 1000}&to={t0 + 3000}"
    doc = json.loads(await (await client.get(url("trip_1", "geojson") + q, headers=auth())).read())
    assert [c[0] for c in doc["geometry"]["coordinates"]] == [2.0, 3.0]


async def _measured_export(client, fmt: str, trip: str) -> tuple[int, int, int]:
    """(bytes, chunks, tracemalloc peak while the export streamed)."""
    tracemalloc.start()
    try:
        r = await client.get(url(trip, fmt), headers=auth())
        assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
        size = chunks = 0
        tail = b""
        async for chunk in r.content.iter_chunked(1 << 16):
            size += len(chunk)
            chunks += 1
            tail = (tail + chunk)[-64:]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tail.endswith(b"</gpx>\n" if fmt == "gpx" else b"]}}\n")
    return size, chunks, peak


@pytest.mark.parametrize("fmt", ["gpx", "geojson"])
async def test_a_50k_ping_export_streams_in_constant_memory(client, db, fmt):
    await bulk(db, 10_000, trip="trip_small")
    await bulk(db, 50_000, trip="trip_big")
    await _measured_export(client, fmt, "trip_small")  # one-time allocations (statements, ...)
    small, _, small_peak = await _measured_export(client, fmt, "trip_small")
    size, chunks, peak = await _measured_export(client, fmt, "trip_big")
    assert size > 4 * small and chunks > 10
    # Five times the pings, not five times the memory: the peak is that of a page (and of
    # GeoJSON's times spooled in memory before they go to a file), far below the body.
    assert peak < 1.5 * small_peak, (peak, small_peak)
    assert peak < size / 2, (peak, size)


@pytest.mark.parametrize("server", ["production", "test"])
async def test_a_client_leaving_mid_download_leaves_nothing_behind(
    server, make_client, make_settings, db, caplog
):
    """The production server (http_server) lets the handler see the lost connection at its
    next write; aiohttp's TestServer cancels the handler instead. Either way it ends, and
    gives back its slot and connection."""
    # 200k pings (20 MB of GPX): more than the socket buffers between client and server hold,
    # so the server is still writing when the client goes.
    caplog.set_level(logging.INFO, logger="ingest.export")
    await bulk(db, 200_000)
    runner = None
    if server == "production":
        settings = make_settings(host="127.0.0.1", port=0)
        app = create_app(settings)
        runner = await http_server.start(app, settings, shutdown_timeout=2.0)
        port = runner.addresses[0][1]
    else:
        client = await make_client()
        app, port = client.server.app, client.server.port
    try:
        await _leave_mid_download(app, port, db, caplog, server)
    finally:
        if runner is not None:
            await runner.cleanup()


async def _leave_mid_download(app, port: int, db, caplog, server: str) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET {url('trip_big', 'gpx')} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token()}\r\n\r\n".encode()
    )
    await writer.drain()
    got = b""
    while len(got) < 8192:
        data = await reader.read(4096)
        assert data, got
        got += data
    assert b"200 OK" in got and b"<trkpt" in got
    assert app[EXPORT_SLOTS].used == 1  # still writing
    writer.transport.abort()  # gone, without reading the rest
    pool = app[POOL]
    for _ in range(100):  # the handler notices at its next write
        if app[EXPORT_SLOTS].used == 0 and pool.get_idle_size() == pool.get_size():
            break
        await asyncio.sleep(0.05)
    assert app[EXPORT_SLOTS].used == 0
    assert pool.get_idle_size() == pool.get_size()
    aborted = [r for r in caplog.records if r.getMessage() == "export_aborted"]
    reason = "client_left" if server == "production" else "cancelled"
    assert [getattr(r, "reason", None) for r in aborted] == [reason]
    busy = await db.fetchval(
        """SELECT count(*) FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'"""
    )
    assert busy == 0
    # The service still answers (nothing is pinned), and a whole export still works.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{url('trip_big', 'geojson')}", headers=auth()) as r,
    ):
        assert r.status == 200
        assert len(json.loads(await r.read())["properties"]["times"]) == 200_000


async def test_beyond_the_export_slots_a_503_with_retry_after(make_client):
    client = await make_client(export_max_concurrent=1)
    await post(client, [pt(1.0, 1.0, now_ms(-60))])
    slots = client.server.app[EXPORT_SLOTS]
    assert slots.try_acquire("org_9")  # another org's export holds the only slot
    try:
        r = await client.get(url("trip_1", "gpx"), headers=auth())
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["error"] == "too_many_exports"
        # Pages of history are not exports: they never wait for a slot.
        assert (await client.get(url("trip_1"), headers=auth())).status == 200
    finally:
        slots.release("org_9")
    r = await client.get(url("trip_1", "gpx"), headers=auth())
    assert r.status == 200 and b"<trkpt" in await r.read() and slots.used == 0


# -- clients too slow for the export slots, and orgs sharing them ---------------------------


async def _open_download(port: int, path: str, tok: str) -> socket.socket:
    """A GET sent on a raw socket with a small receive buffer, nothing read yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def _head(sock: socket.socket) -> bytes:
    """The response head (and whatever body came with it)."""
    got = b""
    while b"\r\n\r\n" not in got:
        data = await asyncio.get_running_loop().sock_recv(sock, 4096)
        assert data, got
        got += data
    return got


async def _read_slowly(sock: socket.socket, chunk: int = 2048, pause: float = 0.05) -> bytes:
    """Everything the server sends, read at about 40 KB/s, until it closes the connection."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    try:
        while data := await loop.sock_recv(sock, chunk):
            got += data
            await asyncio.sleep(pause)
    except ConnectionResetError:  # cut with a reset: what was still queued is dropped
        pass
    finally:
        sock.close()
    return bytes(got)


@pytest.mark.parametrize("server", ["production", "test"])
async def test_exports_too_slow_to_keep_up_are_cut_off_and_free_their_slots(
    server, make_client, make_settings, db, caplog
):
    """Two downloads read at ~40 KB/s, under EXPORT_MIN_BYTES_PER_S but each page's drain
    well within WRITE_TIMEOUT_S: both are cut off soon after the grace, their slots freed,
    while a fast export of the same trip is whole. 100k pings (10 MB of GPX) exceed what the
    socket buffers between server and client hold (about 3 MB; Linux's tcp_wmem max is 4 MB)."""
    caplog.set_level(logging.INFO, logger="ingest.export")
    await bulk(db, 100_000)
    # 4 MiB/s: the bytes the buffers take at once count as sent, so the floor must outrun them
    # within a second; a fast local reader makes the export wait far less.
    overrides = dict(
        export_max_concurrent=4, export_min_bytes_per_s=4 << 20, export_rate_grace_s=0.2
    )
    runner = None
    if server == "production":
        settings = make_settings(host="127.0.0.1", port=0, **overrides)
        app = create_app(settings)
        runner = await http_server.start(app, settings, shutdown_timeout=2.0)
        port = runner.addresses[0][1]
    else:
        client = await make_client(**overrides)
        app, port = client.server.app, client.server.port
    try:
        await _two_slow_and_one_fast(app, port, caplog)
    finally:
        if runner is not None:
            await runner.cleanup()


async def _two_slow_and_one_fast(app, port: int, caplog) -> None:
    slots, pool = app[EXPORT_SLOTS], app[POOL]
    socks = [await _open_download(port, url("trip_big", "gpx"), token()) for _ in range(2)]
    heads = [await _head(s) for s in socks]
    assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads), heads
    assert slots.used == 2
    slow = [asyncio.ensure_future(_read_slowly(s)) for s in socks]
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(base) as session:
        async with session.get(url("trip_big", "gpx"), headers=auth("dispatcher", "d")) as r:
            assert r.status == 200
            whole = await r.read()
        assert whole.endswith(b"</trkseg></trk></gpx>\n")
        assert whole.count(b"<trkpt ") == 100_000
        # Without the floor they would read for minutes (10 MB at 40 KB/s).
        bodies = await asyncio.wait_for(asyncio.gather(*slow), 10)
        for head, body in zip(heads, bodies, strict=True):
            got = head + body
            assert b"<trkpt " in got and b"</gpx>" not in got
            assert not got.endswith(b"\r\n0\r\n\r\n")  # no last chunk: incomplete
        await state_reached(lambda: slots.used == 0 and pool.get_idle_size() == pool.get_size())
        aborted = [r for r in caplog.records if r.getMessage() == "export_aborted"]
        assert [getattr(r, "reason", None) for r in aborted] == ["too_slow", "too_slow"]
        assert all(getattr(r, "org", None) == "org_1" for r in aborted)
        # The freed slots serve at once.
        async with session.get(url("trip_big", "geojson"), headers=auth()) as r:
            assert r.status == 200
            assert len(json.loads(await r.read())["properties"]["times"]) == 100_000


async def test_one_org_cannot_take_every_slot_from_another(make_client, db):
    """With the default EXPORT_MAX_CONCURRENT (2), a driver of org_a opening two downloads
    it does not read holds one slot; the other is org_b's, whose dispatcher gets its summary
    and exports (not 503 too_many_exports)."""
    await bulk(db, 100_000, org="org_a")
    await bulk(db, 1_500, trip="trip_b", org="org_b")
    client = await make_client()
    app, port = client.server.app, client.server.port
    slots = app[EXPORT_SLOTS]
    a_driver = token("driver", "drv_1", "org_a")
    held = [await _open_download(port, url("trip_big", "gpx"), a_driver) for _ in range(2)]
    try:
        heads = [await _head(s) for s in held]
        b = auth("dispatcher", "disp_b", "org_b")
        r = await client.get("/api/v1/tracking/trips/trip_b/summary", headers=b)
        assert r.status == 200, await r.text()
        assert (await r.json())["pings"] == 1_500
        for fmt, tail in (("gpx", b"</gpx>\n"), ("geojson", b"]}}\n")):
            r = await client.get(url("trip_b", fmt), headers=b)
            assert r.status == 200, await r.text()
            assert (await r.read()).endswith(tail)
        # org_a holds its share: its second download, and its dispatcher, wait their turn.
        statuses = sorted(h.split(b" ", 2)[1] for h in heads)
        assert statuses == [b"200", b"503"], heads
        refused = next(h for h in heads if h.split(b" ", 2)[1] == b"503")
        assert b"too_many_exports" in refused and b"Retry-After: 1" in refused
        r = await client.get(url("trip_big", "gpx"), headers=auth("dispatcher", "d", "org_a"))
        assert r.status == 503 and (await r.json())["error"] == "too_many_exports"
        assert slots.used == 1
    finally:
        for s in held:
            s.close()
    await state_reached(lambda: slots.used == 0)


@pytest.mark.parametrize(("limit", "per_org"), [(1, 1), (2, 1), (3, 2), (10, 9)])
def test_an_org_may_hold_all_slots_but_one(limit: int, per_org: int) -> None:
    """All but one slot per org, so another org always finds one; a single slot cannot be
    shared, and an org may hold it (docs/api.md)."""
    slots = Slots(limit)
    assert slots.per_org == per_org
    assert all(slots.try_acquire("org_a") for _ in range(per_org))
    assert not slots.try_acquire("org_a")
    assert slots.try_acquire("org_b") == (limit > 1)
    slots.release("org_a")
    assert slots.try_acquire("org_a")
