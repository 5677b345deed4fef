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
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def take(self, key: Hashable) -> float:
        """Spend one token of ``key``'s bucket (a driver: key it by (org, sub), since driver
        ids are unique only within an org); 0 if allowed, else the seconds until one is."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= _MAX_KEYS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely: they hold no state worth keeping."""
        full = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
