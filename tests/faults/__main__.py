"""Run the fault scenarios and print the table: ``python -m tests.faults [--profile full] [scenario ...]``.

Starts a private RabbitMQ node (never the shared one), runs each scenario, writes JSON results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tests.faults.harness import TABLE_HEADER
from tests.faults.node import PrivateRabbit
from tests.faults.scenarios import PROFILES, SCENARIOS, Context


async def run(profile: str, names: list[str], out: Path | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="relay-faults-"))
    node = PrivateRabbit(root / "rabbit")
    print(f"private RabbitMQ {node.node} on 127.0.0.1:{node.port}, work dir {root}", flush=True)
    await asyncio.to_thread(node.start)
    ctx = Context(node, root, PROFILES[profile])
    results = []
    try:
        for name in names:
            started = time.monotonic()
            try:
                result = await SCENARIOS[name](ctx)
            finally:
                await ctx.cleanup()
            result.notes["duration_s"] = round(time.monotonic() - started, 1)
            results.append(result)
            print(result.row(), flush=True)
    finally:
        await asyncio.to_thread(node.stop)
    print(f"\nprofile {profile}: {PROFILES[profile]}\n")
    print(TABLE_HEADER)
    for result in results:
        print(result.row())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "profile": profile,
                    "settings": asdict(PROFILES[profile]),
                    "machine": platform.platform(),
                    "python": sys.version.split()[0],
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
        table = "\n".join([TABLE_HEADER, *(r.row() for r in results)])
        out.with_suffix(".md").write_text(
            f"# Fault scenarios, profile {profile}\n\n{PROFILES[profile]} on {platform.platform()}\n\n{table}\n"
        )
        print(f"\nwritten to {out} and {out.with_suffix('.md')}")
    return 0 if all(r.passed for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    return asyncio.run(run(args.profile, args.scenarios or list(SCENARIOS), args.out))


if __name__ == "__main__":
    raise SystemExit(main())
