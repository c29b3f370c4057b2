"""The built container image, run the way a user runs it: ``make image-test`` (after ``make image``).

Not part of the default pytest run (no ``test_`` prefix): it needs root, buildah and the image. It
runs the image's own ENTRYPOINT and CMD with the Kubernetes ConfigMap's settings under buildah's
chroot isolation on the host network (no container daemon here, and ``podman run`` cannot set up
cgroups), first with the broker unreachable (the callback is spooled), then with RabbitMQ (the spool
drains and a new callback is published), and reads both events back from RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("RELAY_IMAGE", "localhost/revoke-relay:dev")
AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
OUT = ROOT / "build" / "image"
RUN = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
APP, TOKEN = "1400000001", f"smoke-{uuid.uuid4().hex}"
SIZE_BUDGET_MB = 200  # the image is ~145 MB on the Debian stand-in base; this catches a compiler creeping in
RELAY_UID = 10001

pytestmark = pytest.mark.timeout(240)


def _kustomize_literals() -> dict[str, str]:
    """The non-secret settings a pod gets from the base ConfigMap (k8s/base/kustomization.yaml)."""
    doc = yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())
    literals = next(g["literals"] for g in doc["configMapGenerator"] if g["name"] == "revoke-relay-config")
    return dict(item.split("=", 1) for item in literals)


def _grace_period() -> int:
    """terminationGracePeriodSeconds of the StatefulSet: the time Kubernetes gives SIGTERM."""
    doc = yaml.safe_load((ROOT / "k8s/base/statefulset.yaml").read_text())
    return int(doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _buildah(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=check, timeout=timeout)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - http://127.0.0.1 only
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


@dataclass
class Stop:
    """How a run ended after SIGTERM."""

    returncode: int
    seconds: float
    log: str


@dataclass
class Run:
    """One ``buildah run`` of the image's entrypoint, with its log in build/image/."""

    container: str
    env: dict[str, str]
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        flags = [f"--env={k}={v}" for k, v in self.env.items()]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([*RUN, *flags, self.container, "--", *self.command], stdout=log, stderr=log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['RELAY_PORT']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the relay exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if _get(self.url + "/healthz")[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        pytest.fail(f"/healthz did not answer within {timeout} s:\n{self.log()[-3000:]}")

    def relay_pid(self) -> int:
        """The relay's own process (the container's PID 1 under a runtime), below buildah's helpers."""
        for pid in _descendants(self.process.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "relay":
                    return pid
            except OSError:
                continue
        pytest.fail(f"no relay process below buildah (pid {self.process.pid})")

    def ids(self) -> tuple[list[int], list[int]]:
        """Real, effective, saved and filesystem uid and gid of the relay process."""
        status = Path(f"/proc/{self.relay_pid()}/status").read_text()
        fields = dict(re.findall(r"^(Uid|Gid):\s+(.*)$", status, re.M))
        return [int(v) for v in fields["Uid"].split()], [int(v) for v in fields["Gid"].split()]

    def terminate(self, grace: float) -> Stop:
        """SIGTERM to the relay, as a container runtime sends it to PID 1; SIGKILL after *grace*."""
        os.kill(self.relay_pid(), signal.SIGTERM)
        start = time.monotonic()
        try:
            returncode = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            returncode = -9
        return Stop(returncode, time.monotonic() - start, self.log())

    def kill(self) -> None:
        if self.process.poll() is None:
            for pid in _descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    """The image's Docker config (user, entrypoint, ports, healthcheck); fails when there is none."""
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        pytest.fail("the image smoke test runs as root with buildah: run `make image` first", pytrace=False)
    found = _buildah("inspect", "--type", "image", IMAGE, check=False)
    if found.returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `make image` first ({found.stderr.strip()})", pytrace=False)
    config: dict[str, Any] = json.loads(found.stdout)["Docker"]["config"]
    return config


@pytest.fixture(scope="module")
def container(image: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    """A working container of the image and its root filesystem as seen from the host."""
    name = f"revoke-relay-smoke-{uuid.uuid4().hex[:8]}"
    _buildah("from", "--quiet", "--pull=false", "--name", name, IMAGE)
    try:
        yield name, Path(_buildah("mount", name).stdout.strip())
    finally:
        _buildah("umount", name, check=False)
        _buildah("rm", name, check=False)


@pytest.fixture(scope="module")
def names() -> Iterator[dict[str, str]]:
    """A unique exchange and queue on the shared broker, deleted afterwards."""
    tag = uuid.uuid4().hex[:12]
    names = {"exchange": f"image-smoke.x.{tag}", "queue": f"image-smoke.q.{tag}"}
    yield names

    async def delete() -> None:
        connection = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": "image-smoke cleanup"})
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(names["queue"])
            await channel.exchange_delete(names["exchange"])

    asyncio.run(delete())


def _env(names: dict[str, str], amqp_url: str) -> dict[str, str]:
    """The ConfigMap's settings plus the Secret's two, on free loopback ports of this shared host."""
    env = _kustomize_literals()
    env.update(
        RELAY_HOST="127.0.0.1",
        RELAY_PORT=str(_free_port()),
        RELAY_API_PORT=str(_free_port()),  # the recall API's listener, where the image has one
        RELAY_EXCHANGE=names["exchange"],
        RELAY_QUEUES=names["queue"],
        RELAY_AMQP_URL=amqp_url,
        RELAY_SDKAPPIDS=APP,
        RELAY_CALLBACK_TOKENS=f"{APP}={TOKEN}",
    )
    return env


def _send_sample(url: str) -> str:
    """A signed C2C recall callback, posted by the host's ``relay send-sample`` as Tencent would post it."""
    relay = Path(sys.executable).with_name("relay")
    done = subprocess.run(
        [str(relay), "send-sample", "--url", f"{url}/tencent-im/callback", "--sdkappid", APP, "--token", TOKEN],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    return done.stdout.strip()


def _in_container(container: str, env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    flags = [f"--env={k}={v}" for k, v in env.items()]
    return subprocess.run([*RUN, *flags, container, "--", *command], capture_output=True, text=True, timeout=60)


@dataclass
class Outcome:
    """What one run of the image showed, for the tests below to judge."""

    uid: list[int]
    gid: list[int]
    healthz: tuple[int, dict[str, Any]]
    readyz: tuple[int, dict[str, Any]]
    callback: str
    healthcheck: int
    stop: Stop
    after: dict[str, Any] = field(default_factory=dict)


def _serve(container: str, config: dict[str, Any], env: dict[str, str], log: Path, ready: str | None) -> Outcome:
    """Run the image's ENTRYPOINT + CMD, probe it, post one callback, stop it with SIGTERM."""
    run = Run(container, env, [*config["Entrypoint"], *config["Cmd"]], log)
    try:
        run.wait_healthy()
        uid, gid = run.ids()
        healthz = _get(run.url + "/healthz")
        # Wait for the broker connection where one is expected (the relay connects in the background).
        deadline = time.monotonic() + 20
        readyz = _get(run.url + "/readyz")
        while ready and readyz[1].get(ready) is not True and time.monotonic() < deadline:
            time.sleep(0.2)
            readyz = _get(run.url + "/readyz")
        callback = _send_sample(run.url)
        # The image's HEALTHCHECK, run as a runtime would: inside the container, with its environment.
        healthcheck = _in_container(container, env, *config["Healthcheck"]["Test"][1:]).returncode
        stop = run.terminate(_grace_period())
    finally:
        run.kill()
    print(f"\n[{log.stem}] uid={uid} gid={gid} /healthz {healthz[0]} /readyz {readyz[0]} {json.dumps(readyz[1])}")
    print(f"[{log.stem}] callback: {callback.splitlines()[-1]}; HEALTHCHECK exit {healthcheck}")
    print(f"[{log.stem}] SIGTERM -> exit {stop.returncode} after {stop.seconds:.1f} s (grace {_grace_period()} s)")
    return Outcome(uid, gid, healthz, readyz, callback, healthcheck, stop)


@pytest.fixture(scope="module")
def spooling(image: dict[str, Any], container: tuple[str, Path], names: dict[str, str]) -> Outcome:
    """The image with an unreachable broker: the callback must be spooled on the image's volume."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = _env(names, "amqp://guest:guest@127.0.0.1:1/")  # nothing listens on port 1
    outcome = _serve(container[0], image, env, OUT / "smoke-spooling.log", ready=None)
    stats = _in_container(container[0], env, "relay", "spool", "stats")
    owner = _in_container(container[0], env, "stat", "-c", "%u:%g", "/var/lib/revoke-relay/spool/spool.db")
    outcome.after = {"stats": stats.stdout + stats.stderr, "owner": owner.stdout.strip() or owner.stderr}
    print(f"[spooling] after stop: relay spool stats -> {stats.stdout.strip()}; spool.db {outcome.after['owner']}")
    return outcome


@pytest.fixture(scope="module")
def publishing(image: dict[str, Any], container: tuple[str, Path], names: dict[str, str], spooling: Outcome) -> Outcome:
    """The same container with RabbitMQ: the spooled event drains, a new callback is published."""
    env = _env(names, AMQP_URL)
    outcome = _serve(container[0], image, env, OUT / "smoke-publishing.log", ready="broker")
    outcome.after = {"messages": asyncio.run(_read(names["queue"], want=2))}
    print(f"[publishing] read back from {names['queue']}: {len(outcome.after['messages'])} events")
    return outcome


async def _read(queue_name: str, want: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Up to *want* messages from the queue the relay declared (10 s), acknowledged."""
    connection = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": "image-smoke reader"})
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=True)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + 10
        while len(got) < want and time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.2)
            else:
                got.append(message)
        return got


def test_image_runs_as_an_unprivileged_user_by_default(image: dict[str, Any]) -> None:
    """The image's USER is 10001:10001 and its entrypoint serves the relay on the documented ports."""
    assert f"{RELAY_UID}:{RELAY_UID}" == image["User"]
    assert ["relay"] == image["Entrypoint"]
    assert ["serve"] == image["Cmd"]
    assert {"8080/tcp", "8081/tcp"} == set(image["ExposedPorts"])
    assert "CMD" == image["Healthcheck"]["Test"][0]


def test_process_is_not_root(spooling: Outcome) -> None:
    """The running relay's uids and gids (real, effective, saved, filesystem) are all 10001."""
    assert [RELAY_UID] * 4 == spooling.uid
    assert [RELAY_UID] * 4 == spooling.gid


def test_health_and_readiness_answer(spooling: Outcome, publishing: Outcome) -> None:
    """/healthz and /readyz answer 200, ready through the spool without a broker and through the broker with one."""
    for outcome in (spooling, publishing):
        assert (200, {"status": "ok"}) == outcome.healthz
        assert 200 == outcome.readyz[0]
    assert "ready" == spooling.readyz[1]["status"]
    assert False is spooling.readyz[1]["broker"]
    assert True is spooling.readyz[1]["spool"]["available"]
    assert True is publishing.readyz[1]["broker"]


def test_healthcheck_passes_while_serving(spooling: Outcome, publishing: Outcome) -> None:
    """The image's HEALTHCHECK command exits 0 against the running relay."""
    assert 0 == spooling.healthcheck
    assert 0 == publishing.healthcheck


def test_healthcheck_fails_without_a_relay(image: dict[str, Any], container: tuple[str, Path]) -> None:
    """The HEALTHCHECK command exits non-zero when nothing serves RELAY_PORT (it can fail)."""
    done = _in_container(container[0], {"RELAY_PORT": str(_free_port())}, *image["Healthcheck"]["Test"][1:])
    assert 0 != done.returncode


def test_spool_is_writable_by_the_image_user(spooling: Outcome) -> None:
    """With the broker down the callback is answered 200 and lands in the image's spool, owned by 10001."""
    assert "-> 200" in spooling.callback
    assert f"{RELAY_UID}:{RELAY_UID}" == spooling.after["owner"]
    assert 1 == json.loads(spooling.after["stats"])["events"], spooling.after["stats"]


def test_callbacks_become_events_in_rabbitmq(publishing: Outcome) -> None:
    """The spooled event and a new callback both arrive on the relay's queue as valid message.revoked events."""
    assert "-> 200" in publishing.callback
    messages = publishing.after["messages"]
    assert 2 == len(messages)
    schema = json.loads(resources.files("relay").joinpath("schema/event.v4.json").read_text(encoding="utf-8"))
    for message in messages:
        body = json.loads(message.body)
        jsonschema.Draft202012Validator(schema).validate(body)
        assert "message.revoked" == body["type"]
        assert "message.revoked.c2c" == message.routing_key
        assert APP == body["sdkAppID"]
    assert 2 == len({json.loads(m.body)["eventID"] for m in messages})


def test_sigterm_stops_cleanly_within_the_grace_period(spooling: Outcome, publishing: Outcome) -> None:
    """SIGTERM to the relay ends it with exit 0 and its summary log line, inside terminationGracePeriodSeconds."""
    for outcome in (spooling, publishing):
        assert 0 == outcome.stop.returncode, outcome.stop.log[-3000:]
        assert outcome.stop.seconds < _grace_period()
        events = [json.loads(line).get("event") for line in outcome.stop.log.splitlines() if line.startswith("{")]
        assert "relay.draining" in events
        assert "relay.stopped" == events[-1]


def test_no_build_tools_or_build_secrets_in_the_image(container: tuple[str, Path]) -> None:
    """The runtime has no compiler, strip or pip, and none of the machine's pip configuration."""
    rootfs = container[1]
    for path in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/strip", "usr/bin/make", "opt/venv/bin/pip", "etc/pip.conf"):
        assert not (rootfs / path).exists(), path
    assert not list((rootfs / "opt/venv/lib").glob("python3*/site-packages/pip"))
    assert not (rootfs / "run/secrets").exists() or not any((rootfs / "run/secrets").iterdir())
    done = _in_container(container[0], {}, "python", "-c", "import pip")
    assert 0 != done.returncode


def test_sbom_lists_every_distribution_in_the_venv(container: tuple[str, Path]) -> None:
    """build/image/sbom.cdx.json names the relay and every distribution installed in the image's venv."""
    sbom = json.loads((OUT / "sbom.cdx.json").read_text())
    listed = {(c["name"].lower().replace("_", "-"), c["version"]) for c in sbom["components"]}
    listed.add((sbom["metadata"]["component"]["name"], sbom["metadata"]["component"]["version"]))
    code = "import importlib.metadata as m; print('\\n'.join(f'{d.name} {d.version}' for d in m.distributions()))"
    done = _in_container(container[0], {}, "python", "-c", code)
    assert 0 == done.returncode, done.stderr
    installed = {(n.lower().replace("_", "-"), v) for n, v in (line.split() for line in done.stdout.splitlines())}
    assert ("revoke-relay", "0.1.0") in installed
    assert installed == listed


def test_image_size_is_reported_and_within_budget(container: tuple[str, Path]) -> None:
    """The image's uncompressed size and its venv's are printed; the image stays under the budget."""
    size = _buildah("images", "--noheading", "--format", "{{.Size}}", IMAGE).stdout.split("\n")[0]
    number, unit = size.split()
    megabytes = float(number) * {"kB": 1e-3, "MB": 1, "GB": 1e3}[unit]
    venv = subprocess.run(["du", "-sm", str(container[1] / "opt/venv")], capture_output=True, text=True, check=True)
    print(f"\n[size] {IMAGE}: {size} uncompressed; /opt/venv {venv.stdout.split()[0]} MB (budget {SIZE_BUDGET_MB} MB)")
    assert megabytes < SIZE_BUDGET_MB
