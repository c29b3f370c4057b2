"""Send-callback throughput with the correlation store on one Redis primary and on a six-node
cluster (three primaries), in the same run on the same machine; plus what a send record costs in
Redis. Writes bench/results/redis-cluster.{json,md}.

    .venv/bin/python -m bench.redis_cluster [--seconds 15] [--connections 64]

Each target gets a fresh ``relay serve`` process (unsigned app, send callbacks only: they publish
nothing, so the relay is pointed at no broker at all) and private Redis servers on ports 7400+ that this
script starts and kills by PID. The load generator is one asyncio process (aiohttp, N connections);
on a 2-core machine it shares the CPU with the relay and Redis, so compare the rows, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis

from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND
from tests.faults.redis_nodes import Cluster, RedisSet, _common

APP = "1400000001"
RESULTS = Path(__file__).parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _load(port: int, seconds: float, connections: int, tag: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/tencent-im/callback?{callback_query(C2C_SEND, APP, None)}"
    ok = other = 0
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    counter = 0

    async def worker(session: aiohttp.ClientSession, wid: int) -> None:
        nonlocal ok, other, counter
        while time.monotonic() < stop:
            counter += 1
            key = f"{tag}_{wid}_{counter}"
            body = {
                "CallbackCommand": C2C_SEND,
                "From_Account": f"u_{counter % 1000}",
                "To_Account": "u_peer",
                "MsgKey": key,
                "MsgId": f"144115212345678901-1767225540-{key}",
                "MsgTime": 1767225540,
                "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hello"}}],
                "SendMsgResult": 0,
            }
            started = time.perf_counter()
            async with session.post(url, data=orjson.dumps(body)) as response:
                await response.read()
                if response.status == 200:
                    ok += 1
                else:
                    other += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(connections)))
    latencies.sort()
    return {
        "ok": ok,
        "other": other,
        "per_second": round(ok / seconds),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


def _metric(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _serve(env_extra: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_SDKAPPIDS=APP,
        RELAY_HOST="127.0.0.1",
        RELAY_PORT=str(port),
        RELAY_SPOOL_DIR=str(workdir / f"spool-{port}"),
        RELAY_LOG_LEVEL="warning",
        RELAY_SHUTDOWN_DELAY="0",
        RELAY_MAX_IN_FLIGHT="100000",
        # Send callbacks publish nothing: no broker needed, and none is touched (a closed port).
        RELAY_AMQP_URL="amqp://guest:guest@127.0.0.1:1/",
        **env_extra,
    )
    relay = Path(sys.executable).parent / "relay"
    proc = subprocess.Popen([str(relay), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("relay serve did not listen")


def _record_bytes(clients: list[redis.Redis]) -> dict[str, Any]:
    """Keys held and the memory of a sample of send records (MEMORY USAGE, value and key overhead)."""
    keys = sum(int(c.dbsize()) for c in clients)  # type: ignore[arg-type]
    samples: list[int] = []
    for c in clients:
        for key in c.scan_iter(match="revoke-relay:send:*", count=200):
            samples.append(int(c.memory_usage(key) or 0))  # type: ignore[arg-type]
            if len(samples) >= 300:
                break
    used = sum(int(c.info("memory")["used_memory"]) for c in clients)
    return {
        "keys": keys,
        "memory_usage_per_record": round(sum(samples) / max(len(samples), 1)),
        "used_memory_bytes": used,
    }


def measure(
    name: str, redis_env: dict[str, str], data: list[redis.Redis], seconds: float, connections: int
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    for c in data:
        c.flushall()
    base_memory = sum(int(c.info("memory")["used_memory"]) for c in data)
    proc, port = _serve(redis_env, workdir)
    try:
        asyncio.run(_load(port, 2, connections, f"warm{time.time_ns()}"))  # warm-up
        result = asyncio.run(_load(port, seconds, connections, f"run{time.time_ns()}"))
        time.sleep(2)  # let the writer flush
        result["written"] = int(_metric(port, "relay_correlation_writes_total"))
        result["dropped"] = int(_metric(port, "relay_correlation_dropped_total"))
    finally:
        proc.terminate()
        proc.wait(15)
    stored = _record_bytes(data)
    stored["bytes_per_record_in_used_memory"] = round(
        (stored["used_memory_bytes"] - base_memory) / max(stored["keys"], 1)
    )
    primaries = len(data)
    return {
        "target": name,
        "primaries": primaries,
        **result,
        **stored,
        "writes_per_second_per_primary": round(result["written"] / (seconds + 2) / primaries),
    }


async def _writer_ceiling(redis_env: dict[str, str], records: int) -> dict[str, Any]:
    """The relay's own send-record writer flooded (no HTTP): records/s it gets into Redis."""
    from prometheus_client import CollectorRegistry

    from relay.metrics import Metrics
    from relay.settings import Settings
    from relay.store import SendRecord
    from relay.store.redis import RedisStore
    from relay.store.topology import Topology

    settings = Settings.from_env({"RELAY_SDKAPPIDS": APP, **redis_env})
    options = settings.redis_options
    assert options is not None
    metrics = Metrics(CollectorRegistry())
    store = RedisStore(Topology(options, metrics), 3600, metrics)
    await store.start()
    tag = time.time_ns()
    batch = [SendRecord(f"{APP}/c2c/w{tag}_{i}", f"cm-{i}", f"u_{i % 1000}", 1767225540000) for i in range(records)]
    started = time.perf_counter()
    for i in range(0, records, 1000):
        await store.submit(batch[i : i + 1000])
    while metrics.registry.get_sample_value("relay_correlation_writes_total") or 0 < records:
        written = metrics.registry.get_sample_value("relay_correlation_writes_total") or 0
        dropped = metrics.registry.get_sample_value("relay_correlation_dropped_total") or 0
        if written + dropped >= records:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await store.close()
    return {"writer_records_per_second": round(records / elapsed)}


