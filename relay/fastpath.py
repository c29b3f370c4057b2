"""The HTTP front end: a fast path for the callback route, aiohttp for everything else.

aiohttp spends about a third of the relay's CPU per callback on generic HTTP work (request and
response objects, routing, streams). Tencent IM sends every callback in the same simple shape,
``POST /tencent-im/callback?<plain query> HTTP/1.1`` with a ``Content-Length`` body, so
:class:`FastConnection` recognizes exactly that shape and answers it itself, calling the same
:meth:`process` of the provider's handler (:class:`FastHandler`) as the aiohttp route.

The rule that keeps this small and safe: **the fast path never judges HTTP it does not fully
understand.** At the first request that is anything else (another path or method, HTTP/1.0,
chunked or ``Expect``, a header line it does not accept, a query needing percent-decoding, no
``Content-Length``, a head over 8 KiB), the connection is handed, with every byte buffered so
far, to aiohttp's own protocol, which serves it from then on. So malformed requests get
aiohttp's answers and health, readiness and metrics requests are aiohttp's as before. Requests
on one connection are answered one at a time, in order, as aiohttp does.

Timeouts mirror the aiohttp server's: a connection whose next request has not arrived
``keepalive_timeout`` after the last answer is closed (this also cuts slow-header clients); the
body has the handler's ``body_timeout``; after a reply that closes the connection the rest of the
request is read and discarded for at most ``lingering_time``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast

import structlog
from aiohttp import web

from relay.errors import Reject, Rejection

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


_INTERNAL_ERROR = Reply(500, b'{"ActionStatus":"FAIL","ErrorCode":1,"ErrorInfo":"internal_error"}', close=True)
# Header lines: a token, a colon, then visible ASCII, space, tab or obs-text; no control bytes.
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# Query bytes that decode to themselves: no percent-escapes or '+' whose meaning could differ
# between this parser and aiohttp's.
_PLAIN_QUERY = re.compile(rb"[A-Za-z0-9._~=&:-]*")


class _Head:
    __slots__ = ("close", "forwarded_for", "length", "query")

    def __init__(self, query: list[tuple[str, str]], forwarded_for: list[str], length: int, close: bool) -> None:
        self.query = query
        self.forwarded_for = forwarded_for
        self.length = length
        self.close = close


def parse_head(head: bytes, path: bytes) -> _Head | None:
    """The request line and headers (each line ending in CRLF, the blank line excluded), or None
    when the request is not one this path serves (aiohttp then serves it)."""
    line_end = head.find(b"\r\n")
    request_line = head[:line_end]
    prefix = b"POST " + path
    if not request_line.startswith(prefix) or not request_line.endswith(b" HTTP/1.1"):
        return None
    target_rest = request_line[len(prefix) : -9]
    if target_rest:
        if target_rest[0] != 0x3F or not _PLAIN_QUERY.fullmatch(target_rest, 1):  # "?"
            return None
        query = [(k, v) for k, _, v in (p.partition("=") for p in target_rest[1:].decode().split("&") if p)]
    else:
        query = []
    if not _HEADER_LINES.fullmatch(head, line_end + 2):
        return None
    length: int | None = None
    close = False
    forwarded_for: list[str] = []
    lines = head[line_end + 2 : -2].split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        return None
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            value = value.strip(b" \t")
            if length is not None or not value.isdigit() or len(value) > 12:
                return None
            length = int(value)
        elif name == b"connection":
            token = value.strip(b" \t").lower()
            if token == b"close":
                close = True
            elif token != b"keep-alive":
                return None
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        elif name == b"x-forwarded-for":
            if not value.isascii():
                return None  # aiohttp's decoding of it is the one the source policy has seen
            forwarded_for.append(value.strip(b" \t").decode())
    if length is None:
        return None
    return _Head(query, forwarded_for, length, close)


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
    ) -> None:
        self.fallback = fallback
        self.handler = handler
        self.path = path.encode()
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
    """One client connection while it sends simple callbacks."""

    def __init__(self, server: FastPathServer) -> None:
        self.server = server
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._buffer = bytearray()
        self._length = 0  # body length of the request being answered
        self._body_read = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._idle_since = server.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._lingering = False
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
        if self._lingering:
            return
        self._buffer += data
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost while reading the body"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.task is None:
            self._next()

    # -- requests --------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next buffered request, hand the connection over, or wait for more bytes."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._writing_paused:
            return
        if self._reading_paused and len(self._buffer) <= self._max_buffer:
            self._reading_paused = False
            transport.resume_reading()
        if self.server.closing:
            transport.close()
            return
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return
        head = parse_head(bytes(buffer[: end + 2]), self.server.path)
        if head is None:
            self._hand_over()
            return
        del buffer[: end + 4]
        self._length = head.length
        self._body_read = False
        self.task = self.server.loop.create_task(self._answer(head))

    async def _answer(self, head: _Head) -> None:
        try:
            reply = await self.server.handler.process(head.query, self._peer, head.forwarded_for, self._read_body)
        except Exception:
            log.exception("relay.internal_error", peer=self._peer)
            reply = _INTERNAL_ERROR
        close = head.close or reply.close or self.server.closing
        if not self._body_read:
            # Answered without reading the body (a refused signature, say): skip it if it is all
            # here, else closing is cheaper than reading it.
            if len(self._buffer) >= self._length:
                del self._buffer[: self._length]
            else:
                close = True
        self.server.served += 1
        self.task = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(self.server.encode(reply, close))
        if close:
            self._linger()
            return
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
        del self._buffer[:length]
        self._body_read = True
        return body

    # -- connection lifetime ---------------------------------------------------------------------

    def _on_timer(self) -> None:
        """One timer per connection, re-armed lazily: closes it once idle for keepalive_timeout."""
        loop = self.server.loop
        deadline = self._idle_since + self.server.keepalive_timeout
        if self.task is None and loop.time() >= deadline:
            self._timer = None
            if self._transport is not None:
                self._transport.close()
            return
        if self.task is not None:
            deadline = loop.time() + self.server.keepalive_timeout
        self._timer = loop.call_at(deadline, self._on_timer)

    def _linger(self) -> None:
        """After a closing reply: stop sending, discard what the client still sends, close on its
        EOF or after ``lingering_time``."""
        transport = self._transport
        assert transport is not None
        self._lingering = True
        self._buffer.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.server.loop.call_later(self.server.lingering_time, transport.close)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def close_if_idle(self) -> None:
        if self.task is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with the bytes buffered here."""
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
        self._transport = None
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            protocol.data_received(data)


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
        **kwargs: Any,
    ) -> None:
        # The same timeouts for both front ends: aiohttp's (handed-over connections) and ours.
        super().__init__(app, keepalive_timeout=keepalive_timeout, lingering_time=lingering_time, **kwargs)
        self._handler = handler
        self._path = path
        self._keepalive_timeout = keepalive_timeout
        self._lingering_time = lingering_time

    async def _make_server(self) -> web.Server:
        fallback = await super()._make_server()
        server = FastPathServer(
            fallback,
            self._handler,
            self._path,
            keepalive_timeout=self._keepalive_timeout,
            lingering_time=self._lingering_time,
        )
        # Duck-typed: sites call it as their protocol factory; the runner calls pre_shutdown()
        # and shutdown(), which FastPathServer forwards to the aiohttp server it wraps.
        return cast(web.Server, server)
