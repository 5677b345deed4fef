"""Attacks on issue 13 (org-scoped dedup, trip ownership, migration 003), black-box.

Each test is a finding: it fails against the code it was written for and passes once the
one-line fix named in its docstring is made. The promises attacked: what we acknowledge is
stored exactly once; each org sees only its own; a trip's owner alone may post to it; the
migration moves rows in place with no downtime beyond a short lock.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from devtools.services import PrivatePostgres
from ingest import partitions
from ingest.migrate import SQL_DIR, migrate, prepare_003

from .conftest import auth, batch, db_url, in_one_flush, iso, now_ms, token
from .old_schema import old_schema_database

Client = TestClient[web.Request, web.Application]
Factory = Callable[..., Awaitable[Client]]

PING = "/api/v1/tracking/ping"
OWNTRACKS = "/api/v1/ingest/owntracks"
A = "org_a"


async def post(client: Client, body: dict[str, Any], org: str = A) -> tuple[int, dict[str, Any]]:
    resp = await client.post(PING, json=body, headers=auth("driver", body["driverId"], org))
    return resp.status, await resp.json()


async def rows(db: asyncpg.Connection, trip: str, org: str = A) -> int:
    n: int = await db.fetchval(
        'SELECT count(*) FROM "TripLocation" WHERE "orgId" = $1 AND "tripId" = $2', org, trip
    )
    return n


async def hold_batch_claim(
    conn: asyncpg.Connection, org: str, body: dict[str, Any]
) -> asyncpg.transaction.Transaction:
    """Claim ``body``'s batch id in a transaction left open: the flush of that batch then
    waits at its own batch-id claim, inside its transaction, until this one ends."""
    tx = conn.transaction()
    await tx.start()
    await conn.execute(
        'INSERT INTO "IngestBatch" ("orgId", "driverId", "batchId") VALUES ($1, $2, $3)',
        org, body["driverId"], body["batchId"],
    )  # fmt: skip
    return tx


async def until_a_flush_waits(watcher: asyncpg.Connection, tries: int = 250) -> bool:
    """Whether some transaction came to wait for another's (the held flush) within the tries."""
    for _ in range(tries):
        if await watcher.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
        ):
            return True
        await asyncio.sleep(0.02)
    return False


# -- the lost COMMIT, resolved by a transaction id another transaction can be given -----------


async def test_a_flush_cut_by_a_crash_is_never_acknowledged_unless_stored(
    make_client: Factory, private_postgres: PrivatePostgres
) -> None:
    """HIGH. A flush whose server crashes (or fails over) mid-transaction is resolved by
    pg_xact_status(xid). After the crash the xid was never written to the WAL, so the
    restarted server (or the promoted replica) hands the same number to the next
    transactions; once one of them commits, the flusher reads "committed" and answers 200
    for pings that were never stored (a client then deletes them).

    Fix: resolve by something the flush itself wrote (e.g. its IngestBatch claim or a
    flush-id row), or at least treat "transaction ID is in the future" as aborted."""
    pg = private_postgres
    client = await make_client(
        database_url=pg.url, ack_timeout_ms=60_000, flush_retry_min_ms=50,
        flush_retry_max_ms=200,
    )  # fmt: skip
    warm = batch(1, "trip_1", "drv_1", now_ms(-900))
    assert (await post(client, warm, "org_1"))[0] == 200  # trip claimed, pool warm
    body = batch(3, "trip_1", "drv_1", now_ms(-600))
    # Hold the flush inside its transaction (xid assigned, nothing written to the WAL yet):
    # an uncommitted claim of the same batch id makes its batch-id INSERT wait.
    blocker = await asyncpg.connect(pg.url)
    await hold_batch_claim(blocker, "org_1", body)
    request = asyncio.ensure_future(post(client, body, "org_1"))
    watcher = await asyncpg.connect(pg.url)
    waiting = await until_a_flush_waits(watcher, tries=200)
    assert waiting, "the flush never reached its batch-id claim"
    await watcher.close()

    await asyncio.to_thread(pg.stop, "immediate")  # the crash
    blocker.terminate()
    await asyncio.to_thread(pg.start)
    # The restarted server's next transactions (other pods' flushes, a handover, anything).
    busy = await asyncpg.connect(pg.url)
    try:
        for _ in range(200):
            await busy.fetchval("SELECT pg_current_xact_id()")
            if request.done():
                break
            await asyncio.sleep(0.01)
        status, answer = await asyncio.wait_for(request, 30)
        stored = await busy.fetchval(
            'SELECT count(*) FROM "TripLocation" WHERE "batchId" = $1', body["batchId"]
        )
    finally:
        await busy.close()
    assert status in (200, 503), answer
    if status == 200:  # acknowledged: then every ping of it is stored, once
        assert (answer["accepted"], answer["duplicates"], stored) == (3, 0, 3), (answer, stored)


