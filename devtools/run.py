"""``make run``: the whole thing on one machine, for a first look and for development.

In order: PostgreSQL and Redis (DATABASE_URL / REDIS_URL, else servers on the default
ports, else throwaway ones: see services.py); migrations; the service, with a
development JWT secret, on 127.0.0.1; the driver simulator; then the dashboard URL with a
dispatcher token. Ctrl-C or SIGTERM stops everything it started, in the reverse order:
simulator, service (which commits what it buffered), then the throwaway servers.

Children run in their own sessions, so a Ctrl-C in the terminal reaches this program
only and the shutdown order holds; they also get a signal from the kernel if this program
dies, so nothing outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import asyncpg

from ingest import cli
from ingest.auth import issue_token
from ingest.settings import SettingsError, load_settings

from . import procs
from . import services as devservices

DEFAULT_PORT = 8080
# The development JWT secret, kept between runs so that tokens made in another terminal
# (JWT_SECRET_FILE=.dev/jwt_secret python -m ingest token ...) keep working.
SECRET_FILE = Path(".dev/jwt_secret")
READY_TIMEOUT_S = 30.0
SIMULATOR_STOP_S = 10.0


class Stop(Exception):
    """The first SIGINT/SIGTERM: unwind and shut down in order."""


class Devrun:
    def __init__(self) -> None:
        self.stopping = False
        self.children: list[tuple[procs.Process, float]] = []

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise Stop
        # A second Ctrl-C while shutting down: stop waiting, kill what is left.
        for child, _ in self.children:
            if child.returncode is None:
                child.kill9()

    def spawn(self, child: procs.Process, stop_timeout: float) -> procs.Process:
        child.own_session = True  # our Ctrl-C is ours alone: we stop children in order
        child.preexec_fn = procs.die_with_parent(signal.SIGTERM)
        child.spawn()
        self.children.append((child, stop_timeout))
        return child

    def stop_children(self) -> None:
        """Newest first: the simulator, then the service (SIGTERM: final flush, exit 0)."""
        while self.children:
            child, timeout = self.children.pop()
            if not child.stop_sync(timeout):
                print(f"devrun: {child.name} did not stop within {timeout:g} s, killed it")

    def exited(self) -> str | None:
        for child, _ in self.children:
            if (code := child.returncode) is not None:
                return f"{child.name} exited with code {code}"
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.run", description=__doc__)
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"HTTP port (default: $PORT, else {DEFAULT_PORT} or a free one)",
    )
    p.add_argument(
        "--drivers",
        type=int,
        default=int(os.environ.get("SIM_DRIVERS", "8")),
        help="simulated drivers (default: $SIM_DRIVERS or 8; 0: no simulator)",
    )
    p.add_argument("--org", default="demo", help="org of the drivers and the dispatcher token")
    p.add_argument("--interval", type=float, default=5.0, help="simulator upload interval, s")
    p.add_argument(
        "--secret-file", type=Path, default=SECRET_FILE,
        help=f"the development JWT secret, created on the first run (default: {SECRET_FILE})",
    )  # fmt: skip
    args = p.parse_args(argv)

    run = Devrun()
    signal.signal(signal.SIGINT, run.on_signal)
    signal.signal(signal.SIGTERM, run.on_signal)
    services: devservices.DevServices | None = None
    try:
        services = devservices.discover(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"))
        return serve(run, services, args)
    except Stop:
        return 0
    except devservices.DevServicesError as exc:
        print(f"devrun: {exc}", file=sys.stderr)
        return 1
    finally:
        run.stopping = True
        print("devrun: stopping…", flush=True)
        run.stop_children()
        if services is not None:
            services.stop()
        print("devrun: stopped, nothing left running", flush=True)


def serve(run: Devrun, services: devservices.DevServices, args: argparse.Namespace) -> int:
    own = not any(os.environ.get(k) for k in ("JWT_SECRET", "JWT_SECRET_FILE", "JWT_PUBLIC_KEY"))
    port = args.port or int(os.environ.get("PORT", "0") or 0) or _default_port()
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "PORT": str(port),
        "HOST": os.environ.get("HOST", "127.0.0.1"),
    }
    if own:
        env["JWT_SECRET_FILE"] = str(development_secret(args.secret_file))
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        print(f"devrun: {exc}", file=sys.stderr)
        return 2
    if settings.jwt_public_key:
        print("devrun: JWT_PUBLIC_KEY is set: cannot sign tokens; unset it for development",
              file=sys.stderr)  # fmt: skip
        return 2

    print(f"devrun: migrating {services.database_url}", flush=True)
    try:
        asyncio.run(cli.migrate(settings))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"devrun: cannot migrate {services.database_url}: {exc}", file=sys.stderr)
        return 1

    service = run.spawn(
        procs.service(env, None, name="service", port=port), settings.shutdown_timeout_s + 10
    )
    base = service.url
    if not service.wait_ready(READY_TIMEOUT_S):
        print(f"devrun: the service did not turn ready: {run.exited() or 'timeout'}",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.drivers > 0:
        sim = procs.Process([
            sys.executable, "-m", "devtools.simulate", "--url", base, "--drivers",
            str(args.drivers), "--org", args.org, "--interval", str(args.interval),
        ], env, port=port, name="simulator")  # fmt: skip
        run.spawn(sim, SIMULATOR_STOP_S)

    dispatcher = issue_token(settings, "dispatcher-dev", "dispatcher", args.org, 7 * 86_400)
    pg = "throwaway, deleted on exit" if services.started("postgres") else "existing"
    rd = "throwaway, deleted on exit" if services.started("redis") else "existing"
    secret = f"in {args.secret_file}" if own else "from the environment"
    token_cmd = f"JWT_SECRET_FILE={shlex.quote(str(args.secret_file))} " if own else ""
    python = os.path.relpath(sys.executable) if sys.prefix.startswith(os.getcwd()) else "python"
    token_cmd += f"{python} -m ingest token --role driver --sub drv_1 --org {args.org}"
    simulator = f"{args.drivers} drivers of org {args.org!r}" if args.drivers > 0 else "off"
    print(
        f"\n  ingest is running (development)\n\n"
        f"  Dashboard    {base}/?token={dispatcher}\n\n"
        f"  API          {base}  (/readyz, /metrics, /openapi.json)\n"
        f"  PostgreSQL   {services.database_url}  ({pg})\n"
        f"  Redis        {services.redis_url}  ({rd})\n"
        f"  JWT secret   {secret}\n"
        f"  Dispatcher   {dispatcher}\n"
        f"  A token      {token_cmd}\n"
        f"  Simulator    {simulator}\n\n"
        f"  Ctrl-C stops everything.\n",
        flush=True,
    )
    while True:
        problem = run.exited()
        if problem:
            print(f"devrun: {problem}; stopping", file=sys.stderr, flush=True)
            return 1
        time.sleep(0.5)


def development_secret(path: Path) -> Path:
    """``path``, created (owner-only) with a random secret on the first run."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def _default_port() -> int:
    return procs.free_port() if procs.listening(DEFAULT_PORT) else DEFAULT_PORT


if __name__ == "__main__":
    sys.exit(main())
