"""Trustworthy attribution (issue 19), through the real apps with a scripted Tencent: nobody can put
a name or a reason on a recall they did not make. Each numbered case of the issue is named."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.app import API, GATEWAY, KEYRING, SPOOL, create_app, reload_credentials
from relay.gateway.outcomes import Outcome
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL
from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND
from tests.app.test_gateway_api import API_TOKEN, SECRET, FakeTencent, Gateway, request
from tests.helpers import APP, NOW, TOKEN, RecordingPublisher, make_settings, recall_command, validate_event

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
ISSUER = "https://idp.example.com"
AUDIENCE = "revoke-relay"
SCOPED = "tok-scoped-0123456789abcdef"
STRICT = "tok-strict-0123456789abcdef"
OTHER_APP_WITH_KEY = "1400000003"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


KEYS_FILE = f"""
[[key]]
name = "scoped-svc"
sha256 = "{sha(SCOPED)}"
apps = ["{APP}"]
conversations = ["group"]
moderators = ["mod_*"]
rate = 2

[[key]]
name = "strict-svc"
sha256 = ["{sha(STRICT)}"]
apps = ["*"]
moderators = ["mod_*"]
require_verified_moderator = true
"""


class Idp:
    """An identity provider: an EC key, its JWKS, and ID tokens it signs."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**public, "kid": "idp-1", "alg": "ES256", "use": "sig"}]}

    def token(self, sub: str = "mod_7", *, expires_in: float = 300, **claims: Any) -> str:
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": int(time.time() + expires_in), **claims}
        return jwt.encode(body, self.key, algorithm="ES256", headers={"kid": "idp-1"})


@pytest.fixture
def idp() -> Idp:
    return Idp()


@pytest.fixture
def make_gw(aiohttp_client: ClientFactory, tmp_path: Path, idp: Idp) -> Callable[..., Awaitable[Gateway]]:
    async def make(**env: str) -> Gateway:
        keys = tmp_path / "keys.toml"
        keys.write_text(KEYS_FILE)
        jwks = tmp_path / "jwks.json"
        jwks.write_bytes(orjson.dumps(idp.jwks))
        publisher = RecordingPublisher()
        registry = CollectorRegistry()
        settings = make_settings(
            tmp_path / "spool",
            RELAY_CALLBACK_TOKENS=f"{APP}={TOKEN},{OTHER_APP_WITH_KEY}=tok-three-0123456789",
            RELAY_SDKAPPIDS=APP,
            RELAY_API_TOKENS=f"moderation-svc={API_TOKEN},amqp=tok-named-amqp-0123456789",
            RELAY_API_KEYS_FILE=str(keys),
            RELAY_TENCENT_SECRET_KEYS=f"{APP}={SECRET},{OTHER_APP_WITH_KEY}={SECRET}",
            RELAY_API_JWKS_FILE=str(jwks),
            RELAY_API_JWT_ISSUER=ISSUER,
            RELAY_API_JWT_AUDIENCE=AUDIENCE,
            **env,
        )
        app = create_app(settings, publisher=publisher, registry=registry, clock=lambda: NOW)
        tencent = FakeTencent()
        tencent.has_key = lambda app_id: app_id in (APP, OTHER_APP_WITH_KEY)  # type: ignore[method-assign]
        app[GATEWAY].recaller = tencent
        relay = await aiohttp_client(app)
        api = await aiohttp_client(app[API])
        return Gateway(relay, api, tencent, publisher, registry)

    return make


@pytest.fixture
async def gw(make_gw: Callable[..., Awaitable[Gateway]]) -> Gateway:
    return await make_gw()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def callback(gw: Gateway, body: dict[str, Any], platform: str | None) -> None:
    query = callback_query(str(body["CallbackCommand"]), APP, TOKEN, request_time=int(NOW), platform=platform)
    response = await gw.relay.post(f"/tencent-im/callback?{query}", data=orjson.dumps(body))
    assert 200 == response.status


def group_recall(seq: int, operator: str) -> dict[str, Any]:
    return {
        "CallbackCommand": GROUP_RECALL,
        "Operator_Account": operator,
        "GroupId": "@TGS#1",
        "MsgSeqList": [{"MsgSeq": seq}],
    }


def revoked(gw: Gateway) -> list[dict[str, Any]]:
    events = gw.events("message.revoked")
    for event in events:
        validate_event(event)
    return events


