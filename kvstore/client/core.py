"""What the sync and async clients share: schemas, the cluster map, request plans, decoding.

A call is planned (which node gets which keys), sent (one RPC per node, by the sync
or async client), then finished here (responses merged into request order and
decoded in one pass by the Cython codec).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvstore import _codec
from kvstore.client.result import GetResult
from kvstore.clock import now_us
from kvstore.columns import EncodedRows, encode_rows
from kvstore.errors import (
    CorruptValue,
    InvalidArgument,
    KvstoreError,
    SchemaChanged,
    StaleMap,
    TableNotFound,
    Unavailable,
)
from kvstore.keys import KeyBatch
from kvstore.schema import Feature, TableSchema
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.dial import dial_address, resolve_address
from kvstore.wire.messages import (
    TableInfo,
    VersionInfo,
    cluster_map_json,
    position_proto,
    schema_from_proto,
    schema_to_proto,
    stats_json,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STALE_SCHEMA",
    "GetPlan",
    "NodeCall",
    "Operations",
    "resolve_address",  # kvstore.wire.dial's, for the CLI
]

#: Deadline of every call unless the client or the call says otherwise, in seconds.
DEFAULT_TIMEOUT_S = 5.0

#: What a call raises when the client's cached schema of the table is out of date:
#: describe the table again and retry.
STALE_SCHEMA = (_codec.SchemaMismatch, SchemaChanged)

#: What a call raises when the client's cluster map is out of date: a node refused a
#: shard it does not hold (StaleMap, nothing applied), or could not be reached (it
#: stopped, or restarted on another port). Refresh the map from any node, retry once.
STALE_ROUTE = (StaleMap, Unavailable)


class MixedVersions(StaleMap):
    """The nodes of one batch answered from different bulk versions (a load's or a
    rollback's switch reached some nodes a moment before others): the batch is read
    again with ``version`` pinned on every node. A StaleMap, so a caller that met it
    outside ``get_flow`` refreshes its map and lets the flow read again."""

    def __init__(self, table: str, versions: list[int]) -> None:
        older = min(versions)
        #: The version to read: the older one, still kept on every node (nodes keep
        #: the previous version for rollback), unless it is 0 (no version yet, which
        #: cannot be pinned): then the newer one.
        self.version = older or max(versions)
        super().__init__(
            f"table {table!r}: one batch was answered from versions {sorted(set(versions))}; "
            f"reading it at version {self.version}",
            0,
        )


def check_timeout(timeout: Any) -> float:
    """A call's deadline in seconds: a finite number > 0, else InvalidArgument."""
    real = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool)
    seconds = float(timeout) if real else math.nan
    if not 0 < seconds < math.inf:
        raise InvalidArgument(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
    return seconds


def read_once(values: Any) -> Any:
    """An iterator (a generator, say) as a list, so that a retry sees it whole again."""
    return list(values) if isinstance(values, Iterator) else values


@dataclass(slots=True)
class GetPlan:
    """What every ``get`` of one table and feature list shares, kept per schema."""

    schema: TableSchema
    #: The feature names sent to the node ([] = all).
    names: list[str]
    #: The projected features and their names, in result order.
    features: list[Feature]
    feature_names: list[str]
    #: The codec's decode plan of the projected features.
    projection: _codec.Projection
    #: A GetRequest of the table and ``names``, serialized: a get's request is this
    #: plus its keys' and version's (protobuf merges concatenated messages).
    prefix: bytes

    def request(self, keys: KeyBatch, version: int) -> bytes:
        """The serialized GetRequest of ``keys`` at ``version``."""
        rest = pb.GetRequest(version=version)
        keys.fill_proto(rest.keys)  # in place: a Keys message passed in would be copied
        return self.prefix + rest.SerializeToString()


#: Get plans a client keeps (distinct tables and feature lists); beyond, it starts over.
MAX_GET_PLANS = 256


@dataclass(slots=True)
class NodeCall:
    """One RPC of a batch: the node, the method, the request, its keys' request positions."""

    address: str
    method: str
    request: Any
    positions: np.ndarray | None = None  # None = every key, in order


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

    def without(self, table: str) -> Route:
        """This route with no entry for ``table``."""
        owners = {t: o for t, o in self.owners.items() if t != table}
        sole = {t: n for t, n in self.sole.items() if t != table}
        return replace(self, owners=owners, sole=sole)


class ClientCore:
    """Schemas and the cluster map, cached; plans and finishes batch calls."""

    def __init__(self, address: str | None, timeout: float) -> None:
        self.seed = resolve_address(address)
        self.timeout = check_timeout(timeout)
        self.schemas: dict[str, TableSchema] = {}
        #: The cached cluster map; read it once per call (it may be swapped meanwhile).
        self.route = Route()
        self.get_plans: dict[tuple, GetPlan] = {}

    # -- cluster map -----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.route.epoch

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.route.nodes

    @property
    def fast(self) -> Mapping[str, str]:
        return self.route.fast

    @property
    def owners(self) -> Mapping[str, np.ndarray]:
        return self.route.owners

    def apply_cluster_map(self, msg: pb.ClusterMap) -> None:
        """Route by ``msg`` from now on, unless the cached map is newer (by epoch)."""
        if msg.epoch < self.route.epoch:
            return
        seed = self.seed
        nodes = tuple(dial_address(n.address, seed) for n in msg.nodes)
        fast = {
            dial_address(n.address, seed): dial_address(n.fast_address, seed)
            for n in msg.nodes
            if n.fast_address
        }
        owners = {t.table: np.asarray(t.owner, dtype=np.int32) for t in msg.tables}
        sole = {table: nodes[o[0]] for table, o in owners.items() if len(o) and (o == o[0]).all()}
        self.route = Route(msg.epoch, nodes, fast, owners, sole)  # one assignment: atomic

    def candidates(self) -> list[str]:
        """The nodes to ask for the map or a table's schema: the seed, then the others
        of the cached map."""
        return [self.seed, *(n for n in dict.fromkeys(self.nodes) if n and n != self.seed)]

    def call_timeout(self, timeout: float | None) -> float:
        """The deadline of one call: ``timeout``, or the client's when None."""
        return self.timeout if timeout is None else check_timeout(timeout)

    def knows_route(self, table: str) -> bool:
        """True when the cached map routes every shard of the cached schema."""
        owners = self.route.owners.get(table)
        schema = self.schemas.get(table)
        return owners is not None and schema is not None and len(owners) == schema.shards

    def sole_fast_address(self, table: str, schema: TableSchema) -> str | None:
        """The fast read path of the one node that serves every shard of ``schema``'s
        table in the cached map; None if several nodes do, the map does not fit the
        schema, or that node has no fast path."""
        route = self.route
        sole = route.sole.get(table)
        if sole is None or len(route.owners[table]) != schema.shards:
            return None
        return route.fast.get(sole)

    def forget(self, table: str) -> None:
        self.schemas.pop(table, None)
        self.route = self.route.without(table)

    def _split(
        self, table: str, schema: TableSchema, keys: KeyBatch
    ) -> list[tuple[str, np.ndarray | None]]:
        """Which node gets which key positions; one entry per node with keys."""
        route = self.route
        owners = route.owners.get(table)
        if owners is None or len(owners) != schema.shards:
            raise KvstoreError(f"no route for table {table!r} in the cluster map")
        sole = route.sole.get(table)
        if sole is not None:  # one node owns every shard: no hashing
            return [(sole, None)]
        node_of_key = owners[keys.shard_ids(schema.shards)]
        out: list[tuple[str, np.ndarray | None]] = []
        for node in np.unique(node_of_key).tolist():
            out.append((route.nodes[node], np.flatnonzero(node_of_key == node)))
        return out

    # -- get -------------------------------------------------------------------------

    def get_plan(self, schema: TableSchema, features: Any) -> GetPlan:
        """The plan of gets of ``features`` (None = all) from ``schema``'s table, cached.

        UnknownFeature or InvalidArgument name a bad feature list.
        """
        if isinstance(features, str):
            raise InvalidArgument(f"table {schema.name!r}: features must be a list of names")
        wanted = tuple(features) if features else ()  # any iterable, read once
        key: tuple | None
        key = (schema.name, wanted)  # assigned apart from the declaration: mypy narrows it
        try:
            plan = self.get_plans.get(key)
        except TypeError:  # unhashable names: check_features refuses them below
            plan, key = None, None
        if plan is not None and plan.schema is schema:
            return plan
        names, projection = check_features(schema, list(wanted))
        chosen = [schema.features[i] for i in projection]
        plan = GetPlan(
            schema,
            names,
            chosen,
            [f.name for f in chosen],
            _codec.Projection(schema.layout, projection),
            pb.GetRequest(table=schema.name, features=names).SerializeToString(),
        )
        if key is not None:
            if len(self.get_plans) >= MAX_GET_PLANS:
                self.get_plans.clear()
            self.get_plans[key] = plan
        return plan

    def start_get(
        self, table: str, schema: TableSchema, keys: Any, features: Any, version: int
    ) -> tuple[GetPlan, KeyBatch, list[NodeCall]]:
        """The plan, the checked keys and the node calls of a get (none for no keys)."""
        plan = self.get_plan(schema, features)
        batch = KeyBatch.from_values(schema.key_type, keys, table)
        if not batch.count:
            return plan, batch, []
        return plan, batch, self.plan_get(table, schema, batch, plan.names, version)

    def plan_get(
        self, table: str, schema: TableSchema, keys: KeyBatch, features: list[str], version: int = 0
    ) -> list[NodeCall]:
        calls = []
        for address, positions in self._split(table, schema, keys):
            part = keys if positions is None else keys.take(positions)
            request = pb.GetRequest(
                table=table, keys=part.to_proto(), features=features, version=version
            )
            calls.append(NodeCall(address, "Get", request, positions))
        return calls

    def finish_get(
        self,
        table: str,
        plan: GetPlan,
        keys: KeyBatch,
        calls: list[NodeCall],
        responses: list[pb.GetResponse],
    ) -> GetResult:
        """Merge the node responses into request order and decode them in one pass.

        Raises ``_codec.SchemaMismatch`` when a row has another schema than the plan's
        (the caller refreshes the schema and retries once), MixedVersions when the
        nodes answered from different bulk versions (the caller reads again, pinned).
        """
        if not calls:  # no keys
            empty = np.empty(0, np.int64)
            return GetResult(keys, plan, _codec.decode(plan.projection, b"", empty, empty), 0)
        schema_id = plan.schema.schema_id
        if len(responses) > 1:
            versions = [r.version for r in responses]
            if min(versions) != max(versions):
                raise MixedVersions(table, versions)
        version = 0
        blocks = []
        parts = []
        for call, response in zip(calls, responses, strict=True):
            if response.schema_id != schema_id:
                raise _codec.SchemaMismatch(0, response.schema_id)
            version = max(version, response.version)
            block = response.values  # each read of a bytes field copies it: read it once
            blocks.append(block)
            parts.append((response.lengths, response.order, call.positions, len(block)))
        buf = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        return self._decode_get(table, plan, keys, buf, parts, version, calls)

    def finish_one(
        self, table: str, plan: GetPlan, keys: KeyBatch, address: str, response: pb.GetResponse
    ) -> GetResult:
        """``finish_get`` of a get that one node answered whole (its keys in order)."""
        if response.schema_id != plan.schema.schema_id:
            raise _codec.SchemaMismatch(0, response.schema_id)
        block = response.values
        parts = [(response.lengths, response.order, None, len(block))]
        return self._decode_get(table, plan, keys, block, parts, response.version, address)

    def _decode_get(
        self,
        table: str,
        plan: GetPlan,
        keys: KeyBatch,
        buf: bytes,
        parts: list[tuple],
        version: int,
        sources: list[NodeCall] | str,
    ) -> GetResult:
        try:
            starts, lengths = _codec.response_layout(keys.count, parts)
        except ValueError as exc:
            if isinstance(sources, str):
                nodes = f"part 0 from {sources}"
            else:
                nodes = ", ".join(f"part {k} from {c.address}" for k, c in enumerate(sources))
            raise KvstoreError(
                f"table {table!r}: a malformed Get response ({nodes}): {exc}"
            ) from None
        try:
            decoded = _codec.decode(plan.projection, buf, starts, lengths)
        except _codec.CorruptRow as exc:
            raise CorruptValue(
                f"table {table!r}, key {keys.describe(exc.index)}: the value the node sent "
                f"is corrupt ({exc.reason})"
            ) from None
        return GetResult(keys, plan, decoded, version)

    # -- write / delete --------------------------------------------------------------

    def plan_write(
        self,
        table: str,
        schema: TableSchema,
        rows: EncodedRows,
        position: pb.ConsumerPosition | None = None,
    ) -> list[NodeCall]:
        calls = []
        for address, positions in self._split(table, schema, rows.keys):
            if positions is None:
                keys, buf, offsets = rows.keys, rows.rows, rows.offsets
            else:
                keys = rows.keys.take(positions)
                parts = _codec.split_rows(rows.rows, rows.offsets)
                chosen = [parts[i] for i in positions.tolist()]
                buf = b"".join(chosen)
                offsets = np.zeros(len(chosen) + 1, np.int64)
                np.cumsum([len(p) for p in chosen], out=offsets[1:])
            request = pb.WriteRequest(
                table=table,
                schema_id=schema.schema_id,
                keys=keys.to_proto(),
                rows=buf,
                row_offsets=offsets.astype("<i8", copy=False).tobytes(),
                features=rows.features,
                position=position,
            )
            calls.append(NodeCall(address, "Write", request, positions))
        return calls

    def plan_delete(
        self,
        table: str,
        schema: TableSchema,
        keys: KeyBatch,
        event_time_us: int = 0,
        position: pb.ConsumerPosition | None = None,
    ) -> list[NodeCall]:
        calls = []
        for address, positions in self._split(table, schema, keys):
            part = keys if positions is None else keys.take(positions)
            request = pb.DeleteRequest(
                table=table, keys=part.to_proto(), event_time_us=event_time_us, position=position
            )
            calls.append(NodeCall(address, "Delete", request, positions))
        return calls


def check_features(schema: TableSchema, names: list[Any]) -> tuple[list[str], list[int]]:
    """The feature names to request and their positions; UnknownFeature or
    InvalidArgument names a bad one."""
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(
                f"table {schema.name!r}: feature names are strings, not {name!r} "
                f"({type(name).__name__})"
            )
    return names, schema.projection(names)


# -- operations ----------------------------------------------------------------------
#
# Each public call is written once, as a generator: it yields the RPCs it needs (a
# list of NodeCall, sent in parallel) and receives their responses, or a KvstoreError
# thrown in. Client drives it with blocking calls, AsyncClient with coroutines.
# Client.get alone skips the generator when the schema and route are cached: it runs
# start_get / finish_get directly, or, when one node serves the table, get_plan,
# GetPlan.request and finish_one (the flow costs ~2 µs a call, and a µs of client
# work costs five or more with 32 client processes on two cores); it falls back to
# get_flow for anything that must be fetched or refreshed.

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
