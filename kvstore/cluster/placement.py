"""The placement: which nodes hold each shard of each table, kept in etcd, changed by CAS.

One JSON document at ``/kvstore/<cluster>/placement`` (kvstore.cluster.etcd)::

    {"epoch": 7,                          bumped by every change
     "nodes": ["n1", "n2"],               the nodes that take shards (joined, not drained)
     "last_schema_id": 3,                 schema ids are cluster-wide and never reused
     "cluster_uuid": "9f…",               made at the first join: a node keeps it in its
                                          data dir (kvstore.cluster.identity)
     "tables": {"user_features": {
         "schema": {...},                 TableSchema.to_json(), with its schema id
         "version": 0,                    the current bulk version (0: none yet)
         "next_version": 1,               the number the next bulk load gets
         "replicas": 2,                   copies of each shard, on distinct nodes
         "write_quorum": 0,               replicas a write must reach (0: a majority)
         "shards": [[{"node": "n1", "state": "Available"}], ...]}}}
                                          (an Initializing replica also has "source":
                                          the node it copies from, and "attempt" once
                                          a hand-over of it was given up)

Every shard has a list of replicas (the table's ``replicas`` of them, on distinct nodes,
one more while a move is in flight); a replica
is ``Initializing`` (being filled: a move's target), ``Available`` (serving) or
``Leaving`` (a move's source, until the target is Available). The document changes
only through ``PlacementStore.update``: read it with its mod revision, apply a pure
function (kvstore.cluster.assignment has them), write it back with the epoch bumped if
the mod revision is still the one read, else read again and retry. So concurrent
changes all apply, one after the other, and every node sees epochs only increase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from kvstore.cluster.etcd import RETRY_INTERVAL_S, Etcd, watch_range
from kvstore.errors import AlreadyExists, TableNotFound, Unavailable
from kvstore.schema import TableSchema

__all__ = [
    "Placement",
    "PlacementStore",
    "Replica",
    "ShardState",
    "TablePlacement",
    "watch_placement",
]

log = logging.getLogger(__name__)

# How long an update keeps trying through lost etcd connections and CAS conflicts (s).
UPDATE_DEADLINE_S = 10.0


class ShardState(StrEnum):
    INITIALIZING = "Initializing"
    AVAILABLE = "Available"
    LEAVING = "Leaving"


@dataclass(frozen=True)
class Replica:
    """One copy of a shard on a node; an Initializing one names the node it copies from,
    and its ``attempt`` (bumped when the source gives a hand-over up: a finish of an
    earlier attempt is then refused)."""

    node: str
    state: ShardState = ShardState.AVAILABLE
    source: str = ""
    attempt: int = 0

    def to_json(self) -> dict:
        doc: dict = {"node": self.node, "state": self.state.value}
        if self.source:
            doc["source"] = self.source
        if self.attempt:
            doc["attempt"] = self.attempt
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> Replica:
        return cls(
            doc["node"], ShardState(doc["state"]), doc.get("source", ""), doc.get("attempt", 0)
        )


@dataclass(frozen=True)
class TablePlacement:
    """A table's schema (as the node stores it), current version and shards' replicas."""

    schema: Mapping
    version: int = 0
    shards: tuple[tuple[Replica, ...], ...] = ()
    #: The number the next bulk load of the table gets (never reused, even by a load
    #: that failed: a node may hold that load's files until it tidies up).
    next_version: int = 1
    #: Copies of each shard, on distinct nodes (docs/cluster.md, "Replicas").
    replicas: int = 1
    #: Replicas a write must reach before the client acknowledges it (0: a majority).
    write_quorum: int = 0

    @property
    def name(self) -> str:
        return self.schema["name"]

    @property
    def quorum(self) -> int:
        """The write quorum: as set, else a majority of the replicas (R // 2 + 1)."""
        return self.write_quorum or self.replicas // 2 + 1

    def table_schema(self) -> TableSchema:
        return TableSchema.from_json(dict(self.schema))

    def with_shard(self, shard: int, replicas: tuple[Replica, ...]) -> TablePlacement:
        shards = list(self.shards)
        shards[shard] = replicas
        return replace(self, shards=tuple(shards))


@dataclass(frozen=True)
class Placement:
    """The whole placement document; an empty one (epoch 0) before the first change."""

    epoch: int = 0
    nodes: tuple[str, ...] = ()
    last_schema_id: int = 0
    tables: Mapping[str, TablePlacement] = field(default_factory=dict)
    cluster_uuid: str = ""

    def with_table(self, table: TablePlacement) -> Placement:
        return replace(self, tables={**self.tables, table.name: table})

    def table(self, name: str) -> TablePlacement:
        try:
            return self.tables[name]
        except KeyError:
            raise TableNotFound(f"table {name!r} is not in the cluster's placement") from None

    def replicas_on(self, node: str) -> list[tuple[str, int, Replica]]:
        """(table, shard, replica) of every replica ``node`` holds, in table, shard order."""
        return [
            (name, shard, replica)
            for name, table in sorted(self.tables.items())
            for shard, replicas in enumerate(table.shards)
            for replica in replicas
            if replica.node == node
        ]

    def held_by(self, node: str) -> frozenset[tuple[str, int]]:
        """The (table, shard) pairs ``node`` must have open: a replica in any state
        (Initializing: being filled; Available: serving; Leaving: serving until its
        move's target is Available). A node diffs this between epochs to open and close
        shards."""
        return frozenset((name, shard) for name, shard, _ in self.replicas_on(node))

    def to_json(self) -> bytes:
        doc = {
            "epoch": self.epoch,
            "nodes": list(self.nodes),
            "last_schema_id": self.last_schema_id,
            "cluster_uuid": self.cluster_uuid,
            "tables": {
                name: {
                    "schema": dict(table.schema),
                    "version": table.version,
                    "next_version": table.next_version,
                    "replicas": table.replicas,
                    "write_quorum": table.write_quorum,
                    "shards": [
                        [replica.to_json() for replica in replicas] for replicas in table.shards
                    ],
                }
                for name, table in sorted(self.tables.items())
            },
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Placement:
        doc = json.loads(data)
        tables = {
            name: TablePlacement(
                schema=table["schema"],
                version=table["version"],
                next_version=table.get("next_version", table["version"] + 1),
                replicas=table.get("replicas", 1),
                write_quorum=table.get("write_quorum", 0),
                shards=tuple(
                    tuple(Replica.from_json(r) for r in replicas) for replicas in table["shards"]
                ),
            )
            for name, table in doc["tables"].items()
        }
        return cls(
            doc["epoch"],
            tuple(doc["nodes"]),
            doc["last_schema_id"],
            tables,
            doc.get("cluster_uuid", ""),
        )


class PlacementStore:
    """The placement document in etcd: read, compare-and-swap update, create table."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def read(self) -> tuple[Placement, int]:
        """The placement and its etcd mod revision (an empty placement and 0 if none yet)."""
        entry = await self.etcd.get(self.etcd.keys.placement)
        if entry is None:
            return Placement(), 0
        return Placement.from_json(entry.value), entry.mod_revision

    async def update(
        self, change: Callable[[Placement], Placement], deadline_s: float = UPDATE_DEADLINE_S
    ) -> Placement:
        """Apply ``change`` (a pure function, called again on conflict) by compare-and-swap.

        Returns the placement written, with its epoch one above the one it replaced; or
        the one read, unchanged, when ``change`` returned it equal. Errors raised by
        ``change`` propagate. While etcd is unreachable the update waits and retries
        for ``deadline_s`` seconds, then raises Unavailable naming etcd's URL.
        """
        key = self.etcd.keys.placement
        tx = self.etcd.client.transactions
        deadline = time.monotonic() + deadline_s
        conflicts = 0
        while True:
            try:
                current, revision = await self.read()
                changed = change(current)
                if changed == current:
                    return current
                changed = replace(changed, epoch=current.epoch + 1)
                with self.etcd.calls("writing the placement"):
                    swapped, _ = await self.etcd.client.transaction(
                        compare=[tx.mod(key) == revision],
                        success=[tx.put(key, changed.to_json())],
                        failure=[],
                    )
                if swapped:
                    return changed
                conflicts += 1  # another node changed it first: read again
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"the placement in etcd at {self.etcd.url} changed under this update "
                        f"{conflicts} times in {deadline_s:g} s; try again"
                    )
            except Unavailable:
                if time.monotonic() + RETRY_INTERVAL_S > deadline:
                    raise
                await asyncio.sleep(RETRY_INTERVAL_S)

    async def create_table(
        self,
        schema: TableSchema,
        among: Collection[str] | None = None,
        replicas: int = 1,
        write_quorum: int = 0,
        zones: Mapping[str, str] | None = None,
    ) -> TablePlacement:
        """Add ``schema``'s table, its shards spread over the nodes (only those of them
        in ``among``, e.g. the live ones, when given and not disjoint); the placed table.
        Each shard gets ``replicas`` copies on distinct nodes (in distinct ``zones``,
        node id → zone, where there are enough); ``write_quorum`` 0 means a majority.

        The same definition twice is no error (the table is returned as placed). Of two
        concurrent creates with different definitions one wins and the other raises
        AlreadyExists. The table gets the next cluster-wide schema id.
        """
        from kvstore.cluster.assignment import place_table  # assignment imports this module

        def change(placement: Placement) -> Placement:
            existing = placement.tables.get(schema.name)
            if existing is not None:
                if existing.table_schema().same_definition(schema):
                    return placement
                raise AlreadyExists(
                    f"table {schema.name!r} already exists in cluster "
                    f"{self.etcd.keys.cluster!r} with another schema: "
                    f"{json.dumps(existing.schema['features'])}, "
                    f"{existing.schema['shards']} shards, key {existing.schema['key']}"
                )
            schema_id = placement.last_schema_id + 1
            nodes = placement.nodes
            live = tuple(n for n in nodes if among is None or n in among)
            placed = place_table(
                replace(placement, last_schema_id=schema_id, nodes=live or nodes),
                schema.with_id(schema_id),
                replicas,
                write_quorum,
                zones,
            )
            return replace(placed, nodes=nodes)

        placed = await self.update(change)
        return placed.tables[schema.name]

    async def drop_table(self, name: str) -> Placement:
        """Remove table ``name`` from the placement (TableNotFound if absent); the
        placement written. Its schema id is not reused. A retry inside the update (a
        lost answer to the write that removed it) finds it gone: that is success."""
        seen = False

        def change(placement: Placement) -> Placement:
            nonlocal seen
            if seen and name not in placement.tables:
                return placement  # this drop's own earlier write landed
            placement.table(name)  # TableNotFound
            seen = True
            tables = {n: t for n, t in placement.tables.items() if n != name}
            return replace(placement, tables=tables)

        return await self.update(change)

    async def allocate_version(self, name: str) -> int:
        """The number of a new bulk version of table ``name``, taken by CAS: two
        concurrent loads get two numbers."""
        taken = 0

        def change(placement: Placement) -> Placement:
            nonlocal taken
            table = placement.table(name)
            taken = max(table.next_version, table.version + 1)
            return placement.with_table(replace(table, next_version=taken + 1))

        await self.update(change)
        return taken

    async def set_version(self, name: str, version: int) -> Placement:
        """Make ``version`` the current bulk version of table ``name`` (a load's commit,
        or a rollback): one CAS, which every node follows; the placement written."""

        def change(placement: Placement) -> Placement:
            table = placement.table(name)
            next_version = max(table.next_version, version + 1)
            return placement.with_table(replace(table, version=version, next_version=next_version))

        return await self.update(change)

    async def join(
        self, node: str, sizes: Mapping[tuple[str, int], int] | None = None
    ) -> Placement:
        """Add ``node`` to the nodes that take shards (no-op if it is one: a restart
        moves nothing): new tables spread over it, and it takes its share of the
        existing shards (``assignment.join``: the moves, as Initializing replicas on it,
        balanced by count, then by ``sizes``: bytes per (table, shard), as in
        kvstore.cluster.sizes). The first join gives the placement its cluster uuid."""
        from kvstore.cluster.assignment import join  # assignment imports this module

        def change(placement: Placement) -> Placement:
            if node in placement.nodes and placement.cluster_uuid:
                return placement
            if node not in placement.nodes:
                placement = join(placement, node, sizes=sizes or {})
            return replace(placement, cluster_uuid=placement.cluster_uuid or uuid.uuid4().hex)

        return await self.update(change)


async def watch_placement(etcd: Etcd) -> AsyncIterator[Placement]:
    """Yield the placement now (if any) and every newer one (by epoch).

    Survives etcd outages: nothing is yielded while etcd is lost, so a node serves with
    the last placement. A placement missing from etcd, or with an older epoch (an etcd
    restored from an old backup), is logged and not yielded.
    """
    key = etcd.keys.placement
    epoch = -1
    async for state in watch_range(etcd, key, prefix=False):
        entry = state.get(key)
        if entry is None:
            if epoch >= 0:
                log.warning(
                    "the placement is missing from etcd at %s; keeping epoch %d", etcd.url, epoch
                )
            continue
        try:
            placement = Placement.from_json(entry.value)
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            log.error(
                "the placement in etcd at %s is malformed (%s: %s); keeping epoch %d",
                etcd.url,
                type(exc).__name__,
                exc,
                epoch,
            )
            continue
        if placement.epoch <= epoch:
            if placement.epoch < epoch:
                log.warning(
                    "etcd at %s holds placement epoch %d, older than %d; keeping %d",
                    etcd.url,
                    placement.epoch,
                    epoch,
                    epoch,
                )
            continue
        epoch = placement.epoch
        yield placement
