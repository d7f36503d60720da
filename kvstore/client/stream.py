"""Update streams: many update batches over one client-streaming gRPC call per node.

Each batch sent is split by shard over the nodes that hold its keys; each node's part
is one WriteRequest on that node's call, and the node answers each with an ack, in
order, once it is durable. ``max_in_flight`` parts per node may await their ack;
``send`` blocks beyond that, which is the flow control a fast producer needs.

A ``UpdateStream`` follows the cluster map as the unary calls do (docs/cluster.md,
"Clients follow the map"): when a node refuses a part with StaleMap (it does not hold
the shard: nothing was applied) or cannot be reached (Unavailable: gone, or restarted
on another port), the stream refreshes the map, opens new calls and sends again every
batch that some node has not acknowledged, whole, to the nodes the new map names.
Each batch keeps the event time it was stamped with when first sent, so a part that
had landed before the error is written again at the same event time, which changes
nothing. As for a unary call, that is one retry, then more while the map's epoch keeps rising:
a stale route met again before any batch was acknowledged since the last refresh,
with no newer map, ends the stream with the error. Any
other error ends the stream: the batches acknowledged before it stand, the error names
the node's batch (``update N of the stream``) and is raised by the next
``send``/``flush``. ``AsyncUpdateStream`` does the same on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from kvstore.client.core import MAX_ROUTE_RETRIES, STALE_ROUTE
from kvstore.columns import EncodedRows, encode_rows
from kvstore.errors import KvstoreError, Unavailable, from_rpc_error
from kvstore.schema import TableSchema

if TYPE_CHECKING:
    from kvstore.client.aio import AsyncClient
    from kvstore.client.sync import Client

__all__ = ["AsyncUpdateStream", "UpdateStream"]

_END = object()


class _NodeAcks:
    """What a node's update call keeps, sync or async: parts sent, acknowledged (and
    their rows), and the stream batch number of every part sent and not acknowledged
    yet, oldest first (the node acknowledges in order), in ``unacked``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = 0
        self.acked = 0
        self.rows_acked = 0
        self.unacked: collections.deque[int] = collections.deque()
        self.error: KvstoreError | None = None

    def _take(self, ack: Any) -> None:
        """The node acknowledged every part up to ``ack.seq``."""
        for _ in range(ack.seq - self.acked):
            self.unacked.popleft()
        self.acked = ack.seq
        self.rows_acked += ack.rows_written

    def _failed(self, exc: grpc.RpcError) -> None:
        """The call ended with ``exc``: a cancel of ours keeps the error that caused it."""
        if exc.code() != grpc.StatusCode.CANCELLED or self.error is None:
            self.error = from_rpc_error(exc, self.address, None)

    def _ended(self) -> None:
        """The call ended: parts it never acknowledged make it an Unavailable."""
        if self.error is None and self.acked < self.sent:
            self.error = Unavailable(
                f"node {self.address} ended the update stream after {self.acked} of "
                f"{self.sent} batches"
            )


class _NodeStream(_NodeAcks):
    """One UpdateStream call to one node, fed from a queue, acks read by a thread."""

    def __init__(self, stub: Any, address: str, max_in_flight: int) -> None:
        super().__init__(address)
        self.window = threading.Semaphore(max_in_flight)
        self.requests: queue.Queue = queue.Queue()
        self.done = threading.Condition()
        self.call = stub.UpdateStream(iter(self.requests.get, _END))
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

    def send(self, batch: int, request: Any) -> None:
        """Queue part of stream batch ``batch``; the stream's error if it has ended."""
        self.window.acquire()
        if self.error is not None:
            raise self.error
        with self.done:
            self.sent += 1
            self.unacked.append(batch)
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

    def cancel(self) -> None:
        """End the call now, whatever is in flight (the caller sends it again elsewhere)."""
        self.call.cancel()
        self.close()


