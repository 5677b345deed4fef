"""The Redis names of an org's live data, for a single Redis or for a Redis Cluster.

Standalone (REDIS_MODE=standalone) keeps the names of constants.py: one fleet set per org,
and the fleet's messages reach its subscribers through a pattern on the trip channels.

A Redis Cluster has no sharded pattern subscriptions, and a Lua call may only touch keys of
the node it runs on. So in cluster mode every name of a trip carries the hash tag
``{org:bucket}``, bucket = crc32(tripId) mod REDIS_CLUSTER_BUCKETS: a trip's latest key, its
channel, and its bucket's fleet set and fleet channel share one slot; an org's trips spread
over that many slots (so over up to that many shards), never all on one node. The fleet is
REDIS_CLUSTER_BUCKETS sharded channels, each carrying the messages of its bucket's trips; a
fleet subscriber subscribes to all of them, and a snapshot reads all the bucket sets.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import TypeVar

from redis.asyncio.cluster import RedisCluster

from .constants import (
    FLEET_KEY,
    GEO_KEY,
    GEO_SWEPT_KEY,
    LATEST_KEY,
    LIVE_CHANNEL,
    fleet_key,
    fleet_pattern,
    org_part,
)
from .constants import latest_key as _latest_key
from .constants import trip_channel as _trip_channel

# Cluster-mode fleet channels: fleetlive:{org:bucket}
FLEET_CHANNEL = "fleetlive:"
# A script called on a cluster once per master touches keys of several slots of that master.
CROSS_SLOT = "#!lua flags=allow-cross-slot-keys\n"
T = TypeVar("T")


class Keyspace:
    """Standalone names."""

    sharded = False
    buckets = 1

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def latest(self, org: str | None, trip: str) -> str:
        return _latest_key(self.prefix, org, trip)

    def trip_channel(self, org: str | None, trip: str) -> str:
        return _trip_channel(self.prefix, org, trip)

    def fleet_set(self, org: str | None, trip: str) -> str:
        """The fleet set that ranks ``trip``."""
        return fleet_key(self.prefix, org)

    def fleet_sets(self, org: str) -> list[str]:
        """Every fleet set of ``org``."""
        return [fleet_key(self.prefix, org)]

    def nearby_sets(self, org: str) -> list[tuple[str, str, str, str]]:
        """(GEO set, its fleet set, latest key prefix of its trips, its sweep mark) for every
        GEO set of ``org``: each tuple's names share a slot in a cluster."""
        p, o = self.prefix, org_part(org)
        return [(f"{p}{GEO_KEY}{o}", f"{p}{FLEET_KEY}{o}", f"{p}{LATEST_KEY}{o}:",
                 f"{p}{GEO_SWEPT_KEY}{o}")]  # fmt: skip

    def fleet_channel(self, org: str | None, trip: str) -> str:
        """Where a trip's messages go for the fleet besides its own channel: nowhere, the
        fleet pattern matches the trip channel."""
        return ""

    def fleet_subscriptions(self, org: str) -> list[str]:
        """What a fleet subscriber subscribes to: a pattern here, channels in a cluster."""
        return [fleet_pattern(self.prefix, org)]

    def geo_set(self, org: str | None, trip: str) -> str:
        """The GEO set that holds ``trip``'s latest position."""
        return f"{self.prefix}{GEO_KEY}{org_part(org)}"

    def geofence_channel(self, org: str, trip: str) -> str:
        """Where ``trip``'s geofence events go: to the org's fleet subscribers only. The trip
        channel with an empty trip id, which the fleet pattern matches and no trip has."""
        return f"{self.prefix}{LIVE_CHANNEL}{org_part(org)}:"

    def names(self, org: str | None, trip: str) -> tuple[str, str, str, str, str]:
        """(latest, trip channel, fleet set, fleet channel, GEO set) in one call: once per
        trip per flush, on the live step's path."""
        p, o = self.prefix, org_part(org)
        return (
            f"{p}{LATEST_KEY}{o}:{trip}",
            f"{p}{LIVE_CHANNEL}{o}:{trip}",
            f"{p}{FLEET_KEY}{o}",
            "",
            f"{p}{GEO_KEY}{o}",
        )


