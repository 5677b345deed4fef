"""Per-ping range rules: keep the good pings of a batch as COPY-ready records, list the bad ones.

This loop runs once per ping, so it does only comparisons and one tuple per ping; the
reason text of a rejected ping is worked out only on the (rare) bad path.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from .records import Record
from .schema import Location, PingBatch, Rejected

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX = 1.7976931348623157e308
_fromiso = datetime.fromisoformat
_fromts = datetime.fromtimestamp
_EXACT_MS = 2**33 * 1000
_YEAR_4 = timedelta(days=1461)  # 0000-01-01 to 0004-01-01
# text[4:17:3] of an RFC 3339 date-time: the date's dashes, the separator msgspec took
# between date and time ('T', 't' or a space), the time's colons.
_HEADS = frozenset({"--T::", "--t::", "-- ::"})
_LOCAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?")


class BatchError(ValueError):
    """The batch as a whole is invalid (400); the message names the path."""


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 date-time with an offset, its digits below the millisecond cut off first
    (``.2509999`` is ``.250``; ``.9999999`` stays in its second), in the text's own offset
    (but see the year 0000 below).

    Accepts what msgspec's datetime accepted: 'T', 't' or a space between date and time, any
    number of fraction digits, 'Z', 'z', '+HH:MM' or '+HHMM'; no leap second (:60), no 24:00.
    fromisoformat alone would also take ISO 8601 forms that are not RFC 3339 (week dates,
    basic format, a missing offset or seconds, any separator, "+05", "+05:60", "+05.5"), and
    it ends the text at a NUL after a 'Z' ("10:Z\x00:00Z" is 10:00Z), so the layout is checked
    here and fromisoformat checks the digits and ranges. Raises ValueError.

    The year 0000 is valid RFC 3339, but not a datetime: such a time is given in UTC, where
    it is the year 1 at most (OverflowError if earlier, like astimezone beyond the year 1).
    """
    head = text[4:17:3]
    if head not in _HEADS or "\x00" in text:
        raise ValueError(text)
    last = text[-1]
    if last == "Z" or last == "z":
        cut, offset = -1, "Z"  # fromisoformat takes only 'Z'
    else:
        cut = -6 if text[-3] == ":" else -5  # +HH:MM or +HHMM
        offset = text[cut:]
        hours, minutes = offset[1:3], offset[-2:]
        if not (
            offset[0] in "+-"
            and hours.isascii() and hours.isdecimal()
            and minutes.isascii() and minutes.isdecimal() and minutes < "60"
        ):  # fmt: skip
            raise ValueError(text)
    main = text[:cut]
    if len(main) != 19:  # "YYYY-MM-DDTHH:MM:SS" and a fraction
        fraction = main[20:]
        if main[19:20] != "." or not (fraction.isascii() and fraction.isdecimal()):
            raise ValueError(text)
        main = main[:23]  # digits below the millisecond: dropped, never rounded
    if head[2] != "T":
        main = f"{main[:10]}T{main[11:]}"
    try:
        return _fromiso(main + offset)
    except ValueError:
        if main[:4] != "0000":
            raise
    # Read as the year 4, which is a leap year too (same valid dates), then moved back.
    return _fromiso(f"0004{main[4:]}{offset}").astimezone(UTC) - _YEAR_4


def rfc3339_problem(text: str) -> str:
    """What is wrong with a time parse_rfc3339 refused, for a 400's detail."""
    if _LOCAL.fullmatch(text):
        return "the time needs an offset, e.g. Z"
    return "expected an RFC 3339 time with an offset (e.g. 2026-11-23T10:15:00.250Z) or epoch ms"


