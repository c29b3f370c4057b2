"""docs/matrix.md stays true: its example event satisfies the schema and its eventID is reproducible;
its refusal table lists every code with the status and errcode the relay answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from relay.events import name_id
from relay.matrix.errors import ANSWERS
from relay.matrix.normalize import name, normalize
from tests.api_docs import event_message, load_asyncapi, validator
from tests.helpers import validate_event

DOC = Path(__file__).parents[2] / "docs" / "matrix.md"


def test_the_example_is_a_valid_event_with_the_documented_event_id() -> None:
    """The JSON example validates against the schema, and uuid5 of its documented name is its eventID."""
    (block,) = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    example = json.loads(block)
    validate_event(example)
    expected = name_id(name(example["conversation"]["groupID"], example["msgID"]))
    assert expected == example["eventID"]


def test_the_refusal_table_is_what_the_relay_answers() -> None:
    """Every refusal code appears in the table exactly once, on the row of its status and errcode."""
    rows = re.findall(r"^\| (\d{3}) \| `(M_\w+)` \| (.*?) \| .*\|$", DOC.read_text(encoding="utf-8"), flags=re.M)
    documented = sorted(
        (code, int(status), errcode) for status, errcode, codes in rows for code in re.findall(r"`(\w+)`", codes)
    )
    assert sorted((code.value, *answer) for code, answer in ANSWERS.items()) == documented


def test_matrix_envelope_headers_satisfy_the_asyncapi_headers_schema() -> None:
    """A Matrix event's CloudEvents headers (source matrix/<room>) are valid under docs/asyncapi.yaml."""
    redaction = {"type": "m.room.redaction", "event_id": "$r", "room_id": "!a/b:example.org", "redacts": "$e"}
    (event,) = normalize([{**redaction, "sender": "@mod:example.org"}], 0).redactions
    headers = event.envelope().headers()
    assert "matrix/!a%2Fb:example.org" == headers["cloudEvents_source"]
    validator(event_message(load_asyncapi())["headers"]).validate(headers)
