"""Run the service as its own process, the way operators do (python -m ingest serve)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m ingest ARGS`` with the test JWT secret and ``env`` on top of ours."""
    from .conftest import SECRET

    return subprocess.run(
        [sys.executable, "-m", "ingest", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "JWT_SECRET": SECRET, **env}, timeout=60,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", **env}
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 15.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingest", "serve", env=self.env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        async with aiohttp.ClientSession() as s:
            while loop.time() < end:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"service exited: {await self.proc.stderr.read()!r}")  # type: ignore[union-attr]
                try:
                    async with s.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("service did not become ready")

    async def stop(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """SIGTERM and wait; returns (exit code, stdout, stderr)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        return self.proc.returncode or 0, out.decode(), err.decode()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
