"""UserSig (TLSSigAPIv2): the reference's check value, round trips, each verify failure, the cache."""

from __future__ import annotations

import base64
import json
import zlib

import pytest

from relay.gateway.usersig import (
    LIFETIME,
    RENEW_BEFORE,
    UserSigError,
    UserSigs,
    hmac_sig,
    make_usersig,
    verify_usersig,
)
from tests.tencent_sim import usersig_code

# The check value of the reference (tencent-im-rest-recall.md §3).
CHECK_APP = 1400000000
CHECK_ID = "xiaojun"
CHECK_TIME = 1700000000
CHECK_EXPIRE = 15552000
CHECK_KEY = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
CHECK_SIG = "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4="

APP = "1400000001"
KEY = "k3y-for-tests-only-0123456789abcdef"
NOW = 1_767_225_600


def unpack(sig: str) -> dict[str, object]:
    """Decode a UserSig by hand (reverse of the documented steps), without relay's code."""
    raw = base64.b64decode(sig.translate(str.maketrans("*-_", "+/=")))
    doc: dict[str, object] = json.loads(zlib.decompress(raw))
    return doc


def pack(doc: dict[str, object]) -> str:
    return base64.b64encode(zlib.compress(json.dumps(doc).encode())).decode().translate(str.maketrans("+/=", "*-_"))


def problem(sig: str, app: int | str = APP, identifier: str = "administrator", key: str = KEY, now: float = NOW) -> str:
    with pytest.raises(UserSigError) as info:
        verify_usersig(sig, app, identifier, key, now=now)
    return info.value.problem


def test_hmac_matches_the_reference_check_value() -> None:
    """The HMAC step reproduces the reference's TLS.sig for app 1400000000, xiaojun, 1700000000."""
    assert CHECK_SIG == hmac_sig(CHECK_ID, CHECK_APP, CHECK_KEY, t=CHECK_TIME, expire=CHECK_EXPIRE)


def test_made_usersig_carries_the_check_value_and_numbers() -> None:
    """The full UserSig decodes to the documented JSON: version 2.0, numbers as numbers, that TLS.sig."""
    doc = unpack(make_usersig(CHECK_APP, CHECK_ID, CHECK_KEY, now=CHECK_TIME, expire=CHECK_EXPIRE))
    expected = {
        "TLS.ver": "2.0",
        "TLS.identifier": CHECK_ID,
        "TLS.sdkappid": CHECK_APP,
        "TLS.expire": CHECK_EXPIRE,
        "TLS.time": CHECK_TIME,
        "TLS.sig": CHECK_SIG,
    }
    assert expected == doc


def test_usersig_uses_only_the_url_safe_alphabet() -> None:
    """The replacements + → *, / → -, = → _ leave nothing that needs escaping in a query."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=LIFETIME)
    assert not set(sig) & set("+/=")


def test_round_trip_returns_the_fields() -> None:
    """A made UserSig verifies with the same key, app and identifier, and says who and until when."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=LIFETIME)
    fields = verify_usersig(sig, APP, "administrator", KEY, now=NOW + 10)
    assert ("administrator", int(APP), NOW, LIFETIME) == (
        fields.identifier,
        fields.sdk_app_id,
        fields.time,
        fields.expire,
    )
    assert NOW + LIFETIME == fields.expires_at


def test_the_check_value_usersig_verifies() -> None:
    """The reference's inputs make a UserSig that verifies inside its 180-day window."""
    sig = make_usersig(CHECK_APP, CHECK_ID, CHECK_KEY, now=CHECK_TIME, expire=CHECK_EXPIRE)
    assert CHECK_ID == verify_usersig(sig, CHECK_APP, CHECK_ID, CHECK_KEY, now=CHECK_TIME + CHECK_EXPIRE).identifier


def test_the_simulators_independent_check_agrees() -> None:
    """The test simulator's own decode + HMAC accepts relay's UserSig and refuses it under another key."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=LIFETIME)
    assert 0 == usersig_code(sig, APP, "administrator", KEY, NOW)
    assert 70009 == usersig_code(sig, APP, "administrator", "another-key", NOW)
    assert 70001 == usersig_code(sig, APP, "administrator", KEY, NOW + LIFETIME + 1)


def test_expiry_is_inclusive_of_the_last_second() -> None:
    """``now ≤ time + expire`` is valid; one second later is expired."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=60)
    verify_usersig(sig, APP, "administrator", KEY, now=NOW + 60)
    assert "expired" == problem(make_usersig(APP, "administrator", KEY, now=NOW, expire=60), now=NOW + 61)


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param("", id="empty"),
        pytest.param("not base64 at all!", id="not-base64"),
        pytest.param(base64.b64encode(b"plain bytes").decode(), id="not-zlib"),
        pytest.param(base64.b64encode(zlib.compress(b"{nope")).decode(), id="not-json"),
        pytest.param(pack({"TLS.ver": "1.0"}), id="wrong-version"),
        pytest.param(pack({"TLS.ver": "2.0", "TLS.identifier": "a", "TLS.sig": "x"}), id="missing-numbers"),
        pytest.param(
            pack(
                {
                    "TLS.ver": "2.0",
                    "TLS.identifier": "a",
                    "TLS.sig": "x",
                    "TLS.sdkappid": "1",
                    "TLS.time": 1,
                    "TLS.expire": 1,
                }
            ),
            id="app-as-string",
        ),
        pytest.param("ünïcode", id="non-ascii"),
        pytest.param(
            base64.b64encode(zlib.compress(b" " * 100_000)).decode().translate(str.maketrans("+/=", "*-_")),
            id="inflates-too-far",
        ),
    ],
)
def test_malformed_usersigs_are_named_malformed(sig: str) -> None:
    """Anything that is not a TLS 2.0 UserSig fails as malformed, without an exception escaping."""
    assert "malformed" == problem(sig)


