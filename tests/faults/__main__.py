"""Run the fault scenarios and print the table: ``python -m tests.faults [--profile full] [scenario ...]``.

Starts a private RabbitMQ node (never the shared one), runs each scenario, writes JSON results.
``--cluster`` runs the cluster scenarios instead, on three private nodes joined into one cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.faults.cluster import Cluster
from tests.faults.cluster_scenarios import CLUSTER_PROFILES, CLUSTER_SCENARIOS, ClusterContext
from tests.faults.harness import TABLE_HEADER, Result
from tests.faults.node import PrivateRabbit
from tests.faults.scenarios import PROFILES, SCENARIOS, Context

NARRATIVE = "## What happened"  # heading of the hand-written account below a results table


Scenario = Callable[[Any], Awaitable[Result]]


async def run_each(scenarios: Mapping[str, Scenario], names: list[str], ctx: Any) -> list[Result]:
    """Run the named scenarios one after the other, cleaning up after each; print each row as it comes."""
    results = []
    for name in names:
        started = time.monotonic()
        try:
            result = await scenarios[name](ctx)
        finally:
            await ctx.cleanup()
        result.notes["duration_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        print(result.row(), flush=True)
    return results


async def run(profile: str, names: list[str], out: Path | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="relay-faults-"))
    node = PrivateRabbit(root / "rabbit")
    print(f"private RabbitMQ {node.node} on 127.0.0.1:{node.port}, work dir {root}", flush=True)
    await asyncio.to_thread(node.start)
    try:
        results = await run_each(SCENARIOS, names, Context(node, root, PROFILES[profile]))
    finally:
        await asyncio.to_thread(node.stop)
    return report(f"profile {profile}", asdict(PROFILES[profile]), results, out)


async def run_cluster(profile: str, names: list[str], out: Path | None, net_ticktime: int | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="relay-cluster-faults-"))
    cluster = Cluster(root, net_ticktime=net_ticktime)
    print(f"private cluster {[n.node for n in cluster.nodes]}, work dir {root}", flush=True)
    started = time.monotonic()
    await asyncio.to_thread(cluster.start)
    print(f"cluster running after {time.monotonic() - started:.1f} s", flush=True)
    try:
        results = await run_each(CLUSTER_SCENARIOS, names, ClusterContext(cluster, root, CLUSTER_PROFILES[profile]))
    finally:
        await asyncio.to_thread(cluster.stop)
    settings = {**asdict(CLUSTER_PROFILES[profile]), "net_ticktime": net_ticktime or "60 (default)"}
    return report(f"cluster profile {profile}", settings, results, out)


def report(title: str, settings: dict[str, object], results: list[Result], out: Path | None) -> int:
    print(f"\n{title}: {settings}\n")
    print(TABLE_HEADER)
    for result in results:
        print(result.row())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "profile": title,
                    "settings": settings,
                    "machine": platform.platform(),
                    "python": sys.version.split()[0],
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
        table = "\n".join([TABLE_HEADER, *(r.row() for r in results)])
        md = out.with_suffix(".md")
        # The account of what happened is written by hand below the table: a new run keeps it.
        kept = md.read_text().partition(NARRATIVE)[2] if md.exists() else ""
        md.write_text(
            f"# Fault scenarios, {title}\n\n{settings} on {platform.platform()}\n\n{table}\n"
            + (f"\n{NARRATIVE}{kept}" if kept else "")
        )
        print(f"\nwritten to {out} and {out.with_suffix('.md')}")
    return 0 if all(r.passed for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS, *CLUSTER_SCENARIOS], default=[])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--cluster", action="store_true", help="the cluster scenarios, on three private nodes")
    parser.add_argument("--net-ticktime", type=int, help="cluster nodes' net_ticktime (RabbitMQ's default: 60)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.cluster:
        unknown = set(args.scenarios) - set(CLUSTER_SCENARIOS)
        if unknown:
            parser.error(f"not cluster scenarios: {sorted(unknown)}")
        names = args.scenarios or list(CLUSTER_SCENARIOS)
        return asyncio.run(run_cluster(args.profile, names, args.out, args.net_ticktime))
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"cluster scenarios need --cluster: {sorted(unknown)}")
    return asyncio.run(run(args.profile, args.scenarios or list(SCENARIOS), args.out))


if __name__ == "__main__":
    raise SystemExit(main())
