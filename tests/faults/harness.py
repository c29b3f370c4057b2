"""Fault-test plumbing: the relay as a real process, a fixed-rate load of signed callbacks, a queue
collector, and the classification of every callback and event (vocabulary from RabbitMQ's Jepsen
checker: acked / rejected callbacks; lost, duplicated and unexpected events)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import orjson

from relay import broker
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import callback_query, sample_body
from tests.faults.node import free_port

APP = "1400000001"
TOKEN = "fault-token"


@dataclass(slots=True)
class Sent:
    """One callback the load driver sent, and what became of it."""

    index: int
    event_ids: list[str]
    started: float
    latency: float = 0.0
    status: int | None = None
    code: str | None = None
    error: str | None = None

    @property
    def acked(self) -> bool:
        return self.status == 200


def make_callback(index: int) -> tuple[str, bytes, list[str]]:
    """A signed-later callback: command, body, and the eventIDs the relay will derive from it.

    Four of five are C2C recalls spread over ten conversations, one in five a group recall of two
    messages in one of three groups: several conversations, so ordering is exercised realistically.
    """
    if index % 5 == 4:
        body = sample_body("group", items=2)
        body["GroupId"] = f"@TGS#fault{index % 3}"
    else:
        body = sample_body("c2c")
        body["From_Account"] = f"u_{index % 10}"
        body["To_Account"] = f"u_{(index + 1) % 10}"
    raw = orjson.dumps(body)
    command = str(body["CallbackCommand"])
    ids = [e.event_id for e in normalize(raw, CallbackQuery(sdk_app_id=APP, command=command), 0).events]
    return command, raw, ids


class RelayProcess:
    """``python -m relay serve`` in a subprocess with its own port, spool and log file."""

    def __init__(self, workdir: Path, amqp_url: str, exchange: str, queue: str, **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.env = {
            **os.environ,
            "RELAY_AMQP_URL": amqp_url,
            "RELAY_EXCHANGE": exchange,
            "RELAY_QUEUES": queue,
            "RELAY_PORT": str(self.port),
            "RELAY_HOST": "127.0.0.1",
            "RELAY_CALLBACK_TOKENS": f"{APP}={TOKEN}",
            "RELAY_SPOOL_DIR": str(workdir / "spool"),
            "RELAY_PUBLISH_TIMEOUT": "2",
            "RELAY_SHUTDOWN_DELAY": "0",
            "RELAY_LOG_LEVEL": "info",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log: BinaryIO | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.starts += 1
        self.close_log()
        log = self._log = open(self.workdir / f"relay-{self.starts}.log", "ab")  # noqa: SIM115 - see close_log
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "serve"], env=self.env, stdout=log, stderr=log)
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.base}/healthz") as response:
                        if response.status == 200:
                            return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"relay exited with {self.proc.returncode}; see {log.name}")
                await asyncio.sleep(0.05)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = await asyncio.to_thread(self.proc.wait, timeout)
        self.close_log()
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await self.wait(10)

    async def readiness(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.base}/readyz") as response:
            body: dict[str, Any] = await response.json()
            body["http_status"] = response.status
            return body

    async def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples as ``name{labels}`` → value."""
        async with aiohttp.ClientSession() as session, session.get(f"{self.base}/metrics") as response:
            text = await response.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def wait_spool_empty(self, timeout: float) -> float:
        """Seconds until the relay reports an empty spool (raises TimeoutError)."""
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    if (await self.readiness())["spool"]["events"] == 0:
                        return time.monotonic() - started
                await asyncio.sleep(0.1)


class Load:
    """Open-loop load: callback *i* is sent at ``start + i / rate`` whatever happened to earlier ones."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.sent: list[Sent] = []
        self._stop = asyncio.Event()
        self._index = 0

    def stop(self) -> None:
        self._stop.set()

    async def run(self, relay: RelayProcess | list[RelayProcess], duration: float) -> None:
        """Send for *duration* seconds (or until :meth:`stop`); several relays share the load in turn."""
        relays = relay if isinstance(relay, list) else [relay]
        self._stop.clear()
        connector = aiohttp.TCPConnector(limit=512)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks: list[asyncio.Task[None]] = []
            start = time.monotonic()
            n = 0
            while not self._stop.is_set() and n < duration * self.rate:
                due = start + n / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._stop.wait()
                    if self._stop.is_set():
                        break
                tasks.append(asyncio.create_task(self._send(session, relays[n % len(relays)])))
                n += 1
            await asyncio.gather(*tasks)

    async def _send(self, session: aiohttp.ClientSession, relay: RelayProcess) -> None:
        index = self._index
        self._index += 1
        command, body, ids = make_callback(index)
        sent = Sent(index, ids, time.monotonic())
        self.sent.append(sent)
        url = f"{relay.base}/tencent-im/callback?{callback_query(command, APP, TOKEN)}"
        try:
            async with session.post(url, data=body) as response:
                sent.status = response.status
                sent.code = (await response.json(content_type=None)).get("ErrorInfo")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            sent.error = type(exc).__name__
        sent.latency = time.monotonic() - sent.started


async def collect(amqp_url: str, queue: str, settle: float = 2.0, timeout: float = 60.0) -> Counter[str]:
    """Consume everything in *queue*: message_id → number of copies. Stops after *settle* s of quiet."""
    delivered: Counter[str] = Counter()
    connection = await broker.connect(amqp_url, name="fault-collector")
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        quiet_since = time.monotonic()
        async with asyncio.timeout(timeout):
            while time.monotonic() - quiet_since < settle:
                message = await q.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                delivered[str(message.message_id)] += 1
                quiet_since = time.monotonic()
    finally:
        await connection.close()
    return delivered


@dataclass
class Result:
    scenario: str
    sent: int
    acked: int
    rejected: int
    lost: int
    duplicated: int
    unexpected: int
    in_doubt: int
    max_latency: float
    rejected_codes: dict[str, int]
    passed: bool = False
    checks: dict[str, bool] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        notes = ", ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"| {self.scenario} | {self.sent} | {self.acked} | {self.rejected} | {self.lost} | {self.duplicated} | "
            f"{self.unexpected} | {self.in_doubt} | {self.max_latency:.2f} | {verdict} | {notes} |"
        )


TABLE_HEADER = (
    "| scenario | callbacks | acked | rejected | lost | dup | unexpected | in-doubt | max latency s "
    "| verdict | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def classify(scenario: str, sent: list[Sent], delivered: Mapping[str, int], in_doubt: int) -> Result:
    acked_ids = {eid for s in sent if s.acked for eid in s.event_ids}
    sent_ids = {eid for s in sent for eid in s.event_ids}
    rejected = [s for s in sent if not s.acked]
    codes: Counter[str] = Counter(s.code or s.error or str(s.status) for s in rejected)
    return Result(
        scenario=scenario,
        sent=len(sent),
        acked=len(sent) - len(rejected),
        rejected=len(rejected),
        lost=len(acked_ids - delivered.keys()),
        duplicated=sum(count - 1 for count in delivered.values() if count > 1),
        unexpected=len(delivered.keys() - sent_ids),
        in_doubt=in_doubt,
        max_latency=max((s.latency for s in sent), default=0.0),
        rejected_codes=dict(codes),
    )
