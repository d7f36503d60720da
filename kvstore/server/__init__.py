"""The storage node: gRPC servicer (wire) → Node (routing) → shards (RocksDB)."""
