"""Who is calling, and what they may do: the one module every endpoint and the WebSocket use.

An endpoint calls ``authenticate`` (or its WebSocket and phone-app forms) for the caller's
Principal, then ``require``s the rule of what it does; both raise the 401 or 403 answer.
Tokens are verified once and then served from the Verifier's cache until they expire.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jwt
import msgspec
from aiohttp import web

from .jwt_keys import MIN_SECRET_BYTES, InvalidKey, load_private_key, verification_key
from .schema import CONTROL, Error, encoder, storable_id, utf8
from .settings import Settings
from .typedefs import VERIFIER

log = logging.getLogger("ingest.auth")

Role = Literal["driver", "dispatcher"]
_CACHE_MAX = 50_000  # verified tokens remembered; a few hundred bytes each
# WWW-Authenticate challenges of a 401.
BEARER = "Bearer"
BASIC = 'Basic realm="ingest", charset="UTF-8"'  # OwnTracks sends the token as a password


class Principal(msgspec.Struct, frozen=True):
    sub: str
    role: Role
    org: str


class AuthError(Exception):
    """No token, or a token that does not verify. The message says which."""


# -- the answers -------------------------------------------------------------------------------


def _json(exc: web.HTTPException, code: str, detail: str) -> None:
    """The body every error answer has (responses.error), byte for byte: a JSON Error, and
    a Content-Type without the charset the HTTPException constructor's default text adds."""
    exc.body = encoder.encode(Error(error=code, detail=detail))
    exc.charset = None


class Unauthorized(web.HTTPUnauthorized):
    """401 ``unauthorized``, with the challenge of the endpoint's scheme."""

    def __init__(self, detail: str, challenge: str = BEARER) -> None:
        super().__init__(headers={"WWW-Authenticate": challenge}, content_type="application/json")
        _json(self, "unauthorized", detail)


class Forbidden(web.HTTPForbidden):
    """403 ``forbidden``: a valid token that may not do this."""

    def __init__(self, detail: str) -> None:
        super().__init__(content_type="application/json")
        _json(self, "forbidden", detail)


# -- the token of a request --------------------------------------------------------------------


def bearer_token(request: web.Request) -> str | None:
    """The API's and the WebSocket's: an ``Authorization: Bearer`` header, else
    ``?access_token=`` (browsers cannot set headers on a WebSocket). Raises AuthError."""
    header = request.headers.get("Authorization")
    if not header:
        return request.query.get("access_token") or None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return value.strip()


def app_token(request: web.Request) -> str | None:
    """The phone apps': a Bearer header, the password of a Basic header, or ``?token=`` /
    ``?access_token=`` (what each app can be configured to send). Raises AuthError."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if scheme.lower() == "basic":
            if password := _basic_password(value):
                return password
        else:
            raise AuthError(
                "Authorization must be 'Bearer <token>', or Basic with the token as password"
            )
    return request.query.get("token") or request.query.get("access_token") or None


def _basic_password(value: str) -> str:
    """The password of Basic credentials (base64 of "user:password"); the user is ignored."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:  # binascii.Error, UnicodeDecodeError, and the plain ValueError of
        # text that is not ASCII: aiohttp decodes header bytes as UTF-8 (surrogate-escaped).
        raise AuthError("malformed Basic credentials") from None
    _, colon, password = decoded.partition(":")
    if not colon:
        raise AuthError("malformed Basic credentials")
    return password


# -- who is calling ----------------------------------------------------------------------------


def authenticate(request: web.Request) -> Principal:
    """The caller of an API endpoint. Raises Unauthorized."""
    return _verified(request, bearer_token, BEARER)[0]


def authenticate_exp(request: web.Request) -> tuple[Principal, float]:
    """The caller of the WebSocket, and its token's ``exp`` (Verifier.verify_exp), which the
    socket does not outlive. Raises Unauthorized."""
    return _verified(request, bearer_token, BEARER)


def authenticate_app(request: web.Request, challenge: str = BEARER) -> Principal:
    """The caller of a phone-app endpoint (app_token); ``challenge`` is the scheme its app
    answers a 401 with. Raises Unauthorized."""
    return _verified(request, app_token, challenge)[0]


def _verified(
    request: web.Request, token_of: Callable[[web.Request], str | None], challenge: str
) -> tuple[Principal, float]:
    try:
        return request.app[VERIFIER].verify_exp(token_of(request))
    except AuthError as exc:
        raise Unauthorized(str(exc), challenge) from None


