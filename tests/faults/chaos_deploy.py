"""The chaos run's private servers beside the cluster: a redis-server on a free port (never the shared
6379) and, as root, a small tmpfs per relay spool so that the spool's disk can really fill up."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from tests.faults.harness import RelayProcess
from tests.faults.node import free_port


class RedisServer:
    """A private redis-server without persistence: a restart after SIGKILL comes back empty."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: BinaryIO | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        if self._out is not None:
            self._out.close()
        self._out = open(self.root / "redis.out", "ab")  # noqa: SIM115 - closed in stop()
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *args, "--dir", str(self.root)], stdout=self._out, stderr=self._out
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.root / 'redis.out'}")
            time.sleep(0.1)
        raise TimeoutError(f"redis-server did not answer in {timeout}s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._out is not None:
            self._out.close()
            self._out = None


class SpoolDisk:
    """A tmpfs of *size_mb* mounted on one relay's spool directory (root only), filled on demand."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False
        path.mkdir(parents=True, exist_ok=True)

    @property
    def filler(self) -> Path:
        return self.path / "chaos-filler"

    def mount(self) -> bool:
        if os.geteuid() != 0:
            return False
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            check=False,
        )
        self.mounted = done.returncode == 0
        return self.mounted

    def fill(self) -> int:
        """Write until the disk is full (megabytes, then pages); the bytes written."""
        written = 0
        with open(self.filler, "ab", buffering=0) as f:
            for size in (1 << 20, 4096):
                block = b"\0" * size
                while True:
                    try:
                        written += f.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def empty(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def unmount(self) -> None:
        self.empty()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False


def spool_stats(relay: RelayProcess) -> dict[str, int]:
    """``relay spool stats`` for a relay that is not running (its spool as a restart will find it)."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "spool", "stats"], env=relay.env, capture_output=True, timeout=60, check=False
    )
    try:
        stats: dict[str, int] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"events": -1}
    return stats
