"""The wire schema: msgspec types of requests and responses, coders built once."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

import msgspec

# 1-64 characters, no control characters (C0, DEL and C1: they reach logs and dashboards).
CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"  # as a regex character range
# The whole text without a control character. (?!\n): in Python (msgspec's re.search), $ also
# matches before a final newline, which the class excludes everywhere else; "x\n" stored as a
# trip could never be read or handed over.
NO_CONTROL = f"^[^{CONTROL_CHARS}]+(?!\\n)$"
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_CONTROL)]
_IDENT = re.compile(f"[^{CONTROL_CHARS}]{{1,64}}")
CONTROL = re.compile(f"[{CONTROL_CHARS}]")  # one control character, anywhere


def utf8(value: str) -> bool:
    """Whether ``value`` encodes to UTF-8: a lone surrogate (a JSON escape such as "\\ud800",
    or a header's bytes that are not UTF-8) does not, and PostgreSQL and Redis cannot take it."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def storable_id(value: str) -> bool:
    """Whether ``value`` could be a stored id (an Ident): anything else is no trip, asked of
    no database (a NUL would even fail the query)."""
    return _IDENT.fullmatch(value) is not None


# RFC 3339 text (validate.parse_rfc3339 reads it, so that digits below the millisecond are
# cut, not rounded as msgspec's datetime would), or epoch milliseconds.
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})] | int


# gc=False: these hold only scalars, never cycles, so the garbage collector can skip them.
class Location(msgspec.Struct, omit_defaults=True, gc=False):
    latitude: float
    longitude: float
    # RFC 3339 with an offset, or epoch milliseconds.
    timestamp: Timestamp
    accuracy: float | None = None
    speed: float | None = None
    heading: float | None = None
    altitude: float | None = None
    # The old app sends the batch id on every location.
    batchId: Ident | None = None


class PingBatch(msgspec.Struct):
    tripId: Ident
    driverId: Ident
    locations: Annotated[list[Location], msgspec.Meta(min_length=1)]
    batchId: Ident | None = None


# msgpack also has a timestamp extension type (-1); JSON Schema has no word for it, so only
# the msgpack decoder's subclasses take it (validate.to_records reads its seconds and ns).
class _PackedLocation(Location, gc=False):
    timestamp: Timestamp | msgspec.msgpack.Ext  # type: ignore[assignment]


class _PackedBatch(PingBatch):
    locations: Annotated[list[_PackedLocation], msgspec.Meta(min_length=1)]  # type: ignore[assignment]


class Rejected(msgspec.Struct):
    index: int
    reason: str


class PingAck(msgspec.Struct):
    """200: accepted = newly stored, duplicates = already stored before."""

    batchId: str | None
    accepted: int
    duplicates: int
    rejected: list[Rejected]


class PingQueued(msgspec.Struct):
    """202 in ACK_MODE=buffered: the batch is in memory and will be committed."""

    batchId: str | None
    queued: int
    rejected: list[Rejected]


class Error(msgspec.Struct, omit_defaults=True):
    error: str
    detail: str | None = None
    rejected: list[Rejected] | None = None


class Handover(msgspec.Struct, forbid_unknown_fields=True):
    """PUT .../trips/{tripId}/driver: the driver the trip is handed over to."""

    driverId: Ident


class TripOwner(msgspec.Struct):
    tripId: str
    driverId: str


class StoredLocation(msgspec.Struct, omit_defaults=True, gc=False):
    """A committed location as the read API and live messages carry it."""

    latitude: float
    longitude: float
    timestamp: datetime
    accuracy: float | None = None
    speed: float | None = None
    heading: float | None = None
    altitude: float | None = None


class LatestLocation(msgspec.Struct):
    tripId: str
    driverId: str
    location: StoredLocation


class NearbyTrip(msgspec.Struct):
    tripId: str
    driverId: str
    distanceM: float
    location: msgspec.Raw  # the latest location's JSON as stored, not decoded


class NearbyTrips(msgspec.Struct):
    trips: list[NearbyTrip]


