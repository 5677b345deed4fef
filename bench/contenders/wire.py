"""The wire types the reference servers decode with: the native batch, with timestamps parsed
by msgspec's own C parser into datetimes (the service itself parses the text so that it can cut
digits below the millisecond, validate.py). The references do no more than they must."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec


class Location(msgspec.Struct, gc=False):
    latitude: float
    longitude: float
    timestamp: Annotated[datetime, msgspec.Meta(tz=True)] | int
    accuracy: float | None = None
    speed: float | None = None
    heading: float | None = None
    altitude: float | None = None
    batchId: str | None = None


class PingBatch(msgspec.Struct):
    tripId: str
    driverId: str
    locations: list[Location]
    batchId: str | None = None


json_batch_decoder = msgspec.json.Decoder(PingBatch)
