"""A throwaway Redis Cluster from the redis-server and redis-cli binaries: masters (each with
a replica if asked) on free ports, no persistence, a short node timeout so that a killed
master's replica takes over within a few seconds. Used by the cluster tests and benches."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .procs import die_with_parent, free_port, listening
from .services import redis_binary

NODE_TIMEOUT_MS = 1000


class RedisClusterError(RuntimeError):
    pass


class PrivateRedisCluster:
    """``masters`` masters and ``replicas`` replicas of each, on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        server = redis_binary()
        cli = shutil.which("redis-cli")
        if server is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli are needed for a Redis Cluster")
        self.server, self.cli = str(server), cli
        self.masters, self.replicas = masters, replicas
        self.dir = Path(tempfile.mkdtemp(prefix="ingest-redis-cluster-"))
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """REDIS_URL naming one node: the client finds the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        ports: list[int] = []
        while len(ports) < self.masters * (1 + self.replicas):
            port = free_port()
            # The cluster bus listens on port + 10000: it must be free too.
            if port not in ports and port + 10000 <= 65535 and not listening(port + 10000):
                ports.append(port)
        self.ports = ports
        for port in ports:
            self._spawn(port)
        deadline = time.monotonic() + 10
        while not all(listening(p) for p in ports):
            if time.monotonic() > deadline:
                raise RedisClusterError("cluster nodes did not start listening")
            time.sleep(0.02)
        created = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise RedisClusterError(f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}")
        self.wait_ok()
        self._wait_replicas_synced()

    def _wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every replica has its master's data (a replica that never synced cannot
        take over)."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                info = self.command(port, "info", "replication")
                if "role:master" in info or "master_link_status:up" in info:
                    break
                if time.monotonic() > deadline:
                    raise RedisClusterError(f"replica {port} did not sync: {info}")
                time.sleep(0.05)

    def _spawn(self, port: int) -> None:
        args = [
            self.server, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no",
            # A replica may take over however long ago it last heard from its master.
            "--cluster-replica-validity-factor", "0",
            "--dir", str(self.dir), "--loglevel", "warning",
            "--logfile", str(self.dir / f"redis-{port}.log"),
        ]  # fmt: skip
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )  # fmt: skip

    def command(self, port: int, *args: str) -> str:
        """A redis-cli command against one node; its output."""
        result = subprocess.run(
            [self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout

    def wait_ok(self, timeout: float = 30.0, ports: list[int] | None = None) -> None:
        """Until every running node (or ``ports``) reports cluster_state:ok and agrees that
        every slot is served."""
        deadline = time.monotonic() + timeout
        check = ports or [p for p, proc in self.procs.items() if proc.poll() is None]
        while True:
            infos = [self.command(p, "cluster", "info") for p in check]
            if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return
            if time.monotonic() > deadline:
                raise RedisClusterError(f"cluster not ok after {timeout} s: {infos}")
            time.sleep(0.05)

    def master_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot``, as a running node sees it."""
        alive = next(p for p, proc in self.procs.items() if proc.poll() is None)
        for line in self.command(alive, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise RedisClusterError(f"no master serves slot {slot}")

    def wait_failover(self, dead: int, slot: int, timeout: float = 30.0) -> int:
        """Until a replica of the killed master ``dead`` serves ``slot`` and the cluster is ok
        again; the new master's port."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RedisClusterError):
                port = self.master_of_slot(slot)
                if port != dead:
                    self.wait_ok(max(0.1, deadline - time.monotonic()))
                    return port
            if time.monotonic() > deadline:
                raise RedisClusterError(f"no failover of {dead} after {timeout} s")
            time.sleep(0.05)

    def move_slot(self, slot: int, to: int) -> None:
        """Reshard one slot, keys and all, to the master on port ``to``, as
        `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE, then SETSLOT NODE
        on every master."""
        src = self.master_of_slot(slot)
        src_id = self.command(src, "cluster", "myid").strip()
        dst_id = self.command(to, "cluster", "myid").strip()
        self.command(to, "cluster", "setslot", str(slot), "importing", src_id)
        self.command(src, "cluster", "setslot", str(slot), "migrating", dst_id)
        while keys := self.command(src, "cluster", "getkeysinslot", str(slot), "100").split():
            out = self.command(src, "migrate", "127.0.0.1", str(to), "", "0", "5000", "keys", *keys)
            if "OK" not in out:
                raise RedisClusterError(f"MIGRATE failed: {out}")
        for port, proc in self.procs.items():
            if proc.poll() is None and "role:master" in self.command(port, "info", "replication"):
                self.command(port, "cluster", "setslot", str(slot), "node", dst_id)
        self.wait_ok()

    def kill(self, port: int) -> None:
        """SIGKILL one node: a crash, as far as the cluster can tell."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
