"""The node's RocksDB resources: block cache, row cache, and the options every shard
of every table is opened, read and written with.

One object per node, so every shard shares the same caches and the node above it
never builds RocksDB objects itself.
"""

from __future__ import annotations

import rocksdict

from kvstore.config import NodeConfig
from kvstore.storage.shard import base_options, base_read_options, delta_options

__all__ = ["Engine"]


class Engine:
    """Caches and options shared by the shards of one node."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._block_cache = rocksdict.Cache(config.block_cache_bytes)
        #: Hot rows of the base versions (RocksDB's row cache, shared by every base shard).
        self.row_cache = (
            rocksdict.Cache(config.row_cache_bytes) if config.row_cache_bytes > 0 else None
        )
        #: Options of every delta shard.
        self.delta_options = delta_options(self._block_cache, config.bloom_bits_per_key)
        #: Bytes of delta rows each table also keeps in memory at most (DeltaMemory).
        self.delta_memory_bytes = config.delta_memory_bytes
        self._base_options: dict[str, rocksdict.Options] = {}
        #: Read options of every base shard (see ``base_read_options``).
        self.base_read_options = base_read_options(config.verify_base_checksums)
        #: Write options of every delta write (``NodeConfig.sync_writes``).
        self.write_options = rocksdict.WriteOptions()
        self.write_options.sync = config.sync_writes

    def base_options(self, table_format: str) -> rocksdict.Options:
        """The RocksDB options of base shards in ``table_format`` (one object per format,
        sharing the node's block and row caches)."""
        options = self._base_options.get(table_format)
        if options is None:
            options = self._base_options[table_format] = base_options(
                table_format,
                self._block_cache,
                self._config.bloom_bits_per_key,
                self.row_cache,
            )
            reads = self._config.base_reads
            if reads != "mmap":
                # Not a format's option: the files are the same however they are read.
                # PlainTable then holds its index and bloom filter in the node's memory
                # and reads a row with two preads (its key, then its value).
                options.set_allow_mmap_reads(False)
                # RocksDB's default, said here because pread relies on it: every file
                # is opened with POSIX_FADV_RANDOM, so a read that misses the page cache
                # brings in its own pages, not the device's readahead (8 MiB here).
                options.set_advise_random_on_open(True)
                options.set_use_direct_reads(reads == "direct")
        return options

    def cache_usage(self) -> dict[str, int]:
        """Bytes in the block cache and the row cache, and the row cache's capacity."""
        return {
            "block_cache_bytes": self._block_cache.get_usage(),
            "row_cache_bytes": self.row_cache.get_usage() if self.row_cache else 0,
            "row_cache_capacity_bytes": self._config.row_cache_bytes if self.row_cache else 0,
        }
