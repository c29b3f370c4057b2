"""The HTTP front end: a fast path for the callback route, aiohttp for everything else.

aiohttp spends about a third of the relay's CPU per callback on generic HTTP work (request and
response objects, routing, streams). Tencent IM sends every callback in the same simple shape,
``POST /tencent-im/callback?<plain query> HTTP/1.1`` with a ``Content-Length`` body, so
:class:`FastConnection` recognizes exactly that shape and answers it itself, calling the same
:meth:`process` of the provider's handler (:class:`FastHandler`) as the aiohttp route.

The rule that keeps this small and safe: **the fast path never judges HTTP it does not fully
understand.** At the first request that is anything else (another path or method, HTTP/1.0,
chunked or ``Expect``, a header line it does not accept, no or two ``Host`` headers, a second
one of any header aiohttp allows once, a ``Content-Encoding`` but identity, a query needing
percent-decoding, no ``Content-Length``, a head over 8 KiB), the connection is handed, with every
byte buffered so far, to aiohttp's own protocol, which serves it from then on. An incomplete head
is held only while it can still become one the fast path takes: a bare LF, a stray control byte or
a malformed line hands it over at once. So malformed requests get aiohttp's answers, when aiohttp
would give them, and health, readiness and metrics requests are aiohttp's as before. Requests on
one connection are answered one at a time, in order, as aiohttp does.

Timeouts mirror the aiohttp server's: a connection whose next request has not arrived
``keepalive_timeout`` after the last answer is closed (this also cuts slow-header clients), and a
hand-over keeps that deadline; the body has the handler's ``body_timeout``; a body the handler did
not need is read and discarded for at most ``lingering_time``, then the connection is kept, as
aiohttp keeps it; after a reply that closes the connection the rest of the request is read and
discarded for at most ``lingering_time``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from relay.errors import STATUS, Reject, Rejection
from relay.runtime import Observer

log = structlog.get_logger()

MAX_HEAD = 8190  # bytes of request line plus headers; aiohttp's limit for one line
MAX_HEADERS = 128  # aiohttp's limit
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer to a callback, independent of the HTTP server that sends it."""

    status: int
    body: bytes
    retry_after: bool = False  # 503: tell the sender when to come back
    close: bool = False  # close the connection after answering

    def response(self) -> web.Response:
        """As an aiohttp response."""
        response = web.Response(body=self.body, status=self.status, content_type=_JSON)
        if self.retry_after:
            response.headers["Retry-After"] = "1"
        if self.close:
            response.force_close()
        return response


BodyReader = Callable[[], Awaitable[bytes]]


class FastHandler(Protocol):
    """What the fast path calls for a request it recognizes: a provider's callback handler."""

    max_body_bytes: int
    body_timeout: float

    async def process(
        self,
        query_items: Iterable[tuple[str, str]],
        peer: str | None,
        forwarded_for: Iterable[str],
        read_body: BodyReader,
    ) -> Reply: ...


# What the fast path answers should the handler ever raise (it turns every exception into a reply
# itself): the handler's own answer to an unexpected exception.
_UNPROCESSABLE = Reply(
    STATUS[Reject.UNPROCESSABLE],
    orjson.dumps({"ActionStatus": "FAIL", "ErrorCode": 1, "ErrorInfo": Reject.UNPROCESSABLE.value}),
    close=True,
)
# Query bytes that decode to themselves: no percent-escapes or '+' whose meaning could differ
# between this parser and aiohttp's.
_QUERY_BYTES = rb"[A-Za-z0-9._~=&:-]*"
_PLAIN_QUERY = re.compile(_QUERY_BYTES)
# Header lines: a token, a colon, then visible ASCII, space, tab or obs-text; no control bytes.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]"
_HEADER_LINES = re.compile(rb"(?:" + _TOKEN + rb"+:" + _VALUE + rb"*\r\n)*")
# What may precede the end of a header line that has not fully arrived.
_HEADER_LINE_START = re.compile(_TOKEN + rb"*(?::" + _VALUE + rb"*)?")
# ... and of the request line, after "POST <path>": a plain query, then " HTTP/1.1".
_REQUEST_LINE_END = re.compile(rb"(?:\?" + _QUERY_BYTES + rb")?(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.1?)?)?)?)?)?)?)?)?")
# Bytes that no head this path takes contains: control bytes, and a CR or LF not in a CRLF pair.
_STRAY_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|(?<!\r)\n|\r(?!\n)")
# Headers aiohttp (llhttp) refuses to see twice in a request (its SINGLETON_HEADERS, after RFC 9110):
# a second one of any of them is left to aiohttp, whose answer is a 400.
_SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)


