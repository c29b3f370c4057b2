"""Differential test of the two HTTP front ends: the same bytes, sent on real sockets to a relay
with the fast path and to one without (``RELAY_HTTP_FAST_PATH=off``), must get the same answers,
at once or at a keep-alive deadline alike, publish the same events and leave the connection in the
same state (kept or closed).

Hypothesis writes the traffic: header sets and duplicates, content encodings, line ends, methods,
versions, framing mistakes, pipelines, and splits into separate packets. Examples per run follow
``HYPOTHESIS_PROFILE``: ``ci`` (the default) runs 150, ``long`` runs 5,000
(``HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/app/test_differential.py``).
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from relay.tencent.callback import C2C_RECALL
from tests.app.conftest import Served
from tests.helpers import OTHER_APP

EXAMPLES = {"ci": 150, "long": 5000}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
# Short timeouts so that traffic which leaves a server waiting costs the test a second or two.
ENV = {"RELAY_KEEPALIVE_TIMEOUT": "1.5", "RELAY_BODY_TIMEOUT": "0.5"}
PATH = "/tencent-im/callback"
QUIET = 0.05  # after the expected answers: how long to wait for anything more before probing
PATIENCE = 3.0  # longest a server may take to answer or close (keep-alive + body timeouts, margin)
# An answer (or a close) this long after the last packet came at a keep-alive deadline, not at once:
# the front ends must agree on that too (a fast path holding a head aiohttp answers at once would
# otherwise only show as a delay). Far from both the body timeout and the keep-alive timeout.
LATE = 1.0
# Asks "is this connection still served?": a before-event callback is answered OK and publishes nothing.
PROBE = (
    f"POST {PATH}?SdkAppid={OTHER_APP}&CallbackCommand=C2C.CallbackBeforeSendMsg HTTP/1.1\r\n"
    "Host: relay\r\nContent-Length: 2\r\n\r\n{}"
).encode()


# -- the traffic ---------------------------------------------------------------------------------


def recall(key: int) -> bytes:
    return orjson.dumps(
        {
            "CallbackCommand": C2C_RECALL,
            "From_Account": "u_alice",
            "To_Account": "u_bob",
            "MsgKey": f"7_{key}_1767225600",
            "EventTime": 1767225600000,
        }
    )


COMMANDS = [C2C_RECALL, "C2C.CallbackBeforeSendMsg", "C2C.CallbackAfterSendMsg", "Some.Other", None]
QUERIES = ["unknown-app", "no-app", "escaped", "plus"]
TARGETS = ["/tencent-im/callback/", "/healthz", "/"]
METHODS = ["GET", "PUT", "post"]
VERSIONS = ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "HTTP/1.10"]
BODIES = ["gzip", "empty", "broken", "array"]
LENGTHS = ["absent", "twice", "conflict", "padded", "zero-led", "short", "long", "huge"]
LINE_ENDS = ["lf", "one-lf", "one-cr", "crcrlf"]
# Headers a request may carry besides Host, Content-Length and Transfer-Encoding; several of the
# same name may be drawn (aiohttp refuses a second one of its singleton headers).
EXTRA_HEADERS: list[tuple[str, str]] = [
    ("Content-Type", "application/json"),
    ("User-Agent", "Tencent-IM"),
    ("Content-Encoding", "gzip"),
    ("Content-Encoding", "identity"),
    ("Content-Encoding", "Identity "),
    ("Content-Encoding", "deflate"),
    ("Content-Encoding", "br"),
    ("Content-Encoding", ""),
    ("Connection", "close"),
    ("Connection", "keep-alive"),
    ("Connection", "Upgrade"),
    ("Expect", "100-continue"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-For", "203.0.113.\xe9"),
    ("Accept", "*/*"),
    ("ETag", '"v1"'),
    ("Server", "edge"),
    ("Max-Forwards", "3"),
    ("Content-Location", "/x"),
    ("Content-Range", "bytes 0-1/2"),
    ("Keep-Alive", "timeout=5"),
    ("X-Odd", "a\x7fb"),
    ("X-Odd", "caf\xe9"),
    ("X-Odd", "\ta b\t"),
    ("X-Empty", ""),
]
# Lines that are not "name: value" (or are, with something aiohttp refuses in them).
ODD_LINES = [
    " folded",
    "X A: b",
    "NoColon",
    ": no-name",
    "X-Nul: a\x00b",
    "X-Ctl: a\x01b",
    "X-\xe9: b",
    "X-Long: " + "a" * 8200,
    "\r\n".join(["X-Many: y"] * 130),
]
# What one request may get wrong or unusual; a request has none, one or two of these.
CHANGES = [
    "header",
    "header",
    "host",
    "length",
    "chunked",
    "odd-line",
    "line-ends",
    "command",
    "query",
    "body",
    "case",
    "method",
    "version",
    "target",
    "leading-crlf",
]


@st.composite
def one_request(draw: st.DrawFn) -> bytes:
    """One HTTP/1.x request: a well-formed recall callback with none, one or two changes."""
    changes = draw(st.lists(st.sampled_from(CHANGES), max_size=draw(st.sampled_from([0, 1, 1, 2]))))
    key = draw(st.integers(0, 10**6))
    command = draw(st.sampled_from(COMMANDS)) if "command" in changes else C2C_RECALL
    shape = draw(st.sampled_from(QUERIES)) if "query" in changes else "plain"
    app = {"unknown-app": "1999999999", "escaped": "%31400000002", "plus": OTHER_APP + "+"}.get(shape, OTHER_APP)
    query = [] if shape == "no-app" else [f"SdkAppid={app}"]
    if command is not None:
        query.append(f"CallbackCommand={command}")
    target = draw(st.sampled_from(TARGETS)) if "target" in changes else PATH
    if target != "/healthz":
        target += "?" + "&".join(query)
    method = draw(st.sampled_from(METHODS)) if "method" in changes else "POST"
    version = draw(st.sampled_from(VERSIONS)) if "version" in changes else "HTTP/1.1"

    kind = draw(st.sampled_from(BODIES)) if "body" in changes else "recall"
    body = {"recall": recall(key), "gzip": gzip.compress(recall(key), mtime=0), "empty": b""}.get(kind)
    body = body if body is not None else {"broken": b'{"MsgKey":', "array": b"[]"}[kind]

    headers = [("Host", "relay")] * (draw(st.sampled_from([0, 2])) if "host" in changes else 1)
    headers += draw(st.lists(st.sampled_from(EXTRA_HEADERS), min_size=1, max_size=3)) if "header" in changes else []
    if "chunked" in changes:
        headers.append(("Transfer-Encoding", "chunked"))
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        payload = body
    size = str(len(payload))
    lengths = {
        "exact": [size],
        "absent": [],
        "twice": [size, size],
        "conflict": [size, str(len(payload) + 1)],
        "padded": [f"  {size} "],
        "zero-led": [f"0{size}"],
        "short": [str(max(len(payload) - 2, 0))],
        "long": [str(len(payload) + 5)],
        "huge": ["1000000"],  # over RELAY_MAX_BODY_BYTES: 413, then the rest is read for 2 s
    }[draw(st.sampled_from(LENGTHS)) if "length" in changes else "exact"]
    headers += [("Content-Length", value) for value in lengths]
    lines = [f"{name}: {value}" for name, value in headers]
    if "odd-line" in changes:
        lines.append(draw(st.sampled_from(ODD_LINES)))
    lines = draw(st.permutations(lines))
    if "case" in changes:
        case = draw(st.sampled_from(["lower", "upper"]))
        lines = [getattr(n, case)() + s + v for n, s, v in (line.partition(":") for line in lines)]

    all_lines = [f"{method} {target} {version}", *lines, ""]
    ends = ["\r\n"] * len(all_lines)
    if "line-ends" in changes:
        style = draw(st.sampled_from(LINE_ENDS))
        if style == "lf":
            ends = ["\n"] * len(ends)
        else:
            ends[draw(st.integers(0, len(ends) - 1))] = {"one-lf": "\n", "one-cr": "\r", "crcrlf": "\r\r\n"}[style]
    head = "".join(line + end for line, end in zip(all_lines, ends, strict=True))
    if "leading-crlf" in changes:
        head = "\r\n" + head
    return head.encode("latin-1") + payload


@dataclass(frozen=True, slots=True)
class Traffic:
    """What one client sends on one connection: the packets, and how many requests they hold."""

    packets: list[bytes]
    requests: int


@st.composite
def traffic(draw: st.DrawFn) -> Traffic:
    """One to three requests back to back (pipelined), split into packets; now and then the client
    stops before the end (which costs a keep-alive timeout, so not often)."""
    requests = draw(st.lists(one_request(), min_size=1, max_size=3))
    data = b"".join(requests)
    if draw(st.sampled_from([False] * 24 + [True])):
        data = data[: draw(st.integers(1, len(data) - 1))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=3))))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return Traffic([data[a:b] for a, b in itertools.pairwise(bounds)], len(requests))


# -- one exchange --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a client saw: every response (status and stable code), then whether the connection
    was still served; and what the relay published meanwhile."""

    answers: list[tuple[int, str | None]]
    fate: str  # "closed", "kept", or what the probe got instead
    late: list[bool]  # for each answer, then for the close if any: whether it came after LATE
    events: list[bytes]


