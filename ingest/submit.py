"""The pipeline entry both the native and the phone-app endpoints call: the driver's rate
limit, then submit(): validate, buffer, and (durable ack) wait for the commit.

Endpoints decode their own formats into a PingBatch and render a Submitted their own way.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from aiohttp import web

from . import metrics
from .auth import Principal
from .buffer import AckTimeout, BufferFull, Closed, Refused
from .flush import ShuttingDown
from .responses import error, json_response, retry_later
from .schema import PingAck, PingBatch, PingQueued, Rejected
from .typedefs import BUFFER, FLUSHER, RATE_LIMITER, SETTINGS
from .validate import BatchError, to_records


def rate_wait(app: web.Application, principal: Principal) -> float:
    """Spend one request of the driver's rate limit: 0, or the seconds until one is free.
    Keyed by (org, sub): driver ids are unique only within an org."""
    return app[RATE_LIMITER].take((principal.org, principal.sub))


def rate_limited(wait: float) -> web.Response:
    """The 429 of every ingest endpoint, counted."""
    metrics.RATE_LIMITED.inc()
    return error(
        429, "rate_limited", "too many requests for this driver",
        headers={"Retry-After": str(math.ceil(wait))},
    )  # fmt: skip


class Submitted:
    """What became of a batch handed to the pipeline; each endpoint renders it its own way."""

    __slots__ = ("accepted", "batch_id", "duplicates", "error", "queued", "rejected", "status")

    def __init__(
        self, status: int, batch_id: str | None, rejected: list[Rejected], *,
        accepted: int = 0, duplicates: int = 0, queued: int = 0,
        error: tuple[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.status = status
        self.batch_id = batch_id
        self.rejected = rejected
        self.accepted = accepted
        self.duplicates = duplicates
        self.queued = queued
        self.error = error

    def response(self) -> web.Response:
        """The native endpoint's answer (docs/api.md)."""
        if self.status == 200:
            return json_response(
                PingAck(self.batch_id, self.accepted, self.duplicates, self.rejected)
            )
        if self.status == 202:
            return json_response(PingQueued(self.batch_id, self.queued, self.rejected), 202)
        code, detail = self.error or ("internal_error", "")
        if self.status == 503:
            return retry_later(code, detail)
        return error(self.status, code, detail, rejected=self.rejected or None)


async def submit(
    app: web.Application, principal: Principal, batch: PingBatch, batch_id: str | None
) -> Submitted:
    """Validate the pings of an authorised, well-formed batch, buffer them, and (durable ack)
    wait for their commit. Shared by the native and the phone-app endpoints."""
    settings = app[SETTINGS]
    labels: list[str] = []
    try:
        records, rejected = to_records(
            batch, principal.org, batch_id, datetime.now(UTC),
            settings.max_clock_skew_s, settings.max_ping_age_days, labels,
        )  # fmt: skip
    except BatchError as exc:  # a timestamp that is not RFC 3339: malformed, like msgspec's 400
        return Submitted(400, batch_id, [], error=("invalid_payload", str(exc)))
    metrics.PINGS_RECEIVED.inc(len(batch.locations))
    for label in labels:
        metrics.PINGS_REJECTED.labels(label).inc()
    if not records:
        metrics.BATCH["rejected"].inc()
        return Submitted(
            422, batch_id, rejected, error=("no_valid_pings", "every ping broke a range rule")
        )

    buffer = app[BUFFER]
    # Buffered acks answer before the flush checks the trip's owner, except where this pod saw
    # moments ago that it would refuse: then the request waits for its flush (403 or 429).
    buffered = settings.ack_mode == "buffered" and not app[FLUSHER].owners.must_wait(
        principal.org, batch.tripId, batch.driverId
    )
    try:
        pending = buffer.add(records, batch.driverId, batch_id, durable=not buffered)
    except BufferFull:
        metrics.BATCH["overloaded"].inc()
        return Submitted(503, batch_id, rejected, error=("overloaded", "ingest buffer is full"))
    except Closed:
        metrics.BATCH["overloaded"].inc()
        return Submitted(
            503, batch_id, rejected, error=("shutting_down", "this instance is shutting down")
        )
    if pending.future is None:
        metrics.BATCH["queued"].inc()
        return Submitted(202, batch_id, rejected, queued=len(records))

    started = time.perf_counter()
    try:
        await pending.future  # failed with AckTimeout by the sweeper after ACK_TIMEOUT_MS
    except AckTimeout:
        metrics.BATCH["timeout"].inc()
        return Submitted(
            503, batch_id, rejected,
            error=("storage_unavailable", "not committed in time; retry the same batch"),
        )  # fmt: skip
    except Refused as exc:
        return Submitted(exc.status, batch_id, rejected, error=(exc.code, exc.detail))
    except ShuttingDown:
        metrics.BATCH["timeout"].inc()
        return Submitted(
            503, batch_id, rejected,
            error=("shutting_down", "this instance is shutting down; retry the same batch"),
        )  # fmt: skip
    except Exception:
        metrics.BATCH["failed"].inc()
        return Submitted(
            500, batch_id, rejected, error=("storage_error", "the batch could not be stored")
        )
    metrics.ACK_SECONDS.observe(time.perf_counter() - started)
    if settings.ack_mode == "buffered":  # waited for its flush (see above), answered as queued
        metrics.BATCH["queued"].inc()
        return Submitted(202, batch_id, rejected, queued=len(records))
    metrics.BATCH["committed"].inc()
    return Submitted(
        200, batch_id, rejected, accepted=pending.accepted, duplicates=pending.duplicates
    )
