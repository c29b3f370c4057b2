"""The cluster tier in its short CI profile: three private nodes joined into one cluster, a quorum queue on
all three, and scenario 1 (SIGKILL the node the relay publishes through, restart it later) at 100
callbacks/s. The full set of scenarios at 200/s: ``make faults-cluster``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.faults.cluster import Cluster
from tests.faults.cluster_scenarios import CLUSTER_PROFILES, ClusterContext, kill_connected_node

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(rabbitmq_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes (starting and joining them takes 20-60 s here): one cluster for the module."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def context(cluster: Cluster, tmp_path: Path) -> AsyncIterator[ClusterContext]:
    ctx = ClusterContext(cluster, tmp_path, CLUSTER_PROFILES["ci"])
    yield ctx
    await ctx.cleanup()


async def test_relay_fails_over_when_its_node_is_killed(context: ClusterContext) -> None:
    """SIGKILL the relay's node under load: nothing lost or refused, duplicates within the in-doubt count,
    the first confirm through another node within 10 s, the spool empty again before the node is back."""
    result = await kill_connected_node(context)
    print(result.row())
    assert result.passed, f"failed checks {[k for k, ok in result.checks.items() if not ok]}: {result}"