class GeofenceIn(msgspec.Struct):
    """POST /api/v1/geofences. The geometry's own rules are geofence_shapes.parse_shape's."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_CONTROL)]
    geometry: dict[str, Any]
    radiusM: Any = None


class Geofence(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    geometry: msgspec.Raw  # GeoJSON as accepted
    createdAt: datetime
    radiusM: float | None = None


class GeofenceList(msgspec.Struct):
    geofences: list[Geofence]


class GeofenceEvent(msgspec.Struct):
    geofenceId: str
    event: str  # enter | exit
    tripId: str
    driverId: str
    timestamp: datetime
    location: StoredLocation


class GeofenceEvents(msgspec.Struct):
    events: list[GeofenceEvent]
    nextCursor: str | None


class LocationPage(msgspec.Struct):
    tripId: str
    locations: list[StoredLocation]
    nextCursor: str | None


class TripStop(msgspec.Struct):
    """Pings staying within 30 m of the first one for at least 120 s (docs/api.md)."""

    start: datetime
    end: datetime
    location: StoredLocation  # the stop's first point
    durationS: float


class TripSummary(msgspec.Struct):
    """GET .../trips/{tripId}/summary (docs/api.md#trip-summary)."""

    tripId: str
    driverId: str  # the driver of the newest ping
    start: datetime
    end: datetime
    pings: int
    distanceM: float  # great-circle, along the stored points, jumps skipped
    durationS: float  # end - start
    maxSpeed: float | None  # the highest reported speed (m/s); null when none was reported
    avgSpeed: float | None  # distanceM / durationS; null for a single ping
    stops: list[TripStop]
    stopsTruncated: bool = False  # more stops than the first 1000 listed


class LiveLocations(msgspec.Struct, tag="locations", tag_field="type"):
    # First after the tag so a pod can read it without decoding the message.
    publishedAt: int  # epoch ms
    tripId: str
    driverId: str
    locations: list[StoredLocation]


class LiveSnapshot(msgspec.Struct, tag="snapshot", tag_field="type"):
    tripId: str
    driverId: str
    location: StoredLocation


class LiveGeofence(msgspec.Struct, tag="geofence", tag_field="type"):
    """A trip entered or left a geofence: sent once to the org's fleet subscribers."""

    event: str  # enter | exit
    geofenceId: str
    geofenceName: str
    tripId: str
    driverId: str
    timestamp: datetime
    location: StoredLocation


class LiveError(msgspec.Struct, tag="error", tag_field="type"):
    error: str
    detail: str


class LiveSubscribed(msgspec.Struct, tag="subscribed", tag_field="type"):
    trips: list[str]
    fleet: bool


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="type"):
    trips: list[Ident] = []
    fleet: bool = False


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="type"):
    trips: list[Ident] = []
    fleet: bool = False


class Refresh(msgspec.Struct, tag="refresh", tag_field="type"):
    """A new token of the same subject, org and role: the socket then lives until its exp."""

    token: str


class LiveRefreshed(msgspec.Struct, tag="refreshed", tag_field="type"):
    exp: int | None  # the new token's exp, epoch seconds (None: never, auth disabled)


class LiveSubscribeFailed(msgspec.Struct, tag="error", tag_field="type"):
    """error "subscribe_failed": what Redis did not confirm in time (not subscribed)."""

    error: str
    detail: str
    trips: list[str]
    fleet: bool


ClientMessage = Subscribe | Unsubscribe | Refresh

# What decoding a client's bytes can raise besides msgspec's errors (a ValidationError is a
# DecodeError): RecursionError for nesting deeper than the stack, even in an ignored field,
# and UnicodeDecodeError for a string that is not UTF-8. Each is the client's 400.
DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)

json_batch_decoder = msgspec.json.Decoder(PingBatch)
msgpack_batch_decoder: msgspec.msgpack.Decoder[PingBatch] = msgspec.msgpack.Decoder(_PackedBatch)
client_message_decoder = msgspec.json.Decoder(ClientMessage)
encoder = msgspec.json.Encoder()
