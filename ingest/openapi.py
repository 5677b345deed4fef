"""OpenAPI 3.1 document generated from the msgspec wire types.

The types give the shape (what a 400 rejects); the per-ping range rules of validate.py are
added to the Location schema as documentation, since a ping that breaks them is listed in
``rejected`` rather than failing the request. The live WebSocket is described by asyncapi.py
(/asyncapi.json): OpenAPI has no way to describe its messages.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from . import __version__
from .schema import (
    Error,
    Geofence,
    GeofenceEvents,
    GeofenceIn,
    GeofenceList,
    Handover,
    LatestLocation,
    LocationPage,
    NearbyTrips,
    PingAck,
    PingBatch,
    PingQueued,
    TripOwner,
    TripSummary,
)  # fmt: skip


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _query(name: str, schema: dict[str, Any], required: bool) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, **_json("Error")}


_AUTH_ERRORS = {
    "401": {
        **_err("Missing, expired or invalid token"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
    }
}
_CHANGES_LIMITED = {
    **_err("Over the org's GEOFENCE_CHANGES_PER_S (rate_limited)"),
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}
_FENCE = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_TRIP = {"name": "tripId", "in": "path", "required": True, "schema": {"type": "string"}}
_GEO_LAT = {"type": "number", "minimum": -85.05112878, "maximum": 85.05112878}
_NO_STORE = {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}}
# RFC 3339 with an offset, or epoch milliseconds (13 digits reach the year 2286).
_TIME_PARAM = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "pattern": "^-?[0-9]{1,13}$"},
    ]
}
# Per-ping rules (validate.py): a ping that breaks one is rejected alone, listed in `rejected`.
_PER_PING = "A ping outside this range is rejected alone and listed in `rejected`."
_PING_RULES: dict[str, dict[str, Any]] = {
    "latitude": {"minimum": -90, "maximum": 90},
    "longitude": {"minimum": -180, "maximum": 180},
    "accuracy": {"minimum": 0},
    "speed": {"minimum": 0},
    "heading": {"minimum": 0, "exclusiveMaximum": 360},
}
_TIMESTAMP_DOC = (
    "RFC 3339 with an offset, or epoch milliseconds; stored to the millisecond. A ping more"
    " than MAX_CLOCK_SKEW_S ahead of the server clock or older than MAX_PING_AGE_DAYS is"
    " rejected alone and listed in `rejected`."
)


def _phone_app_paths(retry: dict[str, Any]) -> dict[str, Any]:
    """The phone apps' endpoints (docs/phone_apps.md); their bodies are the apps' formats."""
    apps = {
        "/api/v1/ingest/owntracks": ("post", "OwnTracks HTTP mode: one message", "200 []"),
        "/api/v1/ingest/osmand": ("post", "Traccar Client / OsmAnd protocol: one fix", "200"),
        "/api/v1/ingest/overland": ("post", "Overland: a batch of GeoJSON points", "200 ok"),
    }
    out: dict[str, Any] = {}
    for path, (method, summary, ok) in apps.items():
        op = {
            "summary": summary,
            "description": "See docs/phone_apps.md for the fields, identity and answers.",
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": f"Committed ({ok}), or dropped by a range rule"},
                "400": _err("Malformed; detail names the field"),
                **_AUTH_ERRORS,
                "403": _err("Not a driver token"),
                "429": {**_err("Per-driver rate limit"), "headers": retry},
                "503": {**_err("Overloaded or storage unavailable"), "headers": retry},
            },
        }
        out[path] = {method: op}
    out["/api/v1/ingest/osmand"]["get"] = out["/api/v1/ingest/osmand"]["post"]
    owntracks = out["/api/v1/ingest/owntracks"]["post"]["responses"]
    # OwnTracks drops a message on any answer: overload closes the connection instead.
    for code in ("429", "503"):
        del owntracks[code]
    # OwnTracks authenticates with HTTP Basic (the token as the password).
    owntracks["401"] = {
        **_err("Missing, expired or invalid token"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string", "pattern": "^Basic "}}},
    }
    return out


def _paths() -> dict[str, Any]:
    retry = {"Retry-After": {"schema": {"type": "integer"}}}
    return {
        "/api/v1/tracking/ping": {
            "post": {
                "summary": "Upload a batch of GPS pings",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("PingBatch")},
                        "application/msgpack": {"schema": _ref("PingBatch")},
                    },
                },
                "responses": {
                    "200": {"description": "Committed (durable ack)", **_json("PingAck")},
                    "202": {"description": "Queued (buffered ack)", **_json("PingQueued")},
                    "400": _err("Malformed batch; detail names the JSON path"),
                    **_AUTH_ERRORS,
                    "403": _err(
                        "driverId is not the token's subject (forbidden), or the trip belongs"
                        " to another driver (trip_owned_by_another_driver; docs/tenancy.md)"
                    ),
                    "408": _err("The body did not arrive within HTTP_BODY_TIMEOUT_S"),
                    "413": _err("Body or decompressed body too large"),
                    "415": _err("Unsupported Content-Type or Content-Encoding"),
                    "422": _err("No ping passed the range rules; see rejected"),
                    "429": {
                        **_err(
                            "Per-driver rate limit (rate_limited, with Retry-After), or the"
                            " driver's daily trip limit (too_many_trips)"
                        ),
                        "headers": {"Retry-After": {**retry["Retry-After"], "required": False}},
                    },
                    "503": {**_err("Overloaded or storage unavailable"), "headers": retry},
                },
            }
        },
        **_phone_app_paths(retry),
        "/api/v1/tracking/trips/{tripId}/driver": {
            "put": {
                "summary": "Hand a trip over to another driver of the org (dispatchers)",
                "security": [{"bearer": []}],
                "parameters": [_TRIP],
                "requestBody": {"required": True, **_json("Handover")},
                "responses": {
                    "200": {"description": "The trip's new owner", **_json("TripOwner")},
                    "400": _err("Malformed body; detail names the field"),
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                    "404": _err("Unknown trip (or of another org)"),
                },
            }
        },
        "/api/v1/tracking/trips/{tripId}/latest": {
            "get": {
                "summary": "Newest location of a trip",
                "security": [{"bearer": []}],
                "parameters": [_TRIP],
                "responses": {
                    "200": {
                        "description": "Latest location",
                        **_json("LatestLocation"),
                        "headers": _NO_STORE,
                    },
                    **_AUTH_ERRORS,
                    "404": _err("Unknown trip (or not visible to this token)"),
                },
            }
        },
        "/api/v1/tracking/trips/{tripId}/locations": {
            "get": {
                "summary": "Locations of a trip in time order, keyset-paginated",
                "security": [{"bearer": []}],
                "parameters": [
                    _TRIP,
                    *(
                        {"name": n, "in": "query", "required": False, "schema": s, "description": d}
                        for n, s, d in (
                            (
                                "from",
                                _TIME_PARAM,
                                "Inclusive start: RFC 3339 with offset, or epoch ms",
                            ),
                            ("to", _TIME_PARAM, "Exclusive end: RFC 3339 with offset, or epoch ms"),
                            (
                                "cursor",
                                {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"},
                                "nextCursor of the previous page (opaque; 400 if not one of ours)",
                            ),
                        )
                    ),
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 5000},
                    },
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["json", "geojson", "gpx"]},
                        "description": "json (default): pages. geojson, gpx: the whole trip"
                        " (or from/to), streamed; limit and cursor do not apply",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "A page of locations, or the trip as GeoJSON or GPX 1.1",
                        "content": {
                            "application/json": {"schema": _ref("LocationPage")},
                            # A Feature whose geometry is a LineString of [lon, lat].
                            "application/geo+json": {"schema": {"type": "object"}},
                            "application/gpx+xml": {"schema": {"type": "string"}},
                        },
                        "headers": _NO_STORE,
                    },
                    "400": _err("Invalid query parameter"),
                    **_AUTH_ERRORS,
                    "404": _err("Unknown trip (or not visible to this token)"),
                    "503": {**_err("EXPORT_MAX_CONCURRENT exports run"), "headers": retry},
                },
            }
        },
        "/api/v1/tracking/trips/{tripId}/summary": {
            "get": {
                "summary": "Distance, duration, speeds and stops of a trip (docs/api.md)",
                "security": [{"bearer": []}],
                "parameters": [_TRIP],
                "responses": {
                    "200": {
                        "description": "The trip's summary",
                        **_json("TripSummary"),
                        "headers": _NO_STORE,
                    },
                    **_AUTH_ERRORS,
                    "404": _err("Unknown trip (or not visible to this token)"),
                    "503": {**_err("EXPORT_MAX_CONCURRENT exports run"), "headers": retry},
                },
            }
        },
        "/api/v1/tracking/nearby": {
            "get": {
                "summary": "The org's trucks nearest a point (docs/api.md#nearby-trucks)",
                "security": [{"bearer": []}],
                "parameters": [
                    _query("lat", _GEO_LAT, True),
                    _query("lon", {"type": "number", "minimum": -180, "maximum": 180}, True),
                    _query("radius_m", {"type": "number", "minimum": 0, "maximum": 200_000}, True),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, False),
                ],
                "responses": {
                    "200": {
                        "description": "Trips nearest first, silent ones left out",
                        **_json("NearbyTrips"),
                        "headers": _NO_STORE,
                    },
                    "400": _err("Invalid query parameter"),
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                    "503": {**_err("Redis unavailable"), "headers": retry},
                },
            }
        },
        "/api/v1/geofences": {
            "post": {
                "summary": "Create a geofence: a GeoJSON Polygon, or a Point with radiusM",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, **_json("GeofenceIn")},
                "responses": {
                    "201": {"description": "Created", **_json("Geofence")},
                    "400": _err("Invalid body or geometry (the detail names the field)"),
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                    "409": _err("GEOFENCE_MAX_PER_ORG reached"),
                    "429": _CHANGES_LIMITED,
                    "503": {
                        **_err("The org's geofences stayed locked by evaluations (geofence_busy)"),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    },
                },
            },
            "get": {
                "summary": "The org's geofences",
                "security": [{"bearer": []}],
                "responses": {
                    "200": {"description": "Every geofence of the org", **_json("GeofenceList")},
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                },
            },
        },
        "/api/v1/geofences/{id}": {
            "get": {
                "summary": "One geofence",
                "security": [{"bearer": []}],
                "parameters": [_FENCE],
                "responses": {
                    "200": {"description": "The geofence", **_json("Geofence")},
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                    "404": _err("Unknown geofence (or another org's)"),
                },
            },
            "delete": {
                "summary": "Delete a geofence and its events",
                "security": [{"bearer": []}],
                "parameters": [_FENCE],
                "responses": {
                    "204": {"description": "Deleted"},
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                    "404": _err("Unknown geofence (or another org's)"),
                    "429": _CHANGES_LIMITED,
                    "503": {
                        **_err("The org's geofences stayed locked by evaluations (geofence_busy)"),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    },
                },
            },
        },
        "/api/v1/geofences/{id}/events": {
            "get": {
                "summary": "Enter and exit events of a geofence, in time order",
                "security": [{"bearer": []}],
                "parameters": [
                    _FENCE,
                    _query("from", _TIME_PARAM, False),
                    _query("to", _TIME_PARAM, False),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 5000}, False),
                    _query("cursor", {"type": "string"}, False),
                ],
                "responses": {
                    "200": {
                        "description": "A page of events",
                        **_json("GeofenceEvents"),
                        "headers": _NO_STORE,
                    },
                    "400": _err("Invalid query parameter"),
                    **_AUTH_ERRORS,
                    "403": _err("Not a dispatcher token"),
                    "404": _err("Unknown geofence (or another org's)"),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not"}},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "ok"}}}
        },
    }


@functools.cache
def openapi_document() -> bytes:
    types = (
        PingBatch,
        PingAck,
        PingQueued,
        Error,
        LatestLocation,
        LocationPage,
        Handover,
        TripOwner,
        TripSummary,
        NearbyTrips,
        GeofenceIn,
        Geofence,
        GeofenceList,
        GeofenceEvents,
    )
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    props = components["Location"]["properties"]
    for name, rule in _PING_RULES.items():
        number = {"type": "number", **rule, "description": _PER_PING}
        optional = "anyOf" in props[name]  # float | None
        props[name] = {**props[name], "anyOf": [number, {"type": "null"}]} if optional else number
    props["timestamp"]["description"] = _TIMESTAMP_DOC
    # Raw on the wire (the stored latest JSON, not decoded again): the same shape.
    components["NearbyTrip"]["properties"]["location"] = _ref("StoredLocation")
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "ingest", "version": __version__},
        "paths": _paths(),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
    return msgspec.json.encode(doc)
