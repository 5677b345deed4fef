"""Reads on a streaming replica (DATABASE_READ_URL): real servers, a primary and a synchronous
standby started for this module (devtools.services.PostgresPair)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from devtools.services import PostgresPair, PrivatePostgres, postgres_bindir
from ingest.reads import (
    MONITOR_APP_NAME,
    PRIMARY_APP_NAME,
    REPLICA_APP_NAME,
    ReadReplica,
    read_pool,
)
from ingest.settings import SettingsError, load_settings
from ingest.typedefs import LIFECYCLE, POOL, READ_REPLICA

from .conftest import PING, SECRET, auth, batch, run_cli

HISTORY = "/api/v1/tracking/trips/{}/locations"
# The history page query, as pg_stat_activity shows a connection's last statement.
PAGE_SQL_MARK = '"timestamp" > $6'


@contextlib.contextmanager
def started_pair() -> Iterator[PostgresPair]:
    """A primary and its synchronous standby, migrated (the schema reaches the standby)."""
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed")
    pair = PostgresPair()
    try:
        pair.start()
        for server in (pair.primary, pair.standby):  # statements counted in their logs
            pair.configure(server, log_statement="all", log_line_prefix="%a|")
        result = run_cli("migrate", DATABASE_URL=pair.primary.url)
        assert result.returncode == 0, result.stderr
        pair.wait_replayed()
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture(scope="module")
def pair() -> Iterator[PostgresPair]:
    with started_pair() as p:
        yield p


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``predicate`` (a state, not a duration: the timeout only bounds a hang)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.05)


async def replica_client(make_client: Any, pair: PostgresPair, **over: Any) -> Any:
    """The app on the pair, once its monitor has found the replica up and caught up."""
    client = await make_client(
        database_url=pair.primary.url, database_read_url=pair.standby.url, **over
    )
    replica = client.server.app[READ_REPLICA]
    await until(lambda: replica.fallback_reason() is None)
    return client


async def history(client: Any, trip: str, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await client.get(HISTORY.format(trip), headers=headers)
    return resp.status, await resp.json()


def page_queries(server: PrivatePostgres, application_name: str) -> int:
    """History queries ``server`` has run for connections of ``application_name``, counted in
    its log (the module's servers log every statement, prefixed with the application name;
    a statement's further lines follow without a prefix)."""
    log = (server.dir / "server.log").read_text(errors="replace")
    entries = re.split(r"\n(?=[\w.-]*\|[A-Z]+:  )", log)
    return sum(
        1 for e in entries if e.startswith(f"{application_name}|LOG:  ") and PAGE_SQL_MARK in e
    )  # fmt: skip


def test_database_read_url_is_checked_like_database_url():
    with pytest.raises(SettingsError, match="DATABASE_READ_URL"):
        load_settings({"DATABASE_READ_URL": "mysql://db/x", "JWT_SECRET": SECRET})
    with pytest.raises(SettingsError, match="READ_MAX_LAG_S"):
        load_settings({"READ_MAX_LAG_S": "0", "JWT_SECRET": SECRET})
    with pytest.raises(SettingsError, match="READ_MAX_LAG_S"):
        load_settings({"READ_MAX_LAG_S": "soon", "JWT_SECRET": SECRET})
    s = load_settings(
        {"DATABASE_READ_URL": "postgresql://r@a:5432,b:5432/db", "JWT_SECRET": SECRET}
    )
    assert s.database_read_url == "postgresql://r@a:5432,b:5432/db" and s.read_max_lag_s == 5


async def test_without_a_read_url_reads_use_the_primary_and_nothing_more_runs(client):
    app = client.server.app
    assert READ_REPLICA not in app
    assert "replica-monitor" not in app[LIFECYCLE].tasks
    before = sample("ingest_replica_reads_total")
    assert read_pool(app) is app[POOL]
    assert sample("ingest_replica_reads_total") == before


async def test_history_is_read_on_the_replica_and_scoped_by_org(make_client, pair):
    client = await replica_client(make_client, pair)
    trip = f"trip-{uuid.uuid4().hex[:8]}"
    org_a, org_b = f"org-a-{trip}", f"org-b-{trip}"
    for org, n in ((org_a, 3), (org_b, 2)):  # the same trip id in two orgs
        r = await client.post(PING, json=batch(n, trip=trip), headers=auth("driver", "drv_1", org))
        assert r.status == 200, await r.text()
    await asyncio.to_thread(pair.wait_replayed)
    on_replica = page_queries(pair.standby, REPLICA_APP_NAME)
    on_primary = page_queries(pair.primary, PRIMARY_APP_NAME)
    before = sample("ingest_replica_reads_total")

    # Unknown in this org: the replica, then the primary, say so.
    status, body = await history(client, trip, auth("dispatcher", "disp", "org-none"))
    assert status == 404 and body["error"] == "not_found"
    status, body = await history(client, trip, auth("dispatcher", "disp", org_a))
    assert status == 200 and len(body["locations"]) == 3  # org A's rows only, not B's
    status, body = await history(client, trip, auth("dispatcher", "disp", org_b))
    assert status == 200 and len(body["locations"]) == 2
    # A driver token of org B sees nothing of org A's trip with the same id (its own only).
    status, body = await history(client, trip, auth("driver", "drv_1", org_b))
    assert status == 200 and len(body["locations"]) == 2

    assert sample("ingest_replica_reads_total") - before == 4
    # Each page ran on the replica (its log counts them by application_name).
    assert page_queries(pair.standby, REPLICA_APP_NAME) - on_replica == 4
    assert page_queries(pair.standby, MONITOR_APP_NAME) == 0
    # On the primary, only the 404's second look.
    assert page_queries(pair.primary, PRIMARY_APP_NAME) - on_primary == 1


async def test_a_trip_not_yet_on_the_replica_is_looked_up_on_the_primary(make_client, pair):
    """A trip just started may not have been replayed yet: its first page comes from the
    primary instead of a 404."""
    client = await replica_client(make_client, pair, read_max_lag_s=600)
    trip, org = f"trip-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(pair.query, pair.standby, "SELECT pg_wal_replay_pause()")
    try:
        r = await client.post(PING, json=batch(4, trip=trip), headers=auth("driver", "drv_1", org))
        assert r.status == 200
        on_replica = await asyncio.to_thread(
            pair.query,
            pair.standby,
            f"""SELECT count(*) FROM "TripLocation" WHERE "orgId" = '{org}'""",
        )
        assert on_replica == "0"  # not replayed
        lag_fallbacks = sample("ingest_read_fallbacks_total", reason="lag")
        status, body = await history(client, trip, auth("dispatcher", "disp", org))
        assert status == 200 and len(body["locations"]) == 4
        # Still under READ_MAX_LAG_S: not a fallback, the replica was asked first.
        assert sample("ingest_read_fallbacks_total", reason="lag") == lag_fallbacks
        # Another org asking for that trip id still gets 404 from both.
        status, body = await history(client, trip, auth("dispatcher", "disp", "org-other"))
        assert status == 404
    finally:
        await asyncio.to_thread(pair.query, pair.standby, "SELECT pg_wal_replay_resume()")


async def test_lag_of_an_idle_caught_up_replica_is_zero_with_pg_monitor(pair, caplog):
    """Without pg_monitor a read role cannot see that the WAL receiver streams: lag then reads
    as the age of the last replayed commit (growing while the primary is idle), and the
    monitor says what to grant."""
    tag = uuid.uuid4().hex[:8]
    plain, monitor = f"reader_{tag}", f"monitor_{tag}"
    await asyncio.to_thread(
        pair.query, pair.primary,
        f"CREATE ROLE {plain} LOGIN; CREATE ROLE {monitor} LOGIN; GRANT pg_monitor TO {monitor}",
    )  # fmt: skip
    await asyncio.to_thread(pair.wait_replayed)
    await asyncio.sleep(0.2)  # the last replayed commit (the grant) is now that old at least

    lags = {}
    for role in (monitor, plain):
        url = f"postgresql://{role}@127.0.0.1:{pair.standby.port}/postgres"
        pool = await asyncpg.create_pool(url, min_size=0)
        replica = ReadReplica(pool, url, max_lag_s=5)
        try:
            await replica.measure()
        finally:
            await replica.close()
            await pool.close()
        assert replica.up
        lags[role] = replica.lag_s
    assert lags[monitor] == 0
    assert lags[plain] >= 0.2
    hints = [r for r in caplog.records if r.getMessage() == "replica_lag_hidden"]
    assert len(hints) == 1  # for the role without pg_monitor only


# Found by the attack review: summaries and exports lacked history's fallbacks.

SUMMARY = "/api/v1/tracking/trips/{}/summary"
HISTORY_PATH = "/api/v1/tracking/trips/{}/locations"


async def test_a_trip_not_yet_on_the_replica_is_summarized_and_exported(make_client, pair):
    client = await replica_client(make_client, pair, read_max_lag_s=600)
    trip, org = f"trip-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(pair.query, pair.standby, "SELECT pg_wal_replay_pause()")
    try:
        r = await client.post(PING, json=batch(4, trip=trip), headers=auth("driver", "drv_1", org))
        assert r.status == 200
        disp = auth("dispatcher", "disp", org)
        resp = await client.get(HISTORY_PATH.format(trip), headers=disp)
        assert resp.status == 200 and len((await resp.json())["locations"]) == 4
        statuses = [(await client.get(SUMMARY.format(trip), headers=disp)).status]
        for fmt in ("geojson", "gpx"):
            resp = await client.get(HISTORY_PATH.format(trip), params={"format": fmt}, headers=disp)
            statuses.append(resp.status)
            await resp.read()
        assert statuses == [200, 200, 200]
    finally:
        await asyncio.to_thread(pair.query, pair.standby, "SELECT pg_wal_replay_resume()")


async def test_a_replica_failing_under_a_summary_falls_back_to_the_primary(make_client, pair):
    client = await replica_client(make_client, pair)
    trip, org = f"trip-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    r = await client.post(PING, json=batch(4, trip=trip), headers=auth("driver", "drv_1", org))
    assert r.status == 200
    await asyncio.to_thread(pair.wait_replayed)
    # The replica's read is made to wait (an ACCESS EXCLUSIVE lock taken on the primary is
    # replayed on the standby), then its backend is terminated: a replica failing mid-read.
    locker = await asyncpg.connect(pair.primary.url)
    tx = locker.transaction()
    await tx.start()
    try:
        await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
        await locker.execute("SELECT pg_current_wal_lsn()")
        await until_sql(
            pair,
            """SELECT count(*) > 0 FROM pg_locks WHERE mode = 'AccessExclusiveLock'
               AND relation = '"TripLocation"'::regclass AND granted""",
        )
        summary = asyncio.create_task(
            client.get(SUMMARY.format(trip), headers=auth("dispatcher", "disp", org))
        )
        waiting = f"""SELECT count(*) > 0 FROM pg_stat_activity
            WHERE application_name = '{REPLICA_APP_NAME}' AND wait_event_type = 'Lock'"""
        await until_sql(pair, waiting)
        await asyncio.to_thread(
            pair.query, pair.standby,
            f"""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                WHERE application_name = '{REPLICA_APP_NAME}' AND wait_event_type = 'Lock'""",
        )  # fmt: skip
    finally:
        await tx.rollback()
        await locker.close()
    resp = await summary
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["pings"] == 4


async def until_sql(pair: PostgresPair, sql: str) -> None:
    """Poll ``sql`` on the standby until it answers true (the bound only stops a hang)."""
    for _ in range(300):
        if await asyncio.to_thread(pair.query, pair.standby, sql) == "t":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never true on the standby: {sql}")
