"""Request bodies (ingest/body.py): the size limit, before and after decompression, without
inflating a gzip bomb; the accepted media types and encodings."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib

import msgspec

from ingest.typedefs import SETTINGS

from .conftest import PING, auth, batch, post_ping


def gzip_of_zeros(mib: int) -> bytes:
    """A valid gzip member of ``mib`` MiB of zeros, about 1 kB per MiB, built without
    compressing it all: each full-flushed block is self-contained, so it can be repeated."""
    zeros = bytes(1 << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    return header + block * mib + co.flush() + trailer


async def test_body_over_the_limit_is_413(make_client):
    client = await make_client(role="ingest", max_body_bytes=2000)
    too_large = (413, {"error": "payload_too_large", "detail": "body larger than 2000 bytes"})
    assert await post_ping(client, msgspec.json.encode(batch(40))) == too_large
    # The same limit on the decompressed size of a gzip body.
    small = gzip.compress(msgspec.json.encode(batch(40)))
    assert len(small) < 2000
    assert await post_ping(client, small, **{"Content-Encoding": "gzip"}) == too_large


async def test_gzip_bomb_is_refused_without_inflating_it(ingest_client):
    bomb = gzip_of_zeros(1000)  # 1000 MiB of zeros in about 1 MB
    limit = ingest_client.server.app[SETTINGS].max_body_bytes
    assert len(bomb) < limit  # so it is the decompressed size that is refused
    tracemalloc.start()
    try:
        status, body = await post_ping(ingest_client, bomb, **{"Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    too_large = {"error": "payload_too_large", "detail": f"body larger than {limit} bytes"}
    assert (status, body) == (413, too_large)
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB while refusing a gzip bomb"


async def test_unsupported_media_is_415(ingest_client):
    data = msgspec.json.encode(batch(1))
    content_type = "Content-Type must be application/json or application/msgpack"
    encoding = "Content-Encoding must be gzip or identity"
    cases = [
        ({"Content-Type": "text/plain"}, content_type),
        ({"Content-Type": "application/x-www-form-urlencoded"}, content_type),
        ({"Content-Type": "multipart/form-data; boundary=x"}, content_type),
        ({"Content-Encoding": "compress"}, encoding),
        ({"Content-Encoding": "gzip, gzip"}, encoding),
        ({"Content-Encoding": "bomb"}, encoding),
    ]
    for headers, detail in cases:
        got = await post_ping(ingest_client, data, **headers)
        assert got == (415, {"error": "unsupported_media_type", "detail": detail}), headers


async def test_encodings_aiohttp_knows_but_we_do_not_are_415(ingest_client):
    for encoding in ("br", "zstd"):
        resp = await ingest_client.post(
            PING,
            data=b"\x00" * 16,
            headers={**auth(), "Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert resp.status == 415, (encoding, await resp.text())
        assert (await resp.json())["error"] == "unsupported_media_type"


async def test_x_gzip_is_decoded_like_gzip(ingest_client):
    status, body = await post_ping(
        ingest_client,
        gzip.compress(msgspec.json.encode(batch(2))),
        **{"Content-Encoding": "x-gzip"},
    )
    assert status == 200 and body["accepted"] == 2, body