# -- the per-driver trip limit -----------------------------------------------------------------


async def test_buffered_acks_do_not_keep_acknowledging_a_driver_over_its_trip_limit(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """MEDIUM. ACK_MODE=buffered: a driver past MAX_TRIPS_PER_DRIVER_PER_DAY (an honest one:
    a courier with many short trips) is answered 202 for every batch of a new trip, and the
    flush drops every one of them (429 too_many_trips), with no bound: the owner cache only
    remembers owners, so no later request waits for its flush. tenancy.md promises at most
    one such 202 per trip and pod every OWNER_CACHE_TTL_S.

    Fix: remember a too_many_trips refusal per (org, driver) in the OwnerCache like an owner,
    so the next request of that driver for a new trip waits for its flush and gets the 429."""
    client = await make_client(ack_mode="buffered", max_trips_per_driver_per_day=1)
    assert (await post(client, batch(1, "trip_0", "drv_1", now_ms(-900))))[0] == 202
    first = batch(2, "trip_1", "drv_1", now_ms(-800))
    assert (await post(client, first))[0] == 202  # the one 202 the design allows
    for _ in range(100):  # its flush done (and refused)
        if await rows(db, "trip_0") == 1:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert await rows(db, "trip_1") == 0  # dropped: the driver is over its limit
    answers = [await post(client, batch(2, "trip_1", "drv_1", now_ms(-700 + i))) for i in range(3)]
    await asyncio.sleep(0.3)
    assert await rows(db, "trip_1") == 0
    # Acknowledged again and again, and lost each time: each should be the 429.
    assert [s for s, _ in answers] == [429, 429, 429], answers


async def test_a_driver_over_its_trip_limit_does_not_refuse_another_drivers_new_trip(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """LOW. Two drivers start the same new trip in one flush (one pod, or a retry landing
    with a colleague's first ping). The first request names the starter; that driver is
    over its daily limit, so nobody claims the trip and the second driver, well under its
    limit, is refused too, told "this driver started 1 trips in the last 24 hours".

    Fix (store._owners): pick as starter of a new trip the first request whose driver is
    still under its limit, not the first request."""
    client = await make_client(max_trips_per_driver_per_day=1)
    assert (await post(client, batch(1, "trip_0", "drv_1", now_ms(-900))))[0] == 200
    over, (status, answer) = await in_one_flush(
        client, post(client, batch(1, "trip_9", "drv_1", now_ms(-800))),
        post(client, batch(1, "trip_9", "drv_2", now_ms(-700))),
    )  # fmt: skip
    assert over[0] in (403, 429)
    assert (status, answer.get("accepted")) == (200, 1), answer
    assert await rows(db, "trip_9") == 1


async def test_two_pods_cannot_start_more_trips_than_the_daily_limit_together(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """LOW. The limit is counted, not locked: two pods' flushes of the same driver each count
    the trips committed so far, neither sees the other's uncommitted claim, and both claim.
    A leaked token sprayed over P pods starts up to P times MAX_TRIPS_PER_DRIVER_PER_DAY
    trips (more, with flushes held up), undoing the fleet-crowding bound of tenancy.md.

    Fix (store._owners): take pg_advisory_xact_lock(hashtext(org), hashtext(driver)) for
    each starting driver (sorted) before _TRIPS_STARTED, so counting and claiming are one."""
    pod1 = await make_client(max_trips_per_driver_per_day=1)
    pod2 = await make_client(max_trips_per_driver_per_day=1)
    first = batch(1, "trip_a", "drv_1", now_ms(-900))
    # Pod 1's flush held up after it claimed trip_a (as a concurrent claim of the same batch
    # id, a lock, a slow disk would): an uncommitted claim of its batch id.
    blocker = await hold_batch_claim(db, A, first)
    held = asyncio.ensure_future(post(pod1, first))
    watcher = await asyncpg.connect(db_url(await db.fetchval("SELECT current_database()")))
    try:
        await until_a_flush_waits(watcher)
        # Meanwhile the same driver starts another trip through pod 2.
        second = asyncio.ensure_future(post(pod2, batch(1, "trip_b", "drv_1", now_ms(-800))))
        await asyncio.sleep(0.5)
        await blocker.rollback()
        answers = [await held, await second]
        started = await watcher.fetchval(
            'SELECT count(*) FROM "IngestTrip" WHERE "orgId" = $1 AND "driverId" = $2',
            A, "drv_1",
        )  # fmt: skip
    finally:
        await watcher.close()
    assert sorted(s for s, _ in answers) == [200, 429], answers
    assert started == 1


async def test_after_a_handovers_200_the_old_driver_stores_nothing(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """LOW. The flush reads trip owners with a plain SELECT: a handover neither waits for
    the flushes that read the old owner nor makes them recheck. tenancy.md calls the window
    "one flush, milliseconds", but it is as long as a flush can be held up after its read
    (a lock wait on a concurrent batch-id claim here, up to FLUSH_TIMEOUT_S, or more): the
    dispatcher is told 200, then the old driver's batch is stored and acknowledged 200.

    Fix (store._OWNERS + trips_api): read the owners of existing trips FOR SHARE (a separate
    query on "IngestTrip"), so a handover's UPDATE waits for the flushes that read the old
    owner and answers 200 only once they are committed."""
    client = await make_client()
    assert (await post(client, batch(1, "trip_1", "drv_1", now_ms(-900))))[0] == 200
    late = batch(2, "trip_1", "drv_1", now_ms(-800))
    blocker = await hold_batch_claim(db, A, late)
    held = asyncio.ensure_future(post(client, late))  # past its ownership read, then held
    watcher = await asyncpg.connect(db_url(await db.fetchval("SELECT current_database()")))

    async def hand_over() -> int:
        resp = await client.put(
            "/api/v1/tracking/trips/trip_1/driver", json={"driverId": "drv_2"},
            headers=auth("dispatcher", "disp_1", A),
        )  # fmt: skip
        assert resp.status == 200, await resp.text()
        n: int = await watcher.fetchval(
            'SELECT count(*) FROM "TripLocation" WHERE "driverId" = $1', "drv_1"
        )
        return n  # the old driver's rows when the dispatcher is told the trip is handed over

    try:
        await until_a_flush_waits(watcher)
        handover = asyncio.ensure_future(hand_over())
        await asyncio.sleep(0.5)
        await blocker.rollback()
        at_handover = await handover
        status, _ = await held
        after = await watcher.fetchval(
            'SELECT count(*) FROM "TripLocation" WHERE "driverId" = $1', "drv_1"
        )
    finally:
        await watcher.close()
    assert after == at_handover, (status, at_handover, after)


# -- the poison path -----------------------------------------------------------------------------


async def test_a_replayed_ping_beside_a_ping_of_a_missing_partition_is_not_a_500(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """LOW. A resend of 1000+ stored pings with one more ping in a month without a
    partition (MAX_PINGS_PER_BATCH raised above 1000, as operators may): COPY routes each
    row as it reads it but meets the unique guard only when it inserts a buffer of 1000
    rows, so the duplicate fails first; the fallback INSERT then fails for the missing
    partition. That CheckViolation is raised inside the UniqueViolation handler, so
    store.commit never turns it into MissingPartition: flush.py takes it for poison and
    answers 500, on every resend, until some other batch creates the partition.

    Fix (store.commit): catch the "no partition" CheckViolation around _insert_new_only too
    and raise MissingPartition, as for the COPY."""
    client = await make_client(max_ping_age_days=40, max_pings_per_batch=2000)
    this_month = partitions.month_start(datetime.now(UTC))
    old = datetime(this_month.year, this_month.month, 1, tzinfo=UTC) - timedelta(hours=1)
    # COPY routes each row to its partition as it reads it, but inserts (and meets the
    # unique guard) by 1000 rows: a resend of 1000 pings fills one such buffer first.
    trip, driver = "trip_1", "drv_1"
    first = batch(1000, trip, driver, now_ms(-1500))
    assert (await post(client, first))[0] == 200
    await db.execute(f'DROP TABLE "{partitions.partition_name(partitions.month_start(old))}"')
    resend = batch(1, trip, driver, now_ms(-600))
    resend["locations"] = first["locations"] + [
        {**first["locations"][0], "timestamp": iso(int(old.timestamp() * 1000))}
    ]
    status, answer = await post(client, resend)
    assert (status, answer.get("accepted"), answer.get("duplicates")) == (200, 1, 1000), answer
    assert await rows(db, trip) == 1001


async def test_a_device_id_that_is_not_utf8_is_a_400_not_a_500(
    make_client: Factory, db: asyncpg.Connection
) -> None:
    """LOW. OwnTracks' X-Limit-D header is read by aiohttp as UTF-8 with surrogateescape:
    bytes that are not UTF-8 become lone surrogates, pass ident() and only fail when asyncpg
    encodes the trip id, inside the flush: a DataError, taken for poison, so the request is
    answered 500 (the app retries it forever) and the whole flush it shared, every org's
    requests, is re-committed one request at a time.

    Fix (phone_apps.common.ident): refuse a value that does not encode to UTF-8 (400)."""
    client = await make_client()
    tok = token("driver", "drv_1", A)
    basic = base64.b64encode(f"drv_1:{tok}".encode()).decode()
    msg = json.dumps({"_type": "location", "lat": 1.0, "lon": 2.0, "tst": now_ms(-600) // 1000})
    raw = (
        (
            f"POST {OWNTRACKS} HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {basic}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(msg)}\r\n"
            "Connection: close\r\n"
        ).encode()
        + b"X-Limit-D: phone\xff\xfe\r\n\r\n"
        + msg.encode()
    )
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(raw)
        head = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n", 1)[0]
    finally:
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 400"), head
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


# -- migration 003 -------------------------------------------------------------------------------

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
MANY = 20_000  # stands for a production table: what matters is what is read, not how long


@pytest.fixture
async def old_db(tmp_path: Path) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A database migrated to 002 only (before tenancy), with this month's partition, and
    its URL."""
    async with old_schema_database(tmp_path) as (conn, url):
        # The rows reach MANY ms before T0, which may be last month.
        await partitions.ensure(
            conn, {partitions.month_start(T0 - timedelta(milliseconds=m)) for m in (0, MANY)}
        )
        await conn.execute(
            """INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude",
               "longitude", "timestamp", "batchId")
               SELECT 'org_' || (i % 3), 'trip_' || (i % 500), 'drv_' || (i % 500), 1, 2,
                      $1::timestamptz - i * interval '1 ms', 'b_' || (i / 10)
               FROM generate_series(1, $2) AS i""",
            T0, MANY,
        )  # fmt: skip
        await conn.execute(
            """INSERT INTO "IngestBatch" ("driverId", "batchId")
               SELECT 'drv_' || (i % 500), 'b_' || (i / 10) FROM generate_series(1, 200) AS i
               ON CONFLICT DO NOTHING"""
        )
        await conn.execute('ANALYZE "TripLocation"')
        yield conn, url


async def test_003_reads_no_table_scan_under_its_exclusive_lock(
    old_db: tuple[asyncpg.Connection, str],
) -> None:
    """MEDIUM (operators). tenancy.md: the slow work runs before the transaction, "what is
    left here takes short locks: no scan". But the transaction first takes ACCESS EXCLUSIVE
    on "TripLocation" (SET NOT NULL, ATTACH, DROP CONSTRAINT) and only then backfills
    "IngestBatch" (a DISTINCT over every row with a batch id, a GROUP BY over every row) and
    "IngestTrip" (a DISTINCT ON over every row): three passes over the whole table while no
    flush can write and no read can run. On a production table that is minutes to hours of
    ingest outage, not "a short lock".

    Fix (sql/003 + prepare_003): create and fill "IngestTrip" and the IngestBatch orgs in
    prepare_003, before the lock, leaving the transaction only the rows since."""
    conn, _ = old_db
    # What migrate() does for 003: prepare_003, then the file in one transaction.
    sql = (SQL_DIR / "003_org_scoped_keys.sql").read_text()
    await prepare_003(conn, sql)
    tuples_read = """SELECT sum(seq_tup_read + coalesce(idx_tup_fetch, 0))
                     FROM pg_stat_xact_user_tables WHERE relname LIKE 'TripLocation%'"""
    async with conn.transaction():
        # (counts not yet reported, from prepare_003, are there already: subtract them)
        before = await conn.fetchval(tuples_read)
        await conn.execute(sql)
        locked = await conn.fetchval(
            """SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND granted
               AND mode = 'AccessExclusiveLock' AND relation = '"TripLocation"'::regclass"""
        )
        read = await conn.fetchval(tuples_read) - before
        # (rolled back: only what the transaction did is measured)
        assert locked == 1
        assert read < MANY // 10, f"{read} rows of {MANY} read under ACCESS EXCLUSIVE"


async def test_003_waiting_for_its_lock_does_not_stop_ingest(
    old_db: tuple[asyncpg.Connection, str],
) -> None:
    """MEDIUM (operators). The transaction asks for ACCESS EXCLUSIVE on "TripLocation" with
    no lock_timeout. Any open reader (a GPX export streaming a long trip, a history page on
    the primary, an analyst's session) makes it wait, and every flush queues behind that
    waiting request: ingest stops for as long as the longest reader, though the migration
    has not even started its work.

    Fix (migrate.py): SET LOCAL lock_timeout (a second or two) in the migration's
    transaction and retry it after a pause when it expires."""
    conn, url = old_db
    sql = (SQL_DIR / "003_org_scoped_keys.sql").read_text()
    await prepare_003(conn, sql)  # the concurrent part, done: only the transaction is left
    reader = await asyncpg.connect(url)
    writer = await asyncpg.connect(url)
    task: asyncio.Task[list[str]] | None = None
    try:
        export = reader.transaction()
        await export.start()
        await reader.fetchval('SELECT count(*) FROM "TripLocation"')  # a long read, open
        task = asyncio.ensure_future(migrate(conn))
        for _ in range(250):
            waiting = await writer.fetchval(
                """SELECT count(*) FROM pg_locks WHERE NOT granted
                   AND mode = 'AccessExclusiveLock'"""
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        # A flush's INSERT, while the reader goes on: it must not wait for the reader.
        await writer.execute("SET statement_timeout = '4s'")
        try:
            await writer.execute(
                """INSERT INTO "TripLocation" ("orgId", "tripId", "driverId", "latitude",
                   "longitude", "timestamp") VALUES ('org_0', 'new', 'drv_0', 1, 2, $1)""",
                T0 + timedelta(minutes=1),
            )  # fmt: skip
            blocked = False
        except asyncpg.QueryCanceledError:
            blocked = True
        await export.rollback()
        assert "003_org_scoped_keys.sql" in await asyncio.wait_for(task, 30)
        assert not blocked, "ingest waited behind the migration's lock request"
    finally:
        if task is not None and not task.done():
            await reader.close()
            await asyncio.wait([task], timeout=30)
        await reader.close()
        await writer.close()