def _tag_part(org: str | None) -> str:
    """The org inside a hash tag: '%', ':', '{' and '}' escaped, so that the tag ends where
    it should and two orgs never share a name."""
    return (
        (org or "")
        .replace("%", "%25")
        .replace(":", "%3A")
        .replace("{", "%7B")
        .replace("}", "%7D")
    )  # fmt: skip


class ClusterKeyspace(Keyspace):
    """Redis Cluster names: hash-tagged per (org, bucket of the trip)."""

    sharded = True

    def __init__(self, prefix: str, buckets: int) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("REDIS_PREFIX must not contain '{' or '}' in cluster mode")
        super().__init__(prefix)
        self.buckets = buckets

    def tag(self, org: str | None, trip: str) -> str:
        bucket = zlib.crc32(trip.encode()) % self.buckets
        return f"{{{_tag_part(org)}:{bucket}}}"

    def latest(self, org: str | None, trip: str) -> str:
        return f"{self.prefix}{LATEST_KEY}{self.tag(org, trip)}:{trip}"

    def trip_channel(self, org: str | None, trip: str) -> str:
        return f"{self.prefix}{LIVE_CHANNEL}{self.tag(org, trip)}:{trip}"

    def fleet_set(self, org: str | None, trip: str) -> str:
        return f"{self.prefix}{FLEET_KEY}{self.tag(org, trip)}"

    def fleet_sets(self, org: str) -> list[str]:
        part = _tag_part(org)
        return [f"{self.prefix}{FLEET_KEY}{{{part}:{b}}}" for b in range(self.buckets)]

    def nearby_sets(self, org: str) -> list[tuple[str, str, str, str]]:
        p, part = self.prefix, _tag_part(org)
        tags = [f"{{{part}:{b}}}" for b in range(self.buckets)]
        return [(f"{p}{GEO_KEY}{t}", f"{p}{FLEET_KEY}{t}", f"{p}{LATEST_KEY}{t}:",
                 f"{p}{GEO_SWEPT_KEY}{t}") for t in tags]  # fmt: skip

    def fleet_channel(self, org: str | None, trip: str) -> str:
        return f"{self.prefix}{FLEET_CHANNEL}{self.tag(org, trip)}"

    def geo_set(self, org: str | None, trip: str) -> str:
        return f"{self.prefix}{GEO_KEY}{self.tag(org, trip)}"

    def geofence_channel(self, org: str, trip: str) -> str:
        return self.fleet_channel(org, trip)

    def fleet_subscriptions(self, org: str) -> list[str]:
        part = _tag_part(org)
        return [f"{self.prefix}{FLEET_CHANNEL}{{{part}:{b}}}" for b in range(self.buckets)]

    def names(self, org: str | None, trip: str) -> tuple[str, str, str, str, str]:
        p, tag = self.prefix, self.tag(org, trip)
        return (
            f"{p}{LATEST_KEY}{tag}:{trip}", f"{p}{LIVE_CHANNEL}{tag}:{trip}",
            f"{p}{FLEET_KEY}{tag}", f"{p}{FLEET_CHANNEL}{tag}", f"{p}{GEO_KEY}{tag}",
        )  # fmt: skip


def keyspace(mode: str, prefix: str, buckets: int) -> Keyspace:
    return ClusterKeyspace(prefix, buckets) if mode == "cluster" else Keyspace(prefix)


def master_of(cluster: RedisCluster, name: str | bytes) -> str | None:
    """The name of the master serving ``name``'s slot, as the client last saw the cluster;
    None while no node serves it (a failover under way)."""
    try:
        node = cluster.get_node_from_key(name)  # type: ignore[arg-type]  # bytes work too
    except Exception:
        return None
    return node.name if node is not None else None


def by_master(
    cluster: RedisCluster, items: Iterable[T], name: Callable[[T], str]
) -> dict[str, list[T]]:
    """``items`` grouped by the master serving the slot of each one's ``name``, as the client
    last saw the cluster ("" for a slot no node serves right now: its own call finds out)."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(master_of(cluster, name(item)) or "", []).append(item)
    return groups
