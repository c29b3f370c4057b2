"""The Tencent REST client against the simulator on real sockets: answers, retries, faults, limits."""

from __future__ import annotations

import asyncio
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from relay.gateway.outcomes import Outcome
from relay.gateway.tencent_api import TencentApi, TencentUnreachable
from relay.metrics import Metrics
from tests.tencent_sim import TencentSim

APP = "1400000001"
KEY = "sim-secret-key-0001"
ADMIN = "administrator"
GROUP = "@TGS#_@TGS#cSIM01"
TOPIC = "@TGS#_@TGS#cSIM01@TOPIC#_general"
ACCOUNT = "@TOA#_news01"

MakeApi = Callable[..., Awaitable[TencentApi]]


@pytest.fixture
async def sim() -> AsyncIterator[TencentSim]:
    async with TencentSim({APP: KEY}, admins=[ADMIN]) as s:
        yield s


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def make_api(sim: TencentSim, registry: CollectorRegistry) -> AsyncIterator[MakeApi]:
    """Build started clients against the simulator, with short backoffs so retries cost milliseconds."""
    made: list[TencentApi] = []

    async def make(base_url: str | None = None, keys: dict[str, str] | None = None, **options: Any) -> TencentApi:
        settings = {"backoff": 0.005, "backoff_max": 0.02, "rate_limit_backoff": 0.01, "timeout": 1.0, **options}
        api = TencentApi(base_url or sim.url, ADMIN, keys or {APP: KEY}, Metrics(registry), **settings)
        await api.start()
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()


@pytest.fixture
async def api(make_api: MakeApi) -> TencentApi:
    return await make_api()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- what is sent, what comes back ---------------------------------------------------------------


async def test_c2c_recall_sends_the_documented_request(sim: TencentSim, api: TencentApi) -> None:
    """One admin_msgwithdraw: From/To/MsgKey only, the five query parameters, a UserSig the simulator verifies."""
    sim.seed_c2c(APP, "u_alice", "u_bob", "1_2_3")
    assert "recalled" == (await api.recall_c2c(APP, "u_alice", "u_bob", "1_2_3")).status
    (rec,) = sim.requests
    assert "admin_msgwithdraw" == rec.api
    assert {"From_Account": "u_alice", "To_Account": "u_bob", "MsgKey": "1_2_3"} == rec.body
    assert {"sdkappid", "identifier", "usersig", "random", "contenttype"} == set(rec.query)
    assert (APP, ADMIN, "json") == (rec.query["sdkappid"], rec.query["identifier"], rec.query["contenttype"])
    assert 0 <= int(rec.query["random"]) < 2**32
    assert 0 == rec.usersig
    assert sim.c2c_recalled(APP, "u_alice", "u_bob", "1_2_3")


async def test_c2c_already_recalled_and_not_found(sim: TencentSim, api: TencentApi) -> None:
    """A second recall is already_recalled (20023); an unknown message is not_found (20022); neither retried."""
    sim.seed_c2c(APP, "u_alice", "u_bob", "k1")
    await api.recall_c2c(APP, "u_alice", "u_bob", "k1")
    again = await api.recall_c2c(APP, "u_alice", "u_bob", "k1")
    missing = await api.recall_c2c(APP, "u_alice", "u_bob", "nope")
    assert ("already_recalled", 20023) == (again.status, again.tencent_code)
    assert ("not_found", 20022) == (missing.status, missing.tencent_code)
    assert 3 == len(sim.requests)


async def test_group_reads_every_retcode_in_order(
    sim: TencentSim, api: TencentApi, registry: CollectorRegistry
) -> None:
    """A top-level OK hides per-seq results: recalled, not found and refused come back in the order asked."""
    sim.seed_group(APP, GROUP, 101, topic_id=TOPIC)
    sim.seed_group(APP, GROUP, 102, topic_id=TOPIC, code=10031)
    outcomes = await api.recall_group(APP, GROUP, TOPIC, [103, 102, 101], "spam link")
    assert [("not_found", 10030), ("rejected", 10031), ("recalled", 0)] == [
        (o.status, o.tencent_code) for o in outcomes
    ]
    (rec,) = sim.requests
    expected = {
        "GroupId": GROUP,
        "TopicId": TOPIC,
        "Reason": "spam link",
        "MsgSeqList": [{"MsgSeq": 103}, {"MsgSeq": 102}, {"MsgSeq": 101}],
    }
    assert expected == rec.body
    assert 1 == metric(registry, "relay_tencent_recalls_total", api="group_msg_recall", status="rejected")
    assert 1 == metric(registry, "relay_tencent_calls_total", api="group_msg_recall", outcome="answered")


