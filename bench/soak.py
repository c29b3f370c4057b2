"""Issue 5's memory target: the relay's RSS under sustained load, sampled over a long run.

One ``relay serve`` (shared broker, its own exchange and quorum queue), wrk with the benchmark's
signed, distinct C2C recalls at a fixed connection count for *seconds*; RSS (process tree) read
every second and reported every *step* seconds. After the run the queue must hold at least as
many events as there were 200s. Writes ``<out>/rss-soak.json`` and ``rss-soak.md``.

    .venv/bin/python -m bench.soak --seconds 300 --connections 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import procstat
from bench.load import Target, run_wrk
from bench.run import APP, TOKEN
from bench.services import Relay
from relay.tencent.callback import C2C_RECALL

RESULTS = Path(__file__).parent / "results"


def soak(seconds: float, connections: int, step: float) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with Relay(APP, TOKEN) as relay:
        queued_before = relay.queue_count(at_least=0)
        with procstat.RssSampler(relay.pid, interval=1.0) as rss:
            wrk = run_wrk(Target(relay.port, APP, TOKEN, C2C_RECALL), connections, seconds)
        queued = relay.queue_count(at_least=queued_before + wrk["ok"]) - queued_before
    samples = rss.samples
    every = max(1, round(step))
    series = [(i, round(samples[i], 1)) for i in range(0, len(samples), every)]
    if series[-1][0] != len(samples) - 1:
        series.append((len(samples) - 1, round(samples[-1], 1)))
    warm = samples[min(len(samples) - 1, 30) :]  # after the first 30 s: caches, pools and the heap have grown
    return {
        "when": started,
        "seconds": seconds,
        "connections": connections,
        "requests": wrk["requests"],
        "ok": wrk["ok"],
        "ok_rps": round(wrk["ok"] / (wrk["duration_us"] / 1e6), 1),
        "queued": queued,
        "queue_check": queued >= wrk["ok"],
        "rss_mib": series,
        "rss_mib_start": round(samples[0], 1),
        "rss_mib_max": round(max(samples), 1),
        "rss_mib_after_30s": {"min": round(min(warm), 1), "max": round(max(warm), 1)},
    }


def markdown(result: dict[str, Any]) -> str:
    series = result["rss_mib"]
    warm = result["rss_mib_after_30s"]
    return "\n".join(
        [
            "# Relay RSS under sustained load",
            "",
            f"{result['when']}. `relay serve` (one process, shared RabbitMQ, quorum queue), wrk -t1 "
            f"-c{result['connections']} for {result['seconds']:g} s with distinct, signed C2C recall callbacks "
            "(`bench/wrk/callback.lua`); RSS of the process tree read every second. Reproduce: "
            f"`.venv/bin/python -m bench.soak --seconds {result['seconds']:g} --connections {result['connections']}`.",
            "",
            f"Result: {result['ok']:,} callbacks answered 200 ({result['ok_rps']:,} per second), queue held "
            f"{result['queued']:,} ({'≥' if result['queue_check'] else '<'} 200s). **RSS {result['rss_mib_start']} MiB "
            f"at start, between {warm['min']} and {warm['max']} MiB from 30 s to the end** "
            f"(max {result['rss_mib_max']}).",
            "",
            "| s | " + " | ".join(str(s) for s, _ in series) + " |",
            "|---|" + "---|" * len(series),
            "| RSS MiB | " + " | ".join(str(v) for _, v in series) + " |",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--step", type=float, default=30, help="seconds between RSS values in the table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = soak(args.seconds, args.connections, args.step)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rss-soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "rss-soak.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["queue_check"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
