"""Fixtures of the fault scenarios: the service as processes, private servers to break.

The shared PostgreSQL and Redis serve every other test running in parallel, so they are
never stopped: a scenario that stops a server gets a private one (``private_postgres``,
``private_redis``); the others use a fresh database of their own on the shared server
(``database``, from tests/conftest.py) and their own Redis key prefix.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from devtools import procs
from devtools.procs import Process

from ..conftest import REDIS_URL, SECRET


def slow_storage(seconds: float) -> str:
    """SQL making every flush's insert into "TripLocation" take ``seconds`` longer."""
    return f"""
CREATE FUNCTION faults_slow_storage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
CREATE TRIGGER faults_slow_storage AFTER INSERT ON "TripLocation"
FOR EACH STATEMENT EXECUTE FUNCTION faults_slow_storage();
"""


def service_env(database_url: str, redis_url: str, prefix: str, **over: Any) -> dict[str, str]:
    """The environment of one service process; ``over`` keys are setting names, any case."""
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "JWT_SECRET": SECRET,
        "ROLE": "all",
        "ACK_MODE": "durable",
        "FLUSH_INTERVAL_MS": "25",
        "ACK_TIMEOUT_MS": "2000",
        "FLUSH_RETRY_MIN_MS": "50",
        "FLUSH_RETRY_MAX_MS": "500",
        "RATE_LIMIT_PER_S": "100000",
        "RATE_LIMIT_BURST": "100000",
        "SHUTDOWN_TIMEOUT_S": "10",
        "DB_POOL_MAX": "4",
        "LOG_LEVEL": "INFO",
    }
    env.update({k.upper(): str(v) for k, v in over.items()})
    return env


ServiceFactory = Callable[..., Awaitable[Process]]


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every scenario here is slow. Those that run the service as processes (``services``)
    drive them with the load generator and check time bounds: marked timing too."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.slow)
            if "services" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.timing)


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Start service processes (``await services(env, name=...)``); all stopped after the test.

    Their logs (JSON lines) stay in the test's tmp_path; FAULTS_SHOW_LOGS=1 prints their
    tails after the test (with -s).
    """
    started: list[Process] = []

    async def make(env: dict[str, str], name: str = "ingest", start: bool = True) -> Process:
        svc = procs.service(env, tmp_path, name=name)
        started.append(svc)
        if start:
            await svc.start()
        return svc

    yield make
    for svc in started:
        await svc.stop()
    if os.environ.get("FAULTS_SHOW_LOGS"):
        for svc in started:
            print(f"\n--- {svc.log_path.name} ---\n{svc.log_tail(60)}")


@pytest.fixture
def shared_env(database: str, redis_prefix: str) -> Callable[..., dict[str, str]]:
    """Environment for a service on the shared servers: own database, own Redis prefix."""

    def make(**over: Any) -> dict[str, str]:
        return service_env(database, REDIS_URL, redis_prefix, **over)

    return make