async def test_group_retries_only_the_seqs_with_a_transient_code(sim: TencentSim, api: TencentApi) -> None:
    """A seq answered 10002 is asked again on its own; the others keep their first answer."""
    sim.seed_group(APP, GROUP, 1)
    sim.seed_group(APP, GROUP, 2, transient=[10002])
    outcomes = await api.recall_group(APP, GROUP, None, [1, 2], None)
    assert ["recalled", "recalled"] == [o.status for o in outcomes]
    assert [[{"MsgSeq": 1}, {"MsgSeq": 2}], [{"MsgSeq": 2}]] == [
        b["MsgSeqList"] for b in sim.bodies("group_msg_recall")
    ]


async def test_group_top_level_fail_applies_to_every_seq(sim: TencentSim, api: TencentApi) -> None:
    """An unknown group (10010 at the top) makes every seq rejected with that code."""
    outcomes = await api.recall_group(APP, "@TGS#nope", None, [1, 2, 3], "x")
    assert [Outcome("rejected", 10010, "the group does not exist")] * 3 == outcomes


async def test_official_account_recall(sim: TencentSim, api: TencentApi) -> None:
    """MsgKeyList and Reason are sent; each MsgKey gets its own outcome."""
    sim.seed_official_account(APP, ACCOUNT, "77_1")
    outcomes = await api.recall_official_account(APP, ACCOUNT, ["77_1", "77_2"], "outdated")
    assert ["recalled", "not_found"] == [o.status for o in outcomes]
    assert [{"Official_Account": ACCOUNT, "Reason": "outdated", "MsgKeyList": ["77_1", "77_2"]}] == sim.bodies(
        "official_account_msg_recall"
    )
    assert sim.official_account_recalled(APP, ACCOUNT, "77_1")


async def test_reason_is_cut_to_100_bytes_and_never_sent_for_c2c(sim: TencentSim, api: TencentApi) -> None:
    """A long CJK reason reaches Tencent as 33 characters (99 bytes); C2C and an empty reason send none."""
    sim.seed_group(APP, GROUP, 1)
    sim.seed_c2c(APP, "a", "b", "k")
    await api.recall_group(APP, GROUP, None, [1], "违" * 50)
    await api.recall_group(APP, GROUP, None, [2], "")
    await api.recall_c2c(APP, "a", "b", "k")
    first, second = sim.bodies("group_msg_recall")
    assert "违" * 33 == first["Reason"]
    assert "Reason" not in second
    assert "Reason" not in sim.bodies("admin_msgwithdraw")[0]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda api: api.recall_group(APP, GROUP, None, list(range(11)), "x"), id="eleven-seqs"),
        pytest.param(lambda api: api.recall_group(APP, GROUP, None, [1, 1], "x"), id="duplicate-seq"),
        pytest.param(lambda api: api.recall_group(APP, GROUP, None, [True], "x"), id="bool-seq"),
        pytest.param(lambda api: api.recall_group(APP, GROUP, None, [], "x"), id="no-seq"),
        pytest.param(lambda api: api.recall_group(APP, "", None, [1], "x"), id="empty-group"),
        pytest.param(
            lambda api: api.recall_official_account(APP, ACCOUNT, [str(i) for i in range(11)], "x"), id="eleven-keys"
        ),
        pytest.param(lambda api: api.recall_c2c("1400000999", "a", "b", "k"), id="app-without-key"),
        pytest.param(lambda api: api.recall_c2c(APP, "a", "", "k"), id="empty-receiver"),
    ],
)
async def test_bad_calls_are_refused_before_any_request(
    sim: TencentSim, api: TencentApi, call: Callable[[TencentApi], Awaitable[object]]
) -> None:
    """More than 10 per call, duplicates, empty fields or an app without a key raise ValueError; nothing is sent."""
    with pytest.raises(ValueError, match=r"\w"):
        await call(api)
    assert [] == sim.requests
    assert not api.has_key("1400000999")


