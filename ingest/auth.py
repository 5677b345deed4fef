"""JWT verification and tenancy: who is calling, and which org's data they may touch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import jwt
import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .settings import Settings, SettingsError

log = logging.getLogger("ingest.auth")

Role = Literal["driver", "dispatcher"]
_CACHE_MAX = 50_000  # verified tokens remembered; a few hundred bytes each
# The JWS algorithm of each elliptic curve (RFC 7518 section 3.4).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: an HS256 key at least as long as the hash


class Principal(msgspec.Struct, frozen=True):
    sub: str
    role: Role
    org: str


class AuthError(Exception):
    """401: no token, or a token that does not verify. The message says which."""


class Verifier:
    """Verifies bearer tokens; remembers verified ones until they expire, since a phone
    sends the same token with every batch and signature checks cost more than the batch."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.disabled = settings.auth_disabled
        self.key, self.algorithms = verification_key(settings)
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
        if self.key is None:  # auth disabled and no key to check a given token with
            return _DEV_FOREVER
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
        try:
            exp = float(claims["exp"])
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


def verification_key(settings: Settings) -> tuple[Any, list[str]]:
    """The key tokens are checked with and the algorithms it allows. The algorithm follows
    from the key's type, never from the token's header: an RSA key accepts only RS256, a
    P-256 key only ES256 (P-384 ES384, P-521 ES512), a secret only HS256.
    Raises SettingsError for a key that cannot be used."""
    if settings.jwt_public_key:
        key = load_public_key(settings.jwt_public_key)
        if isinstance(key, rsa.RSAPublicKey):
            return key, ["RS256"]
        return key, [_EC_ALGORITHMS[key.curve.name]]
    if settings.jwt_secret:
        if len(settings.jwt_secret.encode()) < _MIN_SECRET_BYTES:
            log.warning(
                "jwt_secret_short",
                extra={"detail": f"JWT_SECRET should be at least {_MIN_SECRET_BYTES} bytes"},
            )
        return settings.jwt_secret, ["HS256"]
    return None, []


def load_public_key(pem: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """JWT_PUBLIC_KEY: a PEM public key or certificate. Escaped newlines (``\\n``, as a
    one-line environment variable often carries them) are accepted."""
    data = pem.replace("\\n", "\n").strip().encode()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SettingsError(
            f"invalid setting JWT_PUBLIC_KEY: not a PEM public key or certificate ({exc})"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return key
    raise SettingsError(
        "invalid setting JWT_PUBLIC_KEY: must be an RSA (RS256) or an EC P-256 (ES256),"
        " P-384 (ES384) or P-521 (ES512) public key"
    )


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
_DEV_FOREVER = (DEV_PRINCIPAL, math.inf)


def may_post_as(principal: Principal, driver_id: str, disabled: bool) -> bool:
    if principal is DEV_PRINCIPAL:
        return disabled
    return principal.role == "driver" and principal.sub == driver_id


def issue_token(
    settings: Settings, sub: str, role: Role, org: str, ttl_s: int = 86_400, key: str | None = None
) -> str:
    """Sign a token with the configured HS256 secret, or with ``key``, a PEM private key
    whose type (RSA or EC) chooses the algorithm (RS256 or ES256)."""
    signing_key, alg = _signing_key(settings, key)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "role": role, "org": org, "iat": now, "exp": now + ttl_s}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, signing_key, algorithm=alg)


def _signing_key(settings: Settings, key: str | None) -> tuple[Any, str]:
    if key is None:
        if not settings.jwt_secret:
            raise AuthError(
                "JWT_SECRET is not set: pass the private key of JWT_PUBLIC_KEY to sign with"
            )
        return settings.jwt_secret, "HS256"
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuthError(f"not an unencrypted PEM private key: {exc}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        return private, "RS256"
    if isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name in _EC_ALGORITHMS:
        return private, _EC_ALGORITHMS[private.curve.name]
    raise AuthError("the private key must be RSA (RS256) or EC P-256/P-384/P-521 (ES256/384/512)")
