"""Every key of the app state (web.AppKey), declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from .auth import Verifier
    from .buffer import Buffer
    from .fanout import Fanout
    from .flush import Flusher
    from .geofence_events import GeofenceEvaluator
    from .geofence_worker import GeofenceWorker
    from .live import Live
    from .nearby import NearbySearch
    from .ratelimit import RateLimiter
    from .reads import ReadReplica
    from .settings import Settings
    from .shutdown import Lifecycle
    from .trip_pages import Slots

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool")
# Only with DATABASE_READ_URL: the replica's pool and its monitor's last measurement.
READ_REPLICA: web.AppKey[ReadReplica] = web.AppKey("read_replica")
BUFFER: web.AppKey[Buffer] = web.AppKey("buffer")
FLUSHER: web.AppKey[Flusher] = web.AppKey("flusher")
# Only where the flusher runs: evaluates each commit's pings against the geofences.
GEOFENCES: web.AppKey[GeofenceEvaluator | GeofenceWorker] = web.AppKey("geofences")
LIVE: web.AppKey[Live] = web.AppKey("live")
NEARBY: web.AppKey[NearbySearch] = web.AppKey("nearby")
FANOUT: web.AppKey[Fanout] = web.AppKey("fanout")
VERIFIER: web.AppKey[Verifier] = web.AppKey("verifier")
RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("rate_limiter")
# Geofence creates and deletes, per org: each one makes every pod reload the org's fences.
GEOFENCE_CHANGES_LIMITER: web.AppKey[RateLimiter] = web.AppKey("geofence_changes_limiter")
# Draining or not, requests in flight, background tasks: what the shutdown sequence reads.
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
# Open live WebSockets, closed with 1001 at shutdown.
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")
# Whole-trip reads (summaries, exports) running in this pod, at most EXPORT_MAX_CONCURRENT.
EXPORT_SLOTS: web.AppKey[Slots] = web.AppKey("export_slots")
