"""Measure the relay under hostile load (issue 6): legitimate callback latency with and without a
slowloris of a few hundred sockets, and behaviour and memory at five times the in-flight cap.

    .venv/bin/python bench/hostile.py [--slow-sockets 300] [--seconds 20]

Writes bench/results/hostile.json and hostile.md. Measures; asserts no speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from relay.tencent.samples import callback_query, encode, sample_body

APP = "1400000001"
RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Relay:
    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.tag = uuid.uuid4().hex[:8]
        self.queue = f"bench.hostile.q.{self.tag}"
        self.exchange = f"bench.hostile.x.{self.tag}"
        self.spool = tempfile.mkdtemp(prefix="hostile-spool-")
        self.env = {
            **os.environ,
            "RELAY_PORT": str(self.port),
            "RELAY_HOST": "127.0.0.1",
            "RELAY_SDKAPPIDS": APP,
            "RELAY_EXCHANGE": self.exchange,
            "RELAY_QUEUES": self.queue,
            "RELAY_SPOOL_DIR": self.spool,
            "RELAY_LOG_LEVEL": "error",
            "RELAY_SHUTDOWN_DELAY": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Relay:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.base}/readyz") as r:
                        if r.status == 200 and (await r.json())["broker"]:
                            return self
                await asyncio.sleep(0.1)

    async def __aexit__(self, *_: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 30)
        connection = await aio_pika.connect(os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1/"))
        channel = await connection.channel()
        await channel.queue_delete(self.queue)
        await channel.exchange_delete(self.exchange)
        await connection.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def queued(self) -> int:
        connection = await aio_pika.connect(os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1/"))
        try:
            channel = await connection.channel()
            last = -1
            for _ in range(40):  # quorum queue counts lag; wait until stable
                count = (await channel.declare_queue(self.queue, passive=True)).declaration_result.message_count or 0
                if count == last:
                    return count
                last = count
                await asyncio.sleep(0.5)
            return last
        finally:
            await connection.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def legit_load(relay: Relay, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop signed-format callbacks at *rate*; latency of each, status counts."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession) -> None:
        url = f"{relay.base}/tencent-im/callback?{callback_query('C2C.CallbackAfterMsgWithDraw', APP)}"
        started = time.perf_counter()
        try:
            async with session.post(url, data=encode(sample_body("c2c"))) as response:
                await response.read()
                key = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            key = type(exc).__name__
        latencies.append(time.perf_counter() - started)
        statuses[key] = statuses.get(key, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(session)))
        await asyncio.gather(*tasks)
    return {
        "requests": len(latencies),
        "statuses": statuses,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


async def slowloris(port: int, sockets: int, stop: asyncio.Event, stats: dict[str, Any], body: bool) -> None:
    """Keep *sockets* connections open, each dribbling one byte per second (headers, or a body)."""
    lifetimes: list[float] = []

    async def attacker() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_failures"] = stats.get("connect_failures", 0) + 1
                await asyncio.sleep(0.5)
                continue
            opened = time.monotonic()
            if body:
                head = (
                    f"POST /tencent-im/callback?SdkAppid={APP}&CallbackCommand=C2C.CallbackAfterMsgWithDraw "
                    "HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                )
                writer.write(head.encode())
            else:
                writer.write(b"POST /tencent-im/callback HTTP/1.1\r\nHost: x\r\n")
            try:
                while not stop.is_set():
                    writer.write(b"a")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1):
                            if await reader.read(1024) == b"" or reader.at_eof():
                                break  # closed by the server
            except (ConnectionError, OSError):
                pass
            lifetimes.append(time.monotonic() - opened)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    await asyncio.gather(*(attacker() for _ in range(sockets)))
    stats["connections_closed_by_server"] = len(lifetimes)
    stats["median_lifetime_s"] = round(percentile(lifetimes, 50), 1) if lifetimes else None


async def measure_slowloris(sockets: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"slow_sockets": sockets, "keepalive_timeout_s": 15, "body_timeout_s": 10}
    async with Relay() as relay:
        out["baseline"] = await legit_load(relay, 100, seconds)
        for kind in ("headers", "body"):
            # The attacker runs in its own process so its event loop does not distort the measurement.
            attacker = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "attack",
                "--port",
                str(relay.port),
                "--sockets",
                str(sockets),
                "--kind",
                kind,
                "--seconds",
                str(seconds + 4),
                stdout=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(2)  # let the attack establish
            legit = await legit_load(relay, 100, seconds)
            stats = json.loads((await attacker.communicate())[0] or b"{}")
            out[f"under_slow_{kind}"] = {**legit, "attack": stats}
        out["rss_mib_after"] = round(rss_mib(relay.pid), 1)
    return out


async def flood(port: int, clients: int, seconds: float) -> dict[str, Any]:
    """*clients* closed-loop clients posting callbacks as fast as answers come back (own process)."""
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    base = f"http://127.0.0.1:{port}"

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            url = f"{base}/tencent-im/callback?{callback_query('C2C.CallbackAfterMsgWithDraw', APP)}"
            try:
                async with session.post(url, data=encode(sample_body("c2c"))) as response:
                    body = await response.json()
                    key = f"{response.status} {body['ErrorInfo']}".strip()
                    if response.status == 503 and response.headers.get("Retry-After") != "1":
                        key += " (no Retry-After)"
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return statuses


def histogram_quantile(metrics: str, name: str, outcome: str, q: float) -> float | None:
    """Upper bound (seconds) of the bucket holding quantile *q* of a relay histogram, from /metrics text."""
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{") and f'outcome="{outcome}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(le for le, count in sorted(buckets) if count >= q * total)


async def measure_overload(cap: int, factor: int, seconds: float) -> dict[str, Any]:
    """*factor* × cap concurrent closed-loop clients (another process) against RELAY_MAX_IN_FLIGHT=cap."""
    out: dict[str, Any] = {"max_in_flight": cap, "concurrent_clients": cap * factor}
    async with Relay(RELAY_MAX_IN_FLIGHT=str(cap)) as relay:
        rss: list[float] = [rss_mib(relay.pid)]
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "flood",
            "--port",
            str(relay.port),
            "--clients",
            str(cap * factor),
            "--seconds",
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )
        communicate = asyncio.create_task(flooder.communicate())
        while not communicate.done():
            await asyncio.sleep(0.5)
            rss.append(rss_mib(relay.pid))
        statuses: dict[str, int] = json.loads((await communicate)[0] or b"{}")
        async with aiohttp.ClientSession() as session, session.get(f"{relay.base}/metrics") as response:
            metrics = await response.text()
        accepted = statuses.get("200", 0)
        queued = await relay.queued()

        def ms(outcome: str, q: float) -> float | None:
            value = histogram_quantile(metrics, "relay_request_seconds", outcome, q)
            return None if value is None else round(value * 1000, 2)

        out.update(
            statuses=statuses,
            accepted_per_s=round(accepted / seconds, 1),
            server_ok_p99_ms_le=ms("accepted", 0.99),
            server_shed_p50_ms_le=ms("unavailable", 0.5),
            server_shed_p99_ms_le=ms("unavailable", 0.99),
            rss_mib_start=round(rss[0], 1),
            rss_mib_max=round(max(rss), 1),
            rss_mib_end=round(rss[-1], 1),
            queued=queued,
            every_200_queued=queued >= accepted,
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["slowloris"]
    o = result["overload"]
    lines = [
        "# Hostile load (issue 6)",
        "",
        f"{result['when']}, {result['machine']}. Relay, broker and load generator share the 2 cores.",
        "",
        f"## Slowloris: {s['slow_sockets']} slow sockets + 100 legitimate callbacks/s",
        "",
        "| phase | legit requests | statuses | p50 ms | p99 ms | max ms | attack |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in ("baseline", "under_slow_headers", "under_slow_body"):
        p = s[phase]
        lines.append(
            f"| {phase} | {p['requests']} | {p['statuses']} | {p['p50_ms']} | {p['p99_ms']} | "
            f"{p['max_ms']} | {p.get('attack', '')} |"
        )
    lines += [
        "",
        f"## Overload: {o['concurrent_clients']} concurrent clients, RELAY_MAX_IN_FLIGHT={o['max_in_flight']}",
        "",
        "Latencies are the relay's own `relay_request_seconds` histogram (upper bucket bound), so they exclude",
        "the load generator's queueing.",
        "",
        "| statuses | accepted/s | 200 p99 ms ≤ | 503 p50 ms ≤ | 503 p99 ms ≤ | RSS MiB start/max/end | queued ≥ 200s"
        " |",
        "|---|---|---|---|---|---|---|",
        f"| {o['statuses']} | {o['accepted_per_s']} | {o['server_ok_p99_ms_le']} | {o['server_shed_p50_ms_le']} | "
        f"{o['server_shed_p99_ms_le']} | {o['rss_mib_start']}/{o['rss_mib_max']}/{o['rss_mib_end']} | "
        f"{o['every_200_queued']} ({o['queued']}) |",
        "",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", choices=["measure", "attack", "flood"], default="measure")
    parser.add_argument("--slow-sockets", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--cap", type=int, default=100)
    parser.add_argument("--port", type=int)
    parser.add_argument("--sockets", type=int)
    parser.add_argument("--kind", choices=["headers", "body"])
    parser.add_argument("--clients", type=int)
    args = parser.parse_args()
    if args.mode == "attack":
        stop = asyncio.Event()
        stats: dict[str, Any] = {}
        asyncio.get_running_loop().call_later(args.seconds, stop.set)
        await slowloris(args.port, args.sockets, stop, stats, body=args.kind == "body")
        print(json.dumps(stats))
        return
    if args.mode == "flood":
        print(json.dumps(await flood(args.port, args.clients, args.seconds)))
        return
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "slowloris": await measure_slowloris(args.slow_sockets, args.seconds),
        "overload": await measure_overload(args.cap, 5, args.seconds),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "hostile.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    asyncio.run(main())
