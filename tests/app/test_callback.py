"""The real aiohttp app through an in-process client, with a recording publisher in place of RabbitMQ."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.app import LIFECYCLE, SPOOL, create_app
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import callback_query, sample_body
from tests.helpers import APP, NOW, OTHER_APP, TOKEN, RecordingPublisher, make_settings, validate_event

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
OK = {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}


def fail(code: str) -> dict[str, Any]:
    return {"ActionStatus": "FAIL", "ErrorCode": 1, "ErrorInfo": code}


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, publisher: RecordingPublisher, registry: CollectorRegistry, tmp_path: Path
) -> TestClient:  # type: ignore[type-arg]
    app = create_app(make_settings(tmp_path), publisher=publisher, registry=registry, clock=lambda: NOW)
    return await aiohttp_client(app)


def url(command: str, token: str | None = TOKEN, app: str = APP, **kw: Any) -> str:
    return f"/tencent-im/callback?{callback_query(command, app, token, request_time=int(NOW), **kw)}"


async def post(client: TestClient, target: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:  # type: ignore[type-arg]
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.post(target, data=data)
    return response.status, await response.json()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_signed_c2c_recall_is_published_and_answered_ok(
    client: TestClient,
    publisher: RecordingPublisher,  # type: ignore[type-arg]
    registry: CollectorRegistry,
) -> None:
    """A signed recall gets Tencent's OK envelope only after its event was published."""
    status, reply = await post(client, url(C2C_RECALL), sample_body("c2c"))
    assert (200, OK) == (status, reply)
    (envelope,) = publisher.published
    assert "message.revoked.c2c" == envelope.routing_key
    validate_event(orjson.loads(envelope.body))
    assert 1 == metric(registry, "relay_callbacks_total", command=C2C_RECALL, outcome="accepted")
    assert 1 == metric(registry, "relay_events_published_total", conversation_type="c2c")