class Client(asyncio.Protocol):
    """The client end of one connection. Keeps every byte received even when the connection is
    then reset (a server closing with unread data sends RST), which asyncio's streams would turn
    into an exception that hides the answer already received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False
        self.changed = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.changed.set()

    def eof_received(self) -> None:
        self.closed = True
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def take_response(self) -> tuple[int, str | None] | None:
        """The next complete response as (status, ErrorInfo), removed from what was received."""
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = self.received[:end].decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = int(fields.get("content-length", "0"))
        if len(self.received) < end + 4 + size:
            return None
        content = bytes(self.received[end + 4 : end + 4 + size])
        del self.received[: end + 4 + size]
        code = None
        if fields.get("content-type", "").startswith("application/json"):
            code = orjson.loads(content).get("ErrorInfo")
        return int(lines[0].split()[1]), code

    async def next_response(self, timeout: float) -> tuple[int, str | None] | str:
        """The next response, or "eof" (the server closed the connection), or "quiet"."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while (response := self.take_response()) is None:
            if self.closed:
                return "eof"
            self.changed.clear()
            try:
                async with asyncio.timeout(max(give_up - loop.time(), 0)):
                    await self.changed.wait()
            except TimeoutError:
                return "quiet"
        return response


async def exchange(served: Served, sent: Traffic) -> Outcome:
    """Send the packets (5 ms apart), read every answer, then probe whether the connection lives."""
    published = len(served.publisher.published)
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(Client, "127.0.0.1", served.port)
    try:
        for i, packet in enumerate(sent.packets):
            if i:
                await asyncio.sleep(0.005)
            client.send(packet)
        answers: list[tuple[int, str | None]] = []
        late: list[bool] = []
        fate = ""
        sent_at = loop.time()
        give_up = sent_at + PATIENCE
        while not fate:
            finals = sum(1 for status, _ in answers if status >= 200)
            answer = await client.next_response(QUIET if finals >= sent.requests else give_up - loop.time())
            if answer == "eof":
                fate = "closed"
                late.append(loop.time() - sent_at > LATE)
            elif answer == "quiet":
                fate = "open"
            else:
                assert isinstance(answer, tuple)
                answers.append(answer)
                late.append(loop.time() - sent_at > LATE)
        if fate == "open":
            client.send(PROBE)
            probe = await client.next_response(PATIENCE)
            if probe == "eof":
                late.append(loop.time() - sent_at > LATE)
            fate = "closed" if probe == "eof" else "kept" if probe == (200, "") else f"probe answered {probe}"
    finally:
        transport.close()
    return Outcome(answers, fate, late, [e.body for e in served.publisher.published[published:]])


