"""The history stream's costs (issue 20): the callback path with and without RELAY_AUDIT_STREAM, in the
same run and alternated, and how fast ``relay history``'s reader goes through the stream.

    .venv/bin/python -m bench.history [--duration 10] [--connections 64] [--rounds 2]

Writes bench/results/history.json and history.md. Uses the broker on RELAY_AMQP_URL (its own
``bench.*`` names, deleted afterwards); never stops or reconfigures it; stops only what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from bench import procstat
from bench.run import APP, TOKEN, Config, Context, http_run
from bench.services import ROOT, Relay, amqp_url
from relay.endpoints import parse_endpoints
from relay.history.stream import read


async def read_rate(stream: str) -> dict[str, Any]:
    """Every entry of *stream* through relay.history's reader (ack every 200, prefetch 1000)."""
    url = amqp_url()
    started = time.perf_counter()
    count = 0
    async for _ in read(parse_endpoints(url), url, stream, None, name="bench history read", idle=1.0):
        count += 1
    seconds = time.perf_counter() - started
    return {"events": count, "seconds": round(seconds, 2), "events_per_s": round(count / seconds) if seconds else 0}


def cli_rate(stream: str, command: list[str]) -> dict[str, Any]:
    """``relay <command> --since first`` over *stream* to /dev/null: the whole command, rendering included."""
    env = {**os.environ, "RELAY_AMQP_URL": amqp_url(), "RELAY_AUDIT_STREAM": stream}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "relay", *command, "--since", "first"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - started
    return {
        "command": "relay " + " ".join(command),
        "seconds": round(seconds, 2),
        "stderr": done.stderr.decode()[-200:],
    }


async def delete(stream: str) -> None:
    connection = await aio_pika.connect(amqp_url())
    async with connection:
        await (await connection.channel()).queue_delete(stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="without/with pairs, alternated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    cfg = Config(
        connections=[args.connections], duration=args.duration, warmup=args.warmup, threads=1, broker_runs=[],
        workers=1, signed=True, verify_ids=False, smoke=False, out=args.out, only=set(),
    )  # fmt: skip
    ctx = Context(broker_pid=procstat.listener_pid(5672), ncpu=os.cpu_count() or 1)
    stream = f"bench.s.{uuid.uuid4().hex[:10]}"
    rows: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for label, env in (("without", {}), ("with", {"RELAY_AUDIT_STREAM": stream})):
                with Relay(APP, TOKEN, extra_env=env) as relay:
                    row = http_run(cfg, ctx, relay, args.connections)
                row.update(label=label, round=round_ + 1)
                rows.append(row)
                print(f"  {label} stream, round {round_ + 1}: {row['ok_rps']} ok/s p99 {row['latency_ms']['p99']} ms")
        reading = asyncio.run(read_rate(stream))
        print(f"  read: {reading}")
        commands = [cli_rate(stream, ["export", "--format", "jsonl"]), cli_rate(stream, ["history"])]
        for c in commands:
            c["events_per_s"] = round(reading["events"] / c["seconds"]) if c["seconds"] else 0
            print(f"  {c['command']}: {c['seconds']} s, {c['events_per_s']} events/s")
    finally:
        asyncio.run(delete(stream))
    results = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "connections": args.connections,
        "duration_s": args.duration,
        "callback": rows,
        "read": reading,
        "commands": commands,
        "ncpu": ctx.ncpu,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "history.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "history.md").write_text(report(results))
    return 0


def report(results: dict[str, Any]) -> str:
    def mean(label: str, key: str) -> float:
        values = [r[key] for r in results["callback"] if r["label"] == label]
        return sum(values) / len(values)

    without, with_ = mean("without", "ok_rps"), mean("with", "ok_rps")
    lines = [
        "# The history stream: what it costs the callback path, and how fast it reads",
        "",
        f"Measured {results['when']} by `python -m bench.history` on {results['ncpu']} CPUs, RabbitMQ on the same"
        f" machine. Callback path: `relay serve`, signed C2C recalls with wrk at {results['connections']}"
        f" connections, {results['duration_s']:g} s per run, runs without and with `RELAY_AUDIT_STREAM` alternated"
        " in one run (each 200 is a broker confirm; with the stream, the confirm waits for the quorum queue"
        " **and** the stream).",
        "",
        "| run | stream | 200s/s | p50 ms | p99 ms | relay CPU µs/req | broker CPU µs/req | others' CPU, % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["callback"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['round']} | {r['label']} | {r['ok_rps']:.0f} | {lat.get('p50')} | {lat.get('p99')} |"
            f" {r['server_cpu_us_per_req']} | {r['broker_cpu_us_per_req']} | {r['cpu'].get('others_pct_of_machine')} |"
        )
    cost = 100 * (without - with_) / without if without else 0.0
    read = results["read"]
    lines += [
        "",
        f"Mean 200s/s: **{without:.0f} without** the stream, **{with_:.0f} with** it ({cost:.1f} % fewer with"
        " the stream). Other processes on the machine (another test run) took the share of the CPU in the last"
        " column: compare the runs of one round, and rounds where that share is low.",
        "",
        "## Reading the history",
        "",
        f"The stream then held {read['events']} events (every 200 of the runs with it). relay.history's reader"
        f" (prefetch 1000, an ack with `multiple` every 200) read them in {read['seconds']} s:"
        f" **{read['events_per_s']} events/s**. Whole commands, `--since first` to /dev/null (process start,"
        " the last-chunk probe and the idle wait at the end included):",
        "",
        "| command | seconds | events/s |",
        "|---|---|---|",
    ]
    lines += [f"| `{c['command']} --since first` | {c['seconds']} | {c['events_per_s']} |" for c in results["commands"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
