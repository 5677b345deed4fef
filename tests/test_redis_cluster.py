"""REDIS_MODE=cluster against a real 3-master Redis Cluster started by the test.

The live contract tests of test_live, test_tenancy and test_ws run here again, unchanged,
with every app of the test on the cluster (this module's ``make_settings``); the tests below
them check what is the cluster's own: hash tags, per-master calls, sharded channels, pods
sharing the live stream through it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from devtools.redis_cluster import PrivateRedisCluster
from ingest.fanout_cluster import ShardedFanout
from ingest.keyspace import ClusterKeyspace, Keyspace, keyspace
from ingest.settings import Settings, SettingsError, load_settings
from ingest.typedefs import FANOUT, LIVE

from .conftest import (
    SECRET,
    auth,
    batch,
    in_one_flush,
    now_ms,
    quiet,
    subscribed,
    token,
    ws_connect,
)
from .test_geofences import (
    test_consecutive_batches_on_two_pods_make_each_event_once,
    test_events_go_live_to_the_fleet_subscribers_of_the_org_only,
)
from .test_live import (
    test_a_live_trip_is_never_pruned,
    test_fleet_and_trip_subscription_deliver_once,
    test_fleet_subscriber_sees_only_its_org,
    test_history_pages_across_a_month_boundary,
    test_latest_never_moves_backwards,
    test_message_is_encoded_once_whatever_the_subscribers,
    test_old_trips_leave_the_fleet_and_geo_sets_a_bounded_number_per_flush,
    test_pruning_one_org_never_touches_another_with_the_same_trip_ids,
    test_subscriber_gets_exactly_the_committed_pings_of_its_trips,
)
from .test_nearby import (
    test_a_silent_truck_is_left_out_and_never_brought_back_by_a_late_upload,
    test_a_truck_moves_and_a_late_upload_never_moves_it_back,
    test_nearby_answers_the_same_once_old_trips_are_pruned,
    test_nearest_first_within_the_radius_and_limit,
    test_two_orgs_with_the_same_ids_see_only_their_own_trucks,
)
from .test_tenancy import (
    test_future_timestamps_cannot_crowd_a_truck_out_of_the_fleet_snapshot,
    test_org_b_with_the_same_ids_never_touches_org_a,
    test_org_ids_with_a_colon_do_not_meet_in_redis,
    test_reads_of_another_org_answer_like_an_unknown_trip,
)
from .test_ws import test_websocket_subscribers_see_only_their_org

CONTRACT = [
    test_fleet_and_trip_subscription_deliver_once,
    test_fleet_subscriber_sees_only_its_org,
    test_history_pages_across_a_month_boundary,
    test_latest_never_moves_backwards,
    test_message_is_encoded_once_whatever_the_subscribers,
    test_subscriber_gets_exactly_the_committed_pings_of_its_trips,
    test_old_trips_leave_the_fleet_and_geo_sets_a_bounded_number_per_flush,
    test_pruning_one_org_never_touches_another_with_the_same_trip_ids,
    test_a_live_trip_is_never_pruned,
    test_future_timestamps_cannot_crowd_a_truck_out_of_the_fleet_snapshot,
    test_org_b_with_the_same_ids_never_touches_org_a,
    test_org_ids_with_a_colon_do_not_meet_in_redis,
    test_reads_of_another_org_answer_like_an_unknown_trip,
    test_websocket_subscribers_see_only_their_org,
    test_a_silent_truck_is_left_out_and_never_brought_back_by_a_late_upload,
    test_a_truck_moves_and_a_late_upload_never_moves_it_back,
    test_nearest_first_within_the_radius_and_limit,
    test_two_orgs_with_the_same_ids_see_only_their_own_trucks,
    test_nearby_answers_the_same_once_old_trips_are_pruned,
    test_consecutive_batches_on_two_pods_make_each_event_once,
    test_events_go_live_to_the_fleet_subscribers_of_the_org_only,
]
PING = "/api/v1/tracking/ping"
LATEST = "/api/v1/tracking/trips/{}/latest"


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    with PrivateRedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def make_settings(
    database: str, redis_prefix: str, redis_cluster: PrivateRedisCluster
) -> Callable[..., Settings]:
    """Every app of this module's tests on the cluster."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "database_url": database, "redis_url": redis_cluster.url, "redis_mode": "cluster",
            "redis_prefix": redis_prefix, "jwt_secret": SECRET, "flush_interval_ms": 20,
            "rate_limit_per_s": 1000, "rate_limit_burst": 1000, "geofence_settle_ms": 0,
        }  # fmt: skip
        base.update(overrides)
        return load_settings({}, **base)

    return make