async def test_group_callback_publishes_every_item(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """A group recall listing three messages publishes three events before answering."""
    status, _ = await post(client, url(GROUP_RECALL), sample_body("group", items=3))
    assert 200 == status
    assert 3 == len({e.event_id for e in publisher.published})


async def test_unsigned_recall_for_app_with_token_is_401(
    client: TestClient,
    publisher: RecordingPublisher,  # type: ignore[type-arg]
    registry: CollectorRegistry,
) -> None:
    """No Sign for an app that has a token: 401 missing_signature, nothing published, one log event."""
    with capture_logs() as logs:
        status, reply = await post(client, url(C2C_RECALL, token=None), sample_body("c2c"))
    assert (401, fail("missing_signature")) == (status, reply)
    assert [] == publisher.published
    assert 1 == metric(registry, "relay_callback_rejections_total", reason="missing_signature")
    assert ["relay.callback_rejected"] == [e["event"] for e in logs]


async def test_stale_request_time_is_401(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """A correctly signed but 2-minute-old request is refused as stale."""
    target = f"/tencent-im/callback?{callback_query(C2C_RECALL, APP, TOKEN, request_time=int(NOW) - 120)}"
    status, reply = await post(client, target, sample_body("c2c"))
    assert (401, fail("stale_request")) == (status, reply)
    assert [] == publisher.published


async def test_unknown_app_is_403(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """A callback for an SdkAppid the relay does not serve is refused with 403."""
    status, reply = await post(client, url(C2C_RECALL, app="1999999999", token=None), sample_body("c2c"))
    assert (403, fail("app_not_allowed")) == (status, reply)
    assert [] == publisher.published


async def test_app_without_token_is_accepted_unsigned(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """An app listed in RELAY_SDKAPPIDS without a token needs no Sign."""
    status, _ = await post(client, url(C2C_RECALL, app=OTHER_APP, token=None), sample_body("c2c"))
    assert 200 == status
    assert OTHER_APP == orjson.loads(publisher.published[0].body)["sdkAppID"]


async def test_query_parameter_names_are_case_insensitive(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """Lower-case parameter names (as Tencent's REST side spells them) work the same."""
    target = url(C2C_RECALL).replace("SdkAppid", "sdkappid").replace("CallbackCommand", "callbackcommand")
    status, _ = await post(client, target, sample_body("c2c"))
    assert 200 == status and 1 == len(publisher.published)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(b"{", 400, "invalid_json", id="invalid-json"),
        pytest.param(b"[]", 400, "not_an_object", id="array"),
        pytest.param(
            {"CallbackCommand": C2C_RECALL, "From_Account": "a", "To_Account": "b"},
            400,
            "missing_field",
            id="missing-msgkey",
        ),
        pytest.param(
            {**sample_body("group"), "CallbackCommand": GROUP_RECALL}, 400, "command_mismatch", id="command-mismatch"
        ),
    ],
)
async def test_bad_bodies_are_400(
    client: TestClient,
    publisher: RecordingPublisher,
    body: Any,
    status: int,  # type: ignore[type-arg]
    code: str,
) -> None:
    """Unusable bodies get 400 with a stable code and publish nothing."""
    assert (status, fail(code)) == await post(client, url(C2C_RECALL), body)
    assert [] == publisher.published


async def test_body_over_limit_is_413(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """A body larger than RELAY_MAX_BODY_BYTES is refused with 413 before parsing."""
    body = {**sample_body("c2c"), "pad": "x" * 70000}
    assert (413, fail("body_too_large")) == await post(client, url(C2C_RECALL), body)
    assert [] == publisher.published


async def test_chunked_body_over_limit_is_413(client: TestClient) -> None:  # type: ignore[type-arg]
    """A chunked body with no Content-Length is cut off at the limit too."""

    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 8192

    response = await client.post(url(C2C_RECALL), data=chunks())
    assert 413 == response.status


async def test_partial_group_publishes_valid_items_and_reports(
    client: TestClient,
    publisher: RecordingPublisher,  # type: ignore[type-arg]
    registry: CollectorRegistry,
) -> None:
    """A bad item beside good ones: the good ones are published, the reply names the problem."""
    body = {**sample_body("group"), "MsgSeqList": [{"MsgSeq": 1}, {"MsgSeq": "x"}, {"MsgSeq": 3}]}
    assert (400, fail("invalid_field")) == await post(client, url(GROUP_RECALL), body)
    assert [1, 3] == [orjson.loads(e.body)["msgSeq"] for e in publisher.published]
    assert 1 == metric(registry, "relay_callbacks_total", command=GROUP_RECALL, outcome="partial")


async def test_non_recall_command_is_answered_ok_and_counted(
    client: TestClient,
    publisher: RecordingPublisher,  # type: ignore[type-arg]
    registry: CollectorRegistry,
) -> None:
    """Other commands on the same URL get OK at once, are not published, and are counted."""
    target = url("State.StateChange")
    assert (200, OK) == await post(client, target, b'{"CallbackCommand":"State.StateChange"}')
    assert (200, OK) == await post(client, url("Some.FutureCommand"), b"{}")
    assert [] == publisher.published
    assert 1 == metric(registry, "relay_callbacks_total", command="State.StateChange", outcome="ignored")
    assert 1 == metric(registry, "relay_callbacks_total", command="other", outcome="ignored")


async def test_before_send_callback_is_never_blocked(client: TestClient) -> None:  # type: ignore[type-arg]
    """A before-send callback gets OK even unsigned: the relay must never block message delivery."""
    status, reply = await post(client, url("C2C.CallbackBeforeSendMsg", token=None, app="1999"), b"garbage")
    assert (200, OK) == (status, reply)


async def test_command_taken_from_body_when_query_lacks_it(client: TestClient, publisher: RecordingPublisher) -> None:  # type: ignore[type-arg]
    """Without CallbackCommand in the query the body's command decides."""
    target = url(C2C_RECALL).replace(f"CallbackCommand={C2C_RECALL}", "")
    assert 200 == (await post(client, target, sample_body("c2c")))[0]
    assert 1 == len(publisher.published)


async def test_duplicate_sdkappid_is_400(client: TestClient) -> None:  # type: ignore[type-arg]
    """A repeated SdkAppid parameter is ambiguous and refused."""
    status, reply = await post(client, url(C2C_RECALL) + "&sdkappid=1999", sample_body("c2c"))
    assert (400, fail("duplicate_parameter")) == (status, reply)


async def test_publish_failure_spools_and_answers_200(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """When the broker does not confirm, the event is written to the spool and only then answered 200."""
    publisher.fail_with = "timeout"
    spool = client.app[SPOOL]  # type: ignore[index]
    with capture_logs() as logs:
        status, reply = await post(client, url(C2C_RECALL), sample_body("c2c"))
    assert (200, OK) == (status, reply)
    assert 1 == spool.events
    assert 1 == metric(registry, "relay_events_spooled_total")
    (failed,) = [e for e in logs if e["event"] == "relay.publish_failed"]
    assert (failed["log_level"], failed["reason"], failed["in_doubt"], failed["spooled"]) == (
        "warning",
        "timeout",
        True,
        1,
    )
    (accepted,) = [e for e in logs if e["event"] == "relay.callback_accepted"]
    assert 1 == accepted["spooled"]


async def test_callbacks_spooled_while_the_broker_is_down_log_at_debug(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """During an outage every callback is spooled; one warning each would flood the logs."""
    publisher.ready_flag = False
    with capture_logs() as logs:
        for _ in range(3):
            assert (await post(client, url(C2C_RECALL), sample_body("c2c")))[0] == 200
    failed = [e for e in logs if e["event"] == "relay.publish_failed"]
    assert [(e["log_level"], e["reason"], e["spooled"]) for e in failed] == [("debug", "disconnected", 1)] * 3
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


async def test_only_the_unconfirmed_item_is_spooled(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """Of a two-message recall, the confirmed event is not spooled again; the unconfirmed one is."""
    body = sample_body("group", items=2)
    ids = [e.event_id for e in normalize(orjson.dumps(body), CallbackQuery(sdk_app_id=APP), 0).events]
    publisher.fail_event_ids = {ids[1]}
    assert 200 == (await post(client, url(GROUP_RECALL), body))[0]
    assert [ids[0]] == [e.event_id for e in publisher.published]
    spooled = await client.app[SPOOL].oldest(10)  # type: ignore[index]
    assert [ids[1]] == [e.envelope.event_id for e in spooled]


async def test_spool_full_is_503_spool_full(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """Broker down and spool at its limit: 503 spool_full with Retry-After, and nothing is dropped silently."""
    publisher.ready_flag = False
    spool = client.app[SPOOL]  # type: ignore[index]
    spool.max_bytes = 1  # any event is now over the budget
    response = await client.post(url(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))
    assert (503, fail("spool_full")) == (response.status, await response.json())
    assert "1" == response.headers["Retry-After"]
    assert 0 == spool.events
    assert 1 == metric(registry, "relay_spool_write_failures_total", reason="full")
    assert 1 == metric(registry, "relay_callbacks_total", command=C2C_RECALL, outcome="unavailable")
    assert 503 == (await client.get("/readyz")).status


async def test_readiness_follows_broker_or_spool(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """/readyz is 200 while events can be made safe (broker or spool with room) and names the broker node
    in use; /healthz is always 200."""
    first = await client.get("/readyz")
    assert (200, "recording:5672") == (first.status, (await first.json())["endpoint"])
    publisher.ready_flag = False
    response = await client.get("/readyz")
    body = await response.json()
    assert 200 == response.status
    assert (False, True) == (body["broker"], body["spool"]["has_room"])
    client.app[SPOOL].max_bytes = 0  # type: ignore[index]
    assert 503 == (await client.get("/readyz")).status
    assert 200 == (await client.get("/healthz")).status


async def test_readiness_is_503_while_draining(client: TestClient) -> None:  # type: ignore[type-arg]
    """After SIGTERM (draining) readiness fails even with a healthy broker."""
    client.app[LIFECYCLE].draining = True  # type: ignore[union-attr]
    assert 503 == (await client.get("/readyz")).status


async def test_metrics_endpoint_exposes_relay_series(client: TestClient) -> None:  # type: ignore[type-arg]
    """/metrics serves the Prometheus text format with the relay's series present from the start."""
    response = await client.get("/metrics")
    text = await response.text()
    assert 200 == response.status
    assert response.headers["Content-Type"].startswith("text/plain")
    for name in (
        "relay_callbacks_total",
        "relay_events_published_total",
        "relay_publish_failures_total",
        "relay_publish_confirm_seconds_bucket",
        "relay_request_seconds_bucket",
        "relay_broker_connected",
    ):
        assert name in text


async def test_logs_never_contain_the_token_or_sign(client: TestClient) -> None:  # type: ignore[type-arg]
    """Neither the callback token nor the Sign value appears in any log event or reply."""
    target = url(C2C_RECALL)
    sign_value = target.split("Sign=")[1].split("&")[0]
    with capture_logs() as logs:
        await post(client, target, sample_body("c2c"))
        await post(client, target.replace(sign_value, "0" * 64), sample_body("c2c"))
        await post(client, target, b"{")
    text = repr(logs)
    assert TOKEN not in text and sign_value not in text
