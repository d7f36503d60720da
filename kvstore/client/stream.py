"""Update streams: many update batches over one client-streaming gRPC call per node.

Each batch sent is split by shard over every writable replica of its keys' shards;
each node's part is one WriteRequest on that node's call, and the node answers each
with an ack, in order, once it is durable. ``max_in_flight`` parts per node may await
their ack; ``send`` blocks beyond that, which is the flow control a fast producer needs.

A batch is acknowledged (``rows_acked``, ``flush`` returning) once each shard it
touches has the acks of the write quorum the current cluster map asks for
(``Route.needed``, counted by ``ReplicaFlows._lacking``: the rule unary writes follow)
and every node it was sent to has acked or failed, or is marked down by the map.

A node's call that fails (StaleMap: it does not hold the shard, nothing was applied;
Unavailable: gone, or restarted on another port; DeadlineExceeded: its window stayed
full for the client's timeout, a hung node) is dropped and the map refreshed (to at
least the epoch a StaleMap named) before any batch counts as acknowledged; the shards
of each batch that lack their quorum are then sent again to the replicas that have not
applied them, at the event time the batch was stamped with when first sent (a part
that had landed is written again at the same event time, which changes nothing). The
failed node is not asked again until the map's epoch rises or it returns on another
address. A kill -9 of one of R = 2 replicas therefore ends nothing: batches wait for
the map to mark the node down (its lease lapsed), then the replica left is the quorum.
The stream raises (``send``/``flush``) only when a batch cannot reach its quorum:
no replica left to send it to, or ``flush``'s timeout passed; the error names the
shards and the nodes that failed. ``AsyncUpdateStream`` does the same on the event loop.
The bookkeeping both share, sans I/O, is kvstore.client.stream_acks's.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from kvstore.client.core import MAX_ROUTE_RETRIES, NodeCall, write_wire
from kvstore.client.stream_acks import NodeAcks, Rerouting
from kvstore.errors import KvstoreError, from_rpc_error
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb

if TYPE_CHECKING:
    from kvstore.client.aio import AsyncClient
    from kvstore.client.sync import Client

__all__ = ["AsyncUpdateStream", "UpdateStream"]

_END = object()

#: The update stream's method, called with our own request serializer.
UPDATE_STREAM_METHOD = "/kvstore.v1.FeatureStore/UpdateStream"


#: How long ``flush`` waits for an ack before it looks at the map again (s).
TICK_S = 0.25


class _NodeStream(NodeAcks):
    """One UpdateStream call to one node, fed from a queue, acks read by a thread;
    ``events`` is the stream's condition, notified at every ack and at the call's end."""

    def __init__(
        self, channel: grpc.Channel, address: str, max_in_flight: int, events: threading.Condition
    ) -> None:
        super().__init__(address)
        self.window = threading.Semaphore(max_in_flight)
        self.requests: queue.Queue = queue.Queue()
        self.done = events
        # Requests come serialized already (SerializedWrite): see core.serialized_write.
        update_stream = channel.stream_stream(
            UPDATE_STREAM_METHOD,
            request_serializer=write_wire,
            response_deserializer=pb.WriteAck.FromString,
        )
        self.call = update_stream(iter(self.requests.get, _END))
        self.reader = threading.Thread(target=self._read_acks, daemon=True)
        self.reader.start()

    def _read_acks(self) -> None:
        try:
            for ack in self.call:
                with self.done:
                    self._take(ack)
                    self.done.notify_all()
                self.window.release()
        except grpc.RpcError as exc:
            self._failed(exc)
        with self.done:
            self._ended()
            self.done.notify_all()
        # Unblock a producer waiting for the window.
        for _ in range(self.sent - self.acked + 1):
            self.window.release()

    def send(self, batch: int, shards: np.ndarray, request: Any, timeout: float) -> bool:
        """Queue part of stream batch ``batch``; False if the call has failed (or its
        window stayed full ``timeout`` s: a hung node)."""
        if not self.window.acquire(timeout=timeout):
            with self.done:
                self._hung(timeout)
            return False
        with self.done:
            if self.error is not None:
                return False
            self._queued(batch, shards, request.epoch)
        self.requests.put(request)
        return True

    def close(self) -> None:
        self.requests.put(_END)
        self.reader.join(timeout=30)

    def cancel(self) -> None:
        """End the call now, whatever is in flight (the caller sends it again elsewhere)."""
        self.call.cancel()
        self.close()


class UpdateStream(Rerouting):
    """``with client.update_stream("t") as s: s.send({"key": [...], "ctr": [...]})``."""

    _client: Client
    _serialized = True

    def __init__(self, client: Client, table: str, schema: TableSchema, max_in_flight: int):
        super().__init__(client, table, schema, max_in_flight)
        self._streams: dict[str, _NodeStream] = {}
        self._events = threading.Condition()

    def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number (1, 2, …) in this stream.

        ``event_time`` in µs since the epoch (default: now, stamped here once)."""
        # Acks first, then the batch: planned by the map they may have refreshed, and
        # never checked for being stuck before it was sent once.
        self._progress()
        number = self._new_batch(data, key_column, event_time)
        self._send(self._plan(number))
        self._progress()
        return number

    def _send(self, parts: list[tuple[int, NodeCall]]) -> None:
        timeout = self._client._ops.timeout
        for number, call in parts:
            stream = self._streams.get(call.address)
            if stream is None:
                stream = _NodeStream(
                    self._client._channel(call.address),
                    call.address,
                    self._max_in_flight,
                    self._events,
                )
                self._streams[call.address] = stream
            shards = call.shards
            assert shards is not None  # a Write's: plan_write names its shards
            if stream.send(number, shards, call.request, timeout):
                self._batches[number].sent(call.address, shards)

    def _harvest(self) -> dict[str, KvstoreError]:
        """Take the acks the calls received; the nodes whose call failed, with why."""
        failed = {}
        for address, stream in self._streams.items():
            with self._events:
                applied, stream.applied = stream.applied, []
                error = stream.error
            self._take_applied(address, applied)
            if error is not None:
                failed[address] = error
        return failed

    def _progress(self, quiet: bool = False) -> None:
        """Take acks; drop failed calls, refresh the map, send what lacks its quorum
        again; count the batches acknowledged; raise when one cannot reach its quorum."""
        for _ in range(MAX_ROUTE_RETRIES):
            failed = self._harvest()
            if not failed and not self._refresh_due(quiet):
                break
            errors = self._rerouted(list(failed.values()))
            ops = self._client._ops
            failed_at = {}
            for address, error in failed.items():
                with self._events:
                    failed_at[address] = self._streams[address].failed_at(ops.route.epoch)
                self._drop(address, error)
                self._streams.pop(address).cancel()
            self._refreshed = time.monotonic()
            self._client._run(ops.refresh_map_flow(self._refresh_epoch(errors)), None)
            self._shelve(failed_at)
            for stream in [s for a, s in self._streams.items() if self._gone(a)]:
                self._streams.pop(stream.address).cancel()  # a hung node marked down
            for number in list(self._batches):
                self._send(self._plan(number))
        self._settle()
        stuck = self._stuck()
        if stuck is not None:
            raise stuck

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every batch sent is acknowledged by its quorum, ``timeout`` s at
        most; raise the error of a batch that cannot reach it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet = False
        while True:
            self._progress(quiet)
            if not self._batches:
                return
            left = TICK_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise self._overdue(timeout)
            with self._events:
                quiet = not self._events.wait_for(self._news, min(left, TICK_S))

    def _news(self) -> bool:
        return any(s.applied or s.error is not None for s in self._streams.values())

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
                stream.cancel()
            self._streams.clear()


