"""The issue-20 demo, recorded: a private RabbitMQ node, the relay with RELAY_AUDIT_STREAM, callbacks
before and after a relay restart and a broker restart, then `relay history`, a replay into a fresh
queue, an export and the audit example answering a question. Writes bench/results/history-demo.md.

    .venv/bin/python -m bench.history_demo

Never touches the shared broker: everything goes to a private node (tests/faults/node.py) that it stops.
PostgreSQL on 127.0.0.1:5432 (trust) holds the audit example's rows in a database it creates and drops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aio_pika

from bench.services import ROOT, free_port
from tests.faults.node import PrivateRabbit

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
DEMO_DB = "relay_history_demo"


class Transcript:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.lines += ["", text, ""]

    def record(self, command: str, output: str) -> None:
        """A command run from here (against the private node), with its output."""
        self.lines += ["```", f"$ {command}", *output.rstrip("\n").splitlines(), "```"]
        print(f"$ {command}\n{output}", flush=True)

    def run(self, command: str, *, head: int | None = None) -> str:
        """Run *command* in a shell with the demo's environment; record it and its output."""
        done = subprocess.run(
            command, shell=True, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        output = (done.stdout + done.stderr).rstrip("\n").splitlines()
        shown = output[:head] if head else output
        self.lines += ["```", f"$ {command}", *shown, *(["…"] if head and len(output) > head else []), "```"]
        print(f"$ {command}\n" + "\n".join(shown), flush=True)
        return done.stdout


def ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the relay did not become ready")


def start_relay(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        relay = subprocess.Popen([sys.executable, "-m", "relay", "serve"], env=env, cwd=ROOT, stdout=out, stderr=out)
    ready(int(env["RELAY_PORT"]))
    return relay


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


async def declare_queue(url: str, name: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def depth(url: str, names: list[str]) -> dict[str, int]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        return {
            name: (await channel.declare_queue(name, passive=True)).declaration_result.message_count or 0
            for name in names
        }


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="relay-history-demo-"))
    node = PrivateRabbit(tmp / "node", name=f"relaydemo{os.getpid()}")
    node.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_AMQP_URL=node.url,
        RELAY_SDKAPPIDS="1400000001",
        RELAY_CALLBACK_TOKENS="1400000001=demo-token-123",
        RELAY_QUEUES="moderation.revocations",
        RELAY_AUDIT_STREAM="relay.history",
        RELAY_PORT=str(port),
        RELAY_SPOOL_DIR=str(tmp / "spool"),
        RELAY_LOG_LEVEL="warning",
        RELAY_SHUTDOWN_DELAY="0",
        AUDIT_POSTGRES_URL=f"{POSTGRES}/{DEMO_DB}",
        PYTHONPATH=str(ROOT),
        PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
    )
    t = Transcript(env)
    relay: subprocess.Popen[bytes] | None = None
    audit: subprocess.Popen[bytes] | None = None
    try:
        t.note(
            f"A private RabbitMQ {node.ctl('version').strip()} node on 127.0.0.1:{node.port}; the relay on :{port}"
            " with `RELAY_AUDIT_STREAM=relay.history` and `RELAY_QUEUES=moderation.revocations`."
        )
        relay = start_relay(env, tmp / "relay.log")
        t.run("relay send-sample --kind group --items 2")
        t.run("relay send-sample --kind c2c")
        t.note("**Relay restart** (SIGTERM, start again), then one more callback:")
        stop(relay)
        relay = start_relay(env, tmp / "relay.log")
        t.run("relay send-sample --kind official_account")
        t.note("**Broker restart** (`rabbitmqctl stop`, start the node again on the same data), then one more:")
        node.stop()
        node.start()
        ready(port, 60)  # the relay reconnected by itself
        t.record("rabbitmqctl list_queues name type state", node.ctl("list_queues", "name", "type", "state"))
        t.run("relay send-sample --kind c2c")
        counters = "relay_(events_spooled|events_drained|publish_failures)_total"
        none = "echo '(all zero: nothing spooled, nothing failed)'"
        metrics = t.run(f"curl -s 127.0.0.1:{port}/metrics | grep -E '^{counters}' | grep -v ' 0.0$' || {none}")
        if "relay_events_spooled_total" in metrics:
            t.note(
                "That callback came while the relay was still settling on the restarted node: it was answered"
                " from the spool and forwarded a few seconds later; the history shows it once forwarded:"
            )
            t.run(f"sleep 8; curl -s 127.0.0.1:{port}/metrics | grep -E '^relay_(events_drained_total|spool_events)'")
        t.note("`relay history` — everything, across both restarts, oldest first:")
        t.run("relay history --since 1h")
        t.run(
            "relay history --since 1h --filter conversation.type=group --filter operator.userID=u_mod01 --json", head=1
        )
        t.note("A replay into a fresh queue (nobody else sees it), refused targets, and a dry run:")
        asyncio.run(declare_queue(node.url, "replay.check"))
        t.run("relay replay --since 1h --to-queue replay.check")
        depths = asyncio.run(depth(node.url, ["replay.check", "moderation.revocations"]))
        t.record("queue.declare(passive) message counts", "\n".join(f"{q}\t{n}" for q, n in depths.items()))
        t.run("relay history --since 1h --unique | wc -l  # the replay did not enter the history")
        t.run("relay replay --since 1h --to-queue no.such.queue; echo exit=$?")
        t.run("relay replay --since 1h --routing-key message.revoked.c2c; echo exit=$?")
        t.run("relay replay --since 1h --routing-key replay.moderation --dry-run")
        t.note("The first lines of an export:")
        t.run("relay export --since 1h --format csv", head=4)
        t.run("relay export --since 1h --format jsonl --output /tmp/relay-demo.jsonl && wc -l /tmp/relay-demo.jsonl")
        t.note("The audit example (examples/audit_service.py) follows the stream into PostgreSQL, then answers:")
        subprocess.run(["psql", POSTGRES + "/postgres", "-qc", f"DROP DATABASE IF EXISTS {DEMO_DB}"], check=True)
        subprocess.run(["psql", POSTGRES + "/postgres", "-qc", f"CREATE DATABASE {DEMO_DB}"], check=True)
        with (tmp / "audit.log").open("ab") as out:
            audit = subprocess.Popen(
                [sys.executable, "examples/audit_service.py", "run"], env=env, cwd=ROOT, stdout=out, stderr=out
            )
        time.sleep(4)
        stop(audit)
        audit = None
        t.run("python examples/audit_service.py query --group '@TGS#2SAMPLE01'")
        t.run("python examples/audit_service.py query --operator u_alice --since 2026-01-01T00:00:00+00:00")
        t.note("Missing stream and unreachable broker: one line, non-zero exit:")
        t.run("RELAY_AUDIT_STREAM=no.such.stream relay history --since 1h; echo exit=$?")
        t.run("RELAY_AMQP_URL=amqp://guest:guest@127.0.0.1:1/ relay history --since 1h; echo exit=$?")
    finally:
        if audit is not None:
            stop(audit)
        if relay is not None:
            stop(relay)
        node.stop()
        subprocess.run(["psql", POSTGRES + "/postgres", "-qc", f"DROP DATABASE IF EXISTS {DEMO_DB}"], check=False)
    out = ROOT / "bench" / "results" / "history-demo.md"
    header = [
        "# The history: a recorded demo (issue 20)",
        "",
        f"Recorded {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by `python -m bench.history_demo`"
        " (commands run as shown; their output verbatim).",
    ]
    out.write_text("\n".join(header + t.lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
