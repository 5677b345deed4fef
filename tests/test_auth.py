"""Security: authentication, tenant isolation and hostile input, each with its exact answer."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import os
import signal
import struct
import sys
import time
import tracemalloc
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ingest.auth import AuthError, Principal, Verifier, issue_token
from ingest.jwt_keys import load_public_key
from ingest.settings import ENV_NAMES, SettingsError, load_settings
from ingest.typedefs import LIVE as LIVE_STATE
from ingest.typedefs import SETTINGS

from .conftest import ROOT, SECRET, auth, batch, now_ms, token

PING = "/api/v1/tracking/ping"
LATEST = "/api/v1/tracking/trips/{}/latest"
HISTORY = "/api/v1/tracking/trips/{}/locations"
LIVE = "/api/v1/live"
JSON = {"Content-Type": "application/json"}


# -- helpers -----------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid driver token; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "drv_1", "role": "driver", "org": "org_1", "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: Any = SECRET, alg: str = "HS256", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=alg)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token PyJWT would refuse to make (a PEM public key used as the secret)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def pem_private(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def pem_public(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def answer(client, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """Status and JSON body of one request; the ingest POST carries a valid batch."""
    if method == "POST":
        resp = await client.post(path, json=batch(1), headers=headers)
    else:
        resp = await client.get(path, headers=headers)
    body = await resp.json()
    if resp.status == 401:
        challenge = 'Basic realm="ingest", charset="UTF-8"' if "owntracks" in path else "Bearer"
        assert resp.headers["WWW-Authenticate"] == challenge, path
    return resp.status, body


# Every endpoint that needs a token. The WebSocket handler answers a plain GET (no upgrade)
# the same way it answers a handshake: authentication comes first.
ENDPOINTS = [
    ("POST", PING),
    ("GET", LATEST.format("trip_1")),
    ("GET", HISTORY.format("trip_1")),
    ("GET", LIVE),
]
# The phone-app endpoints take the same tokens (also as a Basic password or ?token=).
PHONE_ENDPOINTS = [
    ("POST", "/api/v1/ingest/owntracks"),
    ("POST", "/api/v1/ingest/overland"),
    ("POST", "/api/v1/ingest/osmand?id=trip_1&lat=1&lon=2"),
    ("GET", "/api/v1/ingest/osmand?id=trip_1&lat=1&lon=2"),
]


async def expect_everywhere(
    client, headers: dict[str, str], status: int, body: dict, phone: bool = True
) -> None:
    for method, path in ENDPOINTS + (PHONE_ENDPOINTS if phone else []):
        got = await answer(client, method, path, headers)
        assert got == (status, body), (method, path, got)


def unauthorized(detail: str) -> dict[str, str]:
    return {"error": "unauthorized", "detail": detail}


# -- authentication: every endpoint ------------------------------------------------------


async def test_missing_token_is_401_everywhere(client):
    await expect_everywhere(client, {}, 401, unauthorized("missing bearer token"))


async def test_malformed_authorization_header_is_401_everywhere(client):
    """The phone-app endpoints also take Basic credentials; their own tests cover them."""
    detail = "Authorization header must be 'Bearer <token>'"
    for header in ("Basic ZHJ2XzE6cHc=", "Bearer", "Bearer   ", "Token abc", "bearer"):
        headers = {"Authorization": header}
        await expect_everywhere(client, headers, 401, unauthorized(detail), phone=False)


BAD_TOKENS = [
        ("abc", "invalid token: Not enough segments"),
        ("a.b.c", "invalid token: Invalid header padding"),
        (signed("another-secret-0123456789abcdef012345"), "invalid token: Signature verification failed"),
        (signed(None, "none"), "invalid token: The specified alg value is not allowed"),
        (signed(exp=int(time.time()) - 120), "token expired"),  # leeway is 30 s
        (signed(exp=None), 'invalid token: Token is missing the "exp" claim'),
        (signed(sub=None), 'invalid token: Token is missing the "sub" claim'),
        (signed(role=None), "invalid token: claim 'role' must be 'driver' or 'dispatcher'"),
        (signed(role="admin"), "invalid token: claim 'role' must be 'driver' or 'dispatcher'"),
        (signed(org=None), "invalid token: claim 'org' must be a non-empty string"),
        (signed(org=""), "invalid token: claim 'org' must be a non-empty string"),
        (signed(nbf=int(time.time()) + 3600), "invalid token: The token is not yet valid (nbf)"),
]  # fmt: skip


async def test_bad_tokens_are_401_everywhere(client):
    for tok, detail in BAD_TOKENS:
        await expect_everywhere(client, bearer(tok), 401, unauthorized(detail))


async def test_bad_token_in_access_token_query_is_401(client):
    for method, path in ENDPOINTS + PHONE_ENDPOINTS:
        sep = "&" if "?" in path else "?"
        got = await answer(client, method, f"{path}{sep}access_token=abc", {})
        assert got == (401, unauthorized("invalid token: Not enough segments")), path


async def test_expiry_has_a_small_leeway(client):
    """JWT_LEEWAY_S (30 s) absorbs clock skew between the issuer and this service."""
    tok = signed(exp=int(time.time()) - 10)
    resp = await client.post(PING, json=batch(1), headers=bearer(tok))
    assert resp.status == 200


async def test_issuer_and_audience_are_checked_when_configured(make_client):
    client = await make_client(jwt_issuer="https://auth.example", jwt_audience="ingest")
    good = {"iss": "https://auth.example", "aud": "ingest"}
    cases = [
        ({**good, "iss": None}, 'invalid token: Token is missing the "iss" claim'),
        ({**good, "iss": "https://evil.example"}, "invalid token: Invalid issuer"),
        ({**good, "aud": None}, 'invalid token: Token is missing the "aud" claim'),
        ({**good, "aud": "other-service"}, "invalid token: Audience doesn't match"),
    ]
    for extra, detail in cases:
        await expect_everywhere(client, bearer(signed(**extra)), 401, unauthorized(detail))
    resp = await client.post(PING, json=batch(1), headers=bearer(signed(**good)))
    assert resp.status == 200
    # issue_token (and so `python -m ingest token`) adds both claims from the settings.
    settings = client.server.app[SETTINGS]
    resp = await client.post(
        PING, json=batch(1), headers=bearer(issue_token(settings, "drv_1", "driver", "org_1"))
    )
    assert resp.status == 200


# -- public-key tokens (RS256, ES256) ------------------------------------------------------


async def test_rs256_tokens_verify_with_the_public_key(make_client, rsa_key, ec_key):
    client = await make_client(jwt_secret=None, jwt_public_key=pem_public(rsa_key))
    settings = client.server.app[SETTINGS]
    tok = issue_token(settings, "drv_1", "driver", "org_1", key=pem_private(rsa_key))
    assert jwt.get_unverified_header(tok)["alg"] == "RS256"
    resp = await client.post(PING, json=batch(2), headers=bearer(tok))
    assert resp.status == 200 and (await resp.json())["accepted"] == 2

    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = pem_public(rsa_key).encode()
    refused = [
        (signed(other_rsa, "RS256"), "invalid token: Signature verification failed"),
        (signed(SECRET), "invalid token: The specified alg value is not allowed"),  # HS256
        # Algorithm confusion: the public key (known to everyone) as an HMAC secret.
        (hs256_by_hand(pem, claims()), "invalid token: The specified alg value is not allowed"),
        # An ES256 token against an RSA key: refused by the allowed list, not a 500.
        (signed(ec_key, "ES256"), "invalid token: The specified alg value is not allowed"),
        (signed(rsa_key, "RS384"), "invalid token: The specified alg value is not allowed"),
        (signed(None, "none"), "invalid token: The specified alg value is not allowed"),
    ]
    for tok, detail in refused:
        await expect_everywhere(client, bearer(tok), 401, unauthorized(detail))


async def test_es256_tokens_verify_with_the_public_key(make_client, rsa_key, ec_key):
    client = await make_client(jwt_secret=None, jwt_public_key=pem_public(ec_key))
    settings = client.server.app[SETTINGS]
    tok = issue_token(settings, "disp_1", "dispatcher", "org_1", key=pem_private(ec_key))
    assert jwt.get_unverified_header(tok)["alg"] == "ES256"
    driver = issue_token(settings, "drv_1", "driver", "org_1", key=pem_private(ec_key))
    assert (await client.post(PING, json=batch(1), headers=bearer(driver))).status == 200
    assert (await client.get(LATEST.format("trip_1"), headers=bearer(tok))).status == 200
    ws = await client.ws_connect(f"{LIVE}?access_token={tok}")
    await ws.close()

    other_ec = ec.generate_private_key(ec.SECP256R1())
    refused = [
        (signed(other_ec, "ES256"), "invalid token: Signature verification failed"),
        (signed(rsa_key, "RS256"), "invalid token: The specified alg value is not allowed"),
        (signed(SECRET), "invalid token: The specified alg value is not allowed"),
    ]
    for tok, detail in refused:
        await expect_everywhere(client, bearer(tok), 401, unauthorized(detail))


def test_public_key_forms_and_bad_keys(rsa_key, ec_key):
    pem = pem_public(ec_key)
    # A one-line environment variable with escaped newlines.
    assert isinstance(load_public_key(pem.replace("\n", "\\n")), ec.EllipticCurvePublicKey)
    # A certificate: its public key is used.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(rsa_key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
    )  # fmt: skip
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    s = load_settings({}, jwt_public_key=cert_pem)
    tok = signed(rsa_key, "RS256")
    assert Verifier(s).verify(tok) == Principal("drv_1", "driver", "org_1")
    # Keys that cannot verify RS256/ES256 are refused when the app is built, by name.
    for bad in ("not a key", pem_public(ed25519.Ed25519PrivateKey.generate())):
        with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY"):
            Verifier(load_settings({}, jwt_public_key=bad))


def test_bad_public_key_is_a_settings_error_at_load():
    """`python -m ingest serve` prints settings errors cleanly only from load_settings."""
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY"):
        load_settings(
            {}, jwt_public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"
        )


def test_issue_token_chooses_the_algorithm_from_the_key_type(rsa_key, ec_key):
    s = load_settings({}, jwt_secret=SECRET)
    assert jwt.get_unverified_header(issue_token(s, "a", "driver", "o"))["alg"] == "HS256"
    p384 = ec.generate_private_key(ec.SECP384R1())
    for key, alg in ((rsa_key, "RS256"), (ec_key, "ES256"), (p384, "ES384")):
        # PKCS#8 ("BEGIN PRIVATE KEY") says nothing of the type; it is read from the key.
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        ):
            pem = key.private_bytes(
                serialization.Encoding.PEM, fmt, serialization.NoEncryption()
            ).decode()
            tok = issue_token(s, "a", "driver", "o", key=pem)
            assert jwt.get_unverified_header(tok)["alg"] == alg
            pub = load_settings({}, jwt_public_key=pem_public(key))
            assert Verifier(pub).verify(tok) == Principal("a", "driver", "o")
    encrypted = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    ).decode()
    for bad in ("nope", encrypted, pem_private(ed25519.Ed25519PrivateKey.generate())):
        with pytest.raises(AuthError):
            issue_token(s, "a", "driver", "o", key=bad)
    with pytest.raises(AuthError, match="JWT_SECRET is not set"):
        issue_token(load_settings({}, jwt_public_key=pem_public(ec_key)), "a", "driver", "o")


def test_token_cache_never_lets_an_expired_token_through():
    """Verified tokens are cached; the cache honours exp (plus the leeway) by itself."""
    clock = [time.time()]
    v = Verifier(load_settings({}, jwt_secret=SECRET, jwt_leeway_s=5), clock=lambda: clock[0])
    tok = signed(exp=int(clock[0]) + 60)
    assert v.verify(tok).sub == "drv_1"
    assert v.verify(tok).sub == "drv_1"  # from the cache
    clock[0] += 64  # within the leeway
    assert v.verify(tok).sub == "drv_1"
    clock[0] += 2
    with pytest.raises(AuthError, match="token expired"):
        v.verify(tok)


def test_a_failed_token_is_never_cached():
    v = Verifier(load_settings({}, jwt_secret=SECRET))
    tok = signed(role="admin")
    for _ in range(2):
        with pytest.raises(AuthError, match="role"):
            v.verify(tok)


# -- tenancy -------------------------------------------------------------------------------


async def test_driver_posts_only_as_itself(client, db):
    body = batch(2, driver="drv_2")
    resp = await client.post(PING, json=body, headers=auth("driver", "drv_1"))
    assert resp.status == 403
    assert await resp.json() == {
        "error": "forbidden",
        "detail": "driverId does not match the token's subject",
    }
    resp = await client.post(PING, json=batch(2), headers=auth("dispatcher", "drv_1"))
    assert resp.status == 403
    assert await resp.json() == {
        "error": "forbidden",
        "detail": "only driver tokens may post pings",
    }
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 0


async def test_pings_belong_to_the_token_org(client, db):
    await client.post(PING, json=batch(2), headers=auth("driver", "drv_1", "org_7"))
    assert await db.fetchval('SELECT array_agg(DISTINCT "orgId") FROM "TripLocation"') == ["org_7"]


async def test_reads_of_another_org_answer_like_an_unknown_trip(client):
    assert (await client.post(PING, json=batch(3), headers=auth())).status == 200
    own = auth("dispatcher", "disp_a", "org_1")
    other = auth("dispatcher", "disp_b", "org_2")
    for template in (LATEST, HISTORY):
        resp = await client.get(template.format("trip_1"), headers=own)
        assert resp.status == 200
        theirs = await client.get(template.format("trip_1"), headers=other)
        unknown = await client.get(template.format("no_such_trip"), headers=own)
        assert theirs.status == unknown.status == 404
        assert await theirs.json() == {"error": "not_found", "detail": "no trip 'trip_1'"}
        assert await unknown.json() == {"error": "not_found", "detail": "no trip 'no_such_trip'"}
        assert theirs.headers["Cache-Control"] == "no-store"
    # Range and cursor do not open another door.
    q = "?from=1970-01-01T00:00:00Z&limit=1&cursor=djE6MA"
    resp = await client.get(HISTORY.format("trip_1") + q, headers=other)
    assert resp.status == 200 and (await resp.json())["locations"] == []


async def test_a_driver_reads_only_its_own_trips(client):
    assert (await client.post(PING, json=batch(2), headers=auth())).status == 200
    for template in (LATEST, HISTORY):
        mine = await client.get(template.format("trip_1"), headers=auth("driver", "drv_1"))
        assert mine.status == 200
        colleague = await client.get(template.format("trip_1"), headers=auth("driver", "drv_2"))
        assert colleague.status == 404
        assert await colleague.json() == {"error": "not_found", "detail": "no trip 'trip_1'"}


async def test_the_dedup_guard_is_per_org_and_reads_stay_per_org(client, db):
    """The guard is on ("orgId", "tripId", "timestamp"): another org reusing a trip id, driver
    id, batch id and instant stores its own pings, learns nothing, and reads only its own."""
    body = batch(2)
    assert (await (await client.post(PING, json=body, headers=auth())).json())["accepted"] == 2
    resp = await client.post(PING, json=body, headers=auth("driver", "drv_1", "org_2"))
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 2 and (await resp.json())["duplicates"] == 0
    own = await client.get(LATEST.format("trip_1"), headers=auth("dispatcher", "d", "org_2"))
    assert own.status == 200
    counts = await db.fetch('SELECT "orgId", count(*) FROM "TripLocation" GROUP BY 1 ORDER BY 1')
    assert [tuple(r) for r in counts] == [("org_1", 2), ("org_2", 2)]


async def test_org_ids_with_a_colon_do_not_meet_in_redis(client):
    """Redis names are prefix + org + ":" + trip. Org "a" asking for trip "b:t" must not
    read org "a:b"'s trip "t", and org "a"'s fleet must not match org "a:b"'s channels."""
    fleet = await ws_connect(client, token("dispatcher", "d", "a"))
    await subscribed(fleet, fleet=True)
    body = batch(1, trip="t", driver="drv_x")
    assert (
        await client.post(PING, json=body, headers=auth("driver", "drv_x", "a:b"))
    ).status == 200
    live = client.server.app[LIVE_STATE]
    for _ in range(100):  # the latest location is published after the ack
        if await live.latest("a:b", "t") is not None:
            break
        await asyncio.sleep(0.02)
    resp = await client.get(LATEST.format("b:t"), headers=auth("dispatcher", "d", "a"))
    got = await quiet(fleet)
    await fleet.close()
    assert resp.status == 404, await resp.text()
    assert got == []


