"""AsyncClient: the same calls as Client, as coroutines: ``get`` over the nodes' fast read
path (pipelined, ``kvstore.client.aio_fast``), everything else on grpc.aio."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np

from kvstore.client.aio_fast import AsyncFastConnections
from kvstore.client.core import (
    DEFAULT_TIMEOUT_S,
    STALE_ROUTE,
    STALE_SCHEMA,
    NodeCall,
    Settled,
    feature_store_stub,
    read_once,
)
from kvstore.client.flows import Operations
from kvstore.client.health import HedgePolicy
from kvstore.client.hedging import HedgedRead
from kvstore.client.result import GetResult
from kvstore.client.stream import AsyncUpdateStream
from kvstore.errors import (
    DeadlineExceeded,
    KvstoreError,
    TableNotFound,
    Unavailable,
    from_rpc_error,
)
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_aio_channel
from kvstore.wire.messages import TableInfo, VersionInfo

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio twin of ``kvstore.Client``: same arguments, same results, awaited.

    ``get`` goes over a node's fast read path when it has one (``transport="auto"``,
    the default; ``"grpc"``: gRPC only): one connection per node per event loop,
    shared by all the loop's tasks, requests pipelined on it, so concurrent gets do
    not wait for each other. A cancelled ``get`` leaves the connection usable.
    ``await client.close()`` (or ``async with``) at the end.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: str = "auto",
        zone: str = "",
        hedging: HedgePolicy | None = None,
    ) -> None:
        if transport not in ("auto", "grpc"):
            raise ValueError(f"transport must be 'auto' or 'grpc', not {transport!r}")
        self._ops = Operations(address, timeout, zone, hedging)
        #: (event loop, address) → channel and stub: a grpc.aio channel serves one loop.
        self._channels: dict[tuple[Any, str], tuple[grpc.aio.Channel, pb_grpc.FeatureStoreStub]]
        self._channels = {}
        self._fast = AsyncFastConnections() if transport == "auto" else None
        #: Channels closing in the background (see _drop_channel).
        self._closing: set[asyncio.Future] = set()

    @property
    def address(self) -> str:
        return self._ops.seed

    async def create_table(
        self,
        name: str,
        *,
        key: str = "int64",
        features: dict[str, str],
        shards: int = 8,
        ttl: dict[str, float] | None = None,
        replicas: int = 1,
        write_quorum: int | None = None,
        timeout: float | None = None,
    ) -> TableInfo:
        """See ``Client.create_table``."""
        flow = self._ops.create_table_flow(name, key, features, shards, ttl, replicas, write_quorum)
        return await self._run(flow, timeout)

    async def describe_table(self, name: str, *, timeout: float | None = None) -> TableInfo:
        """See ``Client.describe_table``."""
        return await self._run(self._ops.describe_flow(name), timeout)

    async def list_tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        """See ``Client.list_tables``."""
        return await self._run(self._ops.list_flow(), timeout)

    async def drop_table(self, name: str, *, timeout: float | None = None) -> None:
        """See ``Client.drop_table``."""
        await self._run(self._ops.drop_flow(name), timeout)

    async def cluster_map(self, *, timeout: float | None = None) -> dict:
        """See ``Client.cluster_map``."""
        return await self._run(self._ops.cluster_map_flow(), timeout)

    async def get(
        self,
        table: str,
        keys: Any,
        features: list[str] | None = None,
        *,
        version: int = 0,
        timeout: float | None = None,
    ) -> GetResult:
        """See ``Client.get``."""
        ops = self._ops
        timeout = ops.call_timeout(timeout)
        keys, features = read_once(keys), read_once(features)
        quick = ops.quick_get(table, keys, features, version, self._fast is not None)
        if quick is None:  # the schema or the route must be fetched first
            return await self._run(ops.get_flow(table, keys, features, version), timeout)
        plan, batch, fast, calls = quick
        try:
            if fast is not None:
                assert self._fast is not None
                body = plan.request(batch, version)
                status, answer = await self._fast.get_answer(fast, body, timeout, batch.count)
                return ops.finish_frame(table, plan, batch, fast, status, answer)
            if calls and ops.replicated(table):
                read = HedgedRead(ops, table, plan.schema, plan, batch, version, calls=calls)
                try:
                    await self._drive(read, timeout)
                except STALE_ROUTE as exc:
                    flow = ops.get_retry_flow(
                        exc, table, keys, features, version, read.failed_nodes()
                    )
                    return await self._run(flow, timeout)
                return ops.finish_get(table, plan, batch, *read.answers())
            if calls:
                outcomes = await self._send_settled(calls, timeout)
                error, failed = ops.quick_outcomes(calls, outcomes)
                if error is not None:
                    flow = ops.get_retry_flow(error, table, keys, features, version, failed)
                    return await self._run(flow, timeout)
            else:
                outcomes = []
            return ops.finish_get(table, plan, batch, calls, outcomes)
        except (*STALE_SCHEMA, *STALE_ROUTE, TableNotFound) as exc:
            flow = ops.get_retry_flow(exc, table, keys, features, version)
        return await self._run(flow, timeout)

    async def write(
        self,
        table: str,
        data: Any,
        *,
        key_column: str = "key",
        event_time: int | np.ndarray | None = None,
        position: Any = None,
        timeout: float | None = None,
    ) -> int:
        """See ``Client.write``."""
        return await self._run(
            self._ops.write_flow(table, data, key_column, event_time, position), timeout
        )

    async def delete(
        self,
        table: str,
        keys: Any,
        *,
        event_time: int | None = None,
        position: Any = None,
        timeout: float | None = None,
    ) -> int:
        """See ``Client.delete``."""
        return await self._run(self._ops.delete_flow(table, keys, event_time, position), timeout)

    async def update(self, table: str, data: Any, **options: Any) -> int:
        """See ``Client.update``."""
        return await self.write(table, data, **options)

    async def update_stream(
        self, table: str, *, max_in_flight: int = 16, timeout: float | None = None
    ) -> AsyncUpdateStream:
        """See ``Client.update_stream``; ``await stream.send(...)``, ``async with``."""
        schema = await self._run(self._ops.schema_flow(table), timeout)
        return AsyncUpdateStream(self, table, schema, max_in_flight)

    async def consumer_positions(
        self, table: str, consumer: str, source: str, *, timeout: float | None = None
    ) -> dict[int, int]:
        """See ``Client.consumer_positions``."""
        return await self._run(self._ops.positions_flow(table, consumer, source), timeout)

    def counters(self) -> dict[str, int]:
        """See ``Client.counters``."""
        return self._ops.counters.as_dict()

    async def stats(self, *, timeout: float | None = None) -> dict:
        """See ``Client.stats``."""
        return await self._run(self._ops.stats_flow(), timeout)

    async def versions(self, table: str, *, timeout: float | None = None) -> list[VersionInfo]:
        """See ``Client.versions``."""
        return await self._run(self._ops.versions_flow(table), timeout)

    async def rollback(
        self, table: str, to_version: int = 0, *, timeout: float | None = None
    ) -> VersionInfo:
        """See ``Client.rollback``."""
        return await self._run(self._ops.rollback_flow(table, to_version), timeout)

    async def load(self, table: str, source: str | list[str], **options: Any) -> Any:
        """See ``Client.load`` (runs the loader in a worker thread)."""
        from kvstore.ingest.bulk import load  # lazily, as Client.load does

        options.setdefault("timeout", max(self._ops.timeout, 600.0))
        return await asyncio.to_thread(load, self.address, table, source, **options)

    def _stub(self, address: str) -> pb_grpc.FeatureStoreStub:
        key = (asyncio.get_running_loop(), address)
        entry = self._channels.get(key)
        if entry is None:
            if any(loop.is_closed() for loop, _ in self._channels):  # their channels are gone
                self._channels = {k: e for k, e in self._channels.items() if not k[0].is_closed()}
            channel = open_aio_channel(address)
            stub = feature_store_stub(channel)
            entry = (channel, stub)
            self._channels[key] = entry
        return entry[1]

    async def _send_one(self, call: NodeCall, timeout: float) -> Any:
        try:
            return await getattr(self._stub(call.address), call.method)(
                call.request, timeout=timeout
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, call.address, timeout)
            if isinstance(error, Unavailable):
                # A channel that failed to connect waits out gRPC's reconnect backoff
                # (1 s, growing to 2 min) and fails every call meanwhile, even once the
                # node is back (restarted on the same port): the next call gets a new one.
                self._drop_channel(call.address, timeout)
            raise error from None

    def _drop_channel(self, address: str, grace: float) -> None:
        """Open a new channel to ``address`` for the next call; the old one closes once
        the calls still on it end (``grace`` s at most: closing cancels them)."""
        entry = self._channels.pop((asyncio.get_running_loop(), address), None)
        if entry is not None:
            closing = asyncio.ensure_future(entry[0].close(grace))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _send(self, calls: list[NodeCall], timeout: float) -> list[Any]:
        """The responses to ``calls``, sent in parallel; the first error once all ended."""
        outcomes = await self._send_settled(calls, timeout)
        for outcome in outcomes:
            if isinstance(outcome, KvstoreError):
                raise outcome
        return outcomes

    async def _send_settled(self, calls: list[NodeCall], timeout: float) -> list[Any]:
        """The outcome of each call, sent in parallel (gets over the nodes' fast read
        paths when each has one, the rest over gRPC): its response or its KvstoreError."""
        outstanding = self._ops.outstanding
        for c in calls:
            outstanding[c.address] = outstanding.get(c.address, 0) + 1
        try:
            if len(calls) == 1:
                return [await self._outcome(calls[0], timeout)]
            if self._fast is not None and calls[0].method == "Get":
                fast = self._ops.fast
                if all(c.address in fast for c in calls):  # pipelined, no task per call
                    pairs = [(fast[c.address], c.request) for c in calls]
                    return await self._fast.get_many(pairs, timeout, settled=True)
            outcomes = await asyncio.gather(*(self._outcome(c, timeout) for c in calls))
            return list(outcomes)
        finally:
            for c in calls:
                outstanding[c.address] -= 1

    async def _drive(self, read: HedgedRead, timeout: float) -> None:
        """Run ``read`` to its end within ``timeout`` s: a task per call; the wait for
        the next answer ends at the next hedge's time. Losers are cancelled (a cancelled
        fast-path get leaves its connection usable)."""
        deadline = time.monotonic() + timeout
        tasks: dict[asyncio.Future, int] = {}
        outstanding = self._ops.outstanding

        def send(ids: list[int]) -> None:
            left = max(deadline - time.monotonic(), 0.001)
            for i in ids:
                call = read.calls[i]
                outstanding[call.address] = outstanding.get(call.address, 0) + 1
                tasks[asyncio.ensure_future(self._outcome(call, left))] = i

        try:
            send(read.start())
            while not read.done:
                now = time.monotonic()
                if now >= deadline or not tasks:
                    raise DeadlineExceeded(
                        f"a read's replicas did not answer within the deadline of {timeout} s"
                    )
                wait = max(min(read.next_due(), deadline) - now, 0)
                ended, _ = await asyncio.wait(
                    tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not ended:
                    send(read.hedge())
                    continue
                for task in ended:
                    i = tasks.pop(task)
                    outstanding[read.calls[i].address] -= 1
                    send(read.answered(i, task.result()))
        finally:
            for task, i in tasks.items():
                task.cancel()
                outstanding[read.calls[i].address] -= 1

    async def _outcome(self, call: NodeCall, timeout: float) -> Any:
        """The response to one call, or its KvstoreError."""
        try:
            if self._fast is not None and call.method == "Get":
                fast = self._ops.fast.get(call.address)
                if fast is not None:
                    return await self._fast.get(fast, call.request.SerializeToString(), timeout)
            return await self._send_one(call, timeout)
        except KvstoreError as exc:
            return exc

    async def _run(self, flow: Any, timeout: float | None) -> Any:
        timeout = self._ops.call_timeout(timeout)
        try:
            calls = next(flow)
            while True:
                if isinstance(calls, HedgedRead):
                    try:
                        await self._drive(calls, timeout)
                    except KvstoreError as exc:
                        calls = flow.throw(exc)
                    else:
                        calls = flow.send(None)
                    continue
                if isinstance(calls, Settled):
                    wait = timeout * calls.patience
                    outcomes = await self._send_settled(calls, wait) if calls else []
                    calls = flow.send(outcomes)
                    continue
                try:
                    responses = await self._send(calls, timeout)
                except KvstoreError as exc:
                    calls = flow.throw(exc)
                else:
                    calls = flow.send(responses)
        except StopIteration as done:
            return done.value

    async def close(self) -> None:
        """Close the channels and fast-path connections to every node (the channels of
        other event loops than the running one are left to those loops)."""
        loop = asyncio.get_running_loop()
        for (owner, _), (channel, _) in self._channels.items():
            if owner is loop:
                await channel.close()
        self._channels.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._fast is not None:
            self._fast.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
