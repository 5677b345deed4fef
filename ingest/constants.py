"""Names shared across modules: advisory lock ids, and the Redis keys and channels with the
functions that build them."""

# PostgreSQL advisory lock ids (64-bit keys, scoped to the database).
MIGRATION_LOCK_ID = 0x1A6E57_0001
MAINTENANCE_LOCK_ID = 0x1A6E57_0002
GEOFENCE_SWEEP_LOCK_ID = 0x1A6E57_0003
PACK_LOCK_ID = 0x1A6E57_0004

# Redis names, all under the configured REDIS_PREFIX (default "ingest:").
# latest:{org}:{tripId}   hash {ts: epoch ms, loc: JSON location, driverId}, TTL LATEST_TTL_S
LATEST_KEY = "latest:"
# live:{org}:{tripId}     pub/sub channel carrying one ready-to-send WebSocket text message
LIVE_CHANNEL = "live:"
# fleet:{org}             sorted set tripId -> latest ts (ms), for fleet snapshots
FLEET_KEY = "fleet:"
# geo:{org}               GEO set tripId -> latest position, for nearby (trips silent for
#                         longer than NEARBY_MAX_AGE_S are swept out on read, and with the
#                         fleet set's, after LATEST_TTL_S, by the flushes: live.py)
GEO_KEY = "geo:"
# geoswept:{org}          the fleet score up to which the GEO set was last swept
GEO_SWEPT_KEY = "geoswept:"


def org_part(org: str | None) -> str:
    """The org as a name part: ':' (and '%') escaped, so that org "a" with trip "b:t" and
    org "a:b" with trip "t" never share a key or a channel, nor "a"'s fleet pattern."""
    return (org or "").replace("%", "%25").replace(":", "%3A")


def latest_key(prefix: str, org: str | None, trip: str) -> str:
    return f"{prefix}{LATEST_KEY}{org_part(org)}:{trip}"


def fleet_key(prefix: str, org: str | None) -> str:
    return f"{prefix}{FLEET_KEY}{org_part(org)}"


def trip_channel(prefix: str, org: str | None, trip: str) -> str:
    return f"{prefix}{LIVE_CHANNEL}{org_part(org)}:{trip}"


def fleet_pattern(prefix: str, org: str) -> str:
    """Glob matching every trip channel of ``org``; glob characters in names are escaped."""
    return glob_escape(f"{prefix}{LIVE_CHANNEL}{org_part(org)}:") + "*"


def glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
