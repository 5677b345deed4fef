"""The per-driver rate limit (ingest/ratelimit.py): 429 with Retry-After, one bucket per
driver of each org."""

from __future__ import annotations

from .conftest import PING, auth, batch


async def test_per_driver_rate_limit_is_429_with_retry_after(make_client):
    client = await make_client(rate_limit_per_s=0.5, rate_limit_burst=2)
    for _ in range(2):
        assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    resp = await client.post(PING, json=batch(1), headers=auth())
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"  # one token every 2 s
    assert await resp.json() == {
        "error": "rate_limited",
        "detail": "too many requests for this driver",
    }
    other = await client.post(
        PING, json=batch(1, trip="trip_2", driver="drv_2"), headers=auth("driver", "drv_2")
    )
    assert other.status == 200


async def test_rate_limit_buckets_are_per_org(make_client):
    """Driver ids are unique within an org only: org_2's drv_1 has a bucket of its own."""
    client = await make_client(rate_limit_per_s=0.5, rate_limit_burst=1)
    assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    resp = await client.post(PING, json=batch(1), headers=auth("driver", "drv_1", "org_2"))
    assert resp.status == 200
