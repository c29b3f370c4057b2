"""Private Redis servers for the store's fault tests: a six-node cluster (three primaries, three
replicas) and a Sentinel set (one primary, one replica, three sentinels), each on its own ports and
in a temporary directory. Every process is ours (started here, killed here by PID, never by name),
and ``stop()`` kills what is left even after a failed test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

NODE_TIMEOUT_MS = 2000  # cluster-node-timeout: how long before a silent primary is failed over
BASE_PORT = int(os.environ.get("RELAY_TEST_REDIS_PORT_BASE", "7100"))


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Server:
    """One redis-server process we started."""

    port: int
    directory: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    def start(self) -> None:
        with open(self.directory / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        self.stopped = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _free(self.port):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"redis on {self.port} exited: {(self.directory / 'server.log').read_text()[-500:]}")
            time.sleep(0.05)
        raise RuntimeError(f"redis on {self.port} did not listen")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: a crash. Its socket goes at once (connections are refused, not silent)."""
        if self.process is not None and self.process.poll() is None:
            self.resume()
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(5)

    def freeze(self) -> None:
        """SIGSTOP: a hung server; connections stay open and nothing answers."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.stopped and self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)


def _common(port: int, directory: Path) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "", "--appendonly", "no",
        "--protected-mode", "no", "--daemonize", "no",
    ]  # fmt: skip


@dataclass
class RedisSet:
    """Servers started together and stopped together."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="relay-redis-")))
    servers: list[Server] = field(default_factory=list)

    def add(self, port: int, extra: list[str], program: str = "redis-server") -> Server:
        if not _free(port):
            raise RuntimeError(f"port {port} is taken: set RELAY_TEST_REDIS_PORT_BASE to another range")
        directory = self.root / str(port)
        directory.mkdir(parents=True, exist_ok=True)
        server = Server(port, directory, [program, *extra])
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class Cluster(RedisSet):
    """Six nodes on BASE_PORT..+5, three primaries with one replica each."""

    def __init__(self, base: int = BASE_PORT) -> None:
        super().__init__()
        for port in range(base, base + 6):
            directory = self.root / str(port)
            self.add(
                port,
                [
                    *_common(port, directory),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    "--cluster-replica-validity-factor",
                    "0",
                ],
            )

    @property
    def urls(self) -> str:
        return ",".join(f"redis://127.0.0.1:{s.port}" for s in self.servers[:3])

    def start(self) -> None:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy()

    def alive(self) -> list[Server]:
        return [s for s in self.servers if s.process is not None and s.process.poll() is None and not s.stopped]

    def wait_healthy(self, timeout: float = 60) -> None:
        """cluster_state:ok everywhere and every replica synced (an unsynced one would not be promoted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ok = True
                for server in self.alive():
                    with server.client() as c:
                        if c.cluster("info")["cluster_state"] != "ok":  # type: ignore[index]
                            ok = False
                        info = c.info("replication")
                        if info["role"] == "slave" and info.get("master_link_status") != "up":
                            ok = False
                if ok and sum(1 for s in self.alive() if self.role(s) == "master") == 3:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the cluster did not become healthy")

    @staticmethod
    def role(server: Server) -> str:
        with server.client() as c:
            return str(c.info("replication")["role"])

    def owner(self, key: str) -> Server:
        """The primary that owns *key*'s slot now."""
        for server in self.alive():
            with server.client() as c:
                slot = int(c.cluster("keyslot", key))  # type: ignore[arg-type]
                for start, end, primary, *_ in c.cluster("slots"):  # type: ignore[union-attr]
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(s for s in self.servers if s.port == port)
        raise RuntimeError("no node answers")


class SentinelSet(RedisSet):
    """A primary and a replica (BASE_PORT+10, +11) watched by three sentinels (+20..+22) as MASTER."""

    MASTER = "relay-test"

    def __init__(self, base: int = BASE_PORT) -> None:
        super().__init__()
        self.primary = self.add(base + 10, _common(base + 10, self.root / str(base + 10)))
        replica_dir = self.root / str(base + 11)
        self.replica = self.add(
            base + 11, [*_common(base + 11, replica_dir), "--replicaof", "127.0.0.1", str(base + 10)]
        )
        self.sentinels: list[Server] = []
        for port in range(base + 20, base + 23):
            directory = self.root / str(port)
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\nprotected-mode no\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {base + 10} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            self.sentinels.append(self.add(port, [str(conf), "--sentinel"]))

    @property
    def urls(self) -> str:
        return ",".join(f"redis://127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_healthy()

    def current_primary(self) -> Server:
        for sentinel in self.sentinels:
            if sentinel.process is None or sentinel.process.poll() is not None:
                continue
            with contextlib.suppress(redis.RedisError), sentinel.client() as c:
                _, port = c.sentinel_get_master_addr_by_name(self.MASTER)  # type: ignore[misc]
                return next(s for s in self.servers if s.port == int(port))
        raise RuntimeError("no sentinel answers")

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, RuntimeError, StopIteration):
                primary = self.current_primary()
                with primary.client() as c:
                    info = c.info("replication")
                    replicas_up = info.get("connected_slaves", 0) >= 1 and info["role"] == "master"
                known = 0
                for sentinel in self.sentinels:
                    with sentinel.client() as c:
                        state = c.sentinel_master(self.MASTER)
                        known += int(state.get("num-other-sentinels", 0)) >= 2 and int(state.get("num-slaves", 0)) >= 1
                if replicas_up and known == 3:
                    return
            time.sleep(0.2)
        raise RuntimeError("the sentinel set did not become healthy")
