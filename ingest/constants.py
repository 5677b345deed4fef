"""Names shared across modules: advisory lock ids, Redis keys and channels."""

# PostgreSQL advisory lock ids (64-bit keys, scoped to the database).
MIGRATION_LOCK_ID = 0x1A6E57_0001
MAINTENANCE_LOCK_ID = 0x1A6E57_0002

# Redis names, all under the configured REDIS_PREFIX (default "ingest:").
# latest:{org}:{tripId}   hash {ts: epoch ms, loc: JSON location, driverId}, TTL LATEST_TTL_S
LATEST_KEY = "latest:"
# live:{org}:{tripId}     pub/sub channel carrying one ready-to-send WebSocket text message
LIVE_CHANNEL = "live:"
# fleet:{org}             sorted set tripId -> latest ts (ms), for fleet snapshots
FLEET_KEY = "fleet:"
