"""Fault scenarios (issue 3) in the short CI profile, against a private RabbitMQ node.

The node is this module's own (separate name, ports, data dir): it is killed, frozen and put
under a disk alarm. Skipped locally when rabbitmq-server is not installed; a failure in CI.
Full-length run with the table: ``python -m tests.faults --profile full``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.faults import node as node_module
from tests.faults.node import PrivateRabbit
from tests.faults.scenarios import PROFILES, SCENARIOS, Context

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def private_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    if not node_module.available():
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail("rabbitmq-server is not installed and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip("rabbitmq-server is not installed")
    node = PrivateRabbit(tmp_path_factory.mktemp("private-rabbit"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
async def context(private_node: PrivateRabbit, tmp_path: Path) -> AsyncIterator[Context]:
    if private_node.proc is None or private_node.proc.poll() is not None:
        await asyncio.to_thread(private_node.start)  # a previous scenario left it down
    ctx = Context(private_node, tmp_path, PROFILES["ci"])
    yield ctx
    await ctx.cleanup()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_scenario_passes(context: Context, scenario: str) -> None:
    """Each fault scenario meets its pass line: no 200'd event lost, the documented bounds hold."""
    result = await SCENARIOS[scenario](context)
    print(result.row())
    assert result.passed, f"{scenario}: failed checks {[k for k, ok in result.checks.items() if not ok]}: {result}"