# -- 1. join records that cannot be borrowed -------------------------------------------------------


async def test_1_a_failed_request_does_not_attribute_a_later_recall_by_someone_else(gw: Gateway) -> None:
    """A request for seq 500 that Tencent answers not_found leaves no record: the owner's later recall
    (no OptPlatform), another admin's REST recall and even a REST recall as our admin keep their own
    operator, with no reason and no recallRequest."""
    gw.tencent.outcomes[500] = Outcome("not_found", 10030, "msg not found")
    status, body, _ = await gw.recall(request({"type": "group", "groupID": "@TGS#1"}, [{"msgSeq": 500}]))
    assert (200, "not_found") == (status, body["results"][0]["status"])
    await callback(gw, group_recall(500, "group_owner_bob"), None)
    await callback(gw, group_recall(500, "other_admin"), "RESTAPI")
    await callback(gw, group_recall(500, "administrator"), "RESTAPI")
    assert [
        ("group_owner_bob", None, None),
        ("other_admin", None, None),
        ("administrator", None, None),
    ] == [(e["operator"]["userID"], e["reason"], e["recallRequest"]) for e in revoked(gw)]


async def test_1_a_c2c_already_recalled_answer_claims_no_later_callback(gw: Gateway) -> None:
    """C2C 20023 (already recalled): no callback is expected, so the record is gone at once."""
    gw.tencent.outcomes["k1"] = Outcome("already_recalled", 20023, "")
    conversation = {"type": "c2c", "sender": "u_a", "receiver": "u_b"}
    assert 200 == (await gw.recall(request(conversation, [{"msgKey": "k1"}])))[0]
    c2c = {"CallbackCommand": C2C_RECALL, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "k1"}
    await callback(gw, c2c, "RESTAPI")
    (event,) = revoked(gw)
    assert (None, None, "app_admin") == (event["reason"], event["recallRequest"], event["operator"]["role"])


async def test_1_the_gateways_own_recall_is_joined_once_and_only_once(gw: Gateway) -> None:
    """The callback the gateway caused gets the reason and the moderator; a second copy does not."""
    assert 200 == (await gw.recall(request({"type": "group", "groupID": "@TGS#1"}, [{"msgSeq": 501}])))[0]
    await callback(gw, group_recall(501, "administrator"), "RESTAPI")
    await callback(gw, group_recall(501, "administrator"), "RESTAPI")
    first, second = revoked(gw)
    assert ("spam link", "mod_7", "moderation-svc") == (
        first["reason"],
        first["operator"]["userID"],
        first["operator"]["assertedBy"],
    )
    assert (None, None, "app_admin") == (second["reason"], second["recallRequest"], second["operator"]["role"])


async def test_1_a_message_another_request_is_recalling_is_409_and_takes_nothing(gw: Gateway) -> None:
    """Two callers race for one message: one goes ahead, the other gets 409 recall_pending, and the
    callback names the one that asked first."""
    gw.tencent.delay = 0.3
    conversation = {"type": "group", "groupID": "@TGS#1"}
    first = asyncio.create_task(gw.recall(request(conversation, [{"msgSeq": 502}])))
    await asyncio.sleep(0.1)
    status, body, headers = await gw.recall(
        {**request(conversation, [{"msgSeq": 502}]), "reason": "mine now"}, headers=bearer(SCOPED)
    )
    assert (409, "recall_pending", "1") == (status, body["error"]["code"], headers["Retry-After"])
    assert [{"field": "messages[0]", "code": "pending"}] == [
        {k: f[k] for k in ("field", "code")} for f in body["error"]["fields"]
    ]
    assert 200 == (await first)[0]
    await callback(gw, group_recall(502, "administrator"), "RESTAPI")
    (event,) = revoked(gw)
    assert ("spam link", "moderation-svc") == (event["reason"], event["recallRequest"]["requestedBy"])