# -- WebSocket -----------------------------------------------------------------------------


async def ws_connect(client, tok: str | None = None, **kw: Any):
    url = LIVE if tok is None else f"{LIVE}?access_token={tok}"
    return await client.ws_connect(url, **kw)


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    decoded: dict[str, Any] = json.loads(msg.data)
    return decoded


async def quiet(ws: aiohttp.ClientWebSocketResponse, wait: float = 0.4) -> list[dict[str, Any]]:
    """Every message that arrives within ``wait``."""
    got = []
    while True:
        try:
            got.append(await next_message(ws, wait))
        except TimeoutError:
            return got


async def subscribed(ws, settle: float = 0.3, **msg: Any) -> list[dict[str, Any]]:
    """Subscribe; the answer and whatever follows within ``settle`` (snapshots)."""
    await ws.send_json({"type": "subscribe", **msg})
    first = await next_message(ws)
    assert first["type"] == "subscribed", first
    return [first, *await quiet(ws, settle)] if settle else [first]


async def test_websocket_needs_a_token(client):
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await ws_connect(client)
    assert exc.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await ws_connect(client, signed(exp=int(time.time()) - 120, role="dispatcher"))
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
    await asyncio.sleep(0.2)  # the latest location is in Redis now: no snapshot may leak it
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


