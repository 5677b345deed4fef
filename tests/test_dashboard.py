"""The dashboard in headless Chromium against the running service and the simulator: trucks
appear and move, a click draws a trip's history and shows its summary and GeoJSON and GPX
downloads, offline (canvas) and online (Leaflet and OpenStreetMap tiles, answered locally). Screenshots go to test-artifacts/.

Needs Debian's chromium, and playwright-core and leaflet in tests/browser
(.ci/install-browser-tools installs them); without them this test fails, saying so, rather than skipping.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from devtools.simulate import Config, Fleet

from .conftest import ROOT, SECRET, token

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
