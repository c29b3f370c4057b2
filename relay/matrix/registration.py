"""The application-service registration the homeserver loads (Synapse: ``app_service_config_files``).

Choices (docs/matrix.md, "Registration"):

* ``rooms`` namespace, not exclusive, regex ``.*`` by default: the homeserver sends the relay every
  event of every room it hosts whose ID matches, without the relay joining anything or claiming
  any room from other services;
* no ``users`` or ``aliases`` namespace: the relay owns no users and no aliases, so the homeserver
  never asks it about one (only ``sender_localpart``, its own bot user, which it never uses);
* ``rate_limited: false`` (it sends nothing) and no ephemeral events (typing, receipts, presence:
  nothing a recall needs).
"""

from __future__ import annotations

import re

import orjson

DEFAULT_ID = "revoke-relay"
DEFAULT_SENDER_LOCALPART = "revoke-relay"
DEFAULT_ROOMS = ".*"
# A user ID's localpart: the characters Matrix allows in one (historical ones excluded).
_LOCALPART = re.compile(r"[a-z0-9._=/+-]{1,255}")


def _quoted(value: str) -> str:
    """A YAML double-quoted scalar: JSON's string syntax is a subset of it."""
    return orjson.dumps(value).decode()


def registration_yaml(
    url: str,
    hs_token: str,
    as_token: str,
    *,
    service_id: str = DEFAULT_ID,
    sender_localpart: str = DEFAULT_SENDER_LOCALPART,
    rooms: str = DEFAULT_ROOMS,
) -> str:
    """The registration file; raises ValueError for a value the homeserver would refuse."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("--url must start with http:// or https://")
    if not _LOCALPART.fullmatch(sender_localpart):
        raise ValueError("--sender-localpart may hold only a-z 0-9 . _ = / + -")
    if not service_id:
        raise ValueError("--id must not be empty")
    try:
        re.compile(rooms)
    except re.error as exc:
        raise ValueError(f"--rooms is not a regular expression: {exc}") from None
    return "\n".join(
        [
            "# Application-service registration for revoke-relay (relay matrix-registration).",
            "# Give this file to the homeserver (Synapse: app_service_config_files) and restart it.",
            "# It holds both tokens: keep it as secret as RELAY_MATRIX_HS_TOKEN.",
            f"id: {_quoted(service_id)}",
            f"url: {_quoted(url.rstrip('/'))}",
            f"as_token: {_quoted(as_token)}",
            f"hs_token: {_quoted(hs_token)}",
            f"sender_localpart: {_quoted(sender_localpart)}",
            "rate_limited: false",
            "receive_ephemeral: false",
            "namespaces:",
            "  users: []",
            "  aliases: []",
            "  rooms:",
            "    - exclusive: false",
            f"      regex: {_quoted(rooms)}",
            "",
        ]
    )
