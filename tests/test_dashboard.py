"""The dashboard in headless Chromium against the running service and the simulator: trucks
appear and move, a click draws a trip's history and shows its summary and GeoJSON and GPX
downloads, offline (canvas) and online (Leaflet and OpenStreetMap tiles, answered locally); the
org's geofences on both maps and their enter and exit events listed live (names as text, never
another org's). Screenshots go to test-artifacts/.

Needs Debian's chromium, and playwright-core and leaflet in tests/browser
(.ci/install-browser-tools installs them); without them this test fails, saying so, rather than skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devtools.simulate import Config, Fleet

from .conftest import ROOT, SECRET, auth, now_ms, token
from .test_geofences import LAT0, LON0, drive, fence

pytestmark = pytest.mark.slow

BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
TRUCKS = 4


def browser_tools() -> str:
    """The node binary; fails the test with what to install when a tool is missing."""
    node = shutil.which("node")
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if node is None:
        missing.append("node (apt-get install nodejs)")
    for package in ("playwright-core", "leaflet"):
        if not (BROWSER_DIR / "node_modules" / package / "package.json").is_file():
            missing.append(f"{package} in tests/browser (npm ci there)")
    if missing:
        pytest.fail(
            "browser test tools missing: " + "; ".join(missing)
            + ". Run .ci/install-browser-tools.", pytrace=False,
        )  # fmt: skip
    assert node is not None
    return node


async def test_the_page_and_only_its_assets_are_served(client):
    r = await client.get("/")
    assert r.status == 200 and r.content_type == "text/html"
    assert "<title>Fleet" in await r.text()
    assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"  # the URL carries the token
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = await client.get(f"/static/{name}")
        assert r.status == 200 and r.content_type == kind, name
    for path in ("/static/index.html", "/static/..%2Fdashboard.py", "/static/nope.js"):
        assert (await client.get(path)).status == 404, path


@pytest.mark.parametrize("online", [False, True], ids=["offline-canvas", "online-osm"])
async def test_dashboard_shows_the_fleet_moving_and_a_trip_history(make_client, online):
    """Offline (this machine) the page draws on its canvas; online (the CDN and the tile
    server answered from local files by the browser script) it uses Leaflet and OSM tiles."""
    node = browser_tools()
    client = await make_client()
    base = str(client.make_url("")).rstrip("/")
    org = "org_browser"
    fleet = Fleet(Config(
        url=base, drivers=TRUCKS, org=org, secret=SECRET, radius_m=600, fix_interval_s=0.5,
        upload_interval_s=0.5, offline_chance=0.0, lost_ack_chance=0.0, report_every_s=3600,
        timeout_s=5.0, seed=11,
    ))  # fmt: skip
    stop = asyncio.Event()
    simulator = asyncio.create_task(fleet.run(stop))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / ("dashboard-osm.png" if online else "dashboard.png")
    page = f"{base}/?token={token('dispatcher', 'disp_1', org)}"
    args = [page, str(shot), "--trucks", str(TRUCKS), "--timeout", "25000", "--settle", "3000"]
    if online:
        args += ["--online", str(BROWSER_DIR / "node_modules" / "leaflet" / "dist")]
    try:
        proc = await asyncio.create_subprocess_exec(
            node, "dashboard.mjs", *args, cwd=BROWSER_DIR,
            env={**os.environ, "CHROMIUM_PATH": CHROMIUM},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 50)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail("the browser script took longer than 50 s")
    finally:
        stop.set()
        stats = await simulator
    lines = out.decode().strip().splitlines()
    assert lines, f"no result from the browser script (exit {proc.returncode}): {err.decode()}"
    result = json.loads(lines[-1])
    assert result["errors"] == [], result
    assert result["renderer"] == ("leaflet" if online else "canvas"), result
    assert result["ws"] == "live"
    assert result["trucks"] == TRUCKS
    assert result["checks"]["advanced"] >= TRUCKS and result["checks"]["drove"] >= 1, result
    assert result["checks"]["colouredPixels"] > 200, result
    if online:
        assert result["checks"]["tilesLoaded"] > 0 and result["tilesServed"] > 0, result
    assert result["historyPoints"] > 0 and result["historyTrip"].startswith("trip_drv_")
    # The trip panel: the summary, and both downloads of that trip, whole.
    summary, downloads = result["summary"], result["downloads"]
    assert summary["pings"] > 0 and summary["distanceM"] >= 0, summary
    assert set(summary["fields"]) == {"distance", "duration", "pings", "average", "top", "stops"}
    geojson, gpx = downloads["geojson"], downloads["gpx"]
    assert geojson["type"] == "Feature" and geojson["geometry"] == "LineString", geojson
    assert geojson["tripId"] == result["historyTrip"] and geojson["name"].endswith(".geojson")
    assert geojson["points"] == geojson["times"] >= summary["pings"], geojson  # the trip grows
    assert gpx["gpx11"] and gpx["complete"] and gpx["points"] >= summary["pings"], gpx
    assert result["ok"] and proc.returncode == 0
    assert shot.stat().st_size > 10_000
    assert shot.with_name(shot.stem + "-history.png").is_file()
    assert stats.failed == 0 and stats.accepted > 0


# -- Geofences on the map and their events ------------------------------------------------

# tests/browser/page_driver.mjs: one Chromium page, driven a command at a time.
DRIVER = "page_driver.mjs"


class Page:
    """The page in Chromium, through DRIVER. Every step fails the test on an error of its own
    or of the page (an uncaught exception, or a dialog such as an injected alert())."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def step(self, op: str, **command: object) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **command}).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line, f"the browser driver ended (exit {self.proc.returncode})"
        answer = json.loads(line)
        assert "error" not in answer and answer["problems"] == [], answer
        return answer["value"]

    async def wait(self, js: str, arg: object = None) -> Any:
        """Polls ``js`` (a function's source, called with ``arg``) until its value is truthy."""
        return await self.step("wait", js=js, arg=arg)

    async def eval(self, js: str, arg: object = None) -> Any:
        return await self.step("eval", js=js, arg=arg)


