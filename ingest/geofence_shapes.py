"""Geofence shapes: validate a fence's GeoJSON geometry, find the fences that contain a point.

POST /api/v1/geofences carries a GeoJSON Polygon, or a Point with "radiusM"; parse_shape turns
it into a Shape or raises GeometryError naming the JSON path at fault (the HTTP layer's 400).
After each commit every stored ping is checked against its org's fences (up to ~1000):
FenceIndex answers with a grid cell lookup per level of fence sizes, a bounding-box check, then
the exact test, so a ping far from every fence costs a dict lookup or a few. Validation is
linear in the positions but for the crossing check, which MAX_BAND_EDGES and
MAX_PAIRS_PER_EDGE bound to a few times that. Pure computation, no I/O.

Polygons are flat: their edges are straight lines in (longitude, latitude) degrees, as a web map
draws them, not great-circle arcs. Over a city-sized fence the difference is below GPS noise.
A ring whose longitudes span 180 degrees or more is refused (it would cross the antimeridian or
span half the globe, and the plane test would then mean something else): the client splits it.
Circles use the great-circle distance, so they may cross the antimeridian or reach a pole.

A valid polygon: a non-empty list of closed rings (exterior first, then holes), each with at
least 3 distinct positions; no ring crosses, touches or overlaps itself or another ring (OGC lets
a hole touch the exterior at a point; refusing that too keeps inside and outside unambiguous);
holes lie inside the exterior and not inside one another. Either orientation is accepted.

Polygon.contains is even-odd ray casting eastward over every ring (a point in a hole is outside).
A point exactly on an edge gets the half-open rule's answer, the same every time: an edge counts
when the point's latitude is in [its lower end, its upper end) and it lies strictly east of the
point, so on an axis-aligned square the west and south edges are inside, east and north outside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from math import asin, cos, degrees, floor, isfinite, radians, sin
from operator import itemgetter
from typing import Any

# The mean Earth radius (IUGG), as ingest/trip_summary.py uses; its haversine_m is not imported
# because trip_summary is a handler module (tests/test_layout.py) and pulls in aiohttp.
EARTH_RADIUS_M = 6_371_008.8
MIN_RADIUS_M = 1.0
MAX_RADIUS_M = 50_000.0
SUPPORTED = ("Polygon", "Point")
# Edges one point may be tested against (a latitude band's): the cost of a ping in the fence,
# ~22 ns each. A latitude line crosses a depot or customer outline 2-6 times, but bands are
# of equal height, so the flattest stretch of a finely traced outline puts more in one: 14 at
# most for the bench's city fences (4-50 points), 21-50 for 1000-point outlines and circles,
# 32 for a spiral of 5 turns, 34 for a block with 16 holes in a row. A comb whose every tooth
# spans the fence's height has as many as it has positions. An org's fences stacked on one
# spot then cost a ping at most GEOFENCE_MAX_PER_ORG * 64 edge tests (~1.5 ms at 1000).
MAX_BAND_EDGES = 64
# Bands of one polygon at most: a band list per band is kept for the fence's life.
MAX_BANDS = 4096
# A ring narrower than this (degrees, ~1 cm) in latitude or longitude holds no GPS position, and
# a sub-representable one would make the band arithmetic overflow.
MIN_EXTENT_DEG = 1e-7
# Edge pairs the crossing check may look at per edge. Real outlines need 1-2 (the bench's
# traced outline, spiral, block of holes, city fences); beyond it a polygon is refused as too
# intricate, so that no body costs more than ~10 us of validation per position.
MAX_PAIRS_PER_EDGE = 16

BBox = tuple[float, float, float, float]  # (min_lat, min_lon, max_lat, max_lon), degrees
LonLat = tuple[float, float]  # (lon, lat), GeoJSON's order

_COORDS = "$.geometry.coordinates"
_EMPTY: frozenset[str] = frozenset()
# A circle's box is widened by this (degrees, ~0.1 mm) so rounding never leaves an edge out.
_BOX_MARGIN = 1e-9


class GeometryError(ValueError):
    """Bad geofence geometry. ``field`` is a JSON path like "$.geometry.coordinates[0][5]" or
    "$.radiusM"; str(exc) is "<field>: <what is wrong>"."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class Shape(ABC):
    """A fence's area: a box that holds all of it, and the exact test."""

    __slots__ = ("bbox",)
    bbox: BBox  # (min_lat, min_lon, max_lat, max_lon); only a Circle's may pass +-180 in lon

    @abstractmethod
    def contains(self, lat: float, lon: float) -> bool: ...


