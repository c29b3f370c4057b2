"""Random overlapping faults over the whole deployment, then a checker (issue 22):
``python -m tests.faults.chaos --duration 30m --seed N`` (``make chaos``).

Three private RabbitMQ nodes, two relays on the same endpoint list (each its own spool, on a small
tmpfs as root), a private Redis as the correlation store and the Tencent simulator behind the gateway.
Recall callbacks, after-send callbacks and gateway requests run the whole time, each logged with its
answer, while the seeded schedule (tests.faults.chaos_plan) kills, freezes, cuts off and alarms nodes,
kills and stops relays, kills and freezes Redis, fills a spool's disk and slows or breaks Tencent.
Then everything is brought back, the spools drain, the queues are read and tests.faults.chaos_check
decides. The report: bench/results/chaos-<date>.md and a PNG timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson

from relay import broker
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND
from tests.faults.chaos_check import Request, Verdict, check
from tests.faults.chaos_deploy import RedisServer, SpoolDisk, spool_stats
from tests.faults.chaos_plan import KINDS, Fault, Plan, parse_duration, plan
from tests.faults.cluster import Cluster
from tests.faults.cluster_scenarios import cut_off, heal
from tests.faults.harness import APP, TOKEN, RelayProcess, make_callback
from tests.faults.node import PrivateRabbit, free_port
from tests.tencent_sim import SentCallback, TencentSim

KEY = "c4a0ef4e3b1d2f8a9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"  # the simulator's secret key
API_TOKEN = "chaos-moderation-token-0123"
EXCHANGE, MODERATION, AUDIT = "chaos.x", "chaos.moderation", "chaos.audit"
SPOOL_TMPFS_MB = 48
SPOOL_MAX_BYTES = 16 << 20  # SQLite's file may take twice the budget (docs/guarantees.md)
TENCENT_DELAY = 3.0  # past RELAY_TENCENT_TIMEOUT (2 s): every attempt times out


@dataclass(frozen=True)
class Profile:
    duration: float
    rate: float = 200.0  # recall callbacks per second
    send_rate: float = 20.0  # after-send callbacks per second
    gateway_rate: float = 5.0  # gateway requests per second
    mean_gap: float = 6.0  # seconds between fault arrivals, on average


@dataclass
class AsRun:
    fault: Fault
    start: float | None = None
    end: float | None = None
    note: str = ""


@dataclass
class Chaos:
    """One run: the deployment, the load, the faults as they happened, and what was measured."""

    root: Path
    profile: Profile
    plan: Plan
    cluster: Cluster = field(init=False)
    redis: RedisServer = field(init=False)
    sim: TencentSim = field(init=False)
    relays: list[RelayProcess] = field(default_factory=list)
    disks: list[SpoolDisk] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    relay_down: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    as_run: list[AsRun] = field(default_factory=list)
    in_doubt: dict[tuple[int, int], int] = field(default_factory=dict)  # (relay, process) → last scrape
    spool_found: int = 0
    repaired: list[str] = field(default_factory=list)
    surprises: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, relay, spool events)
    t0: float = 0.0
    _down: set[int] = field(default_factory=set)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cluster = Cluster(self.root / "cluster")
        self.redis = RedisServer(self.root / "redis")
        self.sim = TencentSim({APP: KEY})

    def now(self) -> float:
        return time.monotonic() - self.t0

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- the deployment ----------------------------------------------------------------------------

    async def start(self) -> bool:
        """Start everything; True if the spools are on their own tmpfs (spool_full can be injected)."""
        await asyncio.to_thread(self.cluster.start)
        await asyncio.to_thread(self.redis.start)
        await self.sim.start()
        tmpfs = True
        for i in range(2):
            workdir = self.root / f"r{i}"
            disk = SpoolDisk(workdir / "spool", SPOOL_TMPFS_MB)
            tmpfs = disk.mount() and tmpfs
            self.disks.append(disk)
            relay = RelayProcess(
                workdir,
                self.cluster.urls_from(i),
                EXCHANGE,
                MODERATION,
                RELAY_AUDIT_QUEUES=AUDIT,
                RELAY_REDIS_URL=self.redis.url,
                RELAY_API_HOST="127.0.0.1",
                RELAY_API_PORT=str(free_port()),
                RELAY_API_TOKENS=f"chaos-svc={API_TOKEN}",
                RELAY_TENCENT_SECRET_KEYS=f"{APP}={KEY}",
                RELAY_TENCENT_API_URL=self.sim.url,
                RELAY_TENCENT_TIMEOUT="2",
                RELAY_ENRICHMENT_TIMEOUT="0.5",
                RELAY_SPOOL_MAX_BYTES=str(SPOOL_MAX_BYTES),
                RELAY_SHUTDOWN_DELAY="1",
            )
            self.relays.append(relay)
            self.relay_down[i] = []
            await relay.start()
        for relay in self.relays:
            async with asyncio.timeout(120):
                while not (await relay.readiness())["broker"]:
                    await asyncio.sleep(0.2)
        for queue in (MODERATION, AUDIT):
            await asyncio.to_thread(self.cluster.await_queue_online, queue, 120)
        return tmpfs

    async def cleanup(self) -> None:
        """Everything stopped by PID, thawed first; tmpfs unmounted. Runs on success and failure."""
        for relay in self.relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.proc.kill()
                with contextlib.suppress(Exception):
                    await relay.wait(10)
            relay.close_log()
        with contextlib.suppress(Exception):
            await self.sim.close()
        await asyncio.to_thread(self.redis.stop)
        await asyncio.to_thread(self.cluster.stop)
        for disk in self.disks:
            disk.unmount()

    def api_url(self, relay: RelayProcess) -> str:
        return f"http://127.0.0.1:{relay.env['RELAY_API_PORT']}/v1/recalls"

    # -- load --------------------------------------------------------------------------------------

    async def drive(self, rate: float, send: Callable[[aiohttp.ClientSession, int], Awaitable[None]]) -> None:
        """Open loop: request *n* at t0 + n / rate until the run's duration, whatever came before."""
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as session:
            tasks = set()
            n = 0
            while (due := n / rate) < self.profile.duration:
                if (delay := due - self.now()) > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(send(session, n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            await asyncio.gather(*tasks)

    async def _post(self, session: aiohttp.ClientSession, req: Request, url: str, body: bytes, **kw: Any) -> Any:
        self.requests.append(req)
        answer: Any = None
        try:
            async with session.post(url, data=body, **kw) as response:
                req.status = response.status
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            if req.status is None:
                req.error = type(exc).__name__
        req.end = self.now()
        return answer

    async def recall(self, session: aiohttp.ClientSession, n: int) -> None:
        i = n % 2
        command, body, ids = make_callback(n)
        req = Request("recall", i, self.now(), event_ids=ids)
        url = f"{self.relays[i].base}/tencent-im/callback?{callback_query(command, APP, TOKEN)}"
        answer = await self._post(session, req, url, body)
        if isinstance(answer, dict) and answer.get("ErrorInfo"):
            req.code = str(answer["ErrorInfo"])

    async def after_send(self, session: aiohttp.ClientSession, n: int) -> None:
        i = n % 2
        body = {
            "CallbackCommand": C2C_SEND,
            "From_Account": f"u_{n % 10}",
            "To_Account": f"u_{(n + 1) % 10}",
            "MsgKey": f"{n}_{secrets.randbelow(10**9)}_{int(time.time())}",
            "MsgTime": int(time.time()),
            "SendMsgResult": 0,
        }
        req = Request("send", i, self.now())
        url = f"{self.relays[i].base}/tencent-im/callback?{callback_query(C2C_SEND, APP, TOKEN)}"
        answer = await self._post(session, req, url, orjson.dumps(body))
        if isinstance(answer, dict) and answer.get("ErrorInfo"):
            req.code = str(answer["ErrorInfo"])

    async def gateway(self, session: aiohttp.ClientSession, n: int) -> None:
        """A moderation tool's recall: a C2C message, or two group messages, seeded in the simulator."""
        i = n % 2
        request_id = f"chaos-{self.plan.seed}-{n}"
        if n % 2:
            sender, receiver, key = f"g_{n % 7}", f"g_{(n + 3) % 7}", f"{n}_{self.plan.seed}_chaos"
            self.sim.seed_c2c(APP, sender, receiver, key)
            conversation: dict[str, Any] = {"type": "c2c", "sender": sender, "receiver": receiver}
            messages: list[dict[str, Any]] = [{"msgKey": key}]
        else:
            group = f"@TGS#chaos{n % 3}"
            seqs = [n * 10 + 1, n * 10 + 2]
            for seq in seqs:
                self.sim.seed_group(APP, group, seq, msg_id=f"144115-{group}-{seq}")
            conversation = {"type": "group", "groupID": group}
            messages = [{"msgSeq": seq} for seq in seqs]
        body = {
            "requestID": request_id,
            "sdkAppID": APP,
            "conversation": conversation,
            "messages": messages,
            "reason": "chaos",
            "moderator": {"userID": "mod_chaos"},
        }
        req = Request("gateway", i, self.now(), request_id=request_id)
        headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
        answer = await self._post(session, req, self.api_url(self.relays[i]), orjson.dumps(body), headers=headers)
        if isinstance(answer, dict):
            if req.status == 200:
                req.results = list(answer.get("results") or [])
            elif isinstance(answer.get("error"), dict):
                req.code = str(answer["error"].get("code"))

    async def route_callbacks(self, until: asyncio.Event) -> None:
        """Tencent calls one URL; a load balancer sends it to a relay that is up (r0 first)."""
        current = None
        while not until.is_set():
            up = [i for i in range(len(self.relays)) if i not in self._down] or [0]
            if up[0] != current:
                current = up[0]
                self.sim.callbacks_to(f"{self.relays[current].base}/tencent-im/callback", APP, TOKEN, when="after")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), 0.25)

    async def monitor(self, until: asyncio.Event) -> None:
        """Each second: spool depth per relay; every other second the in-doubt counter of each process;
        a relay that exited without a fault is a violation (and is started again)."""
        tick = 0
        while not until.is_set():
            for i, relay in enumerate(self.relays):
                if i in self._down:
                    continue
                if relay.proc is not None and relay.proc.poll() is not None:
                    self.surprises.append(f"r{i} exited by itself with {relay.proc.returncode} at {self.now():.1f} s")
                    await self._restart(i, self.now())
                    continue
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, OSError):
                    async with asyncio.timeout(2):
                        ready = await relay.readiness()
                    self.samples.append((self.now(), i, int(ready["spool"]["events"])))
                    if tick % 2 == 0:
                        await self.scrape(i)
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), 1.0)

    async def scrape(self, i: int) -> None:
        relay = self.relays[i]
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with asyncio.timeout(2):
                metrics = await relay.metrics()
            value = int(metrics.get("relay_publish_in_doubt_total", 0))
            key = (i, relay.starts)
            self.in_doubt[key] = max(self.in_doubt.get(key, 0), value)

    async def _restart(self, i: int, down_since: float) -> None:
        relay = self.relays[i]
        self._down.add(i)
        try:
            found = (await asyncio.to_thread(spool_stats, relay)).get("events", 0)
            self.spool_found += max(0, found)
            await relay.start()
        finally:
            self.relay_down[i].append((down_since, self.now()))
            self._down.discard(i)

    # -- faults ------------------------------------------------------------------------------------

    def node(self, target: str) -> PrivateRabbit:
        return self.cluster.nodes[int(target[1:])]

    async def inject(self, fault: Fault) -> None:
        record = AsRun(fault)
        self.as_run.append(record)
        await asyncio.sleep(max(0.0, fault.start - self.now()))
        group = self.lock(fault.group) if fault.group else contextlib.nullcontext()
        async with self.lock(fault.target), group:
            if self.now() > self.profile.duration - 3:
                record.note = "skipped: the run ended while an earlier fault recovered"
                return
            record.start = self.now()
            try:
                record.note = await self._carry_out(fault)
            except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
                record.note = f"injection failed: {exc!r}"[:200]
            record.end = record.end or self.now()
            if fault.group == "broker_down":
                await self._rejoin(record)

    async def _carry_out(self, fault: Fault) -> str:
        # A fault that started late is cut short where the load ends: the checker reads faults under load.
        kind, length = fault.kind, max(1.0, min(fault.length, self.profile.duration - 2 - self.now()))
        if kind in ("node_kill", "node_freeze", "node_partition"):
            node = self.node(fault.target)
            start, stop = {
                "node_kill": (node.kill, lambda: node.start(180)),
                "node_freeze": (node.freeze, node.thaw),
                "node_partition": (lambda: cut_off(self.cluster, node), lambda: heal(self.cluster, node)),
            }[kind]
            await asyncio.to_thread(start)
            await asyncio.sleep(length)
            await asyncio.to_thread(stop)
            return ""
        if kind in ("disk_alarm", "memory_alarm"):
            node = self.node(fault.target)
            on, off = (
                (("set_disk_free_limit", "100000GB"), ("set_disk_free_limit", "1MB"))
                if kind == "disk_alarm"
                else (("set_vm_memory_high_watermark", "absolute", "1"), ("set_vm_memory_high_watermark", "0.4"))
            )
            await asyncio.to_thread(node.ctl, *on)
            await asyncio.sleep(length)
            await asyncio.to_thread(node.ctl, *off)
            return ""
        if kind in ("relay_kill", "relay_term"):
            return await self._relay_down(int(fault.target[1:]), length, kind == "relay_kill")
        if kind == "spool_full":
            disk = self.disks[int(fault.target[1:])]
            written = await asyncio.to_thread(disk.fill)
            await asyncio.sleep(length)
            disk.empty()
            return f"filled {written >> 20} MiB"
        if kind in ("redis_kill", "redis_freeze"):
            await asyncio.to_thread(self.redis.kill if kind == "redis_kill" else self.redis.freeze)
            await asyncio.sleep(length)
            await asyncio.to_thread(self.redis.start if kind == "redis_kill" else self.redis.thaw)
            return ""
        if kind == "tencent_slow":
            self.sim.delay_next(10**9, TENCENT_DELAY)
        else:
            self.sim.http_error_next(10**9, random.Random(fault.start).choice((500, 502, 503)))
        await asyncio.sleep(length)
        self.sim.clear_faults()
        return ""

    async def _relay_down(self, i: int, length: float, kill: bool) -> str:
        relay = self.relays[i]
        await self.scrape(i)
        since = self.now()
        self._down.add(i)
        relay.signal(signal.SIGKILL if kill else signal.SIGTERM)
        code = await relay.wait(60)
        await asyncio.sleep(max(0.0, since + length - self.now()))
        await self._restart(i, since)
        return f"exit {code}"

    async def _rejoin(self, record: AsRun) -> None:
        """After a node fault: the cluster whole again before the next one (restart the app if needed)."""
        try:
            await asyncio.to_thread(self.cluster.await_running, 60)
        except TimeoutError:
            names = await asyncio.to_thread(self.cluster.repair, 240)
            self.repaired.extend(names)
            record.note = (record.note + f" restarted the app on {names} (broker limit)").strip()

    async def recover(self) -> None:
        """After the last fault: every node, Redis, relay and Tencent healthy again."""
        self.sim.clear_faults()
        for disk in self.disks:
            disk.empty()
        for node in self.cluster.nodes:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(node.thaw)
            if node.proc is None or node.proc.poll() is not None:
                await asyncio.to_thread(node.start, 180)
        try:
            await asyncio.to_thread(self.cluster.await_running, 90)
        except TimeoutError:
            self.repaired.extend(await asyncio.to_thread(self.cluster.repair, 240))
        if not self.redis.alive():
            await asyncio.to_thread(self.redis.start)
        self.redis.thaw()
        for i, relay in enumerate(self.relays):
            if relay.proc is None or relay.proc.poll() is not None:
                await self._restart(i, self.now())

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> Verdict:
        self.t0 = time.monotonic()
        stop = asyncio.Event()
        helpers = [asyncio.create_task(self.route_callbacks(stop)), asyncio.create_task(self.monitor(stop))]
        faults = [asyncio.create_task(self.inject(f)) for f in self.plan.faults]
        p = self.profile
        await asyncio.gather(
            self.drive(p.rate, self.recall),
            self.drive(p.send_rate, self.after_send),
            self.drive(p.gateway_rate, self.gateway),
        )
        await asyncio.gather(*faults)
        await self.recover()
        await self.sim.settle()
        stop.set()
        await asyncio.gather(*helpers)
        for relay in self.relays:
            await relay.wait_spool_empty(600)
        for i in range(len(self.relays)):
            await self.scrape(i)
        spool_left: dict[str, int] = {}
        for i, relay in enumerate(self.relays):
            await relay.stop()
            spool_left[f"r{i}"] = (await asyncio.to_thread(spool_stats, relay)).get("events", -1)
        delivered = Counter(m for m, _ in await collect(self.cluster.urls, MODERATION))
        audit = [orjson.loads(body) for _, body in await collect(self.cluster.urls, AUDIT)]
        # What the checker reads, kept beside requests.jsonl: a run can be checked again without its queues.
        (self.root / "queues.json").write_bytes(
            orjson.dumps(
                {
                    "delivered": delivered,
                    "audit": [{k: e.get(k) for k in ("type", "requestID", "revokedEventID")} for e in audit],
                    "relay_down": self.relay_down,
                    "in_doubt": sum(self.in_doubt.values()),
                    "spool_found": self.spool_found,
                    "spool_left": spool_left,
                },
                option=orjson.OPT_NON_STR_KEYS,
            )
        )
        verdict = check(
            [*self.requests, *self.tencent_callbacks()],
            delivered,
            audit,
            relay_down=self.relay_down,
            in_doubt=sum(self.in_doubt.values()),
            spool_found=self.spool_found,
            spool_left=spool_left,
            duration=p.duration,
        )
        verdict.violations.extend(self.surprises)
        verdict.counts["node apps restarted after a partition"] = ", ".join(self.repaired) or "none"
        return verdict

    def tencent_callbacks(self) -> list[Request]:
        """The simulator's recall callbacks as requests (checked like the load's)."""
        return [tencent_request(sent) for sent in self.sim.callbacks]


