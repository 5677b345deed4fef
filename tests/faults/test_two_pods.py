"""The same batch sent to two service processes at once (a phone that timed out on one pod
and retried on another while the first was still working): stored once."""

from __future__ import annotations

import asyncio
import collections

from .load import Batch, Fleet, audit, report


async def test_same_batch_to_two_pods_at_once_is_stored_once(services, shared_env, database):
    env = shared_env(FLUSH_INTERVAL_MS=50)
    pod_a = await services(env, name="pod-a")
    pod_b = await services(env, name="pod-b")
    async with Fleet([pod_a.url], name="two-pods", drivers=8, pings=20) as fleet:

        async def both(to_a: list[Batch], to_b: list[Batch]) -> None:
            """Post ``to_a`` to pod A and ``to_b`` to pod B, all at the same instant. Pod B
            gets them in the opposite order, so the two pods' flushes meet the same keys
            in opposite orders."""
            await asyncio.gather(
                *(fleet.attempt(b, pod_a.url) for b in to_a),
                *(fleet.attempt(b, pod_b.url) for b in reversed(to_b)),
            )

        # The same batch (same batchId) to both pods at the same instant, 8 phones at a time.
        same_id: list[Batch] = []
        for _ in range(5):
            wave = [fleet.make_batch(driver=d) for d in range(8)]
            same_id += wave
            await both(wave, wave)
        # The same pings under two batchIds (a client that re-batched its queue), to both pods.
        rebatched: list[Batch] = []
        for _ in range(5):
            wave = [fleet.make_batch(driver=d) for d in range(8)]
            twins = [fleet.batch_of(d, b.stamps) for d, b in enumerate(wave)]
            rebatched += wave + twins
            await both(wave, twins)
        # A phone retries whatever got no 200 (a timeout, if a deadlock held a flush back).
        retried = [b for b in fleet.batches if b.ack is None]
        await asyncio.gather(*(fleet.deliver(b) for b in retried))

    a = await audit(database, fleet)
    pairs_both_200 = sum(
        1 for b in same_id if [at.status for at in b.attempts[:2]] == [200, 200]
    )  # fmt: skip
    not_200 = collections.Counter(
        at.outcome for b in fleet.batches for at in b.attempts[:1] if at.status != 200
    )
    accepted_twice = sum(
        1 for b in same_id if sum(at.body.get("accepted", 0) for at in b.attempts) > len(b.stamps)
    )  # fmt: skip
    deadlocks = sum(
        1 for p in (pod_a, pod_b) for e in p.events("flush_failed") if "Deadlock" in str(e)
    )  # fmt: skip
    report(
        "two_pods_same_batch", a, batches_sent_to_both=len(same_id),
        rebatched_pairs=len(rebatched) // 2, both_answered_200=pairs_both_200,
        accepted_twice=accepted_twice, retried=len(retried), first_answers_not_200=dict(not_200),
        flush_deadlocks=deadlocks,
    )  # fmt: skip
    assert a.lost == 0 and a.duplicated == 0
    assert a.count_mismatches == 0  # one pod reports the pings accepted, the other duplicates
    assert accepted_twice == 0
    assert a.stored == a.sent == a.acked == (len(same_id) + len(rebatched) // 2) * 20
