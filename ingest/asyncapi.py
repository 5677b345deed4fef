"""AsyncAPI 3.0 document of the live WebSocket, generated from the msgspec wire types.

It describes the service: ``receive`` operations are what a client sends, ``send`` operations
what the service sends. docs/live.md has the prose (limits, close codes).
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from . import __version__
from .schema import (
    LiveError,
    LiveGeofence,
    LiveLocations,
    LiveRefreshed,
    LiveSnapshot,
    LiveSubscribed,
    LiveSubscribeFailed,
    Refresh,
    Subscribe,
    Unsubscribe,
)  # fmt: skip

CHANNEL = "live"
ADDRESS = "/api/v1/live"

# name: (payload type, summary). The names are the messages' keys in the channel.
_CLIENT = {
    "subscribe": (Subscribe, "Follow these trips, or (fleet) every trip of the token's org"),
    "unsubscribe": (Unsubscribe, "Stop following these trips, or the fleet; no reply"),
    "refresh": (Refresh, "A new token of the same sub, org and role: moves the socket's expiry"),
}
_SERVER = {
    "subscribed": (
        LiveSubscribed,
        "The reply to each subscribe: every trip followed now (only what Redis confirmed)",
    ),
    "snapshot": (
        LiveSnapshot,
        "After subscribed: the latest known location of each newly followed trip (fleet: of"
        " the org's FLEET_SNAPSHOT_MAX most recently reporting trips)",
    ),
    "locations": (
        LiveLocations,
        "New committed pings of a followed trip, in time order; one per trip per flush",
    ),
    "geofence": (
        LiveGeofence,
        "To fleet subscribers: a trip of the org entered or left one of its geofences; each"
        " event once, in the trip's time order (docs/api.md#geofences)",
    ),
    "refreshed": (LiveRefreshed, "The reply to an accepted refresh: the new token's exp"),
    "error": (
        LiveError,
        "A refused message; the socket stays open and nothing changed, except token_expired",
    ),
    "subscribeFailed": (
        LiveSubscribeFailed,
        "Redis did not confirm these subscriptions within WS_SUBSCRIBE_TIMEOUT_S; retry",
    ),
}
_ERROR_CODES = (
    "invalid_message (not JSON, unknown type, wrong field), rate_limited"
    " (over WS_MAX_MESSAGES_PER_S), too_many_subscriptions, snapshot_unavailable,"
    " invalid_refresh (the current token still applies), token_expired (sent just before"
    " the Close frame with code 4001)."
)
_CHANNEL_DOC = (
    "One socket per dashboard page; needs a dispatcher token, and carries only trips of the"
    " token's org. The socket closes at the token's exp plus JWT_LEEWAY_S (code 4001) unless"
    " a refresh moves it. Refused before the upgrade with a JSON error body: 401"
    " unauthorized, 403 forbidden (not a dispatcher), 429 too_many_sockets, 503"
    " shutting_down. Close codes: 1000 normal, 1001 server shutdown, 1009 a client message"
    " over 64 KiB, 1013 slow consumer, 4001 token expired. See docs/live.md."
)


def _ref(pointer: str) -> dict[str, str]:
    return {"$ref": pointer}


def _message(name: str, payload: type, summary: str) -> dict[str, Any]:
    return {
        "name": name,
        "title": payload.__name__,
        "summary": summary,
        "contentType": "application/json",
        "payload": _ref(f"#/components/schemas/{payload.__name__}"),
    }


def _operations() -> dict[str, Any]:
    channel = _ref(f"#/channels/{CHANNEL}")

    def messages(*names: str) -> list[dict[str, str]]:
        return [_ref(f"#/channels/{CHANNEL}/messages/{n}") for n in names]

    def reply(*names: str) -> dict[str, Any]:
        return {"channel": channel, "messages": messages(*names)}

    return {
        "receiveSubscribe": {
            "action": "receive",
            "channel": channel,
            "summary": "Subscribe; answered by subscribed, then the snapshots",
            "messages": messages("subscribe"),
            "reply": reply("subscribed"),
        },
        "receiveUnsubscribe": {
            "action": "receive",
            "channel": channel,
            "messages": messages("unsubscribe"),
        },
        "receiveRefresh": {
            "action": "receive",
            "channel": channel,
            "messages": messages("refresh"),
            "reply": reply("refreshed"),
        },
        "sendSnapshot": {"action": "send", "channel": channel, "messages": messages("snapshot")},
        "sendLocations": {"action": "send", "channel": channel, "messages": messages("locations")},
        "sendGeofence": {"action": "send", "channel": channel, "messages": messages("geofence")},
        "sendError": {
            "action": "send",
            "channel": channel,
            "summary": "To any client message the service refuses, and at token expiry",
            "messages": messages("error", "subscribeFailed"),
        },
    }


def _schemas() -> dict[str, Any]:
    types = tuple(t for t, _ in (*_CLIENT.values(), *_SERVER.values()))
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    # msgspec leaves datetime as a plain string; it writes RFC 3339 in UTC.
    components["StoredLocation"]["properties"]["timestamp"]["format"] = "date-time"
    components["LiveError"]["properties"]["error"]["description"] = _ERROR_CODES
    components["LiveSubscribeFailed"]["properties"]["error"] = {"const": "subscribe_failed"}
    return components


@functools.cache
def asyncapi_document() -> dict[str, Any]:
    """The document, built once (shared: copy before changing it)."""
    # Alternatives: either one authenticates the upgrade request.
    security = [_ref(f"#/components/securitySchemes/{s}") for s in ("bearer", "accessToken")]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "ingest live locations",
            "version": __version__,
            "description": "The WebSocket of dispatch dashboards, as the service speaks it:"
            " receive operations are client messages, send operations the service's.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "ws": {
                "host": "{host}",
                "protocol": "ws",
                "description": "The service itself (wss behind a TLS-terminating proxy)",
                "variables": {"host": {"default": "localhost:8080"}},
                "security": security,
            }
        },
        "channels": {
            CHANNEL: {
                "address": ADDRESS,
                "title": "Live locations",
                "description": _CHANNEL_DOC,
                "servers": [_ref("#/servers/ws")],
                "messages": {
                    name: _ref(f"#/components/messages/{name}") for name in (*_CLIENT, *_SERVER)
                },
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "access_token": {
                                    "type": "string",
                                    "description": "The JWT, when no Authorization header is"
                                    " sent (browsers cannot set one on a WebSocket)",
                                }
                            },
                        },
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Authorization": {
                                    "type": "string",
                                    "description": "Bearer <JWT> (the scheme in any case)",
                                }
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            }
        },
        "operations": _operations(),
        "components": {
            "schemas": _schemas(),
            "messages": {
                name: _message(name, payload, summary)
                for name, (payload, summary) in (*_CLIENT.items(), *_SERVER.items())
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "Authorization: Bearer <dispatcher JWT>",
                },
                "accessToken": {
                    "type": "httpApiKey",
                    "name": "access_token",
                    "in": "query",
                    "description": "?access_token=<dispatcher JWT>, read only when the request"
                    " has no Authorization header",
                },
            },
        },
    }


@functools.cache
def asyncapi_json() -> bytes:
    return msgspec.json.encode(asyncapi_document())