# --- each class of error code ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [90009, 60010, 90054, 10004, 10015, 10007, 60021, 60016])
async def test_refusals_are_rejected_and_never_retried(sim: TencentSim, api: TencentApi, code: int) -> None:
    """Auth, permission and parameter codes end the call at once as rejected, with that code."""
    sim.fail_next(1, code)
    outcome = await api.recall_c2c(APP, "a", "b", "k")
    assert ("rejected", code) == (outcome.status, outcome.tencent_code)
    assert 1 == len(sim.requests)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (91000, "internal_error"),
        (10002, "internal_error"),
        (60008, "tencent_timeout"),
        (60007, "rate_limited"),
        (60011, "rate_limited"),
        (60018, "rate_limited"),
        (60019, "rate_limited"),
    ],
)
async def test_transient_codes_are_retried_then_succeed(
    sim: TencentSim, api: TencentApi, registry: CollectorRegistry, code: int, reason: str
) -> None:
    """A transient code is retried with backoff; the next answer is the outcome; the retry is counted by reason."""
    sim.seed_c2c(APP, "a", "b", "k")
    sim.fail_next(2, code)
    assert "recalled" == (await api.recall_c2c(APP, "a", "b", "k")).status
    assert 3 == len(sim.requests)
    assert 2 == metric(registry, "relay_tencent_retries_total", api="admin_msgwithdraw", reason=reason)


async def test_transient_codes_exhausted_are_failed(sim: TencentSim, api: TencentApi) -> None:
    """After the last of 4 attempts a still-transient code is failed, carrying that code."""
    sim.fail_next(4, 91000)
    outcome = await api.recall_c2c(APP, "a", "b", "k")
    assert ("failed", 91000) == (outcome.status, outcome.tencent_code)
    assert 4 == len(sim.requests)


async def test_usersig_code_regenerates_once_and_succeeds(
    sim: TencentSim, make_api: MakeApi, registry: CollectorRegistry
) -> None:
    """On 70001 the UserSig is made anew and the call repeated at once, even with a single attempt allowed."""
    api = await make_api(attempts=1)
    sim.seed_c2c(APP, "a", "b", "k")
    sim.fail_next(1, 70001)
    assert "recalled" == (await api.recall_c2c(APP, "a", "b", "k")).status
    assert 2 == len(sim.requests)
    assert 1 == metric(registry, "relay_tencent_usersigs_total", reason="invalidated")
    assert 1 == metric(registry, "relay_tencent_retries_total", api="admin_msgwithdraw", reason="usersig")


async def test_usersig_code_again_after_regeneration_is_rejected(sim: TencentSim, api: TencentApi) -> None:
    """A key changed in the console (70009 twice) costs exactly one regeneration, then rejected."""
    sim.keys[APP] = "rotated-in-the-console"
    outcome = await api.recall_c2c(APP, "a", "b", "k")
    assert ("rejected", 70009) == (outcome.status, outcome.tencent_code)
    assert [70009, 70009] == [r.usersig for r in sim.requests]


# --- network faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["http", "drop"])
async def test_network_faults_are_retried_then_succeed(sim: TencentSim, api: TencentApi, fault: str) -> None:
    """HTTP 500 or a dropped connection is retried; the recall then succeeds."""
    sim.seed_c2c(APP, "a", "b", "k")
    if fault == "http":
        sim.http_error_next(2)
    else:
        sim.drop_next(2)
    assert "recalled" == (await api.recall_c2c(APP, "a", "b", "k")).status
    assert 3 == len(sim.requests)


