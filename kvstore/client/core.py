"""What the sync and async clients share: schemas, the cluster map, request plans, decoding.

A call is planned (which node gets which keys), sent (one RPC per node, by the sync
or async client), then finished here (responses merged into request order and
decoded in one pass by the Cython codec).
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore import _codec
from kvstore.client.health import HedgePolicy, NodeHealth
from kvstore.client.result import GetResult
from kvstore.client.routes import Route, read_choice, route_from_map
from kvstore.columns import EncodedRows
from kvstore.errors import (
    CorruptValue,
    InvalidArgument,
    KvstoreError,
    SchemaChanged,
    StaleMap,
    Unavailable,
)
from kvstore.keys import KeyBatch
from kvstore.schema import Feature, TableSchema
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import resolve_address
from kvstore.wire.frames import STATUS_OK, read_answer

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STALE_SCHEMA",
    "GetPlan",
    "NodeCall",
    "resolve_address",  # kvstore.wire.dial's, for the CLI
]

#: Deadline of every call unless the client or the call says otherwise, in seconds.
DEFAULT_TIMEOUT_S = 5.0

#: What a call raises when the client's cached schema of the table is out of date:
#: describe the table again and retry.
STALE_SCHEMA = (_codec.SchemaMismatch, SchemaChanged)

#: What a call raises when the client's cluster map is out of date: a node refused a
#: shard it does not hold (StaleMap, nothing applied), or could not be reached (it
#: stopped, or restarted on another port). A read's part goes to another replica at
#: once; otherwise the map is refreshed from any node and the call retried.
STALE_ROUTE = (StaleMap, Unavailable)

#: Times a call is retried after a map refresh while the map's epoch keeps rising
#: (moves hand shards over one after another); one retry when it does not rise.
MAX_ROUTE_RETRIES = 8


class Settled(list):
    """Node calls whose outcomes the flow wants one by one: the client sends them all,
    waits for all, and sends back a list of responses with the KvstoreError of each
    call that failed in its place (instead of throwing the first error in).

    ``patience``: the share of the call's timeout the client waits for them; a call not
    answered by then ends with DeadlineExceeded (a write waits for a hung replica in
    rounds, to see between them whether the map marked it out)."""

    def __init__(self, calls: Any = (), patience: float = 1.0) -> None:
        super().__init__(calls)
        self.patience = patience


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


#: What read_once hands back as it is without asking: the common arguments of a get
#: (an isinstance check against the Iterator ABC costs ~0.3 us, twice a get).
_READ_AS_IS = frozenset({list, tuple, np.ndarray, type(None)})


def read_once(values: Any) -> Any:
    """An iterator (a generator, say) as a list, so that a retry sees it whole again."""
    if type(values) in _READ_AS_IS:
        return values
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
        """The serialized GetRequest of ``keys`` at ``version`` (checked: check_version)."""
        check_version(version)
        if keys.ints is not None and keys.count:
            # Written in C, without a protobuf object (the same bytes).
            return _codec.get_request(self.prefix, keys.ints, version)
        rest = pb.GetRequest(version=version)
        keys.fill_proto(rest.keys)  # in place: a Keys message passed in would be copied
        return self.prefix + rest.SerializeToString()


def check_version(version: int) -> None:
    """Refuse a pinned version that is not 0 (the current one) or a version number."""
    # type() first: an ABC isinstance costs ~0.3 µs, on every get.
    if (type(version) is int or isinstance(version, numbers.Integral)) and 0 <= version < 1 << 64:
        return
    raise InvalidArgument(
        f"version must be 0 (the current version) or a bulk version number, got {version!r}"
    )


#: Get plans a client keeps (distinct tables and feature lists); beyond, it starts over.
MAX_GET_PLANS = 256


@dataclass(slots=True)
class NodeCall:
    """One RPC of a batch: the node, the method, the request, its keys' request positions."""

    address: str
    method: str
    request: Any
    positions: np.ndarray | None = None  # None = every key, in order
    #: The shards the call's keys belong to (writes: for the quorum count).
    shards: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class SerializedWrite:
    """A WriteRequest already in its wire form (``data``), for a call whose request
    serializer takes ``data`` (the update stream's), and the map epoch it names."""

    data: bytes
    epoch: int


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: WriteRequest's ``rows`` (4) and ``row_offsets`` (5) field tags, length-delimited.
_ROWS_TAG = b"\x22"
_ROW_OFFSETS_TAG = b"\x2a"


def serialized_write(request: pb.WriteRequest, rows: bytes, offsets: bytes) -> bytes:
    """``request`` with ``rows`` and ``row_offsets`` set, serialized: the two bytes
    fields appended in their wire form (a message's fields may come in any order).
    upb's SerializeToString of a message holding 400 KB of rows took ~200-290 us
    here; this is one copy of them (~12 us)."""
    return b"".join(
        (
            request.SerializeToString(),
            _ROWS_TAG,
            _varint(len(rows)),
            rows,
            _ROW_OFFSETS_TAG,
            _varint(len(offsets)),
            offsets,
        )
    )


