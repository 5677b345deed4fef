"""LIMIT: an aiohttp handler that only reads and decodes the body (the service's msgspec
schema), then answers. No auth, no validation, no storage: the HTTP + decode ceiling of
one Python process on this machine.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from .httpserve import serve
from .wire import json_batch_decoder


async def post_ping(request: web.Request) -> web.Response:
    try:
        batch = json_batch_decoder.decode(await request.read())
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return web.json_response({"error": "invalid_payload", "detail": str(exc)}, status=400)
    return web.Response(
        body=b'{"queued":%d}' % len(batch.locations), content_type="application/json"
    )


def create_app() -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/api/v1/tracking/ping", post_ping)
    return app


if __name__ == "__main__":
    serve(create_app())
