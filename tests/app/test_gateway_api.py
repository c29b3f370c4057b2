"""POST /v1/recalls through the real apps (API and callback) with a recording publisher and a
scripted stand-in for Tencent's REST API (the simulator tier is tests/broker/test_gateway.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.app import API, GATEWAY, SPOOL, create_app
from relay.cli import main
from relay.gateway.outcomes import Outcome
from relay.gateway.tencent_api import TencentUnreachable
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL
from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND
from tests.helpers import APP, NOW, OTHER_APP, TOKEN, RecordingPublisher, make_settings, validate_event

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
API_TOKEN = "tok-moderation-0123456789"
SECRET = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
GATEWAY_ENV = {
    "RELAY_API_TOKENS": f"moderation-svc={API_TOKEN},other-svc=tok-other-0123456789ab",
    "RELAY_TENCENT_SECRET_KEYS": f"{APP}={SECRET}",
}


class FakeTencent:
    """Answers like Tencent, from a script: per-message outcomes, or the API being unreachable."""

    longest_call = 30.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.outcomes: dict[object, Outcome] = {}
        self.unreachable: str | None = None  # "unreachable" | "timeout"
        self.delay = 0.0

    def has_key(self, app: str) -> bool:
        return app == APP

    def _outcome(self, key: object) -> Outcome:
        return self.outcomes.get(key, Outcome("recalled", 0, ""))

    async def _enter(self, api: str, *args: Any) -> None:
        self.calls.append((api, args))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.unreachable is not None:
            raise TencentUnreachable(self.unreachable, "scripted", attempts=4)  # type: ignore[arg-type]

    async def recall_c2c(self, app: str, sender: str, receiver: str, msg_key: str) -> Outcome:
        await self._enter("c2c", app, sender, receiver, msg_key)
        return self._outcome(msg_key)

    async def recall_group(
        self, app: str, group_id: str, topic_id: str | None, seqs: Sequence[int], reason: str
    ) -> list[Outcome]:
        await self._enter("group", app, group_id, topic_id, tuple(seqs), reason)
        return [self._outcome(seq) for seq in seqs]

    async def recall_official_account(
        self, app: str, account: str, msg_keys: Sequence[str], reason: str
    ) -> list[Outcome]:
        await self._enter("official_account", app, account, tuple(msg_keys), reason)
        return [self._outcome(key) for key in msg_keys]


class Gateway:
    def __init__(
        self,
        relay: TestClient,
        api: TestClient,
        tencent: FakeTencent,
        publisher: RecordingPublisher,
        registry: CollectorRegistry,
    ) -> None:  # type: ignore[type-arg]
        self.relay = relay
        self.api = api
        self.tencent = tencent
        self.publisher = publisher
        self.registry = registry

    async def recall(self, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        response = await self.api.post("/v1/recalls", data=data, headers=AUTH if headers is None else headers)
        return response.status, await response.json(), response.headers

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [orjson.loads(e.body) for e in self.publisher.published if e.type == kind]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def gw(aiohttp_client: ClientFactory, tmp_path: Path) -> Gateway:
    publisher = RecordingPublisher()
    registry = CollectorRegistry()
    app = create_app(make_settings(tmp_path, **GATEWAY_ENV), publisher=publisher, registry=registry, clock=lambda: NOW)
    tencent = FakeTencent()
    app[GATEWAY].recaller = tencent
    relay = await aiohttp_client(app)  # starts the shared resources (store, spool, publisher)
    api = await aiohttp_client(app[API])
    return Gateway(relay, api, tencent, publisher, registry)


def request(
    conversation: dict[str, Any] | None = None, messages: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "requestID": "ticket-4711",
        "sdkAppID": APP,
        "conversation": conversation or {"type": "group", "groupID": "@TGS#1", "topicID": "@TGS#1@TOPIC#x"},
        "messages": messages or [{"msgSeq": 101}, {"msgSeq": 102}],
        "reason": "spam link",
        "moderator": {"userID": "mod_7"},
        **extra,
    }


async def test_a_group_recall_is_batched_by_ten_and_answered_in_order(gw: Gateway) -> None:
    """12 messages make two Tencent calls (10 + 2); the results keep the request's order."""
    seqs = list(range(200, 212))
    gw.tencent.outcomes[205] = Outcome("already_recalled", 20023, "")
    status, body, _ = await gw.recall(request(messages=[{"msgSeq": s} for s in seqs]))
    assert 200 == status
    assert [("group", 10), ("group", 2)] == [(api, len(args[3])) for api, args in gw.tencent.calls]
    assert seqs == [r["msgSeq"] for r in body["results"]]
    assert ["recalled"] * 5 + ["already_recalled"] + ["recalled"] * 6 == [r["status"] for r in body["results"]]
    assert "ticket-4711" == body["requestID"]
    assert 12 == len(gw.events("message.recall_requested"))
    assert [] == gw.events("message.recall_failed")


