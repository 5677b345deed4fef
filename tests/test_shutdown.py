"""Shutdown (ingest/shutdown.py): the SIGTERM drain of the service as a process, and the
sequence's steps in order within its deadline."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import asyncpg
import pytest

from devtools import procs
from ingest.shutdown import CLOSE_S, HANDLER_SHARE, HANDLERS_END, shutdown

from .conftest import REDIS_URL, SECRET, auth, batch, token

PING = "/api/v1/tracking/ping"


@pytest.mark.parametrize("ack_mode", ["durable", "buffered"])
async def test_sigterm_commits_everything_buffered_and_exits_0(
    database, redis_prefix, ack_mode, tmp_path
):
    service = procs.service({
        "DATABASE_URL": database, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
        "JWT_SECRET": SECRET, "ACK_MODE": ack_mode, "LOG_LEVEL": "INFO",
        "RATE_LIMIT_PER_S": "1000",
    }, tmp_path)  # fmt: skip
    await service.start()
    bodies = [batch(10, trip=f"trip_{i}") for i in range(20)]
    # A flush held by a lock: at SIGTERM, the others' pings are still waiting in the buffer.
    locker = await asyncpg.connect(database)
    await locker.execute('BEGIN; LOCK TABLE "IngestFlush" IN ACCESS EXCLUSIVE MODE')
    try:
        async with aiohttp.ClientSession(service.url) as s:

            async def post(b):
                async with s.post(PING, json=b, headers=auth()) as r:
                    return r.status, await r.json()

            tasks = [asyncio.ensure_future(post(b)) for b in bodies]
            await asyncio.sleep(0.5)  # requests are in the buffer, not yet flushed
            started = asyncio.get_running_loop().time()
            stopping = asyncio.ensure_future(service.stop())
            await asyncio.sleep(0.2)
            await locker.execute("ROLLBACK")
            code = await stopping
            elapsed = asyncio.get_running_loop().time() - started
            answers = await asyncio.gather(*tasks)
    finally:
        await locker.close()
        await service.stop()
    out = service.log_text()
    assert code == 0, out[-2000:]
    assert elapsed < 3.0  # the final flush ran at once, not after the interval
    ok = 200 if ack_mode == "durable" else 202
    assert [status for status, _ in answers] == [ok] * 20
    conn = await asyncpg.connect(database)
    try:
        stored = await conn.fetchval('SELECT count(*) FROM "TripLocation"')
    finally:
        await conn.close()
    assert stored == 200
    if ack_mode == "durable":
        assert sum(a["accepted"] for _, a in answers) == 200
    assert '"event":"drained"' in out


async def test_shutdown_runs_its_steps_in_order_within_its_deadline(make_client, database, caplog):
    """In process, with a commit held by a lock: the WebSocket is closed with 1001 at once, the
    request waiting for its commit is answered 503 at HANDLER_SHARE of the deadline, the final
    flush is cut at the deadline and the rows it leaves are counted in the last line."""
    caplog.set_level(logging.INFO, logger="ingest.shutdown")
    timeout_s = 2.0
    client = await make_client(shutdown_timeout_s=timeout_s)
    app, runner = client.server.app, client.server.runner
    ws = await client.ws_connect(f"/api/v1/live?access_token={token('dispatcher', 'disp_1')}")
    locker = await asyncpg.connect(database)
    await locker.execute("BEGIN")
    await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
    try:
        waiting = asyncio.ensure_future(client.post(PING, json=batch(4), headers=auth()))
        await asyncio.sleep(0.3)  # its flush waits for the lock
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.ensure_future(shutdown(app, runner, timeout_s))
        closed = await ws.receive()
        closed_s = loop.time() - started
        answer = await waiting
        answered_s = loop.time() - started
        await stopping
        stopped_s = loop.time() - started
    finally:
        await locker.execute("ROLLBACK")
        await locker.close()
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001
    assert closed_s < 0.2
    assert answer.status == 503 and (await answer.json())["error"] == "shutting_down"
    assert HANDLER_SHARE * timeout_s <= answered_s < HANDLERS_END * timeout_s
    assert timeout_s <= stopped_s < timeout_s + CLOSE_S
    (stopped,) = [r for r in caplog.records if r.getMessage() == "stopped"]
    assert stopped.rows_not_committed == 4
    assert stopped.tasks_cancelled == ["flusher"]
