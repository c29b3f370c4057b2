"""The hostile-input matrix: every case gets its documented status and stable code over HTTP, one
rejection metric and one log event, never a 500 — and a valid callback right after still works."""

from __future__ import annotations

import gzip
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.app import create_app
from relay.tencent.auth import sign
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL
from relay.tencent.samples import sample_body
from tests.helpers import APP, NOW, TOKEN, RecordingPublisher, make_settings

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
OLD_TOKEN = "tok_previous_41"
T = int(NOW)


def query(
    app: str | None = APP,
    command: str = C2C_RECALL,
    token: str | None = TOKEN,
    rt: str | None = str(T),
    sign_value: str | None = None,
    extra: str = "",
) -> str:
    parts = []
    if app is not None:
        parts.append(f"SdkAppid={app}")
    parts.append(f"CallbackCommand={command}")
    if token is not None or sign_value is not None:
        value = sign_value if sign_value is not None else sign(token or "", rt or "")
        parts.append(f"Sign={value}")
    if rt is not None:
        parts.append(f"RequestTime={rt}")
    return "/tencent-im/callback?" + "&".join(parts) + extra


def c2c(**fields: Any) -> bytes:
    body = {**sample_body("c2c"), **fields}
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def group(**fields: Any) -> bytes:
    return orjson.dumps({**sample_body("group"), **fields})


