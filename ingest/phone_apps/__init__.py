"""Endpoints for phone apps people already use: OwnTracks, Traccar Client / OsmAnd, Overland.

One module per app maps its format onto the native PingBatch and answers the way that app
understands; common.py holds what they share. docs/phone_apps.md is the user's guide.
"""

from __future__ import annotations

from aiohttp import web

from . import osmand, overland, owntracks


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post(owntracks.PATH, owntracks.post_message)
    router.add_get(osmand.PATH, osmand.track, allow_head=False)  # the OsmAnd app uses GET
    router.add_post(osmand.PATH, osmand.track)
    router.add_post(overland.PATH, overland.post_batch)
