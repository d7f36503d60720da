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

from kvstore.client.core import MAX_ROUTE_RETRIES, NodeCall
from kvstore.columns import EncodedRows, encode_rows
from kvstore.errors import (
    DeadlineExceeded,
    KvstoreError,
    StaleMap,
    Unavailable,
    from_rpc_error,
)
from kvstore.schema import TableSchema

if TYPE_CHECKING:
    from kvstore.client.aio import AsyncClient
    from kvstore.client.sync import Client

__all__ = ["AsyncUpdateStream", "UpdateStream"]

_END = object()

#: The errors of a node's call that drop the call, not the stream: the map may name
#: another replica, or mark the node down.
REROUTED = (StaleMap, Unavailable, DeadlineExceeded)
#: While a batch waits for a failed node to be marked down (or to return), the map is
#: refreshed at most this often (s).
REFRESH_EVERY_S = 0.5
#: How long ``flush`` waits for an ack before it looks at the map again (s).
TICK_S = 0.25


class _NodeAcks:
    """What a node's update call keeps, sync or async: parts sent and acknowledged, the
    (batch number, shards) of every part sent and not acknowledged yet, oldest first
    (the node acknowledges in order), and the parts acknowledged since the stream last
    took them (``applied``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = 0
        self.acked = 0
        self.unacked: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self.applied: list[tuple[int, np.ndarray]] = []
        self.error: KvstoreError | None = None

    def _take(self, ack: Any) -> None:
        """The node acknowledged every part up to ``ack.seq``."""
        for _ in range(ack.seq - self.acked):
            self.applied.append(self.unacked.popleft())
        self.acked = ack.seq

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

    def _hung(self, timeout: float) -> None:
        self.error = DeadlineExceeded(
            f"node {self.address}: {self.sent - self.acked} update batches unacknowledged "
            f"for {timeout} s"
        )


class _NodeStream(_NodeAcks):
    """One UpdateStream call to one node, fed from a queue, acks read by a thread;
    ``events`` is the stream's condition, notified at every ack and at the call's end."""

    def __init__(
        self, stub: Any, address: str, max_in_flight: int, events: threading.Condition
    ) -> None:
        super().__init__(address)
        self.window = threading.Semaphore(max_in_flight)
        self.requests: queue.Queue = queue.Queue()
        self.done = events
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
            self.sent += 1
            self.unacked.append((batch, shards))
        self.requests.put(request)
        return True

    def close(self) -> None:
        self.requests.put(_END)
        self.reader.join(timeout=30)

    def cancel(self) -> None:
        """End the call now, whatever is in flight (the caller sends it again elsewhere)."""
        self.call.cancel()
        self.close()


class _Batch:
    """A batch not acknowledged yet: its rows (event times stamped), the shards it
    touches, per node the shards that applied it and the shards of its parts in flight."""

    __slots__ = ("acked", "pending", "present", "rows")

    def __init__(self, rows: EncodedRows, present: np.ndarray) -> None:
        self.rows = rows
        self.present = present
        self.acked: dict[str, np.ndarray] = {}
        self.pending: dict[str, collections.deque[np.ndarray]] = {}

    def sent(self, address: str, shards: np.ndarray) -> None:
        self.pending.setdefault(address, collections.deque()).append(shards)

    def applied(self, address: str, shards: np.ndarray) -> None:
        parts = self.pending.get(address)
        if parts:
            parts.popleft()
            if not parts:
                del self.pending[address]
        done = self.acked.get(address)
        self.acked[address] = shards if done is None else np.union1d(done, shards)

    def covered(self) -> dict[str, np.ndarray]:
        """Per node, the shards it applied or has in flight (not sent to it again)."""
        out = dict(self.acked)
        for address, parts in self.pending.items():
            out[address] = np.unique(np.concatenate([out.get(address, []), *parts]))
        return out


class _Rerouting:
    """What UpdateStream and AsyncUpdateStream share, sans I/O: the batches not
    acknowledged, the quorum check, the failed nodes and what to send again."""

    _streams: dict[str, Any]

    def __init__(self, client: Any, table: str, schema: TableSchema, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._client = client
        self._table = table
        self._schema = schema
        self._max_in_flight = max_in_flight
        #: Every batch not acknowledged yet, by batch number (oldest first).
        self._batches: dict[int, _Batch] = {}
        #: Nodes whose call failed, with the error (named when a batch gets no quorum),
        #: and the map epoch at which each was dropped: not asked again before it rises.
        self._failures: dict[str, KvstoreError] = {}
        self._dropped_at: dict[str, int] = {}
        self._refreshed = 0.0
        self._rows_acked = 0
        self.batches_sent = 0

    @property
    def rows_acked(self) -> int:
        """Rows of the batches acknowledged (by their quorum) so far."""
        return self._rows_acked

    def _new_batch(self, data: Any, key_column: str, event_time: Any) -> int:
        """Encode a batch (its event times stamped now, once) and number it."""
        rows = encode_rows(self._schema, data, key_column, event_time)
        self.batches_sent += 1
        present = np.unique(rows.keys.shard_ids(self._schema.shards))
        self._batches[self.batches_sent] = _Batch(rows, present)
        return self.batches_sent

    def _shelved(self, address: str) -> bool:
        """True for a node dropped after a failure, until the map's epoch rises."""
        at = self._dropped_at.get(address)
        return at is not None and self._client._ops.route.epoch <= at

    def _gone(self, address: str) -> bool:
        """True for a node the map no longer lists, or marks down."""
        route = self._client._ops.route
        if address not in route.nodes:
            return True
        i = route.nodes.index(address)
        return i < len(route.down) and bool(route.down[i])

    def _plan(self, number: int) -> list[tuple[int, NodeCall]]:
        """The parts of batch ``number`` still to send: the shards short of their quorum
        (all, for a new batch) to the writable replicas that have neither applied them
        nor have them in flight, but shelved nodes."""
        batch = self._batches[number]
        ops = self._client._ops
        if batch.acked or batch.pending:
            only = ops._lacking(self._table, self._schema, batch.present, batch.acked)
            if not len(only):
                return []
            calls = ops.plan_write(
                self._table, self._schema, batch.rows, only=only, acked=batch.covered()
            )
        else:
            calls = ops.plan_write(self._table, self._schema, batch.rows)
        return [(number, c) for c in calls if not self._shelved(c.address)]

    def _take_applied(self, address: str, applied: list[tuple[int, np.ndarray]]) -> None:
        for number, shards in applied:
            batch = self._batches.get(number)
            if batch is not None:
                batch.applied(address, shards)

    def _drop(self, address: str, error: KvstoreError) -> None:
        """Forget node ``address``'s call (its parts in flight are lost) after ``error``."""
        self._failures[address] = error
        for batch in self._batches.values():
            batch.pending.pop(address, None)

    def _shelve(self, addresses: list[str], epoch: int) -> None:
        """Do not ask ``addresses``, whose calls failed under the map of ``epoch``, again
        before a refresh brings a newer map."""
        for address in addresses:
            self._dropped_at[address] = epoch

    def _rerouted(self, errors: list[Any]) -> list[KvstoreError]:
        """``errors`` of failed calls, if each is one a map refresh may cure; else raise
        the first other (a refused batch: ``update N of the stream``), which ends the
        stream (the batches acknowledged before it stand)."""
        for error in errors:
            if not isinstance(error, REROUTED):
                raise error
        return errors

    def _refresh_epoch(self, errors: list[KvstoreError]) -> int:
        """The epoch the map must reach: the newest a StaleMap named (0: any)."""
        return max((e.epoch for e in errors if isinstance(e, StaleMap)), default=0)

    def _waiting_on_failed(self) -> bool:
        """True when a node that failed but for an unreachable moment (not StaleMap) is
        still listed live: the map may yet mark it down, or it may return."""
        return any(
            not isinstance(e, StaleMap) and not self._gone(a) and self._shelved(a)
            for a, e in self._failures.items()
        )

    def _settle(self) -> None:
        """Count the batches whose every shard has its quorum by the current map and
        whose parts are all answered (or on nodes the map marks down) as acknowledged."""
        ops = self._client._ops
        for number in list(self._batches):
            batch = self._batches[number]
            if any(not self._gone(a) for a in batch.pending):
                continue
            if len(ops._lacking(self._table, self._schema, batch.present, batch.acked)):
                continue
            self._rows_acked += len(batch.rows.keys)
            del self._batches[number]

    def _stuck(self) -> KvstoreError | None:
        """The error for the oldest batch that can reach its quorum no more: shards
        lacking it, nothing in flight on a live node, nothing left to send it to, and no
        failed node the map may still mark down."""
        if self._waiting_on_failed():
            return None
        for number, batch in self._batches.items():
            if any(not self._gone(a) for a in batch.pending) or self._plan(number):
                continue
            return self._no_quorum(batch)
        return None

    def _no_quorum(self, batch: _Batch) -> KvstoreError:
        ops = self._client._ops
        lacking = ops._lacking(self._table, self._schema, batch.present, batch.acked)
        return ops._no_quorum(self._table, lacking, batch.acked, self._failures)

    def _overdue(self, timeout: float | None) -> KvstoreError:
        oldest = next(iter(self._batches.values()))
        if self._failures:
            return self._no_quorum(oldest)
        return KvstoreError(
            f"table {self._table!r}: {len(self._batches)} update batches were not "
            f"acknowledged within {timeout} s"
        )

    def _refresh_due(self) -> bool:
        return self._waiting_on_failed() and (time.monotonic() - self._refreshed >= REFRESH_EVERY_S)