class Circle(Shape):
    """The points within ``radius_m`` metres (great-circle) of (lat, lon)."""

    __slots__ = ("_cos_phi", "_h_max", "_phi", "lat", "lon", "radius_m")

    def __init__(self, lat: float, lon: float, radius_m: float) -> None:
        self.lat, self.lon, self.radius_m = float(lat), float(lon), float(radius_m)
        angle = self.radius_m / EARTH_RADIUS_M  # radians of arc
        self._phi = radians(self.lat)
        self._cos_phi = cos(self._phi)
        # distance <= r  <=>  haversine's h <= sin^2(r / 2R): no asin or sqrt per ping.
        self._h_max = sin(angle / 2) ** 2
        dlat = degrees(angle) + _BOX_MARGIN
        south, north = self.lat - dlat, self.lat + dlat
        # The widest longitude offset of a small circle: sin(dlon) = sin(r) / cos(lat).
        reach = sin(angle) * (1 + 1e-9) / self._cos_phi if self._cos_phi > 0 else 2.0
        if south <= -90 or north >= 90 or reach >= 1:  # it reaches a pole: every longitude
            west, east = -180.0, 180.0
        else:  # may pass +-180: FenceIndex wraps it
            dlon = degrees(asin(reach)) + _BOX_MARGIN
            west, east = self.lon - dlon, self.lon + dlon
        self.bbox = (max(south, -90.0), west, min(north, 90.0), east)

    def contains(self, lat: float, lon: float) -> bool:
        phi = radians(lat)
        h = sin((phi - self._phi) / 2) ** 2 + self._cos_phi * cos(phi) * (
            sin(radians(lon - self.lon) / 2) ** 2
        )
        return h <= self._h_max

    def __repr__(self) -> str:
        return f"Circle(lat={self.lat!r}, lon={self.lon!r}, radius_m={self.radius_m!r})"


# An edge for ray casting: (lower lat, upper lat, lon at lat0, lat0, d lon / d lat).
_CastEdge = tuple[float, float, float, float, float]


class Polygon(Shape):
    """Rings of (lon, lat) points, closed as in GeoJSON, exterior first, then holes.

    Built by parse_shape after validation; built directly, nothing is checked.
    """

    __slots__ = ("_band_scale", "_bands", "busiest", "rings")

    def __init__(self, rings: Sequence[Sequence[LonLat]]) -> None:
        self.rings = tuple(tuple((float(x), float(y)) for x, y in ring) for ring in rings)
        lons = [x for ring in self.rings for x, _ in ring]
        lats = [y for ring in self.rings for _, y in ring]
        self.bbox = (min(lats), min(lons), max(lats), max(lons))
        edges: list[_CastEdge] = []
        for ring in self.rings:
            for (x1, y1), (x2, y2) in pairwise(ring):
                if y1 != y2:  # a horizontal edge never counts under the half-open rule
                    edges.append((min(y1, y2), max(y1, y2), x1, y1, (x2 - x1) / (y2 - y1)))
        # Horizontal bands of the box, each holding the edges that reach into it, so that a
        # 1000-vertex fence tests a handful of edges per point, not all of them.
        south = self.bbox[0]
        count, scale = _band_grid(self.bbox[2] - south, [e[1] - e[0] for e in edges])
        self._band_scale = scale
        bands: list[list[_CastEdge]] = [[] for _ in range(count)]
        for edge in edges:
            # The same rounding as contains(), monotonic in lat: an edge spanning a point's
            # latitude is always in that point's band.
            first = min(int((edge[0] - south) * scale), count - 1)
            last = min(int((edge[1] - south) * scale), count - 1)
            for i in range(first, last + 1):
                bands[i].append(edge)
        self._bands = tuple(tuple(band) for band in bands)
        self.busiest = max(map(len, bands))

    def contains(self, lat: float, lon: float) -> bool:
        south, west, north, east = self.bbox
        if not (south <= lat <= north and west <= lon <= east):
            return False
        bands = self._bands
        i = int((lat - south) * self._band_scale)
        inside = False
        for low, high, x0, y0, slope in bands[i] if i < len(bands) else bands[-1]:
            if low <= lat < high and lon < x0 + (lat - y0) * slope:
                inside = not inside
        return inside

    def __repr__(self) -> str:
        sizes = ", ".join(str(len(r)) for r in self.rings)
        return f"Polygon(<rings of {sizes} points>, bbox={self.bbox!r})"


