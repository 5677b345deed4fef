// One Chromium page that tests/test_dashboard.py drives a step at a time, so that it can post
// pings between looks at the page: one JSON command a line on stdin, one JSON answer a line on
// stdout (the value, or the error, and every page error or dialog so far). With a Leaflet dist
// directory, the CDN and the tile server are answered locally (chromium.mjs).
// argv: <url> [<leaflet dist dir>]
import { createInterface } from 'node:readline';
import { launch, serveMapLocally, tilePng } from './chromium.mjs';

const [url, leaflet] = process.argv.slice(2);
const problems = [];
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
page.setDefaultTimeout(15000);
page.on('pageerror', (err) => problems.push(`pageerror: ${err}`));
page.on('dialog', (d) => { problems.push(`dialog: ${d.type()} ${d.message()}`); d.dismiss().catch(() => {}); });
if (leaflet) await serveMapLocally(page, leaflet, await tilePng());
// A function's source and its argument, called in the page.
const call = (c) => `(${c.js})(${JSON.stringify(c.arg ?? null)})`;
// Polled here: waitForFunction would evaluate the string inside the page, which the page's
// CSP (no 'unsafe-eval') refuses; page.evaluate goes through the DevTools protocol.
async function poll(c) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const value = await page.evaluate(call(c));
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`still ${JSON.stringify(value)} after 15 s: ${c.js}`);
    await page.waitForTimeout(100);
  }
}
const ops = {
  goto: () => page.goto(url, { waitUntil: 'load' }).then(() => null),
  wait: poll,
  eval: (c) => page.evaluate(call(c)),
  click: (c) => page.click(c.selector).then(() => null),
  shot: (c) => page.screenshot({ path: c.path }).then(() => null),
};
for await (const line of createInterface({ input: process.stdin })) {
  const c = JSON.parse(line);
  let answer;
  try {
    answer = { value: (await ops[c.op](c)) ?? null };
  } catch (err) {
    answer = { error: `${c.op}: ${err.message.split('\n')[0]}` };
  }
  process.stdout.write(JSON.stringify({ ...answer, problems }) + '\n');
}
await browser.close();
