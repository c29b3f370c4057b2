"""Source allow-list and X-Forwarded-For handling."""

from __future__ import annotations

import pytest

from relay.access import SourcePolicy, parse_networks

PROXY = parse_networks(["10.0.0.0/24"])
ALLOWED = parse_networks(["203.0.113.0/24", "2001:db8::/32"])


@pytest.mark.parametrize(
    ("peer", "xff", "allowed"),
    [
        pytest.param("203.0.113.9", [], True, id="direct-allowed"),
        pytest.param("198.51.100.1", [], False, id="direct-not-allowed"),
        pytest.param("::ffff:203.0.113.9", [], True, id="ipv4-mapped-ipv6"),
        pytest.param("2001:db8::1", [], True, id="ipv6-allowed"),
        pytest.param("10.0.0.5", ["203.0.113.9"], True, id="via-trusted-proxy"),
        pytest.param("10.0.0.5", ["203.0.113.9, 10.0.0.7"], True, id="through-two-trusted-proxies"),
        pytest.param("10.0.0.5", ["203.0.113.9, 198.51.100.1"], False, id="right-most-untrusted-decides"),
        pytest.param("10.0.0.5", ["198.51.100.1", "203.0.113.9"], True, id="several-headers-joined"),
        pytest.param("198.51.100.1", ["203.0.113.9"], False, id="xff-from-untrusted-peer-ignored"),
        pytest.param("10.0.0.5", ["not-an-ip"], False, id="malformed-hop"),
        pytest.param("10.0.0.5", [], False, id="proxy-without-xff-is-the-client"),
        pytest.param(None, [], False, id="no-peer"),
    ],
)
def test_allow_list(peer: str | None, xff: list[str], allowed: bool) -> None:
    """Only the configured networks pass; forwarded addresses count only behind a trusted proxy."""
    assert allowed == SourcePolicy(ALLOWED, PROXY).allows(peer, xff)


def test_no_allow_list_allows_everyone() -> None:
    """Without RELAY_ALLOWED_CIDRS the policy is inactive and allows any source."""
    policy = SourcePolicy((), ())
    assert not policy.active
    assert policy.allows("198.51.100.1")


def test_bad_cidr_is_named() -> None:
    """A malformed CIDR is reported with its text."""
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        parse_networks(["10.0.0.0/33"])
