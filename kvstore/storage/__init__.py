"""Storage: the node's catalog of tables and the RocksDB instance behind each shard."""
