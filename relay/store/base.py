"""What every correlation store holds and promises: send records, their keys, and the protocol the
enricher and the recall gateway use, whatever the backend (memory, Redis standalone, cluster, sentinel)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from relay.errors import RelayError
from relay.events import ConversationType

KEY_PREFIX = "revoke-relay:send:"
GATEWAY_PREFIX = "revoke-relay:"  # + recall:… / request:… / attribution:… / msgid:…


def correlation_key(sdk_app_id: str, conversation_type: ConversationType, server_key: str) -> str:
    """The store key of a message: the eventID's own name, so send and recall meet without an index."""
    return f"{sdk_app_id}/{conversation_type}/{server_key}"


@dataclass(frozen=True, slots=True)
class SendRecord:
    """What a send callback tells about one message. Stored compactly; never logged."""

    key: str
    client_msg_id: str | None
    sender: str | None
    sent_at_ms: int | None
    evidence: dict[str, Any] | None = None
    # Where the message lives, in the recall gateway's request vocabulary ({"conversation": …,
    # "message": …}): indexed under its client msgID so a recall request may name it by msgID.
    locator: dict[str, Any] | None = None

    @property
    def index_key(self) -> str | None:
        """The gateway key of this message's msgID index entry, when it has a msgID and a locator."""
        if self.client_msg_id is None or self.locator is None:
            return None
        return msg_id_key(self.key.partition("/")[0], self.client_msg_id)

    def encode(self) -> bytes:
        record: dict[str, Any] = {"m": self.client_msg_id, "s": self.sender, "t": self.sent_at_ms}
        if self.evidence is not None:
            record["e"] = self.evidence
        return orjson.dumps(record)

    @classmethod
    def decode(cls, key: str, raw: bytes) -> SendRecord:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("correlation record is not an object")
        return cls(key, _str(data.get("m")), _str(data.get("s")), _int(data.get("t")), _obj(data.get("e")))


def msg_id_key(sdk_app_id: str, client_msg_id: str) -> str:
    """Gateway key of the msgID index: client msgID → where the message lives (its locator)."""
    return f"msgid:{sdk_app_id}/{client_msg_id}"


class StoreError(RelayError):
    """The correlation store could not read or write what the recall gateway needs."""


class StoreFull(StoreError):
    """The embedded store holds as many unexpired gateway records as it may: it evicts none."""


class CorrelationStore(Protocol):
    """Send records and their msgID index (best effort, batched, evictable) and the recall
    gateway's records (awaited, all-or-error, never evicted before they expire).

    Gateway keys are namespaced by kind (``request:…`` leases and answers, ``attribution:…``,
    ``recall:…`` join records) and never share the bounded send-record space, so a flood of sends
    cannot evict a pending request."""

    name: str
    local: bool  # in-process: a lookup never waits, so it needs no deadline
    index_msg_ids: bool  # also write the msgID index of each send record (the gateway is on)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, records: Sequence[SendRecord]) -> None:
        """Record; when the store is behind, wait a bounded time for room, then drop (counted)."""

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """Send records: one round trip for all *keys*; raises on store failure."""

    async def locate(self, keys: Sequence[str]) -> list[bytes | None]:
        """msgID index entries (``msgid:…``, written with the send records); raises :class:`StoreError`."""

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Gateway records, one round trip; raises :class:`StoreError`."""

    async def put(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        """Write gateway records in one round trip, each expiring after *ttl* s; raises :class:`StoreError`."""

    async def claim(self, key: str, value: bytes, ttl: float) -> bool:
        """Write *key* only if it does not exist (an idempotency lease); False if it does."""

    async def reserve(self, items: Sequence[tuple[str, bytes]], ttl: float) -> list[bool]:
        """Write each key unless it holds another value (a join record another request owns): one
        round trip, True where written (or already ours)."""

    async def take(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read and delete gateway records at once (a join record is used once)."""

    async def delete(self, key: str) -> None:
        """Remove a gateway record; raises :class:`StoreError`."""

    async def delete_if(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Remove each key only while it still holds the given value (never another request's record)."""


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _obj(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
