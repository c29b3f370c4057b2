"""docs/metrics.md stays true: every metric of relay/metrics.py has a row naming its labels, and
every label value it can take is written down (the same rules scripts/check-ops.sh applies to a
live scrape, here without tools or a running relay)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from relay.metrics import Metrics
from relay.tencent.callback import KNOWN_COMMANDS

DOC = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text(encoding="utf-8")


def scrape() -> str:
    metrics = Metrics(CollectorRegistry())
    metrics.prime_callbacks(KNOWN_COMMANDS)
    return generate_latest(metrics.registry).decode()


def test_every_metric_has_a_row_and_every_row_a_metric() -> None:
    """The `# TYPE` families of a fresh Metrics and the backticked first column of the tables match."""
    families = {n for n in re.findall(r"^# TYPE (relay_\w+) \w+", scrape(), re.M) if not n.endswith("_created")}
    documented = set(re.findall(r"^\| `(relay_\w+)`", DOC, re.M))
    assert set() == families - documented
    assert set() == documented - families


def test_every_label_and_value_is_documented() -> None:
    """Each exposed label is in its row's labels column, and each label value appears backticked."""
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(relay_\w+)` \|[^|]*\|([^|]*)\|", DOC, re.M)}
    quoted = set(re.findall(r"`([^`]+)`", DOC))
    problems = []
    for line in scrape().splitlines():
        m = re.match(r"relay_\w+\{(.*)\} ", line)
        if not m or line.startswith("#"):
            continue
        family = max((n for n in rows if line.startswith(n)), key=len, default=None)
        if family is None:
            continue
        for label, value in re.findall(r'(\w+)="([^"]*)"', m.group(1)):
            if label != "le" and f"`{label}`" not in rows[family]:
                problems.append(f"{family}: label {label}")
            if label != "le" and value not in quoted:
                problems.append(f"{family}: {label}={value}")
    assert [] == sorted(set(problems))
