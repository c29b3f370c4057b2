"""A private RabbitMQ node for fault tests: its own node name, ports and data directory.

Never the shared broker on 5672: this node can be killed, frozen or put under a resource alarm.
It registers with the machine's epmd like any second node on a host. Recipe after
shared/RELIABILITY.md §2.2, without a network namespace (distinct ports are enough here).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import BinaryIO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sbin() -> Path:
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    if not found:
        raise FileNotFoundError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    return Path(found[-1])


def available() -> bool:
    try:
        _sbin()
    except FileNotFoundError:
        return False
    return shutil.which("epmd") is not None or Path("/usr/lib/erlang").exists()


class PrivateRabbit:
    """One private node. *conf* adds rabbitmq.conf lines, *plugins* enables plugins, *cookie* sets the
    Erlang cookie (the nodes of one cluster share it)."""

    def __init__(
        self,
        root: Path,
        name: str | None = None,
        *,
        conf: str = "",
        plugins: tuple[str, ...] = (),
        cookie: str | None = None,
    ) -> None:
        self.root = root
        self.name = name or f"relayfault{os.getpid()}"
        self.node = f"{self.name}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: BinaryIO | None = None
        self.sbin = _sbin()
        for sub in ("home", "mnesia", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        # Heartbeat 5 s: the relay asks for 5 s too; a frozen node is then noticed in ~20 s by aiormq.
        (root / "rabbitmq.conf").write_text("loopback_users = none\nheartbeat = 5\n" + conf)
        if cookie is not None:
            # rabbitmq-server and rabbitmqctl both read $HOME/.erlang.cookie; it must not be readable by others.
            path = root / "home" / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        r = self.root
        return {
            **os.environ,
            "HOME": str(r / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
            "RABBITMQ_LOG_BASE": str(r / "log"),
            "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(r / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
        }

    def start(self, timeout: float = 60.0) -> None:
        self._close_out()
        self._out = open(self.root / "server.out", "ab")  # noqa: SIM115 - closed when the node stops
        self.proc = subprocess.Popen(
            [str(self.sbin / "rabbitmq-server")], env=self.env(), stdout=self._out, stderr=self._out
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private RabbitMQ exited: see {self.root / 'server.out'}")
            if self._answers():
                self.ctl("await_startup", timeout=timeout)
                return
            time.sleep(0.3)
        raise TimeoutError(f"private RabbitMQ did not start in {timeout}s")

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        return self.tool("rabbitmqctl", *args, timeout=timeout)

    def tool(self, name: str, *args: str, timeout: float = 30.0) -> str:
        """Run a CLI tool (rabbitmqctl, rabbitmq-queues, rabbitmq-upgrade, ...) against this node."""
        result = subprocess.run(
            [str(self.sbin / name), "-n", self.node, "-q", *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        return result.stdout.decode()

    @property
    def os_pid(self) -> int:
        return int((self.root / "pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL the Erlang VM: a crash, no clean connection close."""
        pid = self.os_pid
        os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self._close_out()
        with contextlib.suppress(FileNotFoundError):
            (self.root / "pid").unlink()

    def freeze(self) -> None:
        os.kill(self.os_pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.os_pid, signal.SIGCONT)

    def disk_alarm(self, on: bool) -> None:
        self.ctl("set_disk_free_limit", "100000GB" if on else "1MB")

    def stop(self) -> None:
        """Stop for good (always thaws first: a frozen node cannot be stopped)."""
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.thaw()
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=30)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    os.kill(self.os_pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        self._close_out()
