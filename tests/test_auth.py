"""Authentication (ingest/auth.py): every endpoint refuses a missing or bad token with its
exact answer; HS256, RS256 and ES256 tokens; issuer and audience; the token cache; AUTH_DISABLED."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ingest.auth import AuthError, Principal, Verifier, issue_token
from ingest.jwt_keys import load_public_key
from ingest.logs import JsonFormatter
from ingest.settings import SettingsError, load_settings
from ingest.typedefs import SETTINGS

from .conftest import LIVE, PING, SECRET, batch, bearer, pem_private, pem_public

LATEST = "/api/v1/tracking/trips/{}/latest"
HISTORY = "/api/v1/tracking/trips/{}/locations"


# -- helpers -----------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid driver token; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "drv_1", "role": "driver", "org": "org_1", "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: Any = SECRET, alg: str = "HS256", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=alg)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token PyJWT would refuse to make (a PEM public key used as the secret)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


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
        *[(signed(org=org), "invalid token: claim 'org' must be 1-64 characters without control characters")
          for org in (None, "", 7, "o\x00rg", "org\n", "o\x1frg", "o\x85rg", "o" * 65)],
        *[(signed(sub=sub), "invalid token: claim 'sub' must be a non-empty string without control characters")
          for sub in ("", "drv\x00", "drv\n", "d\x7frv")],
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


async def raw_request(client, method: str, path: str, head: bytes) -> tuple[int, bytes, Any]:
    """Status, WWW-Authenticate and JSON body of a request whose header lines ``head`` are
    sent as raw bytes (aiohttp's client refuses header text beyond Latin-1)."""
    body = json.dumps(batch(1)).encode() if method == "POST" else b""
    start = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(start.encode() + head + b"Connection: close\r\n\r\n" + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    top, _, content = answer.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers.get(b"Content-Type") == b"application/json", (path, answer)
    return int(lines[0].split()[1]), headers.get(b"WWW-Authenticate", b""), json.loads(content)


# Credentials that are not ASCII, as the bytes a client sends: aiohttp decodes header values
# as UTF-8 with surrogateescape, so \xff becomes '\udcff', which PyJWT cannot encode (a
# UnicodeEncodeError) and b64decode refuses with a plain ValueError, as it does 'é'.
NOT_ASCII = "invalid token: not ASCII"
BASIC_PASSWORD = base64.b64encode("drv_1:é.leak4.x".encode())
RAW_CREDENTIALS = [  # (Authorization value, detail of an API endpoint, of a phone-app one)
    (b"Bearer \xff\xfe.leak1.x", NOT_ASCII, NOT_ASCII),
    (b"Bearer \xc3\xa9.leak2.x", NOT_ASCII, NOT_ASCII),
    (
        b"Basic \xc3\xa9",
        "Authorization header must be 'Bearer <token>'",
        "malformed Basic credentials",
    ),
    (b"Basic \xff", "Authorization header must be 'Bearer <token>'", "malformed Basic credentials"),
    (b"Basic " + BASIC_PASSWORD, "Authorization header must be 'Bearer <token>'", NOT_ASCII),
]
# The query forms: yarl decodes bytes that are not UTF-8 to U+FFFD (no surrogates).
RAW_QUERIES = ["access_token=%FF%FE.leak3.x", "access_token=%C3%A9.leak3.x", "token=%ED%B3%BF"]
UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def test_credentials_that_are_not_ascii_are_401_everywhere_never_500(client, caplog):
    caplog.set_level(logging.DEBUG)
    for method, path in ENDPOINTS + PHONE_ENDPOINTS:
        phone = "/ingest/" in path
        challenge = b'Basic realm="ingest", charset="UTF-8"' if "owntracks" in path else b"Bearer"
        upgrade = UPGRADE if path == LIVE else b""  # the WebSocket handshake itself
        for credential, api_detail, phone_detail in RAW_CREDENTIALS:
            head = upgrade + b"Authorization: " + credential + b"\r\n"
            got = await raw_request(client, method, path, head)
            want = unauthorized(phone_detail if phone else api_detail)
            assert got == (401, challenge, want), (method, path, credential)
        sep = "&" if "?" in path else "?"
        for query in RAW_QUERIES:
            if query.startswith("token=") and not phone:
                continue  # ?token= is the phone apps' alone
            got = await raw_request(client, method, f"{path}{sep}{query}", upgrade)
            assert got == (401, challenge, unauthorized(NOT_ASCII)), (method, path, query)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    for record in caplog.records:  # the credential in no log line, as written
        line = JsonFormatter().format(record)
        assert "leak" not in line and BASIC_PASSWORD.decode() not in line, line


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


def test_issue_token_never_signs_a_token_the_service_refuses():
    s = load_settings({}, jwt_secret=SECRET)
    for org in ("o\x00rg", "o" * 65, ""):
        with pytest.raises(AuthError, match="claim 'org' must be 1-64 characters"):
            issue_token(s, "drv_1", "driver", org)
    with pytest.raises(AuthError, match="claim 'sub' must be"):
        issue_token(s, "drv\n", "driver", "org_1")


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


# -- AUTH_DISABLED ----------------------------------------------------------------------------


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
