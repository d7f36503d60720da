"""Translation between protobuf messages and kvstore's own types, shared by client and node."""

from __future__ import annotations

from kvstore.errors import InvalidArgument
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb

__all__ = ["schema_from_proto", "schema_to_proto"]

_KEY_TYPES = {"int64": pb.KEY_TYPE_INT64, "string": pb.KEY_TYPE_STRING}
_KEY_NAMES = {v: k for k, v in _KEY_TYPES.items()}


def schema_to_proto(schema: TableSchema) -> pb.TableSchema:
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