# -- operations endpoints --------------------------------------------------------------------


async def test_ops_endpoints_need_no_token(client):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer garbage"}):
            resp = await client.get(path, headers=headers)
            assert resp.status == 200, (path, await resp.text())
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# -- AUTH_DISABLED and the token command ---------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    return {**env, **extra}


async def _run(*args: str, env: dict[str, str], timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def _serve_auth_disabled(database: str, redis_prefix: str) -> tuple[int, str, str]:
    # ROLE=ingest: the banner does not depend on the role, and without the pub/sub listener
    # this test does not wait on its occasional hang at shutdown (reported separately).
    env = _env(
        AUTH_DISABLED="true", PORT="0", HOST="127.0.0.1", DATABASE_URL=database,
        REDIS_PREFIX=redis_prefix, ROLE="ingest",
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest", "serve", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            while b'"listening"' not in (line := await proc.stdout.readline()):
                assert line, "exited before listening"
            port = json.loads(line)["port"]
            # Signal handlers are installed just after that line: one request makes sure.
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_auth_is_off_only_when_asked_and_the_service_says_so(
    database, redis_prefix, ec_key, tmp_path
):
    key_file = tmp_path / "issuer.pem"
    key_file.write_text(pem_private(ec_key))
    served, no_key, hs_token, es_token = await asyncio.gather(
        _serve_auth_disabled(database, redis_prefix),
        _run("serve", env=_env(DATABASE_URL=database)),
        _run("token", "--role", "driver", "--sub", "drv_1", "--org", "org_1", env=_env(JWT_SECRET=SECRET)),
        _run("token", "--role", "dispatcher", "--sub", "d_1", "--org", "org_2", "--ttl", "60",
             "--private-key", str(key_file), env=_env(JWT_PUBLIC_KEY=pem_public(ec_key))),
    )  # fmt: skip
    code, _, err = served
    assert code == 0, err
    assert "AUTH_DISABLED=true: every request is accepted without a token" in err
    assert "!" * 80 in err  # a banner, not a log line lost among others

    code, out, err = no_key
    assert code == 2 and out == ""
    assert err.startswith(
        "ingest: invalid setting JWT_SECRET: set JWT_SECRET (HS256) or JWT_PUBLIC_KEY"
    )
    assert "AUTH_DISABLED=true for development" in err

    code, out, err = hs_token
    assert code == 0, err
    principal = Verifier(load_settings({}, jwt_secret=SECRET)).verify(out.strip())
    assert principal == Principal("drv_1", "driver", "org_1")

    code, out, err = es_token
    assert code == 0, err
    tok = out.strip()
    assert jwt.get_unverified_header(tok)["alg"] == "ES256"
    assert 55 <= jwt.decode(tok, options={"verify_signature": False})["exp"] - time.time() <= 60
    principal = Verifier(load_settings({}, jwt_public_key=pem_public(ec_key))).verify(tok)
    assert principal == Principal("d_1", "dispatcher", "org_2")


def test_auth_disabled_must_be_explicit():
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({})
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({"AUTH_DISABLED": "false"})
    with pytest.raises(SettingsError, match="AUTH_DISABLED"):
        load_settings({"AUTH_DISABLED": "maybe"})
    assert load_settings({"AUTH_DISABLED": "true"}).auth_disabled


async def test_auth_disabled_still_checks_tokens_it_can_check(make_client, db):
    """With AUTH_DISABLED and no key, requests without a token act as the "dev" org; with a
    key configured too, a token that is sent is still verified."""
    client = await make_client(auth_disabled=True, jwt_secret=None)
    resp = await client.post(PING, json=batch(1, driver="anyone"))
    assert resp.status == 200
    assert await db.fetchval('SELECT "orgId" FROM "TripLocation"') == "dev"
    keyed = await make_client(auth_disabled=True)
    resp = await keyed.post(PING, json=batch(1), headers=bearer("abc"))
    assert resp.status == 401


# -- hostile input ---------------------------------------------------------------------------
# On an ingest-only instance (ROLE=ingest), as the public ingest path is deployed.


@pytest.fixture
async def ingest(make_client):
    return await make_client(role="ingest")


async def post_raw(client, data: bytes, **headers: str) -> tuple[int, Any]:
    resp = await client.post(PING, data=data, headers={**auth(), **JSON, **headers})
    return resp.status, await resp.json()


def invalid(detail: str) -> dict[str, str]:
    return {"error": "invalid_payload", "detail": detail}


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
    assert await post_raw(client, msgspec.json.encode(batch(40))) == too_large
    # The same limit on the decompressed size of a gzip body.
    small = gzip.compress(msgspec.json.encode(batch(40)))
    assert len(small) < 2000
    assert await post_raw(client, small, **{"Content-Encoding": "gzip"}) == too_large


async def test_gzip_bomb_is_refused_without_inflating_it(ingest):
    bomb = gzip_of_zeros(1000)  # 1000 MiB of zeros in about 1 MB
    limit = ingest.server.app[SETTINGS].max_body_bytes
    assert len(bomb) < limit  # so it is the decompressed size that is refused
    tracemalloc.start()
    try:
        status, body = await post_raw(ingest, bomb, **{"Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    too_large = {"error": "payload_too_large", "detail": f"body larger than {limit} bytes"}
    assert (status, body) == (413, too_large)
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB while refusing a gzip bomb"


async def test_unsupported_media_is_415(ingest):
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
        got = await post_raw(ingest, data, **headers)
        assert got == (415, {"error": "unsupported_media_type", "detail": detail}), headers


async def test_encodings_aiohttp_knows_but_we_do_not_are_415(ingest):
    for encoding in ("br", "zstd"):
        resp = await ingest.post(
            PING, data=b"\x00" * 16, headers={**auth(), **JSON, "Content-Encoding": encoding}
        )
        assert resp.status == 415, (encoding, await resp.text())
        assert (await resp.json())["error"] == "unsupported_media_type"


async def test_x_gzip_is_decoded_like_gzip(ingest):
    status, body = await post_raw(
        ingest, gzip.compress(msgspec.json.encode(batch(2))), **{"Content-Encoding": "x-gzip"}
    )
    assert status == 200 and body["accepted"] == 2, body


async def test_non_finite_and_overflowing_literals_are_400(ingest):
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"):
        body = msgspec.json.encode(batch(1)).replace(
            b'"latitude":12.9', b'"latitude":' + literal, 1
        )
        assert literal in body
        status, resp = await post_raw(ingest, body)
        if literal.endswith(b"e400"):
            assert (status, resp) == (
                400,
                invalid("Number out of range - at `$.locations[0].latitude`"),
            )
        else:
            assert status == 400 and resp["error"] == "invalid_payload", literal
            assert resp["detail"].startswith("JSON is malformed: invalid character (byte ")


async def test_1e308_is_range_checked_per_ping(ingest, db):
    body = batch(3)
    body["locations"][0]["latitude"] = 1e308  # out of range: this ping only is rejected
    body["locations"][1]["altitude"] = 1e308  # finite, no range: accepted
    body["locations"][2]["speed"] = -1e308
    status, resp = await post_raw(ingest, msgspec.json.encode(body))
    assert status == 200
    assert resp["accepted"] == 1
    assert resp["rejected"] == [
        {"index": 0, "reason": "latitude must be a finite number in [-90, 90]"},
        {"index": 2, "reason": "speed must be a finite number >= 0"},
    ]
    assert await db.fetchval('SELECT "altitude" FROM "TripLocation"') == 1e308


async def test_nan_and_infinity_in_msgpack_are_rejected_per_ping(ingest, db):
    """JSON cannot carry NaN; msgpack can, and then the range rules reject the ping."""
    body = batch(4)
    body["locations"][0]["latitude"] = float("nan")
    body["locations"][1]["accuracy"] = float("inf")
    body["locations"][2]["altitude"] = float("-inf")
    resp = await ingest.post(
        PING,
        data=msgspec.msgpack.encode(body),
        headers={**auth(), "Content-Type": "application/msgpack"},
    )
    assert resp.status == 200
    assert (await resp.json())["rejected"] == [
        {"index": 0, "reason": "latitude must be a finite number in [-90, 90]"},
        {"index": 1, "reason": "accuracy must be a finite number >= 0"},
        {"index": 2, "reason": "altitude must be a finite number"},
    ]
    assert await db.fetchval('SELECT count(*) FROM "TripLocation"') == 1


async def test_deep_nesting_in_a_typed_field_is_400(ingest):
    deep = b"[" * 100_000 + b"]" * 100_000
    for field in (b"tripId", b"locations"):
        body = b'{"driverId":"drv_1","' + field + b'":' + deep + b"}"
        status, resp = await post_raw(ingest, body)
        assert status == 400 and resp["error"] == "invalid_payload", field
    assert await post_raw(ingest, deep) == (400, invalid("Expected `object`, got `array`"))


async def test_deep_nesting_in_an_ignored_field_is_400(ingest):
    """Unknown fields are skipped, but skipping still recurses: RecursionError today (500)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for data, content_type in (
        (msgspec.json.encode(batch(1))[:-1] + b',"x":' + deep + b"}", "application/json"),
        (b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0", "application/msgpack"),
    ):
        status, resp = await post_raw(ingest, data, **{"Content-Type": content_type})
        assert status == 400 and resp["error"] == "invalid_payload", content_type


async def test_invalid_utf8_is_400(ingest):
    body = msgspec.json.encode(batch(1)).replace(b'"trip_1"', b'"trip_\xff"')
    status, resp = await post_raw(ingest, body)
    assert status == 400 and resp["error"] == "invalid_payload"


async def test_very_long_ids_are_400_naming_the_path(ingest):
    for field in ("tripId", "driverId", "batchId"):
        body = batch(1)
        body[field] = "x" * 100_000
        got = await post_raw(ingest, msgspec.json.encode(body))
        assert got == (400, invalid(f"Expected `str` of length <= 64 - at `$.{field}`"))
    body = batch(1)
    del body["batchId"]
    body["locations"][0]["batchId"] = "y" * 65
    got = await post_raw(ingest, msgspec.json.encode(body))
    assert got == (400, invalid("Expected `str` of length <= 64 - at `$.locations[0].batchId`"))


async def test_control_characters_in_ids_are_400(ingest):
    for field in ("tripId", "driverId", "batchId"):
        for char in ("\x00", "\t", "\n", "\r", "\x1b", "\x7f"):
            body = batch(1)
            body[field] = f"id{char}x"
            status, resp = await post_raw(ingest, msgspec.json.encode(body))
            assert status == 400 and resp["error"] == "invalid_payload", (field, char)
            assert resp["detail"].startswith("Expected `str` matching regex")
            assert resp["detail"].endswith(f" - at `$.{field}`")


async def test_c1_control_characters_in_ids_are_400(ingest):
    for char in ("\x85", "\x9b"):  # NEL; CSI, which starts terminal escape sequences
        status, resp = await post_raw(ingest, msgspec.json.encode(batch(1, trip=f"trip{char}1")))
        assert status == 400 and resp["detail"].endswith(" - at `$.tripId`"), char


async def test_duplicate_keys_the_last_one_wins(ingest, db):
    """Observed behaviour (msgspec): of duplicate keys the last one counts, at every level.
    Authorisation reads the same decoded value as storage, so a duplicate cannot smuggle a
    driverId past the subject check."""
    good = msgspec.json.encode(batch(1))
    smuggle = good.replace(b'"driverId":"drv_1"', b'"driverId":"drv_1","driverId":"drv_2"')
    forbidden = {"error": "forbidden", "detail": "driverId does not match the token's subject"}
    assert await post_raw(ingest, smuggle) == (403, forbidden)
    twice = good.replace(b'"driverId":"drv_1"', b'"driverId":"drv_2","driverId":"drv_1"')
    twice = twice.replace(b'"latitude":12.9', b'"latitude":99,"latitude":12.9')
    status, resp = await post_raw(ingest, twice)
    assert status == 200 and resp["accepted"] == 1
    assert await db.fetchval('SELECT "latitude" FROM "TripLocation"') == 12.9


async def test_ten_thousand_pings_are_400_naming_locations(ingest):
    """Within the default body limit (1 MiB) with short pings; the batch limit still holds."""
    start = now_ms(-600)
    pings = [{"latitude": 1, "longitude": 2, "timestamp": start + i} for i in range(10_000)]
    body = msgspec.json.encode({"tripId": "t", "driverId": "drv_1", "locations": pings})
    assert len(body) < 1_048_576
    assert await post_raw(ingest, body) == (
        400,
        invalid("$.locations: at most 1000 pings per batch"),
    )


# -- per-driver rate limit ---------------------------------------------------------------


async def test_per_driver_rate_limit_is_429_with_retry_after(make_client):
    client = await make_client(rate_limit_per_s=0.5, rate_limit_burst=2)
    for _ in range(2):
        assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    resp = await client.post(PING, json=batch(1), headers=auth())
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"  # one token every 2 s
    assert await resp.json() == {
        "error": "rate_limited",
        "detail": "too many requests for this driver",
    }
    other = await client.post(
        PING, json=batch(1, trip="trip_2", driver="drv_2"), headers=auth("driver", "drv_2")
    )
    assert other.status == 200


async def test_rate_limit_buckets_are_per_org(make_client):
    """Driver ids are unique within an org only: org_2's drv_1 has a bucket of its own."""
    client = await make_client(rate_limit_per_s=0.5, rate_limit_burst=1)
    assert (await client.post(PING, json=batch(1), headers=auth())).status == 200
    resp = await client.post(PING, json=batch(1), headers=auth("driver", "drv_1", "org_2"))
    assert resp.status == 200
