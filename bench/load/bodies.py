"""Request bodies for the Python load generators: the same unique batches as wrk's script
(bench/load/wrk/pings.lua): each driver drives one trip, timestamps 1 ms apart, fresh batchIds.

Drivers are served round-robin and all start at the same timestamp, so every driver sends
the same sequence of timestamp blocks: the "locations" JSON of a block is built once and
reused by every driver (on a different trip, so each ping is still unique). That keeps the
generator's CPU, which the server under test would otherwise lose, small."""

from __future__ import annotations

import time


class Trips:
    def __init__(self, pairs: list[list[str]], batch: int, tag: str, host: str) -> None:
        self.batch = batch
        self.tag = tag
        start_ms = int(time.time() * 1000) - 600_000
        self.drivers = [
            (d, f"{tag}_{d}", (
                f"POST /api/v1/tracking/ping HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {t}\r\nContent-Type: application/json\r\n"
            ).encode())
            for d, t in pairs
        ]  # fmt: skip
        self.next_ms = [start_ms] * len(pairs)
        self._locs: dict[int, str] = {}
        self.i = 0
        self.seq = 0
        self._sec = -1
        self._stamp = ""

    def _ts(self, ms: int) -> str:
        sec = ms // 1000
        if sec != self._sec:
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        return f"{self._stamp}{ms % 1000:03d}Z"

    def request(self) -> bytes:
        """The next request, as bytes ready to write."""
        i = self.i = (self.i + 1) % len(self.drivers)
        self.seq += 1
        driver, trip, head = self.drivers[i]
        ms = self.next_ms[i]
        self.next_ms[i] = ms + self.batch
        locs = self._locs.get(ms)
        if locs is None:
            self._locs.pop(ms - 2 * self.batch, None)  # every driver is past that block
            locs = self._locs[ms] = ",".join(
                f'{{"latitude":{12.9 + (t % 100000) * 1e-6:.6f},"longitude":{77.5 + (t % 70000) * 1e-6:.6f},'
                f'"timestamp":"{self._ts(t)}","accuracy":4.5,"speed":11.2,"heading":87.0,"altitude":921.0}}'
                for t in range(ms, ms + self.batch)
            )
        body = (
            f'{{"batchId":"{self.tag}-{self.seq}","tripId":"{trip}","driverId":"{driver}",'
            f'"locations":[{locs}]}}'
        ).encode()
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
