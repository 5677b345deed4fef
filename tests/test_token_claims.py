"""Signed tokens with odd claims, against every endpoint and the WebSocket (from a cold
attacker review): bad claims get a 401 naming the claim, never a 5xx or a traceback.

JSON (and so a JWT payload, which PyJWT decodes with the json module) can carry a lone UTF-16
surrogate ("\\ud800"): a str Python holds but cannot encode to UTF-8, so neither PostgreSQL nor
Redis can take it. msgspec refuses such strings in request bodies; the token is the one way
in, and auth._principal refuses it in org and sub.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from .conftest import LIVE, PING, SECRET, batch, bearer, iso, now_ms

LATEST = "/api/v1/tracking/trips/{}/latest"
HISTORY = "/api/v1/tracking/trips/{}/locations"
SUMMARY = "/api/v1/tracking/trips/{}/summary"
OWNTRACKS = "/api/v1/ingest/owntracks"
OSMAND = "/api/v1/ingest/osmand"
OVERLAND = "/api/v1/ingest/overland"
GEOFENCES = "/api/v1/geofences"
LONE_SURROGATE = "\ud800"  # valid JSON ("\ud800"), valid str, not encodable as UTF-8


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(**overrides: Any) -> str:
    """An HS256 token signed with the service's secret, by hand: PyJWT refuses to sign some
    claim types a token may still carry. An override of None drops the claim."""
    claims: dict[str, Any] = {
        "sub": "drv_1", "role": "driver", "org": "org_1", "exp": int(time.time()) + 600,
    }  # fmt: skip
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())  # ensure_ascii: "\ud800" is written as \ud800
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def driver_requests(driver: str = "drv_1") -> list[tuple[str, str, Any]]:
    """(method, path, JSON body) of every endpoint a driver token may call."""
    now_s = int(time.time())
    overland = {
        "locations": [{
            "type": "Feature", "geometry": {"type": "Point", "coordinates": [2.0, 1.0]},
            "properties": {"timestamp": iso(now_ms())},
        }]
    }  # fmt: skip
    return [
        ("POST", PING, batch(1, driver=driver)),
        ("POST", OWNTRACKS, {"_type": "location", "lat": 1.0, "lon": 2.0, "tst": now_s}),
        ("GET", f"{OSMAND}?id=trip_1&lat=1&lon=2&timestamp={now_s}", None),
        ("POST", OVERLAND, overland),
        ("GET", LATEST.format("trip_1"), None),
        ("GET", HISTORY.format("trip_1"), None),
        ("GET", HISTORY.format("trip_1") + "?format=gpx", None),
        ("GET", SUMMARY.format("trip_1"), None),
    ]


def dispatcher_requests() -> list[tuple[str, str, Any]]:
    """(method, path, JSON body) of every endpoint a dispatcher token may call (but the
    WebSocket)."""
    circle = {"name": "depot", "geometry": {"type": "Point", "coordinates": [2.0, 1.0]},
              "radiusM": 100}  # fmt: skip
    return [
        ("GET", LATEST.format("trip_1"), None),
        ("GET", HISTORY.format("trip_1"), None),
        ("GET", HISTORY.format("trip_1") + "?format=geojson", None),
        ("GET", SUMMARY.format("trip_1"), None),
        ("PUT", "/api/v1/tracking/trips/trip_1/driver", {"driverId": "drv_2"}),
        ("GET", "/api/v1/tracking/nearby?lat=1&lon=2&radius_m=1000", None),
        ("GET", GEOFENCES, None),
        ("POST", GEOFENCES, circle),
        ("GET", f"{GEOFENCES}/gf_x", None),
        ("DELETE", f"{GEOFENCES}/gf_x", None),
        ("GET", f"{GEOFENCES}/gf_x/events", None),
    ]


async def answers(client, tok: str, requests: list[tuple[str, str, Any]]) -> list[tuple]:
    """(method, path, status, body) of each request made with ``tok``."""
    out = []
    for method, path, body in requests:
        resp = await client.request(method, path, json=body, headers=bearer(tok))
        text = await resp.text()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text[:200]
        out.append((method, path, resp.status, parsed))
    return out


def not_401_naming(claim: str, got: list[tuple]) -> list[tuple]:
    """The answers that are not `401 unauthorized` whose detail names ``claim``."""
    return [
        a for a in got
        if not (a[2] == 401 and isinstance(a[3], dict) and a[3].get("error") == "unauthorized"
                and f"'{claim}'" in (a[3].get("detail") or ""))
    ]  # fmt: skip


# -- org: a lone surrogate -------------------------------------------------------------------


async def test_a_signed_org_that_is_not_utf8_is_401_naming_it_everywhere_never_500(client, caplog):
    """A signed token whose org is "\\ud800" passes _principal (1 character, no control
    character). It is then sent to PostgreSQL and Redis, which cannot encode it: the flush
    is refused (500 storage_error, `flush_refused` with a traceback; the flush it shared is
    re-committed request by request), the reads and the geofence calls are 500
    internal_error (`unhandled_error` with a traceback), nearby is 503 live_unavailable as if
    Redis were down. Like an org with a NUL (the fix just landed), it must be 401 naming the
    claim, before anything is stored or asked."""
    caplog.set_level(logging.INFO)
    got = await answers(client, signed(org=LONE_SURROGATE), driver_requests())
    got += await answers(
        client, signed(org=LONE_SURROGATE, role="dispatcher", sub="disp_1"), dispatcher_requests()
    )
    wrong = not_401_naming("org", got)
    assert not wrong, "\n".join(map(str, wrong))
    assert not error_lines(caplog), error_lines(caplog)


async def test_a_dispatcher_socket_of_an_org_that_is_not_utf8_is_refused_at_the_handshake(
    client, caplog
):
    """The same token on the WebSocket: the upgrade is accepted, and the first subscribe
    raises UnicodeEncodeError in fanout.subscribe (channel names are encoded to bytes), then
    again in the handler's `finally` (session.detach -> fanout.remove): aiohttp logs `Error
    handling request` with the traceback, the client sees the connection drop (1006) with no
    error message, and the handler's own cleanup (app[SOCKETS], the connections gauge) is
    skipped. It must be refused before the upgrade: 401 naming the claim."""
    caplog.set_level(logging.INFO)
    tok = signed(org=LONE_SURROGATE, role="dispatcher", sub="disp_1")
    try:
        ws = await client.ws_connect(f"{LIVE}?access_token={tok}")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 401, exc
    else:
        await ws.send_json({"type": "subscribe", "trips": ["trip_1"], "fleet": True})
        msg = await ws.receive(timeout=5)
        await ws.close()
        pytest.fail(
            f"upgraded; the first subscribe got {msg.type.name} {msg.data!r}"
            f" (close code {ws.close_code}); logged: {error_lines(caplog)}"
        )
    assert not error_lines(caplog), error_lines(caplog)


# -- sub: a lone surrogate -------------------------------------------------------------------


async def test_a_signed_sub_that_is_not_utf8_is_401_naming_it_never_500(client, caplog):
    """A driver token whose sub is "\\ud800" passes _principal too. The reads filter the
    trip's rows by the driver's id (sub) in SQL: 500 internal_error with a traceback on
    latest, locations, the GPX export and the summary. The phone apps answer 400
    invalid_payload ("the token's subject (sub): must be valid UTF-8") and the native ping
    403/400: never the 401 the token deserves. It must be refused like any bad claim: 401
    naming sub, on every endpoint."""
    caplog.set_level(logging.INFO)
    got = await answers(client, signed(sub=LONE_SURROGATE), driver_requests("drv_1"))
    wrong = not_401_naming("sub", got)
    assert not wrong, "\n".join(map(str, wrong))
    assert not error_lines(caplog), error_lines(caplog)


# -- odd claim types, with JWT_ISSUER and JWT_AUDIENCE (passes: not covered elsewhere) ---------


ODD_CLAIMS = [
    ({"iss": ["https://auth.example"]}, "invalid token: Payload Issuer (iss) must be a string"),
    ({"iss": {"a": 1}}, "invalid token: Payload Issuer (iss) must be a string"),
    ({"iss": 5}, "invalid token: Payload Issuer (iss) must be a string"),
    ({"iss": LONE_SURROGATE}, "invalid token: Invalid issuer"),
    ({"aud": ["ingest", 5]}, "invalid token: Invalid claim format in token"),
    ({"aud": [["ingest"]]}, "invalid token: Invalid claim format in token"),
    ({"aud": {"ingest": 1}}, "invalid token: Invalid claim format in token"),
    ({"aud": True}, "invalid token: Invalid claim format in token"),
    ({"aud": []}, 'invalid token: Token is missing the "aud" claim'),
    ({"aud": f"ingest{LONE_SURROGATE}"}, "invalid token: Audience doesn't match"),
    ({"exp": float("inf")}, "invalid token: Expiration Time claim (exp) must be an integer."),
    ({"exp": float("nan")}, "invalid token: Expiration Time claim (exp) must be an integer."),
    ({"exp": [1]}, "invalid token: Expiration Time claim (exp) must be an integer."),
    ({"exp": 10**400}, "invalid token: claim 'exp' must be a number"),
    ({"exp": True}, "token expired"),  # PyJWT reads true as 1
    ({"exp": "99999999999"}, "invalid token: claim 'exp' must be a number"),
    ({"exp": "1" * 400}, "invalid token: claim 'exp' must be a number"),
    ({"exp": -1e300}, "token expired"),
    ({"iat": float("-inf")}, "invalid token: Issued At claim (iat) must be an integer."),
    ({"iat": "x"}, "invalid token: Issued At claim (iat) must be an integer."),
    ({"iat": 1e300}, "invalid token: The token is not yet valid (iat)"),
    ({"nbf": float("inf")}, "invalid token: Not Before claim (nbf) must be an integer."),
    ({"nbf": []}, "invalid token: Not Before claim (nbf) must be an integer."),
    ({"role": ["dispatcher"]}, "invalid token: claim 'role' must be 'driver' or 'dispatcher'"),
    ({"role": {"dispatcher": 1}}, "invalid token: claim 'role' must be 'driver' or 'dispatcher'"),
    ({"sub": 5}, "invalid token: Subject must be a string"),
    ({"jti": 5}, "invalid token: JWT ID must be a string"),
]


async def test_odd_claim_types_are_401_naming_them_with_issuer_and_audience_set(make_client):
    """Claims of the wrong JSON type, infinities and NaN (which Python's json reads), numbers
    beyond a double: each a 401 naming the claim, on every endpoint and the WebSocket; and a
    far exp (1e300) a working socket (its expiry timer far off, not an overflow)."""
    client = await make_client(jwt_issuer="https://auth.example", jwt_audience="ingest")
    good = {"iss": "https://auth.example", "aud": "ingest", "role": "dispatcher", "sub": "d"}
    for extra, detail in ODD_CLAIMS:
        tok = signed(**{**good, **extra})
        got = await answers(client, tok, dispatcher_requests()[:1] + driver_requests()[:1])
        resp = await client.get(f"{LIVE}?access_token={tok}")
        got.append(("GET", LIVE, resp.status, await resp.json()))
        want = {"error": "unauthorized", "detail": detail}
        assert all(a[2:] == (401, want) for a in got), (extra, got)
    ws = await client.ws_connect(f"{LIVE}?access_token={signed(**good, exp=1e300)}")
    await ws.send_json({"type": "subscribe", "fleet": True})
    assert json.loads((await ws.receive(timeout=5)).data)["type"] == "subscribed"
    await ws.close()