class _AsyncNodeStream(NodeAcks):
    """One UpdateStream call to one node on the event loop; a task reads the acks.

    ``progress`` is the stream's condition, notified at every ack and at the end of the
    call."""

    def __init__(
        self, stub: Any, address: str, max_in_flight: int, progress: asyncio.Condition
    ) -> None:
        super().__init__(address)
        self.window = asyncio.Semaphore(max_in_flight)
        self.progress = progress
        self.call = stub.UpdateStream()
        self.reader = asyncio.create_task(self._read_acks())

    async def _read_acks(self) -> None:
        try:
            async for ack in self.call:
                async with self.progress:
                    self._take(ack)
                    self.progress.notify_all()
                self.window.release()
        except grpc.RpcError as exc:
            self._failed(exc)
        self._ended()
        async with self.progress:
            self.progress.notify_all()
        for _ in range(self.sent - self.acked + 1):  # unblock a producer waiting
            self.window.release()

    async def send(self, batch: int, shards: np.ndarray, request: Any, timeout: float) -> bool:
        """``_NodeStream.send`` on the event loop."""
        try:
            await asyncio.wait_for(self.window.acquire(), timeout)
        except TimeoutError:
            self._hung(timeout)
            return False
        if self.error is not None:
            return False
        self._queued(batch, shards, request.epoch)
        try:
            await self.call.write(request)
        except grpc.RpcError as exc:  # the call had ended: its status says why
            self.error = self.error or from_rpc_error(exc, self.address, None)
            return False
        return True

    async def close(self) -> None:
        if not self.reader.done():
            await self.call.done_writing()
        await self.reader

    async def cancel(self) -> None:
        self.call.cancel()
        # grpc.aio ends the reader's iteration with CancelledError: the reader task ends
        # cancelled, which is no error of this stream's caller (asyncio.wait raises none).
        await asyncio.wait([self.reader])


