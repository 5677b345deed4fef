"""First run on a machine with nothing listening: throwaway PostgreSQL and Redis come up,
take a migration and a ping, and are gone afterwards; `make run` (devtools.run) serves the
dashboard, stores the simulator's pings and leaves no process behind on Ctrl-C.

INGEST_DEVSERVICES=throwaway makes discovery ignore the servers on 5432/6379 (this machine
has them), exactly as if nothing were listening there.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from devtools import procs
from devtools import services as devservices
from ingest.migrate import migrate

from .conftest import ROOT, batch

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those still running (zombies waiting for a reaper count as gone)."""
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


async def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    for _ in range(int(timeout / 0.1)):
        if not alive(pids):
            break
        await asyncio.sleep(0.1)
    return alive(pids)


def port_of(url: str) -> int:
    m = re.search(r":(\d+)/", url)
    assert m, url
    return int(m.group(1))


async def test_throwaway_servers_come_up_take_a_migration_and_a_ping_and_go(tmp_path):
    services = devservices.discover(mode="throwaway")
    try:
        assert [s.kind for s in services.servers] == ["postgres", "redis"]
        assert port_of(services.database_url) != devservices.PG_PORT
        assert port_of(services.redis_url) != devservices.REDIS_PORT
        conn = await asyncpg.connect(services.database_url)
        try:
            applied = await migrate(conn)
            assert applied and await conn.fetchval("""SELECT to_regclass('"TripLocation"')""")
        finally:
            await conn.close()
        r = aioredis.from_url(services.redis_url)
        try:
            assert await r.ping()
        finally:
            await r.aclose()
        pids = {s.pid for s in services.servers}
        pids |= {p for pid in pids for p in descendants(pid)}  # PostgreSQL's backends too
        dirs = [s.workdir for s in services.servers]
    finally:
        services.stop()
    assert not await wait_gone(pids)
    assert not any(d.exists() for d in dirs)
    assert not procs.listening(port_of(services.database_url))
    assert not procs.listening(port_of(services.redis_url))


async def test_given_urls_and_listening_servers_are_used_as_they_are(monkeypatch):
    given = devservices.discover("postgresql://u@db:1/x", "redis://cache:2/0", mode="throwaway")
    assert (given.database_url, given.redis_url, given.servers) == (
        "postgresql://u@db:1/x", "redis://cache:2/0", [],
    )  # fmt: skip
    monkeypatch.setattr(devservices, "listening", lambda port, host="127.0.0.1": True)
    found = devservices.discover(mode="auto")
    assert (found.database_url, found.redis_url, found.servers) == (
        devservices.DEFAULT_PG_URL, devservices.DEFAULT_REDIS_URL, [],
    )  # fmt: skip
    with pytest.raises(devservices.DevServicesError, match="INGEST_DEVSERVICES"):
        devservices.discover(mode="sometimes")


