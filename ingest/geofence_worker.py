"""Geofence evaluation in a process of its own (GEOFENCE_EVALUATION=process, the default).

Evaluating a flush costs the event loop that does it 2-4 µs per ping (the fence index, and
grouping, sorting and encoding each trip's pings and state for PostgreSQL). On the pod's loop,
which takes the requests and is the bottleneck of a busy pod, that comes straight out of
ingest. So the pod's loop only waits out GEOFENCE_SETTLE_MS after each commit, keeps the rows
of orgs with fences and writes them to a child process (`python -m ingest.geofence_worker`,
about 0.25 µs per ping, noting their trips included), which runs the same GeofenceEvaluator
with a pool and a Redis client of its own and reports its metrics back, to be served by the
pod's /metrics.

Exactly once rests on "GeofenceState" in PostgreSQL, not on the child: rows the child never
evaluated (it died, or its pipe was full) are read back by their trips' next evaluation, or
found by the sweep, as after a pod's death; the pod makes the state rows of the new trips
among them (evaluated never), so that the sweep finds those too. The child exits when its
stdin closes (the pod stopping, or dying), after evaluating what it has; it ignores SIGINT and
SIGTERM, so that a signal to the whole process group does not cut an evaluation short.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import struct
import sys

import asyncpg
import msgspec
from prometheus_client import Counter

from . import logs, metrics
from .geofence_events import (
    BACKLOG_FLUSHES,
    FENCED_ORGS,
    ORGS_REFRESH_S,
    SWEEP_INTERVAL_S,
    CommitBacklog,
    GeofenceEvaluator,
    trips_of,
)
from .keyspace import keyspace
from .live import Live, redis_client
from .records import ORG, Record
from .settings import Settings

log = logging.getLogger("ingest.geofences")

_HEADER = struct.Struct(">I")
# Bytes written to the child and not yet read by it, beyond which a flush is not sent (and
# counted as dropped): about 100 flushes of 5,000 rows. The child is behind, or stuck.
_PIPE_MAX_BYTES = 64 * 1024 * 1024
_REPORT_S = 1.0
_DONE_POLL_S = 0.02  # how often the child looks whether it finished a flush, to say so
# A child that died is started again after this long, doubling up to the maximum; one that
# lived for _STABLE_S starts the count again.
_RESTART_MIN_S, _RESTART_MAX_S, _STABLE_S = 1.0, 30.0, 60.0
_EXIT_WAIT_S = 1.0  # after its evaluations, for the child to close its pool and exit
# A child reports at least every _REPORT_S; one silent this long is frozen (stopped, or its
# loop stuck) and is killed, so that it is replaced and its transaction (and the sweep's lock
# with it) ends.
_STALLED_S = 30.0
# Flushes remembered as held by the child, at most: a child reporting none done for this long
# is stalled (and killed), or its own state rows wait for PostgreSQL.
_IN_CHILD_MAX = 4 * BACKLOG_FLUSHES
# At the shutdown's deadline, the state rows of what the child held get this long (of the
# second the shutdown gives a cancelled task).
_STATES_AT_EXIT_S = 0.5
_CHILD_POOL_MAX = 2  # its evaluations, and the sweep's
_SEND_BETWEEN_YIELDS = 8  # flushes handed over between turns of the event loop
# The pod's variables the child does not get: its credentials (it verifies no token).
_NOT_FOR_CHILD = ("JWT_",)


class Report(msgspec.Struct, array_like=True):
    """What the child sends the pod: how many of the flushes it was sent it is done with
    (evaluated, given up or dropped), its counters' increments since the last report, and the
    durations of the evaluations since then."""

    done: int
    counters: list[tuple[str, dict[str, str], float]]
    seconds: list[float]


_ROWS = msgspec.msgpack.Encoder()
_REPORT = msgspec.msgpack.Decoder(Report)
# The counters the evaluation updates (a test keeps this list whole), by name as collect()
# names them. GEOFENCE_SECONDS goes in each report's ``seconds``.
REPORTED: tuple[Counter, ...] = (
    metrics.GEOFENCE_EVENTS, metrics.GEOFENCE_EVALUATED, metrics.GEOFENCE_GAP_PINGS,
    metrics.GEOFENCE_FAILURES, metrics.GEOFENCE_DROPPED, metrics.REDIS_ERRORS,
    metrics.GEOFENCE_CUTS,
)  # fmt: skip
_COUNTERS = {family.name: c for c in REPORTED for family in c.describe()}


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame, or None at the end of the stream."""
    try:
        head = await reader.readexactly(_HEADER.size)
        return await reader.readexactly(_HEADER.unpack(head)[0])
    except asyncio.IncompleteReadError:
        return None