class AsyncUpdateStream(Rerouting):
    """``async with await client.update_stream("t") as s: await s.send({...})``;
    acknowledged at the quorum as ``UpdateStream`` (see the module docstring)."""

    _client: AsyncClient

    def __init__(self, client: AsyncClient, table: str, schema: TableSchema, max_in_flight: int):
        super().__init__(client, table, schema, max_in_flight)
        self._streams: dict[str, _AsyncNodeStream] = {}
        self._progress_cv = asyncio.Condition()

    async def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number in this stream."""
        await self._progress()
        number = self._new_batch(data, key_column, event_time)
        await self._send(self._plan(number))
        await self._progress()
        return number

    async def _send(self, parts: list[tuple[int, NodeCall]]) -> None:
        timeout = self._client._ops.timeout
        for number, call in parts:
            stream = self._streams.get(call.address)
            if stream is None:
                stream = _AsyncNodeStream(
                    self._client._stub(call.address),
                    call.address,
                    self._max_in_flight,
                    self._progress_cv,
                )
                self._streams[call.address] = stream
            shards = call.shards
            assert shards is not None  # a Write's: plan_write names its shards
            if await stream.send(number, shards, call.request, timeout):
                self._batches[number].sent(call.address, shards)

    def _harvest(self) -> dict[str, KvstoreError]:
        failed = {}
        for address, stream in self._streams.items():
            applied, stream.applied = stream.applied, []
            self._take_applied(address, applied)
            if stream.error is not None:
                failed[address] = stream.error
        return failed

    async def _progress(self, quiet: bool = False) -> None:
        """``UpdateStream._progress`` on the event loop."""
        for _ in range(MAX_ROUTE_RETRIES):
            failed = self._harvest()
            if not failed and not self._refresh_due(quiet):
                break
            errors = self._rerouted(list(failed.values()))
            ops = self._client._ops
            failed_at = {}
            for address, error in failed.items():
                failed_at[address] = self._streams[address].failed_at(ops.route.epoch)
                self._drop(address, error)
                await self._streams.pop(address).cancel()
            self._refreshed = time.monotonic()
            await self._client._run(ops.refresh_map_flow(self._refresh_epoch(errors)), None)
            self._shelve(failed_at)
            for stream in [s for a, s in self._streams.items() if self._gone(a)]:
                await self._streams.pop(stream.address).cancel()
            for number in list(self._batches):
                await self._send(self._plan(number))
        self._settle()
        stuck = self._stuck()
        if stuck is not None:
            raise stuck

    async def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every batch sent is acknowledged by its quorum, ``timeout`` s at
        most; raise the error of a batch that cannot reach it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet = False
        while True:
            await self._progress(quiet)
            if not self._batches:
                return
            left = TICK_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise self._overdue(timeout)
            quiet = False
            try:
                async with self._progress_cv:
                    await asyncio.wait_for(
                        self._progress_cv.wait_for(self._news), min(left, TICK_S)
                    )
            except TimeoutError:
                quiet = True

    def _news(self) -> bool:
        return any(s.applied or s.error is not None for s in self._streams.values())

    async def close(self) -> None:
        """Flush, then end the stream."""
        try:
            await self.flush()
        finally:
            for stream in self._streams.values():
                await stream.close()
            self._streams.clear()

    async def __aenter__(self) -> AsyncUpdateStream:
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            for stream in self._streams.values():
                await stream.cancel()
            self._streams.clear()
