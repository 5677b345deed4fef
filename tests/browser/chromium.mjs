// What both browser scripts share: Chromium launched as this machine allows, and the map's
// online resources (Leaflet from the CDN, OpenStreetMap tiles) answered locally.
import { chromium } from 'playwright-core';

/** Debian's Chromium (CHROMIUM_PATH overrides /usr/bin/chromium), as the machine's own probe
 * runs it: no sandbox as root, no GPU, and no background connections to Google, which this
 * closed network refuses. */
export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-dev-shm-usage'],
  });
}

/** The page is given what it would fetch online: Leaflet from the CDN, served from
 * ``leafletDir`` (so the pinned hashes are checked too), and ``tile`` for every OSM tile;
 * ``onTile`` is called for each tile served. */
export async function serveMapLocally(page, leafletDir, tile, onTile = () => {}) {
  const headers = { 'Access-Control-Allow-Origin': '*' };
  for (const [name, contentType] of [['leaflet.js', 'text/javascript'], ['leaflet.css', 'text/css']]) {
    await page.route(`https://unpkg.com/leaflet@1.9.4/dist/${name}`,
      (r) => r.fulfill({ path: `${leafletDir}/${name}`, contentType, headers }));
  }
  await page.route('https://tile.openstreetmap.org/**', (r) => {
    onTile();
    return r.fulfill({ body: tile, contentType: 'image/png', headers });
  });
}

/** A 256×256 grey PNG with a darker border: what a map tile looks like to the page. */
export async function tilePng() {
  const { deflateSync } = await import('node:zlib');
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type), data]);
    const sum = Buffer.alloc(4);
    sum.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, sum]);
  };
  const size = 256;
  const raw = Buffer.alloc((size * 3 + 1) * size);
  for (let y = 0; y < size; y++) {
    raw[y * (size * 3 + 1)] = 0; // filter: none
    for (let x = 0; x < size; x++) {
      const v = x === 0 || y === 0 ? 200 : 236;
      raw.fill(v, y * (size * 3 + 1) + 1 + x * 3, y * (size * 3 + 1) + 4 + x * 3);
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(size, 0);
  ihdr.writeUInt32BE(size, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}
