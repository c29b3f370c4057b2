"""docs/events.md stays true: its examples satisfy the schema and their eventIDs are reproducible."""

from __future__ import annotations

import json
import re
from pathlib import Path

from relay.events import event_id
from relay.tencent.normalize import group_server_key
from tests.helpers import validate_event

DOC = Path(__file__).parents[2] / "docs" / "events.md"


def examples() -> list[dict[str, object]]:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [json.loads(block) for block in blocks]


def test_doc_examples_validate_against_the_schema() -> None:
    """Every JSON example in docs/events.md is a valid version-1 event."""
    found = examples()
    assert 2 == len(found)
    for example in found:
        validate_event(example)


def test_doc_example_event_ids_follow_the_documented_recipe() -> None:
    """The documented eventID recipe reproduces the eventIDs shown in the examples."""
    c2c, group = examples()
    assert event_id("1400000001", "c2c", "90211_3019944112_1767225540") == c2c["eventID"]
    key = group_server_key("@TGS#_@TGS#cSYNTHX01", "@TGS#_@TGS#cSYNTHX01@TOPIC#_general", 8801)
    assert event_id("1400000001", "group", key) == group["eventID"]
