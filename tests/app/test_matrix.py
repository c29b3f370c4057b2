"""The Matrix application-service endpoint in the real app (production HTTP front end), with a recording
publisher in place of RabbitMQ: tokens, transactions made safe before the 200, repeats, hostile bodies."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.app import SPOOL, create_app
from relay.matrix.normalize import MAX_EVENTS
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query, sample_body
from tests.helpers import APP, NOW, TOKEN, RecordingPublisher, make_settings, validate_event
from tests.unit.test_matrix_normalize import ROOM, message, redaction

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
HS_TOKEN = "hs-token-for-the-app-tests"
BEARER = {"Authorization": f"Bearer {HS_TOKEN}"}


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def make_client(
    aiohttp_client: ClientFactory, publisher: RecordingPublisher, registry: CollectorRegistry, tmp_path: Path
) -> Callable[..., Awaitable[TestClient]]:  # type: ignore[type-arg]
    async def make(**env: str) -> TestClient:  # type: ignore[type-arg]
        settings = make_settings(tmp_path, RELAY_MATRIX_HS_TOKEN=HS_TOKEN, **env)
        return await aiohttp_client(create_app(settings, publisher=publisher, registry=registry, clock=lambda: NOW))

    return make


@pytest.fixture
async def client(make_client: Callable[..., Awaitable[TestClient]]) -> TestClient:  # type: ignore[type-arg]
    return await make_client()


async def put(
    client: TestClient,  # type: ignore[type-arg]
    body: dict[str, Any] | bytes,
    txn: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/_matrix/app/v1/transactions/",
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.put(
        path + (txn or uuid.uuid4().hex), data=data, headers=BEARER if headers is None else headers
    )
    return response.status, await response.json()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def refused(code: str, errcode: str) -> dict[str, str]:
    return {"errcode": errcode, "error": code}


async def test_routes_exist_only_with_the_hs_token(
    aiohttp_client: ClientFactory, publisher: RecordingPublisher, tmp_path: Path
) -> None:
    """Without RELAY_MATRIX_HS_TOKEN there is no Matrix route: the callback port serves Tencent alone."""
    client = await aiohttp_client(create_app(make_settings(tmp_path), publisher=publisher))
    response = await client.put("/_matrix/app/v1/transactions/1", data=b'{"events": []}', headers=BEARER)
    assert 404 == response.status


async def test_a_redaction_is_published_before_the_200(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """A transaction with a message and its redaction by the sender is answered {} only once the
    event was published, enriched from the message in the same transaction."""
    status, reply = await put(client, {"events": [message(), redaction(sender="@bob:example.org", reason="typo")]})
    assert (200, {}) == (status, reply)
    (envelope,) = publisher.published
    event = orjson.loads(envelope.body)
    validate_event(event)
    assert ("matrix", "sender", "@bob:example.org", "typo", "hit") == (
        event["provider"],
        event["operator"]["role"],
        event["sender"],
        event["reason"],
        event["enrichment"],
    )
    assert ("message.revoked.group", f"matrix/{ROOM}") == (envelope.routing_key, envelope.source)
    assert 1 == metric(registry, "relay_matrix_transactions_total", outcome="accepted")
    assert (1, 1) == (
        metric(registry, "relay_matrix_events_total", kind="message"),
        metric(registry, "relay_matrix_events_total", kind="redaction"),
    )
    assert 1 == metric(registry, "relay_events_published_total", conversation_type="group")
    assert 1 == metric(registry, "relay_correlation_lookups_total", result="hit")


async def test_a_redaction_in_a_later_transaction_is_enriched_from_the_store(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """A moderator's redaction of a message recorded from an earlier transaction says group_admin."""
    assert 200 == (await put(client, {"events": [message("$early")]}))[0]
    assert 200 == (await put(client, {"events": [redaction("$early", sender="@mod:example.org")]}))[0]
    (envelope,) = publisher.published
    event = orjson.loads(envelope.body)
    assert ("group_admin", "@mod:example.org", "@bob:example.org", "hit", "2026-01-01T00:00:00.000Z") == (
        event["operator"]["role"],
        event["operator"]["userID"],
        event["sender"],
        event["enrichment"],
        event["sentAt"],
    )


