"""The gateway's keys are laid out for a Redis Cluster: what one request changes together shares a
hash slot, and no caller-supplied text can choose another slot."""

from __future__ import annotations

from redis.crc import key_slot

from relay.joins import recall_key
from relay.store import GATEWAY_PREFIX


def slot(key: str) -> int:
    return int(key_slot((GATEWAY_PREFIX + key).encode()))


def test_join_records_of_one_conversation_share_a_slot() -> None:
    """The join records of one request (one conversation, many messages) land in one slot."""
    group = {slot(recall_key("1400000001", "group", ("@TGS#1", "", str(seq)))) for seq in range(200)}
    c2c = {slot(recall_key("1400000001", "c2c", ("u_a", "u_b", f"key{n}"))) for n in range(200)}
    assert (1, 1) == (len(group), len(c2c))


def test_conversations_spread_over_slots() -> None:
    """Different conversations hash apart: the tag is the conversation, not a constant."""
    slots = {slot(recall_key("1400000001", "group", (f"@TGS#{n}", "", "1"))) for n in range(200)}
    assert len(slots) > 150


def test_braces_in_ids_cannot_pick_the_slot() -> None:
    """A brace in a user or group ID is percent-encoded: the only hash tag is the relay's own."""
    key = recall_key("1400000001", "c2c", ("u_{evil}", "u_b", "k{x}"))
    assert 1 == key.count("{")
    assert slot(key) == slot(recall_key("1400000001", "c2c", ("u_{evil}", "u_b", "other")))
