"""Where the tail comes from: the relay's request latency beside the broker's own confirm latency,
measured in alternating phases of one run, with what the relay was doing in every 100 ms slice.

    .venv/bin/python -m bench.latency                      # one 60 s run at 16 connections
    .venv/bin/python -m bench.latency --runs 10            # ten in a row: the table of issue 24
    .venv/bin/python -m bench.latency --smoke --out /tmp/x # a few seconds, every code path

One relay (``relay serve``, quorum queue, signed C2C recalls, every 200 a broker confirm) is started
with ``RELAY_SLICE_LOG``: every 100 ms it writes the worst event-loop lag, the worst GC pause, and the
slowest confirm, spool write and handler wait of the slice (relay/runtime.py). The load alternates,
one ``--phase`` at a time:

* **relay phase**: ``--connections`` keep-alive HTTP/1.1 connections, one request in flight on each
  (like wrk), every request's start and latency recorded;
* **broker phase**: the same number of confirmed, persistent, ``mandatory`` publishes in flight with
  aiormq, straight to a quorum queue of the same broker, every confirm's latency recorded.

So a broker hiccup and a relay hiccup are told apart: the broker phase next to a slow relay phase
shows whether the broker was slow at that time. Each 100 ms slice of a relay phase in which a
request took longer than ``--slow`` (20 ms) is attributed to what the relay saw in the same slice
(the loop, GC, the spool, the broker's confirms), or to nothing it can see. Results (a table per
run, the slow slices and their causes, a PNG timeline of the worst run) go to
``bench/results/latency-<UTC>.{md,json,png}``; nothing about speed is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiormq
import orjson
import uvloop
from pamqp import commands as spec

from bench import procstat
from bench.broker_ceiling import Counters, Topology, _properties, relay_envelopes, run_workers
from bench.services import Relay, amqp_url
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query, sample_body

RESULTS = Path(__file__).resolve().parent / "results"
APP, TOKEN = "1400000001", "bench-latency-token"
SLICE = 0.1


@dataclass
class Run:
    """One run's raw records: (start time, seconds) per request and per confirm, and the relay's slices."""

    requests: list[tuple[float, float]] = field(default_factory=list)
    failures: int = 0
    confirms: list[tuple[float, float]] = field(default_factory=list)
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    # Phase kind -> process ("relay", "client": this load generator, "broker") -> CPU seconds used
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[98]


# -- load ---------------------------------------------------------------------------------------------


class _Requests:
    """Signed C2C recall requests with a fresh MsgKey each; the query is signed once a second."""

    def __init__(self, port: int, tag: str) -> None:
        self.port, self.tag, self.n = port, tag, 0
        self.body = sample_body("c2c")
        self._second = -1
        self._head = ""

    def next(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            query = callback_query(C2C_RECALL, APP, TOKEN, request_time=second)
            self._head = (
                f"POST /tencent-im/callback?{query} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Content-Type: application/json\r\nContent-Length: "
            )
        self.n += 1
        self.body["MsgKey"] = f"{self.tag}-{self.n}"
        payload = orjson.dumps(self.body)
        return f"{self._head}{len(payload)}\r\n\r\n".encode() + payload


class _HttpClient(asyncio.Protocol):
    """One keep-alive connection with one request in flight, as wrk runs them, written as a protocol:
    asyncio streams (a readuntil and a readexactly per answer) cost this client about 120 µs of CPU
    per request on this machine, on the same two cores as the relay, and its own queueing showed up
    in the latencies it measured."""

    def __init__(self, requests: _Requests, until: float, run: Run, done: asyncio.Future[None]) -> None:
        self.requests, self.until, self.run, self.done = requests, until, run, done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.start = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self.until:
            self.transport.close()
            return
        data = self.requests.next()  # built before the clock starts
        self.start = time.monotonic()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        at = buffer.find(b"Content-Length: ", 0, end)
        length = int(buffer[at + 16 : buffer.find(b"\r\n", at)]) if at >= 0 else 0
        if len(buffer) < end + 4 + length:
            return
        elapsed = time.monotonic() - self.start
        if buffer.startswith(b"HTTP/1.1 200"):
            self.run.requests.append((self.start, elapsed))
        else:
            self.run.failures += 1
        del buffer[: end + 4 + length]
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def relay_phase(port: int, seconds: float, connections: int, run: Run) -> None:
    loop = asyncio.get_running_loop()
    until = time.monotonic() + seconds
    tag = uuid.uuid4().hex[:8]
    done: list[asyncio.Future[None]] = []
    for c in range(connections):
        future: asyncio.Future[None] = loop.create_future()
        requests = _Requests(port, f"{tag}-{c}")
        await loop.create_connection(functools.partial(_HttpClient, requests, until, run, future), "127.0.0.1", port)
        done.append(future)
    async with asyncio.timeout(seconds + 30):  # an answer that never comes fails the run, not hangs it
        await asyncio.gather(*done)


async def broker_phase(
    channel: aiormq.abc.AbstractChannel, topo: Topology, seconds: float, window: int, run: Run
) -> None:
    messages = [(e.body, e.routing_key, _properties(e)) for e in relay_envelopes(256)]

    async def publish_one(i: int) -> bool:
        body, key, properties = messages[i % len(messages)]
        start = time.monotonic()
        confirmation = await channel.basic_publish(  # type: ignore[call-arg]  # aiormq's abc lacks `wait`
            body, exchange=topo.exchange, routing_key=key, properties=properties, mandatory=True, wait=False
        )
        acked = isinstance(confirmation, spec.Basic.Ack)
        if acked:
            run.confirms.append((start, time.monotonic() - start))
        return acked

    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    await run_workers(publish_one, Counters(), window, stop)


async def drive(relay: Relay, args: argparse.Namespace, run: Run) -> None:
    topo = Topology(amqp_url())
    await topo.declare()
    connection = await aiormq.connect(amqp_url())
    try:
        channel = await connection.channel(publisher_confirms=True)
        await relay_phase(relay.port, args.warmup, args.connections, Run())  # warm-up, not recorded
        await broker_phase(channel, topo, args.warmup, args.connections, Run())
        pids = {"relay": relay.pid, "client": os.getpid(), "broker": procstat.listener_pid(5672)}
        measured = 0.0
        while measured < args.duration:
            for kind in ("relay", "broker"):
                before = _cpu(pids)
                start = time.monotonic()
                if kind == "relay":
                    await relay_phase(relay.port, args.phase, args.connections, run)
                else:
                    await broker_phase(channel, topo, args.phase, args.connections, run)
                run.phases.append((kind, start, time.monotonic()))
                used = run.cpu.setdefault(kind, {})
                for name, seconds in _cpu(pids).items():
                    used[name] = used.get(name, 0.0) + seconds - before.get(name, seconds)
            measured += args.phase
    finally:
        await connection.close()
        await topo.count_and_delete(0, settle=1.0)


def _cpu(pids: dict[str, int | None]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        seconds = procstat.cpu_seconds(pid) if pid is not None else None
        if seconds is not None:
            out[name] = seconds
    return out


# -- analysis -----------------------------------------------------------------------------------------


def attribute(line: dict[str, Any] | None, slow: float) -> list[str]:
    """What the relay saw in a slice in which a request waited longer than *slow*."""
    if line is None:
        return ["no slice recorded"]
    causes = []
    if line["loop_lag_max"] >= slow / 2:
        causes.append("loop")
    if line["gc_max"] >= slow / 4:
        causes.append("gc")
    spool = line["spool_writes"]["max_le"]
    if spool is not None and spool > slow:
        causes.append("spool")
    confirm = line["confirms"]["max_le"]
    if confirm is not None and confirm > slow:
        causes.append("broker confirms")
    return causes or ["nothing the relay can see"]


def analyse(run: Run, args: argparse.Namespace, wall_offset: float) -> dict[str, Any]:
    """Per run: both p99s, and the slow 100 ms slices of relay phases with their causes."""
    relay_lat = [lat for _, lat in run.requests]
    broker_lat = [lat for _, lat in run.confirms]
    by_slice: dict[int, list[float]] = {}
    for start, lat in run.requests:
        by_slice.setdefault(int((start + lat + wall_offset) / SLICE), []).append(lat)
    lines = {int(line["t"] / SLICE): line for line in run.slices}
    first, last = (run.phases[0][1], run.phases[-1][2]) if run.phases else (0.0, 0.0)
    origin = first + wall_offset  # slow slices are reported in seconds since the first phase
    slow_slices = []
    counts: dict[str, int] = {}
    for index in sorted(by_slice):
        worst = max(by_slice[index])
        if worst <= args.slow:
            continue
        # The relay writes its line at the end of its own 100 ms; look at the two lines around.
        seen = [lines.get(index), lines.get(index + 1)]
        causes = sorted(
            {c for line in seen if line is not None for c in attribute(line, args.slow)} - {"nothing the relay can see"}
        )
        if not causes:
            causes = ["nothing the relay can see" if any(seen) else "no slice recorded"]
        for cause in causes:
            counts[cause] = counts.get(cause, 0) + 1
        slow_slices.append(
            {"t": round(index * SLICE - origin, 1), "worst_ms": round(worst * 1000, 1), "causes": causes}
        )
    relay_p99, broker_p99 = p99(relay_lat), p99(broker_lat)
    seconds = {kind: sum(e - s for k, s, e in run.phases if k == kind) for kind in ("relay", "broker")}
    # Cores busy during each kind of phase, per process: the two cores are shared by all three.
    cores = {
        kind: {name: round(used / max(seconds[kind], 1e-9), 2) for name, used in sorted(run.cpu.get(kind, {}).items())}
        for kind in ("relay", "broker")
    }
    relay_cpu = run.cpu.get("relay", {}).get("relay")
    measured = [line for line in run.slices if origin <= line["t"] <= last + wall_offset + SLICE]
    return {
        "requests": len(relay_lat),
        "failures": run.failures,
        "relay_req_per_s": round(len(relay_lat) / max(seconds["relay"], 1e-9)),
        "broker_confirms_per_s": round(len(broker_lat) / max(seconds["broker"], 1e-9)),
        "relay_cpu_us_per_request": round(relay_cpu / len(relay_lat) * 1e6) if relay_cpu and relay_lat else None,
        "cores": cores,
        "relay_p50_ms": round(statistics.median(relay_lat) * 1000, 2) if relay_lat else None,
        "relay_p99_ms": round(relay_p99 * 1000, 2),
        "broker_confirms": len(broker_lat),
        "broker_p99_ms": round(broker_p99 * 1000, 2),
        "gap_ms": round((relay_p99 - broker_p99) * 1000, 2),
        "within_2ms": relay_p99 - broker_p99 <= 0.002,
        "slow_slices": slow_slices,
        "slow_slice_causes": counts,
        # Over the measured phases only: the start's deliberate full collection (relay/cli.py) is not load.
        "loop_lag_max_ms": round(max((line["loop_lag_max"] for line in measured), default=0) * 1000, 2),
        "gc_max_ms": round(max((line["gc_max"] for line in measured), default=0) * 1000, 2),
        "gc_collections": sum(line["gc_n"] for line in measured),
    }


def plot(run: Run, wall_offset: float, title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.latency: matplotlib is not installed (pip install -e '.[bench]'): no timeline", file=sys.stderr)
        return False
    t0 = run.phases[0][1] if run.phases else 0.0
    fig, axes = plt.subplots(3, 1, figsize=(14, 9), sharex=True)
    top = axes[0]
    for records, label in ((run.requests, "relay request"), (run.confirms, "broker confirm (own client)")):
        worst: dict[int, float] = {}
        for s, lat in records:
            index = int((s + lat - t0) / SLICE)
            worst[index] = max(worst.get(index, 0.0), lat)
        top.scatter(
            [i * SLICE for i in worst], [v * 1000 for v in worst.values()], s=4, label=f"{label}: max per 100 ms"
        )
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper right", markerscale=8)
    for kind, start, end in run.phases:
        if kind == "broker":
            for ax in axes:
                ax.axvspan(start - t0, end - t0, color="0.92", lw=0, zorder=0)
    xs = [line["t"] - wall_offset - t0 for line in run.slices]
    axes[1].plot(xs, [line["loop_lag_max"] * 1000 for line in run.slices], label="loop lag (max per 100 ms)")
    axes[1].plot(xs, [line["gc_max"] * 1000 for line in run.slices], label="GC pause (max)")
    axes[1].plot(xs, [(line["wait"]["max_le"] or 0) * 1000 for line in run.slices], label="handler wait (bucket)")
    axes[1].set_ylabel("ms")
    axes[1].legend(loc="upper right")
    axes[2].plot(
        xs, [(line["confirms"]["max_le"] or 0) * 1000 for line in run.slices], label="relay's slowest confirm (bucket)"
    )
    axes[2].plot(
        xs, [(line["spool_writes"]["max_le"] or 0) * 1000 for line in run.slices], label="spool write (bucket)"
    )
    axes[2].set_ylabel("ms")
    axes[2].set_xlabel("seconds (grey: broker phases)")
    axes[2].legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- main ---------------------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, out: Path, index: int) -> tuple[Run, dict[str, Any], float]:
    slice_log = out / f"slices-{index}.jsonl"
    slice_log.unlink(missing_ok=True)
    relay = Relay(APP, TOKEN, extra_env={"RELAY_SLICE_LOG": str(slice_log)})
    run = Run()
    # time.monotonic() + wall_offset = time.time(): the relay's lines carry wall time.
    wall_offset = time.time() - time.monotonic()
    # uvloop, as the relay: the load generator's own cost is part of what it measures.
    with relay, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(drive(relay, args, run))
    run.slices = [json.loads(line) for line in slice_log.read_text().splitlines() if line]
    slice_log.unlink()
    return run, analyse(run, args, wall_offset), wall_offset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of relay load per run (as much broker load)"
    )
    parser.add_argument("--phase", type=float, default=1.0, help="seconds per alternating phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--slow", type=float, default=0.020, help="a slice is slow when a request took longer (s)")
    parser.add_argument("--smoke", action="store_true", help="4 s per run, 0.5 s phases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.phase, args.warmup = 4.0, 0.5, 1.0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    rows: list[dict[str, Any]] = []
    worst: tuple[float, Run, float, int] | None = None
    for index in range(1, args.runs + 1):
        cpu, wall = procstat.system_cpu(), time.monotonic()
        run, row, wall_offset = one_run(args, args.out, index)
        row["run"] = index
        # Both cores' busy share over the run (relay, broker, this client and whatever else ran).
        busy = procstat.busy_seconds(procstat.system_cpu()) - procstat.busy_seconds(cpu)
        row["machine_busy"] = round(busy / (time.monotonic() - wall) / 2, 2)
        rows.append(row)
        print(
            f"run {index}: relay p99 {row['relay_p99_ms']} ms, broker p99 {row['broker_p99_ms']} ms, "
            f"gap {row['gap_ms']} ms, slow slices {len(row['slow_slices'])} {row['slow_slice_causes']}",
            flush=True,
        )
        if worst is None or row["gap_ms"] > worst[0]:
            worst = (row["gap_ms"], run, wall_offset, index)
    name = f"latency-{stamp}{'-smoke' if args.smoke else ''}"
    png = args.out / f"{name}.png"
    plotted = worst is not None and plot(worst[1], worst[2], f"run {worst[3]} of {stamp} (worst gap)", png)
    write(args, rows, args.out / name, png.name if plotted else None)
    return 0


def write(args: argparse.Namespace, rows: list[dict[str, Any]], base: Path, png: str | None) -> None:
    within = sum(row["within_2ms"] for row in rows)
    base.with_suffix(".json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=1)
    )
    lines = [
        f"# Tail latency: relay against the broker's own confirms ({len(rows)} runs)",
        "",
        f"`python -m bench.latency --runs {args.runs} --duration {args.duration:g} --phase {args.phase:g}` at "
        f"{args.connections} connections; relay and broker phases alternate within each run.",
        "",
        f"Runs with the relay's p99 within 2 ms of the broker's: **{within} of {len(rows)}**.",
        "",
        "| run | relay req/s | relay p50 / p99 (ms) | broker confirm p99 (ms) | gap (ms) | slow slices (> "
        f"{args.slow * 1000:g} ms) by cause | loop lag max (ms) | GC max (ms) | machine busy |"
        " relay CPU per request (µs) | cores in relay phases: relay / load client / broker |"
        " cores in broker phases: aiormq client / broker |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(row["slow_slice_causes"].items())) or "none"
        lines.append(
            f"| {row['run']} | {row['relay_req_per_s']} | {row['relay_p50_ms']} / {row['relay_p99_ms']} | "
            f"{row['broker_p99_ms']} | {row['gap_ms']} | {len(row['slow_slices'])}: {causes} | "
            f"{row['loop_lag_max_ms']} | {row['gc_max_ms']} | {row['machine_busy']:.0%} |"
            f" {row['relay_cpu_us_per_request']} | {_cores(row, 'relay', ('relay', 'client', 'broker'))} |"
            f" {_cores(row, 'broker', ('client', 'broker'))} |"
        )
    if png:
        lines += ["", f"Timeline of the run with the largest gap: ![timeline]({png})"]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"bench.latency: wrote {base.with_suffix('.md')}")


def _cores(row: dict[str, Any], kind: str, names: tuple[str, ...]) -> str:
    used = row["cores"].get(kind, {})
    return " / ".join(f"{used[n]:.2f}" if n in used else "?" for n in names)


if __name__ == "__main__":
    sys.exit(main())
