"""The wire layer: what travels between clients, loaders and nodes, in one place.

* ``kvstore.wire.messages``: protobuf messages <-> kvstore's types (schemas, table and
  version descriptions, consumer positions, statistics, the cluster map).
* ``kvstore.wire.frames``: the fast read path's frame headers.
* ``kvstore.wire.dial``: which address to dial and the gRPC channel options.

The protobuf code itself is generated from ``protos/`` into ``kvstore.v1``.
"""