@pytest.fixture
async def cluster_client(redis_cluster: PrivateRedisCluster) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    yield client
    await client.aclose()


def test_the_contract_tests_run_here_on_the_cluster() -> None:
    """Each imported contract test is collected in this module, so on the cluster."""
    here = globals()
    assert all(here[t.__name__] is t for t in CONTRACT)


async def test_the_app_really_runs_on_the_cluster(client) -> None:
    app = client.server.app
    assert isinstance(app[LIVE].redis, RedisCluster)
    assert isinstance(app[FANOUT], ShardedFanout)
    await asyncio.wait_for(app[FANOUT].connected.wait(), 5)
    assert len(app[FANOUT].shards) == 3


# -- names -----------------------------------------------------------------------------------


def test_every_name_of_a_trip_shares_one_slot_and_an_org_spreads_over_many() -> None:
    keys = ClusterKeyspace("ingest:", 16)
    for org, trip in [("org_1", "t1"), ("a{b}:c", "x}{y"), ("", "{}"), ("%3A", ":")]:
        names = [
            keys.latest(org, trip), keys.trip_channel(org, trip), keys.fleet_set(org, trip),
            keys.fleet_channel(org, trip), keys.geo_set(org, trip),
        ]  # fmt: skip
        assert len({key_slot(n.encode()) for n in names}) == 1, names
        assert keys.names(org, trip) == tuple(names)
        bucket = zlib.crc32(trip.encode()) % 16
        assert keys.fleet_set(org, trip) == keys.fleet_sets(org)[bucket]
        geo, fleet, latest_prefix, swept = keys.nearby_sets(org)[bucket]
        assert (geo, fleet, latest_prefix + trip) == (
            keys.geo_set(org, trip), keys.fleet_set(org, trip), keys.latest(org, trip),
        )  # fmt: skip
        assert key_slot(swept.encode()) == key_slot(geo.encode())
        assert keys.fleet_channel(org, trip) == keys.fleet_subscriptions(org)[bucket]
    plain = Keyspace("ingest:")
    for org, trip in [("org_1", "t1"), ("a:b", "c"), (None, "t")]:
        assert plain.names(org, trip) == (
            plain.latest(org, trip),
            plain.trip_channel(org, trip),
            plain.fleet_set(org, trip),
            "",
            plain.geo_set(org, trip),
        )
        if org is not None:
            ((geo, fleet, latest_prefix, _),) = plain.nearby_sets(org)
            assert (geo, fleet, latest_prefix + trip) == (
                plain.geo_set(org, trip), plain.fleet_set(org, trip), plain.latest(org, trip),
            )  # fmt: skip
    slots = {key_slot(keys.latest("big_org", f"trip_{i}").encode()) for i in range(1000)}
    assert len(slots) == 16  # one org's trips over all its buckets, not one slot


def test_two_orgs_never_share_a_cluster_name() -> None:
    keys = ClusterKeyspace("p:", 4)
    pairs = [("a", "b:t"), ("a:b", "t"), ("a}", "t"), ("a", "}t"), ("a%3A", "t"), ("a:", "t")]
    names = [
        (keys.latest(o, t), keys.trip_channel(o, t), tuple(keys.fleet_subscriptions(o)))
        for o, t in pairs
    ]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert a[0] != b[0] and a[1] != b[1]
    fleets = {n[2] for n in names}
    assert len(fleets) == len({o for o, _ in pairs})


def test_cluster_mode_refuses_a_prefix_with_braces() -> None:
    with pytest.raises(SettingsError, match="REDIS_PREFIX"):
        load_settings({}, auth_disabled=True, redis_mode="cluster", redis_prefix="in{gest}:")
    standalone = load_settings({}, auth_disabled=True, redis_prefix="in{gest}:")
    assert keyspace(standalone.redis_mode, standalone.redis_prefix, 16).sharded is False


# -- the cluster's own behaviour ---------------------------------------------------------------


