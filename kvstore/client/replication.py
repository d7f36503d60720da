"""Reads and writes over a shard's replicas, as sans-I/O flows (see kvstore.client.flows):
a read's failed part goes at once to another replica; a write goes to every writable
replica and is acknowledged once each shard has its quorum (docs/cluster.md, "Reads
and writes with replicas")."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.client.core import (
    MAX_ROUTE_RETRIES,
    STALE_ROUTE,
    ClientCore,
    GetPlan,
    NodeCall,
    Settled,
)
from kvstore.client.hedging import HedgedRead
from kvstore.errors import DeadlineExceeded, KvstoreError, StaleMap, Unavailable
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb

__all__ = ["ReplicaFlows"]

Flow = Any  # Generator[list[NodeCall], list[Any], T]

#: A write waits for its replicas in rounds, each this share of the deadline, and
#: refreshes the map between them: a hung replica is dropped from the quorum once the
#: map marks it down (its lease lapsed), not at the end of the deadline. The first
#: round is long: a slow replica's write is not cut off and sent again lightly.
ROUND_SHARES = (0.5, 0.25, 0.25)


class ReplicaFlows(ClientCore):
    """The flows' replica handling: failover of reads, quorum of writes."""

    def refresh_map_flow(self, min_epoch: int = 0) -> Flow:
        raise NotImplementedError  # kvstore.client.flows.Operations's

    def read_flow(
        self,
        table: str,
        schema: TableSchema,
        plan: GetPlan,
        batch: KeyBatch,
        version: int,
        avoid: frozenset[str] = frozenset(),
    ) -> Flow:
        """Read ``batch`` from one readable replica per shard, as a HedgedRead: a part
        whose node fails with a stale route (Unavailable, StaleMap) goes at once to
        another replica of its shards, a slow one is hedged, both pinned to the version
        the other parts answered from (the map is refreshed by the next call). The
        node's error when no replica is left: ``_routed`` then refreshes the map and
        reads again."""
        read = HedgedRead(self, table, schema, plan, batch, version, avoid)
        yield read  # the client runs it to its end (or throws its error in)
        return self.finish_get(table, plan, batch, *read.answers())

    def replicated(self, table: str) -> bool:
        """True when some shard of ``table`` has two readable replicas or more: its
        reads run as a HedgedRead (failover, hedges)."""
        readable = self.route.readable.get(table)
        return readable is not None and readable.shape[1] > 1

    def quorum_flow(
        self,
        table: str,
        schema: TableSchema,
        keys: KeyBatch,
        plan: Any,
        pos: pb.ConsumerPosition | None,
    ) -> Flow:
        """Send a write to every writable replica of its shards (``plan(only, acked)``
        makes the calls) and return once each shard has the acks its quorum needs
        (``Route.needed``). Shards short of it after a stale route are sent again,
        after a map refresh, to the replicas that have not applied it: once, then
        while the map's epoch rises. Unavailable names the shards and failed nodes.

        A replica that does not answer within a share of the deadline (a hung node,
        SIGSTOPped or cut off) does not end the write: the map is refreshed, and once
        it marks the node down the write is acknowledged without it (R = 2: by the one
        replica left); until then the lacking replicas are asked again, within the
        deadline in all (ROUND_SHARES). DeadlineExceeded names the node. A table with
        one replica per shard waits the whole deadline in one round."""
        present = np.unique(keys.shard_ids(schema.shards))
        acked: dict[str, np.ndarray] = {}
        failures: dict[str, KvstoreError] = {}
        calls = plan(None, None)
        if pos is not None:
            calls += self._position_only(table, schema, pos, {c.address for c in calls})
        rounds = stalls = 0
        replicated = self.replicated(table)
        while True:
            # One replica per shard: nothing to wait out, the whole deadline at once.
            patience = ROUND_SHARES[min(stalls, len(ROUND_SHARES) - 1)] if replicated else 1.0
            outcomes = (yield Settled(calls, patience)) if calls else []
            stalled: dict[str, KvstoreError] = {}
            newer = 0  # a replica refused at an epoch after this map's: it is out of date
            for call, outcome in zip(calls, outcomes, strict=True):
                if replicated and isinstance(outcome, DeadlineExceeded):
                    stalled[call.address] = failures[call.address] = outcome
                elif isinstance(outcome, KvstoreError):
                    if not isinstance(outcome, STALE_ROUTE):
                        raise outcome
                    failures[call.address] = outcome
                    if isinstance(outcome, StaleMap):
                        newer = max(newer, outcome.epoch)
                elif call.shards is not None:  # not a position-only request
                    done = acked.get(call.address)
                    acked[call.address] = (
                        call.shards if done is None else np.union1d(done, call.shards)
                    )
                    failures.pop(call.address, None)
            lacking = self._lacking(table, schema, present, acked)
            # The quorum is the current map's: a replica the old map did not count (an
            # Initializing one) that refused with a newer epoch may count now (it caught
            # up, and its peer, not there yet, took the write alone).
            if not len(lacking) and newer <= self.route.epoch:
                return
            if replicated and stalled and len(stalled) == len(failures):
                # Only replicas that did not answer in time: is the node marked out yet?
                stalls += 1
                yield from self._map_from(acked)
                lacking = self._lacking(table, schema, present, acked)
                if not len(lacking):
                    return
                calls = plan(lacking, acked)
                if stalls >= len(ROUND_SHARES) or not calls:
                    raise self._stalled(table, lacking, stalled)
                self.counters.write_retries += 1
                continue
            rounds += 1
            before = self.route.epoch
            stale = [getattr(e, "epoch", 0) for e in failures.values()]
            if rounds <= MAX_ROUTE_RETRIES:
                yield from self.refresh_map_flow(max(stale, default=0))
                lacking = self._lacking(table, schema, present, acked)
                if not len(lacking):  # the map now marks the failed replicas down
                    return
            if rounds > MAX_ROUTE_RETRIES or (rounds > 1 and self.route.epoch <= before):
                raise self._no_quorum(table, lacking, acked, failures)
            calls = plan(lacking, acked)
            if not calls:
                raise self._no_quorum(table, lacking, acked, failures)
            self.counters.write_retries += 1

    def _lacking(
        self, table: str, schema: TableSchema, present: np.ndarray, acked: dict[str, np.ndarray]
    ) -> np.ndarray:
        """The shards of ``present`` with fewer acks than the current map's quorum."""
        route = self.route
        acks = route.acks(table, acked)
        return present[acks[present] < route.needed(table)[present]]

    def _map_from(self, acked: dict[str, np.ndarray]) -> Flow:
        """Refresh the map from a node that applied this write (it answers; the seed may
        be the hung node), else as any refresh does; a map older than the cached one is
        not applied."""
        if not acked:
            yield from self.refresh_map_flow()
            return
        cmap = yield [NodeCall(next(iter(acked)), "GetClusterMap", pb.GetClusterMapRequest())]
        self.apply_cluster_map(cmap[0])

    def _stalled(
        self, table: str, lacking: np.ndarray, stalled: dict[str, KvstoreError]
    ) -> DeadlineExceeded:
        shards = ", ".join(str(s) for s in lacking[:8].tolist())
        nodes = "; ".join(f"{a}: {e}" for a, e in stalled.items())
        return DeadlineExceeded(
            f"table {table!r}: the write reached no quorum on shard(s) {shards} within its "
            f"deadline, and the map does not mark the replicas that did not answer down "
            f"({nodes})"
        )

    def _no_quorum(
        self,
        table: str,
        lacking: np.ndarray,
        acked: dict[str, np.ndarray],
        failures: dict[str, KvstoreError],
    ) -> Unavailable:
        shards = ", ".join(str(s) for s in lacking[:8].tolist())
        more = f" (+{len(lacking) - 8} more)" if len(lacking) > 8 else ""
        failed = "; ".join(f"{a}: {e}" for a, e in failures.items()) or "none"
        applied = ", ".join(sorted(acked)) or "none"
        return Unavailable(
            f"table {table!r}: the write reached no quorum on shard(s) {shards}{more}; "
            f"applied on {applied}; failed: {failed}"
        )

    def _owner_nodes(self, table: str) -> list[str]:
        """The nodes holding a writable replica of ``table`` in the cached map, each
        once, but those the map marks down."""
        route = self.route
        writable = route.writable[table]
        nodes = np.unique(writable[writable >= 0]).tolist()
        return [
            route.nodes[i]
            for i in nodes
            if route.nodes[i] and not (i < len(route.down) and route.down[i])
        ]

    def _covered(self, table: str, answered: set[str]) -> bool:
        """True when every shard of ``table`` has a writable replica on a node of ``answered``."""
        route = self.route
        ok = np.array([a in answered for a in route.nodes] + [False])
        return bool(ok[route.writable[table]].any(axis=1).all())

    def _position_only(
        self, table: str, schema: TableSchema, pos: pb.ConsumerPosition, skip: set[str]
    ) -> list[NodeCall]:
        """A keyless request storing ``pos`` on each node serving ``table`` but those in
        ``skip`` (they store it with their keys): every owner then holds the position of
        every batch, and the minimum over them (positions_flow) is never past a write
        that a node missed."""
        request = pb.DeleteRequest(
            table=table,
            keys=KeyBatch.from_values(schema.key_type, [], table).to_proto(),
            position=pos,
        )
        return [
            NodeCall(node, "Delete", request)
            for node in self._owner_nodes(table)
            if node not in skip
        ]
