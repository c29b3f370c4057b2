"""A Tencent IM REST simulator for the recall gateway's tests: the three recall APIs on 127.0.0.1.

It behaves like Tencent's REST recall APIs as their documentation describes them (docs/recall-gateway.md
sums up what the relay relies on): it checks the UserSig with its own decoding (not relay's, so each
cross-checks the other), the query, the required fields and the limit of 10 per call; it answers
200 calls/s per API per app and a rate-limit code past that; it keeps the messages a test seeds and
answers not found / already recalled truthfully; and it sends the matching signed recall callback to
the relay, before its HTTP answer, after it, or not at all. Faults are scripted per call. Everything
it saw is recorded.

    async with TencentSim({"1400000001": KEY}) as sim:
        sim.seed_group("1400000001", "@TGS#1", 101, msg_id="144115-1767225500-1")
        sim.callbacks_to(f"http://127.0.0.1:{port}/tencent-im/callback", "1400000001", TOKEN, when="before")
        sim.fail_next(1, code=60008)            # or http_error_next / drop_next / delay_next
        ... call sim.url ...
        await sim.settle()                      # callbacks sent "after" have been answered
        print(sim.dump())                       # requests, answers and callbacks, in order
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web

from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL
from relay.tencent.samples import callback_query

APIS = {
    "openim/admin_msgwithdraw": "admin_msgwithdraw",
    "group_open_http_svc/group_msg_recall": "group_msg_recall",
    "official_account_open_http_svc/official_account_msg_recall": "official_account_msg_recall",
}
LIMIT_PER_SECOND = 200  # per API per app
MAX_ITEMS = 10
REASON_BYTES = 100
# Not found in an official account: undocumented; the group service's code is the likely one.
OA_NOT_FOUND = 10030

When = Literal["before", "after", "never"]
Answer = dict[str, Any]


def usersig_code(sig: str, app: str, identifier: str, key: str, now: float) -> int:
    """0 if *sig* is a valid TLSSigAPIv2 UserSig, else the code Tencent answers. Written apart
    from relay.gateway.usersig on purpose: the two implementations check each other."""
    try:
        packed = base64.b64decode(sig.replace("*", "+").replace("-", "/").replace("_", "="), validate=True)
        doc = json.loads(zlib.decompress(packed).decode())
        version, mac = doc["TLS.ver"], str(doc["TLS.sig"])
        sig_id, sig_app = str(doc["TLS.identifier"]), int(doc["TLS.sdkappid"])
        made, expire = int(doc["TLS.time"]), int(doc["TLS.expire"])
    except (ValueError, TypeError, KeyError, zlib.error):
        return 70003  # cannot be parsed (truncated)
    if version != "2.0":
        return 70003
    if str(sig_app) != app:
        return 70014  # made for another SDKAppID
    if sig_id != identifier:
        return 70013  # made for another UserID
    if now > made + expire:
        return 70001  # expired
    lines = f"TLS.identifier:{sig_id}\nTLS.sdkappid:{sig_app}\nTLS.time:{made}\nTLS.expire:{expire}\n"
    expected = base64.b64encode(hmac.new(key.encode(), lines.encode(), hashlib.sha256).digest()).decode()
    return 0 if hmac.compare_digest(expected.encode(), mac.encode()) else 70009


@dataclass
class _Message:
    code: int | None = None  # answered on every recall (a message that cannot be recalled)
    transient: list[int] = field(default_factory=list)  # answered first, one per recall attempt
    msg_id: str | None = None
    recalled: bool = False

    def recall(self, already: int) -> int:
        if self.transient:
            return self.transient.pop(0)
        if self.code is not None:
            return self.code
        if self.recalled:
            return already
        self.recalled = True
        return 0


@dataclass
class _Fault:
    kind: Literal["code", "http", "drop", "delay"]
    remaining: int
    value: float
    api: str | None
    app: str | None


@dataclass
class Received:
    """One request as the simulator saw it, and what it answered (status 0: connection dropped)."""

    number: int
    api: str
    app: str
    query: dict[str, str]
    body: Any
    usersig: int = -1  # 0 verified, a 7000x code, or -1 (not checked)
    status: int = 200
    answer: Answer | None = None


@dataclass
class SentCallback:
    """One recall callback sent to the relay, and its reply (``status`` None: it could not be sent)."""

    command: str
    app: str
    query: str
    body: dict[str, Any]
    before_answer: bool
    status: int | None = None
    reply: str = ""


@dataclass
class _Target:
    url: str
    token: str | None
    when: When
    delay: float


class TencentSim:
    """Tencent's REST recall APIs on 127.0.0.1. *keys*: SDKAppID → secret key; *admins*: the App
    admin identifiers; *clock*: Unix time for UserSig expiry and callback times."""

    def __init__(
        self,
        keys: Mapping[str, str],
        *,
        admins: Iterable[str] = ("administrator",),
        clock: Callable[[], float] = time.time,
        limit: int = LIMIT_PER_SECOND,
        rate_limit_code: int = 60007,
        group_recalled_code: int = 10030,  # a recalled seq probably answers "not found" (UNCONFIRMED)
    ) -> None:
        self.keys = dict(keys)
        self.admins = set(admins)
        self.clock = clock
        self.limit = limit
        self.rate_limit_code = rate_limit_code
        self.group_recalled_code = group_recalled_code
        self.requests: list[Received] = []
        self.callbacks: list[SentCallback] = []
        self.journal: list[str] = []  # requests, answers and callbacks in the order they happened
        self.rate_limited = 0
        self.peak: dict[tuple[str, str], int] = {}  # (app, api) -> most requests seen in one second
        self._c2c: dict[tuple[str, str, str, str], _Message] = {}
        self._groups: dict[tuple[str, str], str] = {}  # (app, GroupId) -> group Type
        self._group_msgs: dict[tuple[str, str, str, int], _Message] = {}
        self._accounts: set[tuple[str, str]] = set()
        self._oa_msgs: dict[tuple[str, str, str], _Message] = {}
        self._faults: list[_Fault] = []
        self._targets: dict[str, _Target] = {}
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v4/{service}/{command}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._client = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def settle(self) -> None:
        """Wait until every callback scheduled "after" an answer has been sent and answered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def close(self) -> None:
        self._closing.set()  # wakes scripted delays
        await self.settle()
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> TencentSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the store ------------------------------------------------------------------------------

    def seed_c2c(
        self,
        app: str,
        sender: str,
        receiver: str,
        msg_key: str,
        *,
        code: int | None = None,
        transient: Iterable[int] = (),
    ) -> None:
        """A C2C message that can be recalled (or answers *code*; *transient* codes come first)."""
        self._c2c[(app, sender, receiver, msg_key)] = _Message(code, list(transient))

    def seed_group(
        self,
        app: str,
        group_id: str,
        seq: int,
        *,
        topic_id: str | None = None,
        msg_id: str | None = None,
        group_type: str = "Public",
        code: int | None = None,
        transient: Iterable[int] = (),
    ) -> None:
        """A group (or topic) message; *msg_id* is the client message ID the callback carries."""
        self._groups[(app, group_id)] = "Community" if topic_id else group_type
        self._group_msgs[(app, group_id, topic_id or "", seq)] = _Message(code, list(transient), msg_id)

    def seed_official_account(
        self, app: str, account: str, msg_key: str, *, code: int | None = None, transient: Iterable[int] = ()
    ) -> None:
        self._accounts.add((app, account))
        self._oa_msgs[(app, account, msg_key)] = _Message(code, list(transient))

    def c2c_recalled(self, app: str, sender: str, receiver: str, msg_key: str) -> bool:
        return self._c2c[(app, sender, receiver, msg_key)].recalled

    def group_recalled(self, app: str, group_id: str, seq: int, topic_id: str | None = None) -> bool:
        return self._group_msgs[(app, group_id, topic_id or "", seq)].recalled

    def official_account_recalled(self, app: str, account: str, msg_key: str) -> bool:
        return self._oa_msgs[(app, account, msg_key)].recalled

    # --- scripting ------------------------------------------------------------------------------

    def fail_next(self, n: int, code: int, *, api: str | None = None, app: str | None = None) -> None:
        """The next *n* matching calls answer ``FAIL`` with *code* (and recall nothing)."""
        self._faults.append(_Fault("code", n, code, api, app))

    def http_error_next(self, n: int, status: int = 500, *, api: str | None = None, app: str | None = None) -> None:
        """The next *n* matching calls answer HTTP *status* with a plain-text body."""
        self._faults.append(_Fault("http", n, status, api, app))

    def drop_next(self, n: int, *, api: str | None = None, app: str | None = None) -> None:
        """The next *n* matching calls lose their connection before any answer (nothing recalled)."""
        self._faults.append(_Fault("drop", n, 0, api, app))

    def delay_next(self, n: int, seconds: float, *, api: str | None = None, app: str | None = None) -> None:
        """The next *n* matching calls are carried out, then answered *seconds* later."""
        self._faults.append(_Fault("delay", n, seconds, api, app))

    def clear_faults(self) -> None:
        """Forget every scripted fault not used up yet (a chaos run's Tencent outage ends)."""
        self._faults.clear()

    def callbacks_to(
        self, url: str, app: str, token: str | None = None, *, when: When = "after", delay: float = 0.0
    ) -> None:
        """Send *app*'s recall callbacks to *url* (signed with *token*): ``before`` the HTTP answer
        (the answer waits for the relay's reply), ``after`` it (*delay* s later), or ``never``."""
        self._targets[app] = _Target(url, token, when, delay)

    # --- reading what happened ------------------------------------------------------------------

    def bodies(self, api: str) -> list[Any]:
        """The JSON bodies the simulator received for *api*, in order."""
        return [r.body for r in self.requests if r.api == api]

    def dump(self) -> str:
        """Everything that happened, human-readable, UserSigs shown only as verified or not."""
        return "\n".join(self.journal)

    # --- serving --------------------------------------------------------------------------------

    def _take_fault(self, api: str, app: str) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining > 0 and fault.api in (None, api) and fault.app in (None, app):
                fault.remaining -= 1
                return fault
        return None

    def _over_limit(self, app: str, api: str) -> bool:
        now = asyncio.get_running_loop().time()
        window = self._windows.setdefault((app, api), deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        window.append(now)
        self.peak[(app, api)] = max(self.peak.get((app, api), 0), len(window))
        return len(window) > self.limit

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = f"{request.match_info['service']}/{request.match_info['command']}"
        api = APIS.get(path, path)
        query = dict(request.query)
        app = query.get("sdkappid", "")
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        rec = Received(len(self.requests) + 1, api, app, query, body)
        self.requests.append(rec)
        # The UserSig is a credential (an admin token until it expires): the dump never shows it.
        shown = "&".join(f"{k}={'<UserSig>' if k == 'usersig' else v}" for k, v in query.items())
        self.journal.append(f"#{rec.number} POST /v4/{path}?{shown}\n    {json.dumps(body, ensure_ascii=False)}")
        fault = self._take_fault(api, app)
        if fault is not None and fault.kind == "drop":
            rec.status = 0
            self.journal.append(f"#{rec.number} connection dropped (scripted)")
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if fault is not None and fault.kind == "http":
            rec.status = int(fault.value)
            self.journal.append(f"#{rec.number} → HTTP {rec.status} (scripted)")
            return web.Response(status=rec.status, text="simulated failure")
        answer, callback = self._answer(rec, api, app, query, body, fault)
        rec.answer = answer
        sig_note = {0: "UserSig verified", -1: "UserSig not checked"}.get(rec.usersig, f"UserSig refused {rec.usersig}")
        target = self._targets.get(app)
        if callback is not None and target is not None and target.when == "before":
            await self._send_callback(callback, app, target, request.remote, before=True)
        if fault is not None and fault.kind == "delay":
            self.journal.append(f"#{rec.number} answer held back {fault.value:g} s (scripted)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.value)
        self.journal.append(f"#{rec.number} → 200 {json.dumps(answer, ensure_ascii=False)} ({sig_note})")
        response = web.json_response(answer)
        if callback is not None and target is not None and target.when == "after":
            # Put the answer on the wire first, then call back: "after" holds by construction. A client
            # that gave up meanwhile (its timeout) does not undo the recall: the callback still goes.
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionResetError:
                self.journal.append(f"#{rec.number} the client had gone; the recall stands")
            task = asyncio.create_task(self._send_callback(callback, app, target, request.remote, before=False))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return response

    def _answer(
        self, rec: Received, api: str, app: str, query: dict[str, str], body: Any, fault: _Fault | None
    ) -> tuple[Answer, dict[str, Any] | None]:
        """The answer to one request and the callback it triggers (``None``: nothing recalled)."""
        if api not in APIS.values():
            return _fail(60009, "unknown API"), None
        if not app:
            return _fail(60012, "sdkappid is missing"), None
        key = self.keys.get(app)
        if key is None:
            return _fail(60006, "invalid SDKAppID"), None
        if self._over_limit(app, api):
            self.rate_limited += 1
            return _fail(self.rate_limit_code, "REST API call frequency exceeds the limit"), None
        if fault is not None and fault.kind == "code":
            return _fail(int(fault.value), "scripted failure"), None
        random = query.get("random", "")
        if query.get("contenttype") != "json" or not (random.isdigit() and int(random) < 2**32):
            return _fail(60002, "contenttype=json and a uint32 random are required"), None
        identifier = query.get("identifier", "")
        rec.usersig = usersig_code(query.get("usersig", ""), app, identifier, key, self.clock())
        if rec.usersig:
            return _fail(rec.usersig, "UserSig check failed"), None
        if identifier not in self.admins:
            return _fail(60010, "the request needs an App admin"), None
        if not isinstance(body, dict):
            return _fail(60003, "the body is not a JSON object"), None
        if api == "admin_msgwithdraw":
            return self._c2c_recall(app, body)
        if api == "group_msg_recall":
            return self._group_recall(app, identifier, body)
        return self._oa_recall(app, body)

    def _c2c_recall(self, app: str, body: dict[str, Any]) -> tuple[Answer, dict[str, Any] | None]:
        sender, receiver, msg_key = body.get("From_Account"), body.get("To_Account"), body.get("MsgKey")
        if not isinstance(sender, str) or not sender:
            return _fail(90008, "From_Account is missing or invalid"), None
        if not isinstance(receiver, str) or not receiver:
            return _fail(90003, "To_Account is missing or invalid"), None
        if not isinstance(msg_key, str) or not msg_key:
            return _fail(90054, "MsgKey is missing or invalid"), None
        message = self._c2c.get((app, sender, receiver, msg_key))
        code = 20022 if message is None else message.recall(already=20023)
        if code:
            return _fail(code, _INFO.get(code, "recall failed")), None
        callback = {
            "CallbackCommand": C2C_RECALL,
            "From_Account": sender,
            "To_Account": receiver,
            "MsgKey": msg_key,
            "UnreadMsgNum": 0,
            "EventTime": int(self.clock() * 1000),
        }
        return _ok(), callback

    def _group_recall(self, app: str, admin: str, body: dict[str, Any]) -> tuple[Answer, dict[str, Any] | None]:
        group_id, topic_id, seqs = body.get("GroupId"), body.get("TopicId"), body.get("MsgSeqList")
        if not isinstance(group_id, str) or not group_id:
            return _fail(10015, "GroupId is missing or invalid"), None
        if topic_id is not None and (not isinstance(topic_id, str) or not topic_id):
            return _fail(10004, "TopicId is invalid"), None
        if not isinstance(seqs, list) or not 1 <= len(seqs) <= MAX_ITEMS:
            return _fail(10004, f"MsgSeqList must hold 1 to {MAX_ITEMS} entries"), None
        if not all(isinstance(s, dict) and type(s.get("MsgSeq")) is int for s in seqs):
            return _fail(10004, "MsgSeqList entries must be {MsgSeq: int}"), None
        if problem := _reason_problem(body):
            return _fail(10004, problem), None
        group_type = self._groups.get((app, group_id))
        if group_type is None:
            return _fail(10010, "the group does not exist"), None
        results, recalled = [], []
        for entry in seqs:
            seq = entry["MsgSeq"]
            message = self._group_msgs.get((app, group_id, topic_id or "", seq))
            code = 10030 if message is None else message.recall(already=self.group_recalled_code)
            results.append({"MsgSeq": seq, "RetCode": code})
            if code == 0 and message is not None:
                recalled.append({"MsgSeq": seq, **({"MsgId": message.msg_id} if message.msg_id else {})})
        callback = None
        if recalled:
            callback = {
                "CallbackCommand": GROUP_RECALL,
                "Operator_Account": admin,  # a REST recall names the App admin (doc sample: "admin")
                "Type": group_type,
                "GroupId": group_id,
                **({"TopicId": topic_id} if topic_id else {}),
                "MsgSeqList": recalled,
                "EventTime": int(self.clock() * 1000),
            }
        return {**_ok(), "RecallRetList": results}, callback

    def _oa_recall(self, app: str, body: dict[str, Any]) -> tuple[Answer, dict[str, Any] | None]:
        account, keys = body.get("Official_Account"), body.get("MsgKeyList")
        if not isinstance(account, str) or not account:
            return _fail(10004, "Official_Account is missing or invalid"), None
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_ITEMS:
            return _fail(10004, f"MsgKeyList must hold 1 to {MAX_ITEMS} entries"), None
        if not all(isinstance(k, str) and k for k in keys):
            return _fail(10004, "MsgKeyList entries must be strings"), None
        if problem := _reason_problem(body):
            return _fail(10004, problem), None
        if (app, account) not in self._accounts:
            return _fail(10010, "the official account does not exist"), None
        results, recalled = [], []
        for msg_key in keys:
            message = self._oa_msgs.get((app, account, msg_key))
            code = OA_NOT_FOUND if message is None else message.recall(already=OA_NOT_FOUND)
            results.append({"MsgKey": msg_key, "RetCode": code})
            if code == 0:
                recalled.append({"MsgKey": msg_key})
        callback = None
        if recalled:
            callback = {
                "CallbackCommand": OFFICIAL_ACCOUNT_RECALL,
                "Official_Account": account,
                "WithdrawMsgList": recalled,
                "EventTime": int(self.clock() * 1000),
            }
        return {**_ok(), "RecallRetList": results}, callback

    async def _send_callback(
        self, body: dict[str, Any], app: str, target: _Target, client_ip: str | None, *, before: bool
    ) -> None:
        """POST the callback as Tencent does: signed query, OptPlatform=RESTAPI, 2 s timeout, no retry."""
        if not before and target.delay:
            await asyncio.sleep(target.delay)
        command = body["CallbackCommand"]
        query = callback_query(
            command,
            app,
            target.token,
            request_time=int(self.clock()),
            platform="RESTAPI",
            client_ip=client_ip or "127.0.0.1",
        )
        sent = SentCallback(command, app, query, body, before)
        self.callbacks.append(sent)
        assert self._client is not None
        try:
            async with self._client.post(
                f"{target.url}?{query}",
                data=json.dumps(body, ensure_ascii=False).encode(),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=2.0),
            ) as resp:
                sent.status, sent.reply = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent.reply = type(exc).__name__
        when = "before the answer" if before else "after the answer"
        self.journal.append(
            f"callback {command} ({when}) {json.dumps(body, ensure_ascii=False)}\n    → {sent.status} {sent.reply}"
        )


_INFO = {20022: "message not found", 20023: "message already recalled"}


def _ok() -> Answer:
    return {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}


def _fail(code: int, info: str) -> Answer:
    return {"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info}


def _reason_problem(body: dict[str, Any]) -> str:
    reason = body.get("Reason")
    if reason is None:
        return ""
    if not isinstance(reason, str):
        return "Reason must be a string"
    if len(reason.encode()) > REASON_BYTES:
        return f"Reason is longer than {REASON_BYTES} bytes"
    return ""


async def _serve(args: Any) -> None:
    """Run the simulator until interrupted, printing what happens (``python -m tests.tencent_sim``)."""
    sim = TencentSim({args.app: args.key}, admins=[args.admin])
    for spec in args.seed_group:
        group, _, seqs = spec.partition(":")
        group, _, topic = group.partition("/")
        for seq in seqs.split(","):
            sim.seed_group(args.app, group, int(seq), topic_id=topic or None, msg_id=f"144115-{group}-{seq}")
    for spec in args.seed_c2c:
        sender, receiver, key = spec.split(":", 2)
        sim.seed_c2c(args.app, sender, receiver, key)
    for spec in args.seed_official_account:
        account, _, key = spec.partition(":")
        sim.seed_official_account(args.app, account, key)
    if args.callback:
        sim.callbacks_to(args.callback, args.app, args.token, when=args.when)
    print(f"Tencent REST simulator on {await sim.start(args.port)} (RELAY_TENCENT_API_URL)", flush=True)
    shown = 0
    try:
        while True:
            await asyncio.sleep(0.2)
            for line in sim.journal[shown:]:
                print(line, flush=True)
            shown = len(sim.journal)
    finally:
        await sim.close()


if __name__ == "__main__":  # pragma: no cover - a manual tool (docs/recall-gateway.md, "Trying it")
    import argparse

    parser = argparse.ArgumentParser(description="Tencent IM's recall REST APIs, simulated, for trying the gateway.")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--app", default="1400000001")
    parser.add_argument("--key", required=True, help="the secret key (as in RELAY_TENCENT_SECRET_KEYS)")
    parser.add_argument("--admin", default="administrator")
    parser.add_argument("--callback", help="the relay's callback URL: recall callbacks go there")
    parser.add_argument("--token", help="the callback token (as in RELAY_CALLBACK_TOKENS)")
    parser.add_argument("--when", choices=["before", "after", "never"], default="after")
    parser.add_argument("--seed-group", action="append", default=[], metavar="GROUP[/TOPIC]:SEQ,SEQ")
    parser.add_argument("--seed-c2c", action="append", default=[], metavar="SENDER:RECEIVER:MSGKEY")
    parser.add_argument("--seed-official-account", action="append", default=[], metavar="ACCOUNT:MSGKEY")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args()))