# -- the property --------------------------------------------------------------------------------


@pytest.fixture
async def relays(serve: Callable[..., Awaitable[Served]]) -> tuple[Served, Served]:
    """A relay with the fast path and one without, started once and shared by every example."""
    return await serve(**ENV), await serve(RELAY_HTTP_FAST_PATH="off", **ENV)


@pytest.mark.timeout(60 + EXAMPLES)  # about 0.1 s an example, and seconds for the few that wait
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The relays are started once for all examples on purpose; starting two per example is slow.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=traffic())
async def test_both_front_ends_answer_alike(relays: tuple[Served, Served], sent: Traffic) -> None:
    """Same statuses and codes, at the same moments (at once or at a deadline), same events, same
    connection fate, and never a 500."""
    note(f"packets: {sent.packets!r}")
    handed_over = relays[0].front.handed_over
    fast, plain = await asyncio.gather(*(exchange(served, sent) for served in relays))
    note(f"fast path: {fast}\naiohttp:   {plain}")
    # What the examples covered (pytest --hypothesis-show-statistics).
    event(f"answers {[status for status, _ in plain.answers]}, {plain.fate}")
    event("handed over" if relays[0].front.handed_over > handed_over else "fast path only")
    for outcome in (fast, plain):
        assert all(status < 500 or status == 503 for status, _ in outcome.answers), outcome
    assert plain == fast
