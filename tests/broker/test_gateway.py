"""The recall gateway end to end: a real RabbitMQ, the Tencent REST simulator calling back into the
relay, and the events read back from the broker. Redis where a restart must be survived."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from relay.app import API, METRICS, PUBLISHER, create_app
from relay.publisher import AmqpPublisher
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND
from tests.broker.test_publish import queue_depth, read_messages
from tests.faults.node import free_port
from tests.helpers import AMQP_URL, APP, TOKEN, load_schema, make_settings, validate_event
from tests.tencent_sim import TencentSim

pytestmark = pytest.mark.broker
ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
KEY = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
API_TOKEN = "tok-moderation-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def audit_validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(
        load_schema("recall-audit.v2.json"), format_checker=jsonschema.FormatChecker()
    )


AUDIT = audit_validator()


def gateway_env(names: dict[str, str], amqp_url: str, sim_url: str, **extra: str) -> dict[str, str]:
    """Moderation queue (names.queue2: revocations only) and audit queue (names.queue: everything)."""
    return {
        "RELAY_AMQP_URL": amqp_url,
        "RELAY_EXCHANGE": names["exchange"],
        "RELAY_QUEUES": names["queue2"],
        "RELAY_AUDIT_QUEUES": names["queue"],
        "RELAY_PUBLISH_TIMEOUT": "3",
        "RELAY_API_TOKENS": f"moderation-svc={API_TOKEN}",
        "RELAY_TENCENT_SECRET_KEYS": f"{APP}={KEY}",
        "RELAY_TENCENT_API_URL": sim_url,
        "RELAY_TENCENT_TIMEOUT": "1",
        "RELAY_ENRICHMENT_TIMEOUT": "0.5",
        **extra,
    }


class Stack:
    """A relay (callback and API ports) on the real broker, and the simulator calling it back."""

    def __init__(
        self,
        relay: TestClient,
        api: TestClient,
        sim: TencentSim,
        amqp: aio_pika.abc.AbstractChannel,
        names: dict[str, str],
    ) -> None:  # type: ignore[type-arg]
        self.relay = relay
        self.api = api
        self.sim = sim
        self.amqp = amqp
        self.names = names
        self.tag = uuid.uuid4().hex[:8]

    @property
    def callback_url(self) -> str:
        return str(self.relay.make_url("/tencent-im/callback"))

    async def recall(self, body: dict[str, Any]) -> tuple[int, Any]:
        response = await self.api.post("/v1/recalls", data=orjson.dumps(body), headers=AUTH)
        return response.status, await response.json()

    async def audit(self, count: int) -> list[dict[str, Any]]:
        """*count* events from the audit queue (all kinds), each validated against its schema."""
        events = [orjson.loads(m.body) for m in await read_messages(self.amqp, self.names["queue"], count)]
        for event in events:
            if event["type"] == "message.revoked":
                validate_event(event)
            else:
                AUDIT.validate(event)
        return events

    async def moderation(self, count: int) -> list[dict[str, Any]]:
        return [orjson.loads(m.body) for m in await read_messages(self.amqp, self.names["queue2"], count)]


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def sim() -> AsyncIterator[TencentSim]:
    async with TencentSim({APP: KEY}) as simulator:
        yield simulator


@pytest.fixture
def make_stack(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    sim: TencentSim,
) -> StackFactory:
    async def make(when: str = "after", **env: str) -> Stack:
        settings = make_settings(tmp_path / "spool", **gateway_env(names, amqp_url, sim.url, **env))
        app = create_app(settings, registry=CollectorRegistry())
        relay = await aiohttp_client(app)
        await asyncio.wait_for(cast(AmqpPublisher, app[PUBLISHER]).connected.wait(), 10)
        api = await aiohttp_client(app[API])
        stack = Stack(relay, api, sim, amqp, names)
        sim.callbacks_to(stack.callback_url, APP, TOKEN, when=when)  # type: ignore[arg-type]
        return stack

    return make


def request(stack: Stack, conversation: dict[str, Any], messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "requestID": f"ticket-{stack.tag}",
        "sdkAppID": APP,
        "conversation": conversation,
        "messages": messages,
        "reason": "spam link",
        "moderator": {"userID": "mod_7"},
        **extra,
    }


def by_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def test_group_recall_end_to_end(make_stack: StackFactory) -> None:
    """A group topic recall: Tencent gets one batch with the reason; the audit queue gets the two
    requests and the two joined revocations, the moderation queue only the revocations."""
    stack = await make_stack()
    group, topic = f"@TGS#{stack.tag}", f"@TGS#{stack.tag}@TOPIC#x"
    for seq in (101, 102):
        stack.sim.seed_group(APP, group, seq, topic_id=topic, msg_id=f"144115-{seq}-{stack.tag}")
    status, answer = await stack.recall(
        request(stack, {"type": "group", "groupID": group, "topicID": topic}, [{"msgSeq": 101}, {"msgSeq": 102}])
    )
    await stack.sim.settle()
    assert 200 == status
    assert ["recalled", "recalled"] == [r["status"] for r in answer["results"]]
    (call,) = stack.sim.bodies("group_msg_recall")
    assert {
        "GroupId": group,
        "TopicId": topic,
        "MsgSeqList": [{"MsgSeq": 101}, {"MsgSeq": 102}],
        "Reason": "spam link",
    } == call
    events = await stack.audit(4)
    revoked = by_type(events, "message.revoked")
    assert 2 == len(by_type(events, "message.recall_requested"))
    operator = {"userID": "mod_7", "role": "moderator", "assertedBy": "moderation-svc", "verifiedBy": None}
    assert [("spam link", operator)] * 2 == [(e["reason"], e["operator"]) for e in revoked]
    assert {r["eventID"] for r in answer["results"]} == {e["eventID"] for e in revoked}
    assert {f"144115-{s}-{stack.tag}" for s in (101, 102)} == {e["msgID"] for e in revoked}
    moderation = await stack.moderation(2)
    assert {"message.revoked"} == {e["type"] for e in moderation}
    assert 0 == await queue_depth(stack.amqp, stack.names["queue2"])
    print(stack.sim.dump())  # the closing note shows one run of this


async def test_c2c_recall_with_the_callback_before_the_answer(make_stack: StackFactory) -> None:
    """Tencent's callback reaches the relay before its HTTP answer: the record written before the
    call is already there, so the revocation is joined (C2C, which Tencent cannot give a reason)."""
    stack = await make_stack(when="before")
    stack.sim.seed_c2c(APP, "u_a", "u_b", f"1_{stack.tag}_1")
    status, answer = await stack.recall(
        request(stack, {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": f"1_{stack.tag}_1"}])
    )
    assert 200 == status
    (callback,) = stack.sim.callbacks
    assert callback.before_answer
    assert 200 == callback.status
    (call,) = stack.sim.bodies("admin_msgwithdraw")
    assert {"From_Account": "u_a", "To_Account": "u_b", "MsgKey": f"1_{stack.tag}_1"} == call
    events = await stack.audit(2)
    (revoked,) = by_type(events, "message.revoked")
    assert ("spam link", "moderator", "RESTAPI") == (
        revoked["reason"],
        revoked["operator"]["role"],
        revoked["platform"],
    )
    assert answer["results"][0]["eventID"] == revoked["eventID"]
    print(stack.sim.dump())


async def test_official_account_recall(make_stack: StackFactory) -> None:
    """An official-account recall goes out with its reason and comes back joined."""
    stack = await make_stack()
    account = f"@TOA#{stack.tag}"
    stack.sim.seed_official_account(APP, account, "k1")
    status, _ = await stack.recall(
        request(stack, {"type": "official_account", "officialAccount": account}, [{"msgKey": "k1"}])
    )
    await stack.sim.settle()
    assert 200 == status
    assert [{"Official_Account": account, "MsgKeyList": ["k1"], "Reason": "spam link"}] == stack.sim.bodies(
        "official_account_msg_recall"
    )
    (revoked,) = by_type(await stack.audit(2), "message.revoked")
    assert ("mod_7", "ticket-" + stack.tag) == (revoked["operator"]["userID"], revoked["recallRequest"]["requestID"])


async def test_a_message_named_by_msg_id(make_stack: StackFactory) -> None:
    """The send callback's msgID resolves to the MsgKey Tencent needs."""
    stack = await make_stack()
    key, msg_id = f"5_{stack.tag}_5", f"144115-m-{stack.tag}"
    stack.sim.seed_c2c(APP, "u_a", "u_b", key)
    sent = {
        "CallbackCommand": C2C_SEND,
        "From_Account": "u_a",
        "To_Account": "u_b",
        "MsgKey": key,
        "MsgId": msg_id,
        "MsgTime": int(time.time()),
    }
    url = f"/tencent-im/callback?{callback_query(C2C_SEND, APP, TOKEN)}"
    assert 200 == (await stack.relay.post(url, data=orjson.dumps(sent))).status
    status, answer = await stack.recall(
        request(stack, {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgID": msg_id}])
    )
    await stack.sim.settle()
    assert 200 == status
    assert [{"From_Account": "u_a", "To_Account": "u_b", "MsgKey": key}] == stack.sim.bodies("admin_msgwithdraw")
    assert msg_id == answer["results"][0]["msgID"]
    (revoked,) = by_type(await stack.audit(2), "message.revoked")
    assert (msg_id, "hit", "moderator") == (revoked["clientMsgID"], revoked["enrichment"], revoked["operator"]["role"])


async def test_the_same_request_twice_calls_tencent_once(make_stack: StackFactory) -> None:
    """Idempotency end to end: the second answer is the first, Tencent saw one call."""
    stack = await make_stack()
    stack.sim.seed_c2c(APP, "u_a", "u_b", "k-idem")
    body = request(stack, {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": "k-idem"}])
    first, second = await stack.recall(body), await stack.recall(body)
    assert first == second
    assert 1 == len(stack.sim.bodies("admin_msgwithdraw"))


@pytest.mark.parametrize(
    ("seed", "fault", "status", "code", "failed_event"),
    [
        pytest.param({"code": 10007}, None, "rejected", 10007, True, id="no-permission"),
        pytest.param({"code": 10030}, None, "not_found", 10030, True, id="not-found"),
        pytest.param({"transient": [10002, 10002]}, None, "recalled", 0, False, id="internal-error-retried"),
        pytest.param({}, ("code", 60007), "recalled", 0, False, id="rate-limited-retried"),
        pytest.param({}, ("code", 70001), "recalled", 0, False, id="usersig-regenerated"),
        pytest.param({}, ("http", 502), "recalled", 0, False, id="http-5xx-retried"),
        pytest.param({}, ("drop", 0), "recalled", 0, False, id="dropped-connection-retried"),
        pytest.param({"transient": [91000] * 4}, None, "failed", 91000, True, id="internal-error-exhausted"),
    ],
)
async def test_each_class_of_tencent_answer(
    make_stack: StackFactory,
    seed: dict[str, Any],
    fault: tuple[str, int] | None,
    status: str,
    code: int,
    failed_event: bool,
) -> None:
    """Each class of Tencent answer ends in the documented status, and refusals in recall_failed."""
    stack = await make_stack()
    group = f"@TGS#{stack.tag}"
    stack.sim.seed_group(APP, group, 7, **seed)
    if fault is not None:
        kind, value = fault
        if kind == "code":
            stack.sim.fail_next(1, value)
        elif kind == "http":
            stack.sim.http_error_next(1, value)
        else:
            stack.sim.drop_next(1)
    got, answer = await stack.recall(request(stack, {"type": "group", "groupID": group}, [{"msgSeq": 7}]))
    await stack.sim.settle()
    assert 200 == got
    assert [(status, code)] == [(r["status"], r["tencentCode"]) for r in answer["results"]]
    expected = ["message.recall_requested"] + (["message.recall_failed"] if failed_event else ["message.revoked"])
    events = await stack.audit(2)
    assert sorted(expected) == sorted(e["type"] for e in events)
    if failed_event:
        (failed,) = by_type(events, "message.recall_failed")
        assert (status, code) == (failed["status"], failed["tencentCode"])


async def test_tencent_unreachable_is_502_with_failed_events(make_stack: StackFactory) -> None:
    """Nothing listens at the REST URL: 502 tencent_unreachable after the retries, and a
    recall_failed event per message."""
    stack = await make_stack(RELAY_TENCENT_API_URL=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    status, answer = await stack.recall(
        request(stack, {"type": "group", "groupID": "@TGS#none"}, [{"msgSeq": 1}, {"msgSeq": 2}])
    )
    assert (502, "tencent_unreachable") == (status, answer["error"]["code"])
    assert time.monotonic() - started < 15
    events = await stack.audit(4)
    assert 2 == len(by_type(events, "message.recall_failed"))
    assert {("failed", -1)} == {(e["status"], e["tencentCode"]) for e in by_type(events, "message.recall_failed")}


async def test_the_rate_limit_holds_under_1000_requests(make_stack: StackFactory) -> None:
    """1,000 one-message C2C requests at once: Tencent (200/s per API) never answers a rate-limit code."""
    stack = await make_stack(when="never")
    for i in range(1000):
        stack.sim.seed_c2c(APP, "u_a", "u_b", f"rl_{stack.tag}_{i}")
    limit = asyncio.Semaphore(100)

    async def one(i: int) -> int:
        body = request(stack, {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": f"rl_{stack.tag}_{i}"}])
        body["requestID"] = f"rl-{stack.tag}-{i}"
        async with limit:
            return (await stack.recall(body))[0]

    started = time.monotonic()
    statuses = await asyncio.gather(*(one(i) for i in range(1000)))
    elapsed = time.monotonic() - started
    assert [200] * 1000 == statuses
    assert 0 == stack.sim.rate_limited
    assert 1000 == len(stack.sim.bodies("admin_msgwithdraw"))
    assert max(stack.sim.peak.values()) <= 200
    print(f"1000 requests in {elapsed:.1f} s, peak {max(stack.sim.peak.values())} calls in one second")
    await read_messages(stack.amqp, stack.names["queue"], 1000, timeout=30)  # the recall_requested events


# -- across processes: a restart between request and callback, and the command queue ------------


BUS_USER = "guest"  # the test broker's user: what RabbitMQ checks a command's user_id against


def command_keys(tmp_path: Path, amqp_user: str = BUS_USER) -> str:
    """A keys file with one key for the services on the bus, claiming *amqp_user*; its path."""
    path = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"tok-bus-unused-0123456789").hexdigest()
    path.write_text(f'[[key]]\nname = "bus-svc"\nsha256 = "{digest}"\napps = ["{APP}"]\namqp_user = "{amqp_user}"\n')
    return str(path)


def command(body: dict[str, Any], **properties: Any) -> aio_pika.Message:
    """A command message as a service on the bus sends it: its user_id says who it is."""
    return aio_pika.Message(orjson.dumps(body), **{"user_id": BUS_USER, **properties})


async def drop_command_queue(amqp: aio_pika.abc.AbstractChannel, queue: str) -> None:
    await amqp.queue_delete(queue)
    await amqp.queue_delete(f"{queue}.dead")
    await amqp.exchange_delete(f"{queue}.dead")


def process_env(names: dict[str, str], amqp_url: str, sim_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """gateway_env for ``relay serve`` in its own process (the apps and tokens make_settings adds in-process)."""
    return gateway_env(
        names,
        amqp_url,
        sim_url,
        RELAY_SPOOL_DIR=str(tmp_path / "spool"),
        RELAY_SDKAPPIDS=APP,
        RELAY_CALLBACK_TOKENS=f"{APP}={TOKEN}",
        RELAY_SHUTDOWN_DELAY="0",
        RELAY_LOG_LEVEL="warning",
        **extra,
    )


class RelayProcess:
    """``python -m relay serve`` with an environment, waited for until ready."""

    def __init__(self, env: dict[str, str], port: int, api_port: int) -> None:
        self.env = {
            **os.environ,
            **env,
            "RELAY_PORT": str(port),
            "RELAY_API_PORT": str(api_port),
            "RELAY_HOST": "127.0.0.1",
        }
        self.port = port
        self.api_port = api_port
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "serve"], env=self.env, stdout=subprocess.DEVNULL)
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


async def consuming(amqp_url: str, queue: str) -> None:
    """Wait until *queue* exists and has a consumer (a relay's readiness does not say the command
    consumer is up; a message published to a queue not yet declared would be dropped)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        async with asyncio.timeout(20):
            while True:
                probe = await connection.channel()  # a passive declare of a missing queue closes its channel
                try:
                    declared = await probe.declare_queue(queue, passive=True)
                    if declared.declaration_result.consumer_count:
                        return
                except aio_pika.exceptions.ChannelClosed:
                    pass
                finally:
                    if not probe.is_closed:
                        await probe.close()
                await asyncio.sleep(0.1)
    finally:
        await connection.close()


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.stop(signal.SIGKILL)


async def test_a_restart_between_request_and_callback_still_joins(
    sim: TencentSim,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    redis_url: str,
    processes: list[RelayProcess],
) -> None:
    """The request is recorded in Redis; the relay restarts; the callback that arrives afterwards
    at the new process is joined to the request."""
    port, api_port = free_port(), free_port()
    env = process_env(names, amqp_url, sim.url, tmp_path, RELAY_REDIS_URL=redis_url)
    first = RelayProcess(env, port, api_port)
    processes.append(first)
    await first.start()
    tag = uuid.uuid4().hex[:8]
    sim.seed_c2c(APP, "u_a", "u_b", f"r_{tag}")
    sim.callbacks_to(f"http://127.0.0.1:{port}/tencent-im/callback", APP, TOKEN, when="never")
    body = {
        "requestID": f"restart-{tag}",
        "sdkAppID": APP,
        "conversation": {"type": "c2c", "sender": "u_a", "receiver": "u_b"},
        "messages": [{"msgKey": f"r_{tag}"}],
        "reason": "doxxing",
        "moderator": {"userID": "mod_9"},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{api_port}/v1/recalls", json=body, headers=AUTH) as response:
            assert 200 == response.status
        first.stop()
        second = RelayProcess(env, port, api_port)
        processes.append(second)
        await second.start()
        callback = {"CallbackCommand": C2C_RECALL, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": f"r_{tag}"}
        url = (
            f"http://127.0.0.1:{port}/tencent-im/callback?{callback_query(C2C_RECALL, APP, TOKEN, platform='RESTAPI')}"
        )
        async with session.post(url, data=orjson.dumps(callback)) as response:
            assert 200 == response.status
    events = [orjson.loads(m.body) for m in await read_messages(amqp, names["queue"], 2, timeout=10)]
    (revoked,) = by_type(events, "message.revoked")
    assert ("doxxing", "mod_9", f"restart-{tag}") == (
        revoked["reason"],
        revoked["operator"]["userID"],
        revoked["recallRequest"]["requestID"],
    )


async def command_stack(
    make_stack: StackFactory, names: dict[str, str], tmp_path: Path, **env: str
) -> tuple[Stack, str]:
    """A stack consuming its own command queue, once the consumer is up."""
    from relay.app import COMMANDS

    queue = f"{names['queue']}.commands"
    if "RELAY_API_KEYS_FILE" not in env:
        env["RELAY_API_KEYS_FILE"] = command_keys(tmp_path)
    stack = await make_stack(RELAY_COMMAND_QUEUE=queue, **env)
    assert stack.relay.app is not None
    await asyncio.wait_for(stack.relay.app[COMMANDS].consuming.wait(), 10)
    return stack, queue


async def test_the_command_queue_carries_out_a_request_and_replies(
    make_stack: StackFactory, names: dict[str, str], tmp_path: Path
) -> None:
    """A request sent as an AMQP message by a known user is carried out as that user's key, answered
    through direct reply-to, and acked."""
    stack, command_queue = await command_stack(make_stack, names, tmp_path)
    stack.sim.seed_c2c(APP, "u_a", "u_b", f"q_{stack.tag}")
    body = request(stack, {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": f"q_{stack.tag}"}])
    replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    direct = await stack.amqp.get_queue("amq.rabbitmq.reply-to", ensure=False)
    tag = await direct.consume(replies.put, no_ack=True)
    try:
        await stack.amqp.default_exchange.publish(
            command(body, reply_to="amq.rabbitmq.reply-to", correlation_id="c-1"), routing_key=command_queue
        )
        reply = await asyncio.wait_for(replies.get(), 10)
        answer = orjson.loads(reply.body)
        assert (200, "c-1", "recalled") == (answer["status"], reply.correlation_id, answer["results"][0]["status"])
        await stack.sim.settle()
        (revoked,) = by_type(await stack.audit(2), "message.revoked")
        assert ("bus-svc", "bus-svc") == (revoked["recallRequest"]["requestedBy"], revoked["operator"]["assertedBy"])
        assert 0 == await queue_depth(stack.amqp, command_queue)
    finally:
        await direct.cancel(tag)
        await drop_command_queue(stack.amqp, command_queue)


async def test_an_invalid_command_is_dead_lettered(
    make_stack: StackFactory, names: dict[str, str], tmp_path: Path
) -> None:
    """A command that can never be valid goes to <queue>.dead with its reason header, and a 400 reply
    to a queue under RELAY_COMMAND_REPLY_PREFIX."""
    prefix = f"replies.{uuid.uuid4().hex[:8]}."
    stack, command_queue = await command_stack(make_stack, names, tmp_path, RELAY_COMMAND_REPLY_PREFIX=prefix)
    replies = await stack.amqp.declare_queue(prefix + "mine", exclusive=True)
    try:
        await stack.amqp.default_exchange.publish(
            command({"reason": 1}, reply_to=replies.name), routing_key=command_queue
        )
        (reply,) = await read_messages(stack.amqp, replies.name, 1, timeout=10)
        assert (400, "invalid_request") == (
            orjson.loads(reply.body)["status"],
            orjson.loads(reply.body)["error"]["code"],
        )
        (dead,) = await read_messages(stack.amqp, f"{command_queue}.dead", 1, timeout=10)
        assert (b'{"reason":1}', "invalid_request") == (dead.body, (dead.headers or {}).get("x-relay-refusal"))
    finally:
        await drop_command_queue(stack.amqp, command_queue)


@pytest.mark.parametrize(
    ("keys_user", "properties", "reason"),
    [
        pytest.param(BUS_USER, {"user_id": None}, "no_user_id", id="no-user-id"),
        pytest.param("another-user", {}, "unknown_caller", id="unknown-user"),
        pytest.param(BUS_USER, {"reply_to": "MODERATION"}, "reply_to_not_allowed", id="reply-into-moderation-queue"),
    ],
)
async def test_3_a_command_from_no_known_caller_or_replying_elsewhere_is_refused_unread(
    make_stack: StackFactory,
    names: dict[str, str],
    tmp_path: Path,
    keys_user: str,
    properties: dict[str, Any],
    reason: str,
) -> None:
    """Without a user_id, from a user no key claims, or with reply_to naming someone else's queue:
    Tencent is not called, nothing is published anywhere, the message is dead-lettered with
    x-relay-refusal, and the refusal is counted."""
    stack, command_queue = await command_stack(
        make_stack, names, tmp_path, RELAY_API_KEYS_FILE=command_keys(tmp_path, keys_user)
    )
    if properties.get("reply_to") == "MODERATION":
        properties = {"reply_to": names["queue2"]}
    body = request(stack, {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": "k-refused"}])
    try:
        await stack.amqp.default_exchange.publish(command(body, **properties), routing_key=command_queue)
        (dead,) = await read_messages(stack.amqp, f"{command_queue}.dead", 1, timeout=10)
        assert reason == (dead.headers or {}).get("x-relay-refusal")
        assert [] == stack.sim.bodies("admin_msgwithdraw")
        assert (0, 0) == (
            await queue_depth(stack.amqp, names["queue2"]),
            await queue_depth(stack.amqp, names["queue"]),
        )
        assert stack.relay.app is not None
        metrics = stack.relay.app[METRICS].registry
        assert 1 == metrics.get_sample_value("relay_command_refusals_total", {"reason": reason})
    finally:
        await drop_command_queue(stack.amqp, command_queue)


async def test_6_a_command_queue_that_cannot_be_consumed_is_reported_and_retried(
    make_stack: StackFactory, names: dict[str, str], tmp_path: Path
) -> None:
    """The queue exists as a classic queue: the consumer says why in the log, in /readyz's body and
    in relay_command_consumer_up, callbacks stay ready, and it consumes once the queue is fixed."""
    from relay.app import COMMANDS

    command_queue = f"{names['queue']}.commands"
    await stack_free_classic(names, command_queue)
    stack = await make_stack(RELAY_COMMAND_QUEUE=command_queue, RELAY_API_KEYS_FILE=command_keys(tmp_path))
    try:
        assert stack.relay.app is not None
        registry = stack.relay.app[METRICS].registry
        async with asyncio.timeout(10):
            while stack.relay.app[COMMANDS].last_error is None:
                await asyncio.sleep(0.05)
        ready = await stack.relay.get("/readyz")
        body = await ready.json()
        assert (200, False) == (ready.status, body["commands"]["consuming"])
        assert "quorum" in body["commands"]["error"]
        assert 0 == registry.get_sample_value("relay_command_consumer_up")
        await stack.amqp.queue_delete(command_queue)
        await asyncio.wait_for(stack.relay.app[COMMANDS].consuming.wait(), 40)
        assert 1 == registry.get_sample_value("relay_command_consumer_up")
        assert (await (await stack.relay.get("/readyz")).json())["commands"]["consuming"]
    finally:
        await drop_command_queue(stack.amqp, command_queue)


async def stack_free_classic(names: dict[str, str], queue: str) -> None:
    """Declare *queue* as a durable classic queue, as an operator might have by hand."""
    del names
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)


async def test_a_command_is_redelivered_after_a_consumer_crash(
    sim: TencentSim,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    processes: list[RelayProcess],
) -> None:
    """The relay is SIGKILLed while Tencent is still answering; the command comes back to the next
    relay, which carries it out (Tencent: already recalled) and acks it; the audit events of both
    attempts share their eventIDs, so consumers see one request."""
    command_queue = f"{names['queue']}.commands"
    env = process_env(
        names,
        amqp_url,
        sim.url,
        tmp_path,
        RELAY_COMMAND_QUEUE=command_queue,
        RELAY_TENCENT_TIMEOUT="10",
        RELAY_API_KEYS_FILE=command_keys(tmp_path),
        RELAY_COMMAND_REPLY_PREFIX="crash-replies.",
    )
    port, api_port = free_port(), free_port()
    tag = uuid.uuid4().hex[:8]
    sim.seed_c2c(APP, "u_a", "u_b", f"crash_{tag}")
    sim.delay_next(1, 5.0)  # the first relay's call is answered only after it is gone
    sim.callbacks_to(f"http://127.0.0.1:{port}/tencent-im/callback", APP, TOKEN, when="never")
    replies = await amqp.declare_queue(f"crash-replies.{tag}", exclusive=True)
    first = RelayProcess(env, port, api_port)
    processes.append(first)
    await first.start()
    try:
        await consuming(amqp_url, command_queue)
        body = {
            "requestID": f"crash-{tag}",
            "sdkAppID": APP,
            "conversation": {"type": "c2c", "sender": "u_a", "receiver": "u_b"},
            "messages": [{"msgKey": f"crash_{tag}"}],
            "reason": "spam",
            "moderator": {"userID": "mod_1"},
        }
        await amqp.default_exchange.publish(command(body, reply_to=replies.name), routing_key=command_queue)
        async with asyncio.timeout(10):
            while not sim.bodies("admin_msgwithdraw"):
                await asyncio.sleep(0.05)
        first.stop(signal.SIGKILL)
        second = RelayProcess(env, port, api_port)
        processes.append(second)
        await second.start()
        (reply,) = await read_messages(amqp, replies.name, 1, timeout=20)
        answer = orjson.loads(reply.body)
        assert 200 == answer["status"]
        assert answer["results"][0]["status"] in ("recalled", "already_recalled")
        assert 2 == len(sim.bodies("admin_msgwithdraw"))
        requested = [orjson.loads(m.body) for m in await read_messages(amqp, names["queue"], 2, timeout=10)]
        assert 1 == len({e["eventID"] for e in requested})  # the same event twice: deduplicated downstream
        async with asyncio.timeout(10):
            while await queue_depth(amqp, command_queue):
                await asyncio.sleep(0.1)
    finally:
        await amqp.queue_delete(command_queue)
        await amqp.queue_delete(f"{command_queue}.dead")
        await amqp.exchange_delete(f"{command_queue}.dead")
