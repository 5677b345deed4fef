"""Clock trouble: phones whose clocks are hours off, and batches that arrive out of order."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

from ..conftest import token
from .conftest import service_env
from .load import Batch, Fleet, audit, now_ms, parse_ms, report

MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def dispatcher(fleet: Fleet) -> dict[str, str]:
    return {"Authorization": f"Bearer {token('dispatcher', 'disp-1', fleet.org)}"}


async def latest_ms(fleet: Fleet, url: str, trip: str) -> int | None:
    assert fleet.session is not None
    async with fleet.session.get(
        f"{url}/api/v1/tracking/trips/{trip}/latest", headers=dispatcher(fleet)
    ) as r:
        if r.status == 404:
            return None
        assert r.status == 200, await r.text()
        assert r.headers["Cache-Control"] == "no-store"
        return parse_ms((await r.json())["location"]["timestamp"])


async def history_ms(fleet: Fleet, url: str, trip: str) -> list[int]:
    assert fleet.session is not None
    out: list[int] = []
    params = {"limit": "100"}
    while True:
        async with fleet.session.get(
            f"{url}/api/v1/tracking/trips/{trip}/locations", params=params,
            headers=dispatcher(fleet),
        ) as r:  # fmt: skip
            assert r.status == 200, await r.text()
            page = await r.json()
        out += [parse_ms(loc["timestamp"]) for loc in page["locations"]]
        if not page["nextCursor"]:
            return out
        params["cursor"] = page["nextCursor"]


async def send(fleet: Fleet, b: Batch) -> Batch:
    await fleet.deliver(b)
    return b


async def test_clock_skew_and_out_of_order_batches(services, shared_env, database):
    svc = await services(shared_env())
    async with Fleet([svc.url], name="clock", drivers=3, give_up_s=20) as fleet:
        now = now_ms()
        # Phone 0, clock 3 hours ahead: its pings from the future are refused, with a reason,
        # and the good pings of the same batch are kept.
        good = [now - MINUTE + i * 1000 for i in range(5)]
        mixed = await send(
            fleet, fleet.batch_of(0, good + [now + 3 * HOUR + i for i in range(3)], 5)
        )
        assert mixed.ack is not None and mixed.ack.status == 200, mixed.attempts
        assert mixed.ack.body["accepted"] == 5
        rejected = mixed.ack.body["rejected"]
        assert [r["index"] for r in rejected] == [5, 6, 7]
        assert all("timestamp" in r["reason"] for r in rejected), rejected
        ahead = await send(
            fleet, fleet.batch_of(0, [now + 3 * HOUR + 10_000 + i for i in range(4)], 0)
        )
        assert ahead.final is not None and ahead.final.status == 422, ahead.attempts
        assert [r["index"] for r in ahead.final.body["rejected"]] == [0, 1, 2, 3]
        # A clock a minute ahead is within the allowed skew; 40 days behind is too old.
        skew_ok = await send(fleet, fleet.batch_of(0, [now + MINUTE]))
        assert skew_ok.ack is not None and skew_ok.ack.body["accepted"] == 1
        too_old = await send(fleet, fleet.batch_of(0, [now - 40 * DAY], 0))
        assert too_old.final is not None and too_old.final.status == 422
        assert "timestamp" in too_old.final.body["rejected"][0]["reason"]

        # Phone 1, clock 2 hours behind: inside the accepted window, stored as sent.
        behind = await send(
            fleet, fleet.batch_of(1, [now - 2 * HOUR + i * 1000 for i in range(10)])
        )
        assert behind.ack is not None and behind.ack.body["accepted"] == 10

        # Phone 2: 24 consecutive batches uploaded in a shuffled order, three at a time (a
        # phone emptying its offline queue over several connections). The latest location
        # only ever moves forward, whatever order the batches land in.
        trip = fleet.trips[2]
        base = now - 30 * MINUTE
        chunks = [[base + (k * 10 + i) * 1000 for i in range(10)] for k in range(24)]
        order = list(range(24))
        random.Random(9).shuffle(order)
        seen: list[int] = []
        newest_acked = 0
        lagging = 0
        for w in range(0, 24, 3):
            wave = [fleet.batch_of(2, chunks[k]) for k in order[w : w + 3]]
            await asyncio.gather(*(fleet.deliver(b) for b in wave))
            assert all(b.ack is not None and b.ack.status == 200 for b in wave)
            newest_acked = max(newest_acked, *(max(b.stamps) for b in wave))
            ts = await latest_ms(fleet, svc.url, trip)
            assert ts is not None
            seen.append(ts)
            lagging += ts < newest_acked
        end = time.monotonic() + 3
        while (final := await latest_ms(fleet, svc.url, trip)) != newest_acked:
            assert time.monotonic() < end, (final, newest_acked)
            await asyncio.sleep(0.05)
        history = await history_ms(fleet, svc.url, trip)

    a = await audit(database, fleet)
    backwards = sum(1 for x, y in itertools.pairwise(seen) if y < x)
    report(
        "clock_trouble", a, future_rejected=3 + 4, too_old_rejected=1,
        latest_reads=len(seen), latest_backwards=backwards, latest_lagging_acks=lagging,
        history_in_order=history == sorted(history),
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0 and a.count_mismatches == 0
    assert a.acked == a.stored == 5 + 1 + 10 + 240
    assert backwards == 0, seen
    assert history == [ts for chunk in chunks for ts in chunk]  # every ping, in time order


async def test_latest_does_not_go_back_after_redis_lost_its_data(
    private_redis, services, database, redis_prefix
):
    """Redis restarted without persistence (or failed over to an empty replica, or the key's
    TTL ran out while the trip was idle): a late upload of older pings must still not
    replace the newer location that PostgreSQL holds."""
    svc = await services(service_env(database, private_redis.url, redis_prefix))
    async with Fleet([svc.url], name="latest-redis", drivers=1) as fleet:
        now = now_ms()
        trip = fleet.trips[0]
        newer = await send(
            fleet, fleet.batch_of(0, [now - 5 * MINUTE + i * 1000 for i in range(5)])
        )
        assert newer.ack is not None
        newest = max(newer.stamps)
        end = time.monotonic() + 3
        while await latest_ms(fleet, svc.url, trip) != newest:
            assert time.monotonic() < end
            await asyncio.sleep(0.05)

        await asyncio.to_thread(private_redis.stop)
        await asyncio.to_thread(private_redis.start)
        assert await latest_ms(fleet, svc.url, trip) == newest  # from PostgreSQL
        late = await send(
            fleet, fleet.batch_of(0, [now - 20 * MINUTE + i * 1000 for i in range(5)])
        )
        assert late.ack is not None
        await asyncio.sleep(1.0)  # the late batch's publish has run
        after = await latest_ms(fleet, svc.url, trip)
    report(
        "latest_after_redis_loss", None, newest=newest, late_newest=max(late.stamps),
        latest_after=after, went_back=after != newest,
    )  # fmt: skip
    assert after == newest, (
        f"latest went back by {(newest - (after or 0)) / 60_000:.1f} min after Redis lost its keys"
    )
