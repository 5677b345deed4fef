"""A whole trip as GeoJSON or GPX 1.1, streamed (?format= on the history endpoint).

read_api.history hands a request with ``format=geojson|gpx`` to ``export``. Every page of
pings (trip_pages) is written, chunked, before the next one is fetched; a slow client slows
the fetching (write() waits for the socket to drain), so memory stays constant whatever the
trip's length and no pool connection is held while the client reads.

GeoJSON keeps a trip's times in a "times" array beside the coordinates: both arrays come from
one pass over the pages (a second pass could meet pings committed in between, and the two
arrays would no longer match), so the times wait in a temporary file, in memory up to
SPOOL_MEMORY_BYTES, until the coordinates are written.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from xml.sax.saxutils import escape

import asyncpg
from aiohttp import web

from . import auth, trip_pages
from .responses import error, retry_later
from .schema import encoder
from .trip_pages import ALTITUDE, DRIVER, LAT, LON, TS
from .typedefs import EXPORT_SLOTS

log = logging.getLogger("ingest.export")

Write = Callable[[bytes], Awaitable[None]]
Pages = AsyncIterator[list[asyncpg.Record]]

FORMATS = ("json", "geojson", "gpx")
CONTENT_TYPES = {"geojson": "application/geo+json", "gpx": "application/gpx+xml"}
SPOOL_MEMORY_BYTES = 1 << 18
READ_CHUNK = 1 << 16
# A client that takes longer than this to accept one page's bytes is dropped: it would hold
# an export slot while reading nothing.
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


async def export(
    request: web.Request, principal: auth.Principal, trip: str, fmt: str,
    start: datetime, end: datetime,
) -> web.StreamResponse:  # fmt: skip
    """The trip's pings in [start, end) as ``fmt`` (geojson or gpx): 404 before any byte
    when there are none, 503 when EXPORT_MAX_CONCURRENT exports already run."""
    slots = request.app[EXPORT_SLOTS]
    if not slots.try_acquire():
        return retry_later(
            "too_many_exports", "every export slot of this pod is busy (EXPORT_MAX_CONCURRENT)"
        )
    try:
        first, pages = await trip_pages.open_pages(
            request.app, principal.org, trip, auth.driver_filter(principal), start, end
        )
    except BaseException:
        slots.release()
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

        async def write(data: bytes) -> None:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await response.write(data)

        stream = _chained(first, pages)
        del first
        try:
            await _STREAMS[fmt](trip, stream, write)
            await response.write_eof()
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
        slots.release()
