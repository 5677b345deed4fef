"""A fleet of simulated drivers posting GPS batches: ``python -m devtools.simulate``.

Each truck drives a street grid around a city centre: straight blocks, turns at
intersections, red lights, arterials faster than side streets (30-90 km/h), accelerating
and braking at a truck's rates. Its phone takes a fix every second (accuracy, noise,
speed, heading, altitude) and uploads what it has every few seconds with jitter, the way
the driver app does: each upload has a batchId; an upload that gets no answer, a 5xx or a
429 is retried later with the same batchId; the phone sometimes loses its connection and
uploads the backlog late; and now and then an answer is lost on the way back, so the
retry must come back as duplicates, never as new rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt

EARTH_M_PER_DEG = 111_320.0
BLOCK_M = 250.0  # distance between intersections
ARTERIAL_EVERY = 4  # every 4th street is an arterial
RING_EVERY = 12  # and every 12th a fast ring road
LIMITS_KMH = {"street": 40.0, "arterial": 65.0, "ring": 85.0}
ACCEL = 1.2  # m/s², a loaded truck
BRAKE = 2.0  # m/s², comfortable braking
TURN_SPEED = 5.0  # m/s through a turn
RED_LIGHT_CHANCE = 0.2  # per arterial intersection
PING_PATH = "/api/v1/tracking/ping"
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Config:
    url: str = "http://127.0.0.1:8080"
    drivers: int = 5
    org: str = "demo"
    secret: str | None = None
    tokens: tuple[str, ...] = ()
    center: tuple[float, float] = (12.9716, 77.5946)  # Bengaluru
    radius_m: float = 4_000.0
    fix_interval_s: float = 1.0
    upload_interval_s: float = 5.0
    jitter: float = 0.25  # upload interval ± this fraction
    offline_chance: float = 0.01  # per upload, chance the phone goes offline
    offline_s: tuple[float, float] = (20.0, 90.0)
    lost_ack_chance: float = 0.01  # per answered upload, chance the answer never arrives
    timeout_s: float = 10.0
    max_batch: int = 500
    duration_s: float | None = None
    report_every_s: float = 30.0
    seed: int | None = None


@dataclass
class Stats:
    fixes: int = 0
    uploads: int = 0  # requests sent, retries included
    batches: int = 0  # batches answered 2xx (or given up)
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    retries: int = 0
    lost_acks: int = 0
    late_batches: int = 0  # batches uploaded after an offline gap
    offline_gaps: int = 0
    failed: int = 0  # batches dropped on a 4xx the server will never accept
    statuses: dict[int, int] = field(default_factory=dict)

    def line(self) -> str:
        keys = ("fixes", "uploads", "accepted", "duplicates", "retries", "offline_gaps",
                "late_batches", "failed")  # fmt: skip
        return " ".join(f"{k}={getattr(self, k)}" for k in keys)


@dataclass
class Batch:
    batch_id: str
    locations: list[dict[str, Any]]
    late: bool = False
    attempts: int = 0


class Truck:
    """Motion on the street grid, in metres east (x) and north (y) of the centre."""

    def __init__(self, rng: random.Random, radius_m: float) -> None:
        self.rng = rng
        self.lines = max(2, int(radius_m // BLOCK_M))
        n = self.lines // 2
        self.node = (rng.randint(-n, n), rng.randint(-n, n))
        self.dir = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1)])
        self.s = rng.uniform(0, BLOCK_M)  # metres along the current block
        self.temper = rng.uniform(0.85, 1.05)  # how close to the limit this driver drives
        self.wait = 0.0  # seconds left at a red light
        self.v = rng.uniform(0.3, 0.9) * self.limit()  # already on the road
        self.plan = self._plan()

    @property
    def x(self) -> float:
        return (self.node[0] + self.dir[0] * self.s / BLOCK_M) * BLOCK_M

    @property
    def y(self) -> float:
        return (self.node[1] + self.dir[1] * self.s / BLOCK_M) * BLOCK_M

    @property
    def heading(self) -> float:
        """Degrees clockwise from north."""
        return math.degrees(math.atan2(self.dir[0], self.dir[1])) % 360.0

    def road(self) -> str:
        # Moving east-west means driving on the street y = node[1], and vice versa.
        line = self.node[1] if self.dir[0] else self.node[0]
        if line % RING_EVERY == 0:
            return "ring"
        return "arterial" if line % ARTERIAL_EVERY == 0 else "street"

    def limit(self) -> float:
        return LIMITS_KMH[self.road()] / 3.6 * self.temper

    def _plan(self) -> tuple[tuple[int, int], bool]:
        """At the end of this block: the next direction, and whether a red light stops us."""
        end = (self.node[0] + self.dir[0], self.node[1] + self.dir[1])
        dx, dy = self.dir
        straight, left, right = (dx, dy), (-dy, dx), (dy, -dx)
        weights = [(straight, 0.8 if self.road() != "street" else 0.6), (left, 0.2), (right, 0.2)]
        inside = [(d, w) for d, w in weights if self._inside(end, d)]
        if not inside:  # cannot happen on a grid of 2+ lines; turn around if it does
            inside = [((-dx, dy) if dx else (dx, -dy), 1.0)]
        dirs, ws = zip(*inside, strict=True)
        nxt = self.rng.choices(dirs, ws)[0]
        crossing_arterial = any(c % ARTERIAL_EVERY == 0 for c in end)
        red = crossing_arterial and self.rng.random() < RED_LIGHT_CHANCE
        return nxt, red

    def _inside(self, node: tuple[int, int], d: tuple[int, int]) -> bool:
        n = self.lines
        return abs(node[0] + d[0]) <= n and abs(node[1] + d[1]) <= n

    def step(self, dt: float) -> None:
        nxt, red = self.plan
        if self.wait > 0:  # at a red light
            self.wait -= dt
            if self.wait <= 0:
                self.plan = (nxt, False)
            return
        exit_speed = 0.0 if red else (self.limit() if nxt == self.dir else TURN_SPEED)
        left = BLOCK_M - self.s
        # The fastest speed from which the exit speed is still reached at the end of the
        # block with comfortable braking, looking one step ahead.
        ahead = max(0.0, left - self.v * dt)
        target = min(self.limit(), math.sqrt(exit_speed**2 + 2 * BRAKE * ahead))
        if self.v < target:
            self.v = min(target, self.v + ACCEL * dt)
        else:
            self.v = max(target, self.v - 1.5 * BRAKE * dt)
        self.v = max(0.0, self.v + self.rng.gauss(0, 0.05))
        if red and left < 15.0 and self.v < 1.5:  # at the stop line
            self.s, self.v = BLOCK_M - 1.0, 0.0
            self.wait = self.rng.uniform(5, 30)
            return
        self.s += self.v * dt
        if self.s >= BLOCK_M:
            self.node = (self.node[0] + self.dir[0], self.node[1] + self.dir[1])
            self.s = min(self.s - BLOCK_M, 5.0) if nxt != self.dir else self.s - BLOCK_M
            self.dir = nxt
            self.plan = self._plan()


class Driver:
    """A truck, its driver's phone, and the phone's outbox."""

    def __init__(self, index: int, cfg: Config, rng: random.Random, token: str | None) -> None:
        self.cfg = cfg
        self.rng = rng
        self.token = token
        sub = _token_sub(token) if token else None
        self.driver_id = sub or f"drv_{index + 1:02d}"
        self.trip_id = f"trip_{self.driver_id}_{uuid.uuid4().hex[:6]}"
        self.truck = Truck(rng, cfg.radius_m)
        self.altitude = 900 + rng.uniform(-20, 20)
        # Like the different app versions in the field: RFC 3339 or epoch ms timestamps, and
        # the old app's batchId on every location.
        self.epoch_ms = index % 3 == 1
        self.old_app = index % 3 == 2
        self.fixes: list[dict[str, Any]] = []
        self.outbox: deque[Batch] = deque()
        self.offline_until = 0.0
        self.retry_at = 0.0
        self.backoff = 1.0

    def tick(self, dt: float, now: float) -> dict[str, Any]:
        """Advance the truck by ``dt`` seconds and take a GPS fix stamped ``now``."""
        t = self.truck
        t.step(dt)
        acc = min(30.0, max(2.0, self.rng.lognormvariate(math.log(5), 0.4)))
        noise = acc / 2
        lat0, lon0 = self.cfg.center
        lat = lat0 + (t.y + self.rng.gauss(0, noise)) / EARTH_M_PER_DEG
        lon = lon0 + (t.x + self.rng.gauss(0, noise)) / (
            EARTH_M_PER_DEG * math.cos(math.radians(lat0))
        )
        self.altitude += self.rng.gauss(0, 0.3)
        fix: dict[str, Any] = {
            "latitude": round(lat, 7),
            "longitude": round(lon, 7),
            "timestamp": int(now * 1000) if self.epoch_ms else _iso(now),
            "accuracy": round(acc, 1),
            "speed": round(max(0.0, t.v + self.rng.gauss(0, 0.2)), 2),
            "altitude": round(self.altitude + self.rng.gauss(0, 2), 1),
        }
        if t.v > 1.0:  # phones report no course when standing still
            fix["heading"] = round((t.heading + self.rng.gauss(0, 3)) % 360.0, 1) % 360.0
        self.fixes.append(fix)
        return fix

    def cut_batch(self, now: float) -> None:
        """Close what was recorded since the last upload into batches for the outbox."""
        offline = now < self.offline_until
        last = self.outbox[-1] if self.outbox else None
        if offline and last is not None and last.late and last.attempts == 0:
            # Offline, the app keeps appending to the batch it could not send yet.
            room = self.cfg.max_batch - len(last.locations)
            last.locations += self.fixes[:room]
            self.fixes = self.fixes[room:]
        while self.fixes:
            chunk, self.fixes = self.fixes[: self.cfg.max_batch], self.fixes[self.cfg.max_batch :]
            self.outbox.append(Batch(str(uuid.uuid4()), chunk, late=offline))

    def body(self, batch: Batch) -> dict[str, Any]:
        if self.old_app:
            locs = [{**loc, "batchId": batch.batch_id} for loc in batch.locations]
            return {"tripId": self.trip_id, "driverId": self.driver_id, "locations": locs}
        return {
            "batchId": batch.batch_id,
            "tripId": self.trip_id,
            "driverId": self.driver_id,
            "locations": batch.locations,
        }


async def upload(driver: Driver, http: aiohttp.ClientSession, stats: Stats, now: float) -> None:
    """Send the outbox oldest first; stop at the first batch that must be retried."""
    cfg = driver.cfg
    if now < driver.offline_until or now < driver.retry_at:
        return
    headers = {"Authorization": f"Bearer {driver.token}"} if driver.token else {}
    while driver.outbox:
        batch = driver.outbox[0]
        batch.attempts += 1
        stats.uploads += 1
        if batch.attempts > 1:
            stats.retries += 1
        status, answer, retry_after = await _post(http, cfg, driver, batch, headers)
        stats.statuses[status] = stats.statuses.get(status, 0) + 1
        if status in (200, 202) and driver.rng.random() < cfg.lost_ack_chance:
            stats.lost_acks += 1  # the server has it; the phone never heard back
            status = 0
        if status == 0 or status in RETRY_STATUSES:
            delay = max(retry_after, driver.backoff) * driver.rng.uniform(0.8, 1.2)
            driver.retry_at = time.time() + delay
            driver.backoff = min(30.0, driver.backoff * 2)
            return
        driver.outbox.popleft()
        driver.backoff = 1.0
        stats.batches += 1
        if batch.late:
            stats.late_batches += 1
        if status in (200, 202):
            stats.accepted += int(answer.get("accepted", answer.get("queued", 0)))
            stats.duplicates += int(answer.get("duplicates", 0))
            stats.rejected += len(answer.get("rejected", []))
        elif status == 422:
            stats.rejected += len(batch.locations)
        else:  # 400, 401, 403, 413, 415: resending the same bytes cannot help
            stats.failed += 1
            print(f"simulate: {driver.driver_id}: dropped batch, HTTP {status}: {answer}",
                  file=sys.stderr, flush=True)  # fmt: skip


async def _post(
    http: aiohttp.ClientSession, cfg: Config, driver: Driver, batch: Batch,
    headers: dict[str, str],
) -> tuple[int, dict[str, Any], float]:  # fmt: skip
    """(status, JSON answer, Retry-After seconds); status 0 when no answer came."""
    try:
        async with http.post(
            cfg.url.rstrip("/") + PING_PATH, json=driver.body(batch), headers=headers,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
        ) as r:  # fmt: skip
            try:
                answer = await r.json(content_type=None)
            except ValueError:
                answer = {}
            retry_after = float(r.headers.get("Retry-After", "0") or 0)
            return r.status, answer if isinstance(answer, dict) else {}, retry_after
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return 0, {}, 0.0


class Fleet:
    def __init__(self, cfg: Config) -> None:
        if cfg.tokens and len(cfg.tokens) < cfg.drivers:
            raise ValueError(f"{cfg.drivers} drivers need {cfg.drivers} tokens")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.stats = Stats()
        self.drivers = [
            Driver(i, cfg, random.Random(self.rng.random()), self._token(i))
            for i in range(cfg.drivers)
        ]

    def _token(self, i: int) -> str | None:
        if self.cfg.tokens:
            return self.cfg.tokens[i]
        if self.cfg.secret:
            return sign_driver_token(self.cfg.secret, f"drv_{i + 1:02d}", self.cfg.org)
        return None  # a service with AUTH_DISABLED

    async def run(self, stop: asyncio.Event | None = None) -> Stats:
        stop = stop or asyncio.Event()
        connector = aiohttp.TCPConnector(limit=min(100, max(10, self.cfg.drivers)))
        async with aiohttp.ClientSession(connector=connector) as http:
            tasks = [asyncio.create_task(self._gps(stop))]
            tasks += [asyncio.create_task(self._phone(d, http, stop)) for d in self.drivers]
            tasks.append(asyncio.create_task(self._report(stop)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.duration_s)
            stop.set()
            await asyncio.gather(*tasks)
            # Last chance for what is still on the phones, within one request timeout.
            deadline = time.monotonic() + self.cfg.timeout_s
            await asyncio.gather(*(self._drain(d, http, deadline) for d in self.drivers))
        return self.stats

    async def _drain(self, d: Driver, http: aiohttp.ClientSession, deadline: float) -> None:
        d.offline_until = 0.0
        d.cut_batch(time.time())
        while d.outbox and time.monotonic() < deadline:
            d.retry_at = 0.0
            await upload(d, http, self.stats, time.time())
            if d.outbox:
                await asyncio.sleep(0.1)

    async def _gps(self, stop: asyncio.Event) -> None:
        """One clock for every truck: a fix per fix interval, stamped with the wall clock."""
        last = time.monotonic()
        while not stop.is_set():
            await _sleep(stop, self.cfg.fix_interval_s)
            # Woken by the stop, not the clock: a fix now could fall in the last fix's
            # millisecond, a (tripId, timestamp) the service rightly stores once.
            if stop.is_set():
                break
            now_mono, now = time.monotonic(), time.time()
            dt, last = now_mono - last, now_mono
            for d in self.drivers:
                d.tick(dt, now)
            self.stats.fixes += len(self.drivers)

    async def _phone(self, d: Driver, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        cfg = self.cfg
        # Phones do not upload in step: spread the first upload over one interval.
        await _sleep(stop, d.rng.uniform(0, cfg.upload_interval_s))
        while not stop.is_set():
            now = time.time()
            if now >= d.offline_until and d.rng.random() < cfg.offline_chance:
                d.offline_until = now + d.rng.uniform(*cfg.offline_s)
                self.stats.offline_gaps += 1
            d.cut_batch(now)
            await upload(d, http, self.stats, now)
            jitter = d.rng.uniform(1 - cfg.jitter, 1 + cfg.jitter)
            await _sleep(stop, cfg.upload_interval_s * jitter)

    async def _report(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        while not stop.is_set():
            await _sleep(stop, self.cfg.report_every_s)
            if not stop.is_set():
                elapsed = time.monotonic() - started
                print(f"simulate: t={elapsed:.0f}s drivers={len(self.drivers)} "
                      f"{self.stats.line()}", flush=True)  # fmt: skip


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def sign_driver_token(secret: str, driver_id: str, org: str, ttl_s: int = 7 * 86_400) -> str:
    """An HS256 driver token, with JWT_ISSUER / JWT_AUDIENCE from the environment if set."""
    from ingest.auth import issue_token
    from ingest.settings import load_settings

    env = {k: os.environ[k] for k in ("JWT_ISSUER", "JWT_AUDIENCE") if os.environ.get(k)}
    settings = load_settings(env, jwt_secret=secret)
    return issue_token(settings, driver_id, "driver", org, ttl_s)


def _secret_from_env() -> str | None:
    if os.environ.get("JWT_SECRET") or not os.environ.get("JWT_SECRET_FILE"):
        return os.environ.get("JWT_SECRET")
    from ingest.settings import read_secret_file

    return read_secret_file(os.environ["JWT_SECRET_FILE"])


def _token_sub(token: str) -> str | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pair(text: str) -> tuple[float, float]:
    a, b = (float(x) for x in text.split(","))
    return a, b


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python -m devtools.simulate", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="service base URL")
    p.add_argument("--drivers", type=int, default=5, help="number of trucks (default 5)")
    p.add_argument("--org", default="demo", help="org claim of the driver tokens")
    p.add_argument(
        "--secret",
        default=_secret_from_env(),
        help="HS256 secret to sign driver tokens with (default: $JWT_SECRET, or the contents"
        " of $JWT_SECRET_FILE)",
    )
    p.add_argument(
        "--token",
        action="append",
        default=[],
        dest="tokens",
        help="a driver token to use instead of signing (repeat, one per driver)",
    )
    p.add_argument("--center", type=_pair, default=(12.9716, 77.5946), help="LAT,LON")
    p.add_argument("--radius", type=float, default=4000.0, help="metres around the centre")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between uploads")
    p.add_argument("--fix-interval", type=float, default=1.0, help="seconds between GPS fixes")
    p.add_argument(
        "--offline-chance",
        type=float,
        default=0.01,
        help="chance per upload that the phone goes offline (default 0.01)",
    )
    p.add_argument("--offline-seconds", type=_pair, default=(20.0, 90.0), help="MIN,MAX")
    p.add_argument(
        "--lost-ack-chance",
        type=float,
        default=0.01,
        help="chance per answered upload that the answer is lost (default 0.01)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds, default: until Ctrl-C")
    p.add_argument("--report-every", type=float, default=30.0, help="seconds between stats lines")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    if a.drivers < 1:
        p.error("--drivers must be at least 1")
    if a.tokens and len(a.tokens) < a.drivers:
        p.error(f"--drivers {a.drivers} needs as many --token options (got {len(a.tokens)})")
    return Config(
        url=a.url, drivers=a.drivers, org=a.org, secret=a.secret, tokens=tuple(a.tokens),
        center=a.center, radius_m=a.radius, fix_interval_s=a.fix_interval,
        upload_interval_s=a.interval, offline_chance=a.offline_chance,
        offline_s=a.offline_seconds, lost_ack_chance=a.lost_ack_chance,
        duration_s=a.duration, report_every_s=a.report_every, seed=a.seed,
    )  # fmt: skip


async def _main(cfg: Config) -> Stats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = Fleet(cfg)
    print(f"simulate: {cfg.drivers} drivers of org {cfg.org!r} -> {cfg.url}, uploading every "
          f"~{cfg.upload_interval_s:g} s; trips: "
          f"{', '.join(d.trip_id for d in fleet.drivers[:5])}"
          f"{' ...' if cfg.drivers > 5 else ''}", flush=True)  # fmt: skip
    if not cfg.tokens and not cfg.secret:
        print("simulate: no --secret/JWT_SECRET and no --token: sending no token "
              "(works only with AUTH_DISABLED=true)", file=sys.stderr, flush=True)  # fmt: skip
    stats = await fleet.run(stop)
    print(f"simulate: stopped {stats.line()}", flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    asyncio.run(_main(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
