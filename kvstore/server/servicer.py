"""gRPC methods of FeatureStore: each only translates between protobuf and the Node.

Errors are mapped to gRPC status codes in exactly one place, ``_abort``: unary methods
through ``_translate_errors``, the CopyShard stream directly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from kvstore import _codec
from kvstore.clock import now_us
from kvstore.errors import InvalidArgument, KvstoreError, error_metadata
from kvstore.keys import KeyBatch
from kvstore.server.loads import LoadStaging
from kvstore.server.node import Node, Position
from kvstore.storage.table import Table, VersionMeta
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.messages import schema_from_proto, schema_to_proto

if TYPE_CHECKING:  # a node without etcd never imports the cluster's modules
    from kvstore.cluster.agent import ClusterAgent
    from kvstore.server.cluster_view import ClusterView
    from kvstore.server.transfer import ShardTransfers

logger = logging.getLogger(__name__)

__all__ = ["FeatureStoreServicer", "get_response"]

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _translate_errors(method: Handler) -> Handler:
    """Turn a KvstoreError into its status code, anything else into INTERNAL (logged)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            await _abort(context, exc, method.__name__)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """End the call with ``exc``'s status (raises); called from the ``except`` that caught
    it, so an unexpected error is logged with its traceback."""
    if isinstance(exc, KvstoreError):
        await context.abort(exc.code, str(exc), error_metadata(exc))
    if isinstance(exc, (_codec.CorruptRow, _codec.SchemaMismatch)):
        await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
    logger.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def get_response(node: Node, request: pb.GetRequest) -> pb.GetResponse:
    """Answer a GetRequest: the one implementation behind gRPC Get and the fast path."""
    table = node.table(request.table)
    keys = KeyBatch.from_proto(request.keys, table.schema.key_type, request.table)
    answer = node.get(request.table, keys, list(request.features), request.version)
    return pb.GetResponse(
        schema_id=answer.schema_id,
        version=answer.version,
        values=answer.values,
        lengths=answer.lengths.astype("<i4", copy=False).tobytes(),
        order=b"" if answer.order is None else answer.order.astype("<i4", copy=False).tobytes(),
    )


def _table_info(table: Table) -> pb.TableInfo:
    return pb.TableInfo(
        schema=schema_to_proto(table.schema),
        version=table.current,
        rows_estimate=table.estimate_keys(),
        disk_bytes=table.disk_bytes(),
    )


