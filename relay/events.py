"""The ``message.revoked`` event (contract: docs/events.md, relay/schema/event.v4.json) and its AMQP envelope.

Pure data: no I/O, no event loop. An :class:`Envelope` is everything the publisher and the spool
need, so a spooled event is republished with exactly the bytes and properties of a direct publish.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import orjson

# Version 2 added enrichment, sentAt and evidence; version 3 added provider (tencent, matrix),
# recallRequest and the moderator role; version 4 added operator.assertedBy / operator.verifiedBy
# (who vouches for a moderator) (docs/events.md, "Versions"). Nothing was removed or changed in
# type, so an older consumer that ignores unknown fields keeps working.
EVENT_VERSION = 4
EVENT_TYPE = "message.revoked"
CLOUDEVENTS_TYPE = "im.message.revoked"
APP_ID = "revoke-relay"
# Fixed forever: consumers may recompute an eventID from the callback (docs/events.md).
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2b8e-5d3a-5b7e-9a41-2c0e7d9b4f10")

ConversationType = Literal["c2c", "group", "official_account"]
Role = Literal["sender", "group_admin", "app_admin", "moderator", "unknown"]
Provider = Literal["tencent", "matrix"]
Enrichment = Literal["hit", "miss", "disabled", "error"]


def event_id(sdk_app_id: str, conversation_type: ConversationType, server_key: str) -> str:
    """Deterministic eventID: a redelivered callback yields the same ID, distinct messages never share one.

    The name is ``<SdkAppid>/<conversation type>/<server key>``; SdkAppid is digits and the type a
    fixed word, so only the last part can hold a ``/`` and the name stays unambiguous. This is
    ``uuid.uuid5(EVENT_ID_NAMESPACE, name)``.
    """
    return name_id(f"{sdk_app_id}/{conversation_type}/{server_key}")


def name_id(name: str) -> str:
    """``str(uuid.uuid5(EVENT_ID_NAMESPACE, name))``, computed without building UUID objects (hot path).
    Every eventID of every kind is one of these; each kind's names have their own shape, so they
    cannot collide."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes


