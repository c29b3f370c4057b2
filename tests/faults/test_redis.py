"""The correlation store on a real Redis Cluster (six private nodes) and a real Sentinel set, with
faults injected under load: SIGKILL and SIGSTOP of the primary owning the gateway's keys, the whole
cluster down, a resharding. CI runs the short profile (the cluster kill, the sentinel kill, the
start-time checks); ``make faults-redis`` runs everything (RELAY_REDIS_FAULTS=full) and writes the
table to bench/results/faults-redis.json."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.store.topology import RedisOptions, StoreMisconfigured, Topology
from tests.faults import redis_nodes
from tests.faults.redis_load import GATEWAY_CONVERSATION, LAG, Outcome, run_load
from tests.helpers import APP

FULL = os.environ.get("RELAY_REDIS_FAULTS") == "full"
OUT = os.environ.get("RELAY_REDIS_FAULTS_OUT")
RATE = 200.0
# Enrichment hits must resume within cluster-node-timeout + 5 s, plus the recall lag of the load.
RECOVERY_BOUND = redis_nodes.NODE_TIMEOUT_MS / 1000 + 5 + 0.5
full_only = pytest.mark.skipif(not FULL, reason="full profile only (make faults-redis)")
pytestmark = [
    pytest.mark.fault,
    pytest.mark.timeout(180),
    # Now and then (about one run in six of the kill scenarios) redis-py leaves a connection it was
    # using when a node died open, without closing its StreamWriter, and the garbage collector finds
    # it (Python closes the socket then, and warns). Not yet traced to its line in redis-py; each run
    # collects before it ends (redis_load), so the warning stays in these tests, where it is ignored.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function StreamWriter.__del__:pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(scope="module")
def servers_installed() -> None:
    if not redis_nodes.available():
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail("redis-server is not installed and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip("redis-server is not installed")


@pytest.fixture
def cluster(servers_installed: None) -> Iterator[redis_nodes.Cluster]:
    """A fresh six-node cluster per test (a fault leaves it changed); killed even if the test fails."""
    nodes = redis_nodes.Cluster()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def sentinels(servers_installed: None) -> Iterator[redis_nodes.SentinelSet]:
    nodes = redis_nodes.SentinelSet()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def cluster_env(cluster: redis_nodes.Cluster) -> dict[str, str]:
    return {"RELAY_REDIS_MODE": "cluster", "RELAY_REDIS_URL": cluster.urls}


def sentinel_env(sentinels: redis_nodes.SentinelSet) -> dict[str, str]:
    return {
        "RELAY_REDIS_MODE": "sentinel",
        "RELAY_REDIS_URL": sentinels.urls,
        "RELAY_REDIS_SENTINEL_MASTER": sentinels.MASTER,
    }


def gateway_key() -> str:
    sender, receiver = GATEWAY_CONVERSATION
    return f"revoke-relay:recall:{{{APP}/c2c/{sender}/{receiver}}}/x"


def record(name: str, outcome: Outcome) -> None:
    """Append the scenario's row to RELAY_REDIS_FAULTS_OUT (the closing table) and print it."""
    row = {"scenario": name, **outcome.row()}
    print(json.dumps(row))
    if OUT:
        path = Path(OUT)
        rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if r["scenario"] != name] + [row]
        path.write_text(json.dumps(rows, indent=1) + "\n")
        path.with_suffix(".md").write_text(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The closing table: one row per scenario, as docs/deploy.md quotes it."""
    lines = [
        "# Correlation store faults (make faults-redis)",
        "",
        f"200 callbacks/s (half sends, half recalls {LAG} s after their send), 5 gateway requests/s in one"
        f" conversation; cluster-node-timeout {redis_nodes.NODE_TIMEOUT_MS} ms; sentinel down-after 1 s."
        ' Hit rates: recalls whose event says enrichment "hit", before the fault, from the fault until'
        " recovery (the first full second in which every recall hit), and after it.",
        "",
        "| scenario | callbacks | 200s | lost | 5xx | gateway 200 / 503 (outside the failover) |"
        " hit before | during | after | recovered after (s) | non-hits after the node returned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['callbacks']} | {r['200s']} | {r['lost']} | {r['5xx']} |"
            f" {r['gateway_200']} / {r['gateway_503']} ({r['gateway_503_outside_failover']}) |"
            f" {r['hit_before']} | {r['hit_during']} | {r['hit_after']} | {r['recovered_after_s']} |"
            f" {r['non_hits_after_heal']} |"
        )
    return "\n".join(lines) + "\n"


def assert_failover_ok(outcome: Outcome, *, bound: float = RECOVERY_BOUND, after_rate: float = 0.8) -> None:
    """No callback lost or refused; gateway 503s only while the store was failing; hits resume in time.

    After recovery, the failed node's return (a full resync: a fork on the new primary, the old one
    loading) starved this 2-core machine for moments: the relay's event loop lagged 0.1-0.4 s, some
    lookups overran the budget and the breaker skipped the store for a second. Measured and reported
    (hit_after, non_hits_after_heal), bounded by *after_rate*."""
    assert (0, 0, outcome.callbacks) == (outcome.lost, outcome.status_5xx, outcome.ok)
    assert 0 == outcome.gateway_other
    assert 0 == outcome.gateway_503_outside
    assert outcome.gateway_ok == outcome.tencent_calls  # Tencent never called without the records written
    assert outcome.hit_rate["before"] >= 0.99, outcome.results
    assert outcome.hit_rate["after"] >= after_rate, outcome.results
    assert outcome.recovered_after is not None
    assert outcome.recovered_after <= bound
    assert {200} == outcome.readyz  # callbacks do not need Redis: ready throughout


def assert_all_hits(outcome: Outcome) -> None:
    """Every recall found its send record: never a miss (that would be a record written to or read
    from the wrong node); at most 1 % over the budget while this 2-core machine is busy."""
    assert (0, 0) == (outcome.lost, outcome.status_5xx)
    assert 0 == outcome.results["before"].get("miss", 0), outcome.results
    assert outcome.hit_rate["before"] >= 0.99, outcome.results


# Without a fault the claim is correctness, not speed: the budget is 2 s (Tencent's own wait), so a
# busy CI machine's pauses do not read as a store failure (a 0.25 s budget once gave 24 % "error").
NO_FAULT_BUDGET = 2.0


async def test_cluster_enriches_and_joins_with_no_fault(cluster: redis_nodes.Cluster) -> None:
    """Through a cluster, every recall of a recorded send is a hit and every gateway request is answered 200."""
    outcome = await run_load(
        cluster_env(cluster), rate=RATE, before=4, fault=None, heal=None, outage=0, after=0, budget=NO_FAULT_BUDGET
    )
    assert_all_hits(outcome)
    assert outcome.gateway == outcome.gateway_ok == outcome.tencent_calls
    assert ("cluster", 3) == (outcome.store["mode"], outcome.store["primaries"])


async def test_sentinel_enriches_and_joins_with_no_fault(sentinels: redis_nodes.SentinelSet) -> None:
    """Through Sentinel, every recall of a recorded send is a hit and every gateway request is answered 200."""
    outcome = await run_load(
        sentinel_env(sentinels), rate=RATE, before=3, fault=None, heal=None, outage=0, after=0, budget=NO_FAULT_BUDGET
    )
    assert_all_hits(outcome)
    assert outcome.gateway == outcome.gateway_ok == outcome.tencent_calls
    assert ("sentinel", 1) == (outcome.store["mode"], outcome.store["primaries"])


async def test_cluster_primary_killed_then_back(cluster: redis_nodes.Cluster) -> None:
    """SIGKILL of the primary owning the gateway's keys at 200 callbacks/s: its replica takes over,
    the relay follows without a restart, and the old primary returns as a replica."""
    victim = cluster.owner(gateway_key())

    async def fault() -> None:
        victim.kill()

    async def heal() -> None:
        victim.start()

    outage = 8.0 if FULL else 6.0
    outcome = await run_load(
        cluster_env(cluster), rate=RATE, before=3, fault=fault, heal=heal, outage=outage, after=5 if FULL else 3
    )
    record("cluster: primary SIGKILL, then back", outcome)
    assert_failover_ok(outcome)
    assert outcome.gateway_503 > 0  # the failover was seen by the gateway, not skipped over
    assert outcome.store["failovers"] >= 1
    assert cluster.owner(gateway_key()) is not victim


# Once stalled for 180 s inside the whole suite (2026-12-06, not reproduced since: 20 runs alone, ten
# of them beside two busy loops, and two full profiles). A stall now fails after a minute with every
# task's stack printed (redis_load.stall_guard).
async def test_sentinel_primary_killed_then_back(sentinels: redis_nodes.SentinelSet) -> None:
    """SIGKILL of the Sentinel-managed primary under load: the sentinels promote the replica and
    the relay's one pool follows them (no restart, no connection left on the old primary)."""
    victim = sentinels.current_primary()

    async def fault() -> None:
        victim.kill()

    async def heal() -> None:
        victim.start()

    outcome = await run_load(sentinel_env(sentinels), rate=RATE, before=3, fault=fault, heal=heal, outage=8.0, after=4)
    record("sentinel: primary SIGKILL, then back", outcome)
    assert_failover_ok(outcome, bound=1.0 + 5 + 5 + 0.5)  # down-after 1 s + election + the 5 s allowance
    assert outcome.store["failovers"] >= 1
    assert sentinels.current_primary() is not victim


