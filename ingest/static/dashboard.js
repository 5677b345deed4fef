// The dispatch dashboard (see index.html). Plain browser JavaScript, no build step.
(() => {
  'use strict';

  const TRAIL_MS = 2 * 60 * 1000; // a truck's trail: its last two minutes
  const TRAIL_MAX = 150;
  const HISTORY_PAGE = 1000;
  const HISTORY_MAX = 20000; // points drawn for one trip's history
  const STALE_MS = 60 * 1000;
  const LOST_MS = 10 * 60 * 1000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const LEAFLET_TIMEOUT_MS = 4000;
  const FENCES_REFRESH_MS = 60 * 1000; // fences made or deleted elsewhere show up within a minute
  const EVENTS_MAX = 100; // geofence events kept in the panel
  const BACKFILL_MS = 60 * 60 * 1000; // on load, each fence's events of the last hour
  const BACKFILL_PAGES = 5; // pages of 1000 per fence, at most
  const BACKFILL_PARALLEL = 4; // fences read at once
  const FENCE_INK = '#6a32c9';
  const FENCE_FILL = 'rgba(106, 50, 201, 0.12)';
  const LABEL_MAX = 40; // characters of a fence's name drawn on the canvas
  // Leaflet 1.9.4 from a CDN, pinned by hash.
  const LEAFLET = {
    js: 'https://unpkg.com/leaflet@1.9.4/dist/leaflet.js',
    jsHash: 'sha256-20nQCchB9co0qIjJZRGuk2/Z9VM+kNiyxNV1lvTlZBo=',
    css: 'https://unpkg.com/leaflet@1.9.4/dist/leaflet.css',
    cssHash: 'sha256-p4NxAoJBhIIN+hmNHrzRCf9tD/miZyoHS5obTRR9BMY=',
    tiles: 'https://tile.openstreetmap.org/{z}/{x}/{y}.png',
  };

  const $ = (id) => document.getElementById(id);
  const mapEl = $('map');
  const listEl = $('trips');
  const eventsEl = $('events');
  const params = new URLSearchParams(location.search);

  // --- token ----------------------------------------------------------------------------

  let token = params.get('token') || sessionStorage.getItem('ingest.token') || '';
  if (!token) token = (window.prompt('Dispatcher token (JWT)') || '').trim();
  if (token) sessionStorage.setItem('ingest.token', token);

  function claims(jwt) {
    try {
      const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(atob(part));
    } catch (_) {
      return {};
    }
  }
  const me = claims(token);
  $('who').textContent = me.org ? `org ${me.org} · ${me.sub || ''}` : '';

  // --- state ----------------------------------------------------------------------------

  /** tripId -> {tripId, driverId, loc, trail: [point], el} ; point = {lat, lon, ts, ...} */
  const trips = new Map();
  /** The trip whose history is drawn: {tripId, points, loading} or null. */
  let selected = null;
  let dirty = true;
  /** id -> fence (see toFence). Replaced, never changed in place, when the set changes: a
   * renderer knows it drew the current set by comparing the Map it drew. */
  let fences = new Map();
  let fencesJson = '';
  /** Geofence events, newest first, at most EVENTS_MAX: {key, geofenceId, event, tripId,
   * driverId, ts, el}; eventKeys holds their keys (live and backfilled copies meet). */
  let events = [];
  let eventKeys = new Set();

  function toPoint(l) {
    return {
      lat: l.latitude, lon: l.longitude, ts: Date.parse(l.timestamp),
      speed: l.speed, heading: l.heading, accuracy: l.accuracy,
    };
  }

  function insertSorted(points, p) {
    let i = points.length;
    while (i > 0 && points[i - 1].ts > p.ts) i--;
    if (i > 0 && points[i - 1].ts === p.ts) return; // already have it
    points.splice(i, 0, p);
  }

  /** New locations of a trip, in any order; a late (older) one never moves the truck back. */
  function apply(tripId, driverId, locations) {
    let t = trips.get(tripId);
    if (!t) {
      t = { tripId, driverId, loc: null, trail: [], el: null };
      trips.set(tripId, t);
    }
    if (driverId) t.driverId = driverId;
    for (const l of locations) {
      const p = toPoint(l);
      if (!Number.isFinite(p.ts) || !Number.isFinite(p.lat) || !Number.isFinite(p.lon)) continue;
      insertSorted(t.trail, p);
      if (!t.loc || p.ts >= t.loc.ts) t.loc = p;
      if (selected && selected.tripId === tripId && !selected.loading) {
        insertSorted(selected.points, p);
      }
    }
    if (!t.loc) return;
    const cutoff = t.loc.ts - TRAIL_MS;
    while (t.trail.length && (t.trail[0].ts < cutoff || t.trail.length > TRAIL_MAX)) t.trail.shift();
    dirty = true;
  }

  /** A stable colour per trip: FNV-1a of the id, spread around the wheel by the golden angle. */
  function colorOf(tripId) {
    let h = 0x811c9dc5;
    for (let i = 0; i < tripId.length; i++) h = Math.imul(h ^ tripId.charCodeAt(i), 0x01000193) >>> 0;
    return `hsl(${Math.round((h * 137.508) % 360)}, 70%, 42%)`;
  }

  // --- trip list ------------------------------------------------------------------------

  function age(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    return `${Math.floor(s / 3600)} h ago`;
  }

  function renderList() {
    const now = Date.now();
    const rows = [...trips.values()].filter((t) => t.loc).sort((a, b) => b.loc.ts - a.loc.ts);
    $('trip-count').textContent = String(rows.length);
    $('empty').hidden = rows.length > 0;
    rows.forEach((t, i) => {
      if (!t.el) t.el = makeRow(t);
      const el = t.el;
      const d = el.dataset;
      d.driver = t.driverId || '';
      d.lat = t.loc.lat.toFixed(6);
      d.lon = t.loc.lon.toFixed(6);
      d.ts = String(t.loc.ts);
      const since = now - t.loc.ts;
      el.querySelector('.age').textContent = age(since);
      const kmh = Number.isFinite(t.loc.speed) ? `${Math.round(t.loc.speed * 3.6)} km/h` : '–';
      el.querySelector('.meta').textContent = `${t.driverId || '?'} · ${kmh}`;
      el.classList.toggle('stale', since > STALE_MS && since <= LOST_MS);
      el.classList.toggle('lost', since > LOST_MS);
      el.classList.toggle('selected', !!selected && selected.tripId === t.tripId);
      if (listEl.children[i] !== el) listEl.insertBefore(el, listEl.children[i] || null);
    });
  }

  function makeRow(t) {
    const li = document.createElement('li');
    li.dataset.trip = t.tripId;
    const b = document.createElement('button');
    b.type = 'button';
    const dot = document.createElement('span');
    dot.className = 'dot';
    dot.style.background = colorOf(t.tripId);
    const name = document.createElement('span');
    name.className = 'trip';
    name.textContent = t.tripId;
    name.title = t.tripId;
    const ageEl = document.createElement('span');
    ageEl.className = 'age';
    const meta = document.createElement('span');
    meta.className = 'meta';
    b.append(dot, name, ageEl, meta);
    b.addEventListener('click', () => select(t.tripId));
    li.append(b);
    return li;
  }

  // --- history --------------------------------------------------------------------------

  async function select(tripId) {
    if (selected && selected.tripId === tripId) { // a second click clears it
      selected = null;
      showHistory(null);
      return;
    }
    const mine = { tripId, points: [], loading: true, summary: null };
    selected = mine;
    showHistory('loading…');
    loadSummary(mine);
    const points = [];
    let cursor = null;
    try {
      do {
        const url = tripUrl(tripId, 'locations');
        url.searchParams.set('limit', String(HISTORY_PAGE));
        if (cursor) url.searchParams.set('cursor', cursor);
        const page = await (await getOk(url)).json();
        for (const l of page.locations) points.push(toPoint(l));
        cursor = page.nextCursor;
      } while (cursor && points.length < HISTORY_MAX && selected === mine);
    } catch (err) {
      if (selected === mine) showHistory(`history unavailable: ${err.message}`, true);
      mine.loading = false;
      return;
    }
    if (selected !== mine) return; // another trip was clicked meanwhile
    const t = trips.get(tripId);
    for (const p of t ? t.trail : []) insertSorted(points, p); // live points seen meanwhile
    mine.points = points;
    mine.loading = false;
    renderer.fitTo(points);
    showHistory(null);
  }

  function tripUrl(tripId, tail) {
    return new URL(`api/v1/tracking/trips/${encodeURIComponent(tripId)}/${tail}`, location.href);
  }

  async function getOk(url) {
    const r = await fetch(url, { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(`HTTP ${r.status} ${body.error || ''} ${body.detail || ''}`.trim());
    }
    return r;
  }

  /** The trip's summary (GET .../summary), shown in the panel once it and the history came. */
  async function loadSummary(mine) {
    try {
      mine.summary = await (await getOk(tripUrl(mine.tripId, 'summary'))).json();
    } catch (err) {
      mine.summary = { error: err.message };
    }
    if (selected === mine && !mine.loading) showHistory(null);
  }

  /** The whole trip as a file (?format=geojson|gpx), fetched with the token, saved by the browser. */
  async function download(tripId, format, button) {
    button.disabled = true;
    try {
      const url = tripUrl(tripId, 'locations');
      url.searchParams.set('format', format);
      const blob = await (await getOk(url)).blob();
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = `${tripId.replace(/[^A-Za-z0-9._-]/g, '_')}.${format}`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    } catch (err) {
      button.title = `download failed: ${err.message}`;
      button.classList.add('failed');
    } finally {
      button.disabled = false;
    }
  }

  function duration(s) {
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function distance(m) {
    return m < 1000 ? `${Math.round(m)} m` : `${(m / 1000).toFixed(1)} km`;
  }

  function summaryView(tripId, sum) {
    const wrap = document.createElement('div');
    wrap.className = 'summary';
    if (!sum) {
      wrap.textContent = 'summary: loading…';
      return wrap;
    }
    if (sum.error) {
      wrap.textContent = `summary unavailable: ${sum.error}`;
      return wrap;
    }
    const kmh = (v) => (Number.isFinite(v) ? `${Math.round(v * 3.6)} km/h` : '–');
    const rows = [
      ['distance', distance(sum.distanceM)], ['duration', duration(sum.durationS)],
      ['pings', String(sum.pings)], ['average', kmh(sum.avgSpeed)], ['top', kmh(sum.maxSpeed)],
      ['stops', `${sum.stops.length}${sum.stopsTruncated ? '+' : ''}`],
    ];
    const dl = document.createElement('dl');
    for (const [k, v] of rows) {
      const dt = document.createElement('dt');
      dt.textContent = k;
      const dd = document.createElement('dd');
      dd.textContent = v;
      dd.dataset.field = k;
      dl.append(dt, dd);
    }
    const buttons = document.createElement('div');
    buttons.className = 'downloads';
    for (const format of ['geojson', 'gpx']) {
      const b = document.createElement('button');
      b.type = 'button';
      b.dataset.download = format;
      b.textContent = `${format === 'gpx' ? 'GPX' : 'GeoJSON'} ↓`;
      b.addEventListener('click', () => download(tripId, format, b));
      buttons.append(b);
    }
    wrap.append(dl, buttons);
    return wrap;
  }

  function showHistory(message, isError) {
    const box = $('history');
    mapEl.dataset.historyTrip = selected ? selected.tripId : '';
    mapEl.dataset.historyPoints = selected && !selected.loading ? String(selected.points.length) : '0';
    const sum = selected && selected.summary && !selected.summary.error ? selected.summary : null;
    box.dataset.summaryPings = sum ? String(sum.pings) : '';
    box.dataset.summaryDistance = sum ? String(sum.distanceM) : '';
    if (!selected) {
      box.hidden = true;
    } else {
      box.hidden = false;
      box.classList.toggle('error', !!isError);
      if (message) {
        box.textContent = `${selected.tripId}: ${message}`;
      } else {
        const pts = selected.points;
        const span = pts.length > 1 ? age(pts[pts.length - 1].ts - pts[0].ts).replace(' ago', '') : '0 s';
        const head = document.createElement('div');
        head.textContent = `${selected.tripId}: ${pts.length} points over ${span}, ${distance(pathLength(pts))}`;
        box.replaceChildren(head, summaryView(selected.tripId, selected.summary));
      }
    }
    dirty = true;
    renderList();
  }

  function metres(a, b) {
    const k = Math.PI / 180;
    const x = (b.lon - a.lon) * k * Math.cos(((a.lat + b.lat) / 2) * k);
    const y = (b.lat - a.lat) * k;
    return Math.hypot(x, y) * 6371000;
  }

  function pathLength(points) {
    let m = 0;
    for (let i = 1; i < points.length; i++) m += metres(points[i - 1], points[i]);
    return m;
  }

  // --- geofences and their events -------------------------------------------------------

  /** A fence from GET /api/v1/geofences as the renderers draw it: a polygon's rings (the
   * exterior, then holes) or a circle's centre and radius; its box, and where its name goes. */
  function toFence(f) {
    const g = f.geometry || {};
    const k = Math.PI / 180;
    if (g.type === 'Polygon' && Array.isArray(g.coordinates) && g.coordinates.length) {
      const rings = g.coordinates.map((ring) => ring.map(([lon, lat]) => ({ lat, lon })));
      let s = 90, n = -90, w = 180, e = -180;
      for (const p of rings[0]) {
        s = Math.min(s, p.lat); n = Math.max(n, p.lat);
        w = Math.min(w, p.lon); e = Math.max(e, p.lon);
      }
      const box = { s, w, n, e };
      return { id: f.id, name: f.name, rings, box, label: { lat: (s + n) / 2, lon: (w + e) / 2 } };
    }
    if (g.type === 'Point' && Array.isArray(g.coordinates) && Number.isFinite(f.radiusM)) {
      const [lon, lat] = g.coordinates;
      const dLat = f.radiusM / 111320;
      const dLon = dLat / Math.max(0.01, Math.cos(lat * k));
      const box = { s: lat - dLat, w: lon - dLon, n: lat + dLat, e: lon + dLon };
      return { id: f.id, name: f.name, center: { lat, lon }, radiusM: f.radiusM, box, label: { lat, lon } };
    }
    return null; // a shape this page does not know: not drawn
  }

  /** Two corners of each fence's box: what the map fits to while no truck is live. */
  function fenceCorners() {
    const out = [];
    for (const f of fences.values()) out.push({ lat: f.box.s, lon: f.box.w }, { lat: f.box.n, lon: f.box.e });
    return out;
  }

  /** The fence's name for a map label: a text node's content, never markup. */
  function fenceLabel(f) {
    const span = document.createElement('span');
    span.textContent = f.name;
    span.dataset.geofenceId = f.id;
    return span;
  }

  /** Reads the org's fences; keeps the ones drawn when that fails. True when read. */
  async function loadFences() {
    let body;
    try {
      body = await (await getOk(new URL('api/v1/geofences', location.href))).json();
    } catch (err) {
      console.warn('geofences:', err.message);
      return false;
    }
    const json = JSON.stringify(body.geofences || []);
    if (json === fencesJson) return true;
    const next = new Map();
    for (const f of body.geofences || []) {
      const fence = toFence(f);
      if (fence) next.set(fence.id, fence);
    }
    fences = next;
    fencesJson = json;
    dirty = true;
    return true;
  }

  /** Events from the socket or the events endpoint, in any order and repeated: each kept once. */
  function addEvents(list) {
    let added = false;
    for (const e of list) {
      const ts = Date.parse(e.timestamp);
      if (!Number.isFinite(ts) || (e.event !== 'enter' && e.event !== 'exit')) continue;
      const key = `${e.geofenceId} ${e.tripId} ${e.event} ${ts}`;
      if (eventKeys.has(key)) continue;
      eventKeys.add(key);
      events.push({
        key, ts, geofenceId: e.geofenceId, event: e.event, tripId: e.tripId,
        driverId: e.driverId || '', name: e.geofenceName || null, el: null,
      });
      added = true;
    }
    if (!added) return;
    events.sort((a, b) => b.ts - a.ts);
    if (events.length > EVENTS_MAX) {
      events = events.slice(0, EVENTS_MAX);
      eventKeys = new Set(events.map((e) => e.key));
    }
    renderEvents();
  }

  /** Rows moved in place, as the trip list's are: a focused one stays focused. */
  function renderEvents() {
    events.forEach((e, i) => {
      if (!e.el) e.el = makeEventRow(e);
      if (eventsEl.children[i] !== e.el) eventsEl.insertBefore(e.el, eventsEl.children[i] || null);
    });
    while (eventsEl.children.length > events.length) eventsEl.lastElementChild.remove();
    $('event-count').textContent = String(events.length);
    $('events-empty').hidden = events.length > 0;
  }

  function makeEventRow(e) {
    const li = document.createElement('li');
    li.className = e.event;
    Object.assign(li.dataset, {
      geofenceId: e.geofenceId, event: e.event, trip: e.tripId, driver: e.driverId, ts: String(e.ts),
    });
    const b = document.createElement('button');
    b.type = 'button';
    const time = document.createElement('span');
    time.className = 'time';
    time.textContent = new Date(e.ts).toLocaleTimeString();
    time.title = new Date(e.ts).toISOString();
    const kind = document.createElement('span');
    kind.className = 'kind';
    kind.textContent = e.event;
    const fence = document.createElement('span');
    fence.className = 'fence';
    // The live message names the fence; a backfilled event has only the id.
    const known = fences.get(e.geofenceId);
    fence.textContent = e.name || (known ? known.name : e.geofenceId);
    fence.title = fence.textContent;
    const meta = document.createElement('span');
    meta.className = 'meta';
    meta.textContent = `${e.tripId} · ${e.driverId || '?'}`;
    b.append(time, kind, fence, meta);
    // Shows the trip's history; unlike the trip list, a second click does not clear it.
    b.addEventListener('click', () => { if (!selected || selected.tripId !== e.tripId) select(e.tripId); });
    li.append(b);
    return li;
  }

  /** Each fence's events of the last hour, merged into the panel (live ones may come first). */
  let backfilling = false;
  async function backfillEvents() {
    if (backfilling) return;
    backfilling = true;
    const from = new Date(Date.now() - BACKFILL_MS).toISOString();
    const ids = [...fences.keys()];
    const found = [];
    const worker = async () => {
      while (ids.length) {
        const id = ids.shift();
        const mine = [];
        let cursor = null;
        let pages = 0;
        try {
          do { // oldest first: a fence busier than BACKFILL_PAGES pages an hour misses its newest
            const url = new URL(`api/v1/geofences/${encodeURIComponent(id)}/events`, location.href);
            url.searchParams.set('from', from);
            url.searchParams.set('limit', '1000');
            if (cursor) url.searchParams.set('cursor', cursor);
            const page = await (await getOk(url)).json();
            mine.push(...page.events);
            cursor = page.nextCursor;
          } while (cursor && ++pages < BACKFILL_PAGES);
        } catch (err) {
          console.warn('geofence events:', id, err.message);
        }
        found.push(...mine.slice(-EVENTS_MAX));
      }
    };
    try {
      await Promise.all(Array.from({ length: BACKFILL_PARALLEL }, worker));
      addEvents(found);
    } finally {
      backfilling = false;
    }
  }

  /** The fences, and with events also the last hour's events: on load and after a reconnect
   * (events sent while the socket was down are not sent again). */
  async function refreshGeofences(withEvents) {
    if (await loadFences() && withEvents) await backfillEvents();
  }

  // --- canvas map (offline) -------------------------------------------------------------

  /** Positions on a plain canvas: equirectangular around the view centre, drag to pan,
   * wheel to zoom, double-click to follow the fleet again. */
  class CanvasMap {
    constructor(canvas) {
      this.canvas = canvas;
      this.ctx = canvas.getContext('2d');
      this.view = null; // {lat, lon, mpp: metres per CSS pixel}
      this.follow = true; // refit to the fleet until the user pans or zooms
      this.hits = [];
      this.fencesShown = null; // the fences Map last drawn
      this.resize();
      this.bindInput();
    }

    resize() {
      const dpr = window.devicePixelRatio || 1;
      this.w = this.canvas.clientWidth || 1;
      this.h = this.canvas.clientHeight || 1;
      this.canvas.width = Math.round(this.w * dpr);
      this.canvas.height = Math.round(this.h * dpr);
      this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      dirty = true;
    }

    bindInput() {
      const c = this.canvas;
      let drag = null;
      c.addEventListener('pointerdown', (e) => {
        drag = { x: e.clientX, y: e.clientY, moved: false };
        c.setPointerCapture(e.pointerId);
      });
      c.addEventListener('pointermove', (e) => {
        if (!drag || !this.view) return;
        const dx = e.clientX - drag.x;
        const dy = e.clientY - drag.y;
        if (!drag.moved && Math.hypot(dx, dy) < 4) return;
        drag.moved = true;
        c.classList.add('dragging');
        this.follow = false;
        this.pan(-dx, -dy);
        drag.x = e.clientX;
        drag.y = e.clientY;
      });
      c.addEventListener('pointerup', (e) => {
        c.classList.remove('dragging');
        if (drag && !drag.moved) this.click(e);
        drag = null;
      });
      c.addEventListener('wheel', (e) => {
        if (!this.view) return;
        e.preventDefault();
        this.follow = false;
        const r = c.getBoundingClientRect();
        const f = Math.exp(e.deltaY * 0.0015);
        const px = e.offsetX - r.width / 2;
        const py = e.offsetY - r.height / 2;
        this.pan(px, py);
        this.view.mpp = Math.min(20000, Math.max(0.2, this.view.mpp * f));
        this.pan(-px, -py);
      }, { passive: false });
      c.addEventListener('dblclick', () => { this.follow = true; this.view = null; dirty = true; });
    }

    pan(dx, dy) {
      const v = this.view;
      v.lat -= (dy * v.mpp) / 111320;
      v.lon += (dx * v.mpp) / (111320 * Math.cos((v.lat * Math.PI) / 180));
      dirty = true;
    }

    click(e) {
      const r = this.canvas.getBoundingClientRect();
      const x = e.clientX - r.left;
      const y = e.clientY - r.top;
      let best = null;
      for (const h of this.hits) {
        const d = Math.hypot(h.x - x, h.y - y);
        if (d < 14 && (!best || d < best.d)) best = { d, tripId: h.tripId };
      }
      if (best) select(best.tripId);
    }

    project(lat, lon) {
      const v = this.view;
      const x = ((lon - v.lon) * 111320 * Math.cos((v.lat * Math.PI) / 180)) / v.mpp;
      const y = ((lat - v.lat) * 111320) / v.mpp;
      return [this.w / 2 + x, this.h / 2 - y];
    }

    fitTo(points) {
      if (!points.length) return;
      let s = 90, n = -90, w = 180, e = -180;
      for (const p of points) {
        s = Math.min(s, p.lat); n = Math.max(n, p.lat);
        w = Math.min(w, p.lon); e = Math.max(e, p.lon);
      }
      const lat = (s + n) / 2;
      const spanX = (e - w) * 111320 * Math.cos((lat * Math.PI) / 180);
      const spanY = (n - s) * 111320;
      const pad = 40;
      const mpp = Math.max(spanX / Math.max(1, this.w - 2 * pad), spanY / Math.max(1, this.h - 2 * pad), 1);
      this.view = { lat, lon: (w + e) / 2, mpp };
      this.follow = false;
      dirty = true;
    }

    /** Refit when a truck leaves the view or the view is far larger than the fleet. */
    followFleet(points) {
      if (!points.length) return;
      if (!this.view) { this.fitTo(points); this.follow = true; return; }
      const out = points.some((p) => {
        const [x, y] = this.project(p.lat, p.lon);
        return x < 20 || y < 20 || x > this.w - 20 || y > this.h - 20;
      });
      const saved = this.view;
      this.fitTo(points);
      const tooLoose = saved.mpp > this.view.mpp * 3;
      if (!out && !tooLoose) this.view = saved;
      this.follow = true;
    }

    draw() {
      const ctx = this.ctx;
      const live = [...trips.values()].filter((t) => t.loc);
      // The fleet; with no truck live yet, the fences.
      if (this.follow) this.followFleet(live.length ? live.map((t) => t.loc) : fenceCorners());
      ctx.fillStyle = '#e8ecf1';
      ctx.fillRect(0, 0, this.w, this.h);
      this.fencesShown = null;
      if (!this.view) return;
      this.drawGrid();
      this.drawFences();
      if (selected && selected.points.length) {
        this.line(selected.points, '#1d2330', 4, 0.75);
        const a = selected.points[0];
        const [x, y] = this.project(a.lat, a.lon);
        ctx.fillStyle = '#1d2330';
        ctx.fillRect(x - 4, y - 4, 8, 8); // the trip's start
      }
      for (const t of live) this.line(t.trail, colorOf(t.tripId), 2.5, 0.55);
      this.hits = [];
      for (const t of live) {
        const [x, y] = this.project(t.loc.lat, t.loc.lon);
        this.hits.push({ x, y, tripId: t.tripId });
        this.truck(x, y, t);
      }
    }

    drawGrid() {
      const ctx = this.ctx;
      const v = this.view;
      // Grid lines at a round distance, about every 120 px, and a matching scale bar.
      const target = v.mpp * 120;
      const pow = 10 ** Math.floor(Math.log10(target));
      const step = [1, 2, 5, 10].map((k) => k * pow).find((s) => s >= target) || target;
      const mPerDegLon = 111320 * Math.cos((v.lat * Math.PI) / 180);
      ctx.strokeStyle = '#d3d9e2';
      ctx.lineWidth = 1;
      ctx.beginPath();
      const xc = v.lon * mPerDegLon;
      const halfW = (this.w / 2) * v.mpp;
      for (let X = Math.floor((xc - halfW) / step) * step; X <= xc + halfW; X += step) {
        const x = this.w / 2 + (X - xc) / v.mpp;
        ctx.moveTo(x, 0);
        ctx.lineTo(x, this.h);
      }
      const yc = v.lat * 111320;
      const halfH = (this.h / 2) * v.mpp;
      for (let Y = Math.floor((yc - halfH) / step) * step; Y <= yc + halfH; Y += step) {
        const y = this.h / 2 - (Y - yc) / v.mpp;
        ctx.moveTo(0, y);
        ctx.lineTo(this.w, y);
      }
      ctx.stroke();
      const len = step / v.mpp;
      ctx.strokeStyle = '#1d2330';
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.moveTo(12, this.h - 14);
      ctx.lineTo(12 + len, this.h - 14);
      ctx.stroke();
      ctx.fillStyle = '#1d2330';
      ctx.font = '11px system-ui, sans-serif';
      ctx.fillText(step >= 1000 ? `${step / 1000} km` : `${step} m`, 12, this.h - 20);
    }

    /** Every fence, on the same projection as the trucks: polygons with their holes (even-odd
     * fill), circles to scale (an ellipse, as the projection stretches longitude by the
     * view's latitude, not the circle's); then the names, above all shapes. */
    drawFences() {
      const ctx = this.ctx;
      const k = Math.PI / 180;
      ctx.save();
      ctx.strokeStyle = FENCE_INK;
      ctx.fillStyle = FENCE_FILL;
      ctx.lineWidth = 2;
      for (const f of fences.values()) {
        ctx.beginPath();
        if (f.rings) {
          for (const ring of f.rings) {
            ring.forEach((p, i) => {
              const [x, y] = this.project(p.lat, p.lon);
              if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
            });
            ctx.closePath();
          }
        } else {
          const [x, y] = this.project(f.center.lat, f.center.lon);
          const ry = f.radiusM / this.view.mpp;
          const rx = (ry * Math.cos(this.view.lat * k)) / Math.max(0.01, Math.cos(f.center.lat * k));
          ctx.ellipse(x, y, rx, ry, 0, 0, 2 * Math.PI);
        }
        ctx.fill('evenodd');
        ctx.stroke();
      }
      ctx.font = '600 12px system-ui, sans-serif';
      ctx.textAlign = 'center';
      ctx.lineWidth = 3;
      ctx.strokeStyle = 'rgba(255,255,255,.85)';
      ctx.fillStyle = FENCE_INK;
      for (const f of fences.values()) {
        const [x, y] = this.project(f.label.lat, f.label.lon);
        const name = f.name.length > LABEL_MAX ? `${f.name.slice(0, LABEL_MAX - 1)}…` : f.name;
        ctx.strokeText(name, x, y);
        ctx.fillText(name, x, y);
      }
      ctx.restore();
      this.fencesShown = fences;
    }

    line(points, color, width, alpha) {
      if (points.length < 2) return;
      const ctx = this.ctx;
      ctx.save();
      ctx.globalAlpha = alpha;
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.lineJoin = 'round';
      ctx.lineCap = 'round';
      ctx.beginPath();
      points.forEach((p, i) => {
        const [x, y] = this.project(p.lat, p.lon);
        if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      });
      ctx.stroke();
      ctx.restore();
    }

    truck(x, y, t) {
      const ctx = this.ctx;
      const isSel = selected && selected.tripId === t.tripId;
      ctx.save();
      ctx.translate(x, y);
      if (Number.isFinite(t.loc.heading)) { // an arrow along the heading
        ctx.save();
        ctx.rotate((t.loc.heading * Math.PI) / 180);
        ctx.fillStyle = colorOf(t.tripId);
        ctx.beginPath();
        ctx.moveTo(0, -13);
        ctx.lineTo(5, -5);
        ctx.lineTo(-5, -5);
        ctx.closePath();
        ctx.fill();
        ctx.restore();
      }
      ctx.fillStyle = colorOf(t.tripId);
      ctx.strokeStyle = isSel ? '#1d2330' : '#fff';
      ctx.lineWidth = isSel ? 3 : 2;
      ctx.beginPath();
      ctx.arc(0, 0, 6.5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
      ctx.font = '11px system-ui, sans-serif';
      ctx.lineWidth = 3;
      ctx.strokeStyle = 'rgba(255,255,255,.85)';
      const label = t.driverId || t.tripId;
      ctx.strokeText(label, 9, 4);
      ctx.fillStyle = '#1d2330';
      ctx.fillText(label, 9, 4);
      ctx.restore();
    }
  }

  // --- Leaflet map (online) -------------------------------------------------------------

  class LeafletMap {
    constructor(host, onFail) {
      this.map = L.map(host, { preferCanvas: true, zoomControl: true });
      this.map.setView([0, 0], 2);
      this.layers = new Map(); // tripId -> {marker, trail}
      this.history = null;
      this.fitted = false;
      this.fencesFitted = false;
      // Fences in a pane of their own under the trails and trucks (overlayPane is 400), drawn
      // on their own canvas; rebuilt whenever the set changes.
      this.map.createPane('fences').style.zIndex = 350;
      this.fenceRenderer = L.canvas({ pane: 'fences' });
      this.fenceLayer = L.layerGroup().addTo(this.map);
      this.fencesShown = null;
      let loaded = 0;
      let failed = 0;
      L.tileLayer(LEAFLET.tiles, {
        maxZoom: 19,
        attribution: '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors',
      })
        .on('tileload', () => { loaded++; })
        .on('tileerror', () => { if (++failed >= 6 && loaded === 0) onFail(); })
        .addTo(this.map);
    }

    resize() { this.map.invalidateSize(); }

    fitTo(points) {
      if (!points.length) return;
      this.map.fitBounds(L.latLngBounds(points.map((p) => [p.lat, p.lon])), { padding: [30, 30], maxZoom: 17 });
      this.fitted = true;
    }

    draw() {
      const live = [...trips.values()].filter((t) => t.loc);
      if (!this.fitted && live.length) this.fitTo(live.map((t) => t.loc));
      if (this.fencesShown !== fences) this.drawFences();
      if (!this.fitted && !this.fencesFitted && fences.size) { // no truck yet: show the fences
        this.map.fitBounds(L.latLngBounds(fenceCorners().map((p) => [p.lat, p.lon])), { padding: [30, 30], maxZoom: 17 });
        this.fencesFitted = true;
      }
      for (const t of live) {
        let l = this.layers.get(t.tripId);
        const color = colorOf(t.tripId);
        if (!l) {
          l = {
            trail: L.polyline([], { color, weight: 3, opacity: 0.6 }).addTo(this.map),
            marker: L.circleMarker([t.loc.lat, t.loc.lon], {
              radius: 7, color: '#fff', weight: 2, fillColor: color, fillOpacity: 1,
            }).addTo(this.map),
          };
          l.marker.on('click', () => select(t.tripId));
          l.marker.bindTooltip(`${t.tripId} · ${t.driverId || ''}`);
          this.layers.set(t.tripId, l);
        }
        l.marker.setLatLng([t.loc.lat, t.loc.lon]);
        l.trail.setLatLngs(t.trail.map((p) => [p.lat, p.lon]));
        const isSel = selected && selected.tripId === t.tripId;
        l.marker.setStyle({ color: isSel ? '#1d2330' : '#fff', weight: isSel ? 3 : 2 });
      }
      const pts = selected ? selected.points.map((p) => [p.lat, p.lon]) : [];
      if (!this.history) this.history = L.polyline([], { color: '#1d2330', weight: 4, opacity: 0.7 }).addTo(this.map);
      this.history.setLatLngs(pts);
    }

    /** Polygons with their holes, circles in metres; not clickable, so a click on a truck
     * inside a fence still selects it. The name is a permanent label made of a text node
     * (a string would be set as HTML). */
    drawFences() {
      this.fenceLayer.clearLayers();
      const style = {
        pane: 'fences', renderer: this.fenceRenderer, interactive: false,
        color: FENCE_INK, weight: 2, fillColor: FENCE_INK, fillOpacity: 0.12,
      };
      for (const f of fences.values()) {
        const shape = f.rings
          ? L.polygon(f.rings.map((ring) => ring.map((p) => [p.lat, p.lon])), style)
          : L.circle([f.center.lat, f.center.lon], { ...style, radius: f.radiusM });
        shape.bindTooltip(fenceLabel(f), { permanent: true, direction: 'center', className: 'fence-label' });
        this.fenceLayer.addLayer(shape);
      }
      this.fencesShown = fences;
    }

    destroy() { this.map.remove(); }
  }

  // --- choosing the renderer ------------------------------------------------------------

  const canvasMap = new CanvasMap($('canvas'));
  let renderer = canvasMap;

  function useRenderer(kind) {
    mapEl.dataset.renderer = kind;
    $('renderer-label').textContent = kind === 'leaflet' ? 'OpenStreetMap' : 'offline map';
    $('map-note').textContent = kind === 'leaflet' ? '' : 'offline: positions only, no map tiles · drag, scroll, double-click to follow';
    $('canvas').hidden = kind !== 'canvas';
    $('leaflet').hidden = kind !== 'leaflet';
    dirty = true;
  }
  useRenderer('canvas');

  function loadLeaflet() {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('timeout')), LEAFLET_TIMEOUT_MS);
      const css = document.createElement('link');
      css.rel = 'stylesheet';
      css.href = LEAFLET.css;
      css.integrity = LEAFLET.cssHash;
      css.crossOrigin = '';
      document.head.append(css);
      const js = document.createElement('script');
      js.src = LEAFLET.js;
      js.integrity = LEAFLET.jsHash;
      js.crossOrigin = '';
      js.onload = () => { clearTimeout(timer); resolve(); };
      js.onerror = () => { clearTimeout(timer); reject(new Error('unreachable')); };
      document.head.append(js);
    });
  }

  if (params.get('map') !== 'canvas' && navigator.onLine !== false) {
    loadLeaflet().then(() => {
      if (!window.L) return;
      $('leaflet').hidden = false;
      const fallBack = () => { // Leaflet came, tiles do not: back to the canvas
        if (renderer === canvasMap) return;
        renderer.destroy();
        renderer = canvasMap;
        useRenderer('canvas');
        canvasMap.resize();
      };
      renderer = new LeafletMap($('leaflet'), fallBack);
      useRenderer('leaflet');
      renderer.resize();
    }).catch(() => { /* offline: the canvas stays */ });
  }

  new ResizeObserver(() => renderer.resize()).observe(mapEl);

  let fencesMirrored = null; // the fences the #map attributes describe

  function frame() {
    if (dirty) {
      dirty = false;
      renderer.draw();
      mapEl.dataset.trucks = String([...trips.values()].filter((t) => t.loc).length);
      if (renderer.fencesShown !== fencesMirrored) {
        fencesMirrored = renderer.fencesShown;
        mapEl.dataset.fenceCount = String(fencesMirrored ? fencesMirrored.size : 0);
        mapEl.dataset.fenceIds = fencesMirrored ? [...fencesMirrored.keys()].join(' ') : '';
      }
      renderList();
    }
    requestAnimationFrame(frame);
  }
  requestAnimationFrame(frame);
  setInterval(() => renderList(), 1000); // last-seen ages tick on

  // --- live WebSocket -------------------------------------------------------------------

  let socket = null;
  let backoff = BACKOFF_MIN_MS;
  let retryTimer = null;
  let rejected = false;
  let subscribedBefore = false;

  function setStatus(state, text) {
    document.body.dataset.ws = state;
    $('status').textContent = text;
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (rejected || (socket && socket.readyState <= WebSocket.OPEN)) return;
    const url = new URL('api/v1/live', location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('access_token', token);
    setStatus(socket ? 'reconnecting' : 'connecting', 'connecting…');
    const ws = new WebSocket(url);
    socket = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      ws.send(JSON.stringify({ type: 'subscribe', fleet: true }));
    };
    ws.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      if (m.type === 'locations') apply(m.tripId, m.driverId, m.locations || []);
      else if (m.type === 'snapshot') apply(m.tripId, m.driverId, m.location ? [m.location] : []);
      else if (m.type === 'geofence') addEvents([m]);
      else if (m.type === 'subscribed') {
        backoff = BACKOFF_MIN_MS;
        setStatus('live', 'live');
        if (subscribedBefore) refreshGeofences(true); // what changed while we were away
        subscribedBefore = true;
      }
      else if (m.type === 'error') console.warn('live:', m.error, m.detail);
    };
    ws.onclose = async (ev) => {
      if (socket !== ws) return;
      if (!opened && await tokenRejected()) {
        rejected = true;
        setStatus('rejected', 'token rejected: open the page with ?token=<dispatcher token>');
        sessionStorage.removeItem('ingest.token');
        return;
      }
      const delay = Math.round(Math.min(BACKOFF_MAX_MS, backoff) * (0.5 + Math.random()));
      backoff = Math.min(BACKOFF_MAX_MS, backoff * 2);
      setStatus('reconnecting', `disconnected (${ev.code}), retrying in ${Math.ceil(delay / 1000)} s`);
      retryTimer = setTimeout(connect, delay);
    };
  }

  /** A socket that never opened: was it the token (401/403), or the network? */
  async function tokenRejected() {
    if (!token || (me.role && me.role !== 'dispatcher')) return true;
    try {
      const r = await fetch(new URL('api/v1/tracking/trips/-/latest', location.href), {
        headers: { Authorization: `Bearer ${token}` }, cache: 'no-store',
      });
      return r.status === 401 || r.status === 403;
    } catch (_) {
      return false;
    }
  }

  // Back online or back in view: reconnect now rather than at the end of a long backoff.
  const reconnectNow = () => {
    if (retryTimer) { backoff = BACKOFF_MIN_MS; connect(); }
  };
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) reconnectNow(); });

  connect();
  refreshGeofences(true);
  setInterval(() => refreshGeofences(false), FENCES_REFRESH_MS);
  renderEvents();
})();