async def test_a_flush_spreads_over_the_masters_in_one_call_per_master(
    client, cluster_client: RedisCluster, redis_cluster: PrivateRedisCluster, monkeypatch
) -> None:
    live = client.server.app[LIVE]
    calls: list[str] = []
    per_update: list[list[str]] = []
    script, update = live._script, live._update
    errors: list[BaseException] = []

    async def counting_script(keys: list[str], args: list[object]) -> Any:
        calls.append(cluster_client.get_node_from_key(keys[0]).name)
        try:
            return await script(keys=keys, args=args)
        except BaseException as e:
            errors.append(e)
            raise

    async def counting_update(items: list[list[object]], trust_from_ms: int) -> Any:
        first = len(calls)
        try:
            return await update(items, trust_from_ms)
        finally:
            per_update.append(calls[first:])

    monkeypatch.setattr(live, "_script", counting_script)
    monkeypatch.setattr(live, "_update", counting_update)
    trips = [f"trip_{i}" for i in range(60)]
    start = now_ms(-60)
    # Concurrent requests share flushes.
    posts = [
        client.post(PING, json=batch(1, trip=t, start_ms=start), headers=auth()) for t in trips
    ]
    answers = await asyncio.gather(*posts)
    assert all(r.status == 200 for r in answers)
    for _ in range(100):
        if all([await live.latest("org_1", t) for t in trips]):
            break
        await asyncio.sleep(0.02)
    masters = {cluster_client.get_node_from_key(live.keys.latest("org_1", t)).name for t in trips}
    assert len(masters) == 3  # one org's latest keys on every master
    assert set(calls) == masters
    assert len(per_update) < len(trips)  # flushes were shared...
    assert not errors, errors  # the first flush already knew the slot map
    for nodes in per_update:  # ...and each called a master at most once
        assert len(nodes) == len(set(nodes)), per_update
    for t in trips[:5]:
        resp = await client.get(LATEST.format(t), headers=auth("dispatcher", "d", "org_1"))
        assert resp.status == 200 and (await resp.json())["tripId"] == t


async def test_websockets_across_two_pods_on_the_cluster(make_client) -> None:
    """An ingest-only pod commits; a live-only pod's subscribers (trip, fleet, another org)
    get exactly their own messages, once; a replay is not published again."""
    ingest = await make_client(role="ingest")
    live = await make_client(role="live")
    tok = token("dispatcher", "d", "org_1")
    by_trip, fleet = await ws_connect(live, tok), await ws_connect(live, tok)
    other = await ws_connect(live, token("dispatcher", "d", "org_2"))
    await subscribed(by_trip, trips=["trip_1"])
    await subscribed(fleet, fleet=True)
    await subscribed(other, fleet=True)
    trips = [f"trip_{i}" for i in range(1, 13)]  # over every bucket's shard, likely
    bodies = [batch(2, trip=t, start_ms=now_ms(-30)) for t in trips]
    for b in bodies:
        assert (await ingest.post(PING, json=b, headers=auth())).status == 200
    got = [m for m in await quiet(fleet, 1.0) if m["type"] == "locations"]
    assert sorted(m["tripId"] for m in got) == sorted(trips)
    mine = [m for m in await quiet(by_trip, 0.3) if m["type"] == "locations"]
    assert [m["tripId"] for m in mine] == ["trip_1"]
    assert await quiet(other, 0.3) == []
    # The replay of a batch stores nothing and publishes nothing.
    assert (await ingest.post(PING, json=bodies[0], headers=auth())).status == 200
    assert await quiet(fleet, 0.5) == [] and await quiet(by_trip) == []
    for ws in (by_trip, fleet, other):
        await ws.close()


async def test_unsubscribing_the_fleet_leaves_every_bucket_channel(client) -> None:
    fanout = client.server.app[FANOUT]
    ws = await ws_connect(client, token("dispatcher", "d", "org_1"))
    before = len(fanout.patterns)
    await subscribed(ws, fleet=True)
    assert len(fanout.patterns) - before == client.server.app[LIVE].keys.buckets
    await ws.send_json({"type": "unsubscribe", "fleet": True})
    await asyncio.sleep(0.2)
    assert len(fanout.patterns) == before
    assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    assert await quiet(ws, 0.5) == []
    await ws.close()


async def test_sharded_publish_reaches_only_the_owning_shard(
    client, redis_cluster: PrivateRedisCluster, cluster_client: RedisCluster
) -> None:
    """A plain SUBSCRIBE on a master that does not own the channel hears nothing: the
    message went by SPUBLISH, to one shard only."""
    keys = client.server.app[LIVE].keys
    channel = keys.trip_channel("org_1", "trip_1")
    owner = cluster_client.get_node_from_key(channel)
    others = [n for n in cluster_client.get_primaries() if n.name != owner.name]
    listeners = [aioredis.Redis(host=n.host, port=n.port) for n in others]
    subs = [r.pubsub() for r in listeners]
    for ps in subs:
        await ps.subscribe(channel)
        await ps.get_message(timeout=1)
    ws = await ws_connect(client, token("dispatcher", "d", "org_1"))
    await subscribed(ws, trips=["trip_1"])
    assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    assert [m["type"] for m in await quiet(ws, 0.5)] == ["locations"]
    for ps in subs:
        assert await ps.get_message(timeout=0.2) is None
        await ps.aclose()
    for r in listeners:
        await r.aclose()
    await ws.close()