async def test_1_a_finished_requests_record_does_not_block_another_request(gw: Gateway) -> None:
    """Once the first request is done (its callback still awaited), another caller may ask again:
    Tencent is called, and the callback still names the first request."""
    conversation = {"type": "group", "groupID": "@TGS#1"}
    assert 200 == (await gw.recall(request(conversation, [{"msgSeq": 503}])))[0]
    gw.tencent.outcomes[503] = Outcome("not_found", 10030, "already recalled")
    status, _, _ = await gw.recall(
        {**request(conversation, [{"msgSeq": 503}]), "reason": "late"}, headers=bearer(SCOPED)
    )
    assert 200 == status
    assert 2 == len(gw.tencent.calls)
    await callback(gw, group_recall(503, "administrator"), "RESTAPI")
    (event,) = revoked(gw)
    assert ("spam link", "moderation-svc") == (event["reason"], event["recallRequest"]["requestedBy"])


# -- 2. scoped keys, and a moderator that is asserted or verified --------------------------------------


async def test_2_an_app_outside_the_key_gets_the_answer_an_unknown_app_gets(gw: Gateway) -> None:
    """403 app_not_allowed, the same body for an app the relay serves (outside the key) and one it
    does not know: nothing tells which apps exist."""
    outside = await gw.recall({**request(), "sdkAppID": OTHER_APP_WITH_KEY}, headers=bearer(SCOPED))
    unknown = await gw.recall({**request(), "sdkAppID": "1400009999"}, headers=bearer(SCOPED))
    assert (403, "app_not_allowed") == (outside[0], outside[1]["error"]["code"])
    assert (outside[0], outside[1]) == (unknown[0], unknown[1])
    assert [] == gw.tencent.calls


async def test_2_a_conversation_type_outside_the_key_is_403(gw: Gateway) -> None:
    """The scoped key may recall in groups only: a C2C request is refused before Tencent."""
    conversation = {"type": "c2c", "sender": "u_a", "receiver": "u_b"}
    status, body, _ = await gw.recall(request(conversation, [{"msgKey": "k"}]), headers=bearer(SCOPED))
    assert (403, "conversation_not_allowed") == (status, body["error"]["code"])
    assert [] == gw.tencent.calls


async def test_2_a_moderator_outside_the_keys_patterns_is_403(gw: Gateway) -> None:
    """mod_* may be named; admin may not."""
    status, body, _ = await gw.recall({**request(), "moderator": {"userID": "admin"}}, headers=bearer(SCOPED))
    assert (403, "moderator_not_allowed") == (status, body["error"]["code"])
    assert 200 == (await gw.recall(request(), headers=bearer(SCOPED)))[0]


async def test_2_a_key_over_its_rate_is_429_with_retry_after(gw: Gateway) -> None:
    """rate = 2: a burst of four gets two answers and two 429 rate_limited with Retry-After."""
    answers = [await gw.recall({**request(), "requestID": f"r{i}"}, headers=bearer(SCOPED)) for i in range(4)]
    assert [200, 200, 429, 429] == [a[0] for a in answers]
    assert ("rate_limited", "1") == (answers[2][1]["error"]["code"], answers[2][2]["Retry-After"])


async def test_2_an_asserted_moderator_says_which_key_asserted_it(gw: Gateway) -> None:
    """Without a token the audit event and the joined revocation name the key: assertedBy."""
    assert (
        200
        == (await gw.recall(request({"type": "group", "groupID": "@TGS#1"}, [{"msgSeq": 7}]), headers=bearer(SCOPED)))[
            0
        ]
    )
    await callback(gw, group_recall(7, "administrator"), "RESTAPI")
    (audit,) = gw.events("message.recall_requested")
    assert {"userID": "mod_7", "assertedBy": "scoped-svc", "verifiedBy": None} == audit["moderator"]
    (event,) = revoked(gw)
    assert ("scoped-svc", None) == (event["operator"]["assertedBy"], event["operator"]["verifiedBy"])


async def test_2_a_verified_moderator_comes_from_the_token_and_says_who_verified_it(gw: Gateway, idp: Idp) -> None:
    """A valid ID token alone names the moderator: verifiedBy is the issuer, in the audit event and
    in the joined revocation."""
    body = {**request({"type": "group", "groupID": "@TGS#1"}, [{"msgSeq": 8}]), "moderator": {"token": idp.token()}}
    assert 200 == (await gw.recall(body, headers=bearer(STRICT)))[0]
    await callback(gw, group_recall(8, "administrator"), "RESTAPI")
    (audit,) = gw.events("message.recall_requested")
    assert {"userID": "mod_7", "assertedBy": None, "verifiedBy": ISSUER} == audit["moderator"]
    (event,) = revoked(gw)
    assert {"userID": "mod_7", "role": "moderator", "assertedBy": None, "verifiedBy": ISSUER} == event["operator"]


