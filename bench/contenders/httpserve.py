"""Run a small aiohttp app the way the service runs (uvloop, no access log) until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import uvloop
from aiohttp import web


def serve(app: web.Application) -> None:
    app.router.add_get("/healthz", _healthz)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, int(os.environ["PORT"])))


async def _serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")