@pytest.mark.parametrize("fault", ["http", "drop"])
async def test_network_faults_every_time_are_unreachable(
    sim: TencentSim, api: TencentApi, registry: CollectorRegistry, fault: str
) -> None:
    """Four 5xx answers or dropped connections raise TencentUnreachable("unreachable") after 4 attempts."""
    if fault == "http":
        sim.http_error_next(4, 503)
    else:
        sim.drop_next(4)
    with pytest.raises(TencentUnreachable) as info:
        await api.recall_group(APP, GROUP, None, [1, 2], "x")
    assert ("unreachable", 4) == (info.value.kind, info.value.attempts)
    assert 1 == metric(registry, "relay_tencent_calls_total", api="group_msg_recall", outcome="unreachable")


async def test_nothing_listening_is_unreachable(make_api: MakeApi) -> None:
    """With nothing on the port every attempt is refused: TencentUnreachable("unreachable")."""
    api = await make_api(base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TencentUnreachable) as info:
        await api.recall_c2c(APP, "a", "b", "k")
    assert ("unreachable", 4) == (info.value.kind, info.value.attempts)
    assert "Cannot connect" in info.value.detail


async def test_http_4xx_is_not_retried(sim: TencentSim, api: TencentApi) -> None:
    """A 404 (wrong base URL, a proxy refusing) ends the call at once as unreachable."""
    sim.http_error_next(1, 404)
    with pytest.raises(TencentUnreachable) as info:
        await api.recall_c2c(APP, "a", "b", "k")
    assert ("unreachable", "HTTP 404", 1) == (info.value.kind, info.value.detail, info.value.attempts)


async def test_slow_answers_are_timeout(sim: TencentSim, make_api: MakeApi, registry: CollectorRegistry) -> None:
    """Answers slower than the client timeout on every attempt raise TencentUnreachable("timeout")."""
    api = await make_api(timeout=0.2, attempts=2)
    sim.delay_next(2, 5.0)
    with pytest.raises(TencentUnreachable) as info:
        await api.recall_c2c(APP, "a", "b", "k")
    assert ("timeout", 2) == (info.value.kind, info.value.attempts)
    assert 1 == metric(registry, "relay_tencent_retries_total", api="admin_msgwithdraw", reason="timeout")


async def test_c2c_retry_after_a_lost_answer_is_already_recalled(sim: TencentSim, make_api: MakeApi) -> None:
    """Tencent recalled but its answer came too late: the retry's 20023 makes it already_recalled (a success)."""
    api = await make_api(timeout=0.2)
    sim.seed_c2c(APP, "a", "b", "k")
    sim.delay_next(1, 1.0)
    outcome = await api.recall_c2c(APP, "a", "b", "k")
    assert ("already_recalled", 20023) == (outcome.status, outcome.tencent_code)


async def test_group_retry_after_a_lost_answer_says_so(sim: TencentSim, make_api: MakeApi) -> None:
    """For a group, the retry answers 10030: not_found, with a note that the lost request may have recalled it."""
    api = await make_api(timeout=0.2)
    sim.seed_group(APP, GROUP, 7)
    sim.delay_next(1, 1.0)
    (outcome,) = await api.recall_group(APP, GROUP, None, [7], "x")
    assert ("not_found", 10030) == (outcome.status, outcome.tencent_code)
    assert "may have recalled it" in outcome.info
    assert sim.group_recalled(APP, GROUP, 7)


async def test_answered_once_then_unreachable_is_failed_with_the_code(sim: TencentSim, api: TencentApi) -> None:
    """A call that got a transient answer before the network failed reports failed with that code, not unreachable."""
    sim.fail_next(1, 60008)
    sim.drop_next(3)
    outcome = await api.recall_c2c(APP, "a", "b", "k")
    assert ("failed", 60008) == (outcome.status, outcome.tencent_code)
    assert "Server" in outcome.info


