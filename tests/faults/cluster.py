"""Three private RabbitMQ nodes joined into one cluster, for the cluster fault scenarios.

Each node has its own name, ports and data directory; they share one Erlang cookie and register with
the machine's epmd like any nodes on one host. Never the shared broker on 5672. Partition handling is
``pause_minority``, the setting RabbitMQ recommends for clusters of three or more (docs/deploy.md):
a node cut off from the other two stops serving clients until it sees them again.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.faults.node import PrivateRabbit

CLUSTER_CONF = "cluster_partition_handling = pause_minority\n"


class Cluster:
    def __init__(self, root: Path, size: int = 3, prefix: str | None = None, net_ticktime: int | None = None) -> None:
        prefix = prefix or f"relayc{secrets.token_hex(3)}"
        cookie = secrets.token_hex(16).upper()
        # net_ticktime (default 60 s): how long a silent peer stays "up" for the others (45-75 s).
        conf = CLUSTER_CONF + (f"net_ticktime = {net_ticktime}\n" if net_ticktime else "")
        self.net_ticktime = net_ticktime
        self.nodes = [PrivateRabbit(root / f"node{i}", f"{prefix}n{i}", conf=conf, cookie=cookie) for i in range(size)]

    @property
    def urls(self) -> str:
        """RELAY_AMQP_URL for the whole cluster, in node order."""
        return ",".join(node.url for node in self.nodes)

    def urls_from(self, first: int) -> str:
        """The same list rotated to start at node *first* (the relay connects to the first that answers)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def endpoint(self, node: PrivateRabbit) -> str:
        return f"127.0.0.1:{node.port}"

    def by_endpoint(self, endpoint: str | None) -> PrivateRabbit | None:
        return next((node for node in self.nodes if self.endpoint(node) == endpoint), None)

    def by_name(self, name: str) -> PrivateRabbit | None:
        return next((node for node in self.nodes if node.node == name), None)

    def start(self, timeout: float = 120.0) -> None:
        """Boot the nodes in parallel, then join the others to the first, one at a time."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(node.start, timeout) for node in self.nodes]:
                future.result()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app", timeout=60)
            node.ctl("join_cluster", first.node, timeout=60)
            node.ctl("start_app", timeout=120)
        self.await_running(timeout)

    def running(self, via: PrivateRabbit | None = None) -> set[str]:
        """Node names the cluster reports as running (asked of *via*, or of any node that answers)."""
        for node in [via] if via is not None else self.up():
            with contextlib.suppress(Exception):
                out = node.tool("rabbitmq-diagnostics", "cluster_status", "--formatter", "json", timeout=20)
                return set(json.loads(out).get("running_nodes", []))
        return set()

    def up(self) -> list[PrivateRabbit]:
        """Nodes whose process is alive (possibly frozen or paused)."""
        return [node for node in self.nodes if node.proc is not None and node.proc.poll() is None]

    def await_running(self, timeout: float = 120.0) -> None:
        """Until every node is up and every node sees all of them running."""
        names = {node.node for node in self.nodes}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.running(node) == names for node in self.nodes if node.proc is not None):
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster not fully running after {timeout}s: {self.running()}")

    def repair(self, timeout: float = 180.0) -> list[str]:
        """Restart the RabbitMQ application on every node that does not see the whole cluster (what an
        operator does after a partition that partition handling did not heal); return their names."""
        names = {node.node for node in self.nodes}
        restarted = []
        for node in self.up():
            if self.running(node) != names:
                node.ctl("stop_app", timeout=120)
                node.ctl("start_app", timeout=180)
                restarted.append(node.name)
        self.await_running(timeout)
        return restarted

    def queue_state(self, queue: str) -> tuple[str | None, list[str], list[str]]:
        """(leader, members, online members) of quorum queue *queue*, as the first answering node says."""
        for node in self.up():
            with contextlib.suppress(Exception):
                out = node.ctl("list_queues", "name", "leader", "members", "online", "--formatter", "json", timeout=15)
                for row in json.loads(out):
                    if row.get("name") == queue:
                        return row.get("leader"), list(row.get("members") or []), list(row.get("online") or [])
        return None, [], []

    def await_queue_online(self, queue: str, timeout: float = 120.0) -> None:
        """Until every member of *queue* is online again (a restarted replica caught up with the log)."""
        names = {node.node for node in self.nodes}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader, members, online = self.queue_state(queue)
            if leader and set(members) == names and set(online) == names:
                return
            time.sleep(0.5)
        raise TimeoutError(f"queue {queue} not fully online after {timeout}s: {self.queue_state(queue)}")

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
