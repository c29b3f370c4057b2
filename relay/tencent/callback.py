"""What Tencent IM puts in a callback URL: query parameters and callback command names.

Tencent spells the same parameter differently across products (``SdkAppid``, ``sdkappid``,
``SdkAppId``), so names are matched case-insensitively. A parameter given twice is ambiguous
(which one did the signer mean?) and is refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import Reject, Rejection

C2C_RECALL = "C2C.CallbackAfterMsgWithDraw"
GROUP_RECALL = "Group.CallbackAfterRecallMsg"
OFFICIAL_ACCOUNT_RECALL = "OfficialAccount.CallbackAfterMsgWithDraw"
RECALL_COMMANDS = frozenset({C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL})

# Commands that get their own metric label; anything else is counted as "other" so a sender
# cannot create unbounded label values.
KNOWN_COMMANDS = RECALL_COMMANDS | {
    "C2C.CallbackBeforeSendMsg",
    "C2C.CallbackAfterSendMsg",
    "C2C.CallbackAfterMsgReport",
    "Group.CallbackBeforeSendMsg",
    "Group.CallbackAfterSendMsg",
    "OfficialAccount.CallbackAfterSendMsg",
    "State.StateChange",
}

_PARAMS = {
    "sdkappid": "sdk_app_id",
    "callbackcommand": "command",
    "sign": "sign",
    "requesttime": "request_time",
    "clientip": "client_ip",
    "optplatform": "platform",
}


def command_label(command: str | None) -> str:
    """Bounded metric label for a callback command."""
    return command if command in KNOWN_COMMANDS else "other"


@dataclass(frozen=True, slots=True)
class CallbackQuery:
    """The query parameters the relay uses; absent or empty ones are ``None``."""

    sdk_app_id: str | None = None
    command: str | None = None
    sign: str | None = None
    request_time: str | None = None
    client_ip: str | None = None
    platform: str | None = None

    @classmethod
    def parse(cls, items: Iterable[tuple[str, str]]) -> CallbackQuery:
        """Build from raw ``(name, value)`` pairs; raise ``DUPLICATE_PARAMETER`` on a repeated one."""
        found: dict[str, str] = {}
        for name, value in items:
            attr = _PARAMS.get(name.lower())
            if attr is None:
                continue
            if attr in found:
                raise Rejection(Reject.DUPLICATE_PARAMETER, f"{name} given more than once")
            found[attr] = value
        return cls(**{k: v for k, v in found.items() if v != ""})
