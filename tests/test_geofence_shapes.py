"""Geofence geometry (ingest/geofence_shapes.py), no I/O: every validation rule with the JSON
path it names, containment of squares, concave polygons, holes and circles (near a pole,
across the antimeridian), and FenceIndex against a brute-force loop over random fences."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import geofence_shapes
from ingest.geofence_shapes import (
    EARTH_RADIUS_M,
    MAX_BAND_EDGES,
    MAX_CELLS,
    Circle,
    FenceIndex,
    GeometryError,
    Polygon,
    parse_shape,
)
from ingest.trip_summary import haversine_m

NAN, INF = float("nan"), float("inf")


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def polygon(*rings: list, max_vertices: int = 1000) -> Polygon:
    shape = parse_shape({"type": "Polygon", "coordinates": list(rings)}, None, max_vertices)
    assert isinstance(shape, Polygon)
    return shape


def point(lon: float, lat: float, radius_m: float) -> Circle:
    shape = parse_shape({"type": "Point", "coordinates": [lon, lat]}, radius_m, 1000)
    assert isinstance(shape, Circle)
    return shape


def destination(
    lat: float, lon: float, bearing_deg: float, distance_m: float
) -> tuple[float, float]:
    """(lat, lon) ``distance_m`` along the great circle leaving (lat, lon) at the bearing."""
    d, t = distance_m / EARTH_RADIUS_M, math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(t))
    l2 = l1 + math.atan2(
        math.sin(t) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2)
    )
    return math.degrees(p2), (math.degrees(l2) + 540) % 360 - 180


BOWTIE = [[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]
# A U: two arms (x 0-1 and 2-3) joined at the bottom (y 0-1), the notch x 1-2, y 1-3 outside.
U_SHAPE = [[0, 0], [3, 0], [3, 3], [2, 3], [2, 1], [1, 1], [1, 3], [0, 3], [0, 0]]
C = "$.geometry.coordinates"


# --- validation ------------------------------------------------------------------------------

POLY = "Polygon"
CASES = [
    # (id, geometry, radiusM, max_vertices, field, words in the message)
    ("not an object", "Polygon", None, 100, "$.geometry", "GeoJSON object"),
    ("null", None, None, 100, "$.geometry", "got null"),
    ("a list", [[0, 0]], None, 100, "$.geometry", "got a list"),
    ("MultiPolygon", {"type": "MultiPolygon", "coordinates": [[square(0, 0, 1, 1)]]}, None, 100, "$.geometry.type", '"MultiPolygon" is not supported; expected "Polygon" or "Point"'),
    ("LineString", {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, None, 100, "$.geometry.type", '"LineString" is not supported'),
    ("no type", {"coordinates": [0, 0]}, 10, 100, "$.geometry.type", "null is not supported"),
    ("type not a string", {"type": ["Point"], "coordinates": [0, 0]}, 10, 100, "$.geometry.type", "a list is not supported"),
    ("no coordinates", {"type": POLY}, None, 100, C, "required"),
    ("point without coordinates", {"type": "Point"}, 10, 100, C, "required"),
    ("coordinates not a list", {"type": POLY, "coordinates": {"0": 1}}, None, 100, C, "non-empty list of rings"),
    ("no rings", {"type": POLY, "coordinates": []}, None, 100, C, "non-empty list of rings"),
    ("ring not a list", {"type": POLY, "coordinates": [square(0, 0, 1, 1), "ring"]}, None, 100, f"{C}[1]", "got a string"),
    ("position not a list", {"type": POLY, "coordinates": [[[0, 0], [1, 0], "1,1", [0, 0]]]}, None, 100, f"{C}[0][2]", "expected a position"),
    ("position of one number", {"type": POLY, "coordinates": [[[0, 0], [1], [1, 1], [0, 0]]]}, None, 100, f"{C}[0][1]", "expected a position"),
    ("position of four numbers", {"type": "Point", "coordinates": [1, 2, 3, 4]}, 10, 100, C, "expected a position"),
    ("bool longitude", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [True, 1], [0, 0]]]}, None, 100, f"{C}[0][2]", "longitude must be a number, got a boolean"),
    ("bool latitude", {"type": "Point", "coordinates": [0, False]}, 10, 100, C, "latitude must be a number, got a boolean"),
    ("bool altitude", {"type": "Point", "coordinates": [0, 0, True]}, 10, 100, C, "altitude must be a number"),
    ("string latitude", {"type": "Point", "coordinates": [0, "45"]}, 10, 100, C, "latitude must be a number, got a string"),
    ("null longitude", {"type": "Point", "coordinates": [None, 45]}, 10, 100, C, "longitude must be a number, got null"),
    ("NaN longitude", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [1, 1], [NAN, 1], [0, 0]]]}, None, 100, f"{C}[0][3]", "longitude must be finite, got nan"),
    ("inf latitude", {"type": "Point", "coordinates": [0, INF]}, 10, 100, C, "latitude must be finite, got inf"),
    ("-inf altitude", {"type": "Point", "coordinates": [0, 0, -INF]}, 10, 100, C, "altitude must be finite"),
    ("longitude > 180", {"type": POLY, "coordinates": [[[0, 0], [180.5, 0], [1, 1], [0, 0]]]}, None, 100, f"{C}[0][1]", "longitude 180.5 is outside [-180, 180]"),
    ("longitude < -180", {"type": "Point", "coordinates": [-181, 0]}, 10, 100, C, "longitude -181 is outside"),
    ("huge integer longitude", {"type": "Point", "coordinates": [10**400, 0]}, 10, 100, C, "longitude 1000000"),
    ("latitude > 90", {"type": "Point", "coordinates": [0, 90.0001]}, 10, 100, C, "latitude 90.0001 is outside [-90, 90]"),
    ("latitude < -90", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [1, -91], [0, 0]]]}, None, 100, f"{C}[0][2]", "latitude -91 is outside"),
    ("bad position in a hole", {"type": POLY, "coordinates": [square(0, 0, 4, 4), [[1, 1], [2, 1], [2, 2], [1, "x"], [1, 1]]]}, None, 100, f"{C}[1][3]", "latitude must be a number"),
    ("unclosed ring", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}, None, 100, f"{C}[0]", "not closed"),
    ("unclosed hole", {"type": POLY, "coordinates": [square(0, 0, 4, 4), [[1, 1], [2, 1], [2, 2], [1, 2]]]}, None, 100, f"{C}[1]", "not closed"),
    ("three positions", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [0, 0]]]}, None, 100, f"{C}[0]", "at least 4 positions (the last repeats the first); got 3"),
    ("empty ring", {"type": POLY, "coordinates": [[]]}, None, 100, f"{C}[0]", "got 0"),
    ("two distinct positions", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [1, 0], [0, 0]]]}, None, 100, f"{C}[0]", "zero area"),
    ("one position repeated", {"type": POLY, "coordinates": [[[5, 5]] * 4]}, None, 100, f"{C}[0]", "zero area"),
    ("collinear ring", {"type": POLY, "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]]}, None, 100, f"{C}[0]", "zero area"),
    # A subnormal height once made the band scale inf and int(0 * inf) a 500.
    ("subnormal height", {"type": POLY, "coordinates": [[[0, 0], [1, 0], [0.5, 1e-310], [0, 0]]]}, None, 100, f"{C}[0]", "zero area (narrower than 1e-07 degrees"),
    ("sliver of a hole", {"type": POLY, "coordinates": [square(0, 0, 4, 4), [[1, 1], [2, 1], [1.5, 1 + 1e-9], [1, 1]]]}, None, 100, f"{C}[1]", "zero area"),
    ("bowtie", {"type": POLY, "coordinates": [BOWTIE]}, None, 100, f"{C}[0]", "ring crosses itself (edges 0 and 2)"),
    # Edges are numbered as given: edge i joins positions i and i + 1, repeats included.
    ("bowtie with a repeat", {"type": POLY, "coordinates": [[[0, 0], [0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}, None, 100, f"{C}[0]", "ring crosses itself (edges 1 and 3)"),
    ("figure eight", {"type": POLY, "coordinates": [[[0, 0], [2, 0], [2, 2], [1, 0], [0, 2], [0, 0]]]}, None, 100, f"{C}[0]", "ring touches itself (edges 0 and 3)"),
    ("spike back along an edge", {"type": POLY, "coordinates": [[[0, 0], [2, 0], [1, 0], [1, 1], [0, 0]]]}, None, 100, f"{C}[0]", "ring overlaps itself (edges 0 and 1)"),
    ("collinear overlap of far edges", {"type": POLY, "coordinates": [[[0, 0], [4, 0], [4, 1], [3, 1], [3, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}, None, 100, f"{C}[0]", "itself (edges 0 and"),
    ("hole crossing the exterior", {"type": POLY, "coordinates": [square(0, 0, 4, 4), square(3, 1, 5, 2)]}, None, 100, f"{C}[1]", "ring crosses ring 0"),
    ("hole touching the exterior", {"type": POLY, "coordinates": [square(0, 0, 4, 4), [[0, 2], [1, 1], [1, 3], [0, 2]]]}, None, 100, f"{C}[1]", "ring touches ring 0"),
    ("hole along the exterior", {"type": POLY, "coordinates": [square(0, 0, 4, 4), square(0, 1, 1, 2)]}, None, 100, f"{C}[1]", "ring 0"),
    ("holes crossing", {"type": POLY, "coordinates": [square(0, 0, 9, 9), square(1, 1, 3, 3), square(2, 2, 4, 4)]}, None, 100, f"{C}[2]", "ring crosses ring 1"),
    ("hole outside the exterior", {"type": POLY, "coordinates": [square(0, 0, 4, 4), square(5, 5, 6, 6)]}, None, 100, f"{C}[1]", "hole lies outside the exterior ring"),
    ("exterior inside the hole", {"type": POLY, "coordinates": [square(1, 1, 2, 2), square(0, 0, 4, 4)]}, None, 100, f"{C}[1]", "outside the exterior"),
    ("hole in a hole", {"type": POLY, "coordinates": [square(0, 0, 9, 9), square(1, 1, 8, 8), square(2, 2, 3, 3)]}, None, 100, f"{C}[2]", "hole lies inside another hole ($.geometry.coordinates[1])"),
    ("comb of 62 teeth", {"type": POLY, "coordinates": "COMB_252"}, None, 1000, C, "too intricate: a point would be tested against 125 edges (at most 64)"),
    ("too many vertices", {"type": POLY, "coordinates": [square(0, 0, 4, 4), square(1, 1, 2, 2)]}, None, 8, C, "10 positions over all rings; at most 8"),
    ("too many, checked before positions", {"type": POLY, "coordinates": [[["x"]] * 9]}, None, 8, C, "9 positions"),
    ("ring across the antimeridian", {"type": POLY, "coordinates": [[[170, 0], [-170, 0], [-170, 10], [170, 10], [170, 0]]]}, None, 100, f"{C}[0]", "antimeridian or span half the globe; split it"),
    ("ring of exactly 180 degrees", {"type": POLY, "coordinates": [square(-90, 0, 90, 10)]}, None, 100, f"{C}[0]", "180 degrees"),
    ("hole of a ring across the antimeridian", {"type": POLY, "coordinates": [square(0, 0, 10, 10), [[179, 1], [-179, 1], [-179, 2], [179, 1]]]}, None, 100, f"{C}[1]", "antimeridian"),
    ("radius missing", {"type": "Point", "coordinates": [0, 0]}, None, 100, "$.radiusM", "required with a Point"),
    ("radius zero", {"type": "Point", "coordinates": [0, 0]}, 0, 100, "$.radiusM", "must be in [1, 50000] metres, got 0"),
    ("radius below 1", {"type": "Point", "coordinates": [0, 0]}, 0.5, 100, "$.radiusM", "got 0.5"),
    ("radius negative", {"type": "Point", "coordinates": [0, 0]}, -10, 100, "$.radiusM", "got -10"),
    ("radius too large", {"type": "Point", "coordinates": [0, 0]}, 50_000.5, 100, "$.radiusM", "got 50000.5"),
    ("radius huge integer", {"type": "Point", "coordinates": [0, 0]}, 10**400, 100, "$.radiusM", "must be in"),
    ("radius NaN", {"type": "Point", "coordinates": [0, 0]}, NAN, 100, "$.radiusM", "got nan"),
    ("radius inf", {"type": "Point", "coordinates": [0, 0]}, INF, 100, "$.radiusM", "got inf"),
    ("radius bool", {"type": "Point", "coordinates": [0, 0]}, True, 100, "$.radiusM", "expected a number of metres, got a boolean"),
    ("radius string", {"type": "Point", "coordinates": [0, 0]}, "100", 100, "$.radiusM", "got a string"),
    ("radius with a polygon", {"type": POLY, "coordinates": [square(0, 0, 1, 1)]}, 100, 100, "$.radiusM", "only with a Point"),
]  # fmt: skip


def comb(teeth: int, slant: float = 0.0, unit: float = 0.1) -> list[list[float]]:
    """A closed ring: ``teeth`` teeth 1 high and ``unit`` apart (half solid) on a back, each
    leaning ``slant`` units eastward (then they overlap in longitude), so every tooth edge
    spans nearly the whole height and a latitude band holds two per tooth."""
    ring: list[list[float]] = [[0, 1]]
    for i in range(teeth):
        ring += [[(i + slant) * unit, 1], [(i + slant + 0.5) * unit, 1]]
        ring += [[(i + 0.5) * unit, 0.01], [(i + 1) * unit, 0.01]]
    return [*ring, [teeth * unit, -1], [0, -1], [0, 1]]


def _comb_of(positions: int) -> list[list[float]]:
    ring = comb((positions - 4) // 4)
    return ring + [ring[0]] * (positions - len(ring))  # repeats are allowed: pad to the size


def herringbone(ribs: int, per_band: int) -> list[list[float]]:
    """A spine at x = 0 with ``ribs`` parallel ribs 1 long, slanting so that about
    ``per_band`` of them overlap at any latitude: each rib overlaps its neighbours in both
    latitude and longitude, a crossing check comparing every pair that does costs
    ribs * per_band."""
    d = 0.01
    ring = []
    for k in range(ribs):
        ring += [[0, k * d], [1, k * d + per_band * d], [1, (k + per_band) * d + 0.004]]
        ring += [[0, k * d + 0.004]]
    ring += [[-1, (ribs - 1) * d + 0.004], [-1, 0], [0, 0]]
    return ring


def hair_comb(positions: int) -> list[list[float]]:
    """A valid comb of horizontal teeth 1 long, stacked: every tooth overlaps every other in
    longitude, but a latitude band holds a few (the sweep of all edges by longitude compared
    each with all of them)."""
    ring = []
    for i in range((positions - 3) // 4):
        ring += [[0, i * 0.01], [1, i * 0.01], [1, i * 0.01 + 0.005], [0, i * 0.01 + 0.005]]
    ring += [[0, len(ring) // 4 * 0.01], [-0.1, len(ring) // 4 * 0.01], [-0.1, 0]]
    return [*ring, ring[0]]


@pytest.mark.parametrize(
    ("geometry", "radius", "max_vertices", "field", "words"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_geometry_names_its_field(geometry, radius, max_vertices, field, words):
    if isinstance(geometry, dict) and geometry.get("coordinates") == "COMB_252":
        geometry = {"type": POLY, "coordinates": [_comb_of(252)]}
    with pytest.raises(GeometryError) as caught:
        parse_shape(geometry, radius, max_vertices)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert words in str(caught.value), str(caught.value)
    assert isinstance(caught.value, ValueError)  # what the HTTP layer turns into a 400


def test_a_huge_type_string_is_not_echoed_whole():
    with pytest.raises(GeometryError) as caught:
        parse_shape({"type": "x" * 10_000, "coordinates": [0, 0]}, 10, 100)
    assert len(str(caught.value)) < 200


def test_both_orientations_repeats_altitudes_and_integers_are_accepted():
    clockwise = [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]
    repeats = [
        [0, 0, 12.5],
        [0, 0, 13],
        [1, 0, 0],
        [1, 1, 0],
        [1, 1, 0],
        [0, 1, 0],
        [0, 0, 12.5],
        [0, 0, 12.5],
    ]
    for ring in (square(0, 0, 1, 1), clockwise, repeats):
        shape = polygon(ring)
        assert shape.bbox == (0, 0, 1, 1)
        assert shape.contains(0.5, 0.5) and not shape.contains(1.5, 0.5)
    assert polygon(repeats).rings[0][:2] == ((0.0, 0.0), (0.0, 0.0))  # (lon, lat), altitude dropped
    assert polygon(square(0, 0, 4, 4), square(1, 1, 2, 2)[::-1]).contains(0.5, 0.5)


def test_max_vertices_is_inclusive_and_counts_every_ring():
    exterior, hole = square(0, 0, 4, 4), square(1, 1, 2, 2)
    assert len(polygon(exterior, hole, max_vertices=10).rings) == 2
    with pytest.raises(GeometryError, match=r"^\$\.geometry\.coordinates: 10 positions"):
        polygon(exterior, hole, max_vertices=9)


def test_a_valid_1000_vertex_polygon_is_accepted():
    # A wavy circle of 999 corners and the closing position (timings: the bench stage).
    corners = [
        (math.cos(a) * (1 + 0.1 * math.sin(7 * a)), math.sin(a) * (1 + 0.1 * math.sin(7 * a)))
        for a in (i * 2 * math.pi / 999 for i in range(999))
    ]
    ring = [[10 + x * 0.05, 50 + y * 0.05] for x, y in corners]
    shape = polygon([*ring, ring[0]], max_vertices=1000)
    assert shape.contains(50, 10) and not shape.contains(50, 10.06)


def test_holes_may_sit_side_by_side_and_touch_nothing():
    shape = polygon(
        square(0, 0, 10, 10), square(1, 1, 3, 3), square(4, 1, 6, 3), square(1, 4, 9, 9)
    )
    assert [
        shape.contains(lat, lon) for lon, lat in ((0.5, 0.5), (2, 2), (5, 2), (3.5, 2), (5, 5))
    ] == [True, False, False, True, False]


def test_a_comb_is_refused_by_its_band_size_before_any_crossing_check(monkeypatch):
    """The band check is linear; the crossing check, which once ran first, is never reached
    (a 1000-position comb of overlapping teeth cost 70 ms of the event loop to refuse)."""

    def never(*args: object) -> int:
        raise AssertionError("the crossing check ran")

    monkeypatch.setattr(geofence_shapes, "_check_crossings", never)
    for teeth, slant in ((249, 0.0), (249, 30.0), (40, 30.0)):
        with pytest.raises(GeometryError, match=r"too intricate: a point would be tested against"):
            polygon([*comb(teeth, slant)], max_vertices=1000)


def test_within_the_band_limit_a_comb_is_accepted():
    teeth = (MAX_BAND_EDGES - 2) // 2  # two sloped edges per tooth, and the back's one
    shape = polygon(comb(teeth, slant=3.0))
    assert shape.busiest <= MAX_BAND_EDGES
    west = (1 + 3.0 * (0.5 - 0.01) / 0.99) * 0.1  # the second tooth's west edge at lat 0.5
    assert shape.contains(0.5, west + 0.025) and not shape.contains(0.5, west + 0.075)


def test_the_crossing_check_compares_edges_of_one_band_only(monkeypatch):
    """A comb of 2,499 horizontal teeth (9,999 positions), each overlapping all the others in
    longitude: a sweep over all edges compared ~12 million pairs (1.5 s); within bands, a few
    per edge."""
    looked_at: list[int] = []
    check = geofence_shapes._check_crossings

    def counted(*args: object) -> int:
        pairs = check(*args)  # type: ignore[arg-type]
        looked_at.append(pairs)
        return pairs

    monkeypatch.setattr(geofence_shapes, "_check_crossings", counted)
    shape = polygon(hair_comb(9999), max_vertices=10_000)
    assert shape.contains(0.002, 0.5) and not shape.contains(0.007, 0.5)
    assert looked_at and looked_at[0] <= 4 * 9999, looked_at


def test_edges_overlapping_by_the_dozen_are_refused_by_the_work_budget():
    """A herringbone of 249 ribs, 24 overlapping at any latitude: within the band limit, but
    ~50 edge pairs per edge to compare. Refused once MAX_PAIRS_PER_EDGE is spent."""
    ring = herringbone(249, 24)
    with pytest.raises(
        GeometryError, match=r"^\$\.geometry\.coordinates: too intricate: more than"
    ):
        polygon(ring)
    polygon(herringbone(249, 2))  # the same with 2 per latitude is a valid, cheap polygon


def test_many_holes_are_checked_against_their_band_only():
    """Holes inside the exterior and not inside one another, found by casting each hole's
    corner against its band's edges (a loop over every pair of holes was quadratic)."""
    side = 16
    holes = [square(i % side + 0.2, i // side + 0.2, i % side + 0.8, i // side + 0.8)
             for i in range(150)]  # fmt: skip
    shape = polygon(square(0, 0, side, side), *holes)
    assert not shape.contains(0.5, 0.5) and shape.contains(0.1, 0.1)
    with pytest.raises(GeometryError, match=r"\[151\]: hole lies inside another hole .*\[1\]"):
        polygon(square(0, 0, side, side), *holes, square(0.3, 0.3, 0.4, 0.4))
    with pytest.raises(GeometryError, match=r"\[151\]: hole lies outside the exterior"):
        polygon(square(0, 0, side, side), *holes, square(20, 20, 21, 21))


def _crosses(a, b, c, d) -> bool:
    """Whether segments ab and cd cross (random floats: no touching, no collinear)."""

    def turn(p, q, r):
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    return turn(a, b, c) * turn(a, b, d) < 0 and turn(c, d, a) * turn(c, d, b) < 0


def test_the_crossing_sweep_agrees_with_checking_every_pair():
    rng = random.Random(7)
    crossed = 0
    for _ in range(400):
        corners = [[rng.uniform(0, 1), rng.uniform(0, 1)] for _ in range(rng.randint(3, 9))]
        if rng.random() < 0.5:  # sorted around their middle: mostly simple rings
            corners.sort(key=lambda p: math.atan2(p[1] - 0.5, p[0] - 0.5))
        ring = [*corners, corners[0]]
        n = len(corners)
        expected = any(
            _crosses(ring[i], ring[i + 1], ring[j], ring[j + 1])
            for i in range(n)
            for j in range(i + 2, n)
            if (i, j) != (0, n - 1)
        )
        try:
            polygon(ring)
        except GeometryError as e:
            assert expected and "crosses itself" in str(e), (ring, str(e))
            crossed += 1
        else:
            assert not expected, ring
    assert 100 < crossed < 350  # both kinds were tried


# --- containment -----------------------------------------------------------------------------


def test_square_contains_and_its_edges_answer_by_the_documented_rule():
    shape = polygon(square(10, 20, 11, 21))
    assert shape.bbox == (20, 10, 21, 11)
    assert shape.contains(20.5, 10.5)
    assert (
        not shape.contains(20.5, 11.5)
        and not shape.contains(21.5, 10.5)
        and not shape.contains(19, 9)
    )
    # On an edge: west and south inside, east and north outside, every time.
    for _ in range(2):
        assert shape.contains(20.5, 10) and shape.contains(20, 10.5)
        assert not shape.contains(20.5, 11) and not shape.contains(21, 10.5)


def test_concave_u_shape():
    shape = polygon(U_SHAPE)
    for lon, lat in ((0.5, 2), (2.5, 2), (1.5, 0.5), (0.5, 0.5)):
        assert shape.contains(lat, lon), (lon, lat)
    for lon, lat in ((1.5, 2), (1.5, 2.9), (3.5, 2), (1.5, 3.5)):
        assert not shape.contains(lat, lon), (lon, lat)


def test_a_point_in_a_hole_is_outside():
    shape = polygon(square(0, 0, 4, 4), square(1, 1, 3, 3))
    assert not shape.contains(2, 2)
    assert shape.contains(0.5, 2) and shape.contains(3.5, 3.5)
    assert not shape.contains(5, 2)


def test_circle_by_great_circle_distance():
    circle = point(77.5946, 12.9716, 100)
    assert (circle.lat, circle.lon, circle.radius_m) == (12.9716, 77.5946, 100)
    for bearing in (0, 45, 90, 200, 315):
        near = destination(12.9716, 77.5946, bearing, 99)
        far = destination(12.9716, 77.5946, bearing, 101)
        assert haversine_m(12.9716, 77.5946, *near) == pytest.approx(99, abs=1e-6)
        assert circle.contains(*near)
        assert not circle.contains(*far)


def test_circle_near_the_pole_covers_every_longitude():
    circle = point(0, 89.99, 5000)  # 1.1 km from the pole
    assert circle.bbox[1:] == (-180, 90, 180)
    beyond = (89.995, 170.0)  # across the pole, 1.7 km away
    assert haversine_m(89.99, 0, *beyond) < 5000
    assert circle.contains(*beyond)
    assert FenceIndex([("pole", circle)]).containing(*beyond) == {"pole"}
    assert not circle.contains(89.9, 170.0)


def test_circle_boxes_hold_the_whole_circle():
    # Points just inside the circle all around it, near poles and across the antimeridian.
    centres = [
        (0, 0),
        (12.97, 77.59),
        (60, 179.99),
        (-45, -179.995),
        (89.5, 10),
        (-89.9, -179.9),
        (85, 179.0),
        (-70, 0),
    ]
    for lat, lon in centres:
        for radius in (1, 1000, 50_000):
            circle = Circle(lat, lon, radius)
            # Alone (a grid of its size), and among tiny fences (a fine grid: too many cells).
            alone = FenceIndex([("c", circle)])
            crowded = FenceIndex(
                [("c", circle)] + [(f"tiny{i}", Circle(-lat, 5 + i, 1)) for i in range(3)]
            )
            south, west, north, east = circle.bbox
            for bearing in range(0, 360, 5):
                p_lat, p_lon = destination(lat, lon, bearing, radius * 0.999)
                assert circle.contains(p_lat, p_lon)
                assert south <= p_lat <= north
                assert any(west <= x <= east for x in (p_lon - 360, p_lon, p_lon + 360))
                assert alone.containing(p_lat, p_lon) == {"c"}, (lat, lon, radius, bearing)
                assert crowded.containing(p_lat, p_lon) == {"c"}, (lat, lon, radius, bearing)


def test_circle_across_the_antimeridian_is_found_through_the_index():
    east_side, west_side = point(179.99, 10, 5000), point(-179.99, -10, 5000)
    assert east_side.bbox[3] > 180 and west_side.bbox[1] < -180
    index = FenceIndex([("east", east_side), ("west", west_side), ("far", point(0, 10, 5000))])
    assert index.containing(10, -179.99) == {"east"}
    assert index.containing(10.01, 179.98) == {"east"}
    assert index.containing(-10, 179.99) == {"west"}
    assert index.containing(10, 179.0) == frozenset()


# --- FenceIndex ------------------------------------------------------------------------------


def test_an_empty_index_is_nearly_free():
    empty = FenceIndex([])
    assert len(empty) == 0
    found = empty.containing(12.97, 77.59)
    assert found == frozenset()
    assert found is empty.containing(-89, 179) is FenceIndex(iter(())).containing(0, 0)


def test_overlapping_fences_are_all_returned():
    index = FenceIndex(
        (fid, shape)
        for fid, shape in [
            ("square", polygon(square(0, 0, 1, 1))),
            ("hole", polygon(square(-1, -1, 2, 2), square(0.4, 0.4, 0.6, 0.6))),
            ("circle", point(0.5, 0.5, 1000)),
            ("elsewhere", point(50, 50, 1000)),
        ]
    )
    assert len(index) == 4
    assert index.containing(0.5, 0.5) == {"square", "circle"}
    assert index.containing(0.2, 0.2) == {"square", "hole"}
    assert index.containing(1.5, 1.5) == {"hole"}
    assert index.containing(50, 50) == {"elsewhere"}
    assert index.containing(5, 5) == frozenset()


def _random_outline(rng: random.Random, lon: float, lat: float, size: float) -> list[list[float]]:
    """A closed simple ring around (lon, lat): one corner per equal sector (less than 108
    degrees apart, so no edge comes within 0.17 * size of the middle), radii at random."""
    n = rng.randint(6, 30)
    corners = []
    for i in range(n):
        a, r = (i + rng.uniform(0, 0.8)) * 2 * math.pi / n, size * rng.uniform(0.3, 1)
        corners.append([lon + r * math.cos(a), lat + r * math.sin(a)])
    return [*corners, corners[0]]


def test_the_index_agrees_with_a_loop_over_every_fence():
    rng = random.Random(20240611)
    fences = []
    for i in range(1000):
        lat, lon = rng.uniform(-1, 1), rng.uniform(-1, 1)
        huge = rng.random() < 0.03  # many cells wide: the list checked for every point
        if i % 2:
            radius = rng.uniform(20_000, 50_000) if huge else rng.uniform(50, 3000)
            fences.append((f"c{i}", point(lon, lat, radius)))
        else:
            size = rng.uniform(0.3, 1.5) if huge else rng.uniform(0.001, 0.03)
            ring = _random_outline(rng, lon, lat, size)
            holes = (
                []
                if rng.random() < 0.7
                else [square(lon - size / 20, lat - size / 20, lon + size / 20, lat + size / 20)]
            )
            fences.append((f"p{i}", polygon(ring, *holes)))
    index = FenceIndex(fences)
    assert len(index) == 1000
    assert len(index._levels) >= 2  # the huge ones on a coarser level: both are exercised
    centres = [s.bbox for _, s in fences]
    hits = 0
    for _ in range(3000):
        if rng.random() < 0.5:  # near a fence, so that many points hit one
            south, west, north, east = rng.choice(centres)
            lat, lon = rng.uniform(south, north), rng.uniform(west, east)
        else:
            lat, lon = rng.uniform(-1.3, 1.3), rng.uniform(-1.3, 1.3)
        expected = {fid for fid, shape in fences if shape.contains(lat, lon)}
        assert index.containing(lat, lon) == expected, (lat, lon)
        hits += len(expected)
    assert hits > 3000  # the comparison saw real matches, not only empty sets


def _registrations(index: FenceIndex) -> dict[str, int]:
    """How many cells each fence is registered in, over all levels."""
    counts: dict[str, int] = {}
    for *_, cells in index._levels:
        for entries in cells.values():
            for entry in entries:
                counts[entry[5]] = counts.get(entry[5], 0) + 1
    return counts


# An org's mix of sizes once degraded the grid: 500 one-metre circles made the cell ~100 m, every
# large fence then needed more than MAX_CELLS cells and was checked for every ping of the org.
_TINY = [
    (f"tiny{i}", Circle(12.5 + (i % 25) * 0.04, 77.5 + (i // 25) * 0.05, 1.0)) for i in range(500)
]
_LARGE = [
    ("comb", polygon(_comb_of(120))),
    ("herring", polygon(herringbone(60, 4))),
    ("ring", polygon(square(77.0, 12.0, 78.5, 13.5), square(77.2, 12.2, 77.4, 12.4))),
    ("disc", Circle(13.0, 77.9, 40_000)),
    ("pole", Circle(89.9, 0.0, 30_000)),
    ("antimeridian", Circle(0.0, 179.99, 10_000)),
]  # fmt: skip
_MIXED = FenceIndex(_TINY + _LARGE)


def test_a_mix_of_tiny_and_large_fences_checks_no_fence_for_every_ping():
    counts = _registrations(_MIXED)
    assert set(counts) == {fid for fid, _ in _TINY + _LARGE}
    # No per-ping list: each fence sits in at most MAX_CELLS cells of one level (two boxes
    # across the antimeridian), and a ping looks up one cell per level.
    assert max(counts.values()) <= 2 * MAX_CELLS, counts
    assert len(_MIXED._levels) <= 10  # of 0.001 degrees, 4 times coarser each, to 360
    far = _MIXED.containing(-40.0, -60.0)
    assert far == frozenset()


@settings(max_examples=300, deadline=None)
@given(
    st.floats(11.9, 13.7),
    st.floats(76.9, 78.6),
    st.sampled_from(["anywhere", "tiny", "antimeridian", "pole"]),
)
def test_the_index_of_a_mixed_set_agrees_with_a_loop_over_every_fence(lat, lon, near):
    if near == "tiny":  # within a metre or so of a tiny circle
        i = int(abs(lat * 1000)) % 500
        lat, lon = (
            12.5 + (i % 25) * 0.04 + (lat % 1) * 2e-5,
            77.5 + (i // 25) * 0.05 + (lon % 1) * 2e-5,
        )
    elif near == "antimeridian":
        lat, lon = (
            (lat - 12.8) / 10,
            -180 + (lon - 76.9) / 10 if lon > 77.7 else 180 - (lon - 76.9) / 10,
        )
    elif near == "pole":
        lat, lon = 89.7 + (lat - 11.9) / 10, (lon - 76.9) * 200 - 180
    expected = {fid for fid, shape in _TINY + _LARGE if shape.contains(lat, lon)}
    assert _MIXED.containing(lat, lon) == expected, (lat, lon)
