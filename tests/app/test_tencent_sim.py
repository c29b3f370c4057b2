"""The Tencent REST simulator itself: its checks answer Tencent's codes, and its recall callbacks reach
a real relay (signed, OptPlatform=RESTAPI) before the HTTP answer, after it, or not at all."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.app import CALLBACK_PATH
from relay.gateway.tencent_api import TencentApi
from relay.gateway.usersig import make_usersig
from relay.metrics import Metrics
from tests.app.conftest import Served
from tests.helpers import APP, NOW, TOKEN
from tests.tencent_sim import TencentSim

KEY = "sim-secret-key-0002"
ADMIN = "administrator"
GROUP = "@TGS#_@TGS#cSIM02"
TOPIC = "@TGS#_@TGS#cSIM02@TOPIC#_general"


def clock() -> float:
    return NOW  # the relay under test runs at NOW too, so callback signatures are fresh


@pytest.fixture
async def sim() -> AsyncIterator[TencentSim]:
    async with TencentSim({APP: KEY}, admins=[ADMIN], clock=clock) as s:
        yield s


@pytest.fixture
async def api(sim: TencentSim) -> AsyncIterator[TencentApi]:
    client = TencentApi(sim.url, ADMIN, {APP: KEY}, Metrics(CollectorRegistry()), clock=clock, backoff=0.005)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def relay(serve: Callable[..., Awaitable[Served]], sim: TencentSim) -> Served:
    """A real relay (recording publisher) that the simulator's callbacks are pointed at."""
    return await serve()


def callback_url(relay: Served) -> str:
    return f"http://127.0.0.1:{relay.port}{CALLBACK_PATH}"


def published(relay: Served) -> list[dict[str, Any]]:
    return [orjson.loads(e.body) for e in relay.publisher.published]