@contextlib.asynccontextmanager
async def chromium_page(url: str, screenshot: Path, leaflet: bool) -> AsyncIterator[Page]:
    """The page at ``url``; its last state goes to ``screenshot``, whatever the test found."""
    node = browser_tools()
    args = [url]
    if leaflet:
        args.append(str(BROWSER_DIR / "node_modules" / "leaflet" / "dist"))
    proc = await asyncio.create_subprocess_exec(
        node, DRIVER, *args, cwd=BROWSER_DIR,
        env={**os.environ, "CHROMIUM_PATH": CHROMIUM},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    page = Page(proc)
    try:
        await page.step("goto")
        yield page
    finally:
        with contextlib.suppress(Exception):
            await page.step("shot", path=str(screenshot))
        assert proc.stdin is not None
        proc.stdin.close()  # the driver closes the browser and exits
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def square(half: float, lat: float = LAT0, lon: float = LON0) -> list[list[float]]:
    """A closed ring: a square of ``half`` degrees either side of (lat, lon)."""
    return [[lon - half, lat - half], [lon + half, lat - half], [lon + half, lat + half],
            [lon - half, lat + half], [lon - half, lat - half]]  # fmt: skip


# A ~900 m square with a ~220 m hole in its middle, and a 150 m circle east of it.
DEPOT = {"type": "Polygon", "coordinates": [square(0.004), square(0.001)]}
GATE = {"type": "Point", "coordinates": [LON0 + 0.008, LAT0]}
INJECTION = "<img src=x onerror=alert(1)>"

# Page functions (called with one argument).
FENCES_DRAWN = """(n) => {
  const el = document.getElementById('map');
  return document.body.dataset.ws === 'live' && Number(el.dataset.fenceCount) === n
    && el.dataset.fenceIds.split(' ').sort();
}"""
EVENT_ROWS = """(n) => {
  const rows = [...document.querySelectorAll('#events li')];
  return rows.length >= n && rows.map((li) => ({
    fence: li.dataset.geofenceId, event: li.dataset.event, trip: li.dataset.trip,
    driver: li.dataset.driver, name: li.querySelector('.fence').textContent,
    text: li.textContent, kindColour: getComputedStyle(li.querySelector('.kind')).backgroundColor,
  }));
}"""
# Pixels of the fences' ink (#6a32c9) on a canvas: the shapes were drawn there.
INK_PIXELS = """(selector) => {
  const c = document.querySelector(selector);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - 106) + Math.abs(d[i + 1] - 50) + Math.abs(d[i + 2] - 201) < 40) n++;
  }
  return n;
}"""
LABELS = """() => Object.fromEntries([...document.querySelectorAll('.fence-label [data-geofence-id]')]
  .map((el) => [el.dataset.geofenceId, el.textContent]))"""


@pytest.mark.parametrize("leaflet", [False, True], ids=["canvas", "leaflet"])
async def test_dashboard_draws_the_orgs_geofences_and_lists_their_events_live(client, leaflet):
    org, rival = "org_fences", "org_rival"
    depot = await fence(client, DEPOT, "Depot north", org)
    gate = await fence(client, GATE, INJECTION, org, radiusM=150)
    theirs = await fence(client, DEPOT, "Rival yard", rival)
    # Before the page opens: a truck enters the gate (shown from the last hour's events), and
    # one of the other org enters its own fence in the same place.
    start = now_ms(1)  # a fence applies to pings from its creation on
    await drive(client, [(LAT0, LON0 + 0.02), (LAT0, LON0 + 0.008)], start, "trip_early", "drv_early", org)  # fmt: skip
    await drive(client, [(LAT0 - 0.02, LON0), (LAT0 - 0.003, LON0)], start, "trip_rival", "drv_rival", rival)  # fmt: skip

    ARTIFACTS.mkdir(exist_ok=True)
    base = str(client.make_url("")).rstrip("/")
    url = f"{base}/?token={token('dispatcher', 'disp_1', org)}" + ("" if leaflet else "&map=canvas")
    shot = ARTIFACTS / f"dashboard-geofences-{'osm' if leaflet else 'canvas'}.png"
    async with chromium_page(url, shot, leaflet) as page:
        # Both fences of the org are drawn, the other org's never; the early event is listed.
        assert await page.wait(FENCES_DRAWN, 2) == sorted([depot, gate])
        renderer = await page.eval("() => document.getElementById('map').dataset.renderer")
        assert renderer == ("leaflet" if leaflet else "canvas")
        (early,) = await page.wait(EVENT_ROWS, 1)
        assert early["fence"] == gate and early["event"] == "enter", early
        assert (early["trip"], early["driver"], early["name"]) == ("trip_early", "drv_early", INJECTION)  # fmt: skip
        if leaflet:  # the labels are text, on a canvas of the fences' own
            assert await page.eval(LABELS) == {depot: "Depot north", gate: INJECTION}
            canvas = ".leaflet-fences-pane canvas"
        else:
            canvas = "#canvas"
        assert await page.wait(INK_PIXELS, canvas) > 200

        # A truck drives from outside into the polygon (its ring, not its hole): "enter".
        t0 = now_ms(1)
        await drive(client, [(LAT0 - 0.008, LON0), (LAT0 - 0.006, LON0), (LAT0 - 0.003, LON0)], t0, "trip_live", "drv_live", org)  # fmt: skip
        entered = (await page.wait(EVENT_ROWS, 2))[0]
        assert entered["fence"] == depot and entered["event"] == "enter", entered
        assert (entered["name"], entered["trip"], entered["driver"]) == ("Depot north", "trip_live", "drv_live")  # fmt: skip
        assert "Depot north" in entered["text"] and "trip_live" in entered["text"]
        # Then out of it and into the circle: "exit" and "enter", newest first.
        await drive(client, [(LAT0 - 0.003, LON0 + 0.006), (LAT0, LON0 + 0.008)], t0 + 3000, "trip_live", "drv_live", org)  # fmt: skip
        rows = await page.wait(EVENT_ROWS, 4)
        assert [(r["fence"], r["event"], r["trip"]) for r in rows] == [
            (gate, "enter", "trip_live"), (depot, "exit", "trip_live"),
            (depot, "enter", "trip_live"), (gate, "enter", "trip_early"),
        ], rows  # fmt: skip
        assert rows[0]["kindColour"] != rows[1]["kindColour"]  # enter and exit look different
        assert rows[0]["name"] == INJECTION
        assert await page.eval("() => document.querySelector('img[src=\"x\"]') === null")

        # The other org's fence and event exist, and never reached this page.
        r = await client.get(f"/api/v1/geofences/{theirs}/events", headers=auth("dispatcher", "disp_1", rival))  # fmt: skip
        assert [e["tripId"] for e in (await r.json())["events"]] == ["trip_rival"]
        ids = await page.eval("() => document.getElementById('map').dataset.fenceIds")
        assert theirs not in ids and "trip_rival" not in await page.eval("() => document.body.textContent")  # fmt: skip

        # A click on an event shows its trip's history, as a click in the trip list does.
        await page.step("click", selector=f'#events li[data-geofence-id="{depot}"][data-event="exit"] button')  # fmt: skip
        assert await page.wait("""() => {
            const el = document.getElementById('map');
            return Number(el.dataset.historyPoints) > 0 && el.dataset.historyTrip;
        }""") == "trip_live"  # fmt: skip