@full_only
async def test_cluster_primary_frozen(cluster: redis_nodes.Cluster) -> None:
    """SIGSTOP of the owning primary (a hung server: connections open, nothing answers) for 10 s,
    then SIGCONT: it is failed over, and rejoins as a replica."""
    victim = cluster.owner(gateway_key())

    async def fault() -> None:
        victim.freeze()

    async def heal() -> None:
        victim.resume()

    outcome = await run_load(cluster_env(cluster), rate=RATE, before=3, fault=fault, heal=heal, outage=10, after=6)
    record("cluster: primary SIGSTOP 10 s, then SIGCONT", outcome)
    assert_failover_ok(outcome)
    assert cluster.owner(gateway_key()) is not victim


@full_only
async def test_sentinel_primary_frozen(sentinels: redis_nodes.SentinelSet) -> None:
    """SIGSTOP of the Sentinel-managed primary for 10 s, then SIGCONT."""
    victim = sentinels.current_primary()

    async def fault() -> None:
        victim.freeze()

    async def heal() -> None:
        victim.resume()

    outcome = await run_load(sentinel_env(sentinels), rate=RATE, before=3, fault=fault, heal=heal, outage=10, after=6)
    record("sentinel: primary SIGSTOP 10 s, then SIGCONT", outcome)
    assert_failover_ok(outcome, bound=1.0 + 5 + 5 + 0.5)


