"""Trip owners this pod has seen committed, for the buffered-ack path only.

Ownership itself is checked in each flush's transaction, against "IngestTrip" (store.py):
that check is what holds across pods, restarts and handovers. In ACK_MODE=buffered a request
is answered 202 before its flush, unless this cache says another driver owned its trip, or
its driver was refused a new trip for its daily limit, at a flush less than OWNER_CACHE_TTL_S
ago: then it waits for its flush like a durable request and gets the 403 or 429. A 202 for
rows the flush then refuses (a trip this pod has not seen lately) is counted in
ingest_batches_refused_total; those rows are dropped, never stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

_MAX_ENTRIES = 200_000  # about 150 bytes each


class OwnerCache:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl_s
        self.clock = clock
        self._owners: dict[tuple[str, str], tuple[str, float]] = {}
        self._limited: dict[tuple[str, str], float] = {}  # (org, driver) -> until

    def must_wait(self, org: str, trip: str, driver: str) -> bool:
        """Whether a buffered request should wait for its flush's ownership check: another
        driver owned the trip, or this driver hit its trip limit, less than the TTL ago."""
        now = self.clock()
        until = self._limited.get((org, driver))
        if until is not None and until > now:
            return True
        hit = self._owners.get((org, trip))
        return hit is not None and hit[0] != driver and hit[1] > now

    def limited(self, org: str, driver: str) -> None:
        """``driver`` was refused a new trip for its daily limit."""
        if len(self._limited) >= _MAX_ENTRIES:
            self._limited.clear()
        self._limited[(org, driver)] = self.clock() + self.ttl

    def update(self, owners: Mapping[tuple[str, str], str]) -> None:
        if len(self._owners) + len(owners) > _MAX_ENTRIES:
            self._owners.clear()
        expires = self.clock() + self.ttl
        for key, driver in owners.items():
            self._owners[key] = (driver, expires)

    def forget(self, org: str, trip: str) -> None:
        self._owners.pop((org, trip), None)
