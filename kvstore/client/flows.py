"""The client's calls as sans-I/O generators, shared by ``Client`` and ``AsyncClient``.

Each call (create, describe, get, write, delete, positions, versions, rollback, the
cluster map) is written once here on top of ``kvstore.client.core`` (plans, routes,
decoding); the sync and async clients only send the RPCs each step yields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.client.core import (
    STALE_ROUTE,
    STALE_SCHEMA,
    ClientCore,
    GetPlan,
    MixedVersions,
    NodeCall,
    read_once,
)
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


class Operations(ClientCore):
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
        return best

    def schema_flow(self, table: str, refresh: bool = False) -> Flow:
        if refresh or table not in self.schemas:
            info = yield from self._any("DescribeTable", pb.DescribeTableRequest(table=table))
            self.schemas[table] = schema_from_proto(info.schema)
        if not self.knows_route(table):
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
        if rerouted:
            return (yield from body(schema))
        try:
            return (yield from body(schema))
        except STALE_ROUTE as exc:
            yield from self.refresh_map_flow(getattr(exc, "epoch", 0))
            return (yield from body(schema))

    def create_table_flow(
        self,
        name: str,
        key: str,
        features: dict[str, str],
        shards: int,
        ttl: dict[str, float] | None = None,
    ) -> Flow:
        schema = TableSchema.build(name, key, features, shards, ttl=ttl)
        request = pb.CreateTableRequest(schema=schema_to_proto(schema))
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
    ) -> Flow:
        """``stale_route``: the STALE_ROUTE error a get without the flow met (Client.get's
        own read): the map is refreshed first, and that was the one retry."""
        keys, features = read_once(keys), read_once(features)

        def body(schema: TableSchema) -> Flow:
            plan, batch, calls = self.start_get(table, schema, keys, features, version)
            responses = (yield calls) if calls else []
            try:
                return self.finish_get(table, plan, batch, calls, responses)
            except MixedVersions as mixed:
                calls = self.plan_get(table, schema, batch, plan.names, mixed.version)
                responses = yield calls
                return self.finish_get(table, plan, batch, calls, responses)

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
        sole = route.sole.get(table) if fast else None
        if sole is not None and (address := route.fast.get(sole)):
            plan = self.get_plan(schema, features)
            batch = KeyBatch.from_values(schema.key_type, keys, table)
            if batch.count:
                return plan, batch, address, []
        plan, batch, calls = self.start_get(table, schema, keys, features, version)
        return plan, batch, None, calls

    def get_retry_flow(
        self, error: Exception, table: str, keys: Any, features: Any, version: int
    ) -> Flow:
        """The get_flow that finishes a quick get that failed with ``error``: a stale
        schema (or a dropped table) describes the table again first, a stale route
        refreshes the map first (that is the one retry); anything else is raised."""
        if isinstance(error, (*STALE_SCHEMA, TableNotFound)):
            return self.get_flow(table, keys, features, version, refresh=True)
        if isinstance(error, STALE_ROUTE):
            return self.get_flow(table, keys, features, version, stale_route=error)
        raise error

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
            calls = self.plan_write(table, schema, rows, pos)
            writes = len(calls)
            if pos is not None:
                calls += self._position_only(table, schema, pos, {c.address for c in calls})
            responses = yield calls
            return sum(r.rows_written for r in responses[:writes])

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
            calls = self.plan_delete(table, schema, batch, stamp, pos)
            if pos is not None:
                calls += self._position_only(table, schema, pos, {c.address for c in calls})
            responses = yield calls
            return sum(r.keys_deleted for r in responses)  # 0 from the keyless ones

        return (yield from self._with_schema(table, body))

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

    def _owner_nodes(self, table: str) -> list[str]:
        """The nodes serving a shard of ``table`` in the cached map, each once."""
        route = self.route
        return list(dict.fromkeys(route.nodes[i] for i in route.owners[table].tolist()))

    def positions_flow(self, table: str, consumer: str, source: str) -> Flow:
        """partition → last offset stored, as the minimum over every node serving the
        table (-1 for a partition a node has none of): a consumer resuming there skips
        nothing that any node missed."""
        request = pb.ConsumerPositionsRequest(table=table, consumer=consumer, source=source)

        def body(schema: TableSchema) -> Flow:
            nodes = self._owner_nodes(table)
            responses = yield [NodeCall(n, "GetConsumerPositions", request) for n in nodes]
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
