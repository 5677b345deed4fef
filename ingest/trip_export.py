"""A whole trip as GeoJSON or GPX 1.1, streamed (?format= on the history endpoint).

read_api.history hands a request with ``format=geojson|gpx`` to ``export``. Every page of
pings (trip_pages) is written, chunked, before the next one is fetched; a slow client slows
the fetching (write() waits for the socket to drain), so memory stays constant whatever the
trip's length and no pool connection is held while the client reads.

GeoJSON keeps a trip's times in a "times" array beside the coordinates: both arrays come from
one pass over the pages (a second pass could meet pings committed in between, and the two
arrays would no longer match), so the times wait in a temporary file, in memory up to
SPOOL_MEMORY_BYTES, until the coordinates are written.

An export holds one of the pod's few EXPORT_MAX_CONCURRENT slots for as long as its client
reads, so a client must keep up (Pace): EXPORT_MIN_BYTES_PER_S on average over the time the
pod waited for it, after EXPORT_RATE_GRACE_S; a slower one is cut off and its slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from xml.sax.saxutils import escape

import asyncpg
from aiohttp import web

from . import auth, trip_pages
from .responses import error
from .schema import encoder
from .trip_pages import ALTITUDE, DRIVER, LAT, LON, TS
from .typedefs import EXPORT_SLOTS, SETTINGS

log = logging.getLogger("ingest.export")

Write = Callable[[bytes], Awaitable[None]]
Pages = AsyncIterator[list[asyncpg.Record]]

FORMATS = ("json", "geojson", "gpx")
CONTENT_TYPES = {"geojson": "application/geo+json", "gpx": "application/gpx+xml"}
SPOOL_MEMORY_BYTES = 1 << 18
READ_CHUNK = 1 << 16
# A client that takes longer than this to accept one page's bytes is dropped, whatever its
# average: it would hold an export slot while reading nothing.
WRITE_TIMEOUT_S = 60.0
# Characters XML 1.0 does not allow (a stored id never has the C0 controls, but may have these).
_NOT_FILENAME = re.compile(r"[^A-Za-z0-9._-]")
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _times(rows: list[asyncpg.Record]) -> list[bytes]:
    """RFC 3339 texts, as the JSON API writes them, of a page's timestamps."""
    return encoder.encode([r[TS] for r in rows])[2:-2].split(b'","')


def _filename(trip: str) -> str:
    return _NOT_FILENAME.sub("_", trip)[:64]


def _decimal(x: float) -> str:
    """A float as xsd:decimal: no exponent."""
    text = repr(x)
    return f"{x:.12f}".rstrip("0") if "e" in text else text


def _gpx_head(trip: str) -> bytes:
    name = escape(_NOT_XML.sub("\ufffd", trip))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<gpx version="1.1" creator="ingest" xmlns="http://www.topografix.com/GPX/1/1">\n'
        f"<trk><name>{name}</name><trkseg>\n"
    ).encode()


def _gpx_points(rows: list[asyncpg.Record]) -> bytes:
    out = []
    for row, ts in zip(rows, _times(rows), strict=True):
        lon = row[LON]
        if lon == 180.0:  # GPX's longitude is in [-180, 180): the same meridian
            lon = -180.0
        ele = row[ALTITUDE]
        ele_tag = "" if ele is None else f"<ele>{_decimal(ele)}</ele>"
        out.append(
            f'<trkpt lat="{_decimal(row[LAT])}" lon="{_decimal(lon)}">{ele_tag}'
            f"<time>{ts.decode()}</time></trkpt>\n"
        )
    return "".join(out).encode()


_GPX_TAIL = b"</trkseg></trk></gpx>\n"


def _coordinates(rows: list[asyncpg.Record]) -> bytes:
    return encoder.encode([(r[LON], r[LAT]) for r in rows])[1:-1]


# The streams drop each page (del) before asking for the next one, so that at most one page
# is held while the next is fetched and decoded.


async def _stream_gpx(trip: str, pages: Pages, write: Write) -> None:
    await write(_gpx_head(trip))
    async for rows in pages:
        chunk = _gpx_points(rows)
        del rows
        await write(chunk)
    await write(_GPX_TAIL)


async def _stream_geojson(trip: str, pages: Pages, write: Write) -> None:
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as times:
        await write(b'{"type":"Feature","geometry":{"type":"LineString","coordinates":[')
        sep, driver = b"", ""
        async for rows in pages:
            coordinates = sep + _coordinates(rows)
            times.write(sep + b'"' + b'","'.join(_times(rows)) + b'"')
            sep, driver = b",", str(rows[-1][DRIVER])
            del rows
            await write(coordinates)
        props = encoder.encode({"tripId": trip, "driverId": driver})[:-1]
        await write(b']},"properties":' + props + b',"times":[')
        times.seek(0)
        while chunk := times.read(READ_CHUNK):
            await write(chunk)
        await write(b"]}}\n")


