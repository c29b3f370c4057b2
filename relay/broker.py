"""aio-pika connections to the broker's endpoints, for every consumer of the relay's (``relay tail``,
examples/consumer.py, the command queue): the first endpoint that answers, and on reconnect the next.

aio-pika reconnects a robust connection to the URL it was given. Here every (re)connection goes
through an aiormq transport factory (aiormq's public hook for opening the socket) that walks the
endpoint list, starting after the node used last: a consumer whose node died moves to another node
instead of waiting for that one to come back. Credentials, vhost and options come from the first URL,
which is why :func:`relay.endpoints.parse_endpoints` requires them equal on every URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal, overload

import aio_pika
import aiormq
from aio_pika.exceptions import AMQPConnectionError
from yarl import URL

from relay.endpoints import DEFAULT_HEARTBEAT, Endpoint, describe, parse_endpoints

TCP_CONNECT_TIMEOUT = 5.0  # per endpoint: a silently dropped SYN must not use up the whole connect timeout


class NoEndpointAnswered(AMQPConnectionError):
    """Every endpoint refused the connection or failed its handshake; the message says why, per endpoint."""


class EndpointTransport(aiormq.TransportFactory):
    """Opens the socket (TCP, or TLS with the endpoint's own options) to the first endpoint that
    accepts it, trying them in list order from the one after the endpoint used last."""

    def __init__(self, endpoints: Sequence[Endpoint], *, tcp_timeout: float = TCP_CONNECT_TIMEOUT) -> None:
        self.endpoints = tuple(endpoints)
        self.current: Endpoint | None = None
        self.errors: dict[str, str] = {}  # display -> why the last attempt at it failed
        self._next = 0
        self._tcp_timeout = tcp_timeout

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kwargs.pop("ssl_context_provider", None)  # aiormq's, built from the first URL: each endpoint has its own
        count = len(self.endpoints)
        for step in range(count):
            index = (self._next + step) % count
            endpoint = self.endpoints[index]
            try:
                context = await endpoint.ssl_context()
                async with asyncio.timeout(self._tcp_timeout):
                    streams = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=context, **kwargs)
            except (OSError, TimeoutError, ValueError) as exc:
                self.errors[endpoint.display] = describe(exc, endpoint)
                continue
            self.errors.pop(endpoint.display, None)
            self.current = endpoint
            # The next (re)connection starts after this node: if it is the one that failed, the
            # others are tried first.
            self._next = index + 1
            return streams
        raise NoEndpointAnswered(unreachable(self.errors))


def unreachable(errors: dict[str, str]) -> str:
    return "no endpoint answered: " + "; ".join(f"{where}: {why}" for where, why in errors.items())


class FailoverConnection(aio_pika.Connection):
    """An aio-pika connection over :class:`EndpointTransport`; ``endpoint`` is the node in use."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        transport: EndpointTransport = kwargs.pop("endpoint_transport")
        super().__init__(url, loop, **kwargs)
        # aio-pika hands self.kwargs to aiormq.connect for every (re)connection.
        self.kwargs["transport_factory"] = self.endpoint_transport = transport

    @property
    def endpoint(self) -> str | None:
        current = self.endpoint_transport.current
        return current.display if current is not None else None


class FailoverRobustConnection(aio_pika.RobustConnection):
    """A robust aio-pika connection whose reconnections move along the endpoint list."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        transport: EndpointTransport = kwargs.pop("endpoint_transport")
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = self.endpoint_transport = transport

    @property
    def endpoint(self) -> str | None:
        current = self.endpoint_transport.current
        return current.display if current is not None else None


@overload
async def connect(
    endpoints: str | Sequence[Endpoint],
    *,
    robust: Literal[False] = ...,
    name: str = ...,
    timeout: float = ...,
    reconnect_interval: float = ...,
) -> FailoverConnection: ...


@overload
async def connect(
    endpoints: str | Sequence[Endpoint],
    *,
    robust: Literal[True],
    name: str = ...,
    timeout: float = ...,
    reconnect_interval: float = ...,
) -> FailoverRobustConnection: ...


async def connect(
    endpoints: str | Sequence[Endpoint],
    *,
    robust: bool = False,
    name: str = "revoke-relay",
    timeout: float = 10.0,
    reconnect_interval: float = 2.0,
) -> FailoverConnection | FailoverRobustConnection:
    """Connect aio-pika to the first endpoint that completes the AMQP handshake.

    *endpoints* is ``RELAY_AMQP_URL`` (one URL or a comma-separated list) or already parsed
    endpoints. ``robust=True`` returns a connection that reconnects by itself (every
    *reconnect_interval* seconds), moving to the next endpoint when its node is gone; channels,
    queues, bindings and consumers are re-declared by aio-pika. Raises ``AMQPConnectionError``
    (or the last handshake error) naming why each endpoint failed.
    """
    listed = parse_endpoints(endpoints) if isinstance(endpoints, str) else tuple(endpoints)
    transport = EndpointTransport(listed)
    url = URL(listed[0].url)
    if "heartbeat" not in url.query:
        url = url.update_query(heartbeat=DEFAULT_HEARTBEAT)
    options: dict[str, Any] = {"client_properties": {"connection_name": name}, "endpoint_transport": transport}
    last: BaseException | None = None
    # A node may accept the socket and still fail the handshake (frozen, refusing the login):
    # each attempt starts after the endpoint the previous one used, so every node gets its turn.
    for _ in listed:
        connection: FailoverConnection | FailoverRobustConnection
        if robust:
            connection = FailoverRobustConnection(url, reconnect_interval=reconnect_interval, **options)
        else:
            connection = FailoverConnection(url, **options)
        try:
            await connection.connect(timeout=timeout)
        except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            await connection.close()
            last = exc
            if transport.current is not None:
                transport.errors[transport.current.display] = describe(exc, transport.current)
            if isinstance(exc, NoEndpointAnswered):
                break  # the transport already tried every endpoint
            continue
        return connection
    raise NoEndpointAnswered(unreachable(transport.errors)) from last