def forged(idp: Idp) -> dict[str, str]:
    """Tokens that must not pass: expired, another issuer or audience, unsigned, an HMAC made with
    the public key as its secret (the classic algorithm confusion), another key."""
    public = orjson.dumps(idp.jwks["keys"][0])
    return {
        "expired": idp.token(expires_in=-120),
        "issuer": idp.token(iss="https://evil.example.com"),
        "audience": idp.token(aud="someone-else"),
        "none": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "mod_7", "exp": int(time.time()) + 60}, None, algorithm="none"
        ),
        "hmac": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "mod_7", "exp": int(time.time()) + 60},
            hashlib.sha256(public).digest(),
            algorithm="HS256",
            headers={"kid": "idp-1"},
        ),
        "other-key": Idp().token(),
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize("kind", ["expired", "issuer", "audience", "none", "hmac", "other-key", "garbage"])
async def test_2_a_bad_moderator_token_is_401(gw: Gateway, idp: Idp, kind: str) -> None:
    """Every forged or stale token is 401 moderator_token_invalid, and Tencent is not called."""
    body = {**request(), "moderator": {"token": forged(idp)[kind]}}
    status, answer, _ = await gw.recall(body, headers=bearer(STRICT))
    assert (401, "moderator_token_invalid") == (status, answer["error"]["code"])
    assert [] == gw.tencent.calls


async def test_2_a_user_id_beside_a_token_must_be_the_tokens(gw: Gateway, idp: Idp) -> None:
    """userID and token naming different people: 400, field moderator.userID mismatch."""
    body = {**request(), "moderator": {"userID": "mod_8", "token": idp.token("mod_7")}}
    status, answer, _ = await gw.recall(body, headers=bearer(STRICT))
    assert (400, [("moderator.userID", "mismatch")]) == (
        status,
        [(f["field"], f["code"]) for f in answer["error"]["fields"]],
    )


async def test_2_a_verified_moderator_outside_the_keys_patterns_is_403(gw: Gateway, idp: Idp) -> None:
    """A genuine token for someone the key may not name: 403 moderator_not_allowed."""
    body = {**request(), "moderator": {"token": idp.token("admin")}}
    status, answer, _ = await gw.recall(body, headers=bearer(STRICT))
    assert (403, "moderator_not_allowed") == (status, answer["error"]["code"])


async def test_2_a_key_that_requires_verification_refuses_an_asserted_moderator(gw: Gateway) -> None:
    """require_verified_moderator: a userID alone is 401 moderator_token_required."""
    status, answer, headers = await gw.recall(request(), headers=bearer(STRICT))
    assert (401, "moderator_token_required") == (status, answer["error"]["code"])
    assert "Bearer" in headers["WWW-Authenticate"]


async def test_2_sighup_reload_puts_a_new_keys_file_in_force_and_keeps_the_old_on_error(
    gw: Gateway, tmp_path: Path
) -> None:
    """A reloaded file's keys work at once and removed ones stop; a broken file changes nothing."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nname = "new-svc"\nsha256 = "{sha("tok-new-0123456789abcdef")}"\napps = ["*"]\n')
    assert reload_credentials(gw.relay.app)
    assert 200 == (await gw.recall(request(), headers=bearer("tok-new-0123456789abcdef")))[0]
    assert 401 == (await gw.recall({**request(), "requestID": "x2"}, headers=bearer(SCOPED)))[0]
    keys.write_text("[[key]]\nname = 'broken'\n")
    with capture_logs() as logs:
        assert not reload_credentials(gw.relay.app)
    assert "new-svc" in gw.relay.app[KEYRING].names
    assert any(e["event"] == "relay.credentials_reload_failed" for e in logs)


# -- 3. (HTTP side) a token named "amqp" is an HTTP caller -----------------------------------------------


async def test_3_an_api_key_named_amqp_is_counted_and_recorded_as_an_http_caller(gw: Gateway) -> None:
    """The way in is the route, not the caller's name."""
    assert 200 == (await gw.recall(request(), headers=bearer("tok-named-amqp-0123456789")))[0]
    assert 1 == gw.metric("relay_recall_requests_total", via="api", outcome="ok")
    assert 0 == gw.metric("relay_recall_requests_total", via="amqp", outcome="ok")