async def _chained(
    first: list[asyncpg.Record], rest: Pages
) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The first page (already fetched, to answer 404 before any byte), then the rest."""
    held = [first]
    del first
    yield held.pop()
    async for page in rest:
        yield page
        del page


_STREAMS = {"gpx": _stream_gpx, "geojson": _stream_geojson}


class TooSlow(Exception):
    """The client did not take the export's bytes at EXPORT_MIN_BYTES_PER_S."""


class Pace:
    """The bytes an export wrote and the time it waited for its client to take them.

    A write returns at once while aiohttp's and the kernel's buffers have room and waits for
    the client to drain them otherwise (above 64 KiB), so only a client slower than the pod
    makes it wait: reading the database and encoding do not count against the client. Each
    write may wait as long as keeps the average at ``min_rate`` or above (at least until
    ``grace`` of waiting in all, at most WRITE_TIMEOUT_S): the check costs a clock read per
    write (a page), and a slot is held at most about bytes / ``min_rate`` + ``grace`` beyond
    the pod's own time."""

    __slots__ = ("grace", "min_rate", "sent", "waited")

    def __init__(self, min_rate: float, grace: float) -> None:
        self.min_rate = min_rate
        self.grace = grace
        self.sent = 0
        self.waited = 0.0

    def budget(self, size: int) -> float:
        """How long writing ``size`` more bytes may wait (<= 0: only if it needs no wait)."""
        allowed = max(self.grace, (self.sent + size) / self.min_rate)
        return min(WRITE_TIMEOUT_S, allowed - self.waited)

    async def write(self, response: web.StreamResponse, data: bytes) -> None:
        """``response.write(data)``, or TooSlow once it waited past its budget."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout_at(start + self.budget(len(data))):
                await response.write(data)
        except TimeoutError:
            self.waited += loop.time() - start
            raise TooSlow from None
        self.sent += len(data)
        self.waited += loop.time() - start


def _cut_off(transport: asyncio.Transport | None) -> None:
    """Close a too slow client's connection at once, with a reset: the bytes still queued for
    it (up to some MB in the kernel) are dropped rather than trickled out by the kernel."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def export(
    request: web.Request, principal: auth.Principal, trip: str, fmt: str,
    start: datetime, end: datetime,
) -> web.StreamResponse:  # fmt: skip
    """The trip's pings in [start, end) as ``fmt`` (geojson or gpx): 404 before any byte
    when there are none, 503 when EXPORT_MAX_CONCURRENT exports already run, or all but one
    of them for this org; cut off when the client does not keep up (Pace)."""
    org = principal.org
    slots = request.app[EXPORT_SLOTS]
    if not slots.try_acquire(org):
        return slots.refusal(org)
    try:
        first, pages = await trip_pages.open_pages(
            request.app, org, trip, auth.driver_filter(principal), start, end
        )
    except BaseException:
        slots.release(org)
        raise
    try:
        if first is None:
            return error(
                404, "not_found", f"no trip {trip!r}", headers={"Cache-Control": "no-store"}
            )
        response = web.StreamResponse(headers={
            "Content-Type": CONTENT_TYPES[fmt],
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{_filename(trip)}.{fmt}"',
        })  # fmt: skip
        response.enable_chunked_encoding()
        await response.prepare(request)

        settings = request.app[SETTINGS]
        pace = Pace(settings.export_min_bytes_per_s, settings.export_rate_grace_s)

        async def write(data: bytes) -> None:
            await pace.write(response, data)

        stream = _chained(first, pages)
        del first
        try:
            await _STREAMS[fmt](trip, stream, write)
            await response.write_eof()
        except TooSlow:
            # Already streaming: no 4xx is possible; the cut tells the client it is incomplete.
            log.info("export_aborted", extra={
                "format": fmt, "reason": "too_slow", "org": org, "bytes": pace.sent,
                "waited_s": round(pace.waited, 1),
            })  # fmt: skip
            _cut_off(request.transport)
        except ConnectionError:  # the client left: a write, or the wait for it to drain
            log.info("export_aborted", extra={"format": fmt, "reason": "client_left"})
        except asyncio.CancelledError:  # the same, where aiohttp cancels handlers (tests)
            log.info("export_aborted", extra={"format": fmt, "reason": "cancelled"})
            raise
        except Exception as exc:
            # Bytes are sent: no error answer is possible any more. Closing the connection
            # before the last chunk tells the client the download is incomplete.
            log.warning("export_aborted", extra={"format": fmt, "reason": repr(exc)})
            if request.transport is not None:
                request.transport.close()
        finally:
            await stream.aclose()
        return response
    finally:
        await pages.aclose()
        slots.release(org)
