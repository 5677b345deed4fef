"""The AsyncAPI document of the live WebSocket (/asyncapi.json): well formed, and true of
every message the real service sends and takes (docs/live.md)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import jsonschema
import redis.asyncio as aioredis

from ingest import __version__
from ingest.asyncapi import ADDRESS, asyncapi_document
from ingest.typedefs import FANOUT, SETTINGS

from .conftest import auth, batch, next_message
from .test_live import published
from .test_ws_limits import connect, dispatcher_token

Doc = dict[str, Any]


def resolve(doc: Doc, ref: str) -> Any:
    """A local JSON pointer (``#/a/b``) of the document."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def strict(schema: Any) -> Any:
    """The schema with no undocumented property allowed. The document leaves objects open, so
    that clients tolerate fields added later; the test closes them so that a field the service
    sends but the document does not name fails it."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def operation_messages(doc: Doc) -> tuple[set[str], set[str]]:
    """Names of the client messages (received by the service) and of the server messages (sent,
    or replies to what it receives), from the operations."""
    client: set[str] = set()
    server: set[str] = set()
    for op in doc["operations"].values():
        names = {m["$ref"].rpartition("/")[2] for m in op["messages"]}
        (client if op["action"] == "receive" else server).update(names)
        server.update(m["$ref"].rpartition("/")[2] for m in op.get("reply", {}).get("messages", []))
    return client, server


class Checker:
    """Each message's payload schema from the document, with its components."""

    def __init__(self, doc: Doc) -> None:
        root = {"components": {"schemas": strict(doc["components"]["schemas"])}}
        self.validators = {}
        for name, ref in doc["channels"]["live"]["messages"].items():
            payload = resolve(doc, ref["$ref"])["payload"]["$ref"]
            # Draft 7 is what AsyncAPI 3.0 schemas extend; $ref resolves against the root.
            self.validators[name] = jsonschema.Draft7Validator({**root, "$ref": payload})
        self.client, self.server = operation_messages(doc)

    def matches(self, message: Any, names: set[str]) -> list[str]:
        return sorted(n for n in names if self.validators[n].is_valid(message))

    def server_message(self, message: dict[str, Any]) -> str:
        """The one server message of the document this message is; fails otherwise."""
        found = self.matches(message, self.server)
        assert len(found) == 1, (message, found)
        return found[0]


class Wire:
    """A live socket that keeps every message, each way, to check them all."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        await self.ws.send_json(message)

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        message = await next_message(self.ws, timeout)
        self.received.append(message)
        return message

    async def until(self, type_: str, **fields: Any) -> dict[str, Any]:
        while True:
            message = await self.next()
            if message["type"] == type_ and fields.items() <= message.items():
                return message

    async def quiet(self, wait: float = 0.4) -> list[dict[str, Any]]:
        got = []
        while True:
            try:
                got.append(await self.next(wait))
            except TimeoutError:
                return got


async def test_the_document_is_asyncapi_3_and_every_reference_resolves(client):
    doc = asyncapi_document()
    served = await client.get("/asyncapi.json")
    assert served.status == 200 and served.content_type == "application/json"
    assert await served.json() == json.loads(json.dumps(doc))
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["version"] == __version__

    for ref in refs(doc):
        resolve(doc, ref)  # a KeyError names the dangling reference
    (channel,) = doc["channels"].values()
    assert channel["address"] == ADDRESS
    assert ADDRESS in {r.canonical for r in client.server.app.router.resources()}

    used: set[str] = set()
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        assert resolve(doc, op["channel"]["$ref"]) is channel
        for m in [*op["messages"], *op.get("reply", {}).get("messages", [])]:
            # An operation's messages are its channel's (AsyncAPI 3.0, Operation Object).
            assert m["$ref"].startswith(op["channel"]["$ref"] + "/messages/"), (name, m)
            assert resolve(doc, m["$ref"]) in channel["messages"].values()
            used.add(m["$ref"].rpartition("/")[2])
    assert used == set(channel["messages"]), "a message no operation sends or receives"
    client_names, server_names = operation_messages(doc)
    assert client_names == {"subscribe", "unsubscribe", "refresh"}
    assert not client_names & server_names

    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft7Validator.check_schema(schema)
        assert schema["title"] == name
    for scheme in doc["components"]["securitySchemes"].values():
        assert scheme["type"] in ("http", "httpApiKey")


async def test_every_message_on_the_wire_matches_the_document(make_client):
    client = await make_client(jwt_leeway_s=0)
    doc = asyncapi_document()
    check = Checker(doc)
    for trip, n in (("trip_1", 2), ("trip_2", 1)):
        resp = await client.post("/api/v1/tracking/ping", json=batch(n, trip=trip), headers=auth())
        assert resp.status == 200, await resp.text()
        await published(client, trip)

    w = Wire(await connect(client))
    await w.send({"type": "subscribe", "trips": ["trip_1"]})
    await w.until("subscribed")
    await w.until("snapshot", tripId="trip_1")
    await w.send({"type": "subscribe", "fleet": True})
    await w.until("subscribed", fleet=True)
    await w.until("snapshot", tripId="trip_2")
    await w.quiet()
    resp = await client.post("/api/v1/tracking/ping", json=batch(3), headers=auth())
    assert resp.status == 200
    await w.until("locations", tripId="trip_1")

    # What the service refuses as invalid_message, the document refuses too.
    refused = [
        {"type": "subscribe", "trips": [""]},
        {"type": "subscribe", "trips": "trip_1"},
        {"type": "subscribe", "fleet": "yes"},
        {"type": "refresh"},
        {"type": "teleport"},
    ]
    for message in refused:
        await w.ws.send_json(message)
        assert (await w.until("error"))["error"] == "invalid_message", message
        assert check.matches(message, check.client) == [], message

    await w.send({"type": "unsubscribe", "trips": ["trip_1"], "fleet": True})
    assert await w.quiet() == []  # no reply
    for _ in range(int(3 * client.server.app[SETTINGS].ws_max_messages_per_s)):
        await w.send({"type": "unsubscribe"})
    await w.until("error", error="rate_limited")
    await w.quiet(1.0)  # the bucket refills
    await w.send({"type": "refresh", "token": "not-a-jwt"})
    assert (await w.until("error"))["error"] == "invalid_refresh"
    # A token expiring in a second or two: refreshed, then token_expired and the 4001 Close.
    await w.send({"type": "refresh", "token": dispatcher_token(ttl_s=2)})
    await w.until("refreshed")
    await w.until("error", error="token_expired")
    closing = await w.ws.receive(timeout=3)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001

    seen = {check.server_message(m) for m in w.received}
    assert seen >= {"subscribed", "snapshot", "locations", "refreshed", "error"}, seen
    assert {m["error"] for m in w.received if m["type"] == "error"} >= {
        "invalid_message", "invalid_refresh", "rate_limited", "token_expired",
    }  # fmt: skip
    for message in w.sent:
        assert len(check.matches(message, check.client)) == 1, message

    # The check has teeth: a document that types publishedAt as a string fails the service.
    wrong = copy.deepcopy(doc)
    wrong["components"]["schemas"]["LiveLocations"]["properties"]["publishedAt"] = {
        "type": "string"
    }
    locations = next(m for m in w.received if m["type"] == "locations")
    assert Checker(wrong).matches(locations, check.server) == []
    assert check.matches({**locations, "undocumented": 1}, check.server) == []


async def test_subscribe_failed_matches_the_document(make_client, private_redis):
    client = await make_client(redis_url=private_redis.url, ws_subscribe_timeout_s=0.3)
    check = Checker(asyncapi_document())
    fanout = client.server.app[FANOUT]
    for _ in range(100):
        if fanout.connected.is_set():
            break
        await asyncio.sleep(0.05)
    w = Wire(await connect(client))
    admin = aioredis.from_url(private_redis.url)
    try:
        # Redis holds every command for 1 s: the SUBSCRIBE is not confirmed within 0.3 s.
        await admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        await w.send({"type": "subscribe", "trips": ["trip_1"], "fleet": True})
        failed = await w.next()
        acked = await w.until("subscribed")
        await asyncio.sleep(1.0)  # the pause is over before the app shuts down
    finally:
        await admin.aclose()
    assert failed["error"] == "subscribe_failed" and acked["trips"] == []
    assert [check.server_message(m) for m in w.received] == ["subscribeFailed", "subscribed"]
    assert check.matches(w.sent[0], check.client) == ["subscribe"]