class _Head:
    """One request head, taken in line by line (all at once when it arrives whole)."""

    __slots__ = ("close", "forwarded_for", "headers", "length", "query", "seen")

    def __init__(self, query: list[tuple[str, str]]) -> None:
        self.query = query
        self.forwarded_for: list[str] = []
        self.length: int | None = None
        self.close = False
        self.seen: set[bytes] = set()  # singleton headers present
        self.headers = 0

    def add(self, line: bytes) -> bool:
        """One header line (its syntax already checked, no CRLF); False when this path does not
        take a request with it."""
        self.headers += 1
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _SINGLETONS:
            if name in self.seen:
                return False
            self.seen.add(name)
            if name == b"content-length":
                value = value.strip(b" \t")
                if not value.isdigit() or len(value) > 12:
                    return False
                self.length = int(value)
            elif name == b"transfer-encoding":
                return False
        elif name == b"connection":
            token = value.strip(b" \t").lower()
            if token == b"close":
                self.close = True
            elif token != b"keep-alive":
                return False
        elif name == b"content-encoding":
            if value.strip(b" \t").lower() != b"identity":
                return False  # aiohttp refuses it (415): one place decides
        elif name in (b"expect", b"upgrade"):
            return False
        elif name == b"x-forwarded-for":
            if not value.isascii():
                return False  # aiohttp's decoding of it is the one the source policy has seen
            self.forwarded_for.append(value.strip(b" \t").decode())
        return self.headers <= MAX_HEADERS

    def add_lines(self, data: bytes | bytearray, start: int, end: int) -> bool:
        """The header lines in ``data[start:end]``, each ending in CRLF."""
        if not _HEADER_LINES.fullmatch(data, start, end):
            return False
        return start == end or all(self.add(line) for line in bytes(data[start : end - 2]).split(b"\r\n"))

    @property
    def complete(self) -> bool:
        """Whether the head, now ended, is one this path serves: HTTP/1.1 requires exactly one
        Host (aiohttp answers 400 without), and the body must have a Content-Length."""
        return self.length is not None and b"host" in self.seen


def _request_query(line: bytes | bytearray, path: bytes) -> list[tuple[str, str]] | None:
    """The query of a request line this path serves, ``POST <path>[?<plain query>] HTTP/1.1``."""
    prefix = b"POST " + path
    if not line.startswith(prefix) or not line.endswith(b" HTTP/1.1"):
        return None
    target_rest = line[len(prefix) : -9]
    if not target_rest:
        return []
    if target_rest[0] != 0x3F or not _PLAIN_QUERY.fullmatch(target_rest, 1):  # "?"
        return None
    return [(k, v) for k, _, v in (p.partition("=") for p in target_rest[1:].decode().split("&") if p)]


def parse_head(head: bytes, path: bytes) -> _Head | None:
    """The request line and headers (each line ending in CRLF, the blank line excluded), or None
    when the request is not one this path serves (aiohttp then serves it)."""
    line_end = head.find(b"\r\n")
    query = _request_query(head[:line_end], path)
    if query is None:
        return None
    parsed = _Head(query)
    if not parsed.add_lines(head, line_end + 2, len(head)) or not parsed.complete:
        return None
    return parsed