async def test_a_c2c_recall_calls_once_per_message_without_a_reason(gw: Gateway) -> None:
    """C2C: one admin_msgwithdraw per message; the audit event says no reason went to Tencent."""
    conversation = {"type": "c2c", "sender": "u_a", "receiver": "u_b"}
    status, _, _ = await gw.recall(request(conversation, [{"msgKey": "k1"}, {"msgKey": "k2"}]))
    assert 200 == status
    assert [("c2c", (APP, "u_a", "u_b", "k1")), ("c2c", (APP, "u_a", "u_b", "k2"))] == sorted(gw.tencent.calls)
    (first, _) = gw.events("message.recall_requested")
    assert (None, "spam link") == (first["tencentReason"], first["reason"])


async def test_the_reason_sent_to_tencent_is_cut_to_100_bytes(gw: Gateway) -> None:
    """Group and official-account calls get at most 100 bytes of the reason; events keep all of it."""
    reason = "广告" * 60  # 360 bytes of UTF-8
    status, _, _ = await gw.recall({**request(), "reason": reason})
    assert 200 == status
    sent = gw.tencent.calls[0][1][4]
    assert len(sent.encode()) <= 100
    assert reason.startswith(sent)
    assert reason == gw.events("message.recall_requested")[0]["reason"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({}, "none", id="no-header"),
        pytest.param({"Authorization": "Bearer wrong-token-0123456789"}, "wrong", id="wrong-token"),
        pytest.param({"Authorization": f"Basic {API_TOKEN}"}, "scheme", id="wrong-scheme"),
        pytest.param({"Authorization": f"Bearer {TOKEN}"}, "callback-token", id="callback-token"),
    ],
)
async def test_without_a_valid_token_the_answer_is_401(gw: Gateway, headers: dict[str, str], reason: str) -> None:
    """No token, a wrong one or another scheme: 401 unauthorized, Tencent never called."""
    status, body, response_headers = await gw.recall(request(), headers=headers)
    assert (401, "unauthorized") == (status, body["error"]["code"])
    assert "Bearer" in response_headers["WWW-Authenticate"]
    assert [] == gw.tencent.calls
    assert 1 == gw.metric("relay_recall_requests_total", via="api", outcome="unauthorized")


async def test_field_errors_are_400_with_every_field_named(gw: Gateway) -> None:
    """A bad body is 400 invalid_request listing each bad field; nothing is published or called."""
    with capture_logs() as logs:
        status, body, _ = await gw.recall({**request(), "reason": "", "messages": [{"msgKey": "k"}]})
    assert (400, "invalid_request") == (status, body["error"]["code"])
    assert {"reason", "messages[0].msgKey"} == {f["field"] for f in body["error"]["fields"]}
    assert ([], []) == (gw.tencent.calls, gw.publisher.published)
    assert any(e["event"] == "relay.recall_rejected" and e["code"] == "invalid_request" for e in logs)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"\xff"])
async def test_a_body_that_is_not_a_json_object_is_400_invalid_json(gw: Gateway, raw: bytes) -> None:
    """Not JSON, or not an object: 400 invalid_json."""
    status, body, _ = await gw.recall(raw)
    assert (400, "invalid_json") == (status, body["error"]["code"])


