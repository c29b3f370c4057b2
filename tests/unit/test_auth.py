"""Callback authentication: SdkAppid allow-list, Sign, RequestTime window, token rotation."""

from __future__ import annotations

import hashlib

import pytest

from relay.errors import Reject, Rejection
from relay.tencent.auth import Authenticator, sign
from relay.tencent.callback import CallbackQuery
from tests.helpers import APP, NOW, OTHER_APP, TOKEN

NEW_TOKEN = "tok_rotated_43"


def authenticator(max_age: int = 60) -> Authenticator:
    return Authenticator(frozenset({APP, OTHER_APP}), {APP: (TOKEN, NEW_TOKEN)}, max_age, clock=lambda: NOW)


def signed(token: str = TOKEN, request_time: int = int(NOW), app: str = APP) -> CallbackQuery:
    rt = str(request_time)
    return CallbackQuery(sdk_app_id=app, sign=sign(token, rt), request_time=rt)


def code_of(query: CallbackQuery, max_age: int = 60) -> Reject | None:
    try:
        authenticator(max_age).check(query)
    except Rejection as exc:
        return exc.code
    return None


def test_sign_matches_tencent_documented_vector() -> None:
    """The documented example (token xxxxyyyy, RequestTime 1669872112) reproduces."""
    assert sign("xxxxyyyy", "1669872112").endswith("d484061")
    assert sign("xxxxyyyy", "1669872112") == hashlib.sha256(b"xxxxyyyy1669872112").hexdigest()


def test_sign_matches_reference_synthetic_vector() -> None:
    """The reference's synthetic vector reproduces exactly."""
    assert "f7e84bfcee441898912a333e5573790f864a0a6486604577068d2b9de2661b9c" == sign("tok_example_42", "1767225600")


@pytest.mark.parametrize("token", [TOKEN, NEW_TOKEN])
def test_every_rotation_token_is_accepted(token: str) -> None:
    """During a rotation both the old and the new token authenticate."""
    assert code_of(signed(token)) is None


@pytest.mark.parametrize(
    ("query", "code"),
    [
        pytest.param(CallbackQuery(), Reject.MISSING_PARAMETER, id="no-sdkappid"),
        pytest.param(CallbackQuery(sdk_app_id="999"), Reject.APP_NOT_ALLOWED, id="unknown-app"),
        pytest.param(CallbackQuery(sdk_app_id=APP), Reject.MISSING_SIGNATURE, id="no-sign"),
        pytest.param(CallbackQuery(sdk_app_id=APP, sign="ab" * 32), Reject.INVALID_REQUEST_TIME, id="no-time"),
        pytest.param(signed("wrong-token"), Reject.INVALID_SIGNATURE, id="wrong-token"),
        pytest.param(signed(app="1400000003"), Reject.APP_NOT_ALLOWED, id="token-for-other-app"),
    ],
)
def test_refusals(query: CallbackQuery, code: Reject) -> None:
    """Each way a callback can fail authentication maps to its stable code."""
    assert code == code_of(query)


def test_app_without_token_needs_no_signature() -> None:
    """An app listed in RELAY_SDKAPPIDS without a token is accepted unsigned."""
    assert code_of(CallbackQuery(sdk_app_id=OTHER_APP)) is None


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        pytest.param(-61, False, id="-61s"),
        pytest.param(-60, True, id="-60s"),
        pytest.param(-59, True, id="-59s"),
        pytest.param(59, True, id="+59s"),
        pytest.param(60, True, id="+60s"),
        pytest.param(61, False, id="+61s"),
    ],
)
def test_request_time_window_edges(offset: int, accepted: bool) -> None:
    """RequestTime within RELAY_SIGNATURE_MAX_AGE of now (inclusive) passes; one second more is stale."""
    expected = None if accepted else Reject.STALE_REQUEST
    assert expected == code_of(signed(request_time=int(NOW) + offset))


@pytest.mark.parametrize(
    "request_time",
    [
        pytest.param("-1767225600", id="negative"),
        pytest.param("17672256.5", id="fraction"),
        pytest.param("abc", id="letters"),
        pytest.param("١٧٦٧٢٢٥٦٠٠", id="arabic-indic-digits"),
        pytest.param("9" * 40, id="huge"),
    ],
)
def test_malformed_request_time(request_time: str) -> None:
    """A RequestTime that is not a plausible Unix time in seconds is refused as malformed."""
    query = CallbackQuery(sdk_app_id=APP, sign="ab" * 32, request_time=request_time)
    assert Reject.INVALID_REQUEST_TIME == code_of(query)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda s: s[:-1], id="short"),
        pytest.param(lambda s: s + "0", id="long"),
        pytest.param(lambda s: "zz" + s[2:], id="not-hex"),
        pytest.param(lambda s: "é" + s[1:], id="non-ascii"),
        pytest.param(lambda s: s[:-1] + ("0" if s[-1] != "0" else "1"), id="one-digit-off"),
    ],
)
def test_malformed_or_wrong_sign(mangle: object) -> None:
    """A Sign of the wrong length, alphabet or value is refused as invalid_signature, never crashes."""
    good = signed()
    assert callable(mangle)
    query = CallbackQuery(sdk_app_id=APP, sign=mangle(good.sign), request_time=good.request_time)
    assert Reject.INVALID_SIGNATURE == code_of(query)


def test_uppercase_sign_is_accepted() -> None:
    """Hex is case-insensitive: an uppercase Sign for the right token passes."""
    good = signed()
    assert good.sign is not None
    query = CallbackQuery(sdk_app_id=APP, sign=good.sign.upper(), request_time=good.request_time)
    assert code_of(query) is None


def test_query_names_are_case_insensitive_and_duplicates_refused() -> None:
    """sdkappid/SdkAppid/SDKAPPID are one parameter; giving it twice is ambiguous and refused."""
    assert APP == CallbackQuery.parse([("sdkappid", APP)]).sdk_app_id
    assert APP == CallbackQuery.parse([("SDKAPPID", APP)]).sdk_app_id
    with pytest.raises(Rejection) as info:
        CallbackQuery.parse([("SdkAppid", APP), ("sdkappid", "999")])
    assert Reject.DUPLICATE_PARAMETER == info.value.code