WRITE_METHOD = "/kvstore.v1.FeatureStore/Write"


def write_wire(request: pb.WriteRequest | SerializedWrite) -> bytes:
    """A Write call's request serializer: a ``SerializedWrite`` as it is."""
    if isinstance(request, SerializedWrite):
        return request.data
    return request.SerializeToString()


def feature_store_stub(channel: Any) -> pb_grpc.FeatureStoreStub:
    """The FeatureStore stub of ``channel`` (a sync or an asyncio one) whose Write takes
    a request serialized already (``serialized_write``: one copy of the rows)."""
    stub = pb_grpc.FeatureStoreStub(channel)
    stub.Write = channel.unary_unary(
        WRITE_METHOD,
        request_serializer=write_wire,
        response_deserializer=pb.WriteResponse.FromString,
    )
    return stub


class ClientCore:
    """Schemas and the cluster map, cached; plans and finishes batch calls."""

    def __init__(
        self,
        address: str | None,
        timeout: float,
        zone: str = "",
        hedging: HedgePolicy | None = None,
    ) -> None:
        self.seed = resolve_address(address)
        self.timeout = check_timeout(timeout)
        #: The client's zone: reads prefer replicas on nodes of this zone.
        self.zone = zone
        self.schemas: dict[str, TableSchema] = {}
        #: The cached cluster map; read it once per call (it may be swapped meanwhile).
        self.route = Route()
        #: True once a node failed a read that another replica answered: the next call
        #: that runs a flow refreshes the map first (a read does not wait for it).
        self.route_doubted = False
        self.get_plans: dict[tuple, GetPlan] = {}
        #: Calls outstanding and latency per node, the hedge budget.
        self.health = NodeHealth(hedging or HedgePolicy())
        #: address → calls sent to it and not answered yet (the drivers count them).
        self.outstanding = self.health.outstanding
        self.counters = self.health.counters
        #: Ties between equally good replicas go to the node at this offset, so that
        #: one client sends a batch to few nodes and many clients spread over all.
        self.spin = random.randrange(1 << 16)

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
        route = route_from_map(msg, self.seed)
        self.route = route  # one assignment: atomic
        self.route_doubted = False

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

    def forget(self, table: str) -> None:
        self.schemas.pop(table, None)
        self.route = self.route.without(table)

    def _split(
        self, table: str, schema: TableSchema, keys: KeyBatch, avoid: frozenset[str] = frozenset()
    ) -> list[tuple[str, np.ndarray | None]]:
        """Which node gets which key positions of a read; one entry per node with keys.

        Each shard's keys go to one readable replica (``read_choice``), none in ``avoid``
        (nodes that failed this call); NoReplica when a shard has no replica left.
        """
        route = self.route
        owners = route.owners.get(table)
        if owners is None or len(owners) != schema.shards:
            raise KvstoreError(f"no route for table {table!r} in the cluster map")
        readable = route.readable.get(table)
        sole = route.sole.get(table)
        if sole is not None and sole not in avoid:  # one node owns every shard: no hashing
            return [(sole, None)]
        shard_of_key = keys.shard_ids(schema.shards)
        if readable is None or (readable.shape[1] == 1 and not avoid):
            node_of_key = owners[shard_of_key]
        else:
            wanted = np.unique(shard_of_key)
            chosen = read_choice(
                route, table, readable, avoid, self.health, self.zone, self.spin, wanted
            )
            node_of_key = chosen[shard_of_key]
        first = node_of_key[0]
        if node_of_key.size == 1 or (node_of_key == first).all():
            # every key on one node (a 1-key get, always): one request with the keys as
            # they are, no split to take and no merge to undo
            return [(route.nodes[int(first)], None)]
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
        self,
        table: str,
        schema: TableSchema,
        keys: KeyBatch,
        features: list[str],
        version: int = 0,
        avoid: frozenset[str] = frozenset(),
    ) -> list[NodeCall]:
        calls = []
        for address, positions in self._split(table, schema, keys, avoid):
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

    def finish_frame(
        self, table: str, plan: GetPlan, keys: KeyBatch, address: str, status: int, body: bytes
    ) -> GetResult:
        """``finish_one`` of a fast-path answer (its status and body): the GetResponse read
        in C (``_codec.decode_answer``), without a protobuf object; the node's error
        raised as its KvstoreError."""
        if status != STATUS_OK:
            read_answer(status, body)  # raises
        try:
            read = _codec.decode_answer(plan.projection, body, keys.count)
        except _codec.SchemaMismatch:
            raise  # a row of another schema: the caller describes the table again
        except _codec.CorruptRow as exc:  # before ValueError, its base class
            raise CorruptValue(
                f"table {table!r}, key {keys.describe(exc.index)}: the value the node sent "
                f"is corrupt ({exc.reason})"
            ) from None
        except ValueError as exc:
            raise KvstoreError(
                f"table {table!r}: a malformed Get response (part 0 from {address}): {exc}"
            ) from None
        if read is None:  # not what decode_answer reads: protobuf does
            return self.finish_one(table, plan, keys, address, read_answer(status, body))
        schema_id, version, decoded = read
        if decoded is None:
            raise _codec.SchemaMismatch(0, schema_id)
        return GetResult(keys, plan, decoded, version)

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
        only: np.ndarray | None = None,
        acked: Mapping[str, np.ndarray] | None = None,
        shard_ids: np.ndarray | None = None,
        serialized: bool = False,
    ) -> list[NodeCall]:
        """One Write per node holding a writable replica of a shard of ``rows``' keys
        (see ``fan_out``; ``shard_ids``: the keys' shards, when known already;
        ``serialized``: each request a ``SerializedWrite``)."""
        calls = []
        parts: list[bytes] | None = None
        plan = self.fan_out(table, schema, rows.keys, only, acked, shard_ids)
        for address, positions, shards in plan:
            if positions is None:
                keys, buf, offsets = rows.keys, rows.rows, rows.offsets
            else:
                keys = rows.keys.take(positions)
                if parts is None:
                    parts = _codec.split_rows(rows.rows, rows.offsets)
                chosen = [parts[i] for i in positions.tolist()]
                buf = b"".join(chosen)
                offsets = np.zeros(len(chosen) + 1, np.int64)
                np.cumsum([len(p) for p in chosen], out=offsets[1:])
            offset_bytes = offsets.astype("<i8", copy=False).tobytes()
            epoch = self.route.epoch
            request = pb.WriteRequest(
                table=table,
                schema_id=schema.schema_id,
                keys=keys.to_proto(),
                rows=b"" if serialized else buf,
                row_offsets=b"" if serialized else offset_bytes,
                features=rows.features,
                position=position,
                epoch=epoch,
            )
            sent: Any = request
            if serialized:
                sent = SerializedWrite(serialized_write(request, buf, offset_bytes), epoch)
            calls.append(NodeCall(address, "Write", sent, positions, shards))
        return calls

    def fan_out(
        self,
        table: str,
        schema: TableSchema,
        keys: KeyBatch,
        only: np.ndarray | None = None,
        acked: Mapping[str, np.ndarray] | None = None,
        shard_ids: np.ndarray | None = None,
    ) -> list[tuple[str, np.ndarray | None, np.ndarray]]:
        """Where a write of ``keys`` goes: (node, key positions, shards) for every node
        holding a writable replica of one of their shards, skipping nodes the map marks
        down (they catch up from their peers). ``only``: the shards to write (a retry),
        ``acked``: per node, the shards it already applied (not sent again);
        ``shard_ids``: each key's shard, when the caller has it already."""
        route = self.route
        owners = route.owners.get(table)
        writable = route.writable.get(table)
        if owners is None or writable is None or len(owners) != schema.shards:
            raise KvstoreError(f"no route for table {table!r} in the cluster map")
        shard_of_key = keys.shard_ids(schema.shards) if shard_ids is None else shard_ids
        if only is None and acked is None:
            sole = route.sole_writer(table)
            if sole is not None:  # one node takes every write: no per-node masks
                counts = np.bincount(shard_of_key, minlength=schema.shards)
                return [(sole, None, np.flatnonzero(counts))] if len(shard_of_key) else []
        wanted = np.ones(len(shard_of_key), bool)
        if only is not None:
            wanted = np.isin(shard_of_key, only)
        holders = writable[shard_of_key]  # (keys, width)
        out: list[tuple[str, np.ndarray | None, np.ndarray]] = []
        for node in np.unique(holders[holders >= 0]).tolist():
            address = route.nodes[node]
            if not address or (node < len(route.down) and route.down[node]):
                continue
            mask = (holders == node).any(axis=1) & wanted
            if acked is not None and address in acked:
                mask &= ~np.isin(shard_of_key, acked[address])
            if not mask.any():
                continue
            positions = None if mask.all() else np.flatnonzero(mask)
            out.append((address, positions, np.unique(shard_of_key[mask])))
        return out

    def plan_delete(
        self,
        table: str,
        schema: TableSchema,
        keys: KeyBatch,
        event_time_us: int = 0,
        position: pb.ConsumerPosition | None = None,
        only: np.ndarray | None = None,
        acked: Mapping[str, np.ndarray] | None = None,
    ) -> list[NodeCall]:
        """One Delete per node holding a writable replica (see ``fan_out``)."""
        calls = []
        for address, positions, shards in self.fan_out(table, schema, keys, only, acked):
            part = keys if positions is None else keys.take(positions)
            request = pb.DeleteRequest(
                table=table,
                keys=part.to_proto(),
                event_time_us=event_time_us,
                position=position,
                epoch=self.route.epoch,
            )
            calls.append(NodeCall(address, "Delete", request, positions, shards))
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
