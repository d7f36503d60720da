"""What a clustered node knows of the placement: its epoch, and which shards it holds.

A node started with ``--etcd`` keeps one ClusterView, updated by its cluster agent
(kvstore.cluster.agent) at every placement epoch it sees. Every Get, Write, Delete and
update names a table and keys; before anything is read or applied, ``check`` looks
their shard ids up in a boolean mask per table (one NumPy gather, no Python loop per
key) and refuses the request with ``StaleMap`` carrying the node's epoch when a key
falls in a shard this node does not hold: reads need an Available or Leaving replica
here, writes a replica in any state (an Initializing one is being filled). A node
without etcd has no view, and no check runs.

During a move's hand-over (kvstore.server.transfer) the source *seals* the shard: a
write with a key in it waits (``sealed_wait`` gives it a future to await) until the
seal ends, then is checked again (StaleMap once the placement moved the shard away).
``writing`` tracks the writes being applied, so a seal can wait for them to finish.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection, Mapping

import numpy as np

from kvstore.cluster.membership import NodeInfo
from kvstore.cluster.placement import Placement, ShardState
from kvstore.errors import StaleMap
from kvstore.keys import KeyBatch

__all__ = ["ClusterView", "shard_owners"]

_READABLE = (ShardState.AVAILABLE, ShardState.LEAVING)


def shard_owners(placement: Placement, table: str) -> list[str]:
    """The node serving reads of each shard of ``table``: its first Available replica,
    else its first Leaving one ("" when it has neither)."""
    owners = []
    for replicas in placement.table(table).shards:
        chosen = ""
        for state in _READABLE:
            chosen = next((r.node for r in replicas if r.state == state), "")
            if chosen:
                break
        owners.append(chosen)
    return owners


class ClusterView:
    """The last placement this node applied, as masks of the shards it may serve."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.placement = Placement()
        #: table → bool per shard: this node holds an Available or Leaving replica.
        self.readable: dict[str, np.ndarray] = {}
        #: table → bool per shard: this node holds a replica in any state.
        self.writable: dict[str, np.ndarray] = {}
        #: node id → its registration, as last seen (kept for nodes whose lease lapsed).
        self.known: dict[str, NodeInfo] = {}
        #: node ids registered in etcd now.
        self.live: frozenset[str] = frozenset()
        #: table → bool per shard: writes wait (a move's hand-over).
        self.sealed: dict[str, np.ndarray] = {}
        #: Resolved when a seal ends; made when a write first waits on one.
        self._seal_ended: asyncio.Future | None = None
        #: table → tokens of the writes that passed the check and are being applied.
        self.writing: dict[str, set[int]] = {}
        self._tokens = itertools.count()
        #: table → the epoch at which its replicas (nodes, states) last changed, as this
        #: node saw them: a write planned on an older map is refused (``check``).
        self.changed: dict[str, int] = {}

    @property
    def epoch(self) -> int:
        return self.placement.epoch

    def apply(self, placement: Placement, withheld: Collection[str] = ()) -> None:
        """Make ``placement`` the one requests are checked against; the tables in
        ``withheld`` (local ones that disagree with it) are refused whole."""
        readable, writable, changed = {}, {}, {}
        before = self.placement.tables
        for name, table in placement.tables.items():
            if name in withheld:
                continue
            same = name in before and before[name].shards == table.shards
            changed[name] = self.changed.get(name, placement.epoch) if same else placement.epoch
            read = np.zeros(len(table.shards), dtype=bool)
            write = np.zeros(len(table.shards), dtype=bool)
            for shard, replicas in enumerate(table.shards):
                for replica in replicas:
                    if replica.node == self.node_id:
                        write[shard] = True
                        read[shard] |= replica.state in _READABLE
            readable[name], writable[name] = read, write
        # Assigned one by one, each a whole new dict: a request sees the old masks or
        # the new ones (the node's calls all run on the event loop thread anyway).
        self.readable, self.writable, self.changed = readable, writable, changed
        self.placement = placement

    def seal(self, table: str, shard: int) -> None:
        """Make writes to ``shard`` of ``table`` wait until ``unseal``."""
        mask = self.sealed.get(table)
        if mask is None:
            mask = self.sealed[table] = np.zeros(len(self.placement.table(table).shards), bool)
        mask[shard] = True

    def unseal(self, table: str, shard: int) -> None:
        """End a seal: the writes waiting on it are checked again."""
        mask = self.sealed.get(table)
        if mask is not None and shard < len(mask):
            mask[shard] = False
            if not mask.any():
                del self.sealed[table]
        ended, self._seal_ended = self._seal_ended, None
        if ended is not None and not ended.done():
            ended.set_result(None)

    def sealed_wait(self, table: str, keys: KeyBatch) -> asyncio.Future | None:
        """A future to await (then check again) if a key of ``keys`` is in a sealed
        shard; None otherwise. A write of no key (a consumer position alone) does not wait."""
        mask = self.sealed.get(table)
        if mask is None or not keys.count or not mask[keys.shard_ids(len(mask))].any():
            return None
        if self._seal_ended is None:
            self._seal_ended = asyncio.get_running_loop().create_future()
        return self._seal_ended

    def begin_write(self, table: str) -> int:
        """Record a write being applied to ``table``; the token ``end_write`` takes."""
        token = next(self._tokens)
        self.writing.setdefault(table, set()).add(token)
        return token

    def end_write(self, table: str, token: int) -> None:
        self.writing.get(table, set()).discard(token)

    def see_nodes(self, registrations: Mapping[str, NodeInfo]) -> None:
        """Record the live nodes' registrations (the ones that went stay known)."""
        self.known.update(registrations)
        self.live = frozenset(registrations)

    def check(self, table: str, keys: KeyBatch, writing: bool, epoch: int = 0) -> None:
        """StaleMap unless this node holds the shard of every key in ``keys`` (a read:
        Available or Leaving; a write: any state); and for a write planned on a map of
        ``epoch`` (0: not said), unless the table's replicas are as they were then. A
        client that still takes a returned node for down would otherwise count this
        replica's ack as the quorum, and the other replica, caught up already, would
        never get the row."""
        mask = (self.writable if writing else self.readable).get(table)
        if mask is None:
            raise StaleMap(
                f"node {self.node_id} holds no shard of table {table!r} at placement "
                f"epoch {self.epoch}; refresh the cluster map",
                self.epoch,
            )
        if not keys.count:
            return
        if epoch and epoch < (since := self.changed.get(table, 0)):
            raise StaleMap(
                f"the replicas of table {table!r} changed at placement epoch {since}, "
                f"after the write's map (epoch {epoch}); refresh the cluster map",
                self.epoch,
            )
        if mask.all():
            return
        shard_ids = keys.shard_ids(len(mask))
        held = mask[shard_ids]
        if not held.all():
            shard = int(shard_ids[np.argmin(held)])
            raise StaleMap(
                f"node {self.node_id} does not hold shard {shard} of table {table!r} at "
                f"placement epoch {self.epoch} (key {keys.describe(int(np.argmin(held)))}); "
                "refresh the cluster map",
                self.epoch,
            )
