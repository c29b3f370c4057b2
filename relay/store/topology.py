"""The Redis client for each ``RELAY_REDIS_MODE``, built once for the process, and what it knows
of the servers: how many primaries answer, which failovers it saw, when to re-learn the topology.

redis-py's asyncio cluster and sentinel clients recover from a failover on their own only in part
(cluster: a client whose every node timed out once may stay "cannot be connected", redis-py #2555 and
#3221; sentinel: pooled connections keep dialling the old primary, #3874). So a monitor task asks
the servers once a second and, after any failed operation, re-learns the slot map (cluster) or drops
the pooled connections to a primary that is no longer one (sentinel).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.connection import parse_url
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.errors import ConfigError
from relay.metrics import Metrics

log = structlog.get_logger()

Mode = Literal["standalone", "cluster", "sentinel"]
MODES: tuple[Mode, ...] = ("standalone", "cluster", "sentinel")
# Short socket timeouts: a frozen primary must cost an operation a second, not the OS's minutes.
_SOCKET = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}
# Re-learn a cluster's slot map at least this often even when nothing failed (a resharding, a
# planned failover that redis-py followed through MOVED without an error).
_REFRESH_EVERY = 10.0


class StoreMisconfigured(ConfigError):
    """The Redis servers answer and contradict the settings (mode, master name): refused at start."""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """What the settings say about Redis; the secrets are never printed."""

    urls: tuple[str, ...]
    mode: Mode = "standalone"
    sentinel_master: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    wait_replicas: int | None = None  # None: 0 standalone, 1 otherwise
    wait_timeout: float = 0.5


def split_urls(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if u.strip())


def _node_kwargs(url: str, options: RedisOptions) -> dict[str, Any]:
    """redis-py's own options from one URL (credentials, TLS query options), and the settings' credentials."""
    kwargs = {
        k: v
        for k, v in parse_url(url).items()  # type: ignore[no-untyped-call]
        if k not in ("host", "port", "db", "connection_class")
    }
    if urlsplit(url).scheme == "rediss":
        kwargs["ssl"] = True
    if options.username is not None and "username" not in kwargs:
        kwargs["username"] = options.username
    if options.password is not None and "password" not in kwargs:
        kwargs["password"] = options.password
    return kwargs


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


class Topology:
    """One client for the life of the process, and the monitor that keeps its view current."""

    def __init__(self, options: RedisOptions, metrics: Metrics, *, interval: float = 1.0) -> None:
        self.options = options
        self.mode: Mode = options.mode
        self._metrics = metrics
        self._interval = interval
        self.wait_replicas = (
            options.wait_replicas if options.wait_replicas is not None else (0 if options.mode == "standalone" else 1)
        )
        self.wait_timeout = options.wait_timeout
        self.primaries = 0
        self.failovers = 0
        self.reachable = False
        self.primary: str | None = None  # sentinel: the address of the primary in use
        self._owners: dict[int, str] = {}  # cluster: slot -> primary name, as last seen
        self._dirty = asyncio.Event()
        self._refreshed = 0.0
        self._monitor: asyncio.Task[None] | None = None
        self.sentinel: Sentinel | None = None
        self.client: Any = self._build()
        metrics.correlation_primaries.set_function(lambda: self.primaries)

    def _build(self) -> Any:
        o = self.options
        first = o.urls[0]
        if o.mode == "standalone":
            return aioredis.Redis.from_url(first, **{**_SOCKET, "health_check_interval": 30, **_creds(o, first)})
        if o.mode == "cluster":
            kwargs = _node_kwargs(first, o)
            seeds = [ClusterNode(*_address(u)) for u in o.urls]
            # require_full_coverage off: the slots of healthy primaries keep working while one fails.
            kwargs.update(_SOCKET)
            return RedisCluster(startup_nodes=seeds, require_full_coverage=False, **kwargs)
        sentinel_kwargs = {**_SOCKET, **_node_kwargs(first, RedisOptions(urls=o.urls))}
        if o.sentinel_password is not None:
            sentinel_kwargs["password"] = o.sentinel_password
        data = {**_SOCKET, **_creds(o, first)}
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [_address(u) for u in o.urls], sentinel_kwargs=sentinel_kwargs, **data
        )
        assert o.sentinel_master is not None  # settings require it in this mode
        # master_for once: each call builds a new pool (redis-py #3433).
        return self.sentinel.master_for(o.sentinel_master)

    def group_of(self, key: str) -> str:
        """Which connection a gateway write to *key* goes on: the owning primary in a cluster."""
        if isinstance(self.client, RedisCluster):
            try:
                node = self.client.get_node_from_key(key)
                return "" if node is None else str(node.name)
            except Exception:  # noqa: BLE001 - no slot map yet: one group, the write will fail alone
                return ""
        return ""

    def failed(self, exc: BaseException) -> None:
        """An operation failed: re-learn the topology at the next tick rather than trust the old one."""
        self._metrics.correlation_store_failures.labels(failure_kind(exc)).inc()
        self._dirty.set()

    async def start(self) -> None:
        """Check that the servers agree with the mode; refuse if they answer and contradict it.
        When nothing answers yet, start anyway and keep trying."""
        try:
            async with asyncio.timeout(5):
                await self.check()
        except StoreMisconfigured:
            await self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - nothing answers yet: the monitor keeps trying
            log.warning("relay.correlation_store_unreachable", mode=self.mode, error=repr(exc)[:300])
        self._monitor = asyncio.create_task(self._watch(), name="correlation-topology")

    async def check(self) -> None:
        client = self.client
        if self.mode == "standalone":
            info = await client.info("cluster")
            if info.get("cluster_enabled") in (1, "1"):
                raise StoreMisconfigured(
                    ["RELAY_REDIS_MODE: standalone, but the server at RELAY_REDIS_URL is a cluster node (set cluster)"]
                )
        elif self.mode == "cluster":
            try:
                await client.initialize()
            except RedisClusterException as exc:
                if "cluster mode is not enabled" in str(exc).lower() or "cluster support disabled" in str(exc).lower():
                    raise StoreMisconfigured(
                        ["RELAY_REDIS_MODE: cluster, but the server at RELAY_REDIS_URL has no cluster support"]
                    ) from exc
                raise
        else:
            await self._check_sentinels()
        await self._tick()

    async def _check_sentinels(self) -> None:
        assert self.sentinel is not None
        name = self.options.sentinel_master
        answered = 0
        for sentinel in self.sentinel.sentinels:
            try:
                masters = await sentinel.sentinel_masters()
            except ResponseError as exc:
                raise StoreMisconfigured(
                    ["RELAY_REDIS_URL: a server listed for RELAY_REDIS_MODE=sentinel is not a sentinel"]
                ) from exc
            except Exception as exc:  # noqa: BLE001 - this sentinel does not answer: ask the next
                log.debug("relay.sentinel_unanswered", error=repr(exc)[:200])
                continue
            answered += 1
            if name in masters:
                return
        if answered:
            raise StoreMisconfigured([f"RELAY_REDIS_SENTINEL_MASTER: no sentinel knows a primary named {name!r}"])
        raise ConnectionError("no sentinel answers")

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._dirty.wait()
            refresh = self._dirty.is_set() or time.monotonic() - self._refreshed >= _REFRESH_EVERY
            self._dirty.clear()
            try:
                async with asyncio.timeout(max(self._interval, 2.0)):
                    await self._tick(refresh=refresh)
            except Exception as exc:  # noqa: BLE001 - the monitor never stops
                self.reachable = False
                self.primaries = 0 if self.mode != "cluster" else self.primaries
                log.debug("relay.correlation_topology_unknown", error=repr(exc)[:200])
            # After a failure, a moment before asking again: the servers are busy electing.
            await asyncio.sleep(self._interval / 4)

    async def _tick(self, *, refresh: bool = True) -> None:
        if self.mode == "standalone":
            await self.client.ping()
            self.primaries, self.reachable = 1, True
        elif self.mode == "cluster":
            await self._tick_cluster(refresh=refresh)
        else:
            await self._tick_sentinel()

    async def _tick_cluster(self, *, refresh: bool) -> None:
        client: RedisCluster = self.client
        manager = client.nodes_manager
        if refresh:
            # CLUSTER SLOTS from a node that answers. Only after a failure (or now and then): asking
            # every second would sometimes ask a primary that just thawed, whose view is stale, and
            # hold redis-py's initialization lock while it catches up (measured: lookups stalled).
            await manager.initialize()
            self._refreshed = time.monotonic()
        owners: dict[int, str] = {}
        for slot, nodes in manager.slots_cache.items():
            if nodes:
                owners[slot] = nodes[0].name
        names = set(owners.values())
        if self._owners and owners != self._owners:
            previous = set(self._owners.values())
            promoted = names - previous
            if promoted:
                self.failovers += len(promoted)
                self._metrics.correlation_failovers.inc(len(promoted))
                log.warning("relay.correlation_failover", mode="cluster", promoted=sorted(promoted))
            else:
                log.info("relay.correlation_slots_moved")
        self._owners = owners
        self.primaries = len(names)
        self.reachable = bool(names)

    async def _tick_sentinel(self) -> None:
        assert self.sentinel is not None
        assert self.options.sentinel_master is not None
        host, port = await self.sentinel.discover_master(self.options.sentinel_master)
        address = f"{host}:{port}"
        if self.primary is not None and address != self.primary:
            self.failovers += 1
            self._metrics.correlation_failovers.inc()
            log.warning("relay.correlation_failover", mode="sentinel", primary=address)
            # Connections to the old primary would keep failing (or reach a replica): drop them all.
            await self.client.connection_pool.disconnect()
        self.primary = address
        self.primaries, self.reachable = 1, True

    def status(self) -> dict[str, object]:
        """The ``store`` part of /readyz: reported, never deciding (callbacks do not need Redis)."""
        body: dict[str, object] = {
            "mode": self.mode,
            "primaries": self.primaries,
            "reachable": self.reachable,
            "failovers": self.failovers,
            "waitReplicas": self.wait_replicas,
        }
        if self.mode == "sentinel":
            body["primary"] = self.primary
        return body

    async def primaries_for_scan(self) -> list[aioredis.Redis]:
        """One plain client per primary (SCAN runs on one node at a time); the caller closes them."""
        if not isinstance(self.client, RedisCluster):
            # A client of its own (the caller closes it; the shared one stays the store's).
            if self.sentinel is not None:
                assert self.options.sentinel_master is not None
                return [self.sentinel.master_for(self.options.sentinel_master)]
            first = self.options.urls[0]
            return [aioredis.Redis.from_url(first, **{**_SOCKET, **_creds(self.options, first)})]
        await self.client.initialize()
        kwargs = {**_node_kwargs(self.options.urls[0], self.options), **_SOCKET}
        return [aioredis.Redis(host=n.host, port=int(n.port), **kwargs) for n in self.client.get_primaries()]

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        with contextlib.suppress(Exception):
            await self.client.aclose()
        for sentinel in self.sentinel.sentinels if self.sentinel is not None else []:
            with contextlib.suppress(Exception):
                await sentinel.aclose()


def _creds(options: RedisOptions, url: str) -> dict[str, Any]:
    """The settings' credentials, unless the URL carries its own (redis-py lets the URL win)."""
    parts = urlsplit(url)
    out: dict[str, Any] = {}
    if options.username is not None and not parts.username:
        out["username"] = options.username
    if options.password is not None and not parts.password:
        out["password"] = options.password
    return out


def failure_kind(exc: BaseException) -> str:
    """A bounded label for a failed operation (the metric never takes a class name as is)."""
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        return "timeout"
    if isinstance(exc, AuthenticationError):
        return "auth"
    if isinstance(exc, ReadOnlyError):
        return "readonly"
    if isinstance(exc, (RedisConnectionError, OSError)):
        return "connection"
    if isinstance(exc, (ClusterDownError, SlotNotCoveredError)):
        return "cluster_down"
    if isinstance(exc, (MovedError, AskError)):
        return "moved"
    return "other"