def _band_grid(span: float, heights: list[float]) -> tuple[int, float]:
    """(count, scale) of the latitude bands over a box ``span`` degrees high whose non-horizontal
    edges are ``heights`` high: a latitude's band is int((lat - south) * scale), at most
    count - 1. Finite for any finite input (a sub-representable span gets one band)."""
    height = sum(heights) / len(heights) if heights else span
    # Bands thinner than a few mean edge heights would only copy each edge into more of them.
    wanted = 4 * span / height if height > 0 else 1.0  # may be inf: compared, never int()ed
    count = max(1, min(len(heights) // 2, MAX_BANDS, int(min(wanted, MAX_BANDS))))
    scale = count / span if span > 0 else 0.0
    if not isfinite(scale):  # span / count underflows: int(0 * inf) would raise
        return 1, 0.0
    return count, scale


# --- parsing -------------------------------------------------------------------------------


def parse_shape(geometry: object, radius_m: object, max_vertices: int) -> Shape:
    """The Shape of a decoded "$.geometry" and "$.radiusM" (None when absent).

    Raises GeometryError; the total of positions over a polygon's rings is at most
    ``max_vertices``.
    """
    if not isinstance(geometry, dict):
        raise GeometryError(
            "$.geometry",
            f'expected a GeoJSON object with "type" and "coordinates", got {_kind(geometry)}',
        )
    kind = geometry.get("type")
    if kind not in SUPPORTED:
        shown = f'"{kind[:40]}"' if isinstance(kind, str) else _kind(kind)
        raise GeometryError(
            "$.geometry.type", f'{shown} is not supported; expected "Polygon" or "Point"'
        )
    if "coordinates" not in geometry:
        raise GeometryError(_COORDS, "required")
    coordinates = geometry["coordinates"]
    if kind == "Point":
        lon, lat = _position(coordinates, _COORDS)
        return Circle(lat, lon, _radius(radius_m))
    if radius_m is not None:
        raise GeometryError("$.radiusM", "only with a Point")
    rings = _rings(coordinates, max_vertices)
    # The cheap checks first (linear): the crossing and hole checks below are bounded by the
    # band sizes that this one caps, so no body a client can send costs more than that.
    polygon = Polygon(rings)
    if polygon.busiest > MAX_BAND_EDGES:
        raise GeometryError(
            _COORDS,
            f"too intricate: a point would be tested against {polygon.busiest} edges (at most"
            f" {MAX_BAND_EDGES}); simplify it or split it into several fences",
        )
    _check_crossings_and_holes(rings, polygon)
    return polygon


def stored_shape(geometry: dict[str, object], radius_m: float | None) -> Shape:
    """The Shape of a geometry parse_shape accepted and geojson() wrote: built without the
    checks (the crossing test costs milliseconds per fence, and every pod loads every fence)."""
    coordinates: Any = geometry["coordinates"]
    if geometry["type"] == "Point":
        return Circle(coordinates[1], coordinates[0], float(radius_m or 0.0))
    return Polygon(coordinates)


def vertices(shape: Shape) -> int:
    """Positions a shape counts against an org's budget: a circle counts as one."""
    return sum(len(r) for r in shape.rings) if isinstance(shape, Polygon) else 1


def geojson(shape: Shape) -> dict[str, object]:
    """The shape as the GeoJSON geometry that is stored and served: its type and coordinates,
    [lon, lat] only, nothing else the client sent."""
    if isinstance(shape, Circle):
        return {"type": "Point", "coordinates": [shape.lon, shape.lat]}
    assert isinstance(shape, Polygon)
    return {"type": "Polygon", "coordinates": [[list(p) for p in r] for r in shape.rings]}


def _kind(value: object) -> str:
    """What a JSON value is, for a message (never the value itself: it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _radius(value: object) -> float:
    if value is None:
        raise GeometryError("$.radiusM", "required with a Point")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GeometryError("$.radiusM", f"expected a number of metres, got {_kind(value)}")
    # No float() or isfinite() before the range check: a huge JSON integer would overflow.
    if not MIN_RADIUS_M <= value <= MAX_RADIUS_M:  # NaN fails it too
        raise GeometryError(
            "$.radiusM",
            f"must be in [{MIN_RADIUS_M:g}, {MAX_RADIUS_M:g}] metres, got {value!r:.40}",
        )
    return float(value)


def _position(value: object, path: str) -> LonLat:
    """(lon, lat) of a GeoJSON position [lon, lat] or [lon, lat, alt]."""
    if not isinstance(value, list | tuple) or not 2 <= len(value) <= 3:
        raise GeometryError(path, "expected a position [longitude, latitude] (or with altitude)")
    for i, name in enumerate(("longitude", "latitude", "altitude")[: len(value)]):
        v = value[i]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise GeometryError(path, f"{name} must be a number, got {_kind(v)}")
        if isinstance(v, float) and not isfinite(v):  # isfinite() of a huge int overflows
            raise GeometryError(path, f"{name} must be finite, got {v!r}")
    lon, lat = value[0], value[1]
    if not -180 <= lon <= 180:
        raise GeometryError(path, f"longitude {lon!r:.40} is outside [-180, 180]")
    if not -90 <= lat <= 90:
        raise GeometryError(path, f"latitude {lat!r:.40} is outside [-90, 90]")
    return float(lon), float(lat)


def _rings(value: object, max_vertices: int) -> list[list[LonLat]]:
    if not isinstance(value, list | tuple) or not value:
        raise GeometryError(_COORDS, "expected a non-empty list of rings (lists of positions)")
    for r, ring in enumerate(value):
        if not isinstance(ring, list | tuple):
            raise GeometryError(
                f"{_COORDS}[{r}]", f"expected a ring (a list of positions), got {_kind(ring)}"
            )
    total = sum(len(ring) for ring in value)
    if total > max_vertices:  # before any per-position work: it bounds the request's cost
        raise GeometryError(_COORDS, f"{total} positions over all rings; at most {max_vertices}")
    rings: list[list[LonLat]] = []
    for r, ring in enumerate(value):
        path = f"{_COORDS}[{r}]"
        if len(ring) < 4:
            raise GeometryError(
                path,
                f"a ring needs at least 4 positions (the last repeats the first); got {len(ring)}",
            )
        points = [_position(p, f"{path}[{i}]") for i, p in enumerate(ring)]
        if points[0] != points[-1]:
            raise GeometryError(path, "ring is not closed: its last position must equal its first")
        lons = [x for x, _ in points]
        if max(lons) - min(lons) >= 180:
            raise GeometryError(
                path,
                "ring spans 180 degrees of longitude or more: it would cross the antimeridian"
                " or span half the globe; split it",
            )
        lats = [y for _, y in points]
        if min(max(lons) - min(lons), max(lats) - min(lats)) < MIN_EXTENT_DEG:
            raise GeometryError(
                path, f"ring has zero area (narrower than {MIN_EXTENT_DEG:g} degrees, ~1 cm)"
            )
        rings.append(points)
    return rings


def _check_crossings_and_holes(rings: list[list[LonLat]], polygon: Polygon) -> None:
    """The rules between edges and between rings, checked within the polygon's latitude bands
    (whose non-horizontal edges parse_shape has capped): two edges can only meet in a band
    both reach into, and a ray from a point only crosses edges of the point's band."""
    edges = [e for r, points in enumerate(rings) for e in _ring_edges(points, r)]
    south, scale, count = polygon.bbox[0], polygon._band_scale, len(polygon._bands)
    bands: list[list[_Banded]] = [[] for _ in range(count)]
    for e in edges:
        first = min(int((e[2] - south) * scale), count - 1)
        item = (e[0], first, e)
        for i in range(first, min(int((e[3] - south) * scale), count - 1) + 1):
            bands[i].append(item)
    _check_crossings(bands, MAX_PAIRS_PER_EDGE * len(edges))
    _check_holes(rings, bands, south, scale)


# A ring edge for the crossing sweep: (min lon, max lon, min lat, max lat, ring, index among
# the ring's non-zero edges, how many the ring has, edge number as given, x1, y1, x2, y2).
_SweepEdge = tuple[float, float, float, float, int, int, int, int, float, float, float, float]


def _ring_edges(points: list[LonLat], r: int) -> list[_SweepEdge]:
    """The ring's edges of non-zero length; refuses a ring of zero area."""
    # Repeated consecutive positions are allowed: keep the first of each run, and number an
    # edge as given (edge i joins positions i and i + 1), i.e. by the last of its start's run.
    kept = [0] + [i for i in range(1, len(points)) if points[i] != points[i - 1]]
    corners = [points[i] for i in kept[:-1]]  # the last run is the closing one
    n = len(corners)
    if n < 3 or _collinear(corners):
        raise GeometryError(
            f"{_COORDS}[{r}]",
            "ring has zero area (fewer than 3 distinct positions, or all on one line)",
        )
    edges: list[_SweepEdge] = []
    for j in range(n):
        (x1, y1), (x2, y2) = corners[j], corners[(j + 1) % n]
        label = kept[j + 1] - 1
        edges.append(
            (min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2), r, j, n, label, x1, y1, x2, y2)
        )
    return edges


def _collinear(corners: list[LonLat]) -> bool:
    (ax, ay), (bx, by) = corners[0], corners[1]
    return all((bx - ax) * (y - ay) == (by - ay) * (x - ax) for x, y in corners)


# A sweep edge in a latitude band: (its west end, the first band it reaches into, the edge).
_Banded = tuple[float, int, _SweepEdge]


def _check_crossings(bands: list[list[_Banded]], budget: int) -> int:
    """Refuses any contact between edges but the shared corner of consecutive edges; returns
    the edge pairs looked at (what the check cost), and refuses the polygon as too intricate
    when they pass ``budget``.

    Two edges that meet share the band of the meeting point's latitude (the band index is
    monotonic in latitude), and each pair is compared in the first band both reach into only.
    Within a band, a sweep by west end compares an edge only with the edges whose lon range is
    still open. A band holds at most MAX_BAND_EDGES sloped edges, and the horizontal ones at one
    latitude end on sloped edges of the band or overlap (refused at the first such pair), so
    the work grows with the edges times the band size, not with the edges squared; edges that
    overlap in both latitude and longitude by the dozen (a herringbone) still cost that, hence
    the budget.
    """
    pairs = 0
    for i, band in enumerate(bands):
        band.sort(key=itemgetter(0))
        # Edges first met in this band, and those met in an earlier one: two of the latter
        # were compared there.
        new: list[_SweepEdge] = []
        old: list[_SweepEdge] = []
        for west, first, e in band:
            new = [a for a in new if a[1] >= west]
            old = [a for a in old if a[1] >= west]
            others = new + old if first == i else new
            pairs += len(others)
            if pairs > budget:
                raise GeometryError(
                    _COORDS,
                    f"too intricate: more than {budget} pairs of its edges overlap in latitude and"
                    " longitude (a herringbone or comb); simplify it or split it into several"
                    " fences",
                )
            south, north, ex1, ey1, ex2, ey2 = e[2], e[3], e[8], e[9], e[10], e[11]
            for a in others:
                if a[3] < south or north < a[2]:
                    continue
                # Both ends of e strictly on one side of a's line: they cannot meet. Most pairs
                # whose boxes overlap end here, before the full test.
                ax, ay, dx, dy = a[8], a[9], a[10] - a[8], a[11] - a[9]
                s1, s2 = dx * (ey1 - ay) - dy * (ex1 - ax), dx * (ey2 - ay) - dy * (ex2 - ax)
                if not (s1 > 0 < s2 or s1 < 0 > s2):
                    _check_pair(a, e)
            (new if first == i else old).append(e)
    return pairs


_CROSS, _TOUCH, _OVERLAP = "crosses", "touches", "overlaps"
_Segment = tuple[float, float, float, float]  # x1, y1, x2, y2


def _check_pair(a: _SweepEdge, b: _SweepEdge) -> None:
    if a[4] > b[4] or (a[4] == b[4] and a[7] > b[7]):
        a, b = b, a  # name the lower ring and edge first
    ring, other = a[4], b[4]
    if ring == other and (b[5] - a[5]) % a[6] in (1, a[6] - 1):
        contact = _reversal(a, b)  # consecutive: they share a corner by construction
    else:
        contact = _contact(a[8:], b[8:])
    if contact is None:
        return
    if ring == other:
        raise GeometryError(
            f"{_COORDS}[{ring}]", f"ring {contact} itself (edges {a[7]} and {b[7]})"
        )
    raise GeometryError(
        f"{_COORDS}[{other}]",
        f"ring {contact} ring {ring} (its edge {b[7]}, edge {a[7]} of ring {ring})",
    )


def _orient(ax: float, ay: float, bx: float, by: float, cx: float, cy: float) -> float:
    """> 0 when a, b, c turn left, < 0 right, 0 on one line."""
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


def _reversal(a: _SweepEdge, b: _SweepEdge) -> str | None:
    """Consecutive edges overlap only when the ring turns back along itself."""
    if (a[5] + 1) % a[6] != b[5]:
        a, b = b, a  # now a ends where b starts
    px, py, qx, qy = a[8], a[9], a[10], a[11]
    rx, ry = b[10], b[11]
    if _orient(px, py, qx, qy, rx, ry) == 0 and (px - qx) * (rx - qx) + (py - qy) * (ry - qy) > 0:
        return _OVERLAP
    return None


def _contact(s: _Segment, t: _Segment) -> str | None:
    """How two segments (x1, y1, x2, y2) meet, if at all."""
    ax, ay, bx, by = s
    cx, cy, dx, dy = t
    d1, d2 = _orient(cx, cy, dx, dy, ax, ay), _orient(cx, cy, dx, dy, bx, by)
    d3, d4 = _orient(ax, ay, bx, by, cx, cy), _orient(ax, ay, bx, by, dx, dy)
    if d1 == d2 == d3 == d4 == 0:  # on one line: compare them along their longer axis
        k = 0 if abs(bx - ax) >= abs(by - ay) else 1
        lo = max(min(s[k], s[k + 2]), min(t[k], t[k + 2]))
        hi = min(max(s[k], s[k + 2]), max(t[k], t[k + 2]))
        return _OVERLAP if hi > lo else _TOUCH if hi == lo else None
    if (d1 > 0 > d2 or d1 < 0 < d2) and (d3 > 0 > d4 or d3 < 0 < d4):
        return _CROSS
    if (
        (d1 == 0 and _within(cx, cy, dx, dy, ax, ay))
        or (d2 == 0 and _within(cx, cy, dx, dy, bx, by))
        or (d3 == 0 and _within(ax, ay, bx, by, cx, cy))
        or (d4 == 0 and _within(ax, ay, bx, by, dx, dy))
    ):
        return _TOUCH
    return None


def _within(ax: float, ay: float, bx: float, by: float, px: float, py: float) -> bool:
    """Whether p, known to be on the line ab, lies on the segment ab."""
    return min(ax, bx) <= px <= max(ax, bx) and min(ay, by) <= py <= max(ay, by)


def _inside_ring(ring: list[LonLat], x: float, y: float) -> bool:
    inside = False
    for (x1, y1), (x2, y2) in pairwise(ring):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _check_holes(
    rings: list[list[LonLat]], bands: list[list[_Banded]], south: float, scale: float
) -> None:
    """Holes inside the exterior and not inside one another. The rings neither cross nor touch,
    so one corner of a ring tells on which side of another ring all of it lies.

    Each hole's corner is cast against its band only: inside the exterior's edges an odd number
    of times, and the other holes' an even number. Holes nest as a tree, so if any hole is
    inside another, one is inside exactly one other, and its count is odd.
    """
    last = len(bands) - 1
    for nested in (False, True):
        for h in range(1, len(rings)):
            x, y = rings[h][0]
            odd = False
            for _, _, e in bands[min(int((y - south) * scale), last)]:
                if (e[4] != 0) is nested and e[4] != h and e[2] <= y < e[3]:
                    x1, y1, x2, y2 = e[8], e[9], e[10], e[11]
                    if x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                        odd = not odd
            if not nested and not odd:
                raise GeometryError(
                    f"{_COORDS}[{h}]", f"hole lies outside the exterior ring ({_COORDS}[0])"
                )
            if nested and odd:  # name the hole: a refusal may cost a loop over the rings
                g = next(g for g in range(1, len(rings)) if g != h and _inside_ring(rings[g], x, y))
                raise GeometryError(
                    f"{_COORDS}[{h}]", f"hole lies inside another hole ({_COORDS}[{g}])"
                )


# --- the index ---------------------------------------------------------------------------------

# (min lat, min lon, max lat, max lon, the shape's contains, fence id, {fence id})
_Entry = tuple[float, float, float, float, Callable[[float, float], bool], str, frozenset[str]]

MAX_CELLS = 64  # a box needing more cells of a level goes to a coarser level
MIN_CELL_DEG = 0.001  # ~111 m of latitude
MAX_CELL_DEG = 10.0
LEVEL_FACTOR = 4  # each level's cell is this many times the one below's

# A grid level: (1 / cell size, row offset, column offset, columns, {row * columns + col: [...]}).
_Level = tuple[float, float, float, int, dict[int, tuple[_Entry, ...]]]


class FenceIndex:
    """The fences of one org, for "which of them contain this point".

    A hierarchy of lat/lon grids. The finest has a cell of half the median fence box (clamped),
    so a typical fence sits in a few cells; each coarser one's cell is LEVEL_FACTOR times
    larger, up to one that covers the globe in a few cells. Each fence is registered at the
    finest level where its box needs at most MAX_CELLS cells, and a point looks up one cell
    per level that holds any fence: a few dict lookups whatever the mix of sizes (a fence far
    larger than the rest is not checked for every point, as in a single grid). A circle
    across the antimeridian is registered as two boxes. Immutable: build a new one when the
    fences change.
    """

    __slots__ = ("_count", "_levels", "cell_deg")

    def __init__(self, fences: Iterable[tuple[str, Shape]]) -> None:
        fences = list(fences)
        self._count = len(fences)
        sizes = sorted(max(s.bbox[2] - s.bbox[0], s.bbox[3] - s.bbox[1]) for _, s in fences)
        median = sizes[len(sizes) // 2] if sizes else 1.0
        self.cell_deg = min(max(median / 2, MIN_CELL_DEG), MAX_CELL_DEG)
        grids: list[tuple[float, float, float, int]] = []
        cell = self.cell_deg
        while True:  # up to a cell of 360 degrees or more: every box fits in 2 x 2 cells
            inverse = 1 / cell
            # Cell (row, column) = floor(lat * inverse + lat0), floor(lon * inverse + lon0),
            # one formula for registering and looking up, so rounding never splits them.
            lat0, lon0 = 90 * inverse, 180 * inverse
            grids.append((inverse, lat0, lon0, floor(360 * inverse + lon0) + 1))
            if cell >= 360:
                break
            cell *= LEVEL_FACTOR
        cells: list[dict[int, list[_Entry]]] = [{} for _ in grids]
        top = len(grids) - 1
        for fence_id, shape in fences:
            single = frozenset((fence_id,))
            for south, west, north, east in _boxes(shape.bbox):
                entry = (south, west, north, east, shape.contains, fence_id, single)
                for level, (inverse, lat0, lon0, _) in enumerate(grids):
                    row0, col0 = floor(south * inverse + lat0), floor(west * inverse + lon0)
                    row1, col1 = floor(north * inverse + lat0), floor(east * inverse + lon0)
                    if (row1 - row0 + 1) * (col1 - col0 + 1) <= MAX_CELLS or level == top:
                        break
                registered, columns = cells[level], grids[level][3]
                for row in range(row0, row1 + 1):
                    for col in range(col0, col1 + 1):
                        registered.setdefault(row * columns + col, []).append(entry)
        # Only the levels that hold a fence are looked up, finest first.
        self._levels: tuple[_Level, ...] = tuple(
            (*grid, {key: tuple(entries) for key, entries in level_cells.items()})
            for grid, level_cells in zip(grids, cells, strict=True)
            if level_cells
        )

    def __len__(self) -> int:
        return self._count

    def containing(self, lat: float, lon: float) -> frozenset[str]:
        """Ids of the fences containing the point (lat in [-90, 90], lon in [-180, 180]).

        Runs once per stored ping, so it allocates nothing when no fence or one fence matches
        (each fence's one-id set is made up front).
        """
        found = _EMPTY
        more: list[str] | None = None
        for inverse, lat0, lon0, columns, cells in self._levels:
            entries = cells.get(floor(lat * inverse + lat0) * columns + floor(lon * inverse + lon0))
            if entries is None:
                continue  # most pings: in no fence's cell
            for south, west, north, east, contains, fence_id, single in entries:
                if south <= lat <= north and west <= lon <= east and contains(lat, lon):
                    if more is not None:
                        more.append(fence_id)
                    elif found:
                        more = [*found, fence_id]
                    else:
                        found = single
        return found if more is None else frozenset(more)


def _boxes(bbox: BBox) -> list[BBox]:
    """The box, split at the antimeridian when it passes it (only a circle's can)."""
    south, west, north, east = bbox
    if west < -180:
        return [(south, west + 360, north, 180.0), (south, -180.0, north, east)]
    if east > 180:
        return [(south, west, north, 180.0), (south, -180.0, north, east - 360)]
    return [bbox]
