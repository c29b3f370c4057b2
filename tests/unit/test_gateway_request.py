"""The recall request parser: what POST /v1/recalls and the command queue accept, and every refusal."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from relay.gateway.request import MAX_MESSAGES, Conversation, InvalidRequest, Target, parse_request

GROUP = {
    "requestID": "ticket-4711",
    "sdkAppID": "1400000001",
    "conversation": {"type": "group", "groupID": "@TGS#1", "topicID": "@TGS#1@TOPIC#x"},
    "messages": [{"msgSeq": 101}, {"msgSeq": 102}],
    "reason": "spam link",
    "moderator": {"userID": "mod_7"},
}


def parse(body: dict[str, Any] | bytes) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_request(raw, new_id=lambda: "generated-1")


def errors(body: dict[str, Any] | bytes) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    return [(e.field, e.code) for e in caught.value.errors]


def with_(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(GROUP))
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def test_the_issue_example_is_a_group_command() -> None:
    """The request of the issue parses into a group command with both sequence numbers."""
    command = parse(GROUP)
    assert "ticket-4711" == command.request_id
    assert Conversation("group", group_id="@TGS#1", topic_id="@TGS#1@TOPIC#x") == command.conversation
    assert (Target(("msgSeq", 101), msg_seq=101), Target(("msgSeq", 102), msg_seq=102)) == command.messages
    assert ("spam link", "mod_7") == (command.reason, command.moderator)


@pytest.mark.parametrize(
    ("conversation", "messages", "expected"),
    [
        pytest.param(
            {"type": "c2c", "sender": "u_a", "receiver": "u_b"},
            [{"msgKey": "k1"}, {"msgID": "m1"}],
            Conversation("c2c", sender="u_a", receiver="u_b"),
            id="c2c",
        ),
        pytest.param(
            {"type": "official_account", "officialAccount": "@TOA#news"},
            [{"msgKey": "k1"}],
            Conversation("official_account", official_account="@TOA#news"),
            id="official-account",
        ),
        pytest.param(
            {"type": "group", "groupID": "g"}, [{"msgID": "m"}], Conversation("group", group_id="g"), id="group"
        ),
    ],
)
def test_every_conversation_type(conversation: dict[str, Any], messages: list[Any], expected: Conversation) -> None:
    """Each conversation type parses with the message keys it takes."""
    command = parse(with_(conversation=conversation, messages=messages))
    assert expected == command.conversation
    assert len(messages) == len(command.messages)


def test_a_missing_request_id_is_generated() -> None:
    """Without requestID the parser takes a fresh one from new_id."""
    assert "generated-1" == parse(with_(requestID=None)).request_id


def test_a_numeric_app_id_is_accepted_as_text() -> None:
    """sdkAppID may be a JSON number; it becomes its digits."""
    assert "1400000001" == parse(with_(sdkAppID=1400000001)).sdk_app_id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(with_(reason=None), [("reason", "required")], id="no-reason"),
        pytest.param(with_(reason=""), [("reason", "invalid")], id="empty-reason"),
        pytest.param(with_(reason="   "), [("reason", "invalid")], id="blank-reason"),
        pytest.param(with_(reason="x" * 1001), [("reason", "too_long")], id="long-reason"),
        pytest.param(with_(moderator=None), [("moderator", "required")], id="no-moderator"),
        pytest.param(
            with_(moderator={"userId": "m"}),
            [("moderator.userID", "required"), ("moderator.userId", "unknown_field")],
            id="moderator-typo",
        ),
        pytest.param(with_(requestID="r" * 129), [("requestID", "too_long")], id="long-request-id"),
        pytest.param(with_(requestID=""), [("requestID", "invalid")], id="empty-request-id"),
        pytest.param(with_(requestID="a\nb"), [("requestID", "invalid")], id="control-in-request-id"),
        pytest.param(with_(sdkAppID="14x"), [("sdkAppID", "invalid")], id="app-not-digits"),
        pytest.param(with_(sdkAppID=None), [("sdkAppID", "required")], id="no-app"),
        pytest.param(with_(moderater={"userID": "m"}), [("moderater", "unknown_field")], id="unknown-top-field"),
        pytest.param(with_(conversation={"type": "room"}), [("conversation.type", "invalid")], id="bad-type"),
        pytest.param(with_(conversation={"type": {}}), [("conversation.type", "invalid")], id="object-type"),
        pytest.param(with_(conversation={"type": ["group"]}), [("conversation.type", "invalid")], id="array-type"),
        pytest.param(
            with_(conversation={"type": "c2c", "sender": "a"}),
            [("conversation.receiver", "required")],
            id="c2c-no-receiver",
        ),
        pytest.param(
            with_(conversation={"type": "group", "groupID": "g", "receiver": "b"}),
            [("conversation.receiver", "unknown_field")],
            id="group-with-receiver",
        ),
        pytest.param(with_(messages=[]), [("messages", "invalid")], id="no-messages"),
        pytest.param(
            with_(messages=[{"msgSeq": i} for i in range(MAX_MESSAGES + 1)]),
            [("messages", "too_many")],
            id="101-messages",
        ),
        pytest.param(with_(messages=[{"msgKey": "k"}]), [("messages[0].msgKey", "invalid")], id="group-by-msgkey"),
        pytest.param(with_(messages=[{"msgSeq": -1}]), [("messages[0].msgSeq", "invalid")], id="negative-seq"),
        pytest.param(with_(messages=[{"msgSeq": True}]), [("messages[0].msgSeq", "invalid")], id="bool-seq"),
        pytest.param(with_(messages=[{"msgSeq": "101"}]), [("messages[0].msgSeq", "invalid")], id="string-seq"),
        pytest.param(with_(messages=[{"msgSeq": 1, "msgID": "m"}]), [("messages[0]", "invalid")], id="two-keys"),
        pytest.param(with_(messages=[{"msgSeq": 1}, {"msgSeq": 1}]), [("messages[1]", "duplicate")], id="duplicate"),
        pytest.param(with_(messages=[{"seq": 1}]), [("messages[0].seq", "unknown_field")], id="unknown-message-key"),
        pytest.param(with_(messages=["101"]), [("messages[0]", "invalid")], id="message-not-object"),
    ],
)
def test_field_errors(body: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    """Each bad field is named with a stable code; nothing else is reported."""
    assert sorted(expected) == sorted(errors(body))


def test_every_problem_is_reported_at_once() -> None:
    """Several bad fields yield one error each, so a caller fixes them in one round."""
    found = errors(with_(reason=None, moderator=None, messages=[{"msgSeq": -1}, {"msgKey": "k"}]))
    assert {"reason", "moderator", "messages[0].msgSeq", "messages[1].msgKey"} == {field for field, _ in found}


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_a_body_that_is_not_an_object_is_invalid_json(body: bytes) -> None:
    """Anything but a JSON object is refused with the invalid_json code."""
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert "invalid_json" == caught.value.code


def test_the_fingerprint_follows_the_content_not_the_request_id() -> None:
    """Two requests with the same content share a fingerprint; another reason changes it."""
    assert parse(GROUP).fingerprint == parse(with_(requestID="other")).fingerprint
    assert parse(GROUP).fingerprint != parse(with_(reason="another reason")).fingerprint


def test_the_reason_may_be_in_any_script() -> None:
    """A reason is free text: CJK, accents and emoji sequences (with their zero-width joiners) are kept."""
    reason = "垃圾广告 — café 👩\u200d💻"
    assert reason == parse(with_(reason=reason)).reason


@pytest.mark.parametrize(
    ("field", "value", "char"),
    [
        pytest.param("reason", "\u202espam\x00\x1b[2J\r\nFAKE: ok", "U+202E", id="reason-bidi-nul-escape-crlf"),
        pytest.param("reason", "line one\nFAKE: approved", "U+000A", id="reason-lf"),
        pytest.param("reason", "tab\there", "U+0009", id="reason-tab"),
        pytest.param("reason", "c1 \x85 next line", "U+0085", id="reason-c1"),
        pytest.param("reason", "para\u2029graph", "U+2029", id="reason-paragraph-separator"),
        pytest.param("moderator", "admin\u202e\u200b", "U+202E", id="moderator-bidi"),
        pytest.param("moderator", "admin\u200b", "U+200B", id="moderator-zero-width-space"),
        pytest.param("moderator", "\ufeffadmin", "U+FEFF", id="moderator-bom"),
        pytest.param("requestID", "ticket\u2066-1", "U+2066", id="request-id-isolate"),
    ],
)
def test_control_bidi_and_invisible_characters_are_refused_naming_the_field(field: str, value: str, char: str) -> None:
    """C0 (CR, LF, TAB included), C1, bidi controls and separators anywhere, and invisible format
    characters in IDs, are a 400 naming the field and the character, never carried."""
    body = with_(moderator={"userID": value}) if field == "moderator" else with_(**{field: value})
    path = "moderator.userID" if field == "moderator" else field
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    (problem,) = caught.value.errors
    assert (path, "invalid") == (problem.field, problem.code)
    assert char in problem.message


def test_reason_and_moderator_are_nfc() -> None:
    """A decomposed accent (e + U+0301) is stored as the one character a person reads (é)."""
    command = parse(with_(reason="cafe\u0301", moderator={"userID": "jose\u0301"}))
    assert ("café", "josé") == (command.reason, command.moderator)


def test_the_moderator_may_be_a_token_a_user_id_or_both() -> None:
    """A token alone names the moderator; userID alone is asserted; the token is never echoed back."""
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtb2RfNyJ9.c2ln"
    assert (None, token) == (lambda c: (c.moderator, c.moderator_token))(parse(with_(moderator={"token": token})))
    both = parse(with_(moderator={"userID": "mod_7", "token": token}))
    assert ("mod_7", token) == (both.moderator, both.moderator_token)
    assert [("moderator.userID", "required")] == errors(with_(moderator={}))
    with pytest.raises(InvalidRequest) as caught:
        parse(with_(moderator={"token": "not a jwt\nsecret"}))
    assert "secret" not in str(caught.value)


def test_the_fingerprint_does_not_cover_the_moderator_token() -> None:
    """A retry with a refreshed ID token is the same request (the service adds the settled moderator)."""
    first = parse(with_(moderator={"token": "a.b.c"}))
    assert first.fingerprint == parse(with_(moderator={"token": "d.e.f"})).fingerprint