class FeatureStoreServicer(pb_grpc.FeatureStoreServicer):
    def __init__(
        self,
        node: Node,
        loads: LoadStaging,
        advertise_address: str,
        fast_address: str = "",
        cluster: ClusterAgent | None = None,
    ) -> None:
        self.node = node
        self.loads = loads
        self.advertise_address = advertise_address
        self.fast_address = fast_address
        #: The node's part in a cluster (--etcd): table changes go through the placement.
        self.cluster = cluster
        #: Held by a write step and over the pass of the event loop after it (``_drive``).
        self._write_turn = asyncio.Lock()

    @_translate_errors
    async def CreateTable(self, request: pb.CreateTableRequest, context: Any) -> pb.TableInfo:
        schema = schema_from_proto(request.schema)
        if self.cluster is None:
            if request.replicas > 1 or request.write_quorum > 1:
                raise InvalidArgument(
                    f"table {schema.name!r}: {request.replicas} replicas (write quorum "
                    f"{request.write_quorum}) need a cluster (kvstore serve --etcd); this "
                    "node runs alone"
                )
            return _table_info(self.node.create_table(schema))
        await self.cluster.create_table(schema, request.replicas, request.write_quorum)
        return _table_info(self.node.table(schema.name))

    async def _catch_up(self, table: str) -> None:
        """In a cluster, a table this node has not seen yet is waited for a moment (it may
        be in a placement epoch its watch is about to deliver)."""
        if self.cluster is not None and table not in self.node.tables:
            await self.cluster.catch_up(table)

    @_translate_errors
    async def DescribeTable(self, request: pb.DescribeTableRequest, context: Any) -> pb.TableInfo:
        await self._catch_up(request.table)
        return _table_info(self.node.table(request.table))

    @_translate_errors
    async def ListTables(
        self, request: pb.ListTablesRequest, context: Any
    ) -> pb.ListTablesResponse:
        tables = [self.node.tables[name] for name in sorted(self.node.tables)]
        return pb.ListTablesResponse(tables=[_table_info(t) for t in tables])

    @_translate_errors
    async def DropTable(self, request: pb.DropTableRequest, context: Any) -> pb.DropTableResponse:
        if self.cluster is None:
            self.node.drop_table(request.table)
        else:
            await self.cluster.drop_table(request.table)
        return pb.DropTableResponse()

    @_translate_errors
    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        if self.cluster is not None:  # alone, a Get costs what it did
            await self._catch_up(request.table)
        return get_response(self.node, request)

    async def _write(self, request: pb.WriteRequest) -> int:
        if self.cluster is not None:  # alone, a write costs what it did (no await)
            await self._catch_up(request.table)
        table = self.node.table(request.table)
        keys = KeyBatch.from_proto(request.keys, table.schema.key_type, request.table)
        steps = self.node.write_steps(
            request.table,
            request.schema_id,
            keys,
            request.rows,
            np.frombuffer(request.row_offsets, dtype="<i8"),
            list(request.features),
            _position(request),
            request.epoch,
        )
        return await _drive(steps, self._write_turn)

    @_translate_errors
    async def Write(self, request: pb.WriteRequest, context: Any) -> pb.WriteResponse:
        return pb.WriteResponse(rows_written=await self._write(request))

    async def UpdateStream(self, request_iterator: Any, context: Any) -> Any:
        """One ack per request, in order, once it is durable; an error ends the stream
        (the acks before it stand)."""
        seq = 0
        try:
            async for request in request_iterator:
                seq += 1
                written = await self._write(request)
                yield pb.WriteAck(seq=seq, rows_written=written)
        except KvstoreError as exc:
            await context.abort(
                exc.code,
                f"update {seq} of the stream: {exc}",
                error_metadata(exc),
            )
        except Exception as exc:
            logger.exception("UpdateStream failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    @_translate_errors
    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        if self.cluster is not None:
            await self._catch_up(request.table)
        table = self.node.table(request.table)
        keys = KeyBatch.from_proto(request.keys, table.schema.key_type, request.table)
        steps = self.node.delete_steps(
            request.table, keys, request.event_time_us, _position(request), request.epoch
        )
        return pb.DeleteResponse(keys_deleted=await _drive(steps, self._write_turn))

    @_translate_errors
    async def GetConsumerPositions(
        self, request: pb.ConsumerPositionsRequest, context: Any
    ) -> pb.ConsumerPositionsResponse:
        found = self.node.consumer_positions(request.table, request.consumer, request.source)
        return pb.ConsumerPositionsResponse(
            positions=[
                pb.ConsumerPosition(
                    consumer=request.consumer, source=request.source, partition=p, offset=o
                )
                for p, o in found.items()
            ]
        )

    @_translate_errors
    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        now = now_us()
        tables = []
        for name in sorted(self.node.tables):
            table = self.node.tables[name]
            stats = self.node.table_stats(name)
            p50, p99, samples = stats.lag_percentiles()
            newest = stats.newest_event_time_us
            tables.append(
                pb.TableStats(
                    table=name,
                    version=table.current,
                    rows_updated=stats.rows_updated,
                    keys_deleted=stats.keys_deleted,
                    keys_read=stats.keys_read,
                    newest_event_time_us=newest,
                    newest_event_age_us=now - newest if newest else 0,
                    lag_p50_us=p50,
                    lag_p99_us=p99,
                    lag_samples=samples,
                    delta_keys_estimate=sum(s.estimate_keys() for s in table.delta),
                )
            )
        return pb.StatsResponse(
            uptime_s=time.monotonic() - self.node.started,
            tables=tables,
            now_us=now,
            **self.node.cache_usage(),
        )

    @_translate_errors
    async def GetClusterMap(self, request: pb.GetClusterMapRequest, context: Any) -> pb.ClusterMap:
        if self.cluster is not None:
            return _cluster_map(self.cluster.view)
        # Alone, the node owns every shard; the client is written against the map all the same.
        node = pb.NodeInfo(
            node_id=self.node.config.node_id,
            address=self.advertise_address,
            fast_address=self.fast_address,
            zone=self.node.config.zone,
            state="live",
        )
        tables = [
            pb.TableShards(
                table=name,
                owner=[0] * t.schema.shards,
                version=t.current,
                replica_count=1,
                write_quorum=1,
            )
            for name, t in sorted(self.node.tables.items())
        ]
        return pb.ClusterMap(epoch=1, nodes=[node], tables=tables)

    # -- moves (docs/cluster.md, "Moves") ---------------------------------------------

    def _transfers(self) -> ShardTransfers:
        if self.cluster is None:
            raise InvalidArgument("this node runs alone (no --etcd): it moves no shard")
        return self.cluster.transfers

    async def CopyShard(self, request: pb.CopyShardRequest, context: Any) -> Any:
        try:
            transfers = self._transfers()
            async for chunk in transfers.copy(request.table, request.shard, request.target):
                yield chunk
        except Exception as exc:  # a stream: _translate_errors wraps unary methods only
            await _abort(context, exc, "CopyShard")

    @_translate_errors
    async def ShardChanges(
        self, request: pb.ShardChangesRequest, context: Any
    ) -> pb.ShardChangesResponse:
        transfers = self._transfers()
        table, shard, log_id = request.table, request.shard, request.log_id
        if request.release:
            transfers.release(table, shard, log_id)
            return pb.ShardChangesResponse()
        if request.seal:
            changes, seq = await transfers.seal(table, shard, log_id, request.since)
        else:
            changes, seq = transfers.changes(table, shard, log_id, request.since)
        return pb.ShardChangesResponse(
            changes=[
                pb.ShardChange(
                    seq=number,
                    put_keys=[k for k, _ in puts],
                    put_values=[v for _, v in puts],
                    delete_keys=deletes,
                )
                for number, puts, deletes in changes
            ],
            seq=seq,
            sealed=request.seal,
        )

    @_translate_errors
    async def DrainNode(self, request: pb.DrainNodeRequest, context: Any) -> pb.DrainNodeResponse:
        if self.cluster is None:
            raise InvalidArgument("this node runs alone (no --etcd): there is nothing to drain")
        placement = await self.cluster.drain(request.node_id)
        moving = len(placement.replicas_on(request.node_id))
        return pb.DrainNodeResponse(epoch=placement.epoch, moving=moving)

    # -- bulk loads ------------------------------------------------------------------

    @_translate_errors
    async def BeginLoad(self, request: pb.BeginLoadRequest, context: Any) -> pb.BeginLoadResponse:
        version = request.version
        # A loader may reach this node right after the table was created on another
        # (its watch a moment behind): wait for it as Get and Write do.
        await self._catch_up(request.table)
        if self.cluster is not None and not version:
            # One number for the version on every node: allocated in the placement.
            version = await self.cluster.allocate_version(request.table)
        load = self.loads.begin(
            request.table, request.label, request.snapshot_time_us, request.schema_id, version
        )
        return pb.BeginLoadResponse(
            load_id=load.load_id,
            version=load.version,
            lease_s=self.node.config.load_lease_s,
            base_format=load.table_format,
            clustered=self.cluster is not None,
        )

    @_translate_errors
    async def UploadShardFile(
        self, request_iterator: Any, context: Any
    ) -> pb.UploadShardFileResponse:
        files: set[tuple[int, str]] = set()
        total = 0
        async for chunk in request_iterator:
            self.loads.upload(
                chunk.load_id,
                chunk.shard,
                chunk.file_name,
                chunk.offset,
                chunk.data,
                chunk.last,
                chunk.file_size,
                chunk.crc32,
            )
            files.add((chunk.shard, chunk.file_name))
            total += len(chunk.data)
        return pb.UploadShardFileResponse(files=len(files), bytes=total)

    @_translate_errors
    async def CommitLoad(
        self, request: pb.CommitLoadRequest, context: Any
    ) -> pb.CommitLoadResponse:
        table = self.loads.table_of(request.load_id)
        meta, seconds = self.loads.commit(
            request.load_id,
            list(request.files_per_shard),
            request.rows,
            list(request.rows_per_shard),
            request.stage,
        )
        return pb.CommitLoadResponse(
            version=_version_info(meta, self.node.table(table).current),
            ingest_s=seconds,
            cold_bytes_written=meta.bytes,
        )

    @_translate_errors
    async def AbortLoad(self, request: pb.AbortLoadRequest, context: Any) -> pb.AbortLoadResponse:
        self.loads.abort(request.load_id)
        return pb.AbortLoadResponse()

    @_translate_errors
    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Any
    ) -> pb.ListVersionsResponse:
        table = self.node.table(request.table)
        return pb.ListVersionsResponse(
            versions=[_version_info(m, table.current) for _, m in sorted(table.versions.items())]
        )

    @_translate_errors
    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.VersionInfo:
        if self.cluster is not None:
            # Cluster-wide: the placement names the kept version, every node follows.
            target = self.node.table(request.table).entry.rollback_target(request.to_version)
            meta = await self.cluster.publish_version(request.table, target)
        else:
            meta = self.node.rollback(request.table, request.to_version)
        return _version_info(meta, self.node.table(request.table).current)

    @_translate_errors
    async def PublishVersion(
        self, request: pb.PublishVersionRequest, context: Any
    ) -> pb.VersionInfo:
        if self.cluster is not None:
            meta = await self.cluster.publish_version(request.table, request.version)
        else:
            meta = self.node.publish_version(request.table, request.version)
        return _version_info(meta, self.node.table(request.table).current)