async def _pipe_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**31)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
    )
    return reader, transport


class GeofenceWorker(CommitBacklog):
    """In the pod: fed each flush's stored rows (committed()), hands them to the child process
    once due; stop() hands over what is left, then closes the child's input, and run() returns
    once the child has evaluated it and exited. The same interface as GeofenceEvaluator."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        super().__init__(settings.geofence_settle_ms / 1000)
        self.pool = pool
        self.settle_s = settings.geofence_settle_ms / 1000
        # The child needs no credential of the pod's own (it verifies no token).
        # MessagePack, not JSON: a float setting of inf (RATE_LIMIT_PER_S=inf) stays inf.
        self._config = msgspec.msgpack.encode(
            msgspec.structs.replace(
                settings, jwt_secret=None, jwt_secret_file=None, jwt_public_key=None
            )
        )
        # Flushes taken from the backlog, while the hand-over waits for PostgreSQL or the child.
        self._handing: collections.deque[tuple[float, list[Record]]] = collections.deque()
        self._fenced_at = -1e9
        self._look_at = 0.0  # loop time to look for orgs with fences with nothing due
        self._proc: asyncio.subprocess.Process | None = None
        self._reports: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._reported_at = 0.0  # loop time of the child's last report
        self._restart_at = 0.0
        self._restart_s = _RESTART_MIN_S
        # The trips of each flush sent to the running child and not done with yet, oldest
        # first: if the child dies, they get state rows (_make_states), so that the sweep
        # finds a new trip too. The child reports how many it is done with, counted from the
        # first it was sent.
        self._in_child: collections.deque[set[tuple[str | None, str]]] = collections.deque()
        self._in_child_from = 0  # how many flushes sent to the child came before those

    @property
    def pending(self) -> int:
        """Flushes committed and not evaluated yet: waiting here, or in the child."""
        in_child = len(self._in_child) if self.pid is not None else 0
        return len(self._backlog) + len(self._handing) + in_child

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._unmade:
                    await self._make_states(self.pool)
                now = loop.time()
                if self._backlog and (self._stopping or self._backlog[0][0] <= now):
                    if not await self._hand_over(now):
                        await self._sleep(0.5)  # PostgreSQL refused the look-up: the rows stay
                    continue
                if self._stopping:
                    break
                if now >= self._look_at:
                    # With nothing due, a pod still looks for orgs with fences, so that its
                    # child (and the sweep there) runs.
                    self._look_at = now + SWEEP_INTERVAL_S
                    with contextlib.suppress(Exception):
                        if await self._fenced_orgs():
                            await self._child()
                    continue
                until = min(self._look_at, self._backlog[0][0]) if self._backlog else self._look_at
                await self._sleep(until - now)
            try:
                await self._close_child()
            except asyncio.CancelledError:  # the shutdown's deadline: the child is killed
                self._kill_child()
                raise
            finally:  # what the child, gone now, did not report done with
                self._lost_in_child()
                if self._unmade:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._make_states(self.pool), _STATES_AT_EXIT_S)
        finally:
            self._kill_child()

    async def _fenced_orgs(self, since: float | None = None) -> frozenset[str]:
        """Orgs with fences, looked up at loop time ``since`` or later (a fence created before
        a commit sees its rows), else at most ORGS_REFRESH_S ago."""
        now = asyncio.get_running_loop().time()
        if (since is not None and self._fenced_at < since) or (
            since is None and now - self._fenced_at >= ORGS_REFRESH_S
        ):
            rows = await self.pool.fetch(FENCED_ORGS)
            self._fenced, self._fenced_at = frozenset(r[0] for r in rows), now
        return self._fenced

    async def _hand_over(self, now: float) -> bool:
        """Send the child the rows of orgs with fences of every flush due; False if the orgs
        with fences could not be looked up (nothing was taken from the backlog)."""
        backlog = self._backlog
        due = self._handing
        while backlog and (self._stopping or backlog[0][0] <= now):
            due.append(backlog.popleft())
        try:
            # Looked up after the newest of them committed (with the default settle time, the
            # look-up of a hand-over 2 s before serves: about one query per settle time).
            fenced = await self._fenced_orgs(since=due[-1][0] - self.settle_s)
        except Exception as exc:
            log.warning("geofence_orgs_lookup_failed", extra={"error": repr(exc)})
            backlog.extendleft(reversed(due))
            due.clear()
            self._trim()  # what committed meanwhile: the backlog keeps its bound
            return False
        proc = None
        if fenced:
            try:
                proc = await self._child()
            except Exception as exc:  # its flushes are dropped; the next hand-over tries again
                log.error("geofence_worker_start_failed", extra={"error": repr(exc)})
        sent = 0
        while due:  # (_trim() may drop the oldest of them meanwhile)
            _, rows = due.popleft()
            if fenced and (mine := [r for r in rows if r[ORG] in fenced]):
                self._send(proc, mine)
            sent += 1
            if sent % _SEND_BETWEEN_YIELDS == 0:
                await asyncio.sleep(0)  # a long backlog (after an outage): requests run between
        return True

    def _trim(self) -> None:
        """The bound holds for the flushes taken for a hand-over too, oldest dropped first."""
        handing, backlog = self._handing, self._backlog
        while len(handing) + len(backlog) > BACKLOG_FLUSHES:
            self._dropped((handing if handing else backlog).popleft()[1])

    def _send(self, proc: asyncio.subprocess.Process | None, rows: list[Record]) -> None:
        if proc is None or proc.stdin is None:  # waiting to be started again
            self._dropped(rows)
            return
        transport = proc.stdin.transport
        if transport.is_closing() or transport.get_write_buffer_size() > _PIPE_MAX_BYTES:
            self._dropped(rows)
            return
        proc.stdin.write(_frame(_ROWS.encode(rows)))
        in_child = self._in_child
        in_child.append(trips_of(rows))
        if len(in_child) > _IN_CHILD_MAX:  # a child reporting nothing done: best effort
            in_child.popleft()
            self._in_child_from += 1

    async def _child(self) -> asyncio.subprocess.Process | None:
        """The child process, started if it is not running (None while a restart waits)."""
        proc = self._proc
        loop = asyncio.get_running_loop()
        if proc is not None and proc.returncode is None:
            if loop.time() - self._reported_at > _STALLED_S:
                log.error("geofence_worker_stalled", extra={"pid": proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # seen dead, and replaced, once reaped
            return proc
        if proc is not None:  # it died
            self._lost_in_child()
            lived = loop.time() - self._started_at
            self._restart_s = _RESTART_MIN_S if lived > _STABLE_S else self._restart_s
            self._restart_at = loop.time() + self._restart_s
            self._restart_s = min(self._restart_s * 2, _RESTART_MAX_S)
            log.error("geofence_worker_exited", extra={"returncode": proc.returncode})
            self._proc = None
        if loop.time() < self._restart_at:
            return None
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # no file descriptor left (a flood of connections)
            self._start_failed(exc)
            return None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ingest.geofence_worker", str(write_fd),
                stdin=asyncio.subprocess.PIPE, pass_fds=(write_fd,), env=_child_environment(),
            )  # fmt: skip
        except OSError as exc:  # no memory, no process left
            os.close(read_fd)
            self._start_failed(exc)
            return None
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(_frame(self._config))
        self._proc, self._started_at = proc, loop.time()
        self._reported_at = loop.time()
        self._in_child_from = 0
        metrics.GEOFENCE_WORKER_STARTS.inc()
        log.info("geofence_worker_started", extra={"pid": proc.pid})
        self._reports = asyncio.create_task(self._read_reports(proc, read_fd))
        return proc

    def _lost_in_child(self) -> None:
        """The child is gone: the flushes it had not reported done with are dropped (their
        trips get state rows: the sweep finds them)."""
        for trips in self._in_child:
            self._unevaluated(trips)
        self._in_child.clear()

    def _start_failed(self, exc: OSError) -> None:
        """The child could not be started: tried again after _RESTART_MAX_S (flushes due
        meanwhile are dropped, and read back later)."""
        log.error("geofence_worker_start_failed", extra={"error": repr(exc)})
        self._restart_at = asyncio.get_running_loop().time() + _RESTART_MAX_S

    async def _read_reports(self, proc: asyncio.subprocess.Process, fd: int) -> None:
        reader, transport = await _pipe_reader(fd)
        try:
            while (frame := await _read_frame(reader)) is not None:
                report = _REPORT.decode(frame)
                apply_report(report)
                if proc is not self._proc:
                    continue  # a dead child's last words: its flushes were dealt with
                self._reported_at = asyncio.get_running_loop().time()
                while self._in_child_from < report.done and self._in_child:
                    self._in_child.popleft()
                    self._in_child_from += 1
        finally:
            transport.close()

    async def _close_child(self) -> None:
        """End of input for the child; then wait for it to evaluate what it has and exit (the
        shutdown sequence cancels this at its deadline)."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        await proc.wait()
        if self._reports is not None:
            await self._reports  # its last report

    def _kill_child(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if self._reports is not None and not self._reports.done():
            self._reports.cancel()


def _child_environment() -> dict[str, str]:
    """The pod's environment without its credentials: the child gets its settings (the
    database's and Redis's URLs among them) over its stdin, and PG* variables stay for asyncpg."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_CHILD)}


def apply_report(report: Report) -> None:
    """Add the child's counts to the pod's metrics."""
    for name, labels, increment in report.counters:
        counter = _COUNTERS.get(name)
        if counter is not None:
            (counter.labels(**labels) if labels else counter).inc(increment)
    for seconds in report.seconds:
        metrics.GEOFENCE_SECONDS.observe(seconds)


class _Reporter:
    """In the child: tells the pod how many flushes it is done with, as soon as that changes,
    and what its counters gained, at least every _REPORT_S."""

    def __init__(self, fd: int, evaluator: GeofenceEvaluator) -> None:
        self.fd = fd
        self.evaluator = evaluator
        self.done = 0
        self.seconds: list[float] = []
        self.last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def send(self) -> None:
        self.done = self.evaluator.done
        counters: list[tuple[str, dict[str, str], float]] = []
        for family in itertools.chain.from_iterable(c.collect() for c in REPORTED):
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = (family.name, tuple(sorted(sample.labels.items())))
                if increment := sample.value - self.last.get(key, 0.0):
                    counters.append((family.name, sample.labels, increment))
                    self.last[key] = sample.value
        report = Report(self.done, counters, self.seconds[:])
        self.seconds.clear()
        data = _frame(msgspec.msgpack.encode(report))
        while data:  # a few hundred bytes, to a pipe the pod reads all the time
            data = data[os.write(self.fd, data) :]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        while True:
            await asyncio.sleep(_DONE_POLL_S)
            now = loop.time()
            if self.evaluator.done != self.done or now - sent_at >= _REPORT_S:
                self.send()
                sent_at = now


async def _work(report_fd: int) -> None:
    reader, _ = await _pipe_reader(0)
    config = await _read_frame(reader)
    if config is None:
        return
    s = msgspec.msgpack.decode(config, type=Settings)
    logs.setup(s.log_level)
    logs.capture_stderr()
    pool = await asyncpg.create_pool(
        s.database_url, min_size=0, max_size=_CHILD_POOL_MAX, command_timeout=s.flush_timeout_s,
        max_inactive_connection_lifetime=60,
        server_settings={"application_name": "ingest-geofences"},
    )  # fmt: skip
    redis = redis_client(s)
    keys = keyspace(s.redis_mode, s.redis_prefix, s.redis_cluster_buckets)
    live = Live(redis, keys, s.latest_ttl_s, None)
    evaluator = GeofenceEvaluator(pool, live, s.geofence_settle_ms / 1000, waited=True)
    reporter = _Reporter(report_fd, evaluator)
    evaluator.observe_seconds = reporter.seconds.append
    evaluating = asyncio.create_task(evaluator.run())
    reporting = asyncio.create_task(reporter.run())
    rows = msgspec.msgpack.Decoder(list[Record]).decode
    try:
        while (frame := await _read_frame(reader)) is not None:
            evaluator.committed(rows(frame))
    finally:
        evaluator.stop()
        await evaluating  # what is left, one attempt each
        reporting.cancel()
        reporter.send()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), _EXIT_WAIT_S)
            await redis.aclose()


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not built for this platform
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_work(int(sys.argv[1])))


if __name__ == "__main__":
    main()
