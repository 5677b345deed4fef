"""What the phone-app endpoints share: identity, units, timestamps, submitting.

Each app module maps its own wire format onto schema.PingBatch and hands it to
submit.submit(), so validation, buffering, COPY, dedup, the durable ack, latest and
live publishing are exactly those of the native endpoint. Only the answers differ.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from ..auth import DEV_PRINCIPAL, Principal
from ..body import read_body as decoded_body
from ..responses import error, retry_later
from ..schema import CONTROL, Location, PingBatch, Rejected, utf8
from ..submit import Submitted, submit
from ..typedefs import SETTINGS

log = logging.getLogger("ingest.phone_apps")

# Units: the native (stored) ones are metres, degrees, m/s and epoch milliseconds.
KNOT = 1852 / 3600  # m/s in one knot (one nautical mile, 1852 m, per hour)
KMH = 1 / 3.6  # m/s in one km/h
# Traccar's rule for epoch numbers: below 2^31 - 1 it is seconds, otherwise milliseconds.
_INT32_MAX = 2_147_483_647
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_DECIMAL = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")  # epoch seconds or ms, as text


class FormatError(ValueError):
    """The app's request is malformed: 400, the message names the field."""


def invalid(exc: Exception) -> web.Response:
    return error(400, "invalid_payload", str(exc))


# -- trip and driver ---------------------------------------------------------------------------


def ident(value: str, field: str, strip: bool = True) -> str:
    """A valid id from ``value``: an app's device id is stripped of surrounding blanks; the
    token's subject is taken as it is (``strip=False``): stripped, "drv_1 " would post as
    "drv_1", the driver the native endpoint keeps it apart from."""
    if strip:
        value = value.strip()
    if not 1 <= len(value) <= 64 or CONTROL.search(value):
        raise FormatError(f"{field}: must be 1-64 characters, without control characters")
    if not utf8(value):  # a header's bytes that are not UTF-8 arrive as lone surrogates
        raise FormatError(f"{field}: must be valid UTF-8")
    return value


def identity(principal: Principal, device: str | None, field: str) -> tuple[str, str]:
    """(tripId, driverId): the device id names the trip, the token's subject is the driver.

    Without a device id the trip is the driver's own id. With AUTH_DISABLED and no token
    (development) there is no subject, so the device id is the driver too.
    """
    trip = ident(device, field) if device is not None and device.strip() else None
    if principal is DEV_PRINCIPAL:
        driver = trip or "dev"
    else:
        driver = ident(principal.sub, "the token's subject (sub)", strip=False)
    return trip or driver, driver


# -- units and times ---------------------------------------------------------------------------


def unknown_if_negative(value: float | None) -> float | None:
    """Phones report -1 for a speed or course they do not know."""
    return None if value is None or value < 0 else value


def course(value: float | None) -> float | None:
    """A heading in [0, 360): -1 means unknown, and 360 (a rounded 359.6) is north."""
    value = unknown_if_negative(value)
    return 0.0 if value == 360.0 else value


def epoch_ms(value: float, field: str) -> int:
    """Epoch seconds (below 2^31) or milliseconds, as integer milliseconds.

    Any magnitude: one far from now is that fix's rejection (the accepted window). A float
    is rounded to the ms: a binary fraction has no decimal digits to cut (time_ms cuts text).
    """
    if isinstance(value, bool):
        raise FormatError(f"{field}: must be a finite number")
    if isinstance(value, int):  # exact; math.isfinite() would overflow beyond 1e308
        return value * 1000 if abs(value) < _INT32_MAX else value
    if not math.isfinite(value):
        raise FormatError(f"{field}: must be a finite number")
    return round(value * 1000) if abs(value) < _INT32_MAX else round(value)


