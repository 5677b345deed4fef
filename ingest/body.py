"""Request bodies: the Content-Encoding is decoded here, under the same size limit as the
body itself, so a compression bomb is refused after MAX_BODY_BYTES of output, never inflated.

aiohttp's own decompression is off (create_app): it answers an encoding it knows but cannot
decode (br, zstd without their libraries) with a plain-text 400 before any handler runs, and
it passes x-gzip through undecoded.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from . import http_server
from .responses import error
from .typedefs import SETTINGS

ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
_MAX_MEMBERS = 64  # gzip members in one body (RFC 1952 allows several, concatenated)


def unsupported(request: web.Request) -> web.Response | None:
    """The 415 answer for a Content-Encoding this service does not decode, else None."""
    if request.headers.get("Content-Encoding", "").strip().lower() in ENCODINGS:
        return None
    return error(415, "unsupported_media_type", "Content-Encoding must be gzip or identity")


async def read_body(request: web.Request, limit: int) -> bytes | web.Response:
    """The decoded body, or the 415 / 413 / 408 / 400 answer."""
    refused = unsupported(request)
    if refused is not None:
        return refused
    try:
        if request.content.is_eof():  # the usual case: the body came with the head
            raw = await request.read()  # at most client_max_size (MAX_BODY_BYTES) on the wire
        else:
            raw = await _read_in_time(request)
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit)
    except TimeoutError:
        http_server.body_timed_out(request)
        timeout = request.app[SETTINGS].http_body_timeout_s
        response = error(408, "request_timeout", f"body not received within {timeout:g} s")
        response.force_close()
        return response
    except ConnectionError:  # the client went away, or was closed as the slowest one waiting
        return error(400, "invalid_payload", "the connection closed before the body ended")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    try:
        body = _inflate(raw, encoding, limit)
    except zlib.error as exc:
        return error(400, "invalid_payload", f"body is not valid {encoding}: {exc}")
    return _too_large(limit) if body is None else body


async def _read_in_time(request: web.Request) -> bytes:
    """The rest of the body, within HTTP_BODY_TIMEOUT_S (TimeoutError if not)."""
    with http_server.waiting_for_body(request):
        async with asyncio.timeout(request.app[SETTINGS].http_body_timeout_s):
            return await request.read()


def _too_large(limit: int) -> web.Response:
    return error(413, "payload_too_large", f"body larger than {limit} bytes")


def _inflate(raw: bytes, encoding: str, limit: int) -> bytes | None:
    """At most ``limit`` decompressed bytes; None if the body holds more."""
    if encoding == "deflate":  # a zlib stream (RFC 9110); some clients send raw deflate
        wbits = zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    parts: list[bytes] = []
    size, data = 0, raw
    for _ in range(_MAX_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(data, limit - size + 1)  # one byte more tells "too large"
        size += len(part)
        if size > limit:
            return None
        if not inflater.eof:
            raise zlib.error("the stream is truncated")
        parts.append(part)
        data = inflater.unused_data
        if not data or encoding == "deflate":
            return b"".join(parts)
    raise zlib.error(f"more than {_MAX_MEMBERS} gzip members")
