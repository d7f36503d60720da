"""Update streams: many update batches over one client-streaming gRPC call per node.

Each batch sent is one WriteRequest; the node answers each with an ack, in order,
once the batch is durable. ``max_in_flight`` batches may await their ack; ``send``
blocks beyond that, which is the flow control a fast producer needs. The first error
ends the stream: the batches acknowledged before it stand, the error names the
batch (``update N of the stream``) and is raised by the next ``send``/``flush``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from kvstore.columns import encode_rows
from kvstore.errors import KvstoreError, Unavailable, from_rpc_error
from kvstore.schema import TableSchema

if TYPE_CHECKING:
    from kvstore.client.aio import AsyncClient
    from kvstore.client.sync import Client

__all__ = ["AsyncUpdateStream", "UpdateStream"]

_END = object()


class _NodeStream:
    """One UpdateStream call to one node, fed from a queue, acks read by a thread."""

    def __init__(self, stub: Any, address: str, max_in_flight: int) -> None:
        self.address = address
        self.window = threading.Semaphore(max_in_flight)
        self.requests: queue.Queue = queue.Queue()
        self.sent = 0
        self.acked = 0
        self.rows_acked = 0
        self.error: KvstoreError | None = None
        self.done = threading.Condition()
        self.call = stub.UpdateStream(iter(self.requests.get, _END))
        self.reader = threading.Thread(target=self._read_acks, daemon=True)
        self.reader.start()

    def _read_acks(self) -> None:
        try:
            for ack in self.call:
                with self.done:
                    self.acked = ack.seq
                    self.rows_acked += ack.rows_written
                    self.done.notify_all()
                self.window.release()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED or self.error is None:
                self.error = from_rpc_error(exc, self.address, None)
        with self.done:
            if self.error is None and self.acked < self.sent:
                self.error = Unavailable(
                    f"node {self.address} ended the update stream after {self.acked} of "
                    f"{self.sent} batches"
                )
            self.done.notify_all()
        # Unblock a producer waiting for the window.
        for _ in range(self.sent - self.acked + 1):
            self.window.release()

    def send(self, request: Any) -> None:
        self.window.acquire()
        if self.error is not None:
            raise self.error
        self.sent += 1
        self.requests.put(request)

    def flush(self, timeout: float | None) -> None:
        with self.done:
            if not self.done.wait_for(
                lambda: self.acked >= self.sent or self.error is not None, timeout
            ):
                raise KvstoreError(
                    f"node {self.address}: {self.sent - self.acked} update batches were not "
                    f"acknowledged within {timeout} s"
                )
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.requests.put(_END)
        self.reader.join(timeout=30)


class UpdateStream:
    """``with client.update_stream("t") as s: s.send({"key": [...], "ctr": [...]})``."""

    def __init__(self, client: Client, table: str, schema: TableSchema, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._client = client
        self._table = table
        self._schema = schema
        self._max_in_flight = max_in_flight
        self._streams: dict[str, _NodeStream] = {}
        self.batches_sent = 0

    def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number (1, 2, …) in this stream."""
        rows = encode_rows(self._schema, data, key_column, event_time)
        for call in self._client._ops.plan_write(self._table, self._schema, rows):
            stream = self._streams.get(call.address)
            if stream is None:
                stream = _NodeStream(
                    self._client._stub(call.address), call.address, self._max_in_flight
                )
                self._streams[call.address] = stream
            stream.send(call.request)
        self.batches_sent += 1
        return self.batches_sent

    @property
    def rows_acked(self) -> int:
        """Rows the node(s) have acknowledged as durable so far."""
        return sum(s.rows_acked for s in self._streams.values())

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every batch sent is acknowledged (durable); raise the stream's error."""
        for stream in self._streams.values():
            stream.flush(timeout)

    def close(self) -> None:
        """Flush, then end the stream."""
        try:
            self.flush()
        finally:
            for stream in self._streams.values():
                stream.close()
            self._streams.clear()

    def __enter__(self) -> UpdateStream:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            for stream in self._streams.values():
                stream.call.cancel()
                stream.close()


class AsyncUpdateStream:
    """``async with await client.update_stream("t") as s: await s.send({...})``."""

    def __init__(self, client: AsyncClient, table: str, schema: TableSchema, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._client = client
        self._table = table
        self._schema = schema
        self._max_in_flight = max_in_flight
        self._calls: dict[str, Any] = {}
        self._windows: dict[str, asyncio.Semaphore] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._sent: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        self._error: KvstoreError | None = None
        self._progress = asyncio.Condition()
        self.batches_sent = 0
        self.rows_acked = 0

    async def _read_acks(self, address: str, call: Any) -> None:
        try:
            async for ack in call:
                async with self._progress:
                    self._acked[address] = ack.seq
                    self.rows_acked += ack.rows_written
                    self._progress.notify_all()
                self._windows[address].release()
        except grpc.RpcError as exc:
            self._error = from_rpc_error(exc, address, None)
        if self._error is None and self._acked[address] < self._sent[address]:
            self._error = Unavailable(f"node {address} ended the update stream early")
        async with self._progress:
            self._progress.notify_all()
        self._windows[address].release()

    async def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number in this stream."""
        rows = encode_rows(self._schema, data, key_column, event_time)
        for call in self._client._ops.plan_write(self._table, self._schema, rows):
            address = call.address
            if address not in self._calls:
                grpc_call = self._client._stub(address).UpdateStream()
                self._calls[address] = grpc_call
                self._windows[address] = asyncio.Semaphore(self._max_in_flight)
                self._sent[address] = 0
                self._acked[address] = 0
                self._readers[address] = asyncio.create_task(self._read_acks(address, grpc_call))
            await self._windows[address].acquire()
            if self._error is not None:
                raise self._error
            self._sent[address] += 1
            await self._calls[address].write(call.request)
        self.batches_sent += 1
        return self.batches_sent

    async def flush(self) -> None:
        """Wait until every batch sent is acknowledged; raise the stream's error."""
        async with self._progress:
            await self._progress.wait_for(
                lambda: (
                    self._error is not None
                    or all(self._acked[a] >= self._sent[a] for a in self._calls)
                )
            )
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Flush, then end the stream."""
        try:
            await self.flush()
        finally:
            for address, grpc_call in self._calls.items():
                if not self._readers[address].done():
                    await grpc_call.done_writing()
                    await self._readers[address]
            self._calls.clear()

    async def __aenter__(self) -> AsyncUpdateStream:
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            for grpc_call in self._calls.values():
                grpc_call.cancel()
