"""PostgreSQL and Redis cost per stored ping, for the capacity model (docs/scaling.md).

    .venv/bin/python -m bench.cost_per_ping [--pings 200000] [--redis standalone|cluster]

Starts a private PostgreSQL (initdb, nobody else's WAL or CPU in it), a private Redis
(standalone, or a 3-master cluster), migrates, runs ``python -m ingest serve`` and posts a
known number of unique pings (batches of --batch, 64 requests in flight, one trip per driver).
Around the posting it reads: the CPU of every PostgreSQL process (backends, WAL writer,
checkpointer, autovacuum) and every Redis node from /proc, pg_current_wal_lsn(), Redis
INFO commandstats, and the service's flush count; afterwards the partition's heap and index
sizes. Prints one JSON object. Not part of ``python -m bench``: a measurement, not a race.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from devtools.procs import ROOT, cpu_delta, cpu_seconds, die_with_parent, free_port, service, tree
from devtools.redis_cluster import PrivateRedisCluster
from devtools.services import PrivatePostgres, redis_binary

from .infra import clean_env
from .load.tokens import new_secret, sign

INFLIGHT = 64
TRIPS = 1000


class StandaloneRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ingest-cost-redis-"))
        binary = redis_binary()
        assert binary is not None, "redis-server is needed"
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )  # fmt: skip
        self.ports = [self.port]
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _redis_info(port: int) -> dict[str, int]:
    """Calls per command (INFO commandstats) on one node."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "commandstats"],
        capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    return {m[1]: int(m[2]) for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+)", out)}


