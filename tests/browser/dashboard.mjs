// Loads the dashboard in Debian's Chromium (playwright-core, no browser download), checks
// that trucks appear and move, that a click draws a trip's history and shows its summary,
// and that the trip's GeoJSON and GPX downloads arrive whole; saves screenshots,
// and prints one JSON line with what it saw. Exit code 0 when every check passed.
//
//   node dashboard.mjs <page url with ?token=> <screenshot.png> [--trucks N] [--timeout MS]
//                      [--settle MS] [--online LEAFLET_DIST_DIR]
//
// Screenshots: <screenshot.png> shows the fleet, <screenshot>-history.png a trip's history.
// Offline (the default, as this machine is) the page must fall back to its canvas. With
// --online the browser is given what it would fetch online: Leaflet from the CDN (served
// from LEAFLET_DIST_DIR, so the pinned hashes are checked too) and plain OpenStreetMap
// tiles; the page must then use Leaflet. CHROMIUM_PATH overrides /usr/bin/chromium.
import { launch, serveMapLocally, tilePng } from './chromium.mjs';

const args = process.argv.slice(2);
const [url, screenshot] = args;
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const wantTrucks = Number(opt('--trucks', 1));
const timeout = Number(opt('--timeout', 30000));
const settle = Number(opt('--settle', 0)); // ms to let trails grow before the screenshots
const online = opt('--online', null);
const wantRenderer = online ? 'leaflet' : 'canvas';
if (!url || !screenshot) {
  console.error('usage: node dashboard.mjs <url> <screenshot.png> [--trucks N] [--timeout MS] [--settle MS] [--online DIR]');
  process.exit(2);
}