def tencent_request(sent: SentCallback) -> Request:
    """One callback the simulator sent, with the eventIDs the relay derives from it and the relay's
    refusal code (``ErrorInfo`` of its Tencent-style reply)."""
    query = CallbackQuery.parse(parse_qsl(sent.query))
    ids = [e.event_id for e in normalize(orjson.dumps(sent.body), query, 0).events]
    code = None
    with contextlib.suppress(ValueError, AttributeError):
        code = orjson.loads(sent.reply).get("ErrorInfo") or None
    return Request("tencent", -1, 0.0, status=sent.status, code=code, event_ids=ids)


async def collect(urls: str, queue: str, settle: float = 3.0, timeout: float = 900.0) -> list[tuple[str, bytes]]:
    """Every message in *queue*: (message_id, body), in order. A consumer with a deep prefetch (a
    ``basic.get`` per message takes minutes for a long run's queue); stops after *settle* s of quiet."""
    out: list[tuple[str, bytes]] = []
    arrived = asyncio.Event()

    async def take(message: Any) -> None:
        out.append((str(message.message_id), message.body))
        arrived.set()

    connection = await broker.connect(urls, name="chaos-collector")
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        q = await channel.get_queue(queue)
        tag = await q.consume(take, no_ack=True)
        async with asyncio.timeout(timeout):
            while True:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), settle)
                except TimeoutError:
                    break
        await q.cancel(tag)
    finally:
        await connection.close()
    return out


