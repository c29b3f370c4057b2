"""The README's Quickstart and the recall gateway's "Trying it" block, run as written: in a copy of
the repository (so `make run` makes a fresh venv, as on a new machine), with the real broker, the
fixed ports the docs use, and the commands exactly as the docs print them. The docs cannot drift
from the commands again (issue 23)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- docs-as-written: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)```", re.S)
DOC_PORTS = (8080, 8081, 9100)
DEMO_QUEUES = ("moderation.revocations", "audit.revocations")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(420)]


def blocks() -> dict[str, str]:
    """Every marked shell block of the README and docs/, by name."""
    found: dict[str, str] = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in MARKER.finditer(doc.read_text(encoding="utf-8")):
            found[match["name"]] = match["body"]
    return found


def free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The repository's files (tracked and new, not ignored: no .venv, no spool) in a fresh directory."""
    busy = [p for p in DOC_PORTS if not free(p)]
    if busy:
        pytest.fail(f"the docs use ports {DOC_PORTS}; something already listens on {busy}")
    target = tmp_path_factory.mktemp("fresh") / "revoke-relay"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    existing = {q for q in DEMO_QUEUES if _queue_exists(q)}
    yield target
    for queue in set(DEMO_QUEUES) - existing:  # the demo's queues, if this test made them
        subprocess.run(["rabbitmqctl", "-q", "delete_queue", queue], capture_output=True, check=False)


def _queue_exists(name: str) -> bool:
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, check=False)
    return name in listed.stdout.split()


class Shell:
    """A shell block in its own process group: everything it starts is stopped with it."""

    def __init__(self, cwd: Path, script: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}  # as a new user's shell
        self.log = log
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                ["bash", "-e", "-c", script],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to the whole group (the relay drains and exits), SIGKILL after 15 s; reap the shell."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._signal_group(sig):
                break
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._signal_group(0):
                self.proc.poll()  # reap the shell itself, so only the rest of the group is waited for
                time.sleep(0.2)
        self.proc.wait(timeout=15)

    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True


def wait_ready(shell: Shell, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not free(8080):
            return
        assert shell.proc.poll() is None, shell.output()[-3000:]
        time.sleep(0.5)
    raise AssertionError("the relay did not start:\n" + shell.output()[-3000:])


def test_the_quickstart_works_as_written(clone: Path, tmp_path: Path) -> None:
    """`make run` (a fresh venv, the broker), then in a second terminal each command the Quickstart
    shows: every sample is answered 200."""
    quickstart = blocks()["quickstart"]
    first, _, second = quickstart.partition("\n")
    assert first.startswith("make run"), "the Quickstart's first line starts the relay"
    relay = Shell(clone, first, tmp_path / "run.log")
    try:
        wait_ready(relay, 240)
        time.sleep(2)  # ready to take connections; give it the broker
        terminal = Shell(clone, second, tmp_path / "second.log")
        try:
            assert 0 == terminal.wait(120), terminal.output()
        finally:
            terminal.stop()
        out = terminal.output()
        assert out.count("-> 200") == 2, out
        assert 2 == sum(" by=" in line for line in out.splitlines()), out  # the two events tail printed
    finally:
        relay.stop()


def test_trying_the_gateway_works_as_written(clone: Path, tmp_path: Path) -> None:
    """The recall gateway's "Trying it" block pasted into one terminal: the recall is answered 200 and
    relay tail prints the two requests and the two joined revocations."""
    shell = Shell(clone, blocks()["trying-the-gateway"], tmp_path / "try.log")
    try:
        assert 0 == shell.wait(300), shell.output()[-4000:]
    finally:
        shell.stop()
    out = shell.output()
    assert "-> 200" in out
    lines = [line for line in out.splitlines() if "by=moderator/mod_7" in line]
    assert 2 == sum("[message.recall_requested" in line for line in lines), out[-4000:]
    revoked = [line for line in lines if "[request=" in line and "message.recall" not in line]
    assert 2 == len(revoked), out[-4000:]
    assert all('reason="spam link"' in line for line in revoked)
