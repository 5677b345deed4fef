"""Prometheus metrics, defined once. Labels stay low-cardinality: never a trip or driver id.

Counters with labels are initialised for every known label value below, so each series
exists from the start and the first increase is visible to rate() and increase().
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)

# -- ingest ----------------------------------------------------------------------------------
PINGS_RECEIVED = Counter("ingest_pings_received_total", "Pings in well-formed batches")
PINGS_STORED = Counter("ingest_pings_stored_total", "Pings newly committed to PostgreSQL")
PINGS_DUPLICATE = Counter(
    "ingest_pings_duplicate_total", "Pings already stored before (replays, resends)"
)
PINGS_REJECTED = Counter("ingest_pings_rejected_total", "Pings dropped by a range rule", ["reason"])
REJECT_REASONS = ("latitude", "longitude", "accuracy", "speed", "heading", "altitude", "timestamp")
BATCHES = Counter("ingest_batches_total", "Ping batches by outcome", ["outcome"])
BATCH_OUTCOMES = ("committed", "queued", "rejected", "overloaded", "timeout", "failed")
RATE_LIMITED = Counter("ingest_rate_limited_total", "Requests answered 429")
REQUESTS = Histogram(
    "ingest_http_request_duration_seconds",
    "HTTP request latency by route (the path template) and status",
    ["route", "status"],
    buckets=_LATENCY_BUCKETS,
)
ACK_SECONDS = Histogram(
    "ingest_ack_latency_seconds",
    "From a batch entering the buffer to its durable ack",
    buckets=_LATENCY_BUCKETS,
)

# -- buffer and flush ------------------------------------------------------------------------
FLUSH_SECONDS = Histogram(
    "ingest_flush_duration_seconds", "Duration of a successful flush", buckets=_LATENCY_BUCKETS
)
FLUSH_ROWS = Histogram(
    "ingest_flush_rows",
    "Rows per successful flush",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
)
BUFFER_ROWS = Gauge("ingest_buffer_rows", "Rows held in memory (waiting plus being flushed)")
BUFFER_LIMIT = Gauge("ingest_buffer_limit_rows", "BUFFER_MAX_ROWS")

# -- dependencies and readiness --------------------------------------------------------------
DB_ERRORS = Counter("ingest_db_errors_total", "PostgreSQL errors by operation", ["operation"])
DB_OPERATIONS = ("flush", "flush_conflict", "flush_refused", "readiness", "maintenance")
REDIS_ERRORS = Counter("ingest_redis_errors_total", "Redis errors by operation", ["operation"])
REDIS_OPERATIONS = ("publish", "pubsub", "latest", "snapshot", "probe", "repair")
DATABASE_UP = Gauge(
    "ingest_database_up", "1 if PostgreSQL answered this pod's last check (at most 1 s old)"
)
REDIS_UP = Gauge("ingest_redis_up", "1 if Redis answered this pod's last check (at most 1 s old)")
# Read replica (DATABASE_READ_URL only; ingest/reads.py).
READS_ON_REPLICA = Counter(
    "ingest_replica_reads_total", "Read-only requests sent to the replica (the others: fallbacks)"
)
READ_FALLBACKS_TOTAL = Counter(
    "ingest_read_fallbacks_total", "Reads sent to the primary instead of the replica", ["reason"]
)
READ_FALLBACKS = {reason: READ_FALLBACKS_TOTAL.labels(reason) for reason in ("down", "lag")}
READ_REPLICA_UP = Gauge("ingest_read_replica_up", "1 if the replica answered its last check")
READ_REPLICA_LAG = Gauge(
    "ingest_read_replica_lag_seconds",
    "Replay lag of the replica at its last check (NaN: unknown or unreachable)",
)
for _gauge in (READ_REPLICA_UP, READ_REPLICA_LAG):
    _gauge.set(float("nan"))  # until a replica is configured and checked
READY = Gauge("ingest_ready", "1 if /readyz answers 200 (checked at each scrape)")
INFO = Info("ingest", "This pod's role and acknowledgement mode")

# -- live locations --------------------------------------------------------------------------
LATEST_UPDATED = Counter("ingest_latest_updated_total", "Latest locations moved forward")
LATEST_SKIPPED = Counter(
    "ingest_latest_skipped_older_total", "Latest-location updates skipped as older than stored"
)
PUBLISHED = Counter("ingest_live_published_total", "Live messages published to Redis")
PUBLISH_DROPPED = Counter(
    "ingest_live_publish_dropped_total", "Live messages not published (Redis down or backlog)"
)
WS_CONNECTIONS = Gauge("ingest_ws_connections", "Open WebSocket connections")
WS_SUBSCRIPTIONS = Gauge(
    "ingest_ws_subscriptions", "Trip channels and fleet patterns this pod is subscribed to"
)
WS_SENT = Counter("ingest_ws_messages_sent_total", "Live messages written to WebSockets")
WS_DROPPED = Counter("ingest_ws_messages_dropped_total", "Live messages not delivered to a socket")
WS_SLOW_CLOSED = Counter("ingest_ws_slow_consumer_closed_total", "Sockets closed as too slow")
FANOUT_SECONDS = Histogram(
    "ingest_live_publish_to_send_seconds",
    "From publish (in the flushing pod) to written to every local socket",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

# -- partitions and maintenance ------------------------------------------------------------
# The partition gauges are NaN until this pod's first maintenance run (always, on ROLE=live
# pods, which run none): aggregate them with max() across pods.
PARTITIONS = Gauge("ingest_partitions", "Partitions of TripLocation present")
OLDEST_PARTITION_AGE = Gauge(
    "ingest_oldest_partition_age_seconds", "Age of the start of the oldest partition's month"
)
NEWEST_PARTITION_AHEAD = Gauge(
    "ingest_newest_partition_ahead_seconds",
    "Time from now to the end of the newest partition's month",
)
PARTITION_MONTHS_AHEAD = Gauge(
    "ingest_partition_months_ahead",
    "Consecutive months after the current one that have a partition (0: next month missing)",
)
for _gauge in (PARTITIONS, OLDEST_PARTITION_AGE, NEWEST_PARTITION_AHEAD, PARTITION_MONTHS_AHEAD):
    _gauge.set(float("nan"))
PARTITIONS_CREATED = Counter("ingest_partitions_created_total", "Partitions created")
PARTITIONS_PACKED = Counter(
    "ingest_partitions_packed_total", "Closed partitions whose indexes were rebuilt (packed)"
)
PARTITIONS_DROPPED = Counter(
    "ingest_partitions_dropped_total", "Partitions detached and dropped past RETENTION_MONTHS"
)
BATCH_IDS_EXPIRED = Counter(
    "ingest_batch_ids_expired_total", "Batch-id records deleted after BATCH_ID_TTL_HOURS"
)
GEOFENCE_STATES_EXPIRED = Counter(
    "ingest_geofence_states_expired_total",
    "Geofence states of trips last evaluated before the oldest month kept (RETENTION_MONTHS)",
)
TRIPS_EXPIRED = Counter(
    "ingest_trips_expired_total",
    "Trip owners forgotten: trips created before the oldest month kept with no ping left",
)
MAINTENANCE_RUNS = Counter(
    "ingest_maintenance_runs_total", "Periodic maintenance runs by outcome", ["outcome"]
)
MAINTENANCE_LAST_SUCCESS = Gauge(
    "ingest_maintenance_last_success_timestamp_seconds",
    "Unix time of this pod's last successful maintenance run",
)

# The hot path counts every batch: label lookups cost more than the increment, so keep them.
BATCH = {outcome: BATCHES.labels(outcome) for outcome in BATCH_OUTCOMES}

# -- tenancy and commit outcomes ------------------------------------------------------------
BATCHES_REFUSED = Counter(
    "ingest_batches_refused_total",
    "Batches a flush refused whole (trip owned by another driver, trip limit)",
    ["reason"],
)
COMMITS_RESOLVED = Counter(
    "ingest_commit_outcomes_resolved_total",
    "Flushes whose COMMIT reply was lost, by what PostgreSQL said became of them",
    ["outcome"],
)
TRIP_HANDOVERS = Counter("ingest_trip_handovers_total", "Trips handed over to another driver")

# -- geofences (docs/api.md#geofences) ---------------------------------------------------------
GEOFENCE_CHANGES = Counter(
    "ingest_geofence_changes_total", "Geofences created or deleted", ["operation"]
)
GEOFENCE_EVENTS = Counter(
    "ingest_geofence_events_total", "Geofence enter and exit events stored", ["event"]
)
GEOFENCE_EVALUATED = Counter(
    "ingest_geofence_pings_evaluated_total", "Stored pings evaluated against geofences"
)
GEOFENCE_GAP_PINGS = Counter(
    "ingest_geofence_gap_pings_total",
    "Stored pings read back from PostgreSQL because their own evaluation had not run yet",
)
GEOFENCE_FAILURES = Counter(
    "ingest_geofence_failures_total", "Geofence evaluations that failed and were retried"
)
GEOFENCE_DROPPED = Counter(
    "ingest_geofence_dropped_flushes_total",
    "Flushes left unevaluated (a full backlog; the geofence worker down, behind or dead)",
)
GEOFENCE_WORKER_STARTS = Counter(
    "ingest_geofence_worker_starts_total",
    "Geofence worker processes started (GEOFENCE_EVALUATION=process): more than one, it died",
)
GEOFENCE_CUTS = Counter(
    "ingest_geofence_transactions_cut_total",
    "Geofence evaluations cut into one more transaction, by the bound reached: events"
    " (EVENTS_PER_TRANSACTION held), time (pings walked for 0.5 s) or read_back (pings read"
    " back from PostgreSQL past READ_BACK_MAX, after an outage)",
    ["reason"],
)
GEOFENCE_CHANGES_BUSY = Counter(
    "ingest_geofence_changes_busy_total",
    "Geofence creates and deletes answered 503: the org's row stayed locked (evaluations)",
    ["operation"],
)
GEOFENCE_SECONDS = Histogram(
    "ingest_geofence_evaluation_seconds",
    "Time to evaluate the pings of one flush, or of the flushes due together, commit included",
)

# -- latest-location repair after failed Redis writes (docs/reliability.md) ------------------
LATEST_REPAIR_PENDING = Gauge(
    "ingest_latest_repair_pending",
    "Trips whose latest-location update did not reach Redis, waiting to be set from PostgreSQL",
)
LATEST_REPAIRED = Counter(
    "ingest_latest_repaired_total", "Trips whose latest location was set again from PostgreSQL"
)
LATEST_REPAIR_OVERFLOW = Counter(
    "ingest_latest_repair_overflow_total",
    "Lost latest-location updates not remembered for repair (LATEST_REPAIR_MAX_TRIPS reached)",
)

# -- WebSocket limits and token lifetime (docs/live.md) ------------------------------------
WS_REFUSED = Counter(
    "ingest_ws_refused_total",
    "WebSockets (too_many_sockets) and subscribe messages (too_many_subscriptions) refused"
    " by a per-pod limit",
    ["reason"],
)
WS_SUBSCRIBE_FAILED = Counter(
    "ingest_ws_subscribe_failed_total",
    "Channels and patterns Redis did not confirm within WS_SUBSCRIBE_TIMEOUT_S",
)
WS_TOKEN_EXPIRED = Counter(
    "ingest_ws_token_expired_total", "WebSockets closed (4001) because their token expired"
)

# -- HTTP connections (ingest/http_server.py, docs/security.md) ----------------------------
HTTP_CONNECTIONS = Gauge("ingest_http_connections", "Open HTTP connections, WebSockets included")
HTTP_CLOSED = Counter(
    "ingest_http_connections_closed_total",
    "Connections the server closed to protect itself: header_timeout, body_timeout, evicted"
    " (waited longest for its client when HTTP_MAX_CONNECTIONS was reached), over_capacity"
    " (a new one, when every other connection was busy)",
    ["reason"],
)
HTTP_CLOSED_BY = {
    reason: HTTP_CLOSED.labels(reason)
    for reason in ("header_timeout", "body_timeout", "evicted", "over_capacity")
}

for _counter, _values in (
    (PINGS_REJECTED, REJECT_REASONS),
    (BATCHES, BATCH_OUTCOMES),
    (DB_ERRORS, DB_OPERATIONS),
    (REDIS_ERRORS, REDIS_OPERATIONS),
    (MAINTENANCE_RUNS, ("ok", "failed")),
    (BATCHES_REFUSED, ("trip_owned_by_another_driver", "too_many_trips")),
    (COMMITS_RESOLVED, ("committed", "aborted")),
    (WS_REFUSED, ("too_many_sockets", "too_many_subscriptions")),
):
    for _value in _values:
        _counter.labels(_value)

# -- Retention of geofence events (ingest/maintenance.py) -----------------------------------
GEOFENCE_EVENTS_EXPIRED = Counter(
    "ingest_geofence_events_expired_total",
    "Geofence events deleted: they happened before the oldest month kept (RETENTION_MONTHS)",
)

for _counter, _labels in (
    (GEOFENCE_CUTS, ("events", "time", "read_back")),
    (GEOFENCE_CHANGES_BUSY, ("create", "delete")),
):
    for _value in _labels:
        _counter.labels(_value)
