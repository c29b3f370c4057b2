"""Matrix configuration: the RELAY_MATRIX_* settings, `relay matrix-registration`, the in-memory transaction log."""

from __future__ import annotations

import pytest
import yaml

from relay.cli import main
from relay.errors import ConfigError
from relay.matrix.transactions import MemoryTransactionLog, digest
from relay.settings import Settings

HS = "hs_0123456789abcdefghij"
AS = "as_0123456789abcdefghij"


def test_matrix_alone_is_a_valid_configuration() -> None:
    """RELAY_MATRIX_HS_TOKEN without any Tencent app is enough to serve; the body limit has its own default."""
    settings = Settings.from_env({"RELAY_MATRIX_HS_TOKEN": HS})
    assert (HS, None, 8 * 1024 * 1024, frozenset()) == (
        settings.matrix_hs_token,
        settings.matrix_as_token,
        settings.matrix_max_body_bytes,
        settings.accepted_apps,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELAY_MATRIX_HS_TOKEN": "short"}, "RELAY_MATRIX_HS_TOKEN"),
        ({"RELAY_MATRIX_HS_TOKEN": "has a space in it, sadly"}, "RELAY_MATRIX_HS_TOKEN"),
        ({"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_AS_TOKEN": "ünïcode-token-value"}, "RELAY_MATRIX_AS_TOKEN"),
        ({"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_AS_TOKEN": HS}, "RELAY_MATRIX_AS_TOKEN"),
        ({"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_MAX_BODY_BYTES": "1000"}, "RELAY_MATRIX_MAX_BODY_BYTES"),
    ],
    ids=["short", "space", "non-ascii", "same-as-hs", "tiny-limit"],
)
def test_bad_matrix_settings_are_named_without_their_value(env: dict[str, str], named: str) -> None:
    """Each bad RELAY_MATRIX_* variable is named; a token's value is never echoed."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RELAY_SDKAPPIDS": "1400000001", **env})
    (problem,) = info.value.problems
    assert problem.startswith(named + ":")
    for value in env.values():
        if len(value) > 8:
            assert value not in problem


def test_repr_hides_the_matrix_tokens() -> None:
    """Both tokens show as *** in the printed configuration."""
    text = repr(Settings.from_env({"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_AS_TOKEN": AS}))
    assert HS not in text and AS not in text
    assert "matrix_hs_token='***'" in text and "matrix_as_token='***'" in text


def test_registration_holds_what_the_homeserver_needs(capsys: pytest.CaptureFixture[str]) -> None:
    """`relay matrix-registration --url` prints YAML with the id, url, both tokens, the sender and a
    non-exclusive rooms namespace, and nothing else the relay would have to answer for."""
    env = {"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_AS_TOKEN": AS}
    assert 0 == main(
        ["matrix-registration", "--url", "https://relay.internal:8080/", "--rooms", "!.*:example.org"], env
    )
    assert {
        "id": "revoke-relay",
        "url": "https://relay.internal:8080",
        "as_token": AS,
        "hs_token": HS,
        "sender_localpart": "revoke-relay",
        "rate_limited": False,
        "receive_ephemeral": False,
        "namespaces": {"users": [], "aliases": [], "rooms": [{"exclusive": False, "regex": "!.*:example.org"}]},
    } == yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({"RELAY_MATRIX_HS_TOKEN": HS}, [], "RELAY_MATRIX_AS_TOKEN"),
        ({}, [], "RELAY_MATRIX_HS_TOKEN and RELAY_MATRIX_AS_TOKEN"),
        ({"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_AS_TOKEN": AS}, ["--rooms", "("], "--rooms"),
        ({"RELAY_MATRIX_HS_TOKEN": HS, "RELAY_MATRIX_AS_TOKEN": AS}, ["--sender-localpart", "Bot!"], "localpart"),
    ],
    ids=["no-as-token", "no-tokens", "bad-regex", "bad-localpart"],
)
def test_registration_refuses_what_the_homeserver_would(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], args: list[str], says: str
) -> None:
    """Missing tokens or values the homeserver would refuse exit 1 with the reason, and print no YAML."""
    assert 1 == main(["matrix-registration", "--url", "http://relay:8080", *args], env)
    out, err = capsys.readouterr()
    assert ("", True) == (out, says in err)


async def test_memory_transaction_log_expires_and_is_bounded() -> None:
    """An answered txnId is remembered with its digest for the TTL, and the oldest are dropped past the bound."""
    now = [0.0]
    txns = MemoryTransactionLog(ttl=10, max_entries=2, clock=lambda: now[0])
    await txns.remember("1", b"d1")
    assert (b"d1", None) == (await txns.answered("1"), await txns.answered("2"))
    now[0] = 10.0
    assert await txns.answered("1") is None
    await txns.remember("a", b"da")
    await txns.remember("b", b"db")
    await txns.remember("c", b"dc")
    assert (None, b"db", b"dc", 2) == (
        await txns.answered("a"),
        await txns.answered("b"),
        await txns.answered("c"),
        len(txns),
    )


def test_a_retry_with_other_unsigned_data_is_the_same_transaction() -> None:
    """Synapse resends a transaction with unsigned.age changed: same digest; other events: another."""
    first = [{"event_id": "$a", "type": "m.room.redaction", "unsigned": {"age": 10}}]
    retry = [{"event_id": "$a", "type": "m.room.redaction", "unsigned": {"age": 2510}}]
    other = [{"event_id": "$b", "type": "m.room.redaction", "unsigned": {"age": 10}}]
    assert digest(first) == digest(retry) != digest(other)
