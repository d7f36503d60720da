"""The cluster map as the client routes by it: each shard's readable and writable
replicas, the acks a write needs, and which replica a read picks.

A ``Route`` is built from one ClusterMap message and never changed (a new map
replaces it whole), so a call that reads ``ClientCore.route`` once routes by one map.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvstore.client.health import NodeHealth
from kvstore.errors import Unavailable
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.dial import dial_address

__all__ = [
    "READABLE_STATES",
    "WRITABLE_STATES",
    "NoReplica",
    "Route",
    "read_choice",
    "route_from_map",
]

#: Replica states (ShardReplicas.state) that serve reads, in order of preference.
READABLE_STATES = ("Available", "Leaving")
#: Replica states that take writes.
WRITABLE_STATES = ("Available", "Leaving", "Initializing")


class NoReplica(Unavailable):
    """No replica of a shard is left to ask (every readable one failed or is avoided)."""


@dataclass(frozen=True, slots=True)
class Route:
    """One cluster map as the client routes by it; replaced whole, never changed, so a
    thread that reads ``ClientCore.route`` once sees one map's nodes and owners."""

    #: The placement epoch of the map (0: none yet).
    epoch: int = 0
    nodes: tuple[str, ...] = ()
    #: gRPC address → fast read path address, for nodes that serve one.
    fast: Mapping[str, str] = field(default_factory=dict)
    #: table → the node index of each shard's owner.
    owners: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: table → the one node that owns every shard, for tables served by one node.
    sole: Mapping[str, str] = field(default_factory=dict)
    #: table → (shards, width) node indexes of each shard's readable replicas
    #: (Available, then Leaving), -1 where a shard has fewer.
    readable: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: table → True where ``readable`` holds a Leaving replica (a move's source).
    leaving: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: table → the same for the replicas that take writes (Initializing too).
    writable: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: table → acks a write needs per shard (write_quorum; 0: a majority).
    quorum: Mapping[str, int] = field(default_factory=dict)
    #: Per node: its zone, and whether the map marks it down (its lease lapsed).
    zones: tuple[str, ...] = ()
    down: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    #: What ``needed``, ``acks``, ``gone`` and ``sole_writer`` derive from the map, kept
    #: on first use: an update stream asks them for every batch, and a map never changes.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def without(self, table: str) -> Route:
        """This route with no entry for ``table``."""

        def drop(m: Mapping) -> dict:
            return {t: v for t, v in m.items() if t != table}

        return replace(
            self,
            owners=drop(self.owners),
            sole=drop(self.sole),
            readable=drop(self.readable),
            leaving=drop(self.leaving),
            writable=drop(self.writable),
            quorum=drop(self.quorum),
        )

    def needed(self, table: str) -> np.ndarray:
        """Per shard, the acks of readable replicas (Available, Leaving) a write needs:
        the table's write_quorum, default a majority of them (an Initializing replica
        takes the write but does not count: it serves no reads yet), at most those on
        nodes not marked down, at least 1. Read-only (kept for the map's life)."""
        key = ("needed", table)
        out = self._memo.get(key)
        if out is None:
            readable = self.readable[table]
            count = (readable >= 0).sum(axis=1)
            padded = np.append(self.down, False)
            live = ((readable >= 0) & ~padded[readable]).sum(axis=1)
            quorum = self.quorum.get(table, 0)
            want = np.full(len(readable), quorum) if quorum else count // 2 + 1
            out = np.maximum(np.minimum(want, live), 1)
            out.setflags(write=False)
            self._memo[key] = out
        return out

    def _members(self, table: str) -> tuple[dict[str, int], np.ndarray]:
        """(node index by address, (nodes, shards) int64 1 where the node holds a
        readable replica of the shard, the same counting writable replicas for the
        shards with no readable one): what ``acks`` adds up."""
        key = ("members", table)
        out = self._memo.get(key)
        if out is None:
            readable = self.readable[table]
            writable = self.writable[table]
            nodes = np.arange(len(self.nodes)).reshape(-1, 1, 1)
            counts = (readable[None] == nodes).any(axis=2).astype(np.int64)
            none_readable = (readable < 0).all(axis=1)
            fallback = (writable[None] == nodes).any(axis=2)
            counts[:, none_readable] = fallback[:, none_readable]
            index = {a: i for i, a in enumerate(self.nodes)}
            out = self._memo[key] = (index, counts)
        return out

    def acks(self, table: str, acked: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per shard, how many of its readable replicas applied a write, from ``acked``
        (node address → the shards it applied, each once); for a shard with no readable
        replica, how many writable ones did."""
        index, counts = self._members(table)
        counted = np.zeros(counts.shape[1], np.int64)
        for address, shards in acked.items():
            node = index.get(address)
            if node is None or not len(shards):
                continue
            counted[shards] += counts[node, shards]
        return counted

    def live(self) -> frozenset[str]:
        """The addresses of the nodes the map lists and does not mark down."""
        listed = self._memo.get("live")
        if listed is None:
            down = self.down
            listed = self._memo["live"] = frozenset(
                a for i, a in enumerate(self.nodes) if not (i < len(down) and down[i])
            )
        return listed

    def gone(self, address: str) -> bool:
        """True for a node the map does not list, or marks down."""
        return address not in self.live()

    def sole_writer(self, table: str) -> str | None:
        """The node that holds every writable replica of every shard of ``table``, when
        one does and the map does not mark it down; else None (a write fans out)."""
        key = ("sole_writer", table)
        if key not in self._memo:
            writable = self.writable[table]
            first = int(writable[0, 0]) if writable.size else -1
            one = (
                first >= 0
                and bool((writable[:, 0] == first).all())
                and bool((writable[:, 1:] < 0).all())
            )
            address = self.nodes[first] if one and first < len(self.nodes) else ""
            self._memo[key] = address if address and not self.gone(address) else None
        return self._memo[key]


def _replica_matrix(shards: Any, states: tuple[str, ...], owners: np.ndarray) -> np.ndarray:
    """Per shard, the node indexes of its replicas in ``states`` (in that order of
    state), -1 padded; the owner alone for a map without replica lists."""
    if not len(shards):
        return owners.reshape(-1, 1).astype(np.int32)
    rows = [
        [n for state in states for n, s in zip(r.node, r.state, strict=True) if s == state]
        for r in shards
    ]
    width = max(1, *(len(r) for r in rows))
    out = np.full((len(rows), width), -1, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _leaving(shards: Any, readable: np.ndarray) -> np.ndarray:
    """True where ``readable`` (from ``shards``) holds a Leaving replica."""
    out = np.zeros(readable.shape, bool)
    for i, r in enumerate(shards):
        gone = {n for n, s in zip(r.node, r.state, strict=True) if s == "Leaving"}
        out[i] = [n in gone for n in readable[i].tolist()]
    return out


def route_from_map(msg: pb.ClusterMap, seed: str) -> Route:
    """The Route of ``msg``; node addresses as ``seed``'s client dials them."""
    nodes = tuple(dial_address(n.address, seed) for n in msg.nodes)
    fast = {
        dial_address(n.address, seed): dial_address(n.fast_address, seed)
        for n in msg.nodes
        if n.fast_address
    }
    owners = {t.table: np.asarray(t.owner, dtype=np.int32) for t in msg.tables}
    readable = {
        t.table: _replica_matrix(t.replicas, READABLE_STATES, owners[t.table]) for t in msg.tables
    }
    leaving = {t.table: _leaving(t.replicas, readable[t.table]) for t in msg.tables}
    writable = {
        t.table: _replica_matrix(t.replicas, WRITABLE_STATES, owners[t.table]) for t in msg.tables
    }
    quorum = {t.table: getattr(t, "write_quorum", 0) for t in msg.tables}
    sole = {
        table: nodes[o[0]]
        for table, o in owners.items()
        if len(o) and (o == o[0]).all() and readable[table].shape[1] == 1
    }
    zones = tuple(n.zone for n in msg.nodes)
    down = np.array([n.state == "down" for n in msg.nodes], dtype=bool)
    return Route(
        msg.epoch, nodes, fast, owners, sole, readable, leaving, writable, quorum, zones, down
    )


#: What reading a Leaving replica (a move's source) costs in read_choice's scores:
#: as much as 100 calls outstanding, less than reading from another zone.
LEAVING_PENALTY = 1e5


def read_choice(
    route: Route,
    table: str,
    readable: np.ndarray,
    avoid: frozenset[str],
    health: NodeHealth,
    zone: str,
    spin: int,
    wanted: np.ndarray | None = None,
) -> np.ndarray:
    """Per shard, the node index of the replica to read: not in ``avoid``, then one
    the map does not mark down, then one not suspect of hanging (``health``: a hedge
    beat it or it failed, and it has not answered since) unless its probe is due, then
    in the client's ``zone``, then Available before Leaving, then with the fewest
    calls outstanding and the least slow (``health``: 1 call ≈ 1 ms of mean latency),
    then the client's own order of nodes (``spin``): one client sends a batch to few
    nodes, many clients spread over all. NoReplica when a shard of ``wanted`` (None:
    every shard) has no replica left.

    A suspect node chosen is probed: its suspicion is renewed (``NodeHealth.probe``),
    so concurrent reads keep away from it and one read at a time tries it; a node
    whose probe another read claimed first is scored as suspect and the choice made
    again."""
    n = len(route.nodes)
    outstanding = health.outstanding
    now = time.monotonic()
    score = np.empty(n + 1)  # the last entry: the -1 padding, never chosen
    for i, address in enumerate(route.nodes):
        if address in avoid or not address:
            score[i] = math.inf
            continue
        far = bool(zone) and i < len(route.zones) and route.zones[i] != zone
        down = i < len(route.down) and route.down[i]
        suspect = health.suspicion(address, now)
        busy = outstanding.get(address, 0) + health.slowness(address, now) * 1e3
        score[i] = down * 1e9 + suspect * SUSPECT_PENALTY + far * 1e6 + busy * 1e3 + (i + spin) % n
    score[n] = math.inf
    leaving = route.leaving.get(table)
    rows = np.arange(len(readable))
    while True:
        per_replica = score[readable]
        if leaving is not None and leaving.shape == readable.shape:
            per_replica = per_replica + leaving * LEAVING_PENALTY
        best = per_replica.argmin(axis=1)
        chosen = readable[rows, best]
        taken = _probe_suspects(route, health, chosen if wanted is None else chosen[wanted], now)
        if taken is None:
            break
        score[taken] += SUSPECT_PENALTY  # another read probes it: avoid it as a suspect
    missing = np.isinf(per_replica[rows, best])
    if wanted is not None:
        missing &= np.isin(rows, wanted)
    if missing.any():
        shard = int(np.flatnonzero(missing)[0])
        raise NoReplica(
            f"table {table!r}, shard {shard}: no readable replica left to ask "
            f"(failed: {', '.join(sorted(avoid)) or 'none'})"
        )
    return chosen


#: What a suspect node costs in read_choice's scores (1 to 2 times this, the newer its
#: suspicion the more): more than another zone, less than a node the map marks down.
SUSPECT_PENALTY = 1e7


def _probe_suspects(route: Route, health: NodeHealth, chosen: np.ndarray, now: float) -> int | None:
    """Renew the suspicion of each suspect node in ``chosen`` (node indexes): this read
    probes it. The index of one whose probe another read claimed first, else None."""
    if not health.suspects:
        return None
    for node in np.unique(chosen[chosen >= 0]).tolist():
        address = route.nodes[node]
        if not health.is_suspect(address):
            continue
        if health.suspected(address, now):
            health.suspect(address)  # every replica is suspect: still, one read at a time
        elif not health.probe(address, now):
            return node
    return None