class UpdateStream(_Rerouting):
    """``with client.update_stream("t") as s: s.send({"key": [...], "ctr": [...]})``."""

    _client: Client

    def __init__(self, client: Client, table: str, schema: TableSchema, max_in_flight: int):
        super().__init__(client, table, schema, max_in_flight)
        self._streams: dict[str, _NodeStream] = {}
        self._events = threading.Condition()

    def send(
        self, data: Any, *, key_column: str = "key", event_time: int | np.ndarray | None = None
    ) -> int:
        """Queue one batch of (partial) rows; returns its number (1, 2, …) in this stream.

        ``event_time`` in µs since the epoch (default: now, stamped here once)."""
        number = self._new_batch(data, key_column, event_time)
        self._progress()
        self._send(self._plan(number))
        self._progress()
        return number

    def _send(self, parts: list[tuple[int, NodeCall]]) -> None:
        timeout = self._client._ops.timeout
        for number, call in parts:
            stream = self._streams.get(call.address)
            if stream is None:
                stream = _NodeStream(
                    self._client._stub(call.address),
                    call.address,
                    self._max_in_flight,
                    self._events,
                )
                self._streams[call.address] = stream
            if stream.send(number, call.shards, call.request, timeout):
                self._batches[number].sent(call.address, call.shards)

    def _harvest(self) -> list[str]:
        """Take the acks the calls received; the nodes whose call failed."""
        failed = []
        for address, stream in self._streams.items():
            with self._events:
                applied, stream.applied = stream.applied, []
                error = stream.error
            self._take_applied(address, applied)
            if error is not None:
                failed.append(address)
        return failed

    def _progress(self) -> None:
        """Take acks; drop failed calls, refresh the map, send what lacks its quorum
        again; count the batches acknowledged; raise when one cannot reach its quorum."""
        for _ in range(MAX_ROUTE_RETRIES):
            failed = self._harvest()
            if not failed and not self._refresh_due():
                break
            errors = self._rerouted([self._streams[a].error for a in failed])
            for address in failed:
                self._drop(address, self._streams[address].error)
                self._streams.pop(address).cancel()
            self._refreshed = time.monotonic()
            ops = self._client._ops
            before = ops.route.epoch
            self._client._run(ops.refresh_map_flow(self._refresh_epoch(errors)), None)
            self._shelve(failed, before)
            for stream in [s for a, s in self._streams.items() if self._gone(a)]:
                self._streams.pop(stream.address).cancel()  # a hung node marked down
            for number in list(self._batches):
                self._send(self._plan(number))
        self._settle()
        error = self._stuck()
        if error is not None:
            raise error

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every batch sent is acknowledged by its quorum, ``timeout`` s at
        most; raise the error of a batch that cannot reach it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._progress()
            if not self._batches:
                return
            left = TICK_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise self._overdue(timeout)
            with self._events:
                self._events.wait_for(self._news, min(left, TICK_S))

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

    async def send(self, batch: int, shards: np.ndarray, request: Any, timeout: float) -> bool:
        """``_NodeStream.send`` on the event loop."""
        try:
            await asyncio.wait_for(self.window.acquire(), timeout)
        except TimeoutError:
            self._hung(timeout)
            return False
        if self.error is not None:
            return False
        self.sent += 1
        self.unacked.append((batch, shards))
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