def _decimal_ms(sign: str, whole: str, fraction: str) -> int:
    """Epoch ms of a plain decimal's text, exactly: digits below the millisecond are cut."""
    whole = whole.lstrip("0")
    if len(whole) > 20:  # beyond any window, and int() refuses 4300 digits
        whole = "9" * 21
    seconds = int(whole or "0")
    ms = seconds * 1000 + int(f"{fraction[:3]:0<3}") if seconds < _INT32_MAX else seconds
    return -ms if sign == "-" else ms


_FOUR_YEARS_MS = 1461 * 86_400_000


def datetime_ms(value: datetime) -> int:
    if value.tzinfo is None:  # no offset given: UTC
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MS  # whole milliseconds, as the native endpoint stores them


def iso_ms(text: str) -> int:
    """Epoch ms of an ISO 8601 time (any offset form; none means UTC). Digits below the
    millisecond are dropped, never rounded: fromisoformat truncates to the microsecond and
    datetime_ms floors. Raises ValueError; also for a NUL, as fromisoformat ends the text at a
    NUL after a 'Z' ("10:Z\x00:00Z" would be 10:00Z)."""
    if "\x00" in text:
        raise ValueError(text)
    try:
        return datetime_ms(datetime.fromisoformat(text))
    except ValueError:
        if not text.startswith("0000"):
            raise
    # The year 0000 (datetime's range starts at 1): read as the year 4, a leap year too, and
    # moved back; far outside the accepted window, so that ping's rejection, not a 400.
    return datetime_ms(datetime.fromisoformat("0004" + text[4:])) - _FOUR_YEARS_MS


def time_ms(text: str, field: str) -> int:
    """Epoch seconds, epoch milliseconds or ISO 8601 (iso_ms); digits below the millisecond
    are dropped, never rounded."""
    text = text.strip()
    if (plain := _DECIMAL.fullmatch(text)) and (plain[2] or plain[3]):
        return _decimal_ms(plain[1], plain[2], plain[3] or "")
    try:  # exponents: 1.78e9
        number = float(text)
    except ValueError:
        pass
    else:
        return epoch_ms(number, field)
    try:
        return iso_ms(text)
    except ValueError:
        raise FormatError(
            f"{field}: expected epoch seconds, epoch milliseconds or an ISO 8601 time,"
            f" got {text[:40]!r}"
        ) from None


