"""POST /api/v1/tracking/ping: authenticate, decode, validate, buffer, await the commit."""

from __future__ import annotations

import msgspec
from aiohttp import web

from . import auth, metrics
from .body import read_body, unsupported
from .responses import error, retry_later
from .schema import DECODE_ERRORS, PingBatch, json_batch_decoder, msgpack_batch_decoder
from .submit import rate_limited, rate_wait, submit
from .typedefs import BUFFER, SETTINGS
from .validate import BatchError, batch_id_of

_DECODERS: dict[str, msgspec.json.Decoder[PingBatch] | msgspec.msgpack.Decoder[PingBatch]] = {
    "application/json": json_batch_decoder,
    "application/msgpack": msgpack_batch_decoder,
    "application/x-msgpack": msgpack_batch_decoder,
}


async def post_ping(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    principal = auth.authenticate(request)
    auth.require(principal, auth.POST_PINGS)
    if wait := rate_wait(app, principal):
        return rate_limited(wait)
    decoder = _DECODERS.get(request.content_type)
    if decoder is None:
        return error(
            415, "unsupported_media_type",
            "Content-Type must be application/json or application/msgpack",
        )  # fmt: skip
    refused = unsupported(request)
    if refused is not None:
        return refused
    buffer = app[BUFFER]  # shed load before reading or decoding anything
    if buffer.closed:
        return retry_later("shutting_down", "this instance is shutting down, retry")
    # In durable mode, a buffer that is not keeping up means waiting clients would time out.
    late = settings.ack_mode == "durable" and buffer.waited() * 1000 > settings.buffer_max_wait_ms
    if late or buffer.depth >= buffer.max_rows:
        metrics.BATCH["overloaded"].inc()
        return retry_later("overloaded", "ingest buffer is full, retry later")
    body = await read_body(request, settings.max_body_bytes)
    if isinstance(body, web.Response):
        return body
    try:
        batch: PingBatch = decoder.decode(body)
    except DECODE_ERRORS as exc:
        return error(400, "invalid_payload", str(exc))
    auth.require_driver_id(principal, batch.driverId)
    if len(batch.locations) > settings.max_pings_per_batch:
        return error(
            400, "invalid_payload",
            f"$.locations: at most {settings.max_pings_per_batch} pings per batch",
        )  # fmt: skip
    try:
        batch_id = batch_id_of(batch)
    except BatchError as exc:
        return error(400, "invalid_payload", str(exc))

    result = await submit(app, principal, batch, batch_id)
    return result.response()