async def test_3_a_redelivered_command_waits_for_the_first_run_instead_of_taking_over(gw: Gateway) -> None:
    """While a request is being carried out, the same request again (a redelivery) is told it is in
    progress: Tencent is called once."""
    gw.tencent.delay = 0.3
    service = gw.relay.app[GATEWAY]
    key = gw.relay.app[KEYRING].keys[0]
    command = recall_command({"type": "group", "groupID": "@TGS#1"}, [{"msgSeq": 9}])
    first = asyncio.create_task(service.submit(command, key, "amqp"))
    await asyncio.sleep(0.05)
    again = await service.submit(command, key, "amqp")
    assert "request_in_progress" == again.code
    assert 200 == (await first).status
    assert 1 == len(gw.tencent.calls)


async def test_3_the_lease_outlives_the_longest_call_to_tencent(gw: Gateway) -> None:
    """The idempotency lease is longer than a call can take, retries and rate-limit waits included."""
    service = gw.relay.app[GATEWAY]
    assert service.lease > service.recaller.longest_call


# -- 4. callbacks before gateway traffic ----------------------------------------------------------------


async def test_4_gateway_events_cannot_take_the_room_a_callback_needs(
    make_gw: Callable[..., Awaitable[Gateway]],
) -> None:
    """Broker down, 1 MiB spool, gateway share 0.25: requests are refused 503 once their audit events
    hold a quarter of the spool, and a genuine signed recall callback is still accepted."""
    gw = await make_gw(RELAY_SPOOL_MAX_BYTES=str(1024 * 1024), RELAY_SPOOL_GATEWAY_SHARE="0.25")
    gw.publisher.ready_flag = False
    reason = "r" * 1000
    statuses = []
    for i in range(200):
        messages = [{"msgSeq": 10_000 + i * 100 + n} for n in range(100)]
        status, _, _ = await gw.recall(
            {**request({"type": "group", "groupID": "@TGS#1"}, messages), "requestID": f"flood-{i}", "reason": reason}
        )
        statuses.append(status)
        if status == 503:
            break
    assert 503 == statuses[-1]
    spool = gw.relay.app[SPOOL]
    assert spool.store.request_bytes <= 0.25 * spool.max_bytes
    before = spool.store.bytes - spool.store.request_bytes
    await callback(gw, group_recall(77, "u_member"), "Android")  # asserts the 200
    assert spool.store.bytes - spool.store.request_bytes > before  # the revocation itself is spooled


# -- 5. without Redis, send traffic never evicts a lease --------------------------------------------


async def test_5_a_flood_of_sends_does_not_let_a_duplicate_request_call_tencent_again(
    make_gw: Callable[..., Awaitable[Gateway]],
) -> None:
    """With RELAY_CORRELATION_MAX_ENTRIES=50, 500 send callbacks later the same request is still a
    replay of its stored answer."""
    gw = await make_gw(RELAY_CORRELATION_MAX_ENTRIES="50")
    assert 200 == (await gw.recall(request()))[0]
    for i in range(500):
        send = {
            "CallbackCommand": C2C_SEND,
            "From_Account": "u",
            "To_Account": "v",
            "MsgKey": f"k{i}",
            "MsgId": f"m{i}",
        }
        query = callback_query(C2C_SEND, APP, TOKEN, request_time=int(NOW))
        assert 200 == (await gw.relay.post(f"/tencent-im/callback?{query}", data=orjson.dumps(send))).status
    status, _, headers = await gw.recall(request())
    assert (200, "true") == (status, headers.get("Idempotent-Replayed"))
    assert 1 == len(gw.tencent.calls)


# -- 10. text that changes how the text around it reads ---------------------------------------------------


async def test_10_a_reason_with_controls_never_reaches_tencent_or_an_event(gw: Gateway) -> None:
    """The issue's reason (RLO, NUL, an escape sequence, a forged log line) is a 400 naming the field."""
    status, body, _ = await gw.recall({**request(), "reason": "\u202espam\x00\x1b[2J\r\nFAKE: ok"})
    assert (400, ["reason"]) == (status, [f["field"] for f in body["error"]["fields"]])
    assert ([], []) == (gw.tencent.calls, gw.publisher.published)
