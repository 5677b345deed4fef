"""Trip-owner expiry (maintenance.expire_trips, 8a251bf) against the ownership promise of
docs/tenancy.md: "From the handover's 200 on, no pod stores a ping of the old driver"."""

from __future__ import annotations

from datetime import UTC, date, datetime

from ingest import maintenance
from ingest.partitions import add_months, month_start

from .conftest import auth, batch

PING = "/api/v1/tracking/ping"
HANDOVER = "/api/v1/tracking/trips/{}/driver"


def _months_ago(n: int) -> datetime:
    d: date = add_months(month_start(datetime.now(UTC)), -n)
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


async def test_a_handover_is_not_undone_by_trip_expiry(make_client, make_settings, db):
    """A device trip idle for longer than the retention (its pings were dropped with their
    months) is handed over to drv_2: 200. The next maintenance run must not forget drv_2,
    or the old driver (or any driver of the org) posting first owns the trip again.

    Fails on 8a251bf: expire_trips looks at "createdAt" only (the trip's first claim), so the
    owner a dispatcher has just set is deleted, and drv_1's next post is stored (200)."""
    client = await make_client()
    r = await client.post(PING, json=batch(2, trip="truck_12"), headers=auth())
    assert r.status == 200, await r.text()
    # Months later: its pings went with their partitions, the trip row is old.
    await db.execute(
        """UPDATE "IngestTrip" SET "createdAt" = $1 WHERE "orgId" = 'org_1'
           AND "tripId" = 'truck_12'""",
        _months_ago(3),
    )
    await db.execute("""DELETE FROM "TripLocation" WHERE "tripId" = 'truck_12'""")

    r = await client.put(
        HANDOVER.format("truck_12"),
        json={"driverId": "drv_2"},
        headers=auth("dispatcher", "disp_1", "org_1"),
    )
    assert r.status == 200, await r.text()

    await maintenance.run_once(db, make_settings(retention_months=2))

    owner = await db.fetchval(
        """SELECT "driverId" FROM "IngestTrip" WHERE "orgId" = 'org_1' AND "tripId" = 'truck_12'"""
    )
    assert owner == "drv_2", "the owner set by the handover was forgotten by maintenance"
    # The driver the dispatcher took the trip from is refused, as after any handover.
    r = await client.post(PING, json=batch(1, trip="truck_12"), headers=auth())
    assert r.status == 403, await r.text()
