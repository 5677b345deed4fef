"""``make run``: the whole thing on one machine, for a first look and for development.

In order: PostgreSQL and Redis (DATABASE_URL / REDIS_URL, else servers on the default
ports, else throwaway ones: see devservices.py); migrations; the service, with a
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
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

import asyncpg

from . import cli, devservices
from .auth import issue_token
from .settings import SettingsError, load_settings

DEFAULT_PORT = 8080
READY_TIMEOUT_S = 30.0
SIMULATOR_STOP_S = 10.0


class Stop(Exception):
    """The first SIGINT/SIGTERM: unwind and shut down in order."""


class Devrun:
    def __init__(self) -> None:
        self.stopping = False
        self.children: list[tuple[str, subprocess.Popen[bytes], float]] = []

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise Stop
        # A second Ctrl-C while shutting down: stop waiting, kill what is left.
        for _, proc, _ in self.children:
            if proc.poll() is None:
                proc.kill()

    def spawn(self, name: str, args: list[str], env: dict[str, str], stop_timeout: float) -> None:
        proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=devservices.die_with_parent(signal.SIGTERM),
        )  # fmt: skip
        self.children.append((name, proc, stop_timeout))

    def stop_children(self) -> None:
        """Newest first: the simulator, then the service (SIGTERM: final flush, exit 0)."""
        while self.children:
            name, proc, timeout = self.children.pop()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"devrun: {name} did not stop within {timeout:g} s, killing it")
                    proc.kill()
                    proc.wait()

    def exited(self) -> str | None:
        for name, proc, _ in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ingest.devrun", description=__doc__)
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
    generated = not os.environ.get("JWT_SECRET") and not os.environ.get("JWT_PUBLIC_KEY")
    port = args.port or int(os.environ.get("PORT", "0") or 0) or _default_port()
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "PORT": str(port),
        "HOST": os.environ.get("HOST", "127.0.0.1"),
    }
    if generated:
        env["JWT_SECRET"] = secrets.token_urlsafe(32)
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

    base = f"http://127.0.0.1:{port}"
    run.spawn("service", [sys.executable, "-m", "ingest", "serve"], env,
              settings.shutdown_timeout_s + 10)  # fmt: skip
    if not _wait_ready(run, base):
        print(f"devrun: the service did not turn ready: {run.exited() or 'timeout'}",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.drivers > 0:
        run.spawn("simulator", [
            sys.executable, "-m", "ingest.simulate", "--url", base, "--drivers",
            str(args.drivers), "--org", args.org, "--interval", str(args.interval),
        ], env, SIMULATOR_STOP_S)  # fmt: skip

    dispatcher = issue_token(settings, "dispatcher-dev", "dispatcher", args.org, 7 * 86_400)
    pg = "throwaway, deleted on exit" if services.started("postgres") else "existing"
    rd = "throwaway, deleted on exit" if services.started("redis") else "existing"
    secret = "generated for this run" if generated else "from the environment"
    simulator = f"{args.drivers} drivers of org {args.org!r}" if args.drivers > 0 else "off"
    print(
        f"\n  ingest is running (development)\n\n"
        f"  Dashboard    {base}/?token={dispatcher}\n\n"
        f"  API          {base}  (/readyz, /metrics, /openapi.json)\n"
        f"  PostgreSQL   {services.database_url}  ({pg})\n"
        f"  Redis        {services.redis_url}  ({rd})\n"
        f"  JWT_SECRET   {env['JWT_SECRET']}  ({secret})\n"
        f"  Dispatcher   {dispatcher}\n"
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


def _default_port() -> int:
    return devservices.free_port() if devservices.listening(DEFAULT_PORT) else DEFAULT_PORT


def _wait_ready(run: Devrun, base: str) -> bool:
    end = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < end:
        if run.exited():
            return False
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    sys.exit(main())
