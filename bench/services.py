"""The processes a measurement starts (relay, bare HTTP server) and the broker-side checks.

Every process here is started by the benchmark and stopped by its PID; the shared RabbitMQ is only
used for ordinary publishing and for declaring and deleting the benchmark's own uniquely named
exchanges and queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractChannel

from bench import procstat

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
UNREACHABLE_AMQP_URL = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1: every event spools


def amqp_url() -> str:
    return os.environ.get("RELAY_AMQP_URL", DEFAULT_AMQP_URL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class Service:
    """A subprocess serving HTTP on 127.0.0.1:<port>, logging to a file, stopped by its PID."""

    name = "service"
    cwd: Path = ROOT  # python -m puts the working directory first on sys.path

    def __init__(self) -> None:
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.tmp / "output.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self, status: int, body: str) -> bool:
        return status == 200

    def start(self, timeout: float = 30.0) -> None:
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.environment(),
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, body = http_get(f"{self.base}/readyz", 1.0)
                if self.is_ready(status, body):
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM our process (and any workers it forked), then SIGKILL what is left: by PID only."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        tree = procstat.descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for pid in tree[1:]:  # workers of ours that outlived their parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return procstat.descendants(self.pid)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.cleanup()


class BareHttp(Service):
    """Measurement A's server (bench/bare_http.py)."""

    name = "bare-http"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.bare_http", "--port", str(self.port)]


def relay_supports_workers(src: Path = ROOT) -> bool:
    """True once ``relay serve --workers N`` exists (the lead's SO_REUSEPORT mode)."""
    out = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--help"],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return "--workers" in out.stdout


class Relay(Service):
    """``relay serve`` on its own exchange and quorum queue (or with an unreachable broker: spool)."""

    name = "relay"

    def __init__(
        self,
        app: str,
        token: str | None,
        *,
        spool_only: bool = False,
        workers: int = 1,
        src: Path = ROOT,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.extra_env = extra_env or {}
        self.cwd = src  # the source tree whose relay/ package runs (the working tree, or an exported revision)
        tag = uuid.uuid4().hex[:10]
        self.app = app
        self.token = token
        self.spool_only = spool_only
        self.workers = workers
        self.exchange = f"bench.x.{tag}"
        self.queue = f"bench.q.{tag}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "relay", "serve"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_AMQP_URL=UNREACHABLE_AMQP_URL if self.spool_only else amqp_url(),
            RELAY_SDKAPPIDS=self.app,
            RELAY_HOST="127.0.0.1",
            RELAY_PORT=str(self.port),
            RELAY_EXCHANGE=self.exchange,
            RELAY_QUEUES=self.queue,
            RELAY_SPOOL_DIR=str(self.tmp / "spool"),
            RELAY_SPOOL_MAX_BYTES=str(4 * 1024**3),  # never spool_full within a benchmark run
            RELAY_LOG_LEVEL="warning",
            RELAY_LOG_FORMAT="json",
            RELAY_SHUTDOWN_DELAY="0",
            RELAY_MAX_IN_FLIGHT="100000",
        )
        if self.token is not None:
            env["RELAY_CALLBACK_TOKENS"] = f"{self.app}={self.token}"
        env.update(self.extra_env)
        return env

    def is_ready(self, status: int, body: str) -> bool:
        if status != 200:
            return False
        state = json.loads(body)
        return bool(state.get("broker")) != self.spool_only

    def metrics(self) -> dict[str, float]:
        """The counters a measurement checks, summed over their labels."""
        _, text = http_get(f"{self.base}/metrics", 5.0)
        return parse_metrics(text)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no callback is in flight (wrk leaves some behind when it stops)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metrics().get("in_flight", 0) == 0:
                return
            time.sleep(0.05)

    def queue_count(self, at_least: int, settle: float = 30.0) -> int:
        return asyncio.run(_queue_count(self.queue, at_least, settle))

    def distinct_event_ids(self, expected: int, timeout: float = 120.0) -> tuple[int, int]:
        """Read the queue back: (messages read, distinct eventIDs among them)."""
        return asyncio.run(_read_ids(self.queue, expected, timeout))

    def cleanup(self) -> None:
        super().cleanup()
        if not self.spool_only:
            asyncio.run(_delete(self.queue, self.exchange))


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    wanted = {
        "relay_events_spooled_total": "spooled",
        "relay_events_published_total": "published",
        "relay_publish_failures_total": "publish_failures",
        "relay_requests_in_flight": "in_flight",
        "relay_spool_events": "spool_events",
        "relay_correlation_writes_total": "correlation_writes",
        "relay_correlation_dropped_total": "correlation_dropped",
    }
    out: dict[str, float] = dict.fromkeys(wanted.values(), 0.0)
    out["accepted"] = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name in wanted:
            out[wanted[name]] += value
        elif name == "relay_callbacks_total" and 'outcome="accepted"' in labels:
            out["accepted"] += value
    return out


async def _queue_count(queue: str, at_least: int, settle: float) -> int:
    connection = await aio_pika.connect(amqp_url())
    async with connection:
        return await queue_count(await connection.channel(), queue, at_least, settle)


async def queue_count(channel: AbstractChannel, name: str, at_least: int, settle: float) -> int:
    """Passive-declare *name* until its count is ≥ *at_least* and stable (quorum queue stats lag)."""
    deadline = time.monotonic() + settle
    last = -1
    while True:
        declared = await channel.declare_queue(name, passive=True)
        count = declared.declaration_result.message_count or 0
        if (count >= at_least and count == last) or time.monotonic() > deadline:
            return count
        last = count
        await asyncio.sleep(0.3)


async def _read_ids(queue: str, expected: int, timeout: float) -> tuple[int, int]:
    """Consume up to *expected* messages (auto-ack) and collect their ``message_id`` (= eventID)."""
    ids: set[str | None] = set()
    read = 0
    connection = await aio_pika.connect(amqp_url())
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        declared = await channel.declare_queue(queue, passive=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), declared.iterator(no_ack=True) as messages:
                async for message in messages:
                    ids.add(message.message_id)
                    read += 1
                    if read >= expected:
                        break
    return read, len(ids)


async def _delete(queue: str, exchange: str) -> None:
    connection = await aio_pika.connect(amqp_url())
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)


async def _server_properties() -> dict[str, Any]:
    connection = await aio_pika.connect(amqp_url())
    async with connection:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in props.items() if not isinstance(v, dict)}


def rabbitmq_version() -> str:
    """The broker's version as it announces itself on connect (no management plugin needed)."""
    try:
        props = asyncio.run(_server_properties())
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return f"unknown ({exc!r:.80})"
    return f"{props.get('product', 'RabbitMQ')} {props.get('version', '?')}"
