"""Simulated drivers and their tokens: HS256 JWTs with the claims the service checks.

Each driver may post only as itself (sub == driverId), so every simulated driver gets its
own token. The load generators read them from a data file: Lua for wrk, JSON for Python.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import jwt

ORG = "bench"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def sign(secret: str, sub: str, role: str, org: str = ORG, ttl_s: int = 4 * 3600) -> str:
    now = int(time.time())
    claims = {"sub": sub, "role": role, "org": org, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")


def drivers(secret: str, n: int, prefix: str = "drv", org: str = ORG) -> list[tuple[str, str]]:
    """``n`` (driverId, token) pairs of ``org``."""
    return [(f"{prefix}{i:05d}", sign(secret, f"{prefix}{i:05d}", "driver", org)) for i in range(n)]


def write_lua(
    path: Path,
    pairs: list[tuple[str, str]],
    tracks: list[tuple[float, float, float, float]] | None = None,
) -> Path:
    """A Lua chunk returning {drivers = {...}, tokens = {...}}, for wrk's dofile(); with
    ``tracks``, also each driver's {lat, lon, dlat, dlon}: where its trip starts and the degrees
    it moves per ping (wrk/pings.lua)."""
    ids = ",".join(f'"{d}"' for d, _ in pairs)
    toks = ",".join(f'"{t}"' for _, t in pairs)
    extra = ""
    if tracks is not None:
        assert len(tracks) == len(pairs), "one track per driver"
        extra = ", tracks = {" + ",".join("{" + ",".join(map(repr, t)) + "}" for t in tracks) + "}"
    path.write_text(f"return {{drivers = {{{ids}}}, tokens = {{{toks}}}{extra}}}\n")
    return path


def write_json(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text(json.dumps(pairs))
    return path
