"""The contenders of the ingest benchmark: how to start each, and what it is."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    module: str  # run as ``python -m <module> [args]``
    ready_path: str
    about: str
    http: bool = True  # False: no HTTP, the benchmark drives it directly (bare COPY)

    def argv(self, *args: str) -> list[str]:
        if self.module == "ingest":
            return [sys.executable, "-m", "ingest", "serve"]
        return [sys.executable, "-m", self.module, *args]


SERVICE = Contender(
    "service", "ingest (this service)", "ingest", "/readyz",
    "python -m ingest serve: auth, validation, bounded buffer, group-commit COPY with dedup,"
    " Redis latest + publish, metrics",
)  # fmt: skip
NAIVE = Contender(
    "naive", "naive reference", "bench.contenders.reference_naive", "/healthz",
    "REFERENCE (bench/contenders/reference_naive.py): per request JWT verify, decode, INSERT"
    " in its own transaction, then Redis SET latest + PUBLISH",
)  # fmt: skip
PIPELINE = Contender(
    "pipeline", "limit: bare pipeline", "bench.contenders.limit_pipeline", "/healthz",
    "LIMIT (bench/contenders/limit_pipeline.py): decode, append, one COPY per flush interval"
    " that the requests await; nothing else",
)  # fmt: skip
DECODE = Contender(
    "decode", "limit: read+decode", "bench.contenders.limit_decode", "/healthz",
    "LIMIT (bench/contenders/limit_decode.py): aiohttp handler that reads and msgspec-decodes"
    " the body, stores nothing",
)  # fmt: skip
COPY = Contender(
    "copy", "limit: bare COPY", "bench.contenders.limit_copy", "",
    "LIMIT (bench/contenders/limit_copy.py): asyncpg binary COPY of the same rows into the same"
    " table, one connection, no HTTP",
    http=False,
)  # fmt: skip

ALL = {c.key: c for c in (SERVICE, NAIVE, PIPELINE, DECODE, COPY)}
