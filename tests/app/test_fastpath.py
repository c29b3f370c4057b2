"""The HTTP front end (relay.fastpath): simple callbacks on the fast path, the rest on aiohttp.

Raw sockets, so the tests control exactly which bytes arrive and when. Each test checks both the
answer and which front end gave it (``served`` / ``handed_over``), so a fast path that silently
handed everything to aiohttp would fail here.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from relay.app import create_app, make_runner
from relay.fastpath import FastPathServer, parse_head
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query, sample_body
from tests.app.conftest import Served
from tests.helpers import APP, NOW, OTHER_APP, TOKEN, RecordingPublisher, make_settings

PATH = "/tencent-im/callback"


def target(key: str = "k1") -> str:
    return f"{PATH}?{callback_query(C2C_RECALL, APP, TOKEN, request_time=int(NOW))}"


def body(key: str) -> bytes:
    data = sample_body("c2c")
    data["MsgKey"] = key
    return orjson.dumps(data)


def request(key: str, *, headers: str = "", path: str | None = None) -> bytes:
    payload = body(key)
    head = f"POST {path or target()} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(payload)}\r\n{headers}\r\n".encode() + payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        content = await reader.readexactly(int(headers["content-length"]))
    return status, headers, content


async def test_keepalive_callbacks_are_answered_on_the_fast_path(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve()
    reader, writer = await served.connect()
    for i in range(3):
        writer.write(request(f"k{i}"))
        status, headers, content = await read_response(reader)
        assert status == 200
        assert orjson.loads(content) == {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}
        assert headers["content-type"] == "application/json"
        assert headers["date"].endswith(" GMT")
        assert "connection" not in headers
    assert [orjson.loads(e.body)["msgKey"] for e in served.publisher.published] == ["k0", "k1", "k2"]
    assert (served.front.served, served.front.handed_over, served.via_aiohttp) == (3, 0, 0)


async def test_split_and_trickled_requests_stay_on_the_fast_path(serve: Callable[..., Awaitable[Served]]) -> None:
    """Headers and body in separate packets (what aiohttp's client does), and a head one byte at a time."""
    served = await serve()
    reader, writer = await served.connect()
    data = request("split")
    cut = data.index(b"\r\n\r\n") + 4
    writer.write(data[:cut])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(data[cut:])
    assert (await read_response(reader))[0] == 200
    for byte in request("trickled"):
        writer.write(bytes([byte]))
        await writer.drain()
    assert (await read_response(reader))[0] == 200
    assert (served.front.served, served.front.handed_over) == (2, 0)
    assert len(served.publisher.published) == 2


async def test_pipelined_requests_are_answered_in_order(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve()
    reader, writer = await served.connect()
    bad = (
        f"POST {PATH}?SdkAppid={APP}&CallbackCommand={C2C_RECALL} HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    writer.write(request("p1") + bad.encode() + request("p2"))
    answers = [await read_response(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 401, 200]
    assert b"missing_signature" in answers[1][2]
    assert served.front.served == 3


async def test_a_client_far_ahead_is_throttled_not_buffered(serve: Callable[..., Awaitable[Served]]) -> None:
    """400 pipelined callbacks (about 350 KiB) written before reading any answer: all are answered,
    in order, while the relay buffers at most one request ahead (reading pauses, then resumes)."""
    served = await serve()
    reader, writer = await served.connect()
    requests = [request(f"ahead-{i}") for i in range(400)]

    async def send() -> None:
        writer.write(b"".join(requests))
        await writer.drain()

    sending = asyncio.create_task(send())
    answers = [await read_response(reader) for _ in requests]
    await sending
    assert {a[0] for a in answers} == {200}
    keys = [orjson.loads(e.body)["msgKey"] for e in served.publisher.published]
    assert keys == [f"ahead-{i}" for i in range(400)]
    assert (served.front.served, served.front.handed_over) == (400, 0)


async def test_other_requests_are_handed_to_aiohttp_on_the_same_connection(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(request("first"))
    assert (await read_response(reader))[0] == 200
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    status, headers, content = await read_response(reader)
    assert (status, orjson.loads(content)) == (200, {"status": "ok"})
    assert "aiohttp" in headers["server"]  # answered by aiohttp
    writer.write(request("after"))  # aiohttp keeps serving the connection, callbacks included
    assert (await read_response(reader))[0] == 200
    assert (served.front.served, served.front.handed_over, served.via_aiohttp) == (1, 1, 1)
    assert len(served.publisher.published) == 2


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # shapes the fast path does not take; aiohttp answers them as it always did
        pytest.param(request("te", headers="Transfer-Encoding: chunked\r\n"), 400, id="cl-and-te"),
        pytest.param(request("expect", headers="Expect: 100-continue\r\n"), 100, id="expect"),
        pytest.param(request("fold", headers="X-A: a\r\n b\r\n"), 400, id="obs-fold"),
        pytest.param(request("ctl", headers="X-A: a\x01b\r\n"), 400, id="control-byte"),
        pytest.param(request("space", headers="X-A : a\r\n"), 400, id="space-before-colon"),
        pytest.param(request("dup-cl", headers="Content-Length: 5\r\n"), 400, id="two-content-lengths"),
        pytest.param(request("http10").replace(b"HTTP/1.1", b"HTTP/1.0", 1), 200, id="http-1.0"),
        pytest.param(request("escaped", path=target().replace("SdkAppid", "Sdk%41ppid")), 200, id="percent-escape"),
        pytest.param(request("many", headers="X: y\r\n" * 130), 400, id="too-many-headers"),
        pytest.param(request("xff", headers="X-Forwarded-For: 203.0.113.\u00e9\r\n"), 200, id="non-ascii-xff"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n", 200, id="other-route"),
        pytest.param(f"POST {PATH} HTTP/1.1\r\nX: {'a' * 9000}\r\n\r\n".encode(), 400, id="long-head"),
    ],
)
async def test_unusual_requests_get_aiohttp_answers(
    serve: Callable[..., Awaitable[Served]], raw: bytes, status: int
) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(raw)
    async with asyncio.timeout(5):
        line = await reader.readline()
    assert int(line.split()[1]) == status, line
    assert (served.front.served, served.front.handed_over) == (0, 1)


async def test_connection_close_is_honoured(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(request("bye", headers="Connection: close\r\n"))
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (200, "close")
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    assert served.front.served == 1


async def test_oversized_body_is_refused_before_it_is_read(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(RELAY_MAX_BODY_BYTES="1024")
    reader, writer = await served.connect()
    writer.write(f"POST {target()} HTTP/1.1\r\nHost: r\r\nContent-Length: 5000000\r\n\r\n".encode() + b"x" * 4096)
    status, headers, content = await read_response(reader)
    assert (status, headers["connection"]) == (413, "close")
    assert b"body_too_large" in content
    async with asyncio.timeout(5):
        while await reader.read(65536):
            pass  # the server closes after the bounded lingering
    assert served.publisher.published == []


async def test_slow_body_times_out_with_408(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(RELAY_BODY_TIMEOUT="0.5")
    reader, writer = await served.connect()
    data = request("slow")
    writer.write(data[:-10])
    started = time.monotonic()
    status, headers, content = await read_response(reader)
    assert (status, headers["connection"]) == (408, "close")
    assert b"body_timeout" in content
    assert 0.4 < time.monotonic() - started < 3
    assert served.front.served == 1


async def test_refused_request_with_buffered_body_keeps_the_connection(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """A 401 answered before the body was needed: the body is skipped, the next request works."""
    served = await serve()
    reader, writer = await served.connect()
    writer.write(request("bad", path=target().replace("Sign=", "Sign=00")))
    assert (await read_response(reader))[0] == 401
    writer.write(request("good"))
    assert (await read_response(reader))[0] == 200
    assert served.front.served == 2


async def test_idle_connection_is_closed_after_keepalive_timeout(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(RELAY_KEEPALIVE_TIMEOUT="0.5")
    reader, writer = await served.connect()
    writer.write(request("once"))
    assert (await read_response(reader))[0] == 200
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    assert 0.3 < time.monotonic() - started < 3


async def test_shutdown_finishes_the_request_in_flight_and_closes_idle_connections(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    served = await serve()
    served.publisher.delay = 0.5
    idle_reader, _ = await served.connect()
    busy_reader, busy_writer = await served.connect()
    busy_writer.write(request("in-flight"))
    await asyncio.sleep(0.1)
    cleanup = asyncio.create_task(served.runner.cleanup())
    async with asyncio.timeout(0.3):
        assert await idle_reader.read() == b""  # the idle connection closes at once
    status, headers, _ = await read_response(busy_reader)  # the busy one is answered, then closed
    assert (status, headers["connection"]) == (200, "close")
    await asyncio.wait_for(cleanup, 10)
    assert len(served.publisher.published) == 1


async def test_fast_path_can_be_switched_off(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(RELAY_HTTP_FAST_PATH="off")
    assert not isinstance(served.runner.server, FastPathServer)
    reader, writer = await served.connect()
    writer.write(request("plain"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and "aiohttp" in headers["server"]
    assert served.via_aiohttp == 1


plain_query = st.text(alphabet="abcAZ019._~=&:-", max_size=40)


@given(plain_query)
def test_plain_queries_parse_as_aiohttp_parses_them(query: str) -> None:
    """The fast path decodes only queries whose bytes mean themselves, exactly as yarl does."""
    head = parse_head(f"POST {PATH}?{query} HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n".encode(), PATH.encode())
    assert head is not None
    assert head.query == list(URL(f"{PATH}?{query}").query.items())


@pytest.mark.parametrize("query", ["a=%41", "a=b+c", "a=b c", "a=\u00e9", "a=b;c", "a=b#c"])
def test_other_queries_are_left_to_aiohttp(query: str) -> None:
    assert (
        parse_head(f"POST {PATH}?{query} HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n".encode(), PATH.encode()) is None
    )


# -- one behaviour whichever front end reads the request (issue 14) -------------------------------

UNSIGNED = f"{PATH}?SdkAppid={OTHER_APP}&CallbackCommand={C2C_RECALL}"


def unsigned(
    key: str, *, headers: str = "Host: relay\r\n", payload: bytes | None = None, line_end: str = "\r\n"
) -> bytes:
    """A callback of the app accepted without a signature, with exactly the headers given."""
    data = body(key) if payload is None else payload
    head = f"POST {UNSIGNED} HTTP/1.1\r\n{headers}Content-Length: {len(data)}\r\n\r\n"
    return head.replace("\r\n", line_end).encode() + data


async def exchange(served: Served, raw: bytes) -> tuple[int, bytes, int]:
    """Send *raw*, read one answer: its status, its body, and how many events were published."""
    reader, writer = await served.connect()
    writer.write(raw)
    status, _, content = await read_response(reader)
    return status, content, len(served.publisher.published)


@pytest.mark.parametrize(
    ("raw", "status", "code", "fast"),
    [
        # 1. Host missing or twice, a singleton header twice: aiohttp's 400 (the fast path used to take them)
        pytest.param(unsigned("no-host", headers=""), 400, None, False, id="no-host"),
        pytest.param(unsigned("two-hosts", headers="Host: a\r\nHost: b\r\n"), 400, None, False, id="two-hosts"),
        pytest.param(
            unsigned("two-agents", headers="Host: a\r\nUser-Agent: x\r\nuser-agent: y\r\n"), 400, None, False, id="ua"
        ),
        pytest.param(
            unsigned("two-types", headers="Host: a\r\nContent-Type: a/b\r\nContent-Type: a/b\r\n"),
            400,
            None,
            False,
            id="content-type",
        ),
        # 2. and 3. Content-Encoding: refused alike (it was 200 vs 500, and 400 vs 200), never inflated
        pytest.param(
            unsigned("gzip-label", headers="Host: a\r\nContent-Encoding: gzip\r\n"),
            415,
            "unsupported_encoding",
            False,
            id="gzip-labelled-plain-body",
        ),
        pytest.param(
            unsigned("gzip", headers="Host: a\r\nContent-Encoding: gzip\r\n", payload=gzip.compress(body("gzip"))),
            415,
            "unsupported_encoding",
            False,
            id="gzip-body",
        ),
        pytest.param(
            unsigned("gzip-10", headers="Host: a\r\nContent-Encoding: gzip\r\n").replace(b"HTTP/1.1", b"HTTP/1.0"),
            415,
            "unsupported_encoding",
            False,
            id="gzip-http-1.0-was-a-500",
        ),
        pytest.param(
            unsigned("identity", headers="Host: a\r\nContent-Encoding: Identity\r\n"), 200, "", True, id="identity"
        ),
        # 4. bare LF line ends: aiohttp's 400 at once (the fast path used to wait for a CRLF head)
        pytest.param(unsigned("lf", line_end="\n"), 400, None, False, id="bare-lf"),
        pytest.param(unsigned("cr", headers="Host: a\rX: b\r\n"), 400, None, False, id="bare-cr"),
    ],
)
async def test_both_front_ends_give_the_same_answer(
    serve: Callable[..., Awaitable[Served]], raw: bytes, status: int, code: str | None, fast: bool
) -> None:
    """The issue's cases: the same status, code and events on both front ends, within a second
    (the keep-alive timeout is 15 s), and only what it fully understands on the fast path."""
    on, off = await serve(), await serve(RELAY_HTTP_FAST_PATH="off")
    async with asyncio.timeout(1):
        answers = [await exchange(served, raw) for served in (on, off)]
    assert answers[0] == answers[1]
    answer_status, content, published = answers[0]
    assert (status, code) == (answer_status, orjson.loads(content)["ErrorInfo"] if code is not None else None)
    assert published == (1 if status == 200 else 0)
    assert (on.front.served, on.front.handed_over) == ((1, 0) if fast else (0, 1))


async def slow_head_lifetime(port: int) -> float:
    """Seconds until the relay closes a connection whose head passes 8 KiB 1.2 s after it opened
    and never ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(f"POST {PATH} HTTP/1.1\r\nHost: relay\r\n".encode())
    await asyncio.sleep(1.2)
    writer.write(b"".join(f"X-Pad-{i}: {'a' * 900}\r\n".encode() for i in range(10)))  # past 8 KiB
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed without an answer
    writer.close()
    return time.monotonic() - started


async def test_hand_over_keeps_the_header_deadline(serve: Callable[..., Awaitable[Served]]) -> None:
    """5. A slow head that passes 8 KiB late, and so goes to aiohttp, is still cut at the keep-alive
    deadline of its connection, as it is without the fast path: no second period on aiohttp."""
    on = await serve(RELAY_KEEPALIVE_TIMEOUT="2")
    off = await serve(RELAY_KEEPALIVE_TIMEOUT="2", RELAY_HTTP_FAST_PATH="off")
    for served in (on, off):
        assert 1.8 < await slow_head_lifetime(served.port) < 2.8  # at the deadline, not 1.2 s + 2 s
    assert (on.front.handed_over, on.via_aiohttp) == (1, 0)


def test_hand_over_keeps_the_header_deadline_on_uvloop(tmp_path: Path) -> None:
    """relay serve runs on uvloop, whose timers are not asyncio's: the deadline carries over there too."""

    async def lifetime() -> float:
        app = create_app(make_settings(tmp_path, RELAY_KEEPALIVE_TIMEOUT="2"), publisher=RecordingPublisher())
        runner = make_runner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            return await slow_head_lifetime(int(runner.addresses[0][1]))
        finally:
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert 1.8 < runner.run(lifetime()) < 2.8


def test_aiohttp_keepalive_timer_is_where_keep_deadline_expects_it() -> None:
    """keep_deadline moves private attributes of aiohttp's RequestHandler: an aiohttp upgrade that
    renames them fails here (and in the test above) rather than silently giving slow heads longer."""
    assert {"_keepalive_handle", "_next_keepalive_close_time"} <= set(RequestHandler.__slots__)
    assert callable(RequestHandler._process_keepalive)


async def test_a_bad_request_pipelined_behind_a_callback_is_answered_as_aiohttp_answers_it(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """aiohttp answers nothing its parser completed in a chunk in which it then fails, only a 400:
    the fast path leaves such a chunk to aiohttp whole. In separate packets, both answer each."""
    bad = unsigned("bad", headers="Host: a\r\nHost: b\r\n")
    for fast_path in ("on", "off"):
        served = await serve(RELAY_HTTP_FAST_PATH=fast_path)
        reader, writer = await served.connect()
        writer.write(unsigned("together") + bad)
        assert (await read_response(reader))[0] == 400
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        reader, writer = await served.connect()
        writer.write(unsigned("apart"))
        assert (await read_response(reader))[0] == 200
        writer.write(bad)
        assert (await read_response(reader))[0] == 400
        assert [orjson.loads(e.body)["msgKey"] for e in served.publisher.published] == ["apart"]


async def test_bytes_after_connection_close_are_answered_as_aiohttp_answers_them(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """aiohttp's parser refuses bytes after a "Connection: close" request in the same chunk (400,
    nothing published); the fast path leaves that chunk to it."""
    for fast_path in ("on", "off"):
        served = await serve(RELAY_HTTP_FAST_PATH=fast_path)
        reader, writer = await served.connect()
        writer.write(unsigned("closing", headers="Host: a\r\nConnection: close\r\n") + unsigned("after"))
        assert (await read_response(reader))[0] == 400
        assert served.publisher.published == []


async def test_a_body_not_needed_is_skipped_as_it_arrives(serve: Callable[..., Awaitable[Served]]) -> None:
    """A refusal answered before the body arrived keeps the connection once the body has come (as
    aiohttp does), and the next callback is served on the fast path."""
    served = await serve()
    reader, writer = await served.connect()
    refused = request("refused", path=target().replace("Sign=", "Sign=00"))
    cut = refused.index(b"\r\n\r\n") + 4
    writer.write(refused[:cut])
    status, headers, _ = await read_response(reader)
    assert (status, "connection" in headers) == (401, False)
    writer.write(refused[cut:])
    writer.write(request("next"))
    assert (await read_response(reader))[0] == 200
    assert (served.front.served, served.front.handed_over) == (2, 0)


async def test_the_wait_before_a_handler_and_the_loop_lag_are_measured(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """relay_request_wait_seconds counts each fast-path request; the loop-lag sampler runs with the app."""
    served = await serve()
    reader, writer = await served.connect()
    for i in range(3):
        writer.write(request(f"w{i}"))
        assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.06)
    assert served.registry.get_sample_value("relay_request_wait_seconds_count") == 3
    assert (served.registry.get_sample_value("relay_event_loop_lag_seconds_count") or 0) >= 1
