"""The WebSocket (ingest/ws.py): a dispatcher token by query or header, org isolation, the
per-connection limits, and bad messages answered without closing the socket.

Token lifetime, sockets per subject and the fleet snapshot: tests/test_ws_limits.py.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from ingest.typedefs import LIVE as LIVE_KEY

from .conftest import (
    LIVE,
    PING,
    auth,
    batch,
    bearer,
    next_message,
    now_ms,
    quiet,
    subscribed,
    token,
    ws_connect,
)


async def test_websocket_needs_a_token(client):
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await ws_connect(client)
    assert exc.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await ws_connect(client, token("dispatcher", ttl_s=-120))  # beyond the 30 s leeway
    assert exc.value.status == 401


async def test_websocket_refuses_driver_tokens(client):
    tok = token("driver")
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await ws_connect(client, tok)
    assert exc.value.status == 403
    resp = await client.get(LIVE, headers=bearer(tok))
    assert resp.status == 403
    assert await resp.json() == {
        "error": "forbidden",
        "detail": "live locations need a dispatcher token",
    }


async def test_websocket_token_by_query_or_header(client):
    tok = token("dispatcher", "disp_1")
    for ws in (await ws_connect(client, tok), await client.ws_connect(LIVE, headers=bearer(tok))):
        hello = await subscribed(ws, trips=["trip_1"])
        assert hello == [{"type": "subscribed", "trips": ["trip_1"], "fleet": False}]
        await ws.close()


async def test_websocket_subscribers_see_only_their_org(client):
    own = await ws_connect(client, token("dispatcher", "disp_a", "org_1"))
    other = await ws_connect(client, token("dispatcher", "disp_b", "org_2"))
    other_fleet = await ws_connect(client, token("dispatcher", "disp_c", "org_2"))
    assert (await client.post(PING, json=batch(2), headers=auth())).status == 200
    live = client.server.app[LIVE_KEY]
    for _ in range(250):  # published after the ack: then no snapshot may leak it
        if await live.latest("org_1", "trip_1") is not None:
            break
        await asyncio.sleep(0.02)
    assert [m["type"] for m in await subscribed(own, trips=["trip_1"])] == [
        "subscribed",
        "snapshot",
    ]
    assert await subscribed(other, trips=["trip_1"]) == [
        {"type": "subscribed", "trips": ["trip_1"], "fleet": False}
    ]
    assert await subscribed(other_fleet, fleet=True) == [
        {"type": "subscribed", "trips": [], "fleet": True}
    ]
    body = batch(2, start_ms=now_ms(-100))
    assert (await client.post(PING, json=body, headers=auth())).status == 200
    got = await next_message(own)
    assert got["type"] == "locations" and got["tripId"] == "trip_1"
    assert await quiet(other) == [] and await quiet(other_fleet) == []
    # org_2's own trip_1 reaches org_2, and not org_1.
    theirs = batch(1, driver="drv_9", start_ms=now_ms(-50))
    assert (
        await client.post(PING, json=theirs, headers=auth("driver", "drv_9", "org_2"))
    ).status == 200
    for ws in (other, other_fleet):
        got = await next_message(ws)
        assert (got["type"], got["driverId"]) == ("locations", "drv_9")
    assert await quiet(own) == []
    for ws in (own, other, other_fleet):
        await ws.close()


async def test_websocket_subscription_limit(make_client):
    client = await make_client(ws_max_subscriptions=3)
    ws = await ws_connect(client, token("dispatcher", "disp_1"))
    await ws.send_json({"type": "subscribe", "trips": ["a", "b", "c", "d"]})
    assert await next_message(ws) == {
        "type": "error", "error": "too_many_subscriptions", "detail": "at most 3 trips per connection",
    }  # fmt: skip
    assert (await subscribed(ws, trips=["a", "b", "c"]))[0]["trips"] == ["a", "b", "c"]
    await ws.send_json({"type": "subscribe", "trips": ["d"]})
    assert (await next_message(ws))["error"] == "too_many_subscriptions"
    assert not ws.closed
    await ws.close()


async def test_websocket_message_rate_limit(make_client):
    client = await make_client(ws_max_messages_per_s=3)
    ws = await ws_connect(client, token("dispatcher", "disp_1"))
    for _ in range(8):  # unsubscribe answers nothing: every answer here is a refusal
        await ws.send_json({"type": "unsubscribe", "trips": ["a"]})
    errors = await quiet(ws, 0.5)
    assert errors and len(errors) <= 5
    assert all(
        e == {"type": "error", "error": "rate_limited", "detail": "too many messages; slow down"}
        for e in errors
    )
    await asyncio.sleep(1.0)  # the bucket refills; the socket is still open
    assert (await subscribed(ws, trips=["a"]))[0]["type"] == "subscribed"
    await ws.close()


BAD_MESSAGES = [
    ("}{", "JSON is malformed: invalid character (byte 0)"),
    ('{"type": "hello"}', "Invalid value 'hello' - at `$.type`"),
    ('{"trips": ["a"]}', "Object missing required field `type`"),
    ('{"type": "subscribe", "trips": "a"}', "Expected `array`, got `str` - at `$.trips`"),
    ('{"type": "subscribe", "trips": ["a\\u0000"]}', "Expected `str` matching regex"),
    ('{"type": "subscribe", "trips": ["' + "x" * 65 + '"]}', "Expected `str` of length <= 64 - at `$.trips[0]`"),
    ("[1, 2]", "Expected `object`, got `array`"),
    ('{"type": "subscribe", "fleet": "yes"}', "Expected `bool`, got `str` - at `$.fleet`"),
]  # fmt: skip


async def test_bad_websocket_messages_get_an_error_and_the_socket_stays_open(client):
    ws = await ws_connect(client, token("dispatcher", "disp_1"))
    for frame, detail in BAD_MESSAGES:
        await ws.send_str(frame)
        got = await next_message(ws)
        assert (got["type"], got["error"]) == ("error", "invalid_message"), frame
        assert got["detail"].startswith(detail), (frame, got)
        assert (await subscribed(ws, settle=0, trips=["a"]))[0]["trips"] == ["a"]
    await ws.close()


async def test_websocket_message_over_64_kib_closes_the_socket(client):
    ws = await ws_connect(client, token("dispatcher", "disp_1"))
    await ws.send_str(json.dumps({"type": "subscribe", "trips": ["t" * 60] * 1200}))
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    "frame",
    [b'{"type": "subscribe", "trips": ["\xc3"]}', b'{"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"],
    ids=["bad-utf8-in-string", "deep-nesting"],
)  # fmt: skip
async def test_undecodable_binary_websocket_messages_get_an_error(client, frame):
    ws = await ws_connect(client, token("dispatcher", "disp_1"))
    await ws.send_bytes(frame)
    msg = await next_message(ws)
    assert (msg["type"], msg["error"]) == ("error", "invalid_message")
    assert (await subscribed(ws, trips=["a"]))[0]["trips"] == ["a"]
    await ws.close()
