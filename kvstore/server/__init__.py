"""The storage node: transports (gRPC servicer, fast read path) → Node → reads, writes,
loads → kvstore.storage (tables, shards, RocksDB); app.py runs it, process.py supervises it."""