class AsyncUpdateStream(_Rerouting):
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
        number = self._new_batch(data, key_column, event_time)
        await self._progress()
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
            if await stream.send(number, call.shards, call.request, timeout):
                self._batches[number].sent(call.address, call.shards)

    def _harvest(self) -> list[str]:
        failed = []
        for address, stream in self._streams.items():
            applied, stream.applied = stream.applied, []
            self._take_applied(address, applied)
            if stream.error is not None:
                failed.append(address)
        return failed

    async def _progress(self) -> None:
        """``UpdateStream._progress`` on the event loop."""
        for _ in range(MAX_ROUTE_RETRIES):
            failed = self._harvest()
            if not failed and not self._refresh_due():
                break
            errors = self._rerouted([self._streams[a].error for a in failed])
            for address in failed:
                self._drop(address, self._streams[address].error)
                await self._streams.pop(address).cancel()
            self._refreshed = time.monotonic()
            ops = self._client._ops
            before = ops.route.epoch
            await self._client._run(ops.refresh_map_flow(self._refresh_epoch(errors)), None)
            self._shelve(failed, before)
            for stream in [s for a, s in self._streams.items() if self._gone(a)]:
                await self._streams.pop(stream.address).cancel()
            for number in list(self._batches):
                await self._send(self._plan(number))
        self._settle()
        error = self._stuck()
        if error is not None:
            raise error

    async def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every batch sent is acknowledged by its quorum, ``timeout`` s at
        most; raise the error of a batch that cannot reach it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            await self._progress()
            if not self._batches:
                return
            left = TICK_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise self._overdue(timeout)
            try:
                async with self._progress_cv:
                    await asyncio.wait_for(
                        self._progress_cv.wait_for(self._news), min(left, TICK_S)
                    )
            except TimeoutError:
                pass

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
