"""Client: the blocking Python client. One RPC per node per batch, a deadline on every call."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from kvstore.client.core import (
    DEFAULT_TIMEOUT_S,
    STALE_ROUTE,
    STALE_SCHEMA,
    NodeCall,
    Settled,
    feature_store_stub,
    read_once,
)
from kvstore.client.fast import FastConnections
from kvstore.client.flows import Operations
from kvstore.client.health import HedgePolicy
from kvstore.client.hedging import HedgedRead
from kvstore.client.result import GetResult
from kvstore.client.stream import UpdateStream
from kvstore.client.sync_hedging import drive_fast, drive_grpc
from kvstore.errors import KvstoreError, TableNotFound, Unavailable, from_rpc_error
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel
from kvstore.wire.messages import TableInfo, VersionInfo

__all__ = ["Client"]


class Client:
    """A connection to a kvstore cluster through one of its nodes.

    ``Client("127.0.0.1:7070")``; the address defaults to ``$KVSTORE_ADDRESS``, then
    ``127.0.0.1:7070``. ``timeout`` is the deadline of every call in seconds (default
    5 s); each call can override it. ``transport="auto"`` sends ``get`` over a node's
    fast read path (plain TCP, docs/fast-path.md) when it has one, everything else
    over gRPC; ``"grpc"`` uses gRPC only. Connecting is lazy: an unreachable node is
    reported by the first call, as ``kvstore.Unavailable``, within its deadline.
    ``zone``: reads prefer replicas on nodes of this zone (``kvstore serve --zone``).
    On a table with replicas, a read part that fails goes at once to another replica,
    and one slower than its node's recent p95 is hedged (``hedging``: a HedgePolicy;
    ``HedgePolicy(enabled=False)`` turns hedges off); see ``counters()``.
    Thread-safe for concurrent calls.
    """

    #: Channels replaced after an Unavailable kept open (calls of other threads may
    #: still run on them) up to this many; beyond, the oldest is closed.
    MAX_RETIRED_CHANNELS = 16

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
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.FeatureStoreStub]] = {}
        self._retired: list[grpc.Channel] = []
        self._fast = FastConnections() if transport == "auto" else None

    @property
    def address(self) -> str:
        return self._ops.seed

    # -- tables ----------------------------------------------------------------------

    def create_table(
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
        """Create a table; ``features`` maps names to dtypes (``"float32[64]"`` …).

        ``ttl`` maps features to a time to live in seconds: an older value (by its
        event time) reads as null at once. ``replicas``: copies of each shard, on
        distinct nodes; a write is acknowledged once ``write_quorum`` of them applied
        it (default: a majority). Creating the same definition again is a no-op;
        another definition under an existing name raises ``AlreadyExists``.
        """
        flow = self._ops.create_table_flow(name, key, features, shards, ttl, replicas, write_quorum)
        return self._run(flow, timeout)

    def describe_table(self, name: str, *, timeout: float | None = None) -> TableInfo:
        """Schema, current version, estimated rows and bytes on disk of a table."""
        return self._run(self._ops.describe_flow(name), timeout)

    def list_tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        """Every table on the node, by name."""
        return self._run(self._ops.list_flow(), timeout)

    def drop_table(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a table and its data."""
        self._run(self._ops.drop_flow(name), timeout)

    def cluster_map(self, *, timeout: float | None = None) -> dict:
        """The nodes and which of them serves each shard of each table."""
        return self._run(self._ops.cluster_map_flow(), timeout)

    # -- data ------------------------------------------------------------------------

    def get(
        self,
        table: str,
        keys: Any,
        features: list[str] | None = None,
        *,
        version: int = 0,
        timeout: float | None = None,
    ) -> GetResult:
        """Look up a batch of keys; ``features=None`` means all.

        Results come in request order (a repeated key is answered at each of its
        positions); a missing key is ``found[i] == False``, never an error.
        ``version`` pins a kept bulk version (default: the current one); the
        result's ``version`` says which answered.
        """
        ops = self._ops
        timeout = ops.call_timeout(timeout)
        keys, features = read_once(keys), read_once(features)
        quick = ops.quick_get(table, keys, features, version, self._fast is not None)
        if quick is None:  # the schema or the route must be fetched first
            return self._run(ops.get_flow(table, keys, features, version), timeout)
        plan, batch, fast, calls = quick
        try:
            if fast is not None:
                assert self._fast is not None
                status, body = self._fast.get_answer(fast, plan.request(batch, version), timeout)
                return ops.finish_frame(table, plan, batch, fast, status, body)
            if calls and ops.replicated(table):
                read = HedgedRead(ops, table, plan.schema, plan, batch, version, calls=calls)
                try:
                    self._drive(read, timeout)
                except STALE_ROUTE as exc:
                    flow = ops.get_retry_flow(
                        exc, table, keys, features, version, read.failed_nodes()
                    )
                    return self._run(flow, timeout)
                return ops.finish_get(table, plan, batch, *read.answers())
            if calls:
                outcomes = self._send_settled(calls, timeout)
                error, failed = ops.quick_outcomes(calls, outcomes)
                if error is not None:
                    flow = ops.get_retry_flow(error, table, keys, features, version, failed)
                    return self._run(flow, timeout)
            else:
                outcomes = []
            return ops.finish_get(table, plan, batch, calls, outcomes)
        except (*STALE_SCHEMA, *STALE_ROUTE, TableNotFound) as exc:
            flow = ops.get_retry_flow(exc, table, keys, features, version)
        return self._run(flow, timeout)

    def write(
        self,
        table: str,
        data: Any,
        *,
        key_column: str = "key",
        event_time: int | np.ndarray | None = None,
        position: Any = None,
        timeout: float | None = None,
    ) -> int:
        """Upsert full or partial rows; returns how many. Durable when it returns.

        ``data``: a dict of columns (lists or NumPy arrays), a ``pyarrow.Table`` or
        ``RecordBatch``, a pandas DataFrame or a list of row dicts. The columns given
        are the features set; the others keep their values. ``event_time``: µs since
        the epoch, one value or one per row (default: now). Per key and feature the
        newest event time wins, so a duplicated or reordered update changes nothing
        (with equal times, the later write wins). ``position``: a stream consumer's
        ``(consumer, source, partition, offset)``, stored atomically with the rows.
        """
        return self._run(
            self._ops.write_flow(table, data, key_column, event_time, position), timeout
        )

    def delete(
        self,
        table: str,
        keys: Any,
        *,
        event_time: int | None = None,
        position: Any = None,
        timeout: float | None = None,
    ) -> int:
        """Delete keys (missing ones are fine); returns how many were named.

        A delete at ``event_time`` (µs, default now) hides every older value of the
        key, bulk-loaded or written; later writes show again.
        """
        return self._run(self._ops.delete_flow(table, keys, event_time, position), timeout)

    def update(self, table: str, data: Any, **options: Any) -> int:
        """Streaming-style partial update; the same as ``write`` (kept for readability)."""
        return self.write(table, data, **options)

    def update_stream(
        self, table: str, *, max_in_flight: int = 16, timeout: float | None = None
    ) -> UpdateStream:
        """A client-streaming update channel: ``send()`` batches, one ack per batch.

        At most ``max_in_flight`` batches wait for their acknowledgement; ``send``
        blocks beyond that (flow control). Use as a context manager; ``flush()``
        waits until every batch sent is durable.
        """
        schema = self._run(self._ops.schema_flow(table), timeout)
        return UpdateStream(self, table, schema, max_in_flight)

    def consumer_positions(
        self, table: str, consumer: str, source: str, *, timeout: float | None = None
    ) -> dict[int, int]:
        """Partition → offset of the last message a stream consumer applied everywhere."""
        return self._run(self._ops.positions_flow(table, consumer, source), timeout)

    def counters(self) -> dict[str, int]:
        """What this client did to route around failed or slow replicas: failovers,
        hedges sent and won, hedges the budget refused, write rounds sent again."""
        return self._ops.counters.as_dict()

    def stats(self, *, timeout: float | None = None) -> dict:
        """Per-table activity and freshness of the node (times in µs); see ``kvstore status``."""
        return self._run(self._ops.stats_flow(), timeout)

    def versions(self, table: str, *, timeout: float | None = None) -> list[VersionInfo]:
        """The kept bulk versions of a table, oldest first (``current`` marks the one read)."""
        return self._run(self._ops.versions_flow(table), timeout)

    def rollback(
        self, table: str, to_version: int = 0, *, timeout: float | None = None
    ) -> VersionInfo:
        """Make a kept version current again: ``to_version``, or the one before current."""
        return self._run(self._ops.rollback_flow(table, to_version), timeout)

    def load(self, table: str, source: str | list[str], **options: Any) -> Any:
        """Bulk-load Parquet / Arrow IPC files as a new version; see ``kvstore.ingest.bulk.load``.

        Returns its LoadSummary (rows, bytes, seconds, version).
        """
        # Imported here, not at the top: the loader brings pyarrow.parquet and rocksdict,
        # which a client that only reads should not pay for. (The loader does not import
        # the client: it reaches the nodes through kvstore.wire.)
        from kvstore.ingest.bulk import load

        options.setdefault("timeout", max(self._ops.timeout, 600.0))
        return load(self.address, table, source, **options)

    # -- plumbing --------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.Channel:
        """The channel to ``address`` (the one ``_stub`` calls on)."""
        self._stub(address)
        return self._channels[address][0]

    def _stub(self, address: str) -> pb_grpc.FeatureStoreStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = open_channel(address)
            stub = feature_store_stub(channel)
            entry = (channel, stub)
            self._channels[address] = entry
        return entry[1]

    def _rpc_error(self, exc: grpc.RpcError, address: str, timeout: float) -> KvstoreError:
        error = from_rpc_error(exc, address, timeout)
        if isinstance(error, Unavailable):
            # A channel that failed to connect waits out gRPC's reconnect backoff (1 s,
            # growing to 2 min) and fails every call meanwhile, even once the node is
            # back on the same port: the next call gets a new one (as AsyncClient does).
            entry = self._channels.pop(address, None)
            if entry is not None:
                self._retired.append(entry[0])
                if len(self._retired) > self.MAX_RETIRED_CHANNELS:
                    self._retired.pop(0).close()
        return error

    def _send_settled(self, calls: list[NodeCall], timeout: float) -> list[Any]:
        """The outcome of each call, sent in parallel: its response, or its KvstoreError.
        Every call has ended when this returns (none is left running)."""
        ops = self._ops
        outstanding = ops.outstanding
        for c in calls:
            outstanding[c.address] = outstanding.get(c.address, 0) + 1
        try:
            return self._send_all(calls, timeout)
        finally:
            for c in calls:
                outstanding[c.address] -= 1

    def _send_all(self, calls: list[NodeCall], timeout: float) -> list[Any]:
        if self._fast is not None and calls[0].method == "Get":
            fast = self._ops.fast
            try:
                pairs = [(fast[c.address], c.request) for c in calls]
            except KeyError:
                pass  # a node without a fast path: gRPC
            else:
                return self._fast.get_many(pairs, timeout, settled=True)
        if len(calls) == 1:
            call = calls[0]
            try:
                return [
                    getattr(self._stub(call.address), call.method)(call.request, timeout=timeout)
                ]
            except grpc.RpcError as exc:
                return [self._rpc_error(exc, call.address, timeout)]
        futures = [
            getattr(self._stub(c.address), c.method).future(c.request, timeout=timeout)
            for c in calls
        ]
        outcomes: list[Any] = []
        for call, future in zip(calls, futures, strict=True):
            try:
                outcomes.append(future.result())
            except grpc.RpcError as exc:
                outcomes.append(self._rpc_error(exc, call.address, timeout))
        return outcomes

    def _drive(self, read: HedgedRead, timeout: float) -> None:
        """Run ``read`` to its end within ``timeout`` s: over the fast read path when
        every node has one, else gRPC."""
        fast = self._ops.fast
        if self._fast is not None and all(n in fast for n in self._ops.nodes if n):
            drive_fast(read, self._fast, fast, timeout)
        else:
            drive_grpc(read, self._stub, self._rpc_error, timeout)

    def _send(self, calls: list[NodeCall], timeout: float) -> list[Any]:
        """The responses to ``calls``, sent in parallel; the first error once all ended."""
        outcomes = self._send_settled(calls, timeout)
        for outcome in outcomes:
            if isinstance(outcome, KvstoreError):
                raise outcome
        return outcomes

    def _run(self, flow: Any, timeout: float | None) -> Any:
        timeout = self._ops.call_timeout(timeout)
        try:
            calls = next(flow)
            while True:
                if isinstance(calls, HedgedRead):
                    try:
                        self._drive(calls, timeout)
                    except KvstoreError as exc:
                        calls = flow.throw(exc)
                    else:
                        calls = flow.send(None)
                    continue
                if isinstance(calls, Settled):
                    wait = timeout * calls.patience
                    calls = flow.send(self._send_settled(calls, wait) if calls else [])
                    continue
                try:
                    responses = self._send(calls, timeout)
                except KvstoreError as exc:
                    calls = flow.throw(exc)
                else:
                    calls = flow.send(responses)
        except StopIteration as done:
            return done.value

    def close(self) -> None:
        """Close the channels to every node."""
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()
        for channel in self._retired:
            channel.close()
        self._retired.clear()
        if self._fast is not None:
            self._fast.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
