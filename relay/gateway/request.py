"""A recall request, validated: the body of ``POST /v1/recalls`` and of a command-queue message.

Pure: bytes in, a :class:`RecallCommand` or :class:`InvalidRequest` naming every bad field out.
Strict on purpose: an unknown field is an error (a typo such as ``moderater`` must not silently
drop the moderator), every message must be addressable for the conversation's type, and no text
may carry control, bidirectional or (in IDs) invisible characters (relay.gateway.text).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

import orjson

from relay.errors import RelayError
from relay.gateway.text import nfc, refusal

MAX_MESSAGES = 100
MAX_REASON_CHARS = 1000
MAX_REQUEST_ID_CHARS = 128
MAX_ID_CHARS = 256  # Tencent's UserID is at most 32 bytes, GroupId 48: this only bounds the input
MAX_TOKEN_CHARS = 16384  # a moderator's ID token (a JWT): an RSA-4096 signature and a few claims fit
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=")
ConversationKind = Literal["c2c", "group", "official_account"]
_FIELDS = {"conversation", "messages", "reason", "moderator", "requestID", "sdkAppID"}
_CONVERSATION_FIELDS: dict[str, dict[str, bool]] = {  # field -> required
    "c2c": {"sender": True, "receiver": True},
    "group": {"groupID": True, "topicID": False},
    "official_account": {"officialAccount": True},
}
_MESSAGE_KEYS: dict[str, frozenset[str]] = {  # which message keys each conversation type takes
    "c2c": frozenset({"msgKey", "msgID"}),
    "group": frozenset({"msgSeq", "msgID"}),
    "official_account": frozenset({"msgKey", "msgID"}),
}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field; ``field`` is a JSON path such as ``messages[2].msgSeq``."""

    field: str
    code: str  # required | invalid | unknown_field | too_long | too_many | duplicate | not_found | mismatch
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "message": self.message}


class InvalidRequest(RelayError):
    """The request cannot be carried out as given; ``code`` is ``invalid_json`` or ``invalid_request``."""

    def __init__(self, code: str, errors: list[FieldError]) -> None:
        super().__init__(f"{code}: " + "; ".join(f"{e.field}: {e.message}" for e in errors))
        self.code = code
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Conversation:
    type: ConversationKind
    sender: str | None = None
    receiver: str | None = None
    group_id: str | None = None
    topic_id: str | None = None
    official_account: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "type": self.type,
            "sender": self.sender,
            "receiver": self.receiver,
            "groupID": self.group_id,
            "topicID": self.topic_id,
            "officialAccount": self.official_account,
        }

    def matches(self, locator: Mapping[str, object]) -> bool:
        """Whether a send record's conversation (request vocabulary) is this conversation."""
        theirs = {k: v for k, v in locator.items() if v is not None}
        ours = {k: v for k, v in self.to_dict().items() if v is not None}
        return theirs == ours


@dataclass(frozen=True, slots=True)
class Target:
    """One message of a request: the key as the caller gave it, and the server key it resolves to."""

    given: tuple[str, str | int]  # ("msgKey", k) | ("msgSeq", n) | ("msgID", id): echoed in the answer
    msg_key: str | None = None
    msg_seq: int | None = None
    client_msg_id: str | None = None

    @property
    def resolved(self) -> bool:
        return self.msg_key is not None or self.msg_seq is not None


@dataclass(frozen=True, slots=True)
class Moderator:
    """The moderator a request names, settled: asserted by the caller's key, or verified by an issuer."""

    user_id: str
    asserted_by: str | None = None
    verified_by: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"userID": self.user_id, "assertedBy": self.asserted_by, "verifiedBy": self.verified_by}


@dataclass(frozen=True, slots=True)
class RecallCommand:
    """A validated recall request. ``fingerprint`` identifies its content but the moderator (whose
    identity is settled by the service: asserted or verified), so a reused requestID with another
    body is told apart from a retry.

    ``moderator``: the userID as sent (NFC), if any; ``moderator_token``: an ID token naming the
    moderator, to be verified (relay.gateway.moderators). At least one of them is set."""

    request_id: str
    sdk_app_id: str
    conversation: Conversation
    messages: tuple[Target, ...]
    reason: str
    moderator: str | None
    fingerprint: str = field(default="", compare=False)
    moderator_token: str | None = field(default=None, repr=False)