async def main_async(
    profile: Profile, seed: int, out_dir: Path | None, root: Path | None = None
) -> tuple[int, Path | None]:
    """One run; (exit status, report path). The seed is printed first and last."""
    from tests.faults.chaos_report import write_report

    root = root or Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    chaos = Chaos(root, profile, plan(seed, profile.duration, mean_gap=profile.mean_gap))
    print(f"chaos seed {seed}, {profile}, work dir {root}", flush=True)
    started = time.monotonic()
    try:
        tmpfs = await chaos.start()
        if not tmpfs:
            kinds = tuple(k for k in KINDS if k != "spool_full")
            chaos.plan = plan(seed, profile.duration, mean_gap=profile.mean_gap, kinds=kinds)
            print("no tmpfs for the spools (not root?): spool_full left out of the schedule", flush=True)
        print(
            f"deployment up after {time.monotonic() - started:.0f} s; {len(chaos.plan.faults)} faults planned",
            flush=True,
        )
        for fault in chaos.plan.faults:
            print(f"  {fault.start:7.1f} s  {fault.length:5.1f} s  {fault.label()}", flush=True)
        verdict = await chaos.run()
    except BaseException:
        print(f"chaos seed {seed}: ERROR (the run itself failed; work dir {root})", flush=True)
        raise
    finally:
        await chaos.cleanup()
    log = root / "requests.jsonl"
    rows = [*chaos.requests, *chaos.tencent_callbacks()]
    log.write_bytes(b"".join(orjson.dumps(r.row()) + b"\n" for r in rows))
    report = write_report(chaos, verdict, out_dir, tmpfs=tmpfs, wall=time.monotonic() - started) if out_dir else None
    for name, value in verdict.counts.items():
        print(f"  {name}: {value}")
    for violation in verdict.violations:
        print(f"VIOLATION: {violation}")
    print(f"chaos seed {seed}: {'PASS' if verdict.passed else 'FAIL'}; requests logged in {log}", flush=True)
    return (0 if verdict.passed else 1), report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", default="30m", help="30m, 180s, 1h (default 30m)")
    parser.add_argument("--seed", type=int, help="the schedule's seed (default: a fresh one, printed)")
    parser.add_argument("--rate", type=float, default=200.0, help="recall callbacks per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the report goes")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    profile = Profile(parse_duration(args.duration), rate=args.rate)
    return asyncio.run(main_async(profile, seed, args.out))[0]


if __name__ == "__main__":
    raise SystemExit(main())
