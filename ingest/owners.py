"""Trip owners this pod has seen committed, for the buffered-ack path only.

Ownership itself is checked in each flush's transaction, against "IngestTrip" (store.py):
that check is what holds across pods, restarts and handovers. In ACK_MODE=buffered a request
is answered 202 before its flush; it gets that early answer only if this cache says its driver
owned the trip at a flush less than OWNER_CACHE_TTL_S ago, and otherwise waits for its flush
like a durable request. So a 202 for rows the flush then refuses can only follow a handover
made in the last OWNER_CACHE_TTL_S on another pod (counted in
ingest_batches_refused_total).
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

    def owned_by(self, org: str, trip: str, driver: str) -> bool:
        """True if ``driver`` owned the trip at a flush less than the TTL ago."""
        hit = self._owners.get((org, trip))
        return hit is not None and hit[0] == driver and hit[1] > self.clock()

    def update(self, owners: Mapping[tuple[str, str], str]) -> None:
        if len(self._owners) + len(owners) > _MAX_ENTRIES:
            self._owners.clear()
        expires = self.clock() + self.ttl
        for key, driver in owners.items():
            self._owners[key] = (driver, expires)

    def forget(self, org: str, trip: str) -> None:
        self._owners.pop((org, trip), None)
