"""Settings: one frozen struct read from the environment and validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .jwt_keys import InvalidKey, load_public_key

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, rename="upper", kw_only=True):
    """Every field is read from the environment variable of the same name, upper-cased."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # A streaming replica for read-only queries (docs/scaling.md); unset: reads use the primary.
    database_read_url: str | None = None
    # Reads go to the primary while the replica's replay lags more than this.
    read_max_lag_s: PositiveFloat = 5.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "0.0.0.0"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    role: Literal["all", "ingest", "live"] = "all"
    ack_mode: Literal["durable", "buffered"] = "durable"
    # Group commit (buffer.py): a flush starts at once when none is in flight; a further one
    # (up to FLUSH_CONCURRENCY in flight) when FLUSH_MAX_ROWS wait or the oldest waited this long.
    flush_interval_ms: PositiveInt = 50
    flush_max_rows: PositiveInt = 5000
    flush_concurrency: PositiveInt = 1
    # Rows held in memory (buffered plus being flushed) above which ingest answers 503.
    buffer_max_rows: PositiveInt = 50_000
    # Durable mode: new batches get 503 while the oldest buffered row has waited longer than
    # this: the pod is not keeping up (CPU or PostgreSQL), so waiting clients would time out.
    buffer_max_wait_ms: PositiveInt = 500
    # /readyz turns false above this fraction of BUFFER_MAX_ROWS.
    buffer_high_water: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    max_pings_per_batch: PositiveInt = 1000
    max_body_bytes: PositiveInt = 1_048_576  # 1 MiB, applies to the decompressed body too
    # A durable-ack request that waits longer than this for its commit gets 503 + Retry-After.
    ack_timeout_ms: PositiveInt = 10_000
    # Accepted time window for a ping's timestamp, relative to the server clock.
    max_clock_skew_s: NonNegInt = 300  # 5 min into the future
    max_ping_age_days: PositiveInt = 31
    # Flusher retry backoff when PostgreSQL fails (doubles up to the max).
    flush_retry_min_ms: PositiveInt = 100
    flush_retry_max_ms: PositiveInt = 5_000
    flush_timeout_s: PositiveFloat = 10.0  # a flush normally takes tens of ms
    db_pool_max: Annotated[int, msgspec.Meta(ge=2)] = 8
    # Batch ids are remembered this long for replay detection; pings stay deduplicated by
    # (tripId, timestamp) forever.
    batch_id_ttl_hours: PositiveInt = 72
    partitions_ahead_months: NonNegInt = 2
    retention_months: NonNegInt = 0  # 0 keeps every partition
    maintenance_interval_s: PositiveFloat = 3600.0
    # Rebuild the index of each month no ping can go to any more (older than
    # MAX_PING_AGE_DAYS), one month per MAINTENANCE_INTERVAL_S: a live month's index is about
    # a third empty, as every trip appends in the middle of it (docs/operations.md).
    pack_closed_partitions: bool = True
    # Live locations.
    redis_prefix: str = "ingest:"
    # A Redis Cluster (REDIS_URL names any node) or one Redis (docs/scaling.md).
    redis_mode: Literal["standalone", "cluster"] = "standalone"
    # Cluster mode: the hash-tag buckets an org's trips spread over (keyspace.py).
    redis_cluster_buckets: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    latest_ttl_s: PositiveInt = 86_400  # 1 day
    # Nearby leaves out trips silent for longer than this (the same on every pod).
    nearby_max_age_s: PositiveInt = 600
    # Geofences (docs/api.md#geofences): positions of a polygon (all rings), fences per org.
    # Validation costs up to ~10 us per position (geofence_shapes.MAX_PAIRS_PER_EDGE): 10,000
    # keeps one request within ~0.1 s of the validation thread.
    geofence_max_vertices: Annotated[int, msgspec.Meta(ge=4, le=10_000)] = 1000
    geofence_max_per_org: PositiveInt = 1000
    # Positions of all an org's fences together (a circle counts one): bounds what every pod
    # holds and tests per ping for the org.
    geofence_max_vertices_per_org: PositiveInt = 100_000
    # Creates and deletes per org, per pod (token bucket; more: 429). Each one makes every pod
    # read and index the org's fences again, so a script churning them costs every pod.
    geofence_changes_per_s: PositiveFloat = 10.0
    geofence_changes_burst: PositiveInt = 100
    # A commit is evaluated this long after it, so that a trip's batches committed out of order
    # on two pods within it are evaluated in time order (docs/api.md#geofences).
    geofence_settle_ms: NonNegInt = 2000
    # Where the evaluation runs: in a process of its own beside the pod's, off the event loop
    # that takes the requests, or in that loop (docs/operations.md#geofence-worker).
    geofence_evaluation: Literal["process", "inline"] = "process"
    ws_max_subscriptions: PositiveInt = 1000
    ws_max_messages_per_s: PositiveFloat = 20.0
    ws_send_buffer_bytes: PositiveInt = 1_048_576  # per socket; above it the socket is closed
    ws_heartbeat_s: PositiveFloat = 30.0
    # Auth.
    jwt_secret: str | None = None
    # The secret read from this file instead (a mounted Kubernetes/Docker secret, `make run`'s
    # .dev/jwt_secret); surrounding whitespace is dropped.
    jwt_secret_file: str | None = None
    jwt_public_key: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: NonNegInt = 30
    auth_disabled: bool = False
    # Per-driver rate limit on ingest requests (token bucket).
    rate_limit_per_s: PositiveFloat = 20.0
    rate_limit_burst: PositiveInt = 40
    # Tenancy and hostile clients (docs/tenancy.md, docs/security.md).
    # Distinct trips one request may post to (phone apps can name one trip per device).
    max_trips_per_request: PositiveInt = 10
    # New trips one driver may start in 24 hours; beyond it, 429 too_many_trips.
    max_trips_per_driver_per_day: PositiveInt = 100
    # ACK_MODE=buffered: a trip owner this pod saw commit is trusted this long for a 202.
    owner_cache_ttl_s: PositiveFloat = 10.0
    # A client that has not sent a whole request head by then is disconnected.
    http_header_timeout_s: PositiveFloat = 10.0
    # A request body not received whole by then gets 408.
    http_body_timeout_s: PositiveFloat = 30.0
    # Open HTTP connections; above it the oldest idle or half-sent one is closed first.
    http_max_connections: PositiveInt = 10_000
    # WebSockets.
    ws_max_sockets_per_subject: PositiveInt = 20  # per token subject (org, sub), per pod
    ws_max_subscriptions_per_pod: PositiveInt = 100_000  # trip channels + fleet channels
    # The same, of one org: so that one org never takes what others need (docs/live.md).
    # Unset: a fifth of WS_MAX_SUBSCRIPTIONS_PER_POD, what one subject's sockets can hold.
    ws_max_subscriptions_per_org: PositiveInt | None = None
    ws_subscribe_timeout_s: PositiveFloat = 5.0  # Redis must confirm a SUBSCRIBE by then
    fleet_snapshot_max: PositiveInt = 10_000  # trips in a fleet subscription's snapshot
    # Latest-location repair after failed Redis writes (docs/reliability.md).
    latest_repair_interval_s: PositiveFloat = 1.0
    latest_repair_max_trips: PositiveInt = 100_000
    # GeoJSON/GPX exports and trip summaries (whole-trip reads) at once per pod; beyond it 503. Each
    # holds at most one pool connection, and only while it fetches a page.
    # One org holds at most all but one of them (trip_pages.Slots).
    export_max_concurrent: PositiveInt = 2
    # An export whose client takes its bytes slower than this on average (over the time the pod
    # waited for the client, not the time it read the database) is cut off, its slot freed:
    # 32 KiB/s is 256 kbit/s, below any working mobile link; a 90 MB GPX may then take 46 min.
    export_min_bytes_per_s: PositiveInt = 32_768
    # ... once the pod has waited for the client this long in all: a slow start is not cut.
    export_rate_grace_s: PositiveFloat = 30.0
    # Shutdown: time allowed for the final flush and closing sockets.
    shutdown_timeout_s: PositiveFloat = 20.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def runs_ingest(self) -> bool:
        return self.role in ("all", "ingest")

    @property
    def runs_live(self) -> bool:
        return self.role in ("all", "live")

    @property
    def jwt_verify_key(self) -> str | None:
        return self.jwt_public_key or self.jwt_secret

    @property
    def ws_org_subscription_limit(self) -> int:
        """WS_MAX_SUBSCRIPTIONS_PER_ORG, or its default share of the pod's."""
        if self.ws_max_subscriptions_per_org is not None:
            return self.ws_max_subscriptions_per_org
        return max(1, self.ws_max_subscriptions_per_pod // 5)


ENV_NAMES = tuple(f.encode_name for f in msgspec.structs.fields(Settings))


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``env`` (default ``os.environ``); SettingsError names the bad variable."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {name: env[name] for name in ENV_NAMES if env.get(name, "") != ""}
    raw.update({k.upper(): v for k, v in overrides.items()})
    if "LOG_LEVEL" in raw and isinstance(raw["LOG_LEVEL"], str):
        raw["LOG_LEVEL"] = raw["LOG_LEVEL"].upper()
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        name = msg.rsplit("$.", 1)[-1].strip("`") if "$." in msg else "?"
        raise SettingsError(f"invalid setting {name}: {msg.split(' - at ')[0]}") from None
    if settings.jwt_secret_file:
        settings = _with_secret_from_file(settings)
    if settings.jwt_secret and settings.jwt_public_key:
        raise SettingsError(
            "invalid setting JWT_SECRET: set JWT_SECRET or JWT_PUBLIC_KEY, not both"
        )
    if settings.jwt_public_key:
        try:
            load_public_key(settings.jwt_public_key)
        except InvalidKey as exc:
            raise SettingsError(f"invalid setting JWT_PUBLIC_KEY: {exc}") from None
    if not settings.auth_disabled and not settings.jwt_verify_key:
        raise SettingsError(
            "invalid setting JWT_SECRET: set JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256/ES256),"
            " or AUTH_DISABLED=true for development"
        )
    if settings.redis_mode == "cluster" and (
        "{" in settings.redis_prefix or "}" in settings.redis_prefix
    ):
        raise SettingsError(
            "invalid setting REDIS_PREFIX: must not contain '{' or '}' with REDIS_MODE=cluster"
            " (they delimit hash tags)"
        )
    if settings.flush_max_rows > settings.buffer_max_rows:
        raise SettingsError("invalid setting FLUSH_MAX_ROWS: must not exceed BUFFER_MAX_ROWS")
    if settings.flush_concurrency >= settings.db_pool_max:
        # One connection stays free for readiness checks, reads and maintenance.
        raise SettingsError("invalid setting FLUSH_CONCURRENCY: must be below DB_POOL_MAX")
    for name, url, schemes in (
        ("DATABASE_URL", settings.database_url, ("postgres://", "postgresql://")),
        ("DATABASE_READ_URL", settings.database_read_url, ("postgres://", "postgresql://")),
        ("REDIS_URL", settings.redis_url, ("redis://", "rediss://", "unix://")),
    ):
        if url is not None and not url.startswith(schemes):
            raise SettingsError(f"invalid setting {name}: must start with {' or '.join(schemes)}")
        if url is not None and not _splits(url):
            # Else every connection fails with the client's parse error, which quotes a piece
            # of the password (the part it took for a port, or after a '?') in each log line.
            raise SettingsError(
                f"invalid setting {name}: cannot be split into user, password, host and port;"
                " percent-encode '/', '?', '#', '@' and ':' in the user and password"
            )
    return settings


def _splits(url: str) -> bool:
    """Whether a URL's user, password, hosts and ports come apart as its client reads them:
    ports that are numbers, and no '@' after the hosts before a query's first value (an
    unescaped '/', '?' or '#' in a password ends the hosts early, leaving the rest of it in
    the path)."""
    rest = url.partition("://")[2]
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    if "@" in rest[end:].partition("=")[0]:  # (a query's values may hold one: ?user=a@corp)
        return False
    for host in rest[:end].rpartition("@")[2].split(","):  # libpq's several hosts
        port = host.rpartition("]")[2] if host.startswith("[") else host
        port = port.partition(":")[2]
        if port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
            return False
    return True


def _with_secret_from_file(settings: Settings) -> Settings:
    if settings.jwt_secret:
        raise SettingsError(
            "invalid setting JWT_SECRET_FILE: set JWT_SECRET or JWT_SECRET_FILE, not both"
        )
    return msgspec.structs.replace(
        settings, jwt_secret=read_secret_file(settings.jwt_secret_file or "")
    )


def read_secret_file(path: str) -> str:
    """The secret in JWT_SECRET_FILE's ``path``, without surrounding whitespace."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError(
            f"invalid setting JWT_SECRET_FILE: cannot read {path}: {exc.strerror}"
        ) from None
    if not secret:
        raise SettingsError(f"invalid setting JWT_SECRET_FILE: {path} is empty")
    return secret
