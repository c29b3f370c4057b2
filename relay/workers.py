"""``relay serve --workers N``: N relay processes sharing one port (SO_REUSEPORT), for multi-core pods.

One event loop runs on one core; the kernel spreads incoming connections over the workers. Each
worker is a complete relay with its own AMQP connection and its own spool (``<spool dir>/worker-<i>``:
the spool lock allows one process per directory). The supervisor only starts workers, restarts one
that dies, forwards SIGTERM/SIGINT and waits; it exits 0 when every worker shut down cleanly.

Any worker's ``/metrics`` merges every worker's metrics, each sample labelled ``worker``, so a scrape
sees the whole pod whichever worker answers (sum by … without (worker) in queries); any worker's
``/readyz`` is 200 only while every running worker is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = structlog.get_logger()

WORKER_ENV = "RELAY_WORKER"  # set by the supervisor in each worker: "<index>/<count>"
_RESTART_DELAY = 1.0


def worker_slot(environ: dict[str, str] | os._Environ[str]) -> tuple[int, int] | None:
    """(index, count) when this process is a worker started by the supervisor."""
    raw = environ.get(WORKER_ENV)
    if not raw:
        return None
    index, _, count = raw.partition("/")
    return int(index), int(count)


def socket_path(port: int, index: int) -> Path:
    """Where worker *index* of the relay on *port* serves its own, unmerged metrics."""
    return Path(tempfile.gettempdir()) / f"revoke-relay-{port}-w{index}.sock"


EXIT_CANNOT_LISTEN = 78  # EX_CONFIG: a worker that cannot bind its port (relay.cli.serve) is not restarted


def supervise(count: int, argv: list[str]) -> int:
    """Run *count* workers until SIGTERM/SIGINT; restart any that exits on its own; pass SIGHUP on."""
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stop_signal: int | None = None
    signalled: set[int] = set()  # PIDs the stop signal was forwarded to

    def start(index: int) -> None:
        env = {**os.environ, WORKER_ENV: f"{index}/{count}"}
        workers[index] = subprocess.Popen([sys.executable, "-m", "relay", *argv], env=env)  # noqa: S603

    def forward() -> None:
        assert stop_signal is not None
        for proc in workers.values():
            if proc.poll() is None and proc.pid not in signalled:
                signalled.add(proc.pid)
                proc.send_signal(stop_signal)

    def stop(signum: int, _: object) -> None:
        nonlocal stop_signal
        stop_signal = signum
        forward()

    def reload(signum: int, _: object) -> None:
        # SIGHUP (credentials reload) goes to every running worker; the supervisor holds none.
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(count):
        start(index)
    log.info("relay.workers_started", workers=count, pids=[p.pid for p in workers.values()])
    codes: dict[int, int] = {}
    while len(codes) < count:
        time.sleep(0.2)
        if stop_signal is not None:
            forward()  # a worker started while the signal was being handled gets it too
        for index, proc in workers.items():
            code = proc.poll()
            if code is None or index in codes:
                continue
            if stop_signal is None and code == EXIT_CANNOT_LISTEN:
                # Its port cannot be had (in use by another program): restarting would fail the same way.
                log.error("relay.worker_cannot_listen", worker=index, code=code)
                stop(signal.SIGTERM, None)
                codes[index] = code
                continue
            if stop_signal is None:
                log.error("relay.worker_exited", worker=index, code=code, restart_in=_RESTART_DELAY)
                time.sleep(_RESTART_DELAY)
            if stop_signal is not None:  # stopping (perhaps since the delay began): no restart
                codes[index] = code
                continue
            start(index)
    # JSON logs take string keys only (orjson): {"0": 0, "1": 0}.
    log.info("relay.workers_stopped", codes={str(index): code for index, code in sorted(codes.items())})
    if EXIT_CANNOT_LISTEN in codes.values():
        return EXIT_CANNOT_LISTEN
    return 0 if all(code == 0 for code in codes.values()) else 1


class _Merged(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


async def _ask_peer(port: int, peer: int, path: str) -> tuple[int, str]:
    """GET *path* from worker *peer* over its unix socket, within 1 s: (status, body)."""
    connector = aiohttp.UnixConnector(path=str(socket_path(port, peer)))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1)) as session,
        session.get(f"http://worker{path}") as response,
    ):
        return response.status, await response.text()


async def peer_readiness(index: int, count: int, port: int) -> dict[int, str]:
    """Each other worker's readiness: ``ready``, ``not_ready``, ``not_answering`` (no answer within
    1 s: hung or overloaded) or ``absent`` (no socket: restarting, so receiving no connections)."""
    states: dict[int, str] = {}

    async def ask(peer: int) -> None:
        try:
            status, _ = await _ask_peer(port, peer, "/readyz")
            states[peer] = "ready" if status == 200 else "not_ready"
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, (FileNotFoundError, ConnectionRefusedError))
            states[peer] = "absent" if refused else "not_answering"
        except (aiohttp.ClientError, OSError, TimeoutError):
            states[peer] = "not_answering"

    await asyncio.gather(*(ask(peer) for peer in range(count) if peer != index))
    return states


async def merged_metrics(own: bytes, index: int, count: int, port: int) -> bytes:
    """This worker's exposition plus every other worker's, samples labelled by worker."""
    texts: dict[int, str] = {index: own.decode()}

    async def fetch(peer: int) -> None:
        # A worker restarting: its series are missing from this scrape only.
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            texts[peer] = (await _ask_peer(port, peer, "/metrics"))[1]

    await asyncio.gather(*(fetch(peer) for peer in range(count) if peer != index))
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": str(worker)}, sample.value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(families.values()))
    return generate_latest(registry)
