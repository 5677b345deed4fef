"""What every stage of a benchmark run shares: the database, Redis prefix, secret, tokens,
where logs and results go, and the progress line."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.procs import Process, free_port

from .infra import BenchDB, clean_env

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Context:
    db: BenchDB
    redis_url: str
    redis_prefix: str
    secret: str
    work: Path  # temporary files: token data, server logs
    lua_drivers: Path
    json_drivers: Path
    quick: bool
    settings: dict[str, str] = field(default_factory=dict)  # --set: for every process under test
    started: float = field(default_factory=time.monotonic)
    _tags: itertools.count[int] = field(default_factory=itertools.count)

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def tag(self) -> str:
        """A short unique prefix for trip and batch ids of one run."""
        return f"r{next(self._tags)}"

    def env(self, port: int, **settings: str) -> dict[str, str]:
        """The environment of a process under test: the service's settings and nothing
        inherited that could change them."""
        base = dict(
            PORT=str(port), HOST="127.0.0.1", DATABASE_URL=self.db.url,
            REDIS_URL=self.redis_url, REDIS_PREFIX=self.redis_prefix, JWT_SECRET=self.secret,
            RATE_LIMIT_PER_S="1000000", RATE_LIMIT_BURST="1000000", FLUSH_INTERVAL_MS="50",
            GEOFENCE_CHANGES_PER_S="1000000", GEOFENCE_CHANGES_BURST="1000000",
            LOG_LEVEL="WARNING",
        )  # fmt: skip
        return clean_env(**{**base, **self.settings, **settings})

    def server(self, name: str, argv: list[str], ready_path: str, **settings: str) -> Process:
        port = free_port()
        return Process(
            argv, self.env(port, **settings), port=port, name=name,
            log_path=self.work / f"{name}.log", ready_path=ready_path,
        )  # fmt: skip
