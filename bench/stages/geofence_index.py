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
with 199 holes.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import time
from collections.abc import Callable
from functools import partial

from ingest.geofence_shapes import FenceIndex, Shape, parse_shape

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
        ms = best_ms(partial(parse_shape, geometry, None, 1000), args.rounds)
        print(f"parse_shape, 1000 positions, {name + ':':<10} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
