"""Hostile clients: slow request heads (slowloris), trickled bodies, connection floods.

The app is served in-process by ingest.http_server (the server `python -m ingest serve`
runs), on a real socket; the attackers are raw sockets.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from devtools import procs
from ingest import http_server
from ingest.app import create_app
from ingest.settings import Settings

from .conftest import REDIS_URL, SECRET, auth, batch, cancel

PING = "/api/v1/tracking/ping"
HALF_HEAD = b"POST /api/v1/tracking/ping HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve(make_settings: Callable[..., Settings]) -> AsyncIterator[Serve]:
    """Serve the production app through http_server.start on a free port; returns its URL."""
    runners: list[http_server.Runner] = []

    async def start(**overrides: Any) -> str:
        settings = make_settings(host="127.0.0.1", port=0, **overrides)
        runner = await http_server.start(create_app(settings), settings, shutdown_timeout=2.0)
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def closed_total(reason: str) -> float:
    """This process's count so far (tests in one process share the registry: use deltas)."""
    return (
        REGISTRY.get_sample_value("ingest_http_connections_closed_total", {"reason": reason}) or 0.0
    )


async def half_sent(url: str, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` connections that each sent part of a request head, and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(HALF_HEAD)
        conns.append((reader, writer))
    await asyncio.sleep(0)
    return conns


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True if the server closed the connection (EOF or reset) within ``within`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except TimeoutError:  # before OSError, which it subclasses
        return False
    except (ConnectionError, OSError):
        return True


def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()


async def test_slowloris_cannot_starve_probes_or_pings(serve: Serve) -> None:
    url = await serve(http_max_connections=50, http_header_timeout_s=2)
    evicted_before = closed_total("evicted")
    timed_out_before = closed_total("header_timeout")
    started = time.monotonic()
    attack = await half_sent(url, 200)
    try:
        async with aiohttp.ClientSession(url) as s:
            async with s.get("/readyz") as r:
                assert r.status == 200, await r.text()
            async with s.post(PING, json=batch(3, trip="sl_1"), headers=auth()) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["accepted"] == 3
            async with s.get("/metrics") as r:
                text = await r.text()
        # The cap held: at most 50 connections (the session's among them) were open.
        gauge = next(line for line in text.splitlines() if line.startswith("ingest_http_conn"))
        assert 1 <= float(gauge.split()[-1]) <= 50, gauge
        assert closed_total("evicted") - evicted_before >= 150
        # Every half-sent connection is closed, those left by the cap within the timeout.
        closed = await asyncio.gather(*(closed_by_server(r, 4.0) for r, _ in attack))
        assert all(closed), f"{closed.count(False)} half-sent connections still open"
        assert time.monotonic() - started < 2 + 3.0
        assert closed_total("header_timeout") - timed_out_before >= 1
    finally:
        close_all(attack)


async def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_timeout(serve: Serve) -> None:
    url = await serve(http_header_timeout_s=1)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    sent = 0
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n":
            writer.write(bytes([byte]))
            sent += 1
            if await closed_by_server(reader, 0.1):
                break
        else:
            pytest.fail(f"{sent} bytes of head over {time.monotonic() - started:.1f} s accepted")
        # The server's clock started at its accept(), a little before ours.
        assert 0.9 <= time.monotonic() - started < 3.0
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed(serve: Serve) -> None:
    url = await serve(http_header_timeout_s=1)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        assert await closed_by_server(reader, 2.5)
    finally:
        writer.close()


async def test_idle_keep_alive_connections_and_websockets_are_not_cut(serve: Serve) -> None:
    """The head timeout runs from a request's first byte: a kept-alive connection may stay
    idle longer, and a WebSocket is not an HTTP request any more once upgraded."""
    url = await serve(http_header_timeout_s=1, http_max_connections=20)
    connects: list[object] = []

    async def connected(*args: object) -> None:
        connects.append(args)

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(connected)
    async with (
        aiohttp.ClientSession(url) as live,
        aiohttp.ClientSession(url, trace_configs=[tracing]) as s,
        live.ws_connect("/api/v1/live", headers=auth("dispatcher", "disp_1")) as ws,
    ):
        for i in range(2):
            if i:
                await asyncio.sleep(1.6)  # idle longer than the head timeout
            async with s.get("/healthz") as r:
                assert r.status == 200
        assert len(connects) == 1  # both requests on one connection
        # A flood of half-sent connections evicts those, never the WebSocket.
        attack = await half_sent(url, 40)
        try:
            await asyncio.sleep(1.2)  # the attackers' head timeout passes too
            await ws.send_json({"type": "subscribe", "trips": ["t1"]})
            msg = await ws.receive_json(timeout=3)
            assert msg["type"] == "subscribed", msg
        finally:
            close_all(attack)
        assert not ws.closed


async def test_a_trickled_body_gets_408(serve: Serve) -> None:
    url = await serve(http_body_timeout_s=1)
    host, port = url.removeprefix("http://").split(":")
    body = b'{"tripId": "t", "driverId": "drv_1", "locations": []}'
    head = (
        f"POST {PING} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth()['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = closed_total("body_timeout")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    try:
        writer.write(head + body[:5])

        async def trickle() -> None:
            for byte in body[5:]:
                await asyncio.sleep(0.3)
                writer.write(bytes([byte]))

        trickling = asyncio.create_task(trickle())
        answer = await asyncio.wait_for(reader.read(), 5.0)  # the 408, then the server closes
        await cancel(trickling)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"error":"request_timeout"' in answer
        assert 1.0 <= time.monotonic() - started < 4.0
        assert closed_total("body_timeout") == before + 1
    finally:
        writer.close()


async def test_a_body_trickler_is_closed_first_when_the_cap_is_reached(serve, caplog):
    url = await serve(http_max_connections=3, http_body_timeout_s=30)
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {PING} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth()['Authorization']}\r\nContent-Length: 500\r\n\r\n{{"
    ).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)  # the head, then one byte of 500
    await asyncio.sleep(0.2)  # the handler is waiting for the rest
    evicted = closed_total("evicted")
    others = await half_sent(url, 3)  # the fourth connection closes the longest waiting
    try:
        assert await closed_by_server(reader, 2.0)
        assert closed_total("evicted") == evicted + 1
        async with aiohttp.ClientSession(url) as s, s.get("/healthz") as r:
            assert r.status == 200
    finally:
        writer.close()
        close_all(others)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


async def test_a_body_in_several_packets_within_the_deadline_is_accepted(serve: Serve) -> None:
    url = await serve(http_body_timeout_s=2)
    host, port = url.removeprefix("http://").split(":")
    import json

    body = json.dumps(batch(2, trip="slow_ok")).encode()
    head = (
        f"POST {PING} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth()['Authorization']}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body[:10])
        await asyncio.sleep(0.5)
        writer.write(body[10:])
        answer = await asyncio.wait_for(reader.read(), 5.0)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    finally:
        writer.close()


# -- the incident, as a process: a flood of half-sent requests against the open-files limit ---

FILES = 400  # the service's RLIMIT_NOFILE (soft = hard, so it cannot raise it)


def limit_open_files() -> None:
    """The service with a small open-files limit, as a container with a low ulimit has."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


async def test_a_flood_past_the_open_files_limit_leaves_readyz_answering(
    database: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": database, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
        "JWT_SECRET": SECRET, "HTTP_HEADER_TIMEOUT_S": "30",  # the cap alone must do it
    }  # fmt: skip
    service = procs.service(env, tmp_path, preexec_fn=limit_open_files)
    await service.start()
    attack: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        attack = await half_sent(service.url, FILES + 100)
        async with aiohttp.ClientSession(service.url) as s:
            for _ in range(3):
                async with s.get("/readyz", timeout=aiohttp.ClientTimeout(total=3)) as r:
                    assert r.status == 200
        (listening,) = service.events("listening")
        cap = listening["max_connections"]
        assert isinstance(cap, int) and cap < FILES
        (lowered,) = service.events("http_max_connections_lowered")
        assert lowered["open_files_limit"] == FILES
        await asyncio.sleep(0.3)
        assert sum(not r.at_eof() for r, _ in attack) <= cap
        (closed, *_) = service.events("http_connections_closed")
        assert closed["closed"]["evicted"] >= 1  # type: ignore[index]
    finally:
        close_all(attack)
        await service.stop()
    assert "Traceback" not in service.log_text()


async def test_a_closed_connection_is_freed_at_once_not_left_to_the_cyclic_gc(
    serve: Serve,
) -> None:
    """The pod freezes its startup objects and collects cycles rarely (cli.py: gc.freeze(),
    a threshold of 20,000): a connection that outlived its socket in a reference cycle kept
    its buffers until a full collection, minutes and hundreds of MB later under churn (phones
    that open a connection per upload). Closed connections must go by reference counting."""
    url = await serve()
    gc.collect()
    gc.disable()  # as good as the pod's rare full collections
    try:
        for _ in range(20):  # a request each, then the client hangs up (or resets)
            async with aiohttp.ClientSession() as session:
                resp = await session.post(url + PING, json=batch(1), headers=auth())
                assert resp.status == 200
        async with aiohttp.ClientSession() as session:  # a socket still open is kept
            assert (await session.get(url + "/healthz")).status == 200
            for _ in range(100):
                await asyncio.sleep(0.01)
                conns = [c for c in gc.get_objects() if isinstance(c, http_server._Connection)]
                if len(conns) <= 1:
                    break
            assert [c.transport is not None for c in conns] == [True]
    finally:
        gc.enable()
