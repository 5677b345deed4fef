"""GET /: the dispatch dashboard, a static page that uses the read and live APIs.

The page and its two assets are plain files in ``static/`` (no build step). The page needs
no token of its own: it takes the dispatcher token from ``?token=`` (or asks for it).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
# The only files served, so no request can name a path of its own.
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
# Revalidate each load: a new deploy's page is never mixed with an old script.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page loads its own files, and Leaflet and OpenStreetMap tiles when online; it talks to
# this origin only (read API and WebSocket).
_CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self' https://unpkg.com",
    "style-src 'self' https://unpkg.com",
    "img-src 'self' data: https://unpkg.com https://tile.openstreetmap.org",
    "connect-src 'self'",
    "frame-ancestors 'none'",
])  # fmt: skip
_PAGE_HEADERS = {
    **_HEADERS,
    "Content-Security-Policy": _CSP,
    "Referrer-Policy": "no-referrer",  # the URL carries the token
}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)


async def asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={**_HEADERS, "Content-Type": content_type})