async def test_an_app_without_a_secret_key_is_403(gw: Gateway) -> None:
    """An accepted app with no RELAY_TENCENT_SECRET_KEYS entry cannot be recalled in: 403, with the
    same code and message as an app the relay does not know at all (the answer lists no apps)."""
    status, body, _ = await gw.recall({**request(), "sdkAppID": OTHER_APP})
    assert (403, "app_not_allowed") == (status, body["error"]["code"])
    unknown = await gw.recall({**request(), "sdkAppID": "1400009999"})
    assert (status, body) == (unknown[0], unknown[1])


async def test_the_same_request_again_returns_the_first_answer_without_calling_tencent(gw: Gateway) -> None:
    """Idempotency: the repeated requestID gets the stored answer, marked Idempotent-Replayed."""
    first = await gw.recall(request())
    second = await gw.recall(request())
    assert (200, 200) == (first[0], second[0])
    assert first[1] == second[1]
    assert "true" == second[2]["Idempotent-Replayed"]
    assert 1 == len(gw.tencent.calls)
    assert 2 == len(gw.events("message.recall_requested"))  # only the first request published
    assert 1 == gw.metric("relay_recall_requests_total", via="api", outcome="replayed")


async def test_request_ids_belong_to_their_caller(gw: Gateway) -> None:
    """Another service using the same requestID is a different request."""
    await gw.recall(request())
    status, _, headers = await gw.recall(request(), headers={"Authorization": "Bearer tok-other-0123456789ab"})
    assert 200 == status
    assert "Idempotent-Replayed" not in headers
    assert 2 == len(gw.tencent.calls)


async def test_a_reused_request_id_with_another_body_is_409(gw: Gateway) -> None:
    """The same requestID with different content is a conflict, not a replay."""
    await gw.recall(request())
    status, body, headers = await gw.recall({**request(), "reason": "something else"})
    assert (409, "request_id_conflict") == (status, body["error"]["code"])
    assert "Retry-After" not in headers  # retrying the same conflict cannot help
    assert 1 == len(gw.tencent.calls)


async def test_a_concurrent_duplicate_is_409_in_progress(gw: Gateway) -> None:
    """While a request is carried out, the same one again is 409 request_in_progress with Retry-After."""
    gw.tencent.delay = 0.3
    (a, b) = await asyncio.gather(gw.recall(request()), gw.recall(request()))
    assert [200, 409] == sorted([a[0], b[0]])
    loser = a if a[0] == 409 else b
    assert ("request_in_progress", "1") == (loser[1]["error"]["code"], loser[2]["Retry-After"])
    assert 1 == len(gw.tencent.calls)


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("unreachable", 502, "tencent_unreachable"), ("timeout", 504, "tencent_timeout"), ("busy", 503, "tencent_busy")],
)
async def test_tencent_out_of_reach_is_502_or_504_and_may_be_retried(
    gw: Gateway, kind: str, status: int, code: str
) -> None:
    """Tencent not reached after retries (or nothing sent: busy): 502/504/503 with results,
    recall_failed events, and the same requestID may be tried again (the failure is not kept)."""
    gw.tencent.unreachable = kind
    got, body, _ = await gw.recall(request())
    assert (status, code) == (got, body["error"]["code"])
    assert [("failed", -1), ("failed", -1)] == [(r["status"], r["tencentCode"]) for r in body["results"]]
    failed = gw.events("message.recall_failed")
    assert ["failed", "failed"] == [e["status"] for e in failed]
    gw.tencent.unreachable = None
    again, body, _ = await gw.recall(request())
    assert 200 == again
    assert ["recalled", "recalled"] == [r["status"] for r in body["results"]]


async def test_refused_messages_get_recall_failed_events(gw: Gateway) -> None:
    """not_found and rejected messages: 200 with their status and code, one recall_failed each."""
    gw.tencent.outcomes[101] = Outcome("not_found", 10030, "msg not found")
    gw.tencent.outcomes[102] = Outcome("rejected", 10007, "no permission")
    status, body, _ = await gw.recall(request())
    assert 200 == status
    assert [("not_found", 10030), ("rejected", 10007)] == [(r["status"], r["tencentCode"]) for r in body["results"]]
    failed = gw.events("message.recall_failed")
    assert [(101, "not_found", 10030, "msg not found"), (102, "rejected", 10007, "no permission")] == [
        (e["msgSeq"], e["status"], e["tencentCode"], e["tencentInfo"]) for e in failed
    ]
    assert 1 == gw.metric("relay_recall_messages_total", status="rejected")


