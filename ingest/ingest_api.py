"""POST /api/v1/tracking/ping: authenticate, decode, validate, buffer, await the commit."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime

import msgspec
from aiohttp import web

from . import metrics
from .auth import AuthError, Principal, may_post_as
from .buffer import BufferFull, Closed
from .responses import error, json_response, retry_later
from .schema import PingAck, PingBatch, PingQueued, json_batch_decoder, msgpack_batch_decoder
from .typedefs import BUFFER, RATE_LIMITER, SETTINGS, VERIFIER
from .validate import BatchError, batch_id_of, to_records

_DECODERS = {
    "application/json": json_batch_decoder,
    "application/msgpack": msgpack_batch_decoder,
    "application/x-msgpack": msgpack_batch_decoder,
}
_ENCODINGS = {"", "identity", "gzip", "x-gzip", "deflate"}


def authenticate(request: web.Request) -> Principal:
    """The caller's principal; raises AuthError. Browsers' WebSockets may use ?access_token=."""
    header = request.headers.get("Authorization")
    token = None
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        token = value.strip()
    else:
        token = request.query.get("access_token") or None
    return request.app[VERIFIER].verify(token)


def unauthorized(exc: AuthError) -> web.Response:
    return error(401, "unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"})


async def post_ping(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    try:
        principal = authenticate(request)
    except AuthError as exc:
        return unauthorized(exc)
    if principal.role != "driver" and not settings.auth_disabled:
        return error(403, "forbidden", "only driver tokens may post pings")
    wait = app[RATE_LIMITER].take(principal.sub)
    if wait:
        metrics.RATE_LIMITED.inc()
        return error(
            429, "rate_limited", "too many requests for this driver",
            headers={"Retry-After": str(math.ceil(wait))},
        )  # fmt: skip
    decoder = _DECODERS.get(request.content_type)
    if decoder is None:
        return error(
            415, "unsupported_media_type",
            "Content-Type must be application/json or application/msgpack",
        )  # fmt: skip
    if request.headers.get("Content-Encoding", "").lower() not in _ENCODINGS:
        return error(415, "unsupported_media_type", "Content-Encoding must be gzip or identity")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error(413, "payload_too_large", f"body larger than {settings.max_body_bytes} bytes")
    try:
        batch: PingBatch = decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return error(400, "invalid_payload", str(exc))
    if not may_post_as(principal, batch.driverId, settings.auth_disabled):
        return error(403, "forbidden", "driverId does not match the token's subject")
    if len(batch.locations) > settings.max_pings_per_batch:
        return error(
            400, "invalid_payload",
            f"$.locations: at most {settings.max_pings_per_batch} pings per batch",
        )  # fmt: skip
    try:
        batch_id = batch_id_of(batch)
    except BatchError as exc:
        return error(400, "invalid_payload", str(exc))

    labels: list[str] = []
    records, rejected = to_records(
        batch, principal.org, batch_id, datetime.now(UTC),
        settings.max_clock_skew_s, settings.max_ping_age_days, labels,
    )  # fmt: skip
    metrics.PINGS_RECEIVED.inc(len(batch.locations))
    for label in labels:
        metrics.PINGS_REJECTED.labels(label).inc()
    if not records:
        metrics.BATCHES.labels("rejected").inc()
        return error(422, "no_valid_pings", "every ping broke a range rule", rejected=rejected)

    durable = settings.ack_mode == "durable"
    buffer = app[BUFFER]
    try:
        pending = buffer.add(records, batch.driverId, batch_id, durable)
    except BufferFull:
        metrics.BATCHES.labels("overloaded").inc()
        return retry_later("overloaded", "ingest buffer is full, retry later")
    except Closed:
        metrics.BATCHES.labels("overloaded").inc()
        return retry_later("shutting_down", "this instance is shutting down, retry")
    metrics.BUFFER_ROWS.set(buffer.depth)
    if pending.future is None:
        metrics.BATCHES.labels("queued").inc()
        return json_response(PingQueued(batch_id, len(records), rejected), 202)

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.shield(pending.future), settings.ack_timeout_ms / 1000)
    except TimeoutError:
        metrics.BATCHES.labels("timeout").inc()
        return retry_later("storage_unavailable", "not committed in time; retry the same batch")
    except Exception:
        metrics.BATCHES.labels("failed").inc()
        return error(500, "storage_error", "the batch could not be stored")
    metrics.ACK_SECONDS.observe(time.perf_counter() - started)
    metrics.BATCHES.labels("committed").inc()
    return json_response(PingAck(batch_id, pending.accepted, pending.duplicates, rejected))
