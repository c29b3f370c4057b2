"""The Redis store, the same class for a standalone server, a Cluster or a Sentinel-managed primary.

Send records: ``SET key value EX ttl`` per send, pipelined in batches (a cluster pipeline is split per
node by redis-py); they never wait for a replica. Recall lookups read many keys of many slots, so in a
cluster they go through ``MGET`` per node (``mget_nonatomic``), never one cross-slot ``MGET``.
Gateway records: every write touches keys of one hash slot (see :mod:`relay.joins` and the gateway's
``request:{…}`` names), runs on the connection of the primary owning it, and is followed on that same
connection by ``WAIT`` (a replica must have it before Tencent is called; bounded by a timeout).
Any exception from the client becomes :class:`StoreError`: redis-py's cluster client has raised
``AttributeError`` and friends while the cluster was down, and none of them may stop the writer or
reach a handler as a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import orjson
import structlog
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import AskError, MovedError

from relay.metrics import Metrics
from relay.store.base import GATEWAY_PREFIX, KEY_PREFIX, SendRecord, StoreError
from relay.store.topology import RedisOptions, Topology

log = structlog.get_logger()

_BATCH = 512
_QUEUE_LIMIT = 20_000
# A send callback whose records find the write queue full waits this long for room before they
# are dropped: under a burst the callbacks slow down to the store's pace instead of losing
# records (Tencent waits 2 s for an answer and ignores it for after-send callbacks).
_SUBMIT_WAIT = 1.0
# No round trip may take longer than this, whatever the client's own retries: redis-py's cluster
# client retries with backoff through a failover, which would hold a gateway request for many seconds.
_OP_TIMEOUT = 2.0

# Compare-and-set / compare-and-delete on one key (so one hash slot in a cluster), atomic in Redis.
_RESERVE = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Command = tuple[Any, ...]


class RedisStore:
    """Shared store on a :class:`Topology` (standalone, cluster or sentinel client, built once)."""

    name = "redis"
    local = False

    def __init__(
        self,
        topology: Topology,
        ttl: int,
        metrics: Metrics,
        *,
        index_msg_ids: bool = False,
        op_timeout: float = _OP_TIMEOUT,
    ) -> None:
        self.topology = topology
        self._ttl = ttl
        self.index_msg_ids = index_msg_ids
        self._metrics = metrics
        self._op_timeout = op_timeout
        self._queue: asyncio.Queue[SendRecord] = asyncio.Queue(_QUEUE_LIMIT)
        self._writer: asyncio.Task[None] | None = None
        self._last_error_log = 0.0
        self._failing_until = 0.0  # until then, a full write queue drops instead of making callbacks wait

    @classmethod
    def from_url(cls, url: str, ttl: int, metrics: Metrics, **kwargs: Any) -> RedisStore:
        """A store on one standalone server (tests, tools)."""
        return cls(Topology(RedisOptions((url,)), metrics), ttl, metrics, **kwargs)

    @property
    def _client(self) -> Any:
        return self.topology.client

    async def start(self) -> None:
        await self.topology.start()
        self._writer = asyncio.create_task(self._write_loop(), name="correlation-writer")

    async def close(self) -> None:
        if self._writer is not None:
            # Give queued records a moment to reach Redis, then stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self.topology.close()

    async def submit(self, records: Sequence[SendRecord], wait: float = _SUBMIT_WAIT) -> None:
        deadline: float | None = None
        for record in records:
            if not self._queue.full():
                self._queue.put_nowait(record)
                continue
            if time.monotonic() < self._failing_until:
                # The writer is failing (Redis down or failing over): a send callback must not wait
                # on Redis, so a record that finds no room is dropped at once (counted).
                self._metrics.correlation_dropped.inc()
                continue
            # Behind by _QUEUE_LIMIT records: wait for the writer (FIFO among waiters), bounded.
            deadline = deadline or asyncio.get_running_loop().time() + wait
            try:
                async with asyncio.timeout_at(deadline):
                    await self._queue.put(record)
            except TimeoutError:
                self._metrics.correlation_dropped.inc()

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._op("put", self._write_batch(batch))
                self._metrics.correlation_writes.inc(len(batch))
            except StoreError:
                # Best effort: a lost send record only means a later recall is not enriched.
                self._metrics.correlation_dropped.inc(len(batch))
                self._failing_until = time.monotonic() + 1.0
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write_batch(self, batch: Sequence[SendRecord]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for record in batch:
                pipe.set(KEY_PREFIX + record.key, record.encode(), ex=self._ttl)
                index = record.index_key if self.index_msg_ids else None
                if index is not None:
                    pipe.set(GATEWAY_PREFIX + index, orjson.dumps(record.locator), ex=self._ttl)
            await pipe.execute()

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = await self._op("get", self._mget([KEY_PREFIX + key for key in keys]))
        return found

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = await self._op("get", self._mget([GATEWAY_PREFIX + key for key in keys]))
        return found

    async def locate(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.get(keys)  # one namespace in Redis: the index is TTL'd like the send records

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        client = self._client
        # One MGET per node in a cluster (keys of many slots); one MGET elsewhere.
        values = await (client.mget_nonatomic(keys) if isinstance(client, RedisCluster) else client.mget(keys))
        return [_bytes(v) for v in values]

    async def take(self, keys: Sequence[str]) -> list[bytes | None]:
        """GETDEL per key (one slot each): used by the enricher, so no replica wait."""

        async def run() -> list[bytes | None]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.getdel(GATEWAY_PREFIX + key)
                return [_bytes(v) for v in await pipe.execute()]

        taken: list[bytes | None] = await self._op("get", run())
        return taken

    async def put(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        ms = int(ttl * 1000)
        await self._slotwise("put", [(key, ("SET", GATEWAY_PREFIX + key, value, "PX", ms)) for key, value in items])

    async def claim(self, key: str, value: bytes, ttl: float) -> bool:
        [result] = await self._slotwise(
            "put", [(key, ("SET", GATEWAY_PREFIX + key, value, "PX", int(ttl * 1000), "NX"))]
        )
        return bool(result)

    async def reserve(self, items: Sequence[tuple[str, bytes]], ttl: float) -> list[bool]:
        ms = int(ttl * 1000)
        commands = [(key, ("EVAL", _RESERVE, 1, GATEWAY_PREFIX + key, value, ms)) for key, value in items]
        return [bool(r) for r in await self._slotwise("put", commands)]

    async def delete(self, key: str) -> None:
        await self._slotwise("put", [(key, ("DEL", GATEWAY_PREFIX + key))])

    async def delete_if(self, items: Sequence[tuple[str, bytes]]) -> None:
        await self._slotwise(
            "put", [(key, ("EVAL", _DELETE_IF, 1, GATEWAY_PREFIX + key, value)) for key, value in items]
        )

    async def _slotwise(self, op: str, commands: Sequence[tuple[str, Command]]) -> list[Any]:
        """Gateway writes: grouped by the primary that owns each key, each group on one connection
        and followed there by ``WAIT`` (the keys of one request share a slot, so usually one group)."""
        if not commands:
            return []
        groups: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(commands):
            groups.setdefault(self.topology.group_of(GATEWAY_PREFIX + key), []).append(i)
        results: list[Any] = [None] * len(commands)

        async def one(indexes: list[int]) -> None:
            group = [commands[i][1] for i in indexes]
            for i, value in zip(indexes, await self._on_primary(group), strict=True):
                results[i] = value

        await self._op(op, asyncio.gather(*(one(ix) for ix in groups.values())))
        return results

    async def _on_primary(self, commands: list[Command]) -> list[Any]:
        """Run *commands* (keys of one slot) then ``WAIT n timeout`` on the same connection: WAIT
        counts the replicas that have this connection's writes, so another connection would not do."""
        wait = self.topology.wait_replicas
        tail: list[Command] = [("WAIT", wait, int(self.topology.wait_timeout * 1000))] if wait else []
        client = self._client
        if not isinstance(client, RedisCluster):
            async with client.pipeline(transaction=False) as pipe:
                for command in [*commands, *tail]:
                    pipe.execute_command(*command)
                out = list(await pipe.execute())
        else:
            out = await self._on_cluster_node(client, [*commands, *tail])
        if tail:
            acked = out.pop()
            if int(acked) < wait:
                self._metrics.correlation_replica_unacked.inc()
        return out

    async def _on_cluster_node(self, client: RedisCluster, commands: list[Command]) -> list[Any]:
        first = commands[0]
        key = first[3] if first[0] == "EVAL" else first[1]
        for attempt in range(2):
            node = client.get_node_from_key(key)
            if node is None:
                raise StoreError("no primary owns the slot")
            piped = [PipelineCommand(i, *c) for i, c in enumerate(commands)]
            await node.execute_pipeline(piped)
            errors = [c.result for c in piped if isinstance(c.result, BaseException)]
            if not errors:
                return [c.result for c in piped]
            if attempt == 0 and all(isinstance(e, MovedError) for e in errors):
                # The slot moved (resharding, failover): learn the new owner and try once more.
                await client.nodes_manager.initialize()
                continue
            if all(isinstance(e, AskError) for e in errors):
                # The slot is being migrated and these keys already left: run just those on the
                # importing node, each after ASKING (it admits the next command only), then WAIT there.
                await self._asking(client, piped, commands)
                return [c.result for c in piped]
            raise errors[0]
        raise AssertionError("unreachable")

    @staticmethod
    async def _asking(client: RedisCluster, piped: list[PipelineCommand], commands: list[Command]) -> None:
        asked = [c for c in piped if isinstance(c.result, AskError)]
        error = asked[0].result
        assert isinstance(error, AskError)
        target = client.get_node(host=error.host, port=error.port)
        if target is None:
            raise error
        again: list[PipelineCommand] = []
        for command in asked:
            again += [PipelineCommand(len(again), "ASKING"), PipelineCommand(len(again) + 1, *command.args)]
        if commands[-1][0] == "WAIT":
            again.append(PipelineCommand(len(again), *commands[-1]))
        await target.execute_pipeline(again)
        results = [c.result for c in again if c.args[0] != "ASKING"]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        for command, result in zip(asked, results, strict=False):
            command.result = result
        if commands[-1][0] == "WAIT":
            piped[-1].result = min(int(cast(int, piped[-1].result)), int(cast(int, results[-1])))

    async def _op(self, op: str, call: Awaitable[Any]) -> Any:
        """Await a round trip under the store's deadline; whatever fails becomes StoreError (logged, counted)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._op_timeout):
                result = await call
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own task is being cancelled (shutdown)
            # A CancelledError that is not ours came out of the client: a failure like any other.
            self._metrics.correlation_store_errors.labels(op).inc()
            self.topology.failed(exc)
            raise StoreError(f"correlation store {op} failed: {exc!r}"[:300]) from exc
        except Exception as exc:  # any client error class: see the module docstring
            self._metrics.correlation_store_errors.labels(op).inc()
            self.topology.failed(exc)
            self._log_error(op, exc)
            raise StoreError(f"correlation store {op} failed: {exc!r}"[:300]) from exc
        self._metrics.correlation_store_seconds.labels(op).observe(time.perf_counter() - started)
        return result

    async def purge_sender(self, sender: str, *, batch: int = 500) -> int:
        """Delete every record whose sender is *sender* (SCAN on every primary; for privacy requests)."""
        deleted = 0
        for node in await self.topology.primaries_for_scan():
            try:
                keys: list[bytes] = []
                async for key in node.scan_iter(match=KEY_PREFIX + "*", count=batch):
                    keys.append(key)
                    if len(keys) >= batch:
                        deleted += await _purge(node, keys, sender)
                        keys = []
                if keys:
                    deleted += await _purge(node, keys, sender)
            finally:
                await node.aclose()
        return deleted

    def _log_error(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:  # a Redis outage must not flood the log
            self._last_error_log = now
            log.warning("relay.correlation_store_error", op=op, error=repr(exc)[:300])


async def _purge(node: Any, keys: list[bytes], sender: str) -> int:
    """Delete those of *keys* (all on *node*) whose record names *sender*. GET and DEL per key:
    in a cluster, the keys of one node span many slots."""
    async with node.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.get(k)
        values = await pipe.execute()
    doomed = [
        k
        for k, v in zip(keys, values, strict=True)
        if isinstance(v, bytes) and SendRecord.decode("", v).sender == sender
    ]
    if not doomed:
        return 0
    async with node.pipeline(transaction=False) as pipe:
        for k in doomed:
            pipe.delete(k)
        return sum(int(n) for n in await pipe.execute())


def _bytes(value: object) -> bytes | None:
    # decode_responses is off, so values are bytes (or None for a miss).
    return value if isinstance(value, bytes) or value is None else str(value).encode()
