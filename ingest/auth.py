"""JWT verification and tenancy: who is calling, and which org's data they may touch."""

from __future__ import annotations

import time
from typing import Any, Literal

import jwt
import msgspec

from .settings import Settings

Role = Literal["driver", "dispatcher"]
_CACHE_MAX = 50_000


class Principal(msgspec.Struct, frozen=True):
    sub: str
    role: Role
    org: str


class AuthError(Exception):
    """401: no token, or a token that does not verify. The message says which."""


class Forbidden(Exception):
    """403: a valid token that may not do this."""


class Verifier:
    """Verifies bearer tokens; remembers verified ones until they expire, since a phone
    sends the same token with every batch and signature checks cost more than the batch."""

    def __init__(self, settings: Settings) -> None:
        self.disabled = settings.auth_disabled
        self.key = settings.jwt_verify_key
        self.algorithms = settings.jwt_algorithms
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    def verify(self, token: str | None) -> Principal:
        if token is None:
            if self.disabled:
                return DEV_PRINCIPAL
            raise AuthError("missing bearer token")
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] + self.leeway >= time.time():
                return hit[0]
            del self._cache[token]
            raise AuthError("token expired")
        if self.key is None:  # auth disabled and no key to check a given token with
            return DEV_PRINCIPAL
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
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        principal = _principal(claims)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (principal, float(claims["exp"]))
        return principal


def _principal(claims: dict[str, Any]) -> Principal:
    sub, role, org = claims.get("sub"), claims.get("role"), claims.get("org")
    if role not in ("driver", "dispatcher"):
        raise AuthError("invalid token: claim 'role' must be 'driver' or 'dispatcher'")
    if not isinstance(sub, str) or not sub:
        raise AuthError("invalid token: claim 'sub' must be a non-empty string")
    if not isinstance(org, str) or not org:
        raise AuthError("invalid token: claim 'org' must be a non-empty string")
    return Principal(sub=sub, role=role, org=org)


# With AUTH_DISABLED and no token: a dispatcher of the "dev" org, who may also post as anyone.
DEV_ORG = "dev"
DEV_PRINCIPAL = Principal(sub="*", role="dispatcher", org=DEV_ORG)


def may_post_as(principal: Principal, driver_id: str, disabled: bool) -> bool:
    if principal is DEV_PRINCIPAL:
        return disabled
    return principal.role == "driver" and principal.sub == driver_id


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def issue_token(
    settings: Settings, sub: str, role: Role, org: str, ttl_s: int = 86_400, key: str | None = None
) -> str:
    """Sign a token with the configured key (HS256 secret, or a private key via ``key``)."""
    signing_key = key or settings.jwt_secret
    if signing_key is None:
        raise AuthError("JWT_SECRET is not set (or pass a private key to sign with)")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "role": role, "org": org, "iat": now, "exp": now + ttl_s}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    alg = "HS256" if key is None else ("ES256" if "EC PRIVATE" in key else "RS256")
    return jwt.encode(claims, signing_key, algorithm=alg)
