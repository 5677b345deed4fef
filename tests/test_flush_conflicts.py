"""Two pods' flushes meeting the same pings in opposite orders (a phone's retry landing on
another pod while the first attempt is still being committed): PostgreSQL ends the deadlock
by aborting one of them. That flush is retried at once, on the same connections; it is not a
database outage."""

from __future__ import annotations

from datetime import UTC, datetime

from .conftest import against_another_pod, auth, batch, now_ms
from .test_ops import Delta, scrape

PING = "/api/v1/tracking/ping"
_INSERT = """INSERT INTO "TripLocation"
    ("tripId", "driverId", "orgId", "latitude", "longitude", "timestamp", "batchId")
    VALUES ($1, 'drv_1', 'org_1', 12.9, 77.5, $2, 'other-pod')"""


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def test_a_flush_aborted_to_end_a_deadlock_is_retried_without_an_outage(client, db, database):
    """The other pod has stored t_x's ping (uncommitted) and goes on to t_y's; this pod's flush
    stores t_y's, then waits for t_x's. PostgreSQL aborts this flush after deadlock_timeout
    (the other side waits longer). Before, that counted as a failed flush: every pooled
    connection of the pod dropped, a backoff, /readyz 503 meanwhile. Now it is counted as a
    conflict and retried: the other pod's rows are there, so both pings are duplicates."""
    start = now_ms(-600)
    for trip in ("t_x", "t_y"):  # the trips exist: no claim for the flush to wait on
        r = await client.post(PING, json=batch(1, trip=trip, start_ms=start), headers=auth())
        assert r.status == 200, await r.text()
    ts = start + 5000
    await db.execute("SET deadlock_timeout = '60s'")  # so this side is not the one aborted
    before = await scrape(client)
    answers = await against_another_pod(
        client, db, database,
        lambda: db.execute(_INSERT, "t_x", _at(ts)),
        lambda: db.execute(_INSERT, "t_y", _at(ts)),  # waits until PostgreSQL aborts the flush
        client.post(PING, json=batch(1, trip="t_y", start_ms=ts), headers=auth()),
        client.post(PING, json=batch(1, trip="t_x", start_ms=ts), headers=auth()),
    )  # fmt: skip
    acks = [(r.status, (await r.json())["duplicates"]) for r in answers]
    assert acks == [(200, 1), (200, 1)]
    delta = Delta(before, await scrape(client))
    assert delta("ingest_db_errors_total", operation="flush_conflict") == 1
    assert delta("ingest_db_errors_total", operation="flush") == 0
    stored = await db.fetchval(
        """SELECT count(*) FROM "TripLocation" WHERE "timestamp" = $1""", _at(ts)
    )
    assert stored == 2