def test_truncated_usersig_is_malformed() -> None:
    """A UserSig cut short (the 70003 case) fails as malformed."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=LIFETIME)
    assert "malformed" == problem(sig[: len(sig) // 2])


def test_wrong_app_wrong_identifier_and_bad_signature_are_named() -> None:
    """Each mismatch names itself: another app, another identifier, another key or a forged TLS.sig."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=LIFETIME)
    assert "wrong_app" == problem(sig, app="1400000002")
    assert "wrong_identifier" == problem(sig, identifier="someone_else")
    assert "bad_signature" == problem(sig, key="not-the-key")
    forged = unpack(sig)
    forged["TLS.expire"] = LIFETIME * 100  # extend the lifetime without the key
    assert "bad_signature" == problem(pack(forged))


def test_errors_never_show_the_key() -> None:
    """No failure's message, repr or detail contains the secret key."""
    sig = make_usersig(APP, "administrator", KEY, now=NOW, expire=60)
    cases = [(APP, "administrator", "x", NOW), (APP, "administrator", KEY, NOW + 999), ("1", "administrator", KEY, NOW)]
    cases.append((APP, "y", KEY, NOW))
    for app, identifier, key, now in cases:
        with pytest.raises(UserSigError) as info:
            verify_usersig(sig, app, identifier, key, now=now)
        assert KEY not in f"{info.value} {info.value!r} {info.value.detail}"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sigs(clock: Clock, made: list[str] | None = None) -> UserSigs:
    return UserSigs("administrator", {APP: KEY}, clock=clock, on_made=None if made is None else made.append)


def test_cache_reuses_until_the_renewal_point() -> None:
    """The UserSig is made once and reused until fewer than RENEW_BEFORE seconds of it remain."""
    clock, made = Clock(NOW), []
    cache = sigs(clock, made)
    first = cache.get(APP)
    clock.now = NOW + LIFETIME - RENEW_BEFORE - 1
    assert first == cache.get(APP)
    clock.now = NOW + LIFETIME - RENEW_BEFORE
    renewed = cache.get(APP)
    assert first != renewed
    assert ["new", "renewal"] == made
    assert NOW + LIFETIME - RENEW_BEFORE == verify_usersig(renewed, APP, "administrator", KEY, now=clock.now).time


def test_every_usersig_handed_out_has_a_day_left() -> None:
    """Whenever get() is called, the UserSig it returns stays valid for at least RENEW_BEFORE seconds."""
    clock = Clock(NOW)
    cache = sigs(clock)
    for step in range(0, 10 * LIFETIME, 3607):
        clock.now = NOW + step
        fields = verify_usersig(cache.get(APP), APP, "administrator", KEY, now=clock.now)
        assert fields.expires_at - clock.now >= RENEW_BEFORE


def test_invalidate_makes_a_fresh_one() -> None:
    """After invalidate() (a 7000x answer) the next get() makes a new UserSig, counted as invalidated."""
    clock, made = Clock(NOW), []
    cache = sigs(clock, made)
    cache.get(APP)
    clock.now += 5
    cache.invalidate(APP)
    fresh = cache.get(APP)
    assert NOW + 5 == verify_usersig(fresh, APP, "administrator", KEY, now=clock.now).time
    assert ["new", "invalidated"] == made


def test_unknown_app_and_repr_never_show_keys() -> None:
    """An app without a key is a KeyError naming the app only; the repr lists apps, not keys."""
    cache = sigs(Clock(NOW))
    assert cache.has_key(APP)
    assert not cache.has_key("1400000009")
    with pytest.raises(KeyError) as info:
        cache.get("1400000009")
    assert KEY not in str(info.value)
    assert KEY not in repr(cache)
    assert APP in repr(cache)


@pytest.mark.parametrize(
    ("keys", "lifetime", "renew_before"),
    [
        pytest.param({APP: KEY}, 100, 100, id="renew-at-birth"),
        pytest.param({APP: KEY}, 100, -1, id="negative-margin"),
        pytest.param({"app-1": KEY}, 100, 10, id="non-numeric-app"),
    ],
)
def test_bad_cache_settings_are_refused(keys: dict[str, str], lifetime: int, renew_before: int) -> None:
    """A renewal margin outside [0, lifetime) or a non-numeric SdkAppID is refused at construction."""
    with pytest.raises(ValueError, match=r"renew_before|SdkAppID") as info:
        UserSigs("administrator", keys, lifetime=lifetime, renew_before=renew_before)
    assert KEY not in str(info.value)