async def test_a_slot_moved_under_load_keeps_its_trip_live(
    client, redis_cluster: PrivateRedisCluster
) -> None:
    """Resharding: the slot of a watched trip moves to another master while phones post.
    Its master tells the listener it no longer serves the channel; the channel is subscribed
    on the new master, publishing follows MOVED, and the latest moves on there."""
    app = client.server.app
    await asyncio.wait_for(app[FANOUT].connected.wait(), 5)
    keys = app[LIVE].keys
    channel = keys.trip_channel("org_1", "moving")
    slot = key_slot(channel.encode())
    src = redis_cluster.master_of_slot(slot)
    dst = next(p for p in redis_cluster.ports if p != src)
    tok = token("dispatcher", "d", "org_1")
    watcher, fleet = await ws_connect(client, tok), await ws_connect(client, tok)
    await subscribed(watcher, trips=["moving"], settle=0)
    await subscribed(fleet, fleet=True, settle=0)
    stamps: list[int] = []

    async def post() -> None:
        stamps.append(now_ms())
        b = batch(1, trip="moving", start_ms=stamps[-1])
        assert (await client.post(PING, json=b, headers=auth())).status == 200

    await post()
    assert [m["type"] for m in await quiet(watcher, 0.5)] == ["locations"]
    await quiet(fleet, 0.1)
    mover = asyncio.create_task(asyncio.to_thread(redis_cluster.move_slot, slot, dst))
    while not mover.done():
        await post()
        await asyncio.sleep(0.02)
    await mover
    assert redis_cluster.master_of_slot(slot) == dst
    await asyncio.sleep(1.0)  # the listener finds the channel's new master
    await quiet(watcher, 0.1)
    await quiet(fleet, 0.1)
    for _ in range(3):
        await post()
        got = [m for m in await quiet(watcher, 0.5) if m["type"] == "locations"]
        assert [m["tripId"] for m in got] == ["moving"]
        assert [m["tripId"] for m in await quiet(fleet, 0.1)] == ["moving"]
    assert app[FANOUT].owner[channel.encode()].name == f"127.0.0.1:{dst}"
    want = datetime.fromtimestamp(stamps[-1] / 1000, UTC)
    for _ in range(100):  # the latest moves on, on the new master
        resp = await client.get(LATEST.format("moving"), headers=auth())
        got = datetime.fromisoformat((await resp.json())["location"]["timestamp"])
        if got == want:
            break
        await asyncio.sleep(0.05)
    assert got == want
    for ws in (watcher, fleet):
        await ws.close()


async def test_a_flush_mixing_a_moved_slot_with_a_staying_one_still_publishes(
    make_client, redis_cluster: PrivateRedisCluster
) -> None:
    """Found by the attack review: after a slot moved, a flush grouped by the stale slot map
    whose declared key stayed ran on the old master, met the moved key ('non local key', no
    MOVED) and failed for every trip of that master, flush after flush. The script now reads
    every key before writing any (a failure changes nothing) and the call is retried once
    after reading the topology again."""
    client = await make_client()
    app = client.server.app
    await asyncio.wait_for(app[FANOUT].connected.wait(), 5)
    keys, org = app[LIVE].keys, "org_1"

    def slot(trip: str) -> int:
        return key_slot(keys.latest(org, trip).encode())

    moving = "mixed_moving"
    src = redis_cluster.master_of_slot(slot(moving))
    staying = next(
        t for t in (f"stay_{i}" for i in range(1000))
        if slot(t) != slot(moving) and redis_cluster.master_of_slot(slot(t)) == src
    )  # fmt: skip
    dst = next(p for p in redis_cluster.ports if p != src)
    ws = await ws_connect(client, token("dispatcher", "d", org))
    await subscribed(ws, trips=[staying, moving], settle=0)
    # The app's clients know the topology now; the slot moves behind their back.
    await asyncio.to_thread(redis_cluster.move_slot, slot(moving), dst)
    await asyncio.sleep(1.0)  # the fan-out subscribes the moved channel on its new master
    await quiet(ws, 0.1)
    start = now_ms(-60)
    posts = [  # one flush (acks wait for it), the staying trip's rows first
        client.post(PING, json=batch(1, trip=trip, start_ms=start), headers=auth())
        for trip in (staying, moving)
    ]
    assert [r.status for r in await in_one_flush(client, *posts)] == [200, 200]
    got = [m["tripId"] for m in await quiet(ws, 2.0) if m["type"] == "locations"]
    assert sorted(got) == sorted([staying, moving]), got
    await ws.close()