class Verifier:
    """Verifies bearer tokens; remembers verified ones until they expire, since a phone
    sends the same token with every batch and signature checks cost more than the batch."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.disabled = settings.auth_disabled
        self.key, self.algorithms = verification_key(settings.jwt_public_key, settings.jwt_secret)
        if settings.jwt_secret and len(settings.jwt_secret.encode()) < MIN_SECRET_BYTES:
            log.warning(
                "jwt_secret_short",
                extra={"detail": f"JWT_SECRET should be at least {MIN_SECRET_BYTES} bytes"},
            )
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_s
        self.clock = clock
        self._cache: dict[str, tuple[Principal, float]] = {}  # token -> (principal, exp)

    def verify(self, token: str | None) -> Principal:
        return self.verify_exp(token)[0]

    def verify_exp(self, token: str | None) -> tuple[Principal, float]:
        """verify(), and the token's ``exp`` (epoch seconds; infinite for the development
        principal). Like HTTP, whoever holds the token is served until ``exp`` + JWT_LEEWAY_S
        (``self.leeway``): a WebSocket is closed then."""
        if token is None:
            if self.disabled:
                return _DEV_FOREVER
            raise AuthError("missing bearer token")
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] + self.leeway >= self.clock():
                return hit
            del self._cache[token]
            raise AuthError("token expired")
        if self.key is None:  # AUTH_DISABLED and no key to check a given token with
            if self.disabled:
                return _DEV_FOREVER
            raise AuthError("invalid token: no JWT_SECRET or JWT_PUBLIC_KEY to verify it with")
        if not token.isascii():
            # A JWT is base64url and dots. PyJWT encodes the text to UTF-8 first, which raises
            # UnicodeEncodeError (no PyJWTError) for the surrogates aiohttp decodes bytes that
            # are not UTF-8 to: a 500, unchecked. Cached tokens passed this already.
            raise AuthError("invalid token: not ASCII")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:  # InvalidKeyError is not an InvalidTokenError
            raise AuthError(f"invalid token: {exc}") from None
        principal = _principal(claims)
        raw_exp = claims["exp"]
        try:
            # A JSON number: PyJWT takes a numeric string (or true) as well, and a string of
            # 400 digits would become an exp of inf, a token that never expires.
            if isinstance(raw_exp, bool) or not isinstance(raw_exp, int | float):
                raise TypeError(raw_exp)
            exp = float(raw_exp)
        except (TypeError, ValueError, OverflowError):
            raise AuthError("invalid token: claim 'exp' must be a number") from None
        return self._remember(token, principal, exp)

    def _remember(self, token: str, principal: Principal, exp: float) -> tuple[Principal, float]:
        if len(self._cache) >= _CACHE_MAX:
            now = self.clock()
            self._cache = {t: v for t, v in self._cache.items() if v[1] + self.leeway >= now}
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
        verified = self._cache[token] = (principal, exp)
        return verified


def _principal(claims: dict[str, Any]) -> Principal:
    sub, role, org = claims.get("sub"), claims.get("role"), claims.get("org")
    if role not in ("driver", "dispatcher"):
        raise AuthError("invalid token: claim 'role' must be 'driver' or 'dispatcher'")
    # Both reach logs, queries and Redis names; the org is stored with every ping and keys
    # every org-scoped row, so it is an id like the others. A NUL, or a lone surrogate (JSON
    # may escape one, and PyJWT's json reads it), fails the statement or command it is in: a
    # 500 for a signed token.
    if not isinstance(sub, str) or not sub or CONTROL.search(sub) or not utf8(sub):
        raise AuthError(
            "invalid token: claim 'sub' must be a non-empty string without control characters"
        )
    if not isinstance(org, str) or not storable_id(org) or not utf8(org):
        raise AuthError(
            "invalid token: claim 'org' must be 1-64 characters without control characters"
        )
    return Principal(sub=sub, role=role, org=org)


# With AUTH_DISABLED and no token: a dispatcher of the "dev" org, who may also post as anyone.
DEV_ORG = "dev"
DEV_PRINCIPAL = Principal(sub="*", role="dispatcher", org=DEV_ORG)
_DEV_FOREVER = (DEV_PRINCIPAL, math.inf)


# -- what they may do --------------------------------------------------------------------------


class Rule(NamedTuple):
    """Who may do one thing: a token of ``role``; anyone else gets 403 ``denied``."""

    role: Role
    denied: str


POST_PINGS = Rule("driver", "only driver tokens may post pings")
HAND_OVER = Rule("dispatcher", "only dispatcher tokens may hand a trip over")
WATCH_LIVE = Rule("dispatcher", "live locations need a dispatcher token")
DISPATCH = Rule("dispatcher", "dispatch endpoints (nearby, geofences) need a dispatcher token")


def require(principal: Principal, rule: Rule) -> None:
    """Raises Forbidden unless the principal may do what ``rule`` covers. The development
    principal may do everything."""
    if principal.role != rule.role and principal is not DEV_PRINCIPAL:
        raise Forbidden(rule.denied)


def require_driver_id(principal: Principal, driver_id: str) -> None:
    """Raises Forbidden unless ``driver_id`` is the token's driver: drivers post only as
    themselves (the development principal as anyone)."""
    if principal is not DEV_PRINCIPAL and (
        principal.role != "driver" or principal.sub != driver_id
    ):
        raise Forbidden("driverId does not match the token's subject")


def driver_filter(principal: Principal) -> str | None:
    """Which trips of its org a principal may read: a driver only those they drove (their
    id), a dispatcher every one (None)."""
    return principal.sub if principal.role == "driver" else None


def changed_claim(current: Principal, new: Principal) -> str | None:
    """The first claim in which a refreshing token differs from the one it replaces; a
    socket's token may be replaced only by one of the same subject, org and role."""
    for claim in ("sub", "org", "role"):
        if getattr(new, claim) != getattr(current, claim):
            return claim
    return None


# -- signing (python -m ingest token) ----------------------------------------------------------


def issue_token(
    settings: Settings, sub: str, role: Role, org: str, ttl_s: int = 86_400, key: str | None = None
) -> str:
    """Sign a token with the configured HS256 secret, or with ``key``, a PEM private key
    whose type (RSA or EC) chooses the algorithm (RS256 or ES256/384/512)."""
    _principal({"sub": sub, "role": role, "org": org})  # never sign one the service refuses
    signing_key, alg = _signing_key(settings, key)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "role": role, "org": org, "iat": now, "exp": now + ttl_s}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, signing_key, algorithm=alg)


def _signing_key(settings: Settings, key: str | None) -> tuple[Any, str]:
    if key is not None:
        try:
            return load_private_key(key)
        except InvalidKey as exc:
            raise AuthError(str(exc)) from None
    if not settings.jwt_secret:
        raise AuthError(
            "JWT_SECRET is not set: pass the private key of JWT_PUBLIC_KEY to sign with"
        )
    return settings.jwt_secret, "HS256"
