"""The load of the fault scenarios: phones that post unique batches and retry like phones.

Each batch is delivered by its own task (phones do not wait for each other: the load is
open-loop), which retries every unanswered, 429 or 5xx attempt with the same body and
batchId, honouring Retry-After, until an ack or its deadline. Every attempt is recorded.
``audit()`` then compares the database with what was acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from ..conftest import token

PING = "/api/v1/tracking/ping"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RETRY_STATUSES = {429, 500, 502, 503, 504}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def to_ms(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(milliseconds=1)


def parse_ms(value: str | int) -> int:
    """Epoch ms of a timestamp as the service writes it (RFC 3339) or epoch ms."""
    if isinstance(value, int):
        return value
    return to_ms(datetime.fromisoformat(value.replace("Z", "+00:00")))


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Attempt:
    url: str
    started: float  # time.monotonic()
    ended: float = 0.0
    status: int | None = None  # None: no HTTP answer at all
    outcome: str = ""  # "200", "503:overloaded", "refused", "disconnected", "timeout", ...
    body: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None

    @property
    def ambiguous(self) -> bool:
        """The pings may or may not have been taken: a later answer may say 'duplicates'."""
        if self.status is None:
            return self.outcome != "refused"
        return self.status >= 500 and self.body.get("error") not in ("overloaded", "shutting_down")


@dataclass
class Batch:
    batch_id: str
    trip: str
    driver: str
    stamps: list[int]  # epoch ms of its pings, unique per trip
    body: bytes
    headers: dict[str, str]
    expect_valid: int
    created: float
    give_up_at: float
    target: int = 0  # index into the fleet's URLs; moves on when an instance is gone
    attempts: list[Attempt] = field(default_factory=list)
    ack: Attempt | None = None
    final: Attempt | None = None  # a non-retryable answer (4xx)

    @property
    def acked_pings(self) -> int:
        if self.ack is None:
            return 0
        b = self.ack.body
        return int(b["queued"]) if self.ack.status == 202 else b["accepted"] + b["duplicates"]


class Fleet:
    """Drivers of one org, each on a trip of their own, posting through ``urls``."""

    def __init__(
        self, urls: list[str], *, name: str, drivers: int = 8, pings: int = 20,
        step_ms: int = 20, start_s_ago: float = 600.0, request_timeout: float = 5.0,
        retry_after_cap: float = 2.0, give_up_s: float = 45.0, force_close: bool = False,
    ) -> None:  # fmt: skip
        tag = uuid.uuid4().hex[:6]
        self.urls = urls
        self.name = name
        self.org = f"org-{name}-{tag}"
        self.drivers = [f"drv-{i}-{tag}" for i in range(drivers)]
        self.trips = [f"trip-{name}-{i}-{tag}" for i in range(drivers)]
        self.headers = [
            {"Authorization": f"Bearer {token('driver', d, self.org)}",
             "Content-Type": "application/json"}
            for d in self.drivers
        ]  # fmt: skip
        start = now_ms() - int(start_s_ago * 1000)
        self.next_ts = [start + i for i in range(drivers)]
        self.pings = pings
        self.step_ms = step_ms
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.retry_after_cap = retry_after_cap
        self.give_up_s = give_up_s
        self.force_close = force_close
        self.batches: list[Batch] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.session: aiohttp.ClientSession | None = None
        self._turn = 0

    async def __aenter__(self) -> Fleet:
        connector = aiohttp.TCPConnector(limit=256, force_close=self.force_close)
        self.session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
        assert self.session is not None
        await self.session.close()

    # -- making batches ----------------------------------------------------------------------

    def make_batch(self, driver: int | None = None, pings: int | None = None) -> Batch:
        if driver is None:
            driver, self._turn = self._turn, (self._turn + 1) % len(self.drivers)
        n = pings or self.pings
        stamps = [self.next_ts[driver] + k * self.step_ms for k in range(n)]
        self.next_ts[driver] = stamps[-1] + self.step_ms
        return self.batch_of(driver, stamps)

    def batch_of(self, driver: int, stamps: list[int], valid: int | None = None) -> Batch:
        batch_id = str(uuid.uuid4())
        body = {
            "batchId": batch_id, "tripId": self.trips[driver], "driverId": self.drivers[driver],
            "locations": [
                {"latitude": 12.9 + (ts % 1000) * 1e-5, "longitude": 77.5 + (ts % 777) * 1e-5,
                 "timestamp": iso(ts), "accuracy": 4.5, "speed": 11.2}
                for ts in stamps
            ],
        }  # fmt: skip
        created = time.monotonic()
        b = Batch(
            batch_id, self.trips[driver], self.drivers[driver], stamps,
            json.dumps(body).encode(), self.headers[driver],
            len(stamps) if valid is None else valid, created, created + self.give_up_s,
        )  # fmt: skip
        self.batches.append(b)
        return b

    # -- delivering --------------------------------------------------------------------------

    def spawn(self, b: Batch) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self.deliver(b))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run(self, rate: float, duration: float) -> None:
        """Start ``rate`` batches a second for ``duration`` seconds, whatever the answers."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        end = next_at + duration
        while loop.time() < end:
            self.spawn(self.make_batch())
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def finish(self, timeout: float) -> None:
        """Wait for every delivery to end (acked, refused or given up)."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)

    async def attempt(self, b: Batch, url: str | None = None) -> Attempt:
        """One POST of ``b`` (to ``url``, else to its current target); recorded in ``b``."""
        assert self.session is not None
        url = url or self.urls[b.target % len(self.urls)]
        a = Attempt(url, time.monotonic())
        try:
            async with self.session.post(
                url + PING, data=b.body, headers=b.headers, timeout=self.timeout
            ) as r:
                a.status = r.status
                a.outcome = str(r.status)
                a.retry_after = r.headers.get("Retry-After")
                with contextlib.suppress(ValueError):
                    a.body = json.loads(await r.read())
                if a.status >= 400 and "error" in a.body:
                    a.outcome += f":{a.body['error']}"
        except aiohttp.ClientConnectorError:
            a.outcome = "refused"
        except TimeoutError:
            a.outcome = "timeout"
        except (aiohttp.ClientError, OSError):
            a.outcome = "disconnected"
        a.ended = time.monotonic()
        b.attempts.append(a)
        if a.status in (200, 202) and b.ack is None:
            b.ack = a
        return a

    async def deliver(self, b: Batch) -> None:
        backoff = 0.1
        while True:
            a = await self.attempt(b)
            if a.status in (200, 202):
                return
            if a.status is not None and a.status not in RETRY_STATUSES:
                b.final = a
                return
            if a.outcome == "refused" or a.body.get("error") == "shutting_down":
                b.target += 1  # this instance is gone or going: try the next one
            if time.monotonic() >= b.give_up_at:
                return
            delay = backoff * (1 + random.random())
            backoff = min(backoff * 2, 1.0)
            if a.retry_after:
                delay = max(delay, min(float(a.retry_after), self.retry_after_cap))
            await asyncio.sleep(delay)

    # -- looking at what happened -----------------------------------------------------------

    def attempts(self) -> list[Attempt]:
        return [a for b in self.batches for a in b.attempts]

    def outcomes(self, since: float = 0.0, until: float = float("inf")) -> collections.Counter[str]:
        return collections.Counter(a.outcome for a in self.attempts() if since <= a.ended < until)


@dataclass
class Audit:
    sent: int = 0  # distinct pings posted at least once
    acked: int = 0  # distinct pings of acknowledged batches (valid ones: accepted or queued)
    stored: int = 0  # rows of this fleet's trips in the database
    lost: int = 0  # acknowledged pings not stored
    duplicated: int = 0  # rows beyond one per (tripId, timestamp), or rows never sent
    stored_unacked: int = 0  # stored pings whose batch never got an ack (allowed)
    # Acks that do not add up: accepted + duplicates != the batch's valid pings, or (for a
    # batch with no ambiguous attempt) the accepted of its acks != the rows it stored.
    count_mismatches: int = 0
    lost_stamps: list[tuple[Batch, int]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "acked": self.acked, "stored": self.stored, "lost": self.lost,
            "duplicated": self.duplicated, "stored_unacked": self.stored_unacked,
            "count_mismatches": self.count_mismatches, "attempts": self.outcomes,
        }  # fmt: skip


async def audit(database_url: str, fleet: Fleet) -> Audit:
    """Every acknowledged ping stored exactly once; counts of unambiguous batches exact."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            'SELECT "tripId", "timestamp", "batchId" FROM "TripLocation" WHERE "tripId" = ANY($1)',
            fleet.trips,
        )
    finally:
        await conn.close()
    stored = collections.Counter((r[0], to_ms(r[1])) for r in rows)
    by_batch = collections.Counter(r[2] for r in rows)
    sent_keys = {(b.trip, ts) for b in fleet.batches if b.attempts for ts in b.stamps}
    out = Audit(stored=len(rows), outcomes=dict(fleet.outcomes()))
    out.duplicated = sum(c - 1 for c in stored.values()) + sum(
        c for k, c in stored.items() if k not in sent_keys
    )
    acked_keys: set[tuple[str, int]] = set()
    for b in fleet.batches:
        if not b.attempts:
            continue
        if b.ack is None:
            out.stored_unacked += by_batch.get(b.batch_id, 0)
            continue
        acked_keys.update((b.trip, ts) for ts in b.stamps[: b.acked_pings])
        if b.acked_pings != b.expect_valid:  # the ack must account for every valid ping
            out.count_mismatches += 1
        missing = [ts for ts in b.stamps[: b.expect_valid] if (b.trip, ts) not in stored]
        out.lost += len(missing)
        out.lost_stamps += [(b, ts) for ts in missing]
        if b.ack.status == 200 and not any(a.ambiguous for a in b.attempts):
            accepted = sum(a.body.get("accepted", 0) for a in b.attempts if a.status == 200)
            if accepted != by_batch.get(b.batch_id, 0):
                out.count_mismatches += 1
    out.sent, out.acked = len(sent_keys), len(acked_keys)
    return out


def report(scenario: str, audit_: Audit | None, **extra: Any) -> dict[str, Any]:
    """Print one line per scenario and merge it into test-artifacts/faults.json."""
    figures: dict[str, Any] = audit_.figures() if audit_ else {}
    figures.update(extra)
    head = " ".join(
        f"{k}={figures[k]}" for k in ("sent", "acked", "stored", "lost", "duplicated")
        if k in figures
    )  # fmt: skip
    rest = " ".join(
        f"{k}={v}" for k, v in figures.items()
        if k not in ("sent", "acked", "stored", "lost", "duplicated", "attempts")
    )  # fmt: skip
    print(f"\n[faults] {scenario}: {head} {rest}".rstrip())
    if "attempts" in figures:
        print(f"[faults] {scenario}: attempts {figures['attempts']}")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "faults.json"
    with open(ARTIFACTS / ".faults.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            data = {}
        data[scenario] = {"at": datetime.now(UTC).isoformat(timespec="seconds"), **figures}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return figures


async def scrape(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    """One sample of a Prometheus metric of the service (no labels), or None if unreachable."""
    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(2)) as r:
            text = await r.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