@full_only
async def test_cluster_down_then_back(cluster: redis_nodes.Cluster) -> None:
    """Every node killed for 8 s, then all restarted (no persistence: the records are gone): callbacks
    keep being answered 200 with enrichment "error", the gateway 503s, and both recover by themselves."""

    async def fault() -> None:
        for server in cluster.servers:
            server.kill()

    async def heal() -> None:
        for server in cluster.servers:
            server.start()

    outcome = await run_load(cluster_env(cluster), rate=RATE, before=3, fault=fault, heal=heal, outage=8, after=10)
    record("cluster: all six nodes down 8 s, then back", outcome)
    # Back without data: recalls of messages sent before the restart miss; hits resume after it.
    assert_failover_ok(outcome, bound=8 + RECOVERY_BOUND)


@full_only
async def test_cluster_resharding_under_load(cluster: redis_nodes.Cluster) -> None:
    """2,000 slots moved from the primary owning the gateway's keys to another with
    ``redis-cli --cluster reshard`` while callbacks run: no callback or gateway request fails."""
    source = cluster.owner(gateway_key())
    target = next(s for s in cluster.alive() if cluster.role(s) == "master" and s is not source)

    def node_id(server: redis_nodes.Server) -> str:
        with server.client() as c:
            return bytes(c.execute_command("CLUSTER MYID")).decode()

    async def fault() -> None:
        args = [
            "redis-cli",
            "--cluster",
            "reshard",
            f"127.0.0.1:{source.port}",
            "--cluster-from",
            node_id(source),
            "--cluster-to",
            node_id(target),
            "--cluster-slots",
            "2000",
            "--cluster-yes",
            "--cluster-pipeline",
            "100",
        ]
        proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await proc.wait()
        assert 0 == proc.returncode

    outcome = await run_load(cluster_env(cluster), rate=RATE, before=3, fault=fault, heal=None, outage=6, after=4)
    record("cluster: 2,000 slots resharded under load", outcome)
    assert (0, 0) == (outcome.lost, outcome.status_5xx)
    assert outcome.gateway_ok == outcome.tencent_calls
    assert 0 == outcome.gateway_other


