"""The one process harness: the service (or any HTTP server) as a child process, the way
operators run it, for `make run`, the tests and the benchmarks.

Plain ``subprocess.Popen`` with output to a file (or the terminal): a piped stdout that nobody
reads would block the child once the pipe fills, and a file can be searched for log events.
Waiting is by polling, so the same object serves a synchronous program (`make run`) and
asyncio tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1  # prctl option
# Loopback only: never through an HTTP proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to send ``sig`` to the child when its parent thread
    dies (Linux only). Spawn from the main thread: the signal follows the spawning thread."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load after
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def run_cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m ingest ARGS`` with ``env`` on top of ours."""
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=60,
    )  # fmt: skip


class Process:
    """A child process serving HTTP on ``port``; ready once ``ready_path`` answers 200.

    Output goes to ``log_path`` (appended across restarts) or, without one, to our own
    stdout. The port stays fixed, so a restarted process answers at the same URL.
    """

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], *, port: int, name: str = "ingest",
        log_path: Path | None = None, ready_path: str = "/readyz",
        preexec_fn: Callable[[], None] | None = None, own_session: bool = False,
    ) -> None:  # fmt: skip
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.ready_path = ready_path
        self.preexec_fn = preexec_fn
        # Its own session: a Ctrl-C in the terminal reaches only the parent, which then stops
        # its children in order.
        self.own_session = own_session
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
        """Start the process, not waiting for it to be ready."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        out = None
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it, we close ours
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT if out else None,
                preexec_fn=self.preexec_fn, start_new_session=self.own_session,
            )  # fmt: skip
        finally:
            if out is not None:
                out.close()
        self.starts += 1

    def ready(self) -> bool:
        try:
            with _OPENER.open(self.url + self.ready_path, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> bool:
        """Block until ready; False if it exited or the time ran out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.returncode is not None:
                return False
            if self.ready():
                return True
            time.sleep(0.05)
        return False

    async def start(self, timeout: float = 30.0) -> float:
        """Start and wait until ready; return the seconds that took."""
        started = time.monotonic()
        self.spawn()
        while time.monotonic() - started < timeout:
            if self.returncode is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if await asyncio.to_thread(self.ready):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

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

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.returncode
        self.proc.terminate()
        if await self.wait(timeout) is None:
            self.proc.kill()
            await self.wait(5.0)
        return self.returncode

    def stop_sync(self, timeout: float) -> bool:
        """`stop` for a synchronous caller; False if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
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

    def cpu(self) -> dict[int, float]:
        return cpu_seconds(tree(self.pid))

    def rss_mib(self) -> float:
        return sum(status_kib(p, "VmRSS") for p in tree(self.pid)) / 1024

    def hwm_mib(self) -> float:
        """Peak resident set size since start (VmHWM), summed over the process tree."""
        return sum(status_kib(p, "VmHWM") for p in tree(self.pid)) / 1024


def service(
    env: Mapping[str, str], log_dir: Path | None, *, name: str = "ingest",
    port: int | None = None, **options: object,
) -> Process:  # fmt: skip
    """``python -m ingest serve`` on 127.0.0.1 with our environment and ``env`` on top."""
    port = port or int(env.get("PORT") or 0) or free_port()
    full = {**os.environ, "HOST": "127.0.0.1", "LOG_LEVEL": "INFO", **env, "PORT": str(port)}
    log_path = log_dir / f"{name}.log" if log_dir is not None else None
    # A test run that is killed (a timeout, Ctrl-C) must not leave services running.
    options.setdefault("preexec_fn", die_with_parent(signal.SIGTERM))
    return Process(
        [sys.executable, "-m", "ingest", "serve"], full, port=port, name=name,
        log_path=log_path, **options,  # type: ignore[arg-type]
    )  # fmt: skip


# -- /proc readers: CPU time and memory of a process tree -------------------------------------


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


def user_system_seconds(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU seconds of the live ``pids``, summed (utime, stime)."""
    stats = [st for st in map(_stat, pids) if st is not None]
    return (
        sum(int(st[11]) for st in stats) / CLK_TCK,
        sum(int(st[12]) for st in stats) / CLK_TCK,
    )


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


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 once it is gone)."""
    return status_kib(pid, "VmRSS") / 1024
