"""Private-node tiers: skipped locally without rabbitmq-server, a failure in CI (RELAY_REQUIRE_BROKER=1)."""

from __future__ import annotations

import os

import pytest

from tests.faults import node as node_module


@pytest.fixture(scope="session")
def rabbitmq_installed() -> None:
    if not node_module.available():
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail("rabbitmq-server is not installed and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip("rabbitmq-server is not installed")