@functools.lru_cache(maxsize=4096)
def _second_prefix(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a second since the epoch, UTC. Cached per second, several at once:
    an event's eventTime, sentAt and receivedAt are different seconds, and a one-entry cache
    formatted a datetime on nearly every call (5 % of the relay's CPU per callback, measured)."""
    return f"{datetime.fromtimestamp(seconds, tz=UTC):%Y-%m-%dT%H:%M:%S}"


def rfc3339_ms(epoch_ms: int) -> str:
    """Format milliseconds since the epoch as RFC 3339 UTC with exactly three fractional digits."""
    seconds, millis = divmod(epoch_ms, 1000)
    prefix = _second_prefix(seconds)
    return f"{prefix}.{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class Operator:
    """Who recalled. For a moderator (a recall-gateway request), who vouches for the ID: the API
    key that asserted it, or the issuer whose token verified it; both None otherwise (the
    operator is what the provider's callback reports)."""

    user_id: str | None
    role: Role
    asserted_by: str | None = None
    verified_by: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "userID": self.user_id,
            "role": self.role,
            "assertedBy": self.asserted_by,
            "verifiedBy": self.verified_by,
        }


@dataclass(frozen=True, slots=True)
class RecallRequest:
    """The recall-gateway request a recall callback was joined to (who asked for it, and when)."""

    request_id: str
    requested_by: str
    requested_at_ms: int

    def to_dict(self) -> dict[str, object]:
        return {
            "requestID": self.request_id,
            "requestedBy": self.requested_by,
            "requestedAt": rfc3339_ms(self.requested_at_ms),
        }


@dataclass(frozen=True, slots=True)
class Conversation:
    type: ConversationType
    receiver: str | None = None
    group_id: str | None = None
    group_type: str | None = None
    topic_id: str | None = None
    official_account: str | None = None

    @property
    def key(self) -> str:
        """Identity of the conversation, used to keep per-conversation order in the spool."""
        if self.type == "c2c":
            return f"c2c/{self.receiver}"
        if self.type == "group":
            return f"group/{self.group_id}/{self.topic_id or ''}"
        return f"official_account/{self.official_account}"


@dataclass(frozen=True, slots=True)
class RevokeEvent:
    """One recalled message, normalized. Field meanings: docs/events.md."""

    event_id: str
    msg_id: str
    msg_key: str | None
    msg_seq: int | None
    client_msg_id: str | None
    operator: Operator
    reason: str | None
    sender: str | None
    conversation: Conversation
    sdk_app_id: str | None  # None only for providers without one (Matrix)
    callback_command: str
    platform: str | None
    client_ip: str | None
    event_time_ms: int
    received_at_ms: int
    server_key: str = ""  # what eventID and the correlation key derive from; not serialized
    enrichment: Enrichment = "disabled"
    sent_at_ms: int | None = None
    evidence: dict[str, object] | None = None
    provider: Provider = "tencent"
    recall_request: RecallRequest | None = None
    # Providers other than Tencent say where their events come from and under which key their
    # send records are stored; None means Tencent's (from sdk_app_id and server_key).
    source: str | None = None
    correlation_key: str | None = None

    @property
    def routing_key(self) -> str:
        return f"{EVENT_TYPE}.{self.conversation.type}"

    def to_dict(self, event_time: str | None = None) -> dict[str, object]:
        """The JSON body, camelCase in the IM SDK's vocabulary (*event_time*: already formatted)."""
        c = self.conversation
        return {
            "version": EVENT_VERSION,
            "eventID": self.event_id,
            "type": EVENT_TYPE,
            "provider": self.provider,
            "msgID": self.msg_id,
            "msgKey": self.msg_key,
            "msgSeq": self.msg_seq,
            "clientMsgID": self.client_msg_id,
            "operator": self.operator.to_dict(),
            "reason": self.reason,
            "sender": self.sender,
            "conversation": {
                "type": c.type,
                "receiver": c.receiver,
                "groupID": c.group_id,
                "groupType": c.group_type,
                "topicID": c.topic_id,
                "officialAccount": c.official_account,
            },
            "sdkAppID": self.sdk_app_id,
            "callbackCommand": self.callback_command,
            "platform": self.platform,
            "clientIP": self.client_ip,
            "eventTime": event_time or rfc3339_ms(self.event_time_ms),
            "receivedAt": rfc3339_ms(self.received_at_ms),
            "enrichment": self.enrichment,
            "sentAt": None if self.sent_at_ms is None else rfc3339_ms(self.sent_at_ms),
            "evidence": self.evidence,
            "recallRequest": None if self.recall_request is None else self.recall_request.to_dict(),
        }

    def envelope(self) -> Envelope:
        event_time = rfc3339_ms(self.event_time_ms)
        return Envelope(
            event_id=self.event_id,
            routing_key=self.routing_key,
            body=orjson.dumps(self.to_dict(event_time)),
            timestamp=self.received_at_ms // 1000,
            source=self.source or f"tencent-im/{self.sdk_app_id}",
            subject=self.msg_id,
            time=event_time,
            conversation_key=self.conversation.key,
        )


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event ready to publish: body bytes plus what its AMQP properties and headers derive from."""

    event_id: str
    routing_key: str
    body: bytes
    timestamp: int  # AMQP ``timestamp`` property, seconds: when the relay received the callback
    source: str
    subject: str
    time: str
    conversation_key: str

    @property
    def conversation_type(self) -> str:
        return self.routing_key.rpartition(".")[2]

    @property
    def type(self) -> str:
        """The event type, from the routing key (``message.revoked.c2c`` → ``message.revoked``):
        the AMQP ``type`` property, and with ``im.`` the CloudEvents type. Derived rather than
        stored, so spooled events of every type replay exactly."""
        return self.routing_key.rpartition(".")[0]

    def headers(self) -> dict[str, str]:
        """CloudEvents AMQP binding, binary mode, ``cloudEvents_`` prefix (spec-preferred over ``:``)."""
        return dict(zip(CLOUDEVENTS_HEADERS, self.header_values(), strict=True))

    def header_values(self) -> tuple[str, ...]:
        """The values of :data:`CLOUDEVENTS_HEADERS`, in that order."""
        cloudevents_type = CLOUDEVENTS_TYPE if self.routing_key.startswith(_REVOKED_PREFIX) else f"im.{self.type}"
        return ("1.0", self.event_id, self.source, cloudevents_type, self.subject, self.time)


_REVOKED_PREFIX = EVENT_TYPE + "."
CLOUDEVENTS_HEADERS = (
    "cloudEvents_specversion",
    "cloudEvents_id",
    "cloudEvents_source",
    "cloudEvents_type",
    "cloudEvents_subject",
    "cloudEvents_time",
)