def keep_deadline(protocol: RequestHandler, deadline: float) -> None:
    """Make aiohttp's protocol for a handed-over connection close it at *deadline* unless a whole
    request has arrived by then, instead of a full keep-alive period after the hand-over.

    aiohttp arms this timer (its keep-alive timeout, which is also what cuts slow headers) in
    ``connection_made`` and has no public way to move it, so this sets the two private attributes
    its own ``start()`` sets for the same purpose. Written against aiohttp 3.14 (constraints.txt);
    tests/app/test_fastpath.py fails if they change (test_hand_over_keeps_the_header_deadline*,
    test_aiohttp_keepalive_timer_is_where_keep_deadline_expects_it). Should they be missing, the
    hand-over still works, with aiohttp's full period (the behaviour before this function).
    """
    handle = getattr(protocol, "_keepalive_handle", None)  # a uvloop or asyncio TimerHandle
    if handle is None or not hasattr(protocol, "_next_keepalive_close_time"):
        return
    handle.cancel()
    protocol._next_keepalive_close_time = deadline
    protocol._keepalive_handle = asyncio.get_running_loop().call_at(deadline, protocol._process_keepalive)


class FastPathServer:
    """The protocol factory the sites listen with; duck-types aiohttp's ``web.Server`` for the
    runner (``pre_shutdown``, ``shutdown``) and keeps the aiohttp server for handed-over
    connections."""

    def __init__(
        self,
        fallback: web.Server,
        handler: FastHandler,
        path: str,
        *,
        keepalive_timeout: float,
        lingering_time: float,
        wait: Observer | None = None,
    ) -> None:
        self.fallback = fallback
        self.wait = wait  # observes how long a request with its head read waited for its handler
        self.handler = handler
        self.path = path.encode()
        self.prefix = b"POST " + self.path  # how every request line this path takes begins
        self.keepalive_timeout = keepalive_timeout
        self.lingering_time = lingering_time
        self.loop = asyncio.get_running_loop()
        self.connections: set[FastConnection] = set()
        self.closing = False
        self.served = 0  # requests answered on the fast path
        self.handed_over = 0  # connections given to aiohttp
        self._encoded: dict[tuple[Reply, bool], tuple[bytes, bytes]] = {}
        self._date_second = 0
        self._date = b""

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    def encode(self, reply: Reply, close: bool) -> bytes:
        parts = self._encoded.get((reply, close))
        if parts is None:
            head = [f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}"]
            head += ["Content-Type: application/json", f"Content-Length: {len(reply.body)}"]
            if reply.retry_after:
                head.append("Retry-After: 1")
            if close:
                head.append("Connection: close")
            parts = ("\r\n".join(head).encode() + b"\r\nDate: ", b"\r\n\r\n" + reply.body)
            self._encoded[(reply, close)] = parts
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date = formatdate(second, usegmt=True).encode()
        return parts[0] + self._date + parts[1]

    def pre_shutdown(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after their answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()
        self.fallback.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let requests in flight finish (at most ``timeout``), then close every connection."""
        busy = {c.task for c in self.connections if c.task is not None}
        if busy:
            _, pending = await asyncio.wait(busy, timeout=timeout)
            for task in pending:
                task.cancel()
        await self.fallback.shutdown(timeout)
        for connection in list(self.connections):
            connection.abort()


class FastConnection(asyncio.Protocol):
    """One client connection while it sends simple callbacks.

    Heads are looked at as their bytes arrive, the way aiohttp's parser looks at them: each chunk
    received either leaves every request head it completes accepted (and those requests are then
    answered here, in order), or it holds something this path does not take, and then the requests
    whose heads it completed, and everything after them, go to aiohttp in the same chunks. aiohttp
    drops every request completed in a chunk in which its parser fails, so this way a malformed
    request pipelined behind a good one gets the same answers whichever front end reads it.
    """

    def __init__(self, server: FastPathServer) -> None:
        self.server = server
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._buffer = bytearray()
        self._start = 0  # stream position of the buffer's first byte
        self._heads: deque[tuple[_Head, int]] = deque()  # accepted heads not yet answered, and their sizes
        self._next_head = 0  # stream position where the next head (not yet accepted) begins
        # An incomplete head at _next_head: what it holds so far, and how far it has been looked at.
        self._partial: _Head | None = None
        self._lines_end = 0
        self._scanned = 0
        # Set once a chunk held something this path does not take: aiohttp serves the connection
        # after the heads accepted before it; the stream positions where chunks ended from then on.
        self._handing_over = False
        self._chunk_ends: list[int] = []
        self._last = False  # a request with "Connection: close" was accepted: nothing after it is
        self._length = 0  # body length of the request being answered
        self._body_read = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._skip = 0  # bytes of an unneeded body still to discard
        self._skip_timer: asyncio.TimerHandle | None = None
        self._idle_since = server.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False  # a reply said "Connection: close": nothing more is served
        # Never buffer more than one whole request ahead (the body being read is at most the cap).
        self._max_buffer = MAX_HEAD + server.handler.max_body_bytes

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        self.server.connections.add(self)
        self._timer = self.server.loop.call_at(self._idle_since + self.server.keepalive_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        if self._skip:
            skipped = min(self._skip, len(data))
            self._start += skipped
            self._skip -= skipped
            data = data[skipped:]
            if not self._skip:
                self._skipped()
        if self._closing or not data:
            return
        self._buffer += data
        if self._handing_over:
            self._chunk_ends.append(self._start + len(self._buffer))
        else:
            self._vet()
        if self.task is None:
            self._next()
        else:
            waiter = self._body_waiter
            if waiter is not None and len(self._buffer) >= self._length and not waiter.done():
                waiter.set_result(None)
        if len(self._buffer) > self._max_buffer and not self._reading_paused and self._transport is not None:
            # A client sending ahead (pipelining) or not reading our answers waits until we catch up.
            self._transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        return False  # close the transport; an answer in progress is dropped with it

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for timer in (self._timer, self._skip_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._skip_timer = None
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost while reading the body"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.task is None:
            self._next()

    # -- heads -----------------------------------------------------------------------------------

    def _vet(self) -> None:
        """Accept the heads the chunk just received completes, or, at the first thing this path
        does not take, leave them and everything after them to aiohttp."""
        if self._last:
            return
        buffer = self._buffer
        first_new: int | None = None  # stream position of the first head this chunk completes
        accepted = len(self._heads)
        while (start := self._next_head - self._start) < len(buffer):
            end = buffer.find(b"\r\n\r\n", start, start + MAX_HEAD + 4)
            if end < 0:
                if len(buffer) - start <= MAX_HEAD and self._may_become_a_head(start):
                    return  # wait for the rest
                break
            head = self._finish_head(start, end)
            if head is None or head.length is None:
                break
            if first_new is None:
                first_new = self._start + start
            self._heads.append((head, end + 4 - start))
            self._next_head = self._start + end + 4 + head.length
            self._partial = None
            if head.close:
                # Nothing after "Connection: close" is read; aiohttp's parser fails on bytes that
                # follow it in the same chunk (and ignores those in later ones).
                if self._next_head - self._start < len(buffer):
                    break
                self._last = True
                return
        else:
            return  # every head this chunk completed is accepted
        # aiohttp's parser would have failed on this chunk and answered none of the requests it
        # completed: they go to aiohttp too, and aiohttp sees the chunk boundaries from here on.
        while len(self._heads) > accepted:
            self._heads.pop()
        if first_new is not None:
            self._next_head = first_new
        self._handing_over = True
        self._chunk_ends = [self._start + len(buffer)]

    def _finish_head(self, start: int, end: int) -> _Head | None:
        """The head at ``buffer[start:end]`` (its blank line at *end*) if this path takes it."""
        buffer = self._buffer
        partial = self._partial
        if partial is None:  # it arrived whole: the common case
            return parse_head(bytes(buffer[start : end + 2]), self.server.path)
        lines_from = self._lines_end - self._start
        if not partial.add_lines(buffer, lines_from, end + 2) or not partial.complete:
            return None
        return partial

    def _may_become_a_head(self, start: int) -> bool:
        """Whether the incomplete head at ``buffer[start:]`` can still become one this path takes.

        Only then is it held; anything else goes to aiohttp at once, which answers it as it would
        have without the fast path (a request with bare-LF line ends gets its 400 now, not a silent
        close at the keep-alive deadline). Each byte and each complete line is looked at once."""
        buffer = self._buffer
        prefix = self.server.prefix
        if buffer[start : start + len(prefix)] != prefix[: len(buffer) - start]:
            return False
        end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)  # a CR may be half a CRLF
        if _STRAY_BYTES.search(buffer, max(self._scanned - self._start, start), end):
            return False
        self._scanned = self._start + end
        lines_from = max(self._lines_end - self._start, start)
        last = buffer.rfind(b"\r\n", lines_from)
        if last >= 0:  # lines completed since the last look
            if self._partial is None:
                line_end = buffer.find(b"\r\n", start)
                query = _request_query(buffer[start:line_end], self.server.path)
                if query is None:
                    return False
                self._partial = _Head(query)
                lines_from = line_end + 2
            if not self._partial.add_lines(buffer, lines_from, last + 2):
                return False
            self._lines_end = self._start + last + 2
            lines_from = last + 2
        if self._partial is None:  # the request line, still arriving
            return len(buffer) - start <= len(prefix) or bool(
                _REQUEST_LINE_END.fullmatch(buffer, start + len(prefix), end)
            )
        return bool(_HEADER_LINE_START.fullmatch(buffer, lines_from, end))

    def _consume(self, size: int) -> None:
        del self._buffer[:size]
        self._start += size

    # -- requests --------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next accepted request, hand the connection over, or wait for more bytes."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._writing_paused or self._skip:
            return
        if self._reading_paused and len(self._buffer) <= self._max_buffer:
            self._reading_paused = False
            transport.resume_reading()
        if self.server.closing:
            transport.close()
            return
        if not self._heads:
            if self._handing_over:
                self._hand_over()
            return
        head, size = self._heads.popleft()
        self._consume(size)
        self._length = head.length or 0
        self._body_read = False
        self.task = self.server.loop.create_task(self._answer(head, time.perf_counter()))

    async def _answer(self, head: _Head, ready_at: float) -> None:
        if self.server.wait is not None:
            # perf_counter: uvloop's loop.time() is cached per iteration, in milliseconds.
            self.server.wait.observe(time.perf_counter() - ready_at)
        try:
            reply = await self.server.handler.process(head.query, self._peer, head.forwarded_for, self._read_body)
        except Exception:
            log.exception("relay.internal_error", route="callback", peer=self._peer)
            reply = _UNPROCESSABLE
        close = head.close or reply.close or self.server.closing
        if not self._body_read:
            # Answered without reading the body (a refused signature, say): skip it, as aiohttp
            # does; what has not arrived yet is discarded as it comes.
            unread = self._length - len(self._buffer)
            self._consume(min(self._length, len(self._buffer)))
            self._skip = max(unread, 0)
        self.server.served += 1
        self.task = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(self.server.encode(reply, close))
        if close:
            # As aiohttp: nothing more is read but the rest of this body, then the connection closes.
            self._closing = True
            self._buffer.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._skip:
            self._skip_body()
        elif close:
            transport.close()
        else:
            self._idle_since = self.server.loop.time()
            self._next()

    async def _read_body(self) -> bytes:
        """The body reader handed to :meth:`FastHandler.process`: cap, deadline, no copy twice."""
        length = self._length
        limit = self.server.handler.max_body_bytes
        if length > limit:
            raise Rejection(Reject.BODY_TOO_LARGE, f"Content-Length {length} > {limit}")
        if len(self._buffer) < length:
            self._body_waiter = self.server.loop.create_future()
            timeout = self.server.handler.body_timeout
            try:
                async with asyncio.timeout(timeout):
                    await self._body_waiter
            except TimeoutError:
                raise Rejection(Reject.BODY_TIMEOUT, f"body not received within {timeout}s") from None
            except ConnectionError as exc:
                raise Rejection(Reject.INCOMPLETE_BODY, repr(exc)[:200]) from exc
            finally:
                self._body_waiter = None
        body = bytes(self._buffer[:length])
        self._consume(length)
        self._body_read = True
        return body

    # -- connection lifetime ---------------------------------------------------------------------

    def _on_timer(self) -> None:
        """One timer per connection, re-armed lazily: once idle for keepalive_timeout, the
        connection is closed, or handed over if part of a head is buffered (aiohttp then answers
        it as it would have, or closes it)."""
        loop = self.server.loop
        deadline = self._idle_since + self.server.keepalive_timeout
        busy = self.task is not None or self._skip > 0
        if not busy and loop.time() >= deadline:
            self._timer = None
            if self._transport is not None and not self._transport.is_closing():
                if self._buffer:
                    self._hand_over()
                else:
                    self._transport.close()
            return
        if busy:
            deadline = loop.time() + self.server.keepalive_timeout
        self._timer = loop.call_at(deadline, self._on_timer)

    def _skip_body(self) -> None:
        """Discard the rest of a body the handler did not need, as aiohttp does: for at most
        ``lingering_time``, after which the connection is closed; once it is all here, the
        connection closes if the reply said so, else the next request is read (and the
        keep-alive period starts then, as on aiohttp)."""
        transport = self._transport
        assert transport is not None
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._skip_timer = self.server.loop.call_later(self.server.lingering_time, transport.close)

    def _skipped(self) -> None:
        if self._skip_timer is not None:
            self._skip_timer.cancel()
            self._skip_timer = None
        if self._closing:
            if self._transport is not None:
                self._transport.close()
            return
        self._idle_since = self.server.loop.time()

    def close_if_idle(self) -> None:
        if self.task is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection: it gets the bytes buffered here in the
        chunks they arrived in, and the keep-alive deadline already running (a slow head gets no
        second period)."""
        transport = self._transport
        assert transport is not None
        self.server.connections.discard(self)
        self.server.handed_over += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        protocol = self.server.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        keep_deadline(protocol, self._idle_since + self.server.keepalive_timeout)
        self._transport = None
        data = bytes(self._buffer)
        self._buffer.clear()
        cut = 0
        for chunk_end in [*self._chunk_ends[:-1], self._start + len(data)]:
            if chunk_end - self._start > cut:
                protocol.data_received(data[cut : chunk_end - self._start])
                cut = chunk_end - self._start


class RelayRunner(web.AppRunner):
    """``web.AppRunner`` whose sites listen with :class:`FastPathServer`."""

    def __init__(
        self,
        app: web.Application,
        handler: FastHandler,
        path: str,
        *,
        keepalive_timeout: float,
        lingering_time: float,
        wait: Observer | None = None,
        **kwargs: Any,
    ) -> None:
        # The same timeouts for both front ends: aiohttp's (handed-over connections) and ours.
        super().__init__(app, keepalive_timeout=keepalive_timeout, lingering_time=lingering_time, **kwargs)
        self._handler = handler
        self._path = path
        self._keepalive_timeout = keepalive_timeout
        self._lingering_time = lingering_time
        self._wait = wait

    async def _make_server(self) -> web.Server:
        fallback = await super()._make_server()
        server = FastPathServer(
            fallback,
            self._handler,
            self._path,
            keepalive_timeout=self._keepalive_timeout,
            lingering_time=self._lingering_time,
            wait=self._wait,
        )
        # Duck-typed: sites call it as their protocol factory; the runner calls pre_shutdown()
        # and shutdown(), which FastPathServer forwards to the aiohttp server it wraps.
        return cast(web.Server, server)
