"""The commands behind ``python -m ingest``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

import asyncpg

from . import http_server, logs, maintenance
from . import migrate as migrations
from . import partitions as parts
from .app import create_app
from .auth import issue_token
from .settings import Settings
from .shutdown import shutdown

log = logging.getLogger("ingest")


def serve(settings: Settings) -> int:
    logs.setup(settings.log_level)
    logs.capture_stderr()
    if settings.auth_disabled:
        banner = "AUTH_DISABLED=true: every request is accepted without a token. Development only!"
        print(f"\n{'!' * 80}\n{banner}\n{'!' * 80}\n", file=sys.stderr, flush=True)
        log.warning("auth_disabled", extra={"detail": banner})
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not built for this platform
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(settings))
    return 0


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    # Every connection costs a file descriptor: take all the kernel allows, and keep the
    # connection cap under it, so that a flood of connections never stops accept().
    fd_limit = http_server.raise_fd_limit()
    max_connections = http_server.connection_cap(settings.http_max_connections, fd_limit)
    if max_connections < settings.http_max_connections:
        log.warning(
            "http_max_connections_lowered",
            extra={"max_connections": max_connections, "open_files_limit": fd_limit},
        )
    runner = await http_server.start(app, settings, max_connections=max_connections)
    # Everything allocated so far lives as long as the process: take it out of the
    # collector's sight, and collect less often (the hot path makes tuples, not cycles).
    # Measured: GC was 18-20% of the ingest profile; this cut CPU per ping by 12%.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    port = runner.addresses[0][1] if runner.addresses else settings.port
    log.info(
        "listening",
        extra={"port": port, "role": settings.role, "ack_mode": settings.ack_mode,
               "max_connections": max_connections},
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # The whole drain, step by step, within SHUTDOWN_TIMEOUT_S (shutdown.py).
    await shutdown(app, runner, settings.shutdown_timeout_s)


async def migrate(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrations.migrate(conn)
        for name in applied:
            print(f"applied {name}")
        if not applied:
            print("nothing to apply: schema is up to date")
        done = await maintenance.run_once(conn, settings)
        for name in done["created"]:  # type: ignore[attr-defined]
            print(f"created partition {name}")
    finally:
        await conn.close()
    return 0


async def partitions(settings: Settings, maintain: bool) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        if maintain:
            done = await maintenance.run_once(conn, settings)
            for name in done["created"]:  # type: ignore[attr-defined]
                print(f"created {name}")
            for name in done["dropped"]:  # type: ignore[attr-defined]
                print(f"dropped {name}")
        rows = await parts.list_partitions(conn)
    finally:
        await conn.close()
    print(f"{'partition':<24} {'month':<8} {'rows (est.)':>12} {'size':>10}")
    for p in rows:
        print(f"{p.name:<24} {p.month:<8} {p.rows_estimate:>12} {_size(p.size_bytes):>10}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def token(settings: Settings, args: argparse.Namespace) -> int:
    key = Path(args.private_key).read_text() if args.private_key else None
    try:
        print(issue_token(settings, args.sub, args.role, args.org, args.ttl, key=key))
    except Exception as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    return 0
