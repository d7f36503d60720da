"""The client's calls as sans-I/O generators, shared by ``Client`` and ``AsyncClient``.

Each call (create, describe, get, write, delete, positions, versions, rollback, the
cluster map) is written once here on top of ``kvstore.client.core`` (plans, routes,
decoding); the sync and async clients only send the RPCs each step yields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.client.core import (
    MAX_ROUTE_RETRIES,
    STALE_ROUTE,
    STALE_SCHEMA,
    GetPlan,
    MixedVersions,
    NodeCall,
    Settled,
    check_version,
    read_once,
)
from kvstore.client.replication import ReplicaFlows
from kvstore.clock import now_us
from kvstore.columns import encode_rows
from kvstore.errors import (
    KvstoreError,
    TableNotFound,
    Unavailable,
)
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.messages import (
    TableInfo,
    VersionInfo,
    cluster_map_json,
    position_proto,
    schema_from_proto,
    schema_to_proto,
    stats_json,
)

__all__ = ["Flow", "Operations"]

# -- operations ----------------------------------------------------------------------
#
# Each public call is written once, as a generator: it yields the RPCs it needs (a
# list of NodeCall, sent in parallel) and receives their responses, or a KvstoreError
# thrown in. Client drives it with blocking calls, AsyncClient with coroutines.
# get alone skips the generator when the schema and route are cached (quick_get): it
# runs start_get / finish_get directly, or, when one node serves the table, get_plan,
# GetPlan.request and finish_one (the flow costs ~2 µs a call, and a µs of client
# work costs five or more with 32 client processes on two cores); it falls back to
# get_flow for anything that must be fetched or refreshed (get_retry_flow after a
# quick get failed).

Flow = Any  # Generator[list[NodeCall], list[Any], T]


class Operations(ReplicaFlows):
    """The client's calls as sans-I/O generators (see the comment above)."""

    def _one(self, method: str, request: Any, address: str | None = None) -> Flow:
        (response,) = yield [NodeCall(address or self.seed, method, request)]
        return response

    def _any(self, method: str, request: Any) -> Flow:
        """One call answered by the seed, else by the first other known node that can
        be reached (for calls every node answers alike: maps, schemas, tables)."""
        error: KvstoreError | None = None
        for address in self.candidates():
            try:
                return (yield from self._one(method, request, address))
            except Unavailable as exc:
                error = exc
        assert error is not None
        raise error

    def refresh_map_flow(self, min_epoch: int = 0) -> Flow:
        """Fetch the cluster map from the seed, else the other known nodes; keep asking
        the next one while the answers are older than ``min_epoch`` (a StaleMap's) or
        than the cached map: a map older than the cached one is never applied."""
        min_epoch = max(min_epoch, self.route.epoch)
        best: pb.ClusterMap | None = None
        error: KvstoreError | None = None
        for address in self.candidates():
            try:
                cmap = yield from self._one("GetClusterMap", pb.GetClusterMapRequest(), address)
            except Unavailable as exc:
                error = exc
                continue
            if best is None or cmap.epoch > best.epoch:
                best = cmap
            if cmap.epoch >= min_epoch:
                break
        if best is None:
            assert error is not None
            raise error
        self.apply_cluster_map(best)
        self.route_doubted = False  # the newest map any node has: nothing newer to ask for
        return best

    def schema_flow(self, table: str, refresh: bool = False) -> Flow:
        if refresh or table not in self.schemas:
            info = yield from self._any("DescribeTable", pb.DescribeTableRequest(table=table))
            self.schemas[table] = schema_from_proto(info.schema)
        if not self.knows_route(table) or self.route_doubted:
            yield from self.refresh_map_flow()
        return self.schemas[table]

    def _with_schema(self, table: str, body, refresh: bool = False, rerouted: bool = False) -> Flow:
        """Run ``body(schema)``; on a stale schema, describe the table again and retry once;
        on a stale route (STALE_ROUTE), refresh the map and retry once.

        ``refresh``: describe it first (the caller found the cached schema stale: after
        Client.get's own read, a get so reads at most three times). ``rerouted``: the
        caller already refreshed the map after a stale route: no second retry.
        """
        try:
            schema = yield from self.schema_flow(table, refresh)
            try:
                return (yield from self._routed(body, schema, rerouted))
            except STALE_SCHEMA:
                schema = yield from self.schema_flow(table, refresh=True)
                return (yield from self._routed(body, schema, rerouted))
        except TableNotFound:
            self.forget(table)
            raise

    def _routed(self, body, schema: TableSchema, rerouted: bool) -> Flow:
        """``body(schema)``; on a stale route, refresh the map and run it again: once,
        then again each time the map's epoch rose meanwhile (a request that meets
        several hand-overs of a move in a row), at most MAX_ROUTE_RETRIES times."""
        retries = int(rerouted)
        while True:
            try:
                return (yield from body(schema))
            except STALE_ROUTE as exc:
                retries += 1
                before = self.route.epoch
                if retries > MAX_ROUTE_RETRIES:
                    raise
                yield from self.refresh_map_flow(getattr(exc, "epoch", 0))
                if retries > 1 and self.route.epoch <= before:
                    raise

    def create_table_flow(
        self,
        name: str,
        key: str,
        features: dict[str, str],
        shards: int,
        ttl: dict[str, float] | None = None,
        replicas: int = 1,
        write_quorum: int | None = None,
    ) -> Flow:
        schema = TableSchema.build(name, key, features, shards, ttl=ttl)
        request = pb.CreateTableRequest(
            schema=schema_to_proto(schema), replicas=replicas, write_quorum=write_quorum or 0
        )
        info = TableInfo.from_proto((yield from self._any("CreateTable", request)))
        self.schemas[name] = info.schema
        self.route = self.route.without(name)
        return info

    def describe_flow(self, name: str) -> Flow:
        info = TableInfo.from_proto(
            (yield from self._any("DescribeTable", pb.DescribeTableRequest(table=name)))
        )
        self.schemas[name] = info.schema
        return info

    def list_flow(self) -> Flow:
        response = yield from self._any("ListTables", pb.ListTablesRequest())
        return [TableInfo.from_proto(t) for t in response.tables]

    def drop_flow(self, name: str) -> Flow:
        """Drop table ``name`` through the seed, else the next reachable node. A node
        that could not be reached may have dropped it before its answer was lost: the
        next node's TableNotFound then means this drop is done."""
        request = pb.DropTableRequest(table=name)
        error: KvstoreError | None = None
        for address in self.candidates():
            try:
                yield from self._one("DropTable", request, address)
            except Unavailable as exc:
                error = exc
                continue
            except TableNotFound:
                if error is None:
                    raise
            self.forget(name)
            return
        assert error is not None
        raise error

    def cluster_map_flow(self) -> Flow:
        return cluster_map_json((yield from self.refresh_map_flow()))

    def get_flow(
        self,
        table: str,
        keys: Any,
        features: list[str] | None,
        version: int = 0,
        refresh: bool = False,
        stale_route: KvstoreError | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> Flow:
        """``stale_route``: the STALE_ROUTE error a get without the flow met (Client.get's
        own read): the map is refreshed first, and that was the one retry. ``avoid``:
        nodes that failed that read: their parts go to other replicas first."""
        keys, features = read_once(keys), read_once(features)
        check_version(version)
        # ``avoid`` is what the read before this flow saw: after a map refresh (_routed
        # runs body again), every replica of the new map may be asked.
        avoiding = [avoid]

        def body(schema: TableSchema) -> Flow:
            plan = self.get_plan(schema, features)
            batch = KeyBatch.from_values(schema.key_type, keys, table)
            if not batch.count:
                return self.finish_get(table, plan, batch, [], [])
            now, avoiding[0] = avoiding[0], frozenset()
            try:
                return (yield from self.read_flow(table, schema, plan, batch, version, now))
            except MixedVersions as mixed:
                return (yield from self.read_flow(table, schema, plan, batch, mixed.version))

        if isinstance(stale_route, MixedVersions):  # Client.get's own read met one
            if not version:
                version = stale_route.version
            stale_route = None
        if stale_route is not None:
            yield from self.refresh_map_flow(getattr(stale_route, "epoch", 0))
        rerouted = stale_route is not None
        return (yield from self._with_schema(table, body, refresh, rerouted))

    def quick_get(
        self, table: str, keys: Any, features: Any, version: int, fast: bool
    ) -> tuple[GetPlan, KeyBatch, str | None, list[NodeCall]] | None:
        """The plan of a get that needs no flow: the schema and route of ``table`` are
        cached. None when they are not (run ``get_flow``). Else ``(plan, batch,
        fast_address, calls)``: ``fast_address`` when ``fast`` and one node with a fast
        read path serves the whole table (send ``plan.request(batch, version)`` there,
        then ``finish_one``); else the node calls (none for no keys: ``finish_get``).
        A failure of the sends or the finish goes to ``get_retry_flow``."""
        # knows_route and sole_fast_address, inline: this runs on every get
        schema = self.schemas.get(table)
        route = self.route  # read once: another thread may swap it
        owners = route.owners.get(table)
        if schema is None or owners is None or len(owners) != schema.shards:
            return None
        if self.route_doubted:
            return None
        sole = route.sole.get(table) if fast else None
        if sole is not None and (address := route.fast.get(sole)):
            plan = self.get_plan(schema, features)
            batch = KeyBatch.from_values(schema.key_type, keys, table)
            if batch.count:
                return plan, batch, address, []
        plan, batch, calls = self.start_get(table, schema, keys, features, version)
        return plan, batch, None, calls

    def get_retry_flow(
        self,
        error: Exception,
        table: str,
        keys: Any,
        features: Any,
        version: int,
        failed: frozenset[str] = frozenset(),
    ) -> Flow:
        """The get_flow that finishes a quick get that failed with ``error``: a stale
        schema (or a dropped table) describes the table again first; a stale route
        from the nodes ``failed`` reads their parts from other replicas at once when
        the table has some, else refreshes the map first (that is the one retry);
        anything else is raised."""
        if isinstance(error, (*STALE_SCHEMA, TableNotFound)):
            return self.get_flow(table, keys, features, version, refresh=True)
        if isinstance(error, STALE_ROUTE):
            if failed and self.replicated(table):
                self.counters.failovers += len(failed)
                self.route_doubted = True
                return self.get_flow(table, keys, features, version, avoid=failed)
            return self.get_flow(table, keys, features, version, stale_route=error)
        raise error

    def quick_outcomes(
        self, calls: list[NodeCall], outcomes: list[Any]
    ) -> tuple[KvstoreError | None, frozenset[str]]:
        """The first error of a quick get's settled calls (None: all answered) and the
        nodes whose calls failed with a stale route."""
        first = None
        failed = set()
        for call, outcome in zip(calls, outcomes, strict=True):
            if isinstance(outcome, KvstoreError):
                if not isinstance(outcome, STALE_ROUTE):
                    return outcome, frozenset()
                first = first or outcome
                failed.add(call.address)
        return first, frozenset(failed)

    def write_flow(
        self,
        table: str,
        data: Any,
        key_column: str,
        event_time: int | np.ndarray | None,
        position: Any = None,
    ) -> Flow:
        pos = position_proto(position)
        # One event time for the call, so that a retry after a stale route (see
        # _routed) writes the same update again, which changes nothing where it landed.
        stamp = now_us() if event_time is None else event_time

        def body(schema: TableSchema) -> Flow:
            rows = encode_rows(schema, data, key_column, stamp)
            if not len(rows):
                return 0

            def plan(only: Any, acked: Any) -> list[NodeCall]:
                return self.plan_write(table, schema, rows, pos, only, acked, serialized=True)

            yield from self.quorum_flow(table, schema, rows.keys, plan, pos)
            return len(rows)

        return (yield from self._with_schema(table, body))

    def delete_flow(
        self, table: str, keys: Any, event_time: int | None = None, position: Any = None
    ) -> Flow:
        pos = position_proto(position)
        stamp = event_time or now_us()  # one event time for a retry too (see write_flow)

        def body(schema: TableSchema) -> Flow:
            batch = KeyBatch.from_values(schema.key_type, keys, table)
            if not batch.count:
                if pos is not None:  # a consumer's batch that wrote nothing
                    yield self._position_only(table, schema, pos, set())
                return 0

            def plan(only: Any, acked: Any) -> list[NodeCall]:
                return self.plan_delete(table, schema, batch, stamp, pos, only, acked)

            yield from self.quorum_flow(table, schema, batch, plan, pos)
            return batch.count

        return (yield from self._with_schema(table, body))

    def positions_flow(self, table: str, consumer: str, source: str) -> Flow:
        """partition → last offset stored, as the minimum over every node serving the
        table (-1 for a partition a node has none of): a consumer resuming there skips
        nothing that any node missed."""
        request = pb.ConsumerPositionsRequest(table=table, consumer=consumer, source=source)

        def body(schema: TableSchema) -> Flow:
            nodes = self._owner_nodes(table)
            outcomes = yield Settled(NodeCall(n, "GetConsumerPositions", request) for n in nodes)
            responses = [r for r in outcomes if not isinstance(r, KvstoreError)]
            errors = [r for r in outcomes if isinstance(r, KvstoreError)]
            for error in errors:
                if not isinstance(error, STALE_ROUTE):
                    raise error
            # A node that cannot answer is left out when every shard has a replica on a
            # node that did: the positions are stored with every write's quorum.
            answered = {
                n for n, r in zip(nodes, outcomes, strict=True) if not isinstance(r, KvstoreError)
            }
            if errors and not self._covered(table, answered):
                raise errors[0]
            held = [{p.partition: p.offset for p in r.positions} for r in responses]
            partitions = sorted(set().union(*held))
            return {p: min(offsets.get(p, -1) for offsets in held) for p in partitions}

        return (yield from self._with_schema(table, body))

    def stats_flow(self) -> Flow:
        response = yield from self._one("Stats", pb.StatsRequest())
        return stats_json(response)

    def versions_flow(self, table: str) -> Flow:
        response = yield from self._one("ListVersions", pb.ListVersionsRequest(table=table))
        return [VersionInfo.from_proto(v) for v in response.versions]

    def rollback_flow(self, table: str, to_version: int) -> Flow:
        request = pb.RollbackRequest(table=table, to_version=to_version)
        return VersionInfo.from_proto((yield from self._one("Rollback", request)))
