"""Callbacks and gateway requests against a relay on a private Redis (cluster or sentinel) while a
fault is injected: what each callback got, what was published, the enrichment of each recall, and
the gateway's answers. The relay runs in-process with a recording publisher (RabbitMQ is not under
test here); Redis is real."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import io
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, cast

import orjson
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from relay.app import API, GATEWAY, RUNTIME, create_app
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND
from tests.app.test_gateway_api import API_TOKEN, AUTH, SECRET, FakeTencent
from tests.conftest import RelayTestServer
from tests.helpers import APP, TOKEN, RecordingPublisher, make_settings

LAG = 0.5  # a message is recalled this long after it was sent
GATEWAY_EVERY = 0.2  # one gateway request each 200 ms (5/s), all in one conversation (one slot)
GATEWAY_CONVERSATION = ("u_gw_a", "u_gw_b")


@dataclass
class Outcome:
    """What a run saw; times are seconds from the start of the load."""

    callbacks: int = 0
    ok: int = 0
    status_5xx: int = 0
    other: int = 0
    lost: int = 0
    gateway: int = 0
    gateway_ok: int = 0
    gateway_503: int = 0
    gateway_other: int = 0
    gateway_503_outside: int = 0
    tencent_calls: int = 0
    fault_at: float = 0.0
    healed_at: float = 0.0
    recovered_after: float | None = None  # seconds from the fault until a full second of recalls all hit
    non_hits_after_heal: int = 0  # recalls not enriched after the failed node came back
    hit_rate: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> enrichment -> recalls
    readyz: set[int] = field(default_factory=set)
    # The longest GC pause and event-loop lag the relay saw (relay/runtime.py; it runs in this process)
    gc_max: float = 0.0
    loop_lag_max: float = 0.0
    store: dict[str, Any] = field(default_factory=dict)
    # After the fault: seconds from it (rounded down) -> non-hit results of the recalls posted then
    timeline: dict[int, dict[str, int]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "callbacks": self.callbacks,
            "200s": self.ok,
            "lost": self.lost,
            "5xx": self.status_5xx,
            "gateway": self.gateway,
            "gateway_200": self.gateway_ok,
            "gateway_503": self.gateway_503,
            "gateway_503_outside_failover": self.gateway_503_outside,
            "gateway_other": self.gateway_other,
            "tencent_calls": self.tencent_calls,
            "hit_before": self.hit_rate.get("before"),
            "hit_during": self.hit_rate.get("during"),
            "hit_after": self.hit_rate.get("after"),
            "results": self.results,
            "recovered_after_s": None if self.recovered_after is None else round(self.recovered_after, 2),
            "non_hits_after_heal": self.non_hits_after_heal,
            "readyz": sorted(self.readyz),
            "gc_max_ms": round(self.gc_max * 1000, 1),
            "loop_lag_max_ms": round(self.loop_lag_max * 1000, 1),
            "store": self.store,
            "non_hits_by_second_after_fault": self.timeline,
        }


Fault = Callable[[], Awaitable[None]]
P = ParamSpec("P")


def _stall_guarded(run: Callable[P, Awaitable[Outcome]]) -> Callable[P, Awaitable[Outcome]]:
    """*run* under stall_guard, for the length of its load plus a minute."""

    @functools.wraps(run)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> Outcome:
        length = sum(cast(float, kwargs[k]) for k in ("before", "outage", "after"))
        async with stall_guard(length + 60):
            return await run(*args, **kwargs)

    return guarded


@_stall_guarded
async def run_load(
    redis_env: dict[str, str],
    *,
    rate: float,
    before: float,
    fault: Fault | None,
    heal: Fault | None,
    outage: float,
    after: float,
    spool_dir: Path | None = None,
    budget: float = 0.25,
) -> Outcome:
    """Send callbacks at *rate*/s (half sends, half recalls of the messages sent LAG s before) and
    gateway requests at 5/s; *fault* runs after *before* s, *heal* *outage* s later; then *after* s.
    *budget*: RELAY_ENRICHMENT_TIMEOUT. A run that outlives its length by a minute fails with the
    stacks of its tasks."""
    directory = spool_dir or Path(tempfile.mkdtemp(prefix="relay-spool-"))
    settings = make_settings(
        directory,
        RELAY_API_TOKENS=f"moderation-svc={API_TOKEN}",
        RELAY_TENCENT_SECRET_KEYS=f"{APP}={SECRET}",
        RELAY_RECALL_JOIN_TTL="600",
        **{"RELAY_ENRICHMENT_TIMEOUT": str(budget), **redis_env},
    )
    publisher = RecordingPublisher()
    app = create_app(settings, publisher=publisher, registry=CollectorRegistry())
    tencent = FakeTencent()
    app[GATEWAY].recaller = tencent
    client = TestClient(RelayTestServer(app))
    api = TestClient(TestServer(app[API]))
    await client.start_server()
    await api.start_server()
    recalls: dict[str, tuple[float, int]] = {}  # msgKey -> (posted at, status)
    gateway: list[tuple[float, int, str]] = []
    statuses: list[int] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    out = Outcome()

    def now() -> float:
        return time.monotonic() - start

    async def post(command: str, body: dict[str, Any], key: str | None, *, count: bool = True) -> None:
        url = f"/tencent-im/callback?{callback_query(command, APP, TOKEN, platform='Android')}"
        at = now()
        try:
            async with asyncio.timeout(5):
                response = await client.post(url, data=orjson.dumps({"CallbackCommand": command, **body}))
                status = response.status
                await response.read()
        except TimeoutError:
            status = 599
        if not count:
            return
        statuses.append(status)
        if key is not None:
            recalls[key] = (at, status)

    async def ask(n: int) -> None:
        sender, receiver = GATEWAY_CONVERSATION
        body = {
            "requestID": f"gw-{n}-{start}",
            "sdkAppID": APP,
            "conversation": {"type": "c2c", "sender": sender, "receiver": receiver},
            "messages": [{"msgKey": f"gw_{n}_{int(start)}"}],
            "reason": "spam",
            "moderator": {"userID": "mod_7"},
        }
        at = now()
        try:
            async with asyncio.timeout(10):
                response = await api.post("/v1/recalls", data=orjson.dumps(body), headers=AUTH)
                status, text = response.status, await response.text()
        except TimeoutError:
            status, text = 599, "timeout"
        gateway.append((at, status, text[:200]))

    async def probe_ready() -> None:
        while True:
            response = await client.get("/readyz")
            out.readyz.add(response.status)
            body = await response.json()
            out.store = body.get("store", {})
            await asyncio.sleep(0.5)

    def spawn(coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # Warm-up, not counted: the first lookups open connections (and a cluster client learns the
    # slot map), which can take longer than the enrichment budget; then the breaker's second passes.
    for i in range(20):
        key = f"warm{i}_{int(start)}"
        await post(C2C_SEND, _send("u_warm", key), None, count=False)
        await post(C2C_RECALL, {"From_Account": "u_warm", "To_Account": "u_peer", "MsgKey": key}, None, count=False)
    await asyncio.sleep(1.5)
    # The relay and this load share pytest's process: a full collection of what the tests before
    # left behind would pause both. Frozen here, as `relay serve` freezes its start-up heap.
    gc.collect()
    gc.freeze()
    lag, gc_pauses = app[RUNTIME]
    lag.take_max(), gc_pauses.take_max()  # the worst from here on
    start = time.monotonic()
    prober = asyncio.create_task(probe_ready())
    total = before + outage + after
    interval = 2.0 / rate  # one send and one recall per interval
    n = 0
    next_gateway = 0.0
    faulted = healed = False
    try:
        while now() < total:
            t = now()
            if fault is not None and not faulted and t >= before:
                faulted, out.fault_at = True, t
                await fault()
            if heal is not None and faulted and not healed and t >= before + outage:
                healed = True
                await heal()
                out.healed_at = now()
            key = f"k{n}_{int(start)}"
            sender = f"u_{n % 50}"
            spawn(post(C2C_SEND, _send(sender, key), None))
            lagged = n - int(LAG / interval)
            if lagged >= 0:
                old = f"k{lagged}_{int(start)}"
                spawn(
                    post(C2C_RECALL, {"From_Account": f"u_{lagged % 50}", "To_Account": "u_peer", "MsgKey": old}, old)
                )
            if t >= next_gateway:
                next_gateway = t + GATEWAY_EVERY
                spawn(ask(n))
            n += 1
            await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        async with asyncio.timeout(15):
            while tasks:
                await asyncio.sleep(0.05)
    finally:
        gc.unfreeze()
        out.loop_lag_max, out.gc_max = lag.take_max(), gc_pauses.take_max()
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        await api.close()
        await client.close()
        gc.collect()  # what this run left unclosed is reported now, in this test, not in a later one
    _tally(out, statuses, recalls, gateway, publisher, tencent)
    return out


@contextlib.asynccontextmanager
async def stall_guard(limit: float) -> AsyncIterator[None]:
    """Fail a run that outlives *limit* seconds with every asyncio task's stack printed (captured by
    pytest): a stall becomes a failure that says where each task waited, not a bare timeout."""
    main = asyncio.current_task()
    assert main is not None
    stalled = False

    async def watch() -> None:
        nonlocal stalled
        await asyncio.sleep(limit)
        stalled = True
        print(f"=== the run outlived {limit:.0f} s; every task's stack ===")
        for task in asyncio.all_tasks():
            buffer = io.StringIO()
            task.print_stack(file=buffer)
            print(buffer.getvalue())
        main.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if stalled:
            raise AssertionError(f"the load run stalled past {limit:.0f} s (task stacks printed above)") from None
        raise
    finally:
        watcher.cancel()


def _send(sender: str, key: str) -> dict[str, Any]:
    return {
        "From_Account": sender,
        "To_Account": "u_peer",
        "MsgKey": key,
        "MsgId": f"cm-{key}",
        "MsgTime": int(time.time()),
        "MsgBody": [],
        "SendMsgResult": 0,
    }


def _tally(
    out: Outcome,
    statuses: list[int],
    recalls: dict[str, tuple[float, int]],
    gateway: list[tuple[float, int, str]],
    publisher: RecordingPublisher,
    tencent: FakeTencent,
) -> None:
    out.callbacks = len(statuses)
    out.ok = sum(1 for s in statuses if s == 200)
    out.status_5xx = sum(1 for s in statuses if s >= 500)
    out.other = out.callbacks - out.ok - out.status_5xx
    enrichment: dict[str, str] = {}
    for envelope in publisher.published:
        event = orjson.loads(envelope.body)
        if "enrichment" in event:  # not the gateway's audit events
            enrichment[event["msgKey"]] = event["enrichment"]
    out.lost = sum(1 for key, (_, status) in recalls.items() if status == 200 and key not in enrichment)
    ordered = sorted((at, enrichment.get(key, "lost")) for key, (at, status) in recalls.items() if status == 200)
    recovered = _recovered(ordered, out.fault_at) if out.fault_at else 0.0
    if out.fault_at:
        out.recovered_after = recovered - out.fault_at
    phases: dict[str, list[str]] = {"before": [], "during": [], "after": []}
    for at, result in ordered:
        phase = "before" if not out.fault_at or at < out.fault_at else "during" if at < recovered else "after"
        phases[phase].append(result)
        if out.fault_at and at >= out.fault_at and result != "hit":
            second = out.timeline.setdefault(int(at - out.fault_at), {})
            second[result] = second.get(result, 0) + 1
        if out.healed_at and at >= out.healed_at and result != "hit":
            out.non_hits_after_heal += 1
    out.hit_rate = {p: round(sum(r == "hit" for r in rs) / len(rs), 3) for p, rs in phases.items() if rs}
    out.results = {p: dict(Counter(rs)) for p, rs in phases.items() if rs}
    out.gateway = len(gateway)
    out.gateway_ok = sum(1 for _, s, _ in gateway if s == 200)
    out.gateway_503 = sum(1 for _, s, t in gateway if s == 503 and "store_unavailable" in t)
    out.gateway_other = out.gateway - out.gateway_ok - out.gateway_503
    # A 503 outside [fault, recovery + 1 s] would be a 503 not caused by the failover.
    out.gateway_503_outside = sum(
        1 for at, s, _ in gateway if s == 503 and not (out.fault_at and out.fault_at <= at <= recovered + 1.0)
    )
    out.tencent_calls = len(tencent.calls)


def _recovered(ordered: list[tuple[float, str]], fault_at: float) -> float:
    """When enrichment came back: the first recall after the fault that starts a full second in
    which every recall was a hit (the recall lag, LAG, is included: those recalls were posted then)."""
    after = [(at, result) for at, result in ordered if at >= fault_at]
    for i, (start, result) in enumerate(after):
        if result != "hit":
            continue
        window = [r for at, r in after[i:] if at < start + 1.0]
        if after[-1][0] >= start + 1.0 and all(r == "hit" for r in window):
            return start
    return after[-1][0] if after else fault_at