def _pg_kinds(pids: dict[int, float]) -> dict[str, list[int]]:
    """PostgreSQL's processes by kind: client backends, or the background process's title."""
    kinds: dict[str, list[int]] = {}
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        title = title.replace("\0", " ").removeprefix("postgres: ").strip()
        kind = "backends" if " 127.0.0.1(" in title else title.split()[0] if title else "?"
        kinds.setdefault(kind, []).append(pid)
    return kinds


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def _post(url: str, secret: str, pings: int, tag: str, batch: int) -> None:
    # Recent timestamps, 100 ms apart: a ping older than TRUST_MISSING_MS on a trip Redis
    # has no key for would also cost a PostgreSQL lookup, which a live fleet does not pay.
    start_ms = int(time.time() * 1000) - 60_000
    requests = pings // batch
    trips = [(f"drv{i:05d}", sign(secret, f"drv{i:05d}", "driver")) for i in range(TRIPS)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            driver, token = trips[n % TRIPS]
            t0 = start_ms + (n // TRIPS) * batch * 100
            locs = [
                {"latitude": 12.9 + i * 1e-5, "longitude": 77.5 + i * 1e-5,
                 "timestamp": _ts(t0 + i * 100), "accuracy": 4.5, "speed": 11.2,
                 "heading": 87.0, "altitude": 921.0}
                for i in range(batch)
            ]  # fmt: skip
            body = {"batchId": f"{tag}{n}", "tripId": f"{tag}_{driver}", "driverId": driver,
                    "locations": locs}  # fmt: skip
            headers = {"Authorization": f"Bearer {token}"}
            async with session.post(url + "/api/v1/tracking/ping", json=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{r.status}: {await r.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(INFLIGHT)))


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


async def _sizes(conn: asyncpg.Connection) -> dict[str, Any]:
    rows = await conn.fetch(
        """SELECT c.relname, pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS idx,
                  c.reltuples::bigint AS n,
                  (SELECT json_object_agg(i.relname, pg_relation_size(i.oid))
                     FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                    WHERE x.indrelid = c.oid) AS each
             FROM pg_class c
            WHERE c.relname LIKE 'TripLocation\\_%' AND c.relkind = 'r'
              AND pg_relation_size(c.oid) > 0"""
    )
    return {r["relname"]: {"heap": r["heap"], "indexes": r["idx"],
                           "each": json.loads(r["each"] or "{}")} for r in rows}  # fmt: skip


async def measure(pings: int, mode: str, batch: int) -> dict[str, Any]:
    pg = PrivatePostgres()
    redis: StandaloneRedis | PrivateRedisCluster
    redis = StandaloneRedis() if mode == "standalone" else PrivateRedisCluster(masters=3)
    if isinstance(redis, PrivateRedisCluster):
        redis.start()
    secret = new_secret()
    proc = None
    try:
        pg.init()
        pg.start()
        db_url = pg.url.rsplit("/", 1)[0] + "/ingest"
        admin = await asyncpg.connect(pg.url)
        await admin.execute("CREATE DATABASE ingest")
        env = clean_env(DATABASE_URL=db_url, JWT_SECRET=secret, LOG_LEVEL="WARNING",
                        REDIS_URL=redis.url, REDIS_MODE=mode, RATE_LIMIT_PER_S="1000000",
                        RATE_LIMIT_BURST="1000000")  # fmt: skip
        migrate = [sys.executable, "-m", "ingest", "migrate"]
        await asyncio.to_thread(subprocess.run, migrate, env=env, cwd=ROOT, check=True)
        proc = service(env, None, name="cost")
        await proc.start()
        url = f"http://127.0.0.1:{proc.port}"
        await _post(url, secret, 2000, "w", batch)  # warm: pools, partitions, Lua script loaded
        await admin.execute("CHECKPOINT")
        pg_pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        redis_pids = (
            [redis.proc.pid] if isinstance(redis, StandaloneRedis)
            else [p.pid for p in redis.procs.values()]
        )  # fmt: skip
        lsn0 = await admin.fetchval("SELECT pg_current_wal_lsn()")
        pg0, rd0, svc0 = cpu_seconds(tree(pg_pid)), cpu_seconds(redis_pids), proc.cpu()
        cmd0 = [_redis_info(p) for p in redis.ports]
        flush0 = _metric(url, "ingest_flush_rows_count")
        t0 = time.monotonic()
        await _post(url, secret, pings, "m", batch)
        await asyncio.sleep(1.0)  # the live task's last flush
        wall = time.monotonic() - t0
        lsn1 = await admin.fetchval("SELECT pg_current_wal_lsn()")
        pg1, rd1, svc1 = cpu_seconds(tree(pg_pid)), cpu_seconds(redis_pids), proc.cpu()
        cmd1 = [_redis_info(p) for p in redis.ports]
        flushes = _metric(url, "ingest_flush_rows_count") - flush0
        pg_by_kind = {
            kind: round(cpu_delta({p: pg0.get(p, 0.0) for p in ps}, {p: pg1[p] for p in ps})
                        / pings * 1e5, 3)
            for kind, ps in _pg_kinds(pg1).items()
        }  # fmt: skip
        wal = int(await admin.fetchval("SELECT $1::pg_lsn - $2::pg_lsn", lsn1, lsn0))
        conn = await asyncpg.connect(db_url)
        await conn.execute('VACUUM ANALYZE "TripLocation"')
        stored = int(await conn.fetchval('SELECT count(*) FROM "TripLocation"'))
        sizes = await _sizes(conn)
        await conn.close()
        await admin.close()
        calls: dict[str, int] = {}
        for a, b in zip(cmd0, cmd1, strict=True):
            for k, v in b.items():
                calls[k] = calls.get(k, 0) + v - a.get(k, 0)
        per_k = 1000 / pings
        return {
            "mode": mode, "batch": batch, "pings": pings, "stored_rows": stored,
            "wall_s": round(wall, 1),
            "flushes": flushes, "rows_per_flush": round(pings / flushes, 1) if flushes else None,
            "service_cpu_s_per_100k": round(cpu_delta(svc0, svc1) / pings * 1e5, 3),
            "pg_cpu_s_per_100k": round(cpu_delta(pg0, pg1) / pings * 1e5, 3),
            "pg_cpu_s_per_100k_by_kind": pg_by_kind,
            "redis_cpu_s_per_100k": round(cpu_delta(rd0, rd1) / pings * 1e5, 3),
            "wal_bytes_per_ping": round(wal / pings, 1),
            "redis_calls_per_1k_pings": {k: round(v * per_k, 1) for k, v in calls.items()},
            "redis_calls_per_flush": {k: round(v / flushes, 2) for k, v in calls.items()}
            if flushes else {},
            "sizes": {k: {**v, "bytes_per_row": round((v["heap"] + v["indexes"]) / stored, 1)}
                      for k, v in sizes.items()},
        }  # fmt: skip
    finally:
        if proc is not None:
            await proc.stop()
        redis.stop()
        pg.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=200_000)
    parser.add_argument("--redis", choices=["standalone", "cluster"], default="standalone")
    parser.add_argument("--batch", type=int, default=20, help="pings per request")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.pings, args.redis, args.batch)), indent=2))


if __name__ == "__main__":
    main()