async def _drive(steps: Generator[Any, None, int], turn: asyncio.Lock) -> int:
    """Run a write or delete, letting other calls (reads above all) run between its steps;
    a step that yields a future (a shard sealed by a move's hand-over) waits for it.

    A step holds ``turn`` (the servicer's one lock) while it runs and over the next pass
    of the event loop: writes in flight take turns, at most one step a pass, so a read
    that arrives waits for one step at most, not one step of every write in flight (n
    writes, each ready after its step, ran n steps in one pass). The lock is fair:
    the turns go round in the order the writes asked for them.
    """
    while True:
        async with turn:
            try:
                waited = next(steps)
            except StopIteration as done:
                return done.value
            if waited is None:
                await asyncio.sleep(0)  # the pass in which reads run, other writes wait
                continue
        # Without the turn (the other writes go on); shielded: a cancelled write must not
        # end the seal for the others.
        await asyncio.shield(waited)


def _position(request: pb.WriteRequest | pb.DeleteRequest) -> Position | None:
    if not request.HasField("position"):
        return None
    p = request.position
    return Position(p.consumer, p.source, p.partition, p.offset)


def _cluster_map(view: ClusterView) -> pb.ClusterMap:
    """The cluster map of ``view``: the placement's nodes and the live ones, each
    shard's owner (first Available, else Leaving replica) and all its replicas."""
    from kvstore.server.cluster_view import shard_owners

    placement = view.placement
    holders = {r.node for t in placement.tables.values() for rs in t.shards for r in rs}
    ids = sorted(set(placement.nodes) | view.live | holders)
    index = {node_id: i for i, node_id in enumerate(ids)}
    nodes = []
    for node_id in ids:
        info = view.known.get(node_id)
        nodes.append(
            pb.NodeInfo(
                node_id=node_id,
                address=info.address if info else "",
                fast_address=info.fast_address if info else "",
                zone=info.zone if info else "",
                state="live" if node_id in view.live else "down",
            )
        )
    tables = []
    for name, table in sorted(placement.tables.items()):
        owners = shard_owners(placement, name)
        tables.append(
            pb.TableShards(
                table=name,
                owner=[index[o] if o else 0 for o in owners],
                version=table.version,
                replica_count=table.replicas,
                write_quorum=table.quorum,
                replicas=[
                    pb.ShardReplicas(
                        node=[index[r.node] for r in replicas],
                        state=[r.state.value for r in replicas],
                    )
                    for replicas in table.shards
                ],
            )
        )
    return pb.ClusterMap(epoch=placement.epoch, nodes=nodes, tables=tables)


def _version_info(meta: VersionMeta, current: int) -> pb.VersionInfo:
    return pb.VersionInfo(
        version=meta.version,
        label=meta.label,
        snapshot_time_us=meta.snapshot_time_us,
        rows=meta.rows,
        bytes=meta.bytes,
        created_at_us=meta.created_at_us,
        current=meta.version == current,
        format=meta.format,
    )