class _Rerouting:
    """What UpdateStream and AsyncUpdateStream share: the batches some node may not
    have acknowledged, the rows acknowledged, and when a reroute gives up."""

    _streams: dict[str, Any]

    def __init__(self, client: Any, table: str, schema: TableSchema, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._client = client
        self._table = table
        self._schema = schema
        self._max_in_flight = max_in_flight
        #: The encoded rows of every batch that some node may not have acknowledged
        #: (its event times included), by batch number: what a reroute sends again.
        self._batches: dict[int, EncodedRows] = {}
        #: The oldest unacknowledged batch at the last reroute: meeting a stale route
        #: again with the same one means no progress since, and the stream gives up.
        self._rerouted_at: int | None = None
        #: Reroutes in a row with no batch acknowledged, each after the map's epoch rose.
        self._reroutes = 0
        #: Rows acknowledged by the calls ended by reroutes.
        self._rows_acked_before = 0
        self.batches_sent = 0

    def _new_batch(self, data: Any, key_column: str, event_time: Any) -> int:
        """Encode a batch (its event times stamped now, once) and number it."""
        rows = encode_rows(self._schema, data, key_column, event_time)
        self.batches_sent += 1
        self._batches[self.batches_sent] = rows
        return self.batches_sent

    @property
    def rows_acked(self) -> int:
        """Rows the node(s) have acknowledged as durable so far (a batch sent again after
        a stale route counts again)."""
        return self._rows_acked_before + sum(s.rows_acked for s in self._streams.values())

    def _unacknowledged(self) -> set[int]:
        raise NotImplementedError

    def _forget_acknowledged(self) -> None:
        """Drop the rows of the batches every node has acknowledged."""
        oldest = min(self._unacknowledged(), default=self.batches_sent + 1)
        for batch in [b for b in self._batches if b < oldest]:
            del self._batches[batch]

    def _again(self, oldest: int, before: int, after: int) -> bool:
        """Whether the stream, having met a stale route, sends its unacknowledged
        batches (oldest: ``oldest``) again after a map refresh took the epoch from
        ``before`` to ``after``: yes when a batch was acknowledged since the last
        reroute; else yes while the epoch rises (moves hand shards over one after
        another), at most MAX_ROUTE_RETRIES times in a row."""
        if self._rerouted_at != oldest:
            self._rerouted_at = oldest
            self._reroutes = 0
            return True
        self._reroutes += 1
        return after > before and self._reroutes < MAX_ROUTE_RETRIES


class UpdateStream(_Rerouting):
    """``with client.update_stream("t") as s: s.send({"key": [...], "ctr": [...]})``."""

    _client: Client

    def __init__(self, client: Client, table: str, schema: TableSchema, max_in_flight: int):
        super().__init__(client, table, schema, max_in_flight)
        self._streams: dict[str, _NodeStream] = {}

    def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number (1, 2, …) in this stream.

        ``event_time`` in µs since the epoch (default: now, stamped here once)."""
        batch = self._new_batch(data, key_column, event_time)
        try:
            self._send_parts(batch)
        except STALE_ROUTE as exc:
            self._reroute(exc, frozenset({batch}))
        self._forget_acknowledged()
        return batch

    def _send_parts(self, batch: int) -> None:
        rows = self._batches[batch]
        for call in self._client._ops.plan_write(self._table, self._schema, rows):
            stream = self._streams.get(call.address)
            if stream is None:
                stream = _NodeStream(
                    self._client._stub(call.address), call.address, self._max_in_flight
                )
                self._streams[call.address] = stream
            stream.send(batch, call.request)

    def _unacknowledged(self) -> set[int]:
        found: set[int] = set()
        for stream in self._streams.values():
            with stream.done:
                found.update(stream.unacked)
        return found

    def _reroute(self, error: KvstoreError, sending: frozenset[int] = frozenset()) -> None:
        """After a stale route: refresh the map and send every unacknowledged batch (and
        ``sending``, those being sent) again over new calls; raise ``error`` (or the
        retry's) when no batch was acknowledged since the last reroute."""
        resend = self._unacknowledged() | sending
        broken = [a for a, s in self._streams.items() if s.error is not None]
        if not resend:
            # Nothing to send again: drop the ended calls; the next send opens new ones.
            for address in broken:
                self._rows_acked_before += self._streams[address].rows_acked
                self._streams.pop(address).close()
            return
        oldest = min(resend)
        ops = self._client._ops
        before = ops.route.epoch
        for stream in self._streams.values():
            self._rows_acked_before += stream.rows_acked
            stream.cancel()
        self._streams.clear()
        self._client._run(ops.refresh_map_flow(getattr(error, "epoch", 0)), None)
        if not self._again(oldest, before, ops.route.epoch):
            raise error
        try:
            for batch in sorted(resend):
                self._send_parts(batch)
        except STALE_ROUTE as exc:
            self._reroute(
                exc, frozenset(resend)
            )  # raises, unless some batch was acknowledged meanwhile

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every batch sent is acknowledged (durable), ``timeout`` s at most;
        raise the stream's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                for stream in list(self._streams.values()):
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    stream.flush(left)
                break
            except STALE_ROUTE as exc:
                self._reroute(exc)
        self._forget_acknowledged()

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


class _AsyncNodeStream(_NodeAcks):
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

    async def send(self, batch: int, request: Any) -> None:
        await self.window.acquire()
        if self.error is not None:
            raise self.error
        self.sent += 1
        self.unacked.append(batch)
        try:
            await self.call.write(request)
        except grpc.RpcError as exc:  # the call had ended: its status says why
            self.error = self.error or from_rpc_error(exc, self.address, None)
            raise self.error from None

    def finished(self) -> bool:
        return self.acked >= self.sent or self.error is not None

    async def close(self) -> None:
        if not self.reader.done():
            await self.call.done_writing()
        await self.reader

    async def cancel(self) -> None:
        self.call.cancel()
        # grpc.aio ends the reader's iteration with CancelledError: the reader task ends
        # cancelled, which is no error of this stream's caller (asyncio.wait raises none).
        await asyncio.wait([self.reader])


class AsyncUpdateStream(_Rerouting):
    """``async with await client.update_stream("t") as s: await s.send({...})``; follows
    the map as ``UpdateStream`` does (see the module docstring)."""

    _client: AsyncClient

    def __init__(self, client: AsyncClient, table: str, schema: TableSchema, max_in_flight: int):
        super().__init__(client, table, schema, max_in_flight)
        self._streams: dict[str, _AsyncNodeStream] = {}
        self._progress = asyncio.Condition()

    async def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number in this stream."""
        batch = self._new_batch(data, key_column, event_time)
        try:
            await self._send_parts(batch)
        except STALE_ROUTE as exc:
            await self._reroute(exc, frozenset({batch}))
        self._forget_acknowledged()
        return batch

    async def _send_parts(self, batch: int) -> None:
        rows = self._batches[batch]
        for call in self._client._ops.plan_write(self._table, self._schema, rows):
            stream = self._streams.get(call.address)
            if stream is None:
                stream = _AsyncNodeStream(
                    self._client._stub(call.address),
                    call.address,
                    self._max_in_flight,
                    self._progress,
                )
                self._streams[call.address] = stream
            await stream.send(batch, call.request)

    def _unacknowledged(self) -> set[int]:
        return {b for stream in self._streams.values() for b in stream.unacked}

    async def _reroute(self, error: KvstoreError, sending: frozenset[int] = frozenset()) -> None:
        """``UpdateStream._reroute`` on the event loop."""
        resend = self._unacknowledged() | sending
        if not resend:
            for address in [a for a, s in self._streams.items() if s.error is not None]:
                stream = self._streams.pop(address)
                self._rows_acked_before += stream.rows_acked
                await stream.cancel()
            return
        oldest = min(resend)
        ops = self._client._ops
        before = ops.route.epoch
        for stream in self._streams.values():
            self._rows_acked_before += stream.rows_acked
            await stream.cancel()
        self._streams.clear()
        await self._client._run(ops.refresh_map_flow(getattr(error, "epoch", 0)), None)
        if not self._again(oldest, before, ops.route.epoch):
            raise error
        try:
            for batch in sorted(resend):
                await self._send_parts(batch)
        except STALE_ROUTE as exc:
            await self._reroute(exc, frozenset(resend))

    async def flush(self) -> None:
        """Wait until every batch sent is acknowledged; raise the stream's error."""
        while True:
            async with self._progress:
                await self._progress.wait_for(
                    lambda: all(s.finished() for s in self._streams.values())
                )
            error = next((s.error for s in self._streams.values() if s.error), None)
            if error is None:
                break
            if not isinstance(error, STALE_ROUTE):
                raise error
            await self._reroute(error)
        self._forget_acknowledged()

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
