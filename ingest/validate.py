"""Per-ping range rules: keep the good pings of a batch as COPY-ready records, list the bad ones.

This loop runs once per ping, so it does only comparisons and one tuple per ping; the
reason text of a rejected ping is worked out only on the (rare) bad path.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Final

from .schema import Location, PingBatch, Rejected

# Column order of a record, as COPY receives it.
COLUMNS = (
    "tripId",
    "driverId",
    "orgId",
    "latitude",
    "longitude",
    "accuracy",
    "speed",
    "heading",
    "altitude",
    "timestamp",
    "batchId",
)
# Indexes into a record, for the stages downstream.
TRIP: Final = 0
DRIVER: Final = 1
ORG: Final = 2
LAT: Final = 3
LON: Final = 4
ACC: Final = 5
SPEED: Final = 6
HEADING: Final = 7
ALT: Final = 8
TS: Final = 9
BATCH: Final = 10

Record = tuple[
    str, str, str | None, float, float, float | None, float | None, float | None, float | None,
    datetime, str | None,
]  # fmt: skip

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX = 1.7976931348623157e308


class BatchError(ValueError):
    """The batch as a whole is invalid (400); the message names the path."""


def batch_id_of(batch: PingBatch) -> str | None:
    """The batch's idempotency key: top-level, else the one the old app puts on every location."""
    if batch.batchId is not None:
        return batch.batchId
    first = batch.locations[0].batchId
    if first is None:
        return None
    for i, loc in enumerate(batch.locations):
        if loc.batchId != first:
            raise BatchError(f"$.locations[{i}].batchId differs from $.locations[0].batchId")
    return first


def _reason(loc: Location, ts_ok: bool, skew_s: int, age_days: int) -> tuple[str, str]:
    """(metric label, message) for a ping that failed the fast check."""
    lat, lon = loc.latitude, loc.longitude
    if not -90.0 <= lat <= 90.0:
        return "latitude", "latitude must be a finite number in [-90, 90]"
    if not -180.0 <= lon <= 180.0:
        return "longitude", "longitude must be a finite number in [-180, 180]"
    for name in ("accuracy", "speed"):
        v = getattr(loc, name)
        if v is not None and not 0.0 <= v <= _MAX:
            return name, f"{name} must be a finite number >= 0"
    if loc.heading is not None and not 0.0 <= loc.heading < 360.0:
        return "heading", "heading must be a number in [0, 360)"
    if loc.altitude is not None and not math.isfinite(loc.altitude):
        return "altitude", "altitude must be a finite number"
    if not ts_ok:
        return "timestamp", (
            f"timestamp outside the accepted window (at most {skew_s} s ahead of the server"
            f" clock, at most {age_days} days old)"
        )
    return "other", "invalid ping"  # pragma: no cover - the fast check and this agree


def to_records(
    batch: PingBatch,
    org: str | None,
    batch_id: str | None,
    now: datetime,
    skew_s: int,
    age_days: int,
    rejected_labels: list[str] | None = None,
) -> tuple[list[Record], list[Rejected]]:
    """Split ``batch`` into COPY records and rejected pings (index, reason)."""
    lo, hi = now - timedelta(days=age_days), now + timedelta(seconds=skew_s)
    lo_ms = int((lo - EPOCH).total_seconds() * 1000)
    hi_ms = int((hi - EPOCH).total_seconds() * 1000)
    trip, driver = batch.tripId, batch.driverId
    records: list[Record] = []
    rejected: list[Rejected] = []
    append = records.append
    for i, loc in enumerate(batch.locations):
        ts = loc.timestamp
        if type(ts) is int:
            ts_ok = lo_ms <= ts <= hi_ms
            if ts_ok:
                ts = EPOCH + timedelta(milliseconds=ts)
        else:
            ts_ok = lo <= ts <= hi  # type: ignore[operator]
            us = ts.microsecond  # type: ignore[union-attr]
            if us % 1000:  # stored to the millisecond: truncate so dedup keys agree
                ts = ts.replace(microsecond=us - us % 1000)  # type: ignore[union-attr]
            if ts.tzinfo is not UTC:  # type: ignore[union-attr]  # published as Z downstream
                ts = ts.astimezone(UTC)  # type: ignore[union-attr]
        acc, speed, heading, alt = loc.accuracy, loc.speed, loc.heading, loc.altitude
        if (
            ts_ok
            and -90.0 <= loc.latitude <= 90.0
            and -180.0 <= loc.longitude <= 180.0
            and (acc is None or 0.0 <= acc <= _MAX)
            and (speed is None or 0.0 <= speed <= _MAX)
            and (heading is None or 0.0 <= heading < 360.0)
            and (alt is None or -_MAX <= alt <= _MAX)
        ):
            append((trip, driver, org, loc.latitude, loc.longitude, acc, speed, heading, alt,
                    ts, batch_id))  # type: ignore[arg-type]  # fmt: skip
        else:
            label, reason = _reason(loc, ts_ok, skew_s, age_days)
            rejected.append(Rejected(index=i, reason=reason))
            if rejected_labels is not None:
                rejected_labels.append(label)
    return records, rejected
