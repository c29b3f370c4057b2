from __future__ import annotations

import os

import pytest
import structlog


@pytest.fixture(autouse=True)
def _plain_structlog() -> None:
    """Each test starts from structlog's defaults so ``capture_logs`` sees every event."""
    structlog.reset_defaults()


def pytest_report_header() -> str:
    return f"broker required: {os.environ.get('RELAY_REQUIRE_BROKER', '0')}"
