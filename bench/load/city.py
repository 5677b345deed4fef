"""A 50 km city for the location benchmarks: where trucks are, how they drive, and where
geofences lie (circles of 100 m - 2 km and star-shaped polygons of 4 - 50 positions).

Flat-earth offsets in metres, fine over a city. The same seed gives the same city, so the
in-process index benchmark (stages/geofence_index.py) and the service's ingest with fences
(stages/geofences_bench.py) see the same fences and the same kind of tracks.
"""

from __future__ import annotations

import math
import random
from typing import Any

CENTER = (12.9716, 77.5946)  # lat, lon, as in decode_validate
HALF_SIDE_M = 25_000.0
M_PER_DEG = 111_195.08  # of latitude


def offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    """A point some metres north and east of (lat, lon), flat-earth (fine over a city)."""
    return (
        lat + north_m / M_PER_DEG,
        lon + east_m / (M_PER_DEG * math.cos(math.radians(lat))),
    )


def somewhere(rng: random.Random, half_side_m: float = HALF_SIDE_M) -> tuple[float, float]:
    """A uniformly random (lat, lon) within ``half_side_m`` of the centre, north and east."""
    return offset(*CENTER, rng.uniform(-1, 1) * half_side_m, rng.uniform(-1, 1) * half_side_m)


def outline(
    rng: random.Random, lat: float, lon: float, radius_m: float, corners: int, jag: float
) -> list[list[float]]:
    """A closed ring of ``corners`` distinct positions around (lat, lon), one per equal sector
    (so consecutive corners are less than half a turn apart and the ring never crosses
    itself): three lobes, each corner's radius cut by up to ``jag`` (a fraction) at random."""
    sector, phase = 2 * math.pi / corners, rng.uniform(0, 2 * math.pi)
    ring = []
    for i in range(corners):
        a = (i + rng.uniform(0, 0.8)) * sector
        r = radius_m * (1 + 0.25 * math.sin(3 * a + phase)) * rng.uniform(1 - jag, 1)
        y, x = offset(lat, lon, r * math.sin(a), r * math.cos(a))
        ring.append([x, y])
    return [*ring, ring[0]]


# Fence radii (m) of each layout: "city" fences cover the city over and over (1.4 fences per
# ping), the hard case; "sites" are depots and customers' yards, with most pings in none.
LAYOUTS = {"city": (100.0, 2000.0), "sites": (30.0, 300.0)}


def fence_geometries(
    rng: random.Random, count: int, layout: str = "city"
) -> list[tuple[str, dict[str, Any], float | None]]:
    """``count`` fences scattered over the city as (name, GeoJSON geometry, radiusM): every
    other one a circle, the rest polygons; the body of POST /api/v1/geofences."""
    out: list[tuple[str, dict[str, Any], float | None]] = []
    smallest, largest = LAYOUTS[layout]
    for i in range(count):
        lat, lon = somewhere(rng)
        radius = rng.uniform(smallest, largest)
        if i % 2:
            out.append((f"circle_{i}", {"type": "Point", "coordinates": [lon, lat]}, radius))
        else:
            ring = outline(rng, lat, lon, radius, rng.randint(3, 49), 0.5)  # 4 - 50 positions
            out.append((f"polygon_{i}", {"type": "Polygon", "coordinates": [ring]}, None))
    return out


def tracks(rng: random.Random, count: int, pings: int) -> list[tuple[float, float]]:
    """(lat, lon) of the pings of ``count`` trucks, ``pings`` each, interleaved as they arrive:
    every 5 s at ~10 m/s, turning now and then."""
    all_tracks = []
    for _ in range(count):
        lat, lon = somewhere(rng)
        heading, track = rng.uniform(0, 2 * math.pi), []
        for _ in range(pings):
            if rng.random() < 0.05:
                heading += rng.choice((-1, 1)) * math.pi / 2  # a turn at a junction
            step = 50 * rng.uniform(0.0, 1.2)  # ~10 m/s, 5 s apart, stops included
            lat, lon = offset(lat, lon, step * math.cos(heading), step * math.sin(heading))
            track.append((lat, lon))
        all_tracks.append(track)
    return [p for ping in zip(*all_tracks, strict=True) for p in ping]


def straight_lines(
    rng: random.Random, count: int, step_m: float, half_side_m: float = HALF_SIDE_M - 5_000
) -> list[tuple[float, float, float, float]]:
    """(lat, lon, dlat, dlon) per truck for the wrk script (wrk/pings.lua): a start in the city
    and the degrees moved per ping, ``step_m`` in a random direction. Starts keep 5 km from the
    edge: a truck of a benchmark run drives a few km."""
    out = []
    for _ in range(count):
        lat, lon = somewhere(rng, half_side_m)
        heading = rng.uniform(0, 2 * math.pi)
        lat2, lon2 = offset(lat, lon, step_m * math.cos(heading), step_m * math.sin(heading))
        out.append((lat, lon, lat2 - lat, lon2 - lon))
    return out
