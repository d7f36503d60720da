"""gRPC methods of FeatureStore: each only translates between protobuf and the Node.

Errors are mapped to gRPC status codes in exactly one place, ``_translate_errors``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from kvstore import _codec
from kvstore.errors import ERROR_TYPE_KEY, KvstoreError
from kvstore.keys import KeyBatch
from kvstore.server.loads import LoadManager
from kvstore.server.node import Node
from kvstore.storage.table import Table, VersionMeta
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire import schema_from_proto, schema_to_proto

logger = logging.getLogger(__name__)

__all__ = ["FeatureStoreServicer"]

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _translate_errors(method: Handler) -> Handler:
    """Turn a KvstoreError into its status code, anything else into INTERNAL (logged)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except KvstoreError as exc:
            await context.abort(exc.code, str(exc), ((ERROR_TYPE_KEY, type(exc).__name__),))
        except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        except Exception as exc:
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return wrapper


def _table_info(table: Table) -> pb.TableInfo:
    return pb.TableInfo(
        schema=schema_to_proto(table.schema),
        version=table.current,
        rows_estimate=table.estimate_keys(),
        disk_bytes=table.disk_bytes(),
    )


class FeatureStoreServicer(pb_grpc.FeatureStoreServicer):
    def __init__(self, node: Node, loads: LoadManager, advertise_address: str) -> None:
        self.node = node
        self.loads = loads
        self.advertise_address = advertise_address

    @_translate_errors
    async def CreateTable(self, request: pb.CreateTableRequest, context: Any) -> pb.TableInfo:
        return _table_info(self.node.create_table(schema_from_proto(request.schema)))

    @_translate_errors
    async def DescribeTable(self, request: pb.DescribeTableRequest, context: Any) -> pb.TableInfo:
        return _table_info(self.node.table(request.table))

    @_translate_errors
    async def ListTables(
        self, request: pb.ListTablesRequest, context: Any
    ) -> pb.ListTablesResponse:
        tables = [self.node.tables[name] for name in sorted(self.node.tables)]
        return pb.ListTablesResponse(tables=[_table_info(t) for t in tables])

    @_translate_errors
    async def DropTable(self, request: pb.DropTableRequest, context: Any) -> pb.DropTableResponse:
        self.node.drop_table(request.table)
        return pb.DropTableResponse()

    @_translate_errors
    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        table = self.node.table(request.table)
        keys = KeyBatch.from_proto(request.keys, table.schema.key_type, request.table)
        answer = self.node.get(request.table, keys, list(request.features), request.version)
        return pb.GetResponse(
            schema_id=answer.schema_id,
            version=answer.version,
            values=answer.values,
            lengths=answer.lengths.astype("<i4", copy=False).tobytes(),
            order=b"" if answer.order is None else answer.order.astype("<i4").tobytes(),
        )

    @_translate_errors
    async def Write(self, request: pb.WriteRequest, context: Any) -> pb.WriteResponse:
        table = self.node.table(request.table)
        keys = KeyBatch.from_proto(request.keys, table.schema.key_type, request.table)
        offsets = np.frombuffer(request.row_offsets, dtype="<i8")
        written = self.node.write(
            request.table,
            request.schema_id,
            keys,
            request.rows,
            offsets,
            list(request.features),
        )
        return pb.WriteResponse(rows_written=written)

    @_translate_errors
    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        table = self.node.table(request.table)
        keys = KeyBatch.from_proto(request.keys, table.schema.key_type, request.table)
        return pb.DeleteResponse(keys_deleted=self.node.delete(request.table, keys))

    @_translate_errors
    async def GetClusterMap(self, request: pb.GetClusterMapRequest, context: Any) -> pb.ClusterMap:
        # One node owns every shard today; the client is already written against the map.
        node = pb.NodeInfo(node_id=self.node.config.node_id, address=self.advertise_address)
        tables = [
            pb.TableShards(table=name, owner=[0] * t.schema.shards)
            for name, t in sorted(self.node.tables.items())
        ]
        return pb.ClusterMap(epoch=1, nodes=[node], tables=tables)

    # -- bulk loads ------------------------------------------------------------------

    @_translate_errors
    async def BeginLoad(self, request: pb.BeginLoadRequest, context: Any) -> pb.BeginLoadResponse:
        load = self.loads.begin(request.table, request.label, request.snapshot_time_us)
        return pb.BeginLoadResponse(
            load_id=load.load_id, version=load.version, lease_s=self.node.config.load_lease_s
        )

    @_translate_errors
    async def UploadSst(self, request_iterator: Any, context: Any) -> pb.UploadSstResponse:
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
        return pb.UploadSstResponse(files=len(files), bytes=total)

    @_translate_errors
    async def CommitLoad(
        self, request: pb.CommitLoadRequest, context: Any
    ) -> pb.CommitLoadResponse:
        table = self.loads.table_of(request.load_id)
        meta, seconds = self.loads.commit(
            request.load_id, list(request.files_per_shard), request.rows
        )
        return pb.CommitLoadResponse(
            version=_version_info(meta, self.node.table(table).current), ingest_s=seconds
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
        meta = self.node.rollback(request.table, request.to_version)
        return _version_info(meta, self.node.table(request.table).current)


def _version_info(meta: VersionMeta, current: int) -> pb.VersionInfo:
    return pb.VersionInfo(
        version=meta.version,
        label=meta.label,
        snapshot_time_us=meta.snapshot_time_us,
        rows=meta.rows,
        bytes=meta.bytes,
        created_at_us=meta.created_at_us,
        current=meta.version == current,
    )