async def raw_call(sim: TencentSim, path: str, body: Any, **query: str) -> dict[str, Any]:
    """POST to the simulator by hand, with a valid query unless *query* overrides a part of it."""
    params = {
        "sdkappid": APP,
        "identifier": ADMIN,
        "usersig": make_usersig(APP, ADMIN, KEY, now=NOW, expire=86400),
        "random": "42",
        "contenttype": "json",
        **query,
    }
    params = {k: v for k, v in params.items() if v != "-"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(f"{sim.url}/v4/{path}", params=params, data=data) as r:
        assert 200 == r.status
        answer: dict[str, Any] = await r.json()
        return answer


GROUP_PATH = "group_open_http_svc/group_msg_recall"
C2C_PATH = "openim/admin_msgwithdraw"
OA_PATH = "official_account_open_http_svc/official_account_msg_recall"
SEQ = [{"MsgSeq": 1}]


@pytest.mark.parametrize(
    ("path", "body", "query", "code"),
    [
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"sdkappid": "-"}, 60012, id="no-sdkappid"),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"sdkappid": "9"}, 60006, id="unknown-app"),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"random": "-"}, 60002, id="no-random"),
        pytest.param(
            GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"random": str(2**32)}, 60002, id="random-too-big"
        ),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"usersig": "-"}, 70003, id="no-usersig"),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"usersig": "abc"}, 70003, id="bad-usersig"),
        pytest.param(
            GROUP_PATH,
            {"GroupId": GROUP, "MsgSeqList": SEQ},
            {"usersig": make_usersig(APP, ADMIN, "other", now=NOW, expire=60)},
            70009,
            id="wrong-key",
        ),
        pytest.param(
            GROUP_PATH,
            {"GroupId": GROUP, "MsgSeqList": SEQ},
            {"usersig": make_usersig(APP, ADMIN, KEY, now=NOW - 120, expire=60)},
            70001,
            id="expired",
        ),
        pytest.param(
            GROUP_PATH,
            {"GroupId": GROUP, "MsgSeqList": SEQ},
            {"usersig": make_usersig("1400000009", ADMIN, KEY, now=NOW, expire=60)},
            70014,
            id="other-app",
        ),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ}, {"identifier": "u_x"}, 70013, id="other-user"),
        pytest.param(
            GROUP_PATH,
            {"GroupId": GROUP, "MsgSeqList": SEQ},
            {"identifier": "u_x", "usersig": make_usersig(APP, "u_x", KEY, now=NOW, expire=60)},
            60010,
            id="not-an-admin",
        ),
        pytest.param(GROUP_PATH, b"{not json", {}, 60003, id="bad-json"),
        pytest.param(GROUP_PATH, {"MsgSeqList": SEQ}, {}, 10015, id="no-groupid"),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": []}, {}, 10004, id="no-seqs"),
        pytest.param(
            GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": [{"MsgSeq": i} for i in range(11)]}, {}, 10004, id="eleven"
        ),
        pytest.param(GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": [{"MsgSeq": "1"}]}, {}, 10004, id="seq-string"),
        pytest.param(
            GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": SEQ, "Reason": "é" * 51}, {}, 10004, id="reason-102b"
        ),
        pytest.param(GROUP_PATH, {"GroupId": "@TGS#none", "MsgSeqList": SEQ}, {}, 10010, id="no-such-group"),
        pytest.param(C2C_PATH, {"To_Account": "b", "MsgKey": "k"}, {}, 90008, id="c2c-no-from"),
        pytest.param(C2C_PATH, {"From_Account": "a", "MsgKey": "k"}, {}, 90003, id="c2c-no-to"),
        pytest.param(C2C_PATH, {"From_Account": "a", "To_Account": "b"}, {}, 90054, id="c2c-no-msgkey"),
        pytest.param(C2C_PATH, {"From_Account": "a", "To_Account": "b", "MsgKey": "k"}, {}, 20022, id="c2c-unknown"),
        pytest.param(OA_PATH, {"MsgKeyList": ["k"]}, {}, 10004, id="oa-no-account"),
        pytest.param(OA_PATH, {"Official_Account": "@TOA#x", "MsgKeyList": ["k"] * 11}, {}, 10004, id="oa-eleven"),
        pytest.param(OA_PATH, {"Official_Account": "@TOA#x", "MsgKeyList": ["k"]}, {}, 10010, id="oa-unknown"),
        pytest.param("openim/sendmsg", {}, {}, 60009, id="other-api"),
    ],
)
async def test_the_simulator_answers_tencents_codes(
    sim: TencentSim, path: str, body: Any, query: dict[str, str], code: int
) -> None:
    """Bad queries, UserSigs, bodies and unknown targets get FAIL with the code Tencent documents."""
    sim.seed_group(APP, "@TGS#other", 1)  # a group exists, just not the one asked for
    answer = await raw_call(sim, path, body, **query)
    assert ("FAIL", code) == (answer["ActionStatus"], answer["ErrorCode"])