async def test_with_neither_broker_nor_spool_the_request_is_refused_before_tencent(gw: Gateway) -> None:
    """No audit trail, no recall: 503 spool_full and Tencent is not called."""
    gw.publisher.ready_flag = False
    gw.relay.app[SPOOL].max_bytes = 1  # type: ignore[index]
    status, body, _ = await gw.recall(request())
    assert (503, "spool_full") == (status, body["error"]["code"])
    assert [] == gw.tencent.calls


async def send_callback(gw: Gateway, body: dict[str, Any], command: str, platform: str = "Android") -> int:
    target = f"/tencent-im/callback?{callback_query(command, APP, TOKEN, request_time=int(NOW), platform=platform)}"
    response = await gw.relay.post(target, data=orjson.dumps(body))
    return response.status


async def test_a_message_named_by_msg_id_is_resolved_through_its_send_record(gw: Gateway) -> None:
    """A msgID from a send callback becomes the MsgKey Tencent needs; the answer echoes the msgID."""
    sent = {"CallbackCommand": C2C_SEND, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "9_9_9", "MsgId": "m-77"}
    assert 200 == await send_callback(gw, sent, C2C_SEND)
    conversation = {"type": "c2c", "sender": "u_a", "receiver": "u_b"}
    for _ in range(50):  # the embedded store is written by the send path at once; Redis would batch
        status, body, _ = await gw.recall(request(conversation, [{"msgID": "m-77"}]))
        if status == 200:
            break
        await asyncio.sleep(0.01)
    assert 200 == status
    assert [("c2c", (APP, "u_a", "u_b", "9_9_9"))] == gw.tencent.calls
    assert [{"msgID": "m-77", "status": "recalled", "tencentCode": 0}] == [
        {k: v for k, v in r.items() if k != "eventID"} for r in body["results"]
    ]


async def test_a_msg_id_without_a_send_record_or_of_another_conversation_is_400(gw: Gateway) -> None:
    """Unknown msgID: 400 not_found; a msgID of another conversation: 400 mismatch."""
    sent = {"CallbackCommand": C2C_SEND, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "9_9_9", "MsgId": "m-77"}
    assert 200 == await send_callback(gw, sent, C2C_SEND)
    conversation = {"type": "c2c", "sender": "u_a", "receiver": "u_x"}
    status, body, _ = await gw.recall(request(conversation, [{"msgID": "m-77"}, {"msgID": "m-none"}]))
    assert (400, "invalid_request") == (status, body["error"]["code"])
    assert [("messages[0].msgID", "mismatch"), ("messages[1].msgID", "not_found")] == [
        (f["field"], f["code"]) for f in body["error"]["fields"]
    ]
    assert [] == gw.tencent.calls


async def test_the_callback_joins_the_request(gw: Gateway) -> None:
    """Tencent's REST recall callback after a gateway request: the revocation carries the reason,
    the moderator and the request, and its eventID is the one the answer announced."""
    conversation = {"type": "c2c", "sender": "u_a", "receiver": "u_b"}
    status, body, _ = await gw.recall(request(conversation, [{"msgKey": "k1"}]))
    assert 200 == status
    callback = {"CallbackCommand": C2C_RECALL, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "k1"}
    assert 200 == await send_callback(gw, callback, C2C_RECALL, platform="RESTAPI")
    (revoked,) = gw.events("message.revoked")
    validate_event(revoked)
    operator = {"userID": "mod_7", "role": "moderator", "assertedBy": "moderation-svc", "verifiedBy": None}
    assert ("spam link", operator) == (revoked["reason"], revoked["operator"])
    assert ("ticket-4711", "moderation-svc") == (
        revoked["recallRequest"]["requestID"],
        revoked["recallRequest"]["requestedBy"],
    )
    assert body["results"][0]["eventID"] == revoked["eventID"]


