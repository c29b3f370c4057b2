"""relay serve --workers 2: one port shared by two processes, merged metrics, restart, clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.tencent.samples import callback_query, encode, sample_body
from relay.workers import socket_path

pytestmark = pytest.mark.timeout(120)
APP = "1400000002"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = _free_port()
    env = {
        **os.environ,
        "RELAY_PORT": str(port),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_SDKAPPIDS": APP,
        "RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",  # no broker: events are spooled
        "RELAY_SPOOL_DIR": str(tmp_path),
        "RELAY_SHUTDOWN_DELAY": "0",
        "RELAY_LOG_LEVEL": "info",  # JSON at info, as deployed: the supervisor logs its workers_stopped
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while len(worker_counts(port)) < 2:  # both workers serve (and answer each other's merge)
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)
    yield proc, port, tmp_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def worker_counts(port: int) -> dict[str, float]:
    """accepted C2C callbacks per worker, from the merged /metrics ({} while not serving)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    pattern = r'relay_callbacks_total\{command="C2C\.CallbackAfterMsgWithDraw",outcome="accepted",worker="(\d)"\} (\S+)'
    return {worker: float(value) for worker, value in re.findall(pattern, text)}


def post(port: int) -> int:
    url = f"http://127.0.0.1:{port}/tencent-im/callback?{callback_query('C2C.CallbackAfterMsgWithDraw', APP)}"
    request = urllib.request.Request(url, data=encode(sample_body("c2c")), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return int(response.status)


def test_workers_share_the_port_and_metrics_are_merged(workers: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    """Connections spread over both workers; any worker's /metrics shows both, labelled; spools are separate."""
    proc, port, spool = workers
    assert [200] * 40 == [post(port) for _ in range(40)]
    counts = worker_counts(port)
    assert {"0", "1"} == set(counts)
    assert 40 == sum(counts.values())
    assert all(count > 0 for count in counts.values()), counts
    assert {"worker-0", "worker-1"} <= {p.name for p in spool.iterdir()}
    proc.send_signal(signal.SIGTERM)
    assert 0 == proc.wait(30)
    assert not [i for i in range(2) if socket_path(port, i).exists()]  # peer sockets removed on exit


def test_a_crashed_worker_is_restarted(workers: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    """SIGKILL one worker: the supervisor starts it again and the port keeps answering."""
    proc, port, _ = workers
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True)
    first = int(children.stdout.split()[0])
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False)
        pids = {int(p) for p in now.stdout.split()}
        if len(pids) == 2 and first not in pids and len(worker_counts(port)) == 2:
            break
        assert time.monotonic() < deadline, "worker was not restarted"
        time.sleep(0.2)
    assert 200 == post(port)


def readiness(port: int) -> tuple[int, dict[str, Any]] | None:
    """/readyz status and body, or None when the connection landed on a worker that did not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())
    except OSError:
        return None


def worker_pids(proc: subprocess.Popen[bytes]) -> dict[str, int]:
    """worker index -> PID, from each child's RELAY_WORKER."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True)
    pids = {}
    for pid in map(int, children.stdout.split()):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        slot = next(v for v in environ if v.startswith(b"RELAY_WORKER="))
        pids[slot.split(b"=", 1)[1].decode().partition("/")[0]] = pid
    return pids


def test_readiness_covers_every_worker(workers: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    """Any worker's /readyz speaks for the pod: 503 while a peer hangs (it still takes connections),
    200 again once it answers, and 200 while a dead peer (no connections) is being restarted."""
    proc, port, _ = workers
    status, body = readiness(port) or (0, {})
    assert (status, body.get("workers")) == (200, {"0": "ready", "1": "ready"})
    pids = worker_pids(proc)
    os.kill(pids["1"], signal.SIGSTOP)
    try:
        answers: list[tuple[int, dict[str, Any]]] = []
        deadline = time.monotonic() + 60
        while len(answers) < 2:  # connections that land on the stopped worker time out: skip them
            assert time.monotonic() < deadline, "worker 0 never answered"
            if (answer := readiness(port)) is not None:
                answers.append(answer)
        assert [(s, b["status"], b["workers"]) for s, b in answers] == [
            (503, "not_ready", {"0": "ready", "1": "not_answering"})
        ] * 2
    finally:
        os.kill(pids["1"], signal.SIGCONT)
    deadline = time.monotonic() + 20
    while (answer := readiness(port)) is None or answer[0] != 200:
        assert time.monotonic() < deadline, f"not ready again: {answer}"
        time.sleep(0.2)

    os.kill(pids["1"], signal.SIGKILL)
    time.sleep(0.3)  # the supervisor restarts it after 1 s
    status, body = readiness(port) or (0, {})
    assert (status, body.get("workers")) == (200, {"0": "ready", "1": "absent"})
    # SIGTERM while the supervisor waits to restart worker 1: it must not start a worker that no
    # one would stop. It exits; 1 because a worker had crashed.
    proc.send_signal(signal.SIGTERM)
    assert 1 == proc.wait(30)
