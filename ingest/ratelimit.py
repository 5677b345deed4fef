"""Per-driver token bucket for ingest requests (429 with Retry-After when empty).

Buckets live in this process: with N pods behind a balancer a driver may send up to N times
the rate. That is fine for its purpose, which is to stop one runaway phone from taking a
pod's capacity; it is not a quota.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

_MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        # key -> (tokens, last refill); tokens go below 0 while reserve()d tokens are owed
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def take(self, key: Hashable) -> float:
        """Spend one token of ``key``'s bucket (a driver: key it by (org, sub), since driver
        ids are unique only within an org); 0 if allowed, else the seconds until one is."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._spend(key, tokens, now)
        return 0.0

    def reserve(self, key: Hashable, max_wait: float) -> float | None:
        """Spend one token of ``key``'s bucket now, or borrow the next one to refill: the
        seconds until it is due (0: now), which the caller waits once, or None (nothing
        spent) if that is more than ``max_wait``.

        Borrowed tokens are due 1/rate apart, so while k requests wait, the next one's wait
        is more than k/rate: ``max_wait`` = n/rate lets at most n requests of a key wait at
        once. take() sees the debt too: a borrower is never overtaken.
        """
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = max(0.0, (1.0 - tokens) / self.rate)
        if wait > max_wait:
            self._buckets[key] = (tokens, now)
            return None
        self._spend(key, tokens, now)
        return wait

    def _spend(self, key: Hashable, tokens: float, now: float) -> None:
        if len(self._buckets) >= _MAX_KEYS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely: they hold no state worth keeping
        (a bucket in debt refills later than burst/rate after its last use)."""
        rate, burst = self.rate, self.burst
        self._buckets = {
            k: (tokens, last)
            for k, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * rate < burst
        }