async def test_scripted_faults_are_consumed_in_order_and_scoped(sim: TencentSim) -> None:
    """A fault scoped to one API leaves the others alone and stops after its count."""
    sim.seed_group(APP, GROUP, 1)
    sim.seed_group(APP, GROUP, 2)
    sim.fail_next(1, 60008, api="admin_msgwithdraw")
    sim.fail_next(1, 10002, api="group_msg_recall")
    first = await raw_call(sim, GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": [{"MsgSeq": 1}]})
    second = await raw_call(sim, GROUP_PATH, {"GroupId": GROUP, "MsgSeqList": [{"MsgSeq": 2}]})
    assert (10002, 0) == (first["ErrorCode"], second["ErrorCode"])
    assert [{"MsgSeq": 2, "RetCode": 0}] == second["RecallRetList"]


async def test_callback_before_the_answer_reaches_the_relay_first(
    sim: TencentSim, api: TencentApi, relay: Served
) -> None:
    """With when="before" the relay has published the event by the time the REST answer arrives."""
    sim.seed_group(APP, GROUP, 8801, topic_id=TOPIC, msg_id="144115200000000001-1767225500-8801")
    sim.callbacks_to(callback_url(relay), APP, TOKEN, when="before")
    (outcome,) = await api.recall_group(APP, GROUP, TOPIC, [8801], "spam")
    assert "recalled" == outcome.status
    (event,) = published(relay)  # already there: no settle needed
    assert ("Group.CallbackAfterRecallMsg", "RESTAPI", 8801) == (
        event["callbackCommand"],
        event["platform"],
        event["msgSeq"],
    )
    assert {"userID": ADMIN, "role": "app_admin", "assertedBy": None, "verifiedBy": None} == event["operator"]
    assert (GROUP, TOPIC) == (event["conversation"]["groupID"], event["conversation"]["topicID"])
    assert "144115200000000001-1767225500-8801" == event["clientMsgID"]
    (sent,) = sim.callbacks
    assert (200, True) == (sent.status, sent.before_answer)
    lines = sim.dump().splitlines()
    callback_at = next(i for i, line in enumerate(lines) if line.startswith("callback Group.CallbackAfterRecallMsg"))
    answer_at = next(i for i, line in enumerate(lines) if line.startswith("#1 → 200"))
    assert callback_at < answer_at


async def test_callback_after_the_answer_arrives_later(sim: TencentSim, api: TencentApi, relay: Served) -> None:
    """With when="after" (and a delay) the REST answer comes first; the callback follows and is accepted."""
    sim.seed_c2c(APP, "u_alice", "u_bob", "90211_3019944112_1767225540")
    sim.callbacks_to(callback_url(relay), APP, TOKEN, when="after", delay=0.2)
    outcome = await api.recall_c2c(APP, "u_alice", "u_bob", "90211_3019944112_1767225540")
    assert "recalled" == outcome.status
    assert [] == published(relay)
    await sim.settle()
    (event,) = published(relay)
    assert ("C2C.CallbackAfterMsgWithDraw", "RESTAPI", "90211_3019944112_1767225540") == (
        event["callbackCommand"],
        event["platform"],
        event["msgKey"],
    )
    (sent,) = sim.callbacks
    assert (200, False) == (sent.status, sent.before_answer)
    assert "OptPlatform=RESTAPI" in sent.query
    assert "Sign=" in sent.query


async def test_official_account_callback_and_never(sim: TencentSim, api: TencentApi, relay: Served) -> None:
    """The official-account callback lists only the keys recalled; with when="never" nothing is sent."""
    sim.seed_official_account(APP, "@TOA#_news01", "77_1")
    sim.seed_official_account(APP, "@TOA#_news01", "77_2")
    sim.callbacks_to(callback_url(relay), APP, TOKEN, when="after")
    await api.recall_official_account(APP, "@TOA#_news01", ["77_1", "77_9"], "outdated")
    await sim.settle()
    (event,) = published(relay)
    assert ("OfficialAccount.CallbackAfterMsgWithDraw", "77_1") == (event["callbackCommand"], event["msgKey"])
    sim.callbacks_to(callback_url(relay), APP, TOKEN, when="never")
    await api.recall_official_account(APP, "@TOA#_news01", ["77_2"], "outdated")
    await sim.settle()
    assert 1 == len(sim.callbacks)
    assert 1 == len(published(relay))


async def test_nothing_recalled_sends_no_callback(sim: TencentSim, api: TencentApi, relay: Served) -> None:
    """A recall Tencent refuses (already recalled, not found) fires no callback: they fire after success."""
    sim.seed_c2c(APP, "a", "b", "k")
    sim.callbacks_to(callback_url(relay), APP, TOKEN, when="before")
    await api.recall_c2c(APP, "a", "b", "k")
    await api.recall_c2c(APP, "a", "b", "k")  # already recalled
    await api.recall_c2c(APP, "a", "b", "missing")
    assert 1 == len(sim.callbacks)


async def test_dump_shows_the_call_without_the_usersig(sim: TencentSim, api: TencentApi) -> None:
    """The human-readable dump has the path, the query and body as received, and marks the UserSig verified."""
    sim.seed_group(APP, GROUP, 5)
    await api.recall_group(APP, GROUP, None, [5], "spam link")
    dump = sim.dump()
    assert "POST /v4/group_open_http_svc/group_msg_recall?sdkappid=1400000001&identifier=administrator" in dump
    assert "usersig=<UserSig>" in dump
    assert '"Reason": "spam link"' in dump
    assert "(UserSig verified)" in dump
    assert sim.requests[0].query["usersig"] not in dump