async def test_a_group_client_recall_is_not_joined(gw: Gateway) -> None:
    """A member recalling the same message from a phone is not attributed to the moderator."""
    await gw.recall(request(messages=[{"msgSeq": 101}]))
    callback = {
        "CallbackCommand": GROUP_RECALL,
        "Operator_Account": "u_a",
        "GroupId": "@TGS#1",
        "TopicId": "@TGS#1@TOPIC#x",
        "MsgSeqList": [{"MsgSeq": 101}],
    }
    assert 200 == await send_callback(gw, callback, GROUP_RECALL, platform="iOS")
    (revoked,) = gw.events("message.revoked")
    assert (None, None) == (revoked["reason"], revoked["recallRequest"])


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/v1/recalls", 405, "method_not_allowed"), ("POST", "/v1/nothing", 404, "not_found")],
)
async def test_other_routes_answer_json_errors(gw: Gateway, method: str, path: str, status: int, code: str) -> None:
    """aiohttp's own refusals come back as JSON with a stable code."""
    response = await gw.api.request(method, path, headers=AUTH)
    assert (status, code) == (response.status, (await response.json())["error"]["code"])


async def test_a_body_over_the_limit_is_413(gw: Gateway) -> None:
    """A body over 256 KiB is refused with 413 body_too_large."""
    status, body, _ = await gw.recall(b"{" + b" " * (300 * 1024) + b"}")
    assert (413, "body_too_large") == (status, body["error"]["code"])


async def test_relay_recall_posts_what_its_flags_say(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """`relay recall` builds the request from its flags, posts it with the token, prints the answer."""
    url = str(gw.api.make_url("/v1/recalls"))
    env = {**GATEWAY_ENV, "RELAY_SDKAPPIDS": APP, "RELAY_CALLBACK_TOKENS": f"{APP}={TOKEN}"}
    argv = ["recall", "--url", url, "--group", "@TGS#9", "--topic", "T1", "--seq", "5", "--seq", "6"]
    argv += ["--reason", "spam", "--moderator", "mod_2", "--request-id", "cli-1"]
    assert 0 == await asyncio.to_thread(main, argv, env)
    assert [("group", (APP, "@TGS#9", "T1", (5, 6), "spam"))] == gw.tencent.calls
    out = capsys.readouterr().out
    assert "-> 200\n" in out
    assert '"requestID": "cli-1"' in out
    assert 0 == await asyncio.to_thread(main, argv, env)
    assert "-> 200 (replayed: the stored answer to this requestID; Tencent was not called again)" in (
        capsys.readouterr().out
    )
    c2c = ["recall", "--url", url, "--c2c", "u_a", "u_b", "--key", "k1", "--reason", "r", "--moderator", "m"]
    assert 0 == await asyncio.to_thread(main, c2c, env)
    assert ("c2c", (APP, "u_a", "u_b", "k1")) == gw.tencent.calls[-1]
    wrong = [*c2c, "--token", "not-the-token-at-all"]
    assert 1 == await asyncio.to_thread(main, wrong, env)
    assert "unauthorized" in capsys.readouterr().out


async def test_a_requests_records_share_hash_slots(gw: Gateway) -> None:
    """The lease/answer and the attribution of one request share a slot; so do its join records
    (issue 21: nothing one request changes together spans Redis Cluster slots)."""
    from redis.crc import key_slot

    from relay.store import GATEWAY_PREFIX

    assert 200 == (await gw.recall(request(messages=[{"msgSeq": n} for n in range(1, 6)])))[0]
    store = gw.relay.app[GATEWAY].store
    keys = list(store._gateway)
    slots: dict[str, set[int]] = {}
    for key in keys:
        slots.setdefault(key.partition(":")[0], set()).add(key_slot((GATEWAY_PREFIX + key).encode()))
    assert {"request", "attribution", "recall"} == set(slots)
    assert slots["request"] == slots["attribution"]
    assert 1 == len(slots["recall"])
