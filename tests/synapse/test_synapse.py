"""Against a real Synapse: redactions made by real clients reach RabbitMQ as message.revoked events,
exactly once, through the relay's application-service endpoint."""

from __future__ import annotations

import pytest

from relay.events import name_id, rfc3339_ms
from relay.matrix.normalize import name
from tests.helpers import validate_event
from tests.synapse.conftest import Stack
from tests.synapse.homeserver import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.synapse, pytest.mark.timeout(180)]


@pytest.mark.parametrize("version", ["10", "11", "12"])
async def test_redactions_by_the_sender_and_by_a_moderator(stack: Stack, version: str) -> None:
    """In a room of each version (10, 11 and 12), a message redacted by its sender and one redacted by a moderator
    with a reason become one event each, with operator role, reason, sender, sentAt and evidence;
    a message nobody redacted becomes none."""
    await stack.start_relay(RELAY_EVIDENCE="on")
    m = stack.matrix
    alice, bob, mod = await m.register("alice"), await m.register("bob"), await m.register("mod")
    room = await m.create_room(alice, version, members=(bob, mod), moderators=(mod,))
    own = await m.send(bob, room, "a typo")
    bad = await m.send(bob, room, "buy cheap watches")
    await m.send(bob, room, "kept")
    await m.redact(bob, room, own)
    await m.redact(mod, room, bad, reason="spam")

    events = {e["msgID"]: e for e in await stack.settle(alice, room)}
    assert {own, bad} == set(events)
    for msg_id, redacter, role, reason, text in (
        (own, bob, "sender", None, "a typo"),
        (bad, mod, "group_admin", "spam", "buy cheap watches"),
    ):
        event = events[msg_id]
        validate_event(event)
        sent = await m.event(alice, room, msg_id)
        assert {
            "eventID": name_id(name(room, msg_id)),
            "provider": "matrix",
            "clientMsgID": msg_id,
            "operator": {"userID": redacter.user_id, "role": role, "assertedBy": None, "verifiedBy": None},
            "reason": reason,
            "sender": bob.user_id,
            "groupID": room,
            "sdkAppID": None,
            "callbackCommand": "m.room.redaction",
            "enrichment": "hit",
            "sentAt": rfc3339_ms(sent["origin_server_ts"]),
            "evidence": {"msgBody": {"msgtype": "m.text", "body": text}, "cloudCustomData": None},
        } == {
            **{k: event[k] for k in ("eventID", "provider", "clientMsgID", "operator", "reason", "sender")},
            "groupID": event["conversation"]["groupID"],
            **{k: event[k] for k in ("sdkAppID", "callbackCommand", "enrichment", "sentAt", "evidence")},
        }
    by_id = {m.message_id: m for m in stack.messages}
    for event in events.values():
        message = by_id[event["eventID"]]
        assert ("message.revoked.group", f"matrix/{room}") == (
            message.routing_key,
            message.headers["cloudEvents_source"],
        )


async def test_relay_down_during_a_redaction_gets_the_retry_exactly_once(stack: Stack, redis_url: str) -> None:
    """With the relay down (nothing listening) when a message is redacted, the homeserver's own
    retry after the relay is back is published once, enriched from the record Redis kept across
    the restart."""
    relay = await stack.start_relay(RELAY_REDIS_URL=redis_url)
    m = stack.matrix
    alice, bob = await m.register("alice"), await m.register("bob")
    room = await m.create_room(alice, "11", members=(bob,))
    message = await m.send(bob, room, "meant for another room")
    await wait_for(lambda: relay.metric("relay_correlation_writes_total") >= 1, 20, "the message's record in Redis")

    await stack.stop_relay()
    await stack.link.stop()
    mark = len(stack.homeserver.log_text())
    await m.redact(bob, room, message, reason="wrong room")
    await wait_for(
        lambda: "Scheduling retries on revoke-relay" in stack.homeserver.log_text()[mark:],
        20,
        "the homeserver to fail its push and schedule a retry",
    )
    await stack.link.start()
    relay = await stack.start_relay(ping=False, RELAY_REDIS_URL=redis_url)  # no ping: the homeserver retries alone

    (event,) = await stack.events(room, 1, timeout=30)
    assert "Retrying transaction" in stack.homeserver.log_text()[mark:]
    assert ("sender", bob.user_id, "wrong room", "hit") == (
        event["operator"]["role"],
        event["sender"],
        event["reason"],
        event["enrichment"],
    )
    assert [event] == await stack.settle(alice, room)
    assert 1 == sum(1 for m in stack.messages if m.message_id == event["eventID"])


async def test_a_transaction_whose_answer_was_lost_publishes_nothing_twice(stack: Stack) -> None:
    """When the relay's 200 to a redaction's transaction is lost on the way back, the homeserver
    sends the same txnId again: the relay answers 200 from its transaction log and publishes nothing."""
    relay = await stack.start_relay()
    m = stack.matrix
    alice, bob = await m.register("alice"), await m.register("bob")
    room = await m.create_room(alice, "11", members=(bob,))
    message = await m.send(bob, room, "hello")
    stack.link.lose_answers = 1
    await m.redact(bob, room, message)

    (event,) = await stack.events(room, 1)
    await wait_for(
        lambda: relay.metric("relay_matrix_transactions_total", outcome="duplicate") >= 1, 30, "the homeserver's retry"
    )
    (lost,) = stack.link.lost
    assert (lost, 200) in stack.link.seen
    assert [event] == await stack.settle(alice, room)
    assert 1 == sum(1 for m in stack.messages if m.message_id == event["eventID"])


async def test_a_homeserver_with_the_wrong_hs_token_is_refused(stack: Stack) -> None:
    """The homeserver's second application service, registered with a token the relay does not
    know, is answered 403 (Synapse logs the code) and publishes nothing; the right one still does."""
    relay = await stack.start_relay()
    m = stack.matrix
    user = await m.register("wrongtoken")  # in the misconfigured service's namespace
    room = await m.create_room(user, "11")
    message = await m.send(user, room, "hello")
    await m.redact(user, room, message)

    await wait_for(
        lambda: relay.metric("relay_matrix_rejections_total", reason="invalid_token") >= 1, 20, "a refused push"
    )
    await wait_for(
        lambda: f"push_bulk to {stack.homeserver.relay_url} received code=403" in stack.homeserver.log_text(),
        20,
        "Synapse to log the 403",
    )
    events = await stack.settle(user, room)
    assert [message] == [e["msgID"] for e in events]
