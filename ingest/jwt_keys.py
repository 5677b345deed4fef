"""JWT keys: reading them from PEM text, and the one algorithm each key allows.

settings.py checks JWT_PUBLIC_KEY with this module when it loads, and auth.py verifies and
signs tokens with the keys it returns. It imports nothing of the service, so both can.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
# The JWS algorithm of each elliptic curve (RFC 7518 section 3.4).
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: an HS256 key at least as long as the hash


class InvalidKey(ValueError):
    """A key that cannot sign or verify our tokens; the message says why."""


def load_public_key(pem: str) -> PublicKey:
    """JWT_PUBLIC_KEY: a PEM public key or certificate. Escaped newlines (``\\n``, as a
    one-line environment variable often carries them) are accepted."""
    data = pem.replace("\\n", "\n").strip().encode()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKey(f"not a PEM public key or certificate ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGORITHMS:
        return key
    raise InvalidKey(
        "must be an RSA (RS256) or an EC P-256 (ES256), P-384 (ES384) or P-521 (ES512) public key"
    )


def verification_key(public_key: str | None, secret: str | None) -> tuple[Any, list[str]]:
    """The key tokens are checked with and the algorithms it allows. The algorithm follows
    from the key's type, never from the token's header: an RSA key accepts only RS256, a
    P-256 key only ES256 (P-384 ES384, P-521 ES512), a secret only HS256. (None, []) without
    a key. Raises InvalidKey."""
    if public_key:
        key = load_public_key(public_key)
        if isinstance(key, rsa.RSAPublicKey):
            return key, ["RS256"]
        return key, [EC_ALGORITHMS[key.curve.name]]
    if secret:
        return secret, ["HS256"]
    return None, []


def load_private_key(pem: str) -> tuple[PrivateKey, str]:
    """An unencrypted PEM private key and the algorithm its type chooses. Raises InvalidKey."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKey(f"not an unencrypted PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in EC_ALGORITHMS:
        return key, EC_ALGORITHMS[key.curve.name]
    raise InvalidKey("the private key must be RSA (RS256) or EC P-256/P-384/P-521 (ES256/384/512)")