def number(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FormatError(f"{field}: expected a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise FormatError(f"{field}: must be a finite number")
    return value


# -- the request body --------------------------------------------------------------------------


async def read_body(request: web.Request) -> bytes | web.Response:
    """The (decompressed) body, or the 413/415 answer, as the native endpoint gives them."""
    return await decoded_body(request, request.app[SETTINGS].max_body_bytes)


# -- into the pipeline -------------------------------------------------------------------------


class Outcome:
    """What became of every ping of one app request, however many batches it took."""

    __slots__ = ("accepted", "duplicates", "error", "queued", "refused", "rejected", "status")

    def __init__(self) -> None:
        self.status = 200
        self.accepted = 0
        self.duplicates = 0
        self.queued = 0
        self.refused = 0  # pings of parts the flush refused for good, answered as done (fold)
        self.rejected: list[Rejected] = []  # pings dropped by a range rule (batch indexes)
        self.error: tuple[str, str] = ("", "")

    @property
    def done(self) -> bool:
        """Every ping is committed (or queued, in ACK_MODE=buffered) or was dropped for good."""
        return self.status in (200, 202)

    def headers(self, ignored: int = 0) -> dict[str, str]:
        """Counts for people debugging with curl; the apps ignore them."""
        out = {
            "X-Ingest-Accepted": str(self.accepted),
            "X-Ingest-Duplicates": str(self.duplicates),
            "X-Ingest-Rejected": str(len(self.rejected)),
        }
        if self.queued:
            out["X-Ingest-Queued"] = str(self.queued)
        if self.refused:
            out["X-Ingest-Refused"] = str(self.refused)
        if ignored:
            out["X-Ingest-Ignored"] = str(ignored)
        return out


def failure(out: Outcome) -> web.Response:
    """The native error answer of an Outcome that is not stored: 503 + Retry-After, or 500."""
    code, detail = out.error
    if out.status == 503:
        return retry_later(code, detail)
    return error(out.status, code, detail)


def batches(
    groups: dict[tuple[str, str], list[Location]], max_pings: int, max_trips: int
) -> list[PingBatch]:
    """One PingBatch per (trip, driver), split to at most MAX_PINGS_PER_BATCH pings each.

    No batchId: these apps send none, and every ping is deduplicated by (tripId, timestamp)
    anyway (see docs/phone_apps.md). More than MAX_TRIPS_PER_REQUEST trips (device ids) in
    one request is refused whole: a phone tracks one device.
    """
    if len(groups) > max_trips:
        raise FormatError(
            f"$.locations: {len(groups)} distinct device ids (trips) in one request;"
            f" at most {max_trips} (MAX_TRIPS_PER_REQUEST)"
        )
    return [
        PingBatch(trip, driver, locations[start : start + max_pings])
        for (trip, driver), locations in groups.items()
        for start in range(0, len(locations), max_pings)
    ]


async def submit_all(
    app: web.Application, principal: Principal, parts: list[PingBatch], source: str
) -> Outcome:
    """Submit every batch at once and fold the results into one Outcome."""
    results = await asyncio.gather(*(submit(app, principal, b, None) for b in parts))
    return fold(zip(parts, results, strict=True), source)


# Why the flush refuses a batch for good (buffer.Refused): its trip is another driver's;
# resending the same points cannot help. Not too_many_trips: the limit is over the last 24
# hours, so a resend later can store them (a 429 makes the app resend, nothing is dropped).
_REFUSALS = frozenset({"trip_owned_by_another_driver"})


def fold(results: Iterable[tuple[PingBatch, Submitted]], source: str) -> Outcome:
    """One Outcome for all the batches of a request.

    A batch whose every ping broke a range rule (422 natively) counts as done: those pings
    can never be stored, and an error would make the app resend them forever, holding up
    everything queued behind them on the phone. They are logged and counted in metrics.

    A batch the flush refused for good (another driver's trip) is the answer (403, as
    natively) only if nothing of the request is stored. If another
    batch of it is (an Overland request with several device ids), the request is done and
    the refused pings dropped, logged and counted (ingest_batches_refused_total): their
    trip was decided at the flush, after the rest was committed and published, and an error
    would make Overland resend the whole request forever. Anything else not done (503, 500)
    wins, and so does a 429 (too many new trips today: a resend later can store them): the
    app resends, and what was stored comes back as duplicates.
    """
    out = Outcome()
    any_queued = False
    refusal: Submitted | None = None
    refused = 0
    refused_rejected: list[Rejected] = []
    for batch, r in results:
        if r.status in (200, 202, 422):
            out.accepted += r.accepted
            out.duplicates += r.duplicates
            out.queued += r.queued
            out.rejected.extend(r.rejected)
            any_queued = any_queued or r.status == 202
        elif r.error is not None and r.error[0] in _REFUSALS:
            refusal = refusal or r
            refused += len(batch.locations) - len(r.rejected)
            refused_rejected.extend(r.rejected)
        elif out.status not in (500, 503) or r.status == 503:  # retry-later wins over 500
            out.status = r.status
            out.error = r.error or ("internal_error", "")
    if refusal is not None and refusal.error is not None and out.status == 200:
        if out.accepted or out.duplicates or out.queued:  # a part is stored: cannot undo it
            out.refused = refused
            out.rejected.extend(refused_rejected)
            log.warning(
                "phone_app_pings_refused",
                extra={"app": source, "count": refused, "reason": refusal.error[0]},
            )
        else:  # nothing stored: refused whole, as on the native endpoint
            out.status = refusal.status
            out.error = refusal.error
    if any_queued and out.status == 200:
        out.status = 202
    if out.rejected:
        log.info(
            "phone_app_pings_dropped",
            extra={"app": source, "count": len(out.rejected), "reason": out.rejected[0].reason},
        )
    return out
