"""Processes under test: start, wait until ready, read their CPU time and memory from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import aiohttp

from .infra import ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from "state" on; comm may hold spaces


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """user + system CPU seconds of each live pid (utime, stime: fields 14 and 15)."""
    out = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            out[pid] = (int(st[11]) + int(st[12])) / CLK_TCK
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two samples; a pid born in between counts from zero."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Server:
    """A process under test, its output in ``log_path``."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], port: int,
        log_path: Path, ready_path: str = "/healthz",
    ) -> None:  # fmt: skip
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.ready_path = ready_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            log.close()
        end = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < end:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name} exited; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(self.url + self.ready_path) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout} s; see {self.log_path}")

    def cpu(self) -> dict[int, float]:
        return cpu_seconds(tree(self.pid))

    def rss_mib(self) -> float:
        return sum(status_kib(p, "VmRSS") for p in tree(self.pid)) / 1024

    def hwm_mib(self) -> float:
        """Peak resident set size since start (VmHWM), summed over the process tree."""
        return sum(status_kib(p, "VmHWM") for p in tree(self.pid)) / 1024

    async def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, not idle/iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK
