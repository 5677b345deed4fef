"""The record: one stored ping as a tuple, in the column order COPY receives it.

Validation builds records, the buffer holds them, the flusher COPYs them and the live step
reads them; the named indexes below are how every stage reads a field (a tuple is the
cheapest row to build, hold and COPY; the names keep ``r[9]`` out of the code).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

# Column order of a record, as COPY receives it.
COLUMNS = (
    "tripId",
    "driverId",
    "orgId",
    "latitude",
    "longitude",
    "accuracy",
    "speed",
    "heading",
    "altitude",
    "timestamp",
    "batchId",
)
# Indexes into a record, for the stages downstream.
TRIP: Final = 0
DRIVER: Final = 1
ORG: Final = 2
LAT: Final = 3
LON: Final = 4
ACC: Final = 5
SPEED: Final = 6
HEADING: Final = 7
ALT: Final = 8
TS: Final = 9
BATCH: Final = 10

Record = tuple[
    str, str, str | None, float, float, float | None, float | None, float | None, float | None,
    datetime, str | None,
]  # fmt: skip
