"""STAGE: geofences (ingest/geofence_shapes.py), in process: ns per FenceIndex.containing() call
with 0, 10, 100 and 1000 fences, and ms to validate 1000-vertex polygons with parse_shape.

    .venv/bin/python -m bench.stages.geofence_index [--rounds 15] [--seed 1]

A 50 km city: circles of 100 m - 2 km and star-shaped polygons of 4 - 50 vertices scattered
over it, and the pings of trucks driving across it (every 5 s at ~10 m/s, turning now and
then), so that most pings are in no fence and some in one or a few, as on the hot path, where
containing() runs once per stored ping. Each figure is the best of several rounds, so that
other work on the machine inflates it as little as possible. Four polygons of 1000 positions
are validated: a traced outline (the realistic one), a spiky star (long edges whose boxes
overlap many others: the crossing sweep's bad case), a spiral band of five turns, and a block
with 199 holes. Last, a hostile org within the limits: 500 one-metre circles beside 500
overlapping combs whose bands hold MAX_BAND_EDGES edges each, with pings inside all the combs
(the worst exact-test cost per ping) and pings anywhere else around them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import time
from collections.abc import Callable
from functools import partial

from ingest.geofence_shapes import (
    MAX_BAND_EDGES,
    Circle,
    FenceIndex,
    GeometryError,
    Shape,
    parse_shape,
)

from ..load.city import CENTER, fence_geometries, outline, tracks

COUNTS = (0, 10, 100, 1000)


def fences(rng: random.Random, count: int) -> list[tuple[str, Shape]]:
    return [
        (name, parse_shape(geometry, radius, 1000))
        for name, geometry, radius in fence_geometries(rng, count)
    ]


def best_ns_per_call(index: FenceIndex, points: list[tuple[float, float]], rounds: int) -> float:
    containing = index.containing
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for lat, lon in points:
            containing(lat, lon)
        best = min(best, time.perf_counter() - started)
    return best / len(points) * 1e9


def best_ms(run: Callable[[], object], rounds: int) -> float:
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def spiral(positions: int) -> list[list[float]]:
    """A closed ring along a spiral band of five turns, out on one side and back on the other."""
    half = (positions - 1) // 2
    angles = [i * 10 * math.pi / half for i in range(half)]
    out = [(8 * a + 10, a) for a in angles]
    back = [(8 * a + 35, a) for a in reversed(angles)]  # 25 inside the 50 between turns
    ring = [
        [CENTER[1] + r * math.cos(a) * 1e-4, CENTER[0] + r * math.sin(a) * 1e-4]
        for r, a in out + back
    ]
    ring += [ring[0]] * (positions - len(ring))  # 1000 positions, the last closing it
    return ring


def holes(count: int) -> list[list[list[float]]]:
    """A square block with ``count`` square holes in rows of 16: many rings, 5 positions each."""
    side = 1e-3  # ~110 m

    def square(x: float, y: float, size: float) -> list[list[float]]:
        x, y = CENTER[1] + x * side, CENTER[0] + y * side
        size *= side
        return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]

    return [square(0, 0, 16)] + [square(i % 16 + 0.2, i // 16 + 0.2, 0.6) for i in range(count)]


def _parse_or_refuse(geometry: dict[str, object]) -> None:
    with contextlib.suppress(GeometryError):
        parse_shape(geometry, None, 1000)


def hostile(
    rng: random.Random,
) -> tuple[FenceIndex, list[tuple[float, float]], list[tuple[float, float]]]:
    """500 tiny circles and 500 copies of the most intricate comb parse_shape accepts, ~11 km
    wide at the centre; pings inside every comb, and pings within 50 km but outside them."""
    lat, lon = CENTER
    teeth = (MAX_BAND_EDGES - 2) // 2
    step = 0.1 / teeth
    ring = [[lon, lat - 0.01]]
    for i in range(teeth):  # teeth spanning the fence's height: two edges per tooth per band
        ring += [[lon + i * step, lat + 0.1], [lon + (i + 0.5) * step, lat + 0.001]]
    ring += [[lon + 0.1, lat + 0.1], [lon + 0.1, lat - 0.01], [lon, lat - 0.01]]
    comb = parse_shape({"type": "Polygon", "coordinates": [ring]}, None, 1000)
    fences: list[tuple[str, Shape]] = [(f"comb_{i}", comb) for i in range(500)]
    fences += [
        (f"tiny_{i}", Circle(lat + rng.uniform(-0.4, 0.4), lon + rng.uniform(-0.4, 0.4), 1.0))
        for i in range(500)
    ]
    inside = [(lat - 0.005, lon + rng.uniform(0, 0.1)) for _ in range(200)]
    around = [
        (lat + rng.uniform(-0.45, -0.02), lon + rng.uniform(-0.45, 0.45)) for _ in range(20_000)
    ]
    return FenceIndex(fences), inside, around


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    all_fences = fences(rng, max(COUNTS))
    points = tracks(rng, 100, 100)
    gc.disable()  # the service freezes start-up objects and runs GC rarely (docs/bench.md)
    for count in COUNTS:
        index = FenceIndex(all_fences[:count])
        hits = sum(len(index.containing(lat, lon)) for lat, lon in points) / len(points)
        build = best_ms(partial(FenceIndex, all_fences[:count]), 3)
        ns = best_ns_per_call(index, points, args.rounds)
        print(
            f"containing(), {count:4} fences: {ns:6.0f} ns/call"
            f"  ({hits:.3f} fences per ping, index built in {build:.1f} ms)"
        )
    # 1000 positions: a traced outline, a spiky one, the spiral, a square with 199 holes.
    cases = {
        "outline": [outline(rng, *CENTER, 5000, 999, 0.02)],
        "spiky": [outline(rng, *CENTER, 5000, 999, 0.6)],
        "spiral": [spiral(1000)],
        "199 holes": holes(199),
    }
    for name, rings in cases.items():
        geometry = {"type": "Polygon", "coordinates": rings}
        try:
            parse_shape(geometry, None, 1000)
            verdict = "accepted"
        except GeometryError as exc:  # the spiky star: its bands hold too many edges
            verdict = f"refused ({exc.problem[:40]}...)"
        ms = best_ms(partial(_parse_or_refuse, geometry), args.rounds)
        print(f"parse_shape, 1000 positions, {name + ':':<10} {ms:6.2f} ms, {verdict}")
    index, inside, around = hostile(rng)
    found = len(index.containing(*inside[0]))
    print(
        f"containing(), hostile org (500 combs of {MAX_BAND_EDGES} edges per band, 500 1 m"
        f" circles): {best_ns_per_call(index, inside, 3) / 1000:6.0f} us/call inside the combs"
        f" ({found} fences), {best_ns_per_call(index, around, args.rounds):5.0f} ns/call around"
    )


if __name__ == "__main__":
    main()