async def test_cluster_mode_against_a_plain_server_is_refused(sentinels: redis_nodes.SentinelSet) -> None:
    """RELAY_REDIS_MODE=cluster against a server without cluster support: refused at start, naming the setting."""
    url = f"redis://127.0.0.1:{sentinels.primary.port}"
    topology = Topology(RedisOptions((url,), mode="cluster"), Metrics(CollectorRegistry()))
    with pytest.raises(StoreMisconfigured) as refused:
        await topology.start()
    assert "RELAY_REDIS_MODE" in str(refused.value)


async def test_standalone_mode_against_a_cluster_node_is_refused(cluster: redis_nodes.Cluster) -> None:
    """RELAY_REDIS_MODE=standalone (the default) against a cluster node: refused at start."""
    url = f"redis://127.0.0.1:{cluster.servers[0].port}"
    topology = Topology(RedisOptions((url,)), Metrics(CollectorRegistry()))
    with pytest.raises(StoreMisconfigured, match="RELAY_REDIS_MODE"):
        await topology.start()


async def test_an_unknown_master_name_is_refused(sentinels: redis_nodes.SentinelSet) -> None:
    """Sentinels that answer but know no primary of that name: refused, naming RELAY_REDIS_SENTINEL_MASTER."""
    options = RedisOptions(tuple(sentinels.urls.split(",")), mode="sentinel", sentinel_master="no-such-primary")
    topology = Topology(options, Metrics(CollectorRegistry()))
    with pytest.raises(StoreMisconfigured, match="RELAY_REDIS_SENTINEL_MASTER"):
        await topology.start()


async def test_nothing_answering_yet_starts_and_keeps_trying(servers_installed: None) -> None:
    """No server on the seed ports: the store starts anyway (callbacks do not need it) and reports 0 primaries."""
    topology = Topology(
        RedisOptions(("redis://127.0.0.1:1",), mode="cluster"), Metrics(CollectorRegistry()), interval=0.2
    )
    await topology.start()
    try:
        await asyncio.sleep(0.5)
        assert (False, 0) == (topology.reachable, topology.primaries)
    finally:
        await topology.close()


def test_mode_settings_are_checked_naming_the_setting(tmp_path: Path) -> None:
    """Sentinel mode without a master name, or several URLs in standalone mode, are refused by name."""
    from tests.helpers import make_settings

    with pytest.raises(ConfigError, match="RELAY_REDIS_SENTINEL_MASTER"):
        make_settings(tmp_path, RELAY_REDIS_MODE="sentinel", RELAY_REDIS_URL="redis://127.0.0.1:1")
    with pytest.raises(ConfigError, match="RELAY_REDIS_URL: one URL"):
        make_settings(tmp_path, RELAY_REDIS_URL="redis://127.0.0.1:1,redis://127.0.0.1:2")
