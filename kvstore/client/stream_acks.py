"""What an update stream keeps, sans I/O (kvstore.client.stream does the calls): per
node call, the parts sent and acknowledged; per batch not acknowledged yet, the shards
each replica applied or has in flight; when a batch reaches its write quorum
(``Route.needed``, counted by ``ReplicaFlows._lacking``, the rule unary writes
follow), which nodes a failure shelves, and what is sent again after a map refresh.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import grpc
import numpy as np

from kvstore.client.core import NodeCall
from kvstore.columns import EncodedRows, encode_rows
from kvstore.errors import (
    DeadlineExceeded,
    KvstoreError,
    StaleMap,
    Unavailable,
    from_rpc_error,
)
from kvstore.schema import TableSchema

__all__ = ["REROUTED", "NodeAcks", "Rerouting"]

#: The errors of a node's call that drop the call, not the stream: the map may name
#: another replica, or mark the node down.
REROUTED = (StaleMap, Unavailable, DeadlineExceeded)
#: While a batch waits for a failed node to be marked down (or to return), the map is
#: refreshed at most this often (s).
REFRESH_EVERY_S = 0.5


class NodeAcks:
    """What a node's update call keeps, sync or async: parts sent and acknowledged, the
    (batch number, shards) of every part sent and not acknowledged yet, oldest first
    (the node acknowledges in order) with the map epoch each was planned at, and the
    parts acknowledged since the stream last took them (``applied``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = 0
        self.acked = 0
        self.unacked: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self.epochs: collections.deque[int] = collections.deque()
        self.applied: list[tuple[int, np.ndarray]] = []
        self.error: KvstoreError | None = None

    def _take(self, ack: Any) -> None:
        """The node acknowledged every part up to ``ack.seq``."""
        for _ in range(ack.seq - self.acked):
            self.applied.append(self.unacked.popleft())
            self.epochs.popleft()
        self.acked = ack.seq

    def _queued(self, batch: int, shards: np.ndarray, epoch: int) -> None:
        """A part of ``batch`` (``shards``, planned at map ``epoch``) was sent."""
        self.sent += 1
        self.unacked.append((batch, shards))
        self.epochs.append(epoch)

    def failed_at(self, default: int) -> int:
        """The map epoch of the part the call failed on: the oldest unacknowledged (the
        node acknowledges in order and stops at its first error); else ``default``."""
        return self.epochs[0] if self.epochs else default

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


class _Batch:
    """A batch not acknowledged yet: its rows (event times stamped), the shards it
    touches, per node the shards that applied it and the shards of its parts in flight."""

    __slots__ = ("acked", "pending", "present", "rows", "shard_ids")

    def __init__(self, rows: EncodedRows, shard_ids: np.ndarray, present: np.ndarray) -> None:
        self.rows = rows
        self.shard_ids = shard_ids
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
            done = out.get(address, np.empty(0, np.int64))
            out[address] = np.unique(np.concatenate([done, *parts]))
        return out


def _in_flight(batch: _Batch, route: Any) -> bool:
    """True while a part of ``batch`` awaits the ack of a node the map has not dropped."""
    return not route.live().isdisjoint(batch.pending)


class Rerouting:
    """What UpdateStream and AsyncUpdateStream share, sans I/O: the batches not
    acknowledged, the quorum check, the failed nodes and what to send again."""

    _streams: dict[str, Any]
    #: Whether the calls take each request in its wire form (``SerializedWrite``).
    _serialized = False

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
        #: The newest epoch a node refused a part at: no batch counts as acknowledged
        #: under an older map (the new one may count a replica the old one did not).
        self._newer = 0
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
        shards = self._schema.shards
        shard_ids = rows.keys.shard_ids(shards)
        present = np.flatnonzero(np.bincount(shard_ids, minlength=shards))
        self._batches[self.batches_sent] = _Batch(rows, shard_ids, present)
        return self.batches_sent

    def _shelved(self, address: str) -> bool:
        """True for a node dropped after a failure, until the map's epoch rises."""
        at = self._dropped_at.get(address)
        return at is not None and self._client._ops.route.epoch <= at

    def _gone(self, address: str) -> bool:
        """True for a node the map no longer lists, or marks down."""
        return self._client._ops.route.gone(address)

    def _plan(self, number: int) -> list[tuple[int, NodeCall]]:
        """The parts of batch ``number`` still to send: the shards short of their quorum
        (all, for a new batch) to the writable replicas that have neither applied them
        nor have them in flight, but shelved nodes. None for a batch acknowledged
        already: ``send``'s own ``_progress`` may have sent it again with the others (a
        node failed) and taken its acks."""
        batch = self._batches.get(number)
        if batch is None:
            return []
        ops = self._client._ops
        if batch.acked or batch.pending:
            only = ops._lacking(self._table, self._schema, batch.present, batch.acked)
            if not len(only):
                return []
            calls = ops.plan_write(
                self._table,
                self._schema,
                batch.rows,
                only=only,
                acked=batch.covered(),
                shard_ids=batch.shard_ids,
                serialized=self._serialized,
            )
        else:
            calls = ops.plan_write(
                self._table,
                self._schema,
                batch.rows,
                shard_ids=batch.shard_ids,
                serialized=self._serialized,
            )
        return [(number, c) for c in calls if not self._shelved(c.address)]

    def _take_applied(self, address: str, applied: list[tuple[int, np.ndarray]]) -> None:
        for number, shards in applied:
            batch = self._batches.get(number)
            if batch is not None:
                batch.applied(address, shards)

    def _drop(self, address: str, error: KvstoreError) -> None:
        """Forget node ``address``'s call (its parts in flight are lost) after ``error``."""
        self._failures[address] = error
        if isinstance(error, StaleMap):
            self._newer = max(self._newer, error.epoch)
        for batch in self._batches.values():
            batch.pending.pop(address, None)

    def _shelve(self, failed_at: dict[str, int]) -> None:
        """Do not ask the nodes of ``failed_at`` again before a refresh brings a map
        newer than the one their failed part was planned with (its epoch)."""
        self._dropped_at.update(failed_at)

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
        route = ops.route
        if self._newer > route.epoch:
            return
        for number in list(self._batches):
            batch = self._batches[number]
            if _in_flight(batch, route):
                continue
            if not self._applied_by_sole_writer(batch, route) and len(
                ops._lacking(self._table, self._schema, batch.present, batch.acked)
            ):
                continue
            self._rows_acked += len(batch.rows.keys)
            del self._batches[number]

    def _applied_by_sole_writer(self, batch: _Batch, route: Any) -> bool:
        """True when the one node holding every replica of the table's shards (live)
        applied every shard of ``batch``: each shard's quorum is then that node's ack
        (what ``_lacking`` would find, without its arrays)."""
        if len(batch.acked) != 1:
            return False
        ((address, shards),) = batch.acked.items()
        # The acked shards are distinct shards of the batch: all of them, if as many.
        return address == route.sole_writer(self._table) and len(shards) == len(batch.present)

    def _stuck(self) -> KvstoreError | None:
        """The error for the oldest batch that can reach its quorum no more: shards
        lacking it, nothing in flight on a live node, nothing left to send it to, and no
        failed node the map may still mark down."""
        if self._waiting_on_failed():
            return None
        ops = self._client._ops
        route = ops.route
        for number, batch in self._batches.items():
            if _in_flight(batch, route) or self._plan(number):
                continue
            if len(ops._lacking(self._table, self._schema, batch.present, batch.acked)):
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

    def _refresh_due(self, quiet: bool) -> bool:
        """Whether to refresh the map now: a failed node may be marked down by now, or
        (``quiet``: a flush waited a tick for an ack in vain) a hung one may be."""
        waiting = quiet or self._waiting_on_failed()
        return waiting and time.monotonic() - self._refreshed >= REFRESH_EVERY_S
