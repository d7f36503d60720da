"""Storage: the node's catalog, its tables and their versions, and the RocksDB instance
behind each shard (the one place RocksDB is touched)."""