def _ext_ms(value: object, i: int) -> int:
    """Epoch ms of a msgpack timestamp extension (type -1), nanoseconds cut to the ms."""
    data = getattr(value, "data", b"")
    if getattr(value, "code", None) == -1 and len(data) in (4, 8, 12):
        if len(data) == 4:  # uint32 seconds
            ns, s = 0, int.from_bytes(data)
        elif len(data) == 8:  # 30 bits of ns, 34 of seconds
            packed = int.from_bytes(data)
            ns, s = packed >> 34, packed & 0x3_FFFF_FFFF
        else:  # uint32 ns, int64 seconds
            ns, s = int.from_bytes(data[:4]), int.from_bytes(data[4:], signed=True)
        if ns < 1_000_000_000:
            return s * 1000 + ns // 1_000_000
    raise BatchError(
        f"$.locations[{i}].timestamp: expected RFC 3339 text, epoch milliseconds or a msgpack"
        " timestamp"
    )


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


def _unusual(raw: str, i: int, lo: datetime, hi: datetime) -> tuple[datetime, bool]:
    """(time, in the window) of a text to_records' parse refused: the year 0000, which its
    fast path's fromisoformat refuses and parse_rfc3339 reads; else BatchError (malformed)."""
    if raw[:4] == "0000":
        try:
            ts = parse_rfc3339(raw)
            return ts, lo <= ts <= hi
        except OverflowError:
            return lo, False
        except ValueError:
            pass
    raise BatchError(f"$.locations[{i}].timestamp: {rfc3339_problem(raw)}") from None


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
    # Within the years 1698-2242 (+-2**33 s), fromtimestamp(ms / 1000) below is exact to the ms;
    # only a window set wider than 119,000 days would reach beyond.
    lo_ms = max(int((lo - EPOCH).total_seconds() * 1000), -_EXACT_MS)
    hi_ms = min(int((hi - EPOCH).total_seconds() * 1000), _EXACT_MS)
    trip, driver = batch.tripId, batch.driverId
    records: list[Record] = []
    rejected: list[Rejected] = []
    append = records.append
    fromiso, fmax = _fromiso, _MAX  # locals: this loop runs once per ping
    ts: datetime
    for i, loc in enumerate(batch.locations):
        raw = loc.timestamp
        if type(raw) is str:
            # Cut to the ms before parsing (docs/api.md), so that dedup keys agree; in UTC, as it
            # is published downstream. Out of range in UTC (year 0 or 10000): rejected.
            try:
                # The driver app's "2026-11-23T10:15:00.250Z": to the ms, in UTC already.
                # Given its length and 'Z', these three characters rule out the ISO 8601 forms
                # fromisoformat also takes (week dates, basic format, ',', any separator).
                if (
                    len(raw) == 24 and raw[23] == "Z" and raw[19] == "." and raw[10] == "T"
                    and raw[7] == "-" and "\x00" not in raw  # NUL: see parse_rfc3339
                ):  # fmt: skip
                    ts = fromiso(raw)
                else:
                    ts = parse_rfc3339(raw)
                    if ts.tzinfo is not UTC:
                        ts = ts.astimezone(UTC)
                ts_ok = lo <= ts <= hi
            except ValueError:
                ts, ts_ok = _unusual(raw, i, lo, hi)
            except OverflowError:
                ts, ts_ok = lo, False
        else:
            ms = raw if type(raw) is int else _ext_ms(raw, i)
            ts_ok = lo_ms <= ms <= hi_ms
            ts = _fromts(ms / 1000, UTC) if ts_ok else lo  # 2x faster than EPOCH + timedelta
        lat = loc.latitude  # one by one: a tuple assignment of 4+ builds and unpacks a tuple
        lon = loc.longitude
        acc = loc.accuracy
        speed = loc.speed
        heading = loc.heading
        alt = loc.altitude
        if (
            ts_ok
            and -90.0 <= lat <= 90.0
            and -180.0 <= lon <= 180.0
            and (acc is None or 0.0 <= acc <= fmax)
            and (speed is None or 0.0 <= speed <= fmax)
            and (heading is None or 0.0 <= heading < 360.0)
            and (alt is None or -fmax <= alt <= fmax)
        ):
            append((trip, driver, org, lat, lon, acc, speed, heading, alt, ts, batch_id))
        else:
            label, reason = _reason(loc, ts_ok, skew_s, age_days)
            rejected.append(Rejected(index=i, reason=reason))
            if rejected_labels is not None:
                rejected_labels.append(label)
    return records, rejected
