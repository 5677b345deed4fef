"""SIGTERM under load, as in a rolling update: the old pod drains, the new one takes over."""

from __future__ import annotations

import asyncio
import collections
import time

import asyncpg

from ingest.shutdown import GRACE_MARGIN_S

from ..conftest import REDIS_URL
from .conftest import service_env, slow_storage
from .load import Fleet, audit, report

SHUTDOWN_TIMEOUT_S = 5


async def test_sigterm_under_load_drains_within_the_grace_period(services, shared_env, database):
    # Slow flushes: at SIGTERM, many requests are waiting for their commit.
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(slow_storage(0.3))
    finally:
        await conn.close()
    env = shared_env(SHUTDOWN_TIMEOUT_S=SHUTDOWN_TIMEOUT_S)
    old = await services(env, name="old-pod")
    new = await services(env, name="new-pod")
    # No keep-alive: an idle pooled connection closed by the draining pod would look like
    # a request lost in flight.
    async with Fleet([old.url, new.url], name="sigterm", pings=20, force_close=True) as fleet:
        load = asyncio.ensure_future(fleet.run(rate=30, duration=7))
        await asyncio.sleep(4)
        old.sigterm()
        term_at = time.monotonic()
        code = await old.wait(SHUTDOWN_TIMEOUT_S + 10)
        exit_s = time.monotonic() - term_at
        await load
        await fleet.finish(30)
    a = await audit(database, fleet)
    to_old = [at for at in fleet.attempts() if at.url == old.url]
    # Requests the old pod had surely accepted before the signal: each must get an answer.
    in_flight = [at for at in to_old if at.started < term_at - 0.1 and at.ended > term_at]
    unanswered = [at for at in in_flight if at.status is None]
    late = fleet.outcomes(term_at, float("inf"))
    report(
        "sigterm", a, exit_code=code, exit_s=round(exit_s, 2),
        shutdown_timeout_s=SHUTDOWN_TIMEOUT_S, in_flight_at_sigterm=len(in_flight),
        in_flight_unanswered=len(unanswered), answers_after_sigterm=dict(late),
        drained_event=bool(old.events("drained")),
    )  # fmt: skip
    assert code == 0, old.log_tail()
    assert exit_s < SHUTDOWN_TIMEOUT_S + 2
    assert old.events("drained") and not old.events("drain_timeout")
    assert in_flight, "the signal came while requests were waiting for their commit"
    assert not unanswered, [(u.outcome, u.started - term_at) for u in unanswered]
    assert a.lost == 0 and a.duplicated == 0 and a.count_mismatches == 0
    assert a.acked == a.sent == a.stored


async def test_sigterm_while_postgres_is_down_still_exits_within_the_grace_period(
    private_postgres, services, redis_prefix
):
    """Nothing can be committed, so nothing more is acknowledged; but the pod must still
    leave within its grace period, answering the requests it holds (503: retry elsewhere)
    rather than dropping their connections."""
    pg = private_postgres
    grace_s = 2
    # ACK_TIMEOUT_MS at its default (10 s), longer than the grace period, as in production.
    env = service_env(
        pg.url, REDIS_URL, redis_prefix, SHUTDOWN_TIMEOUT_S=grace_s, ACK_TIMEOUT_MS=10_000
    )
    old = await services(env, name="old-pod")
    new = await services(env, name="new-pod", start=False)
    async with Fleet([old.url, new.url], name="sigterm-pg-down", force_close=True) as fleet:
        await asyncio.to_thread(pg.stop, "immediate")
        for _ in range(10):
            fleet.spawn(fleet.make_batch())
        await asyncio.sleep(0.5)  # every request is waiting for a commit that cannot happen
        old.sigterm()
        term_at = time.monotonic()
        code = await old.wait(30)
        exit_s = time.monotonic() - term_at
        held = [at for at in fleet.attempts() if at.url == old.url and at.started < term_at]
        await asyncio.to_thread(pg.start)
        await new.start()
        await fleet.finish(30)
    a = await audit(pg.url, fleet)
    report(
        "sigterm_postgres_down", a, exit_code=code, exit_s=round(exit_s, 2),
        shutdown_timeout_s=grace_s, held_at_sigterm=len(held),
        held_answers=dict(collections.Counter(at.outcome for at in held)),
        drain_timeout_event=bool(old.events("drain_timeout")),
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0 and a.acked == a.sent == a.stored
    assert code == 0
    assert exit_s < grace_s + 1.5, f"exited {exit_s:.1f} s after SIGTERM, grace {grace_s} s"
    assert all(at.status == 503 for at in held), [at.outcome for at in held]
    # Not acknowledged, so not lost (the phones retried elsewhere), but said.
    (stopped,) = old.events("stopped")
    assert stopped["rows_not_committed"] == 10 * fleet.pings


async def test_sigterm_while_postgres_holds_the_final_flush_exits_by_the_deadline_and_says_what_it_leaves(
    services, shared_env, database
):
    """The case a grace period is sized for: PostgreSQL is up, but the final flush cannot
    finish (a lock holds it). The process still exits within SHUTDOWN_TIMEOUT_S +
    GRACE_MARGIN_S, with exit code 0, and its last line says how many rows it did not
    commit: with ACK_MODE=buffered those were acknowledged (202), so they are lost."""
    timeout_s = 2
    env = shared_env(ACK_MODE="buffered", SHUTDOWN_TIMEOUT_S=timeout_s, FLUSH_TIMEOUT_S=60)
    pod = await services(env, name="held-pod")
    locker = await asyncpg.connect(database)
    await locker.execute("BEGIN")
    await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
    try:
        async with Fleet([pod.url], name="sigterm-held", pings=7) as fleet:
            answers = [await fleet.attempt(fleet.make_batch()) for _ in range(6)]
            assert [at.status for at in answers] == [202] * 6
            queued = sum(at.body["queued"] for at in answers)
            await asyncio.sleep(0.3)  # the flush waits for the lock
            pod.sigterm()
            term_at = time.monotonic()
            code = await pod.wait(timeout_s + GRACE_MARGIN_S + 10)
            exit_s = time.monotonic() - term_at
    finally:
        await locker.execute("ROLLBACK")
        stored = await locker.fetchval('SELECT count(*) FROM "TripLocation"')
        await locker.close()
    (timed_out,) = pod.events("drain_timeout")
    (stopped,) = pod.events("stopped")
    report(
        "sigterm_flush_held", None, exit_code=code, exit_s=round(exit_s, 2),
        shutdown_timeout_s=timeout_s, grace_margin_s=GRACE_MARGIN_S, queued=queued,
        rows_not_committed=stopped["rows_not_committed"], stored=stored,
        tasks_cancelled=stopped["tasks_cancelled"],
    )  # fmt: skip
    assert code == 0, pod.log_tail()
    assert timeout_s - 0.2 < exit_s < timeout_s + GRACE_MARGIN_S, exit_s
    assert queued == 42 and stored == 0
    assert timed_out["rows_not_committed"] == stopped["rows_not_committed"] == queued
    assert "flusher" in stopped["tasks_cancelled"]