def parse_request(body: bytes, *, new_id: Callable[[], str]) -> RecallCommand:
    """Validate *body*; raise :class:`InvalidRequest` listing every problem found."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("invalid_json", [FieldError("", "invalid", f"body is not JSON: {exc}"[:200])]) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("invalid_json", [FieldError("", "invalid", "body is not a JSON object")])
    return _Reader(cast(dict[str, object], data)).command(new_id)


class _Reader:
    def __init__(self, data: dict[str, object]) -> None:
        self.data = data
        self.errors: list[FieldError] = []

    def fail(self, path: str, code: str, message: str) -> None:
        self.errors.append(FieldError(path, code, message))

    def text(
        self, source: Mapping[str, object], name: str, path: str, limit: int, *, required: bool = True
    ) -> str | None:
        value = source.get(name)
        if value is None:
            if required:
                self.fail(path, "required", f"{name} is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(path, "invalid", f"{name} must be a non-empty string")
            return None
        if len(value) > limit:
            self.fail(path, "too_long", f"{name} is longer than {limit} characters")
            return None
        problem = refusal(value, identifier=name != "reason")
        if problem is not None:
            self.fail(path, "invalid", f"{name} {problem}")
            return None
        return value

    def unknown(self, source: Mapping[str, object], allowed: set[str] | frozenset[str], prefix: str) -> None:
        for name in sorted(set(source) - set(allowed)):
            self.fail(f"{prefix}{name}", "unknown_field", f"unknown field {name!r}")

    def command(self, new_id: Callable[[], str]) -> RecallCommand:
        data = self.data
        self.unknown(data, _FIELDS, "")
        request_id = self.text(data, "requestID", "requestID", MAX_REQUEST_ID_CHARS, required=False)
        app_raw = data.get("sdkAppID")
        app: str | None = None
        if isinstance(app_raw, int) and not isinstance(app_raw, bool) and app_raw > 0:
            app = str(app_raw)
        elif isinstance(app_raw, str) and app_raw.isascii() and app_raw.isdigit() and len(app_raw) <= 20:
            app = app_raw
        else:
            self.fail("sdkAppID", "required" if app_raw is None else "invalid", "sdkAppID must be the app's SDKAppID")
        conversation = self.conversation(data.get("conversation"))
        messages = self.messages(data.get("messages"), conversation)
        reason = self.text(data, "reason", "reason", MAX_REASON_CHARS)
        moderator = self.moderator(data.get("moderator"))
        if self.errors or app is None or conversation is None or reason is None or moderator is None:
            raise InvalidRequest("invalid_request", self.errors)
        reason = nfc(reason)
        fingerprint = hashlib.sha256(
            orjson.dumps([app, conversation.to_dict(), [list(t.given) for t in messages], reason])
        ).hexdigest()
        user_id, token = moderator
        return RecallCommand(
            request_id or new_id(), app, conversation, tuple(messages), reason, user_id, fingerprint, token
        )

    def conversation(self, raw: object) -> Conversation | None:
        if raw is None:
            self.fail("conversation", "required", "conversation is required")
            return None
        if not isinstance(raw, dict):
            self.fail("conversation", "invalid", "conversation must be an object")
            return None
        kind = raw.get("type")
        if not isinstance(kind, str) or kind not in _CONVERSATION_FIELDS:
            self.fail("conversation.type", "invalid", "type must be c2c, group or official_account")
            return None
        fields = _CONVERSATION_FIELDS[kind]
        self.unknown(raw, {"type", *fields}, "conversation.")
        values = {
            name: self.text(raw, name, f"conversation.{name}", MAX_ID_CHARS, required=required)
            for name, required in fields.items()
        }
        if any(values.get(name) is None for name, required in fields.items() if required):
            return None
        return Conversation(
            type=cast(ConversationKind, kind),
            sender=values.get("sender"),
            receiver=values.get("receiver"),
            group_id=values.get("groupID"),
            topic_id=values.get("topicID"),
            official_account=values.get("officialAccount"),
        )

    def messages(self, raw: object, conversation: Conversation | None) -> list[Target]:
        if raw is None:
            self.fail("messages", "required", "messages is required")
            return []
        if not isinstance(raw, list) or not raw:
            self.fail("messages", "invalid", "messages must be a non-empty array")
            return []
        if len(raw) > MAX_MESSAGES:
            self.fail("messages", "too_many", f"at most {MAX_MESSAGES} messages per request")
            return []
        allowed = _MESSAGE_KEYS[conversation.type] if conversation else frozenset({"msgKey", "msgSeq", "msgID"})
        targets: list[Target] = []
        seen: set[tuple[str, str | int]] = set()
        for index, item in enumerate(raw):
            path = f"messages[{index}]"
            if not isinstance(item, dict) or len(item) != 1:
                self.fail(path, "invalid", "each message is an object with exactly one of msgKey, msgSeq, msgID")
                continue
            ((name, value),) = item.items()
            if name not in allowed:
                code = "unknown_field" if name not in ("msgKey", "msgSeq", "msgID") else "invalid"
                kind = conversation.type if conversation else "this"
                self.fail(f"{path}.{name}", code, f"a {kind} conversation takes {' or '.join(sorted(allowed))}")
                continue
            target = self.target(name, value, f"{path}.{name}")
            if target is None:
                continue
            if target.given in seen:
                self.fail(path, "duplicate", "the same message is listed twice")
                continue
            seen.add(target.given)
            targets.append(target)
        return targets

    def target(self, name: str, value: object, path: str) -> Target | None:
        if name == "msgSeq":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                self.fail(path, "invalid", "msgSeq must be a non-negative integer")
                return None
            return Target(("msgSeq", value), msg_seq=value)
        text = self.text({name: value}, name, path, MAX_ID_CHARS)
        if text is None:
            return None
        if name == "msgKey":
            return Target(("msgKey", text), msg_key=text)
        return Target(("msgID", text), client_msg_id=text)

    def moderator(self, raw: object) -> tuple[str | None, str | None] | None:
        """``{"userID"}`` (asserted by the caller's key), ``{"token"}`` (an ID token to verify), or both
        (then they must name the same person: the service checks)."""
        if raw is None:
            self.fail("moderator", "required", "moderator is required")
            return None
        if not isinstance(raw, dict):
            self.fail("moderator", "invalid", "moderator must be an object with userID and/or token")
            return None
        self.unknown(raw, {"userID", "token"}, "moderator.")
        if raw.get("userID") is None and raw.get("token") is None:
            self.fail("moderator.userID", "required", "moderator needs a userID, a token, or both")
            return None
        user_id = self.text(raw, "userID", "moderator.userID", MAX_ID_CHARS, required=False)
        token = raw.get("token")
        if token is not None and not (
            isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS and set(token) <= _TOKEN_CHARS
        ):
            # Never echoed: a token is a credential.
            self.fail(
                "moderator.token", "invalid", f"token must be a compact JWT of at most {MAX_TOKEN_CHARS} characters"
            )
            return None
        if raw.get("userID") is not None and user_id is None:
            return None
        return (None if user_id is None else nfc(user_id)), token