async def test_no_secret_reaches_logs_or_errors(sim: TencentSim, api: TencentApi) -> None:
    """The failure log event, the exception and its traceback carry neither the key nor any UserSig sent."""
    sim.http_error_next(4)
    sim.fail_next(1, 10004)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(TencentUnreachable) as info:
            await api.recall_c2c(APP, "a", "b", "k")
        await api.recall_c2c(APP, "a", "b", "k")
    assert ["relay.tencent_call_failed", "relay.tencent_call_failed"] == [e["event"] for e in logs]
    assert ["unreachable", "answered"] == [e["outcome"] for e in logs]
    text = repr(logs) + "".join(traceback.format_exception(info.value)) + repr(api)
    assert KEY not in text
    for rec in sim.requests:
        assert rec.query["usersig"] not in text


# --- the rate limit --------------------------------------------------------------------------------


async def test_rate_limit_holds_under_a_burst_of_1000(sim: TencentSim, api: TencentApi) -> None:
    """1,000 concurrent C2C recalls at the default 150/s: the simulator never sees more than 200 in a second."""
    for i in range(1000):
        sim.seed_c2c(APP, "a", "b", f"k{i}")
    started = time.monotonic()
    outcomes = await asyncio.gather(*(api.recall_c2c(APP, "a", "b", f"k{i}") for i in range(1000)))
    elapsed = time.monotonic() - started
    assert {"recalled"} == {o.status for o in outcomes}
    assert 0 == sim.rate_limited
    assert 1000 == len(sim.requests)
    assert sim.peak[(APP, "admin_msgwithdraw")] <= 200
    # The limiter's own promise, not a speed claim: 985 calls past the burst of 15 at 150/s.
    assert elapsed >= (1000 - 15) / 150


async def test_the_simulator_answers_a_rate_limit_code_past_200(sim: TencentSim, make_api: MakeApi) -> None:
    """A client allowed far more than Tencent's limit (and no retries) gets 60007 past 200 calls in a second."""
    api = await make_api(rate=10_000.0, burst=500.0, attempts=1)
    for i in range(300):
        sim.seed_c2c(APP, "a", "b", f"k{i}")
    outcomes = await asyncio.gather(*(api.recall_c2c(APP, "a", "b", f"k{i}") for i in range(300)))
    limited = [o for o in outcomes if o.tencent_code == 60007]
    assert sim.rate_limited == len(limited) > 0
    assert {"failed"} == {o.status for o in limited}


async def test_a_full_queue_is_busy_and_sends_nothing(
    sim: TencentSim, make_api: MakeApi, registry: CollectorRegistry
) -> None:
    """Callers who would wait longer than max_wait for a token get TencentUnreachable("busy") at once."""
    api = await make_api(rate=10.0, burst=1.0, max_wait=0.25)
    for i in range(10):
        sim.seed_c2c(APP, "a", "b", f"k{i}")
    results = await asyncio.gather(*(api.recall_c2c(APP, "a", "b", f"k{i}") for i in range(10)), return_exceptions=True)
    busy = [r for r in results if isinstance(r, TencentUnreachable)]
    assert {"busy"} == {b.kind for b in busy}
    assert 10 - len(busy) == len(sim.requests)
    assert 3 <= len(sim.requests) <= 4  # one at once, then one every 0.1 s up to 0.25 s of queue
    assert len(busy) == metric(registry, "relay_tencent_calls_total", api="admin_msgwithdraw", outcome="busy")


async def test_retries_stop_before_the_call_outlives_longest_call(sim: TencentSim, make_api: MakeApi) -> None:
    """Rate-limited answers and a slow bucket: a retry that could not end before ``longest_call`` is
    not made, so the gateway's lease (longer than it) never expires under a call."""
    api = await make_api(
        rate=1.0,
        burst=1.0,
        timeout=0.3,
        attempts=4,
        backoff=0.01,
        backoff_max=0.01,
        rate_limit_backoff=0.01,
        max_wait=0.2,
    )
    sim.seed_c2c(APP, "a", "b", "k")
    sim.fail_next(4, 60007)
    started = time.monotonic()
    outcome = await api.recall_c2c(APP, "a", "b", "k")
    elapsed = time.monotonic() - started
    assert ("failed", 60007) == (outcome.status, outcome.tencent_code)
    assert elapsed <= api.longest_call
    assert len(sim.requests) < 4  # without the deadline every retry waits a second for its token