async def test_without_enrichment_the_role_stays_unknown(
    make_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """With RELAY_ENRICHMENT=off nothing says whose message it was: role unknown, enrichment disabled."""
    client = await make_client(RELAY_ENRICHMENT="off")
    assert 200 == (await put(client, {"events": [message(), redaction(sender="@bob:example.org")]}))[0]
    event = orjson.loads(publisher.published[0].body)
    assert ("unknown", None, "disabled") == (event["operator"]["role"], event["sender"], event["enrichment"])


@pytest.mark.parametrize(
    ("path", "query", "headers"),
    [
        ("/_matrix/app/v1/transactions/", "", BEARER),
        ("/_matrix/app/v1/transactions/", "", {"Authorization": f"bearer {HS_TOKEN}"}),
        ("/_matrix/app/v1/transactions/", f"?access_token={HS_TOKEN}", {}),
        ("/transactions/", "", BEARER),
        ("/transactions/", f"?access_token={HS_TOKEN}", {}),
    ],
    ids=["v1-header", "v1-header-lowercase", "v1-query", "legacy-header", "legacy-query"],
)
async def test_the_token_is_accepted_in_the_header_or_the_query_on_both_paths(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    path: str,
    query: str,
    headers: dict[str, str],
) -> None:
    """``Authorization: Bearer`` and the legacy ``?access_token=`` both work, on the v1 and the legacy path."""
    txn = uuid.uuid4().hex
    assert (200, {}) == await put(client, {"events": [redaction()]}, txn + query, headers, path)
    assert 1 == len(publisher.published)


@pytest.mark.parametrize(
    ("headers", "query", "code"),
    [
        ({}, "", "missing_token"),
        ({"Authorization": "Basic abc"}, "", "missing_token"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "", "invalid_token"),
        ({}, "?access_token=wrong-token-0123456789", "invalid_token"),
        ({"Authorization": f"Bearer {HS_TOKEN}x"}, "", "invalid_token"),
        ({"Authorization": "Bearer wrong"}, f"?access_token={HS_TOKEN}", "invalid_token"),
    ],
    ids=["none", "basic", "wrong-header", "wrong-query", "longer", "wrong-header-right-query"],
)
async def test_a_wrong_or_missing_token_is_403_in_matrix_shape(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
    headers: dict[str, str],
    query: str,
    code: str,
) -> None:
    """403 {"errcode": "M_FORBIDDEN", "error": <code>}, counted and logged; nothing published, the
    token never logged."""
    with capture_logs() as logs:
        status, reply = await put(client, {"events": [redaction()]}, "1" + query, headers)
    assert (403, refused(code, "M_FORBIDDEN")) == (status, reply)
    assert [] == publisher.published
    assert 1 == metric(registry, "relay_matrix_rejections_total", reason=code)
    assert 1 == metric(registry, "relay_matrix_transactions_total", outcome="rejected")
    (logged,) = [e for e in logs if e["event"] == "relay.matrix_request_rejected"]
    assert (code, 403) == (logged["code"], logged["status"])
    assert HS_TOKEN not in repr(logs)


async def test_the_token_is_checked_before_the_body_is_read(client: TestClient) -> None:  # type: ignore[type-arg]
    """A caller without the token cannot make the relay read a body: a 1 GiB Content-Length gets 403, not 413."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"PUT /_matrix/app/v1/transactions/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 403")


async def test_a_repeated_txn_id_publishes_nothing_twice(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """The homeserver resending a transaction already answered 200 gets 200 again and nothing is published."""
    body = {"events": [redaction()]}
    assert (200, {}) == await put(client, body, "42")
    with capture_logs() as logs:
        assert (200, {}) == await put(client, body, "42")
    assert 1 == len(publisher.published)
    assert 1 == metric(registry, "relay_matrix_transactions_total", outcome="duplicate")
    assert ["42"] == [e["txn_id"] for e in logs if e["event"] == "relay.matrix_transaction_repeated"]


async def test_concurrent_copies_of_one_transaction_publish_once(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """A copy that arrives while the first is still being published waits for its outcome instead of
    publishing again."""
    publisher.delay = 0.2
    body = {"events": [redaction()]}
    replies = await asyncio.gather(put(client, body, "7"), put(client, body, "7"))
    assert [(200, {}), (200, {})] == replies
    assert 1 == len(publisher.published)


async def test_a_transaction_not_made_safe_is_refused_and_its_retry_publishes(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """Broker down and spool full: 503 spool_full (the homeserver retries), the transaction is not
    remembered, and its retry once the broker is back is published."""
    publisher.ready_flag = False
    spool = client.app[SPOOL]  # type: ignore[index]
    spool.max_bytes = 1
    body = {"events": [redaction()]}
    response = await client.put("/_matrix/app/v1/transactions/9", data=orjson.dumps(body), headers=BEARER)
    assert (503, refused("spool_full", "M_UNKNOWN"), "1") == (
        response.status,
        await response.json(),
        response.headers["Retry-After"],
    )
    assert 1 == metric(registry, "relay_matrix_transactions_total", outcome="unavailable")
    publisher.ready_flag = True
    assert (200, {}) == await put(client, body, "9")
    assert 1 == len(publisher.published)


async def test_publish_failures_are_spooled_and_answered_200(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """A redaction the broker does not confirm is spooled: safe, so 200."""
    publisher.fail_with = "timeout"
    assert (200, {}) == await put(client, {"events": [redaction()]})
    assert 1 == client.app[SPOOL].events  # type: ignore[index]


async def test_unusable_events_are_acknowledged_counted_and_logged(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """Bad events inside a readable transaction are skipped (a refusal would make the homeserver
    resend them forever); the good redaction beside them is published, and other types are counted."""
    events = ["junk", {**redaction(), "room_id": 5}, {"type": "m.room.member"}, redaction("$good")]
    with capture_logs() as logs:
        assert (200, {}) == await put(client, {"events": events})
    assert ["$good"] == [orjson.loads(e.body)["msgID"] for e in publisher.published]
    assert (2, 1, 1) == (
        metric(registry, "relay_matrix_events_total", kind="invalid"),
        metric(registry, "relay_matrix_events_total", kind="other"),
        metric(registry, "relay_matrix_events_total", kind="redaction"),
    )
    (skipped,) = [e for e in logs if e["event"] == "relay.matrix_events_skipped"]
    assert [(0, "not_an_object"), (1, "invalid_field")] == [(s["index"], s["code"]) for s in skipped["skipped"]]


@pytest.mark.parametrize(
    ("body", "status", "code", "errcode"),
    [
        (b"{", 400, "invalid_json", "M_NOT_JSON"),
        (b'{"events": [1e999999]}', 400, "invalid_json", "M_NOT_JSON"),
        (b"[" * 5000 + b"]" * 5000, 400, "invalid_json", "M_NOT_JSON"),
        (b'"events"', 400, "not_an_object", "M_BAD_JSON"),
        (b"{}", 400, "missing_field", "M_BAD_JSON"),
        (b'{"events": "all"}', 400, "invalid_field", "M_BAD_JSON"),
        (orjson.dumps({"events": [{}] * (MAX_EVENTS + 1)}), 413, "too_many_events", "M_TOO_LARGE"),
    ],
    ids=["truncated", "huge-number", "deep", "string", "no-events", "events-string", "thousands"],
)
async def test_hostile_transactions_get_a_clear_4xx(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
    body: bytes,
    status: int,
    code: str,
    errcode: str,
) -> None:
    """Malformed or oversized transactions get their status and stable code, a log event and a metric; never a 5xx."""
    with capture_logs() as logs:
        assert (status, refused(code, errcode)) == await put(client, body)
    assert [] == publisher.published
    assert 1 == metric(registry, "relay_matrix_rejections_total", reason=code)
    assert [code] == [e["code"] for e in logs if e["event"] == "relay.matrix_request_rejected"]


async def test_bodies_over_the_matrix_limit_are_413_and_under_it_are_read(
    make_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """RELAY_MATRIX_MAX_BODY_BYTES, not Tencent's 64 KiB, bounds a transaction: a 100 KiB one is read,
    one over the limit is refused whether it declares its length or is chunked."""
    client = await make_client(RELAY_MATRIX_MAX_BODY_BYTES="200000")
    padded = [{**redaction(f"$m{i}"), "unsigned": {"pad": "x" * 1000}} for i in range(100)]
    assert (200, {}) == await put(client, {"events": padded})
    assert 100 == len(publisher.published)
    too_big = orjson.dumps({"events": [{"pad": "x" * 300_000}]})
    assert (413, refused("body_too_large", "M_TOO_LARGE")) == await put(client, too_big)

    async def chunks() -> Any:
        for _ in range(30):
            yield b" " * 10_000

    response = await client.put("/_matrix/app/v1/transactions/chunked", data=chunks(), headers=BEARER)
    assert (413, refused("body_too_large", "M_TOO_LARGE")) == (response.status, await response.json())


@pytest.mark.parametrize("gzipped", [True, False], ids=["real-gzip", "gzip-label-on-plain-json"])
async def test_an_encoded_body_is_415_and_never_inflated(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    gzipped: bool,
) -> None:
    """A Content-Encoding other than identity is refused with 415, whatever the body holds."""
    plain = orjson.dumps({"events": [redaction("$gz")]})
    body = gzip.compress(plain) if gzipped else plain
    headers = {**BEARER, "Content-Encoding": "gzip"}
    response = await client.put("/_matrix/app/v1/transactions/gz", data=body, headers=headers)
    assert (415, refused("unsupported_encoding", "M_UNKNOWN")) == (response.status, await response.json())
    assert [] == publisher.published


async def test_a_transaction_of_a_thousand_redactions_is_published(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """MAX_EVENTS redactions in one transaction (ten times Synapse's batch) are all made safe before the 200."""
    assert (200, {}) == await put(client, {"events": [redaction(f"$m{i}") for i in range(MAX_EVENTS)]})
    assert MAX_EVENTS == len({e.event_id for e in publisher.published})


async def test_an_overlong_txn_id_is_400(client: TestClient) -> None:  # type: ignore[type-arg]
    """A txnId longer than 255 characters is not one a homeserver makes: 400 M_INVALID_PARAM."""
    assert (400, refused("invalid_txn_id", "M_INVALID_PARAM")) == await put(client, {"events": []}, "9" * 256)


async def test_ping_answers_the_homeserver_with_the_token_only(client: TestClient) -> None:  # type: ignore[type-arg]
    """POST /_matrix/app/v1/ping is {} with the token and 403 without."""
    ok = await client.post("/_matrix/app/v1/ping", json={"transaction_id": "x"}, headers=BEARER)
    assert (200, {}) == (ok.status, await ok.json())
    denied = await client.post("/_matrix/app/v1/ping", json={})
    assert (403, refused("missing_token", "M_FORBIDDEN")) == (denied.status, await denied.json())


async def test_tencent_callbacks_are_unchanged_beside_matrix(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
) -> None:
    """With Matrix enabled, a Tencent recall is still answered in Tencent's envelope and its event says tencent."""
    target = f"/tencent-im/callback?{callback_query(C2C_RECALL, APP, TOKEN, request_time=int(NOW))}"
    response = await client.post(target, data=orjson.dumps(sample_body("c2c")))
    assert (200, {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}) == (response.status, await response.json())
    event = orjson.loads(publisher.published[0].body)
    assert ("tencent", APP) == (event["provider"], event["sdkAppID"])
    assert publisher.published[0].source == f"tencent-im/{APP}"


async def test_11_a_reused_txn_id_with_other_events_is_handled_warned_and_counted(
    client: TestClient,  # type: ignore[type-arg]
    publisher: RecordingPublisher,
    registry: CollectorRegistry,
) -> None:
    """The same txnId with different events (a homeserver whose counter went back) is not dropped as a
    retry: its redaction is published, a warning names the txnId, and the reuse is counted."""
    assert (200, {}) == await put(client, {"events": [redaction("$first")]}, "7")
    with capture_logs() as logs:
        assert (200, {}) == await put(client, {"events": [redaction("$second")]}, "7")
    assert 2 == len({e.event_id for e in publisher.published})
    assert 1 == metric(registry, "relay_matrix_txn_reused_total")
    assert [("7", "warning")] == [
        (e["txn_id"], e["log_level"]) for e in logs if e["event"] == "relay.matrix_txn_reused"
    ]
