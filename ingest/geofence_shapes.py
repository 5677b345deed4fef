"""Geofence shapes: validate a fence's GeoJSON geometry, find the fences that contain a point.

POST /api/v1/geofences carries a GeoJSON Polygon, or a Point with "radiusM"; parse_shape turns
it into a Shape or raises GeometryError naming the JSON path at fault (the HTTP layer's 400).
After each commit every stored ping is checked against its org's fences (up to ~1000):
FenceIndex answers with a grid cell lookup, a bounding-box check, then the exact test, so a
ping far from every fence costs one dict lookup. Pure computation, no I/O.

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
# Edges one point may be tested against (a latitude band's): the cost of a ping in the fence.
# A traced outline has a few dozen at most; a comb whose every tooth spans the fence's height
# has as many as it has positions, and would cost ~65 us per ping per fence.
MAX_BAND_EDGES = 256

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
        # 1000-vertex fence tests a handful of edges per point, not all of them. Bands thinner
        # than a few mean edge heights would only copy each edge into more of them.
        south, span = self.bbox[0], self.bbox[2] - self.bbox[0]
        height = sum(e[1] - e[0] for e in edges) / len(edges) if edges else span
        count = max(1, min(len(edges) // 2, 512, int(4 * span / height) if height > 0 else 1))
        scale = self._band_scale = count / span if span > 0 else 0.0
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
    polygon = Polygon(_rings(coordinates, max_vertices))
    if polygon.busiest > MAX_BAND_EDGES:
        raise GeometryError(
            _COORDS,
            f"too intricate: a point would be tested against {polygon.busiest} edges (at most"
            f" {MAX_BAND_EDGES}); simplify it or split it into several fences",
        )
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
        rings.append(points)
    edges = [_ring_edges(points, r) for r, points in enumerate(rings)]
    _check_crossings([e for ring_edges in edges for e in ring_edges])
    _check_holes(rings)
    return rings


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


def _check_crossings(edges: list[_SweepEdge]) -> None:
    """Refuses any contact between edges but the shared corner of consecutive edges.

    A sweep by west end: an edge is compared only with the edges whose lon range is still open
    and whose lat range overlaps, so a typical ring costs O(n log n), not O(n^2).
    """
    edges.sort(key=itemgetter(0))
    active: list[_SweepEdge] = []
    for e in edges:
        west, south, north, ex1, ey1, ex2, ey2 = e[0], e[2], e[3], e[8], e[9], e[10], e[11]
        active = [a for a in active if a[1] >= west]
        for a in active:
            if a[3] < south or north < a[2]:
                continue
            # Both ends of e strictly on one side of a's line: they cannot meet. Most pairs
            # whose boxes overlap end here, before the full test.
            ax, ay, dx, dy = a[8], a[9], a[10] - a[8], a[11] - a[9]
            s1, s2 = dx * (ey1 - ay) - dy * (ex1 - ax), dx * (ey2 - ay) - dy * (ex2 - ax)
            if not (s1 > 0 < s2 or s1 < 0 > s2):
                _check_pair(a, e)
        active.append(e)


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


def _check_holes(rings: list[list[LonLat]]) -> None:
    """Holes inside the exterior and not inside one another. The rings neither cross nor touch,
    so one corner of a ring tells on which side of another ring all of it lies."""
    boxes = [
        (min(y for _, y in r), min(x for x, _ in r), max(y for _, y in r), max(x for x, _ in r))
        for r in rings
    ]
    exterior = rings[0]
    for h in range(1, len(rings)):
        if not _inside_ring(exterior, *rings[h][0]):
            raise GeometryError(
                f"{_COORDS}[{h}]", f"hole lies outside the exterior ring ({_COORDS}[0])"
            )
    for h in range(1, len(rings)):
        for g in range(1, len(rings)):
            if g != h and _box_within(boxes[h], boxes[g]) and _inside_ring(rings[g], *rings[h][0]):
                raise GeometryError(
                    f"{_COORDS}[{h}]", f"hole lies inside another hole ({_COORDS}[{g}])"
                )


def _box_within(inner: BBox, outer: BBox) -> bool:
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and inner[2] <= outer[2]
        and inner[3] <= outer[3]
    )


# --- the index ---------------------------------------------------------------------------------

# (min lat, min lon, max lat, max lon, the shape's contains, fence id, {fence id})
_Entry = tuple[float, float, float, float, Callable[[float, float], bool], str, frozenset[str]]

MAX_CELLS = 64  # a box needing more cells goes in the list checked for every point
MIN_CELL_DEG = 0.001  # ~111 m of latitude
MAX_CELL_DEG = 10.0


class FenceIndex:
    """The fences of one org, for "which of them contain this point".

    A uniform lat/lon grid whose cell is half the median fence box (clamped), so a typical
    fence sits in a few cells; a fence too big for MAX_CELLS cells is checked by its box for
    every point instead. A circle across the antimeridian is registered as two boxes.
    Immutable: build a new one when the fences change.
    """

    __slots__ = ("_cells", "_columns", "_count", "_inverse", "_lat0", "_lon0", "_wide", "cell_deg")

    def __init__(self, fences: Iterable[tuple[str, Shape]]) -> None:
        fences = list(fences)
        self._count = len(fences)
        sizes = sorted(max(s.bbox[2] - s.bbox[0], s.bbox[3] - s.bbox[1]) for _, s in fences)
        median = sizes[len(sizes) // 2] if sizes else 1.0
        self.cell_deg = min(max(median / 2, MIN_CELL_DEG), MAX_CELL_DEG)
        inverse = self._inverse = 1 / self.cell_deg
        # Cell (row, column) = floor(lat * inverse + _lat0), floor(lon * inverse + _lon0),
        # one formula for registering and looking up, so rounding never splits them.
        self._lat0, self._lon0 = 90 * inverse, 180 * inverse
        self._columns = floor(360 * inverse + self._lon0) + 1
        cells: dict[int, list[_Entry]] = {}
        wide: list[_Entry] = []
        for fence_id, shape in fences:
            single = frozenset((fence_id,))
            for south, west, north, east in _boxes(shape.bbox):
                entry = (south, west, north, east, shape.contains, fence_id, single)
                row0, col0 = self._cell(south, west)
                row1, col1 = self._cell(north, east)
                if (row1 - row0 + 1) * (col1 - col0 + 1) > MAX_CELLS:
                    wide.append(entry)
                    continue
                for row in range(row0, row1 + 1):
                    for col in range(col0, col1 + 1):
                        cells.setdefault(row * self._columns + col, []).append(entry)
        self._cells = {key: tuple(entries) for key, entries in cells.items()}
        self._wide = tuple(wide)

    def _cell(self, lat: float, lon: float) -> tuple[int, int]:
        return floor(lat * self._inverse + self._lat0), floor(lon * self._inverse + self._lon0)

    def __len__(self) -> int:
        return self._count

    def containing(self, lat: float, lon: float) -> frozenset[str]:
        """Ids of the fences containing the point (lat in [-90, 90], lon in [-180, 180]).

        Runs once per stored ping, so it allocates nothing when no fence or one fence matches
        (each fence's one-id set is made up front) and no fence is too big for the grid.
        """
        if not self._count:
            return _EMPTY
        inverse = self._inverse
        entries = self._cells.get(
            floor(lat * inverse + self._lat0) * self._columns + floor(lon * inverse + self._lon0)
        )
        if entries is None:
            entries = self._wide
            if not entries:
                return _EMPTY  # most pings: in no fence's cell
        elif self._wide:
            entries += self._wide
        found = _EMPTY
        more: list[str] | None = None
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