def _server_ceiling(ports: list[int], *, cluster: bool = False) -> int:
    """redis-benchmark SET with 110-byte values, pipelined: one server, or (``--cluster``) every primary."""
    procs = [
        subprocess.Popen(
            [
                "redis-benchmark",
                *(["--cluster"] if cluster else []),
                "-p",
                str(p),
                "-t",
                "set",
                "-n",
                "300000",
                "-P",
                "64",
                "-d",
                "110",
                "-r",
                "1000000",
                "-q",
                "--csv",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in ports
    ]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        for line in out.splitlines():
            if line.startswith('"SET"'):
                total += float(line.split(",")[1].strip('"'))
    return round(total)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    single = RedisSet()
    port = 7420
    server = single.add(port, _common(port, single.root / str(port)))
    cluster = Cluster(base=7400)
    rows = []
    try:
        server.start()
        cluster.start()
        primaries = [s for s in cluster.servers if cluster.role(s) == "master"]
        ceilings = {
            "one primary (standalone)": {
                **asyncio.run(_writer_ceiling({"RELAY_REDIS_URL": f"redis://127.0.0.1:{port}"}, 200_000)),
                "server_set_per_second": _server_ceiling([port]),
            },
            "cluster (3 primaries + 3 replicas)": {
                **asyncio.run(
                    _writer_ceiling({"RELAY_REDIS_MODE": "cluster", "RELAY_REDIS_URL": cluster.urls}, 200_000)
                ),
                "server_set_per_second": _server_ceiling([primaries[0].port], cluster=True),
            },
        }
        rows.append(
            measure(
                "one primary (standalone)",
                {"RELAY_REDIS_URL": f"redis://127.0.0.1:{port}"},
                [server.client()],
                args.seconds,
                args.connections,
            )
        )
        rows.append(
            measure(
                "cluster (3 primaries + 3 replicas)",
                {"RELAY_REDIS_MODE": "cluster", "RELAY_REDIS_URL": cluster.urls},
                [s.client() for s in primaries],
                args.seconds,
                args.connections,
            )
        )
    finally:
        single.stop()
        cluster.stop()
    for row in rows:
        row.update(ceilings[row["target"]])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = {"when": stamp, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seconds": args.seconds,
           "connections": args.connections, "rows": rows}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "redis-cluster.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Send callbacks: one Redis primary against a three-primary cluster (same run)",
        "",
        f"{stamp}, {out['machine']}; `python -m bench.redis_cluster --seconds {args.seconds:g} "
        f"--connections {args.connections}`. The relay, Redis (every node) and the load generator share "
        "the machine's cores; compare rows, not absolutes.",
        "",
        "| target | send callbacks/s (200) | p50 ms | p99 ms | non-200 | records written | dropped |"
        " record writes/s per primary | MEMORY USAGE per record (B) | used_memory per record (B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tail = [
        "",
        "Ceilings in the same run, without HTTP: the relay's send-record writer flooded with 200,000 records"
        " (one process, batches of 512 pipelined SETs; per node in a cluster), and `redis-benchmark -t set -P 64"
        " -d 110` against every primary at once (the servers' own SET ceiling on this machine).",
        "",
        "| target | writer records/s (one relay process) | redis-benchmark SET/s (all primaries) |",
        "|---|---|---|",
        *(f"| {r['target']} | {r['writer_records_per_second']} | {r['server_set_per_second']} |" for r in rows),
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | {r['other']} | {r['written']} |"
            f" {r['dropped']} | {r['writes_per_second_per_primary']} | {r['memory_usage_per_record']} |"
            f" {r['bytes_per_record_in_used_memory']} |"
        )
    lines += tail
    (RESULTS / "redis-cluster.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
