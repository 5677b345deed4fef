"""Processes the fault scenarios start, stop, kill and restart: the service itself, and
private PostgreSQL and Redis servers (the shared ones are used by other tests, so a scenario
that takes a server away brings its own).

Plain ``subprocess.Popen`` with output to a file: a piped stdout that nobody reads would
block the service once the pipe fills, and the file can be searched for log events later.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=60,
    )  # fmt: skip


class ServiceProcess:
    """``python -m ingest serve`` on a fixed port, so that a restart answers at the same URL."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, name: str = "ingest") -> None:
        self.port = int(env.get("PORT") or free_port())
        self.env = {**os.environ, "HOST": "127.0.0.1", "LOG_LEVEL": "INFO", **env}
        self.env["PORT"] = str(self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def spawn(self) -> None:
        """Start the process (not waiting for it to be ready); it logs to ``log_path``."""
        assert self.returncode is not None or self.proc is None, "already running"
        with open(self.log_path, "ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "serve"], cwd=ROOT, env=self.env,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.starts += 1

    async def start(self, timeout: float = 20.0) -> float:
        """Start and wait until /readyz says 200; return the seconds that took."""
        started = time.monotonic()
        self.spawn()
        assert self.proc is not None
        async with aiohttp.ClientSession() as s:
            while time.monotonic() - started < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited at start:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with s.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(2)) as r:
                        if r.status == 200:
                            return time.monotonic() - started
                await asyncio.sleep(0.05)
        raise RuntimeError(f"service not ready after {timeout} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit; its exit code, or None if it is still running."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if (code := self.returncode) is not None:
                return code
            await asyncio.sleep(0.02)
        return self.returncode

    async def stop(self) -> None:
        """Make sure it is gone (cleanup): SIGTERM, then SIGKILL after a while."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        if await self.wait(15.0) is None:
            self.proc.kill()
            await self.wait(5.0)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, object]]:
        """Structured log lines whose event is ``name``."""
        out = []
        for line in self.log_text().splitlines():
            if f'"event":"{name}"' in line:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


# -- private servers ------------------------------------------------------------------------


def as_postgres_user(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres OS user when we are root."""
    if os.geteuid() != 0:
        return args
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *args]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(args)]


def postgres_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(found)
    return Path(candidates[0]).parent if candidates else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster: trust auth, fsync off (the OS cache survives a server
    crash; only a machine crash would need fsync), on a free port, in a temp directory."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise FileNotFoundError("no PostgreSQL server binaries (pg_ctl) found")
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ingest-faults-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, user="postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        result = subprocess.run(
            as_postgres_user(list(args)), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}\n{result.stderr}")

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c max_connections=50 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-w", "-t", "30", "-o", opts, "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``immediate`` is a crash (no shutdown checkpoint, recovery at the next start)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def cleanup(self) -> None:
        if self.running():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A throwaway redis-server without persistence, restartable on the same port."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server not found")
        self.exe = exe
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
