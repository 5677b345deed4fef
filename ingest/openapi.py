"""OpenAPI 3.1 document generated from the msgspec wire types."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from . import __version__
from .schema import Error, LatestLocation, LocationPage, PingAck, PingBatch, PingQueued


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, **_json("Error")}


_AUTH_ERRORS = {"401": _err("Missing, expired or invalid token")}
_TRIP = {"name": "tripId", "in": "path", "required": True, "schema": {"type": "string"}}


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
                    "403": _err("driverId is not the token's subject"),
                    "413": _err("Body or decompressed body too large"),
                    "415": _err("Unsupported Content-Type or Content-Encoding"),
                    "422": _err("No ping passed the range rules; see rejected"),
                    "429": {**_err("Per-driver rate limit"), "headers": retry},
                    "503": {**_err("Overloaded or storage unavailable"), "headers": retry},
                },
            }
        },
        "/api/v1/tracking/trips/{tripId}/latest": {
            "get": {
                "summary": "Newest location of a trip",
                "security": [{"bearer": []}],
                "parameters": [_TRIP],
                "responses": {
                    "200": {"description": "Latest location", **_json("LatestLocation")},
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
                        {
                            "name": n,
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": d,
                        }
                        for n, d in (
                            ("from", "Inclusive start: RFC 3339 with offset, or epoch ms"),
                            ("to", "Exclusive end: RFC 3339 with offset, or epoch ms"),
                            ("cursor", "nextCursor of the previous page"),
                        )
                    ),
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 5000},
                    },
                ],
                "responses": {
                    "200": {"description": "A page of locations", **_json("LocationPage")},
                    "400": _err("Invalid query parameter"),
                    **_AUTH_ERRORS,
                    "404": _err("Unknown trip (or not visible to this token)"),
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
    types = (PingBatch, PingAck, PingQueued, Error, LatestLocation, LocationPage)
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
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
