"""PostgreSQL goes away under load: restarted (a crash and recovery), or its connections
black-holed (a failover the client is never told about)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from ..conftest import REDIS_URL
from .conftest import service_env
from .load import Fleet, audit, report
from .proxy import BlackholeProxy


async def _status(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(3)) as r:
            return r.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return type(exc).__name__


def _first_ack_after(fleet: Fleet, t: float) -> float | None:
    ends = [a.ended for a in fleet.attempts() if a.status == 200 and a.ended >= t]
    return min(ends) - t if ends else None


async def test_postgres_restart_under_load(private_postgres, services, redis_prefix):
    pg = private_postgres
    ack_timeout_ms = 1000
    svc = await services(
        service_env(pg.url, REDIS_URL, redis_prefix, ACK_TIMEOUT_MS=ack_timeout_ms)
    )
    async with Fleet([svc.url], name="pg-restart", pings=20) as fleet:
        load = asyncio.ensure_future(fleet.run(rate=25, duration=10))
        await asyncio.sleep(3)
        await asyncio.to_thread(pg.stop, "immediate")  # a crash: no shutdown checkpoint
        down_at = time.monotonic()
        await asyncio.sleep(2)
        assert fleet.session is not None
        health = await _status(fleet.session, f"{svc.url}/healthz")
        ready = await _status(fleet.session, f"{svc.url}/readyz")
        await asyncio.sleep(1.5)
        await asyncio.to_thread(pg.start)  # crash recovery, then connections again
        up_at = time.monotonic()
        await load
        await fleet.finish(40)
        after = await _status(fleet.session, f"{svc.url}/readyz")
    a = await audit(pg.url, fleet)
    # Answers to requests sent once the database was surely gone, until it was back.
    gone = fleet.outcomes(down_at + ack_timeout_ms / 1000 + 0.2, up_at)
    no_retry_after = [
        at for at in fleet.attempts() if at.status == 503 and not at.retry_after
    ]  # fmt: skip
    recovery = _first_ack_after(fleet, up_at)
    report(
        "postgres_restart", a, outage_s=round(up_at - down_at, 2),
        answers_while_down=dict(gone), healthz_while_down=health, readyz_while_down=ready,
        recovered_after_s=recovery and round(recovery, 2),
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0
    assert a.count_mismatches == 0
    assert a.acked == a.sent, "every batch is acknowledged once PostgreSQL is back"
    assert set(gone) <= {"503:storage_unavailable", "503:overloaded"}, gone
    assert gone, "requests were answered while PostgreSQL was down"
    assert not no_retry_after
    assert health == 200 and ready == 503 and after == 200
    assert recovery is not None and recovery < 5.0


async def test_postgres_connections_blackholed_under_load(services, database, redis_prefix):
    """Every open connection to PostgreSQL goes silent (no reply, no FIN, no RST), while new
    connections work: the service must give up on the silent ones by itself."""
    host_port = database.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = BlackholeProxy(host, int(port))
    await proxy.start()
    via_proxy = database.replace(host_port, f"127.0.0.1:{proxy.port}")
    flush_timeout_s = 2
    svc = await services(
        service_env(
            via_proxy, REDIS_URL, redis_prefix, ACK_TIMEOUT_MS=1000,
            FLUSH_TIMEOUT_S=flush_timeout_s,
        )
    )  # fmt: skip
    try:
        async with Fleet([svc.url], name="pg-blackhole", pings=20, give_up_s=30) as fleet:
            load = asyncio.ensure_future(fleet.run(rate=25, duration=10))
            await asyncio.sleep(3)
            silenced = proxy.blackhole()
            cut_at = time.monotonic()
            await load
            await fleet.finish(35)
            assert fleet.session is not None
            ready = await _status(fleet.session, f"{svc.url}/readyz")
    finally:
        await proxy.close()
    a = await audit(database, fleet)
    recovery = _first_ack_after(fleet, cut_at + 0.2)
    unacked = sum(1 for b in fleet.batches if b.ack is None)
    report(
        "postgres_blackhole", a, connections_silenced=silenced,
        recovered_after_s=recovery and round(recovery, 2), batches_never_acked=unacked,
        readyz_after=ready,
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0
    # Each silenced connection costs one FLUSH_TIMEOUT_S before the pool drops it; a service
    # stuck on one would not answer again before the fleet gives up (30 s).
    assert recovery is not None and recovery < silenced * flush_timeout_s + 5, (
        "acks did not resume: the service is stuck on a silent connection"
    )
    assert unacked == 0
    assert ready == 200