const result = { url: url.replace(/token=[^&]+/, 'token=…'), errors: [], checks: {} };
const started = Date.now();
const browser = await launch();
let page;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(timeout);
  page.on('pageerror', (err) => result.errors.push(String(err)));
  if (online) {
    result.tilesServed = 0;
    await serveMapLocally(page, online, await tilePng(), () => { result.tilesServed++; });
  }

  await page.goto(url, { waitUntil: 'load' });
  // Trucks appear: the live socket is up and every simulated trip is listed with a position.
  await page.waitForFunction(
    (n) => document.body.dataset.ws === 'live'
      && document.querySelectorAll('#trips li[data-trip][data-lat]').length >= n,
    wantTrucks,
  );
  result.checks.appearedMs = Date.now() - started;
  const positions = () => page.$$eval('#trips li[data-trip]', (els) => els.map((el) => ({
    trip: el.dataset.trip, lat: Number(el.dataset.lat), lon: Number(el.dataset.lon), ts: Number(el.dataset.ts),
  })));
  const first = await positions();

  // Trucks move: every one reports again, and at least one has driven more than 10 m.
  const moved = async () => {
    const now = await positions();
    const before = new Map(first.map((p) => [p.trip, p]));
    let advanced = 0;
    let drove = 0;
    for (const p of now) {
      const b = before.get(p.trip);
      if (!b || p.ts <= b.ts) continue;
      advanced++;
      const dy = (p.lat - b.lat) * 111320;
      const dx = (p.lon - b.lon) * 111320 * Math.cos((p.lat * Math.PI) / 180);
      if (Math.hypot(dx, dy) > 10) drove++;
    }
    return { advanced, drove };
  };
  const deadline = Date.now() + timeout;
  let m = { advanced: 0, drove: 0 };
  while (Date.now() < deadline) {
    m = await moved();
    if (m.advanced >= wantTrucks && m.drove >= 1) break;
    await page.waitForTimeout(250);
  }
  result.checks.advanced = m.advanced;
  result.checks.drove = m.drove;
  result.checks.movedMs = Date.now() - started;

  // Offline the page keeps its canvas; online it switches to Leaflet once that loaded.
  await page.waitForFunction((r) => document.getElementById('map').dataset.renderer === r,
    wantRenderer, { timeout: 10000 }).catch(() => {});
  result.renderer = await page.$eval('#map', (el) => el.dataset.renderer);
  result.trucks = Number(await page.$eval('#map', (el) => el.dataset.trucks));
  if (online) {
    await page.waitForSelector('.leaflet-tile-loaded', { timeout: 10000 }).catch(() => {});
    result.checks.tilesLoaded = await page.$$eval('.leaflet-tile-loaded', (els) => els.length);
  }
  // The map really shows them: strongly coloured pixels (trucks and trails) on its canvas.
  const canvasSel = online ? '.leaflet-overlay-pane canvas' : '#canvas';
  result.checks.colouredPixels = await page.$eval(canvasSel, (c) => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) {
      const max = Math.max(d[i], d[i + 1], d[i + 2]);
      const min = Math.min(d[i], d[i + 1], d[i + 2]);
      if (d[i + 3] > 0 && max - min > 60) n++;
    }
    return n;
  }).catch((e) => { result.errors.push(`no map canvas: ${e.message.split('\n')[0]}`); return 0; });

  await page.waitForTimeout(settle);
  await page.screenshot({ path: screenshot });
  result.screenshots = [screenshot];

  // A click on a trip draws its history from the read API.
  const trip = first[0].trip;
  // A DOM click on that row's button: the list re-sorts as trucks report, so a click at the
  // row's position on screen may land on the row that took its place.
  await page.$eval(`#trips li[data-trip="${trip}"] button`, (b) => b.click());
  await page.waitForFunction(
    (t) => {
      const el = document.getElementById('map');
      return el.dataset.historyTrip === t && Number(el.dataset.historyPoints) > 0;
    },
    trip,
  );
  result.historyTrip = trip;
  result.historyPoints = Number(await page.$eval('#map', (el) => el.dataset.historyPoints));
  result.historyText = await page.$eval('#history', (el) => el.textContent);

  // The trip panel shows the trip's summary and offers it as GeoJSON and GPX downloads.
  await page.waitForFunction(() => Number(document.getElementById('history').dataset.summaryPings) > 0);
  result.summary = await page.$eval('#history', (el) => ({
    pings: Number(el.dataset.summaryPings),
    distanceM: Number(el.dataset.summaryDistance),
    fields: Object.fromEntries([...el.querySelectorAll('dd[data-field]')].map((d) => [d.dataset.field, d.textContent])),
  }));
  result.downloads = {};
  for (const format of ['geojson', 'gpx']) {
    const [download] = await Promise.all([
      page.waitForEvent('download'),
      page.click(`#history button[data-download="${format}"]`),
    ]);
    const { readFile } = await import('node:fs/promises');
    const text = await readFile(await download.path(), 'utf8');
    const info = { name: download.suggestedFilename(), bytes: text.length };
    if (format === 'geojson') {
      const doc = JSON.parse(text);
      info.type = doc.type;
      info.geometry = doc.geometry.type;
      info.points = doc.geometry.coordinates.length;
      info.times = doc.properties.times.length;
      info.tripId = doc.properties.tripId;
    } else {
      info.gpx11 = text.includes('<gpx version="1.1" creator="ingest" xmlns="http://www.topografix.com/GPX/1/1">');
      info.points = (text.match(/<trkpt /g) || []).length;
      info.complete = text.trimEnd().endsWith('</gpx>');
    }
    result.downloads[format] = info;
  }
  await page.mouse.move(0, 0); // no hover highlight in the picture
  await page.waitForTimeout(300); // one more frame with the history drawn
} catch (err) {
  result.errors.push(`check failed: ${err.message.split('\n')[0]}`);
} finally {
  if (page) {
    result.ws = await page.evaluate(() => document.body.dataset.ws).catch(() => null);
    // The fleet view went to <screenshot> above; the last state (the history, or whatever
    // a failed check left) goes beside it.
    const last = screenshot.replace(/(\.png)?$/, result.screenshots ? '-history.png' : '.png');
    await page.screenshot({ path: last }).catch((e) => result.errors.push(`screenshot: ${e}`));
    result.screenshots = [...(result.screenshots || []), last];
  }
  await browser.close();
}
result.elapsedMs = Date.now() - started;
const ok = result.errors.length === 0 && result.checks.advanced >= wantTrucks && result.checks.drove >= 1
  && result.historyPoints > 0 && result.renderer === wantRenderer
  && result.summary?.pings > 0 && result.downloads?.gpx?.points > 0 && result.downloads?.geojson?.points > 0;
result.ok = ok;
console.log(JSON.stringify(result));
process.exit(ok ? 0 : 1);
