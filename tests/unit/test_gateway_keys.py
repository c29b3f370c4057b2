"""API keys (RELAY_API_KEYS_FILE), moderator-token keys (JWKS) and configuration errors that never
show a secret (issue 19, cases 2 and 9)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.gateway.keys import ApiKey, Keyring, load_keys
from relay.gateway.moderators import parse_jwks
from relay.settings import Settings

TOKEN = "tok-moderation-0123456789"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()
BASE = {"RELAY_SDKAPPIDS": "1400000001", "RELAY_CALLBACK_TOKENS": "1400000001=cb-token-value"}


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_a_key_reads_every_field_and_defaults_the_rest(tmp_path: Path) -> None:
    """apps, conversations, moderators, rate, amqp_user and the verification flag as written;
    conversations default to all three, moderators to any, rate to 10/s."""
    path = keys_file(
        tmp_path,
        f'[[key]]\nname = "mod-svc"\nsha256 = "{DIGEST}"\napps = ["1400000001"]\nconversations = ["group"]\n'
        'moderators = ["mod_*"]\nrate = 5\namqp_user = "mod-bus"\nrequire_verified_moderator = true\n\n'
        f'[[key]]\nname = "audit"\nsha256 = ["{"a" * 64}", "{"b" * 64}"]\napps = ["*"]\n',
    )
    first, second = load_keys(path)
    assert (frozenset({"1400000001"}), frozenset({"group"}), ("mod_*",), 5.0, "mod-bus", True) == (
        first.apps,
        first.conversations,
        first.moderators,
        first.rate,
        first.amqp_user,
        first.require_verified_moderator,
    )
    assert (None, 3, ("*",), 10.0, 2) == (
        second.apps,
        len(second.conversations),
        second.moderators,
        second.rate,
        len(second.digests),
    )


def test_a_token_is_found_by_its_hash_and_moderator_patterns_are_case_sensitive() -> None:
    """The keyring knows a token by its SHA-256; mod_* matches mod_7, not MOD_7 nor admin."""
    key = ApiKey("svc", (bytes.fromhex(DIGEST),), moderators=("mod_*",))
    ring = Keyring([key])
    assert key == ring.identify(TOKEN.encode())
    assert ring.identify(b"tok-moderation-012345678") is None
    assert (True, False, False) == (
        key.allows_moderator("mod_7"),
        key.allows_moderator("MOD_7"),
        key.allows_moderator("admin"),
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param('[[key]]\nname = "a"\napps = ["*"]\n', "sha256 is required", id="no-hash"),
        pytest.param(
            f'[[key]]\nname = "a"\nsha256 = "{TOKEN}"\napps = ["*"]\n', "sha256 is required", id="token-as-hash"
        ),
        pytest.param(f'[[key]]\nname = "a"\nsha256 = "{DIGEST}"\n', "apps is required", id="no-apps"),
        pytest.param(
            f'[[key]]\nname = "a"\nsha256 = "{DIGEST}"\napps = ["*"]\nconversations = ["dm"]\n',
            "conversations",
            id="bad-conversation",
        ),
        pytest.param(
            f'[[key]]\nname = "a"\nsha256 = "{DIGEST}"\napps = ["*"]\nmoderater = ["x"]\n',
            "unknown field 'moderater'",
            id="typo",
        ),
        pytest.param(
            f'[[key]]\nname = "a"\nsha256 = "{DIGEST}"\napps = ["*"]\n[[key]]\nname = "a"\nsha256 = "{"c" * 64}"\n'
            'apps = ["*"]\n',
            "used twice",
            id="duplicate-name",
        ),
        pytest.param(
            f'[[key]]\nname = "a"\nsha256 = "{DIGEST}"\napps = ["*"]\n[[key]]\nname = "b"\nsha256 = "{DIGEST}"\n'
            'apps = ["*"]\n',
            "share a token",
            id="shared-token",
        ),
        pytest.param("[[key]\nname=", "not valid TOML", id="not-toml"),
    ],
)
def test_a_bad_keys_file_names_the_key_and_field_never_the_value(tmp_path: Path, text: str, says: str) -> None:
    """Each mistake is refused at start, naming the key and what is wrong, without the file's values."""
    with pytest.raises(ConfigError) as caught:
        load_keys(keys_file(tmp_path, text))
    assert says in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_a_key_for_an_app_without_a_secret_key_is_refused(tmp_path: Path) -> None:
    """A scoped app must be one the relay can recall in."""
    path = keys_file(tmp_path, f'[[key]]\nname = "a"\nsha256 = "{DIGEST}"\napps = ["1400000009"]\n')
    env = {**BASE, "RELAY_API_KEYS_FILE": str(path), "RELAY_TENCENT_SECRET_KEYS": "1400000001=k"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert "key 'a' names app(s) 1400000009 without a secret key" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("RELAY_CALLBACK_TOKENS", "1400000001=good-token,Hush-cb-token-without-app", id="callback"),
        pytest.param("RELAY_API_TOKENS", "svc=tok-aaaaaaaaaaaaaaaa,Hush-api-token-without-name", id="api"),
        pytest.param("RELAY_TENCENT_SECRET_KEYS", "Hush-key-without-app", id="secret-key"),
        pytest.param("RELAY_API_TOKENS", "svc=Hushshort", id="short-token"),
    ],
)
def test_9_a_malformed_pair_is_named_by_position_and_never_printed(name: str, value: str) -> None:
    """A pair without '=' may be a bare secret: the error names the setting and the pair's position."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, name: value})
    message = str(caught.value)
    assert name in message
    assert "Hush" not in message
    assert "pair" in message


def test_9_a_short_api_token_says_so() -> None:
    """Not a generic "malformed pair": the caller and what is wrong with its token."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "RELAY_API_TOKENS": "svc=short"})
    assert "the token of 'svc' (pair 1 of 1) is shorter than 16 characters" in str(caught.value)


@pytest.mark.parametrize(
    ("jwks", "says"),
    [
        pytest.param({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "only RSA, EC and OKP", id="symmetric-key"),
        pytest.param(
            {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "alg": "HS256"}]},
            "not an asymmetric",
            id="hs256",
        ),
        pytest.param({"keys": []}, "no signing keys", id="empty"),
        pytest.param({"nokeys": 1}, "not a JWK set", id="not-a-set"),
    ],
)
def test_a_jwks_with_nothing_asymmetric_to_verify_with_is_refused(jwks: object, says: str) -> None:
    """Only asymmetric signing keys verify moderator tokens: a shared secret would let the relay mint them."""
    with pytest.raises(ValueError, match=says):
        parse_jwks(jwks, "RELAY_API_JWKS_FILE")


def test_jwt_settings_need_an_issuer_and_an_audience(tmp_path: Path) -> None:
    """A JWKS alone is not enough: a token is only checked against one issuer and audience."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "RELAY_API_JWKS_URL": "https://idp.example.com/jwks"})
    assert {"RELAY_API_JWT_ISSUER", "RELAY_API_JWT_AUDIENCE"} <= {p.split(":")[0] for p in caught.value.problems}
    with pytest.raises(ConfigError) as plain:
        Settings.from_env(
            {
                **BASE,
                "RELAY_API_JWKS_URL": "http://idp.example.com/jwks",
                "RELAY_API_JWT_ISSUER": "x",
                "RELAY_API_JWT_AUDIENCE": "y",
            }
        )
    assert "RELAY_API_JWKS_URL: expected an https:// URL" in str(plain.value)
