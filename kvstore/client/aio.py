"""AsyncClient: the same calls as Client, as coroutines on grpc.aio."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np

from kvstore.client.core import DEFAULT_TIMEOUT_S, NodeCall
from kvstore.client.flows import Operations
from kvstore.client.result import GetResult
from kvstore.client.stream import AsyncUpdateStream
from kvstore.errors import KvstoreError, from_rpc_error
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_aio_channel
from kvstore.wire.messages import TableInfo, VersionInfo

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio twin of ``kvstore.Client``: same arguments, same results, awaited.

    Use within one event loop; ``await client.close()`` (or ``async with``) at the end.
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._ops = Operations(address, timeout)
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.FeatureStoreStub]] = {}

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
        timeout: float | None = None,
    ) -> TableInfo:
        """See ``Client.create_table``."""
        return await self._run(
            self._ops.create_table_flow(name, key, features, shards, ttl), timeout
        )

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
        return await self._run(self._ops.get_flow(table, keys, features, version), timeout)

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
        entry = self._channels.get(address)
        if entry is None:
            channel = open_aio_channel(address)
            entry = (channel, pb_grpc.FeatureStoreStub(channel))
            self._channels[address] = entry
        return entry[1]

    async def _send_one(self, call: NodeCall, timeout: float) -> Any:
        try:
            return await getattr(self._stub(call.address), call.method)(
                call.request, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, call.address, timeout) from None

    async def _run(self, flow: Any, timeout: float | None) -> Any:
        timeout = self._ops.call_timeout(timeout)
        try:
            calls = next(flow)
            while True:
                try:
                    if len(calls) == 1:
                        responses = [await self._send_one(calls[0], timeout)]
                    else:
                        responses = list(
                            await asyncio.gather(*(self._send_one(c, timeout) for c in calls))
                        )
                except KvstoreError as exc:
                    calls = flow.throw(exc)
                else:
                    calls = flow.send(responses)
        except StopIteration as done:
            return done.value

    async def close(self) -> None:
        """Close the channels to every node."""
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