async def test_a_killed_owner_takes_its_servers_with_it():
    env = {**os.environ, devservices.MODE_ENV: "throwaway"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devtools.services", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert owner.stdout is not None
    urls = [(await asyncio.wait_for(owner.stdout.readline(), 30)).decode() for _ in range(2)]
    ports = [port_of(u.strip().split("=", 1)[1]) for u in urls]
    servers = descendants(owner.pid)
    assert servers and all(procs.listening(p) for p in ports)
    pattern = os.path.join(tempfile.gettempdir(), f"{devservices.DIR_PREFIX}{owner.pid}-*")
    devservices.remove_stale_dirs()  # a live owner's directories are not leftovers
    assert len(glob.glob(pattern)) == 2
    owner.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    await owner.wait()
    assert not await wait_gone(servers)
    assert not any(procs.listening(p) for p in ports)
    # Its directories stay until a start sweeps the leftovers of dead owners (a test running
    # in parallel may be that start, so only the sweep's outcome is asserted).
    devservices.remove_stale_dirs()
    assert glob.glob(pattern) == []


async def test_make_run_on_an_empty_machine_serves_stores_and_stops_cleanly(tmp_path: Path):
    env = {**os.environ, devservices.MODE_ENV: "throwaway", "LOG_LEVEL": "WARNING"}
    unset = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "JWT_SECRET_FILE", "JWT_PUBLIC_KEY")
    for name in (*unset, "PORT"):
        env.pop(name, None)
    secret_file = tmp_path / "dev" / "jwt_secret"
    port = procs.free_port()
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devtools.run", "--port", str(port), "--drivers", "3",
        "--interval", "0.5", "--secret-file", str(secret_file), env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert run.stdout is not None
    out: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not any("Ctrl-C stops everything" in line for line in out):
                line = (await run.stdout.readline()).decode()
                assert line, "devrun exited early:\n" + "".join(out)
                out.append(line)
        text = "".join(out)
        dashboard = re.search(r"Dashboard\s+(http://\S+/\?token=\S+)", text)
        database = re.search(r"PostgreSQL\s+(postgresql://\S+)\s+\(throwaway", text)
        assert dashboard and database, text
        assert re.search(r"Redis\s+redis://\S+\s+\(throwaway", text), text
        assert f"in {secret_file}" in text
        assert secret_file.stat().st_mode & 0o077 == 0, "the secret is readable by its owner only"
        # The token command it prints works by copy and paste in a second terminal.
        command = re.search(r"A token\s+(.+)", text)
        assert command, text
        second = {k: v for k, v in env.items() if not k.startswith("JWT_")}
        made = await asyncio.create_subprocess_shell(
            command.group(1), cwd=ROOT, env=second, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        token, err = await made.communicate()
        assert made.returncode == 0, err
        driver = {"Authorization": f"Bearer {token.decode().strip()}"}
        processes = descendants(run.pid)
        assert len(processes) >= 4  # postgres, redis, service, simulator (and backends)

        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with http.get(dashboard.group(1)) as r:
                assert r.status == 200 and "<title>Fleet" in await r.text()
            async with http.get(f"{base}/static/dashboard.js") as r:
                assert r.status == 200
            ping = f"{base}/api/v1/tracking/ping"
            async with http.post(ping, json=batch(1, trip="first"), headers=driver) as r:
                assert r.status == 200, await r.text()
        await readme_first_ping_and_subscription_work(base, secret_file, second)
        # The simulator's pings land in the throwaway database.
        conn = await asyncpg.connect(database.group(1))
        try:
            count = 0
            for _ in range(100):
                count = await conn.fetchval('SELECT count(*) FROM "TripLocation"')
                if count >= 3:
                    break
                await asyncio.sleep(0.1)
            assert count >= 3
        finally:
            await conn.close()

        run.send_signal(signal.SIGINT)  # Ctrl-C
        async with asyncio.timeout(45):
            rest = (await run.stdout.read()).decode()
            code = await run.wait()
        assert code == 0, rest
        assert "nothing left running" in rest
        assert not await wait_gone(processes)
        assert not procs.listening(port)
        assert not procs.listening(port_of(database.group(1)))
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()


def readme_block(heading: str, secret_file: Path, base: str) -> str:
    """The first ```sh block under ``heading`` in the README, as a reader pastes it: with
    the URL make run printed and (here) the test's secret file."""
    section = (ROOT / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```\n", 1)[0]
    block = re.sub(r"^URL=\S+", f"URL={base}", block, flags=re.M)
    return block.replace(".dev/jwt_secret", str(secret_file))


async def readme_first_ping_and_subscription_work(
    base: str, secret_file: Path, env: dict[str, str]
) -> None:
    """README's "A first ping" and "A first subscription", pasted into a second terminal."""
    ping = readme_block("A first ping", secret_file, base)
    assert "JWT_SECRET_FILE=" in ping and "ingest token" in ping
    sh = await asyncio.create_subprocess_exec(
        "bash", "-euc", ping, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(sh.communicate(), 60)
    assert sh.returncode == 0, err
    answer = json.loads(out)
    assert (answer["accepted"], answer["duplicates"], len(answer["rejected"])) == (1, 0, 1), answer

    follow = readme_block("A first subscription", secret_file, base)
    # A terminal is line-buffered; a pipe is not, unless asked.
    sh = await asyncio.create_subprocess_exec(
        "bash", "-euc", f"URL={base}\n{follow}", cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert sh.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(30):
            while "trip_first" not in seen:
                line = (await sh.stdout.readline()).decode()
                assert line, f"the subscription client exited: {seen}"
                seen += line
    finally:
        os.killpg(sh.pid, signal.SIGKILL)  # bash and the client it started
        await sh.wait()
    assert '"type":"subscribed"' in seen.replace(" ", ""), seen