GOOD = c2c()
NEST = b'{"a":' * 2000 + b"1" + b"}" * 2000
# (id, url, body, status, code); code None means 200 OK.
CASES: list[tuple[str, str, bytes, int, str | None]] = [
    # -- auth ---------------------------------------------------------------------------------
    ("sign-missing", query(token=None), GOOD, 401, "missing_signature"),
    ("sign-empty", query(sign_value=""), GOOD, 401, "missing_signature"),
    ("sign-uppercase", query(sign_value=sign(TOKEN, str(T)).upper()), c2c(), 200, None),
    ("sign-wrong-length", query(sign_value="ab" * 31), GOOD, 401, "invalid_signature"),
    ("sign-wrong-token", query(token="guess"), GOOD, 401, "invalid_signature"),
    ("sign-old-token-during-rotation", query(token=OLD_TOKEN), c2c(), 200, None),
    ("requesttime-missing", query(rt=None, sign_value="ab" * 32), GOOD, 401, "invalid_request_time"),
    ("requesttime-non-numeric", query(rt="soon"), GOOD, 401, "invalid_request_time"),
    ("requesttime-negative", query(rt="-1767225600"), GOOD, 401, "invalid_request_time"),
    ("requesttime-far-future", query(rt=str(T + 86400 * 365)), GOOD, 401, "stale_request"),
    ("requesttime-60s-old", query(rt=str(T - 60)), c2c(), 200, None),
    ("requesttime-61s-old", query(rt=str(T - 61)), GOOD, 401, "stale_request"),
    ("requesttime-61s-ahead", query(rt=str(T + 61)), GOOD, 401, "stale_request"),
    ("sdkappid-wrong", query(app="1999999999", token=None), GOOD, 403, "app_not_allowed"),
    ("sdkappid-missing", query(app=None, token=None), GOOD, 400, "missing_parameter"),
    ("sdkappid-duplicated", query(extra=f"&sdkappid={APP}"), GOOD, 400, "duplicate_parameter"),
    ("command-mismatch", query(command=GROUP_RECALL), GOOD, 400, "command_mismatch"),
    # -- body ---------------------------------------------------------------------------------
    ("body-empty", query(), b"", 400, "invalid_json"),
    ("body-not-json", query(), b"MsgKey=1", 400, "invalid_json"),
    ("body-not-utf8", query(), b'{"MsgKey":"\xff\xfe"}', 400, "invalid_json"),
    ("body-json-array", query(), b"[]", 400, "not_an_object"),
    ("body-json-string", query(), b'"x"', 400, "not_an_object"),
    ("body-deep-nesting", query(), NEST, 400, "invalid_json"),
    ("body-5000-digit-integer", query(), b'{"UnreadMsgNum":' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("body-nan", query(), b'{"EventTime":NaN}', 400, "invalid_json"),
    ("body-infinity", query(), b'{"EventTime":Infinity}', 400, "invalid_json"),
    ("body-lone-surrogate-in-id", query(), GOOD.replace(b'"u_alice"', b'"u_\\ud800"'), 400, "invalid_json"),
    ("body-lone-surrogate-elsewhere", query(), GOOD[:-1] + b',"x":"\\udfff"}', 400, "invalid_json"),
    ("body-duplicate-keys-last-wins", query(), GOOD[:-1] + b',"MsgKey":"dup_1_2"}', 200, None),
    ("body-over-limit", query(), c2c(pad="x" * 70000), 413, "body_too_large"),
    ("field-msgkey-number", query(), c2c(MsgKey=42), 400, "invalid_field"),
    ("field-msgkey-missing", query(), c2c(MsgKey=...), 400, "missing_field"),
    ("field-from-object", query(), c2c(From_Account={"id": 1}), 400, "invalid_field"),
    ("field-to-null", query(), c2c(To_Account=None), 400, "missing_field"),
    ("field-id-2000-chars", query(), c2c(From_Account="u" * 2000), 400, "invalid_field"),
    ("field-id-1024-chars", query(), c2c(From_Account="u" * 1024), 200, None),
    ("field-unicode-ids", query(), c2c(From_Account="用户😀", To_Account="ユーザー\u200d"), 200, None),
    ("eventtime-negative", query(), c2c(EventTime=-1), 200, None),
    ("eventtime-float", query(), c2c(EventTime=1.5), 200, None),
    ("eventtime-absurd", query(), c2c(EventTime=10**18), 200, None),
    ("eventtime-seconds", query(), c2c(EventTime=1767225601), 200, None),
    ("msgseqlist-empty", query(command=GROUP_RECALL), group(MsgSeqList=[]), 400, "invalid_field"),
    (
        "msgseqlist-1001",
        query(command=GROUP_RECALL),
        group(MsgSeqList=[{"MsgSeq": i} for i in range(1001)]),
        400,
        "too_many_items",
    ),
    ("msgseqlist-1000", query(command=GROUP_RECALL), group(MsgSeqList=[{"MsgSeq": i} for i in range(1000)]), 200, None),
    (
        "msgseq-string-beside-valid",
        query(command=GROUP_RECALL),
        group(MsgSeqList=[{"MsgSeq": 1}, {"MsgSeq": "2"}]),
        400,
        "invalid_field",
    ),
]


@pytest.fixture(params=["on", "off"], ids=["fast-path", "aiohttp"])
async def client(aiohttp_client: ClientFactory, tmp_path: Path, request: pytest.FixtureRequest) -> TestClient:  # type: ignore[type-arg]
    """Every hostile case through both HTTP front ends: they must answer identically."""
    settings = make_settings(
        tmp_path, RELAY_CALLBACK_TOKENS=f"{APP}={TOKEN},{APP}={OLD_TOKEN}", RELAY_HTTP_FAST_PATH=request.param
    )
    registry = CollectorRegistry()
    app = create_app(settings, publisher=RecordingPublisher(), registry=registry, clock=lambda: NOW)
    client = await aiohttp_client(app)
    client.registry = registry  # type: ignore[attr-defined]
    return client


@pytest.mark.parametrize(("url", "body", "status", "code"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
async def test_hostile_case(client: TestClient, url: str, body: bytes, status: int, code: str | None) -> None:  # type: ignore[type-arg]
    """The case gets its status and code; a refusal counts once and logs once; a valid callback still works."""
    registry: CollectorRegistry = client.registry  # type: ignore[attr-defined]
    before = registry.get_sample_value("relay_callback_rejections_total", {"reason": code}) if code else None
    with capture_logs() as logs:
        response = await client.post(url, data=body)
        reply = await response.json()
    assert (status, code or "") == (response.status, reply["ErrorInfo"])
    if code is not None:
        after = registry.get_sample_value("relay_callback_rejections_total", {"reason": code})
        assert 1 == (after or 0) - (before or 0)
        refusals = [e for e in logs if e["event"] in ("relay.callback_rejected", "relay.callback_partially_rejected")]
        assert 1 == len(refusals)
    follow_up = await client.post(query(), data=c2c())
    assert 200 == follow_up.status


async def test_chunked_body_without_length_is_capped(client: TestClient) -> None:  # type: ignore[type-arg]
    """A chunked upload with no Content-Length is refused with 413 once it passes the limit."""

    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 8192

    response = await client.post(query(), data=chunks())
    assert (413, "body_too_large") == (response.status, (await response.json())["ErrorInfo"])


async def test_wrong_content_type_is_still_parsed(client: TestClient) -> None:  # type: ignore[type-arg]
    """Tencent does not document its Content-Type, so the body is parsed as JSON whatever the header says."""
    response = await client.post(query(), data=c2c(), headers={"Content-Type": "text/plain"})
    assert 200 == response.status


async def test_no_secret_reaches_logs_metrics_or_replies(client: TestClient) -> None:  # type: ignore[type-arg]
    """Tokens and Sign values never appear in log events, the /metrics text or any reply body."""
    good_sign = sign(TOKEN, str(T))
    with capture_logs() as logs:
        replies = [
            await (await client.post(query(), data=c2c())).text(),
            await (await client.post(query(sign_value="0" * 64), data=GOOD)).text(),
            await (await client.post(query(token=OLD_TOKEN), data=b"{")).text(),
            await (await client.post(query(rt=str(T - 600)), data=GOOD)).text(),
        ]
    metrics = await (await client.get("/metrics")).text()
    readiness = await (await client.get("/readyz")).text()
    haystack = repr(logs) + metrics + readiness + "".join(replies)
    for secret in (TOKEN, OLD_TOKEN, good_sign, sign(OLD_TOKEN, str(T))):
        assert secret not in haystack


async def test_compressed_body_is_refused_not_inflated(client: TestClient) -> None:  # type: ignore[type-arg]
    """A gzip body (or one merely labelled so) gets 415 unsupported_encoding, counted and logged once."""
    registry: CollectorRegistry = client.registry  # type: ignore[attr-defined]
    with capture_logs() as logs:
        for data in (gzip.compress(c2c()), c2c()):
            response = await client.post(query(), data=data, headers={"Content-Encoding": "gzip"})
            assert (415, "unsupported_encoding") == (response.status, (await response.json())["ErrorInfo"])
    assert 2 == registry.get_sample_value("relay_callback_rejections_total", {"reason": "unsupported_encoding"})
    assert 2 == len([e for e in logs if e["event"] == "relay.callback_rejected"])
    identity = await client.post(query(), data=c2c(), headers={"Content-Encoding": "identity"})
    assert 200 == identity.status


async def test_an_unexpected_exception_is_a_400_not_a_500(
    client: TestClient,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever raises on the callback path becomes 400 unprocessable: logged with its traceback,
    counted as a rejection and as an internal error, and the connection is closed."""
    registry: CollectorRegistry = client.registry  # type: ignore[attr-defined]

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("relay.tencent.ingress.normalize", broken)
    with capture_logs() as logs:
        response = await client.post(query(), data=c2c())
        reply = await response.json()
    assert (400, "unprocessable", "close") == (response.status, reply["ErrorInfo"], response.headers["Connection"])
    (event,) = [e for e in logs if e["event"] == "relay.callback_rejected"]
    assert ("error", "unprocessable", "RuntimeError('a bug')") == (event["log_level"], event["code"], event["detail"])
    assert isinstance(event["exc_info"], RuntimeError)
    assert 1 == registry.get_sample_value("relay_callback_rejections_total", {"reason": "unprocessable"})
    assert 1 == registry.get_sample_value("relay_internal_errors_total", {"route": "callback"})


async def test_an_unexpected_exception_elsewhere_is_a_logged_json_500(
    client: TestClient,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off the callback path an internal bug may still be a 500, but a JSON one, logged and counted."""
    registry: CollectorRegistry = client.registry  # type: ignore[attr-defined]

    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("relay.app.readiness", broken)
    with capture_logs() as logs:
        response = await client.get("/readyz")
        body = await response.json()
    assert (500, {"error": "internal_error"}) == (response.status, body)
    assert ["/readyz"] == [e["route"] for e in logs if e["event"] == "relay.internal_error"]
    assert 1 == registry.get_sample_value("relay_internal_errors_total", {"route": "/readyz"})
