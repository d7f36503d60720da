"""Protobuf messages <-> kvstore's own types, for the client, the node and the loader.

Every conversion of a message into a domain value (a schema, a table's or version's
description, a consumer position, the node's statistics, the cluster map) and back
lives here, so each message has one reading and one writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.errors import InvalidArgument
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb

__all__ = [
    "TableInfo",
    "VersionInfo",
    "cluster_map_json",
    "position_proto",
    "schema_from_proto",
    "schema_to_proto",
    "stats_json",
]

_KEY_TYPES = {"int64": pb.KEY_TYPE_INT64, "string": pb.KEY_TYPE_STRING}
_KEY_NAMES = {v: k for k, v in _KEY_TYPES.items()}


def schema_to_proto(schema: TableSchema) -> pb.TableSchema:
    """A table schema as the wire carries it."""
    return pb.TableSchema(
        name=schema.name,
        key_type=_KEY_TYPES[schema.key_type],
        features=[
            pb.Feature(name=f.name, dtype=f.dtype.name, ttl_s=f.ttl_s) for f in schema.features
        ],
        shards=schema.shards,
        schema_id=schema.schema_id,
    )


def schema_from_proto(msg: pb.TableSchema) -> TableSchema:
    """Build and validate a schema from the wire; InvalidArgument names what is wrong."""
    if msg.key_type not in _KEY_NAMES:
        raise InvalidArgument(f"table {msg.name!r}: the key type must be int64 or string")
    return TableSchema.build(
        msg.name,
        _KEY_NAMES[msg.key_type],
        [(f.name, f.dtype) for f in msg.features],
        shards=msg.shards or 8,
        schema_id=msg.schema_id,
        ttl={f.name: f.ttl_s for f in msg.features if f.ttl_s},
    )


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table as the node describes it. ``disk_bytes`` in bytes."""

    schema: TableSchema
    version: int
    rows_estimate: int
    disk_bytes: int

    @classmethod
    def from_proto(cls, msg: pb.TableInfo) -> TableInfo:
        """The table a TableInfo message describes (its schema validated)."""
        return cls(schema_from_proto(msg.schema), msg.version, msg.rows_estimate, msg.disk_bytes)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A bulk version of a table. Times in µs since the epoch, sizes in bytes."""

    version: int
    label: str
    snapshot_time_us: int
    rows: int
    bytes: int
    created_at_us: int
    current: bool
    #: Table format of the version's base shards: "plain" or "block".
    format: str = ""

    @classmethod
    def from_proto(cls, msg: pb.VersionInfo) -> VersionInfo:
        """The version a VersionInfo message describes."""
        return cls(
            msg.version,
            msg.label,
            msg.snapshot_time_us,
            msg.rows,
            msg.bytes,
            msg.created_at_us,
            msg.current,
            msg.format,
        )

    def to_json(self) -> dict:
        """The version as a JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__slots__}


def position_proto(position: Any) -> pb.ConsumerPosition | None:
    """A stream consumer's position as the wire carries it.

    ``position``: None, a ``(consumer, source, partition, offset)`` tuple, or a
    ``ConsumerPosition`` message.
    """
    if position is None or isinstance(position, pb.ConsumerPosition):
        return position
    try:
        consumer, source, partition, offset = position
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"position must be (consumer, source, partition, offset), not {position!r}"
        ) from None
    return pb.ConsumerPosition(
        consumer=str(consumer), source=str(source), partition=int(partition), offset=int(offset)
    )


def cluster_map_json(cmap: pb.ClusterMap) -> dict:
    """The cluster map as plain values: epoch, nodes (as advertised, with zone and
    state), table → owner (node index) per shard, table → current version."""
    return {
        "epoch": cmap.epoch,
        "nodes": [
            {
                "node_id": n.node_id,
                "address": n.address,
                "fast_address": n.fast_address,
                "zone": n.zone,
                "state": n.state or "live",
            }
            for n in cmap.nodes
        ],
        "tables": {t.table: list(t.owner) for t in cmap.tables},
        "versions": {t.table: t.version for t in cmap.tables},
    }


def stats_json(response: pb.StatsResponse) -> dict:
    """The Stats response as plain values (times in µs)."""
    return {
        "uptime_s": response.uptime_s,
        "now_us": response.now_us,
        "block_cache_bytes": response.block_cache_bytes,
        "row_cache_bytes": response.row_cache_bytes,
        "row_cache_capacity_bytes": response.row_cache_capacity_bytes,
        "tables": {
            t.table: {
                "version": t.version,
                "rows_updated": t.rows_updated,
                "keys_deleted": t.keys_deleted,
                "keys_read": t.keys_read,
                "newest_event_time_us": t.newest_event_time_us,
                "newest_event_age_us": t.newest_event_age_us,
                "lag_p50_us": t.lag_p50_us,
                "lag_p99_us": t.lag_p99_us,
                "lag_samples": t.lag_samples,
                "delta_keys_estimate": t.delta_keys_estimate,
            }
            for t in response.tables
        },
    }
