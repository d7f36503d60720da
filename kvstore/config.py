"""The one configuration object of a storage node. The CLI and environment only fill it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BASE_FORMATS", "DEFAULT_ADDRESS", "ENV_SETTINGS", "NodeConfig"]

DEFAULT_ADDRESS = "127.0.0.1:7070"
MiB = 1 << 20

#: Table formats of a bulk version's base shards (kvstore.storage.shard.base_options).
BASE_FORMATS = ("plain", "block")


#: The node's settings in the environment: variable → (NodeConfig field, type).
ENV_SETTINGS: dict[str, tuple[str, type]] = {
    "KVSTORE_HOST": ("host", str),
    "KVSTORE_PORT": ("port", int),
    "KVSTORE_FAST_PORT": ("fast_port", int),
    "KVSTORE_DATA": ("data_dir", Path),
    "KVSTORE_COLD_DIR": ("cold_dir", Path),
    "KVSTORE_KEEP_VERSIONS": ("keep_versions", int),
    "KVSTORE_BLOCK_CACHE_BYTES": ("block_cache_bytes", int),
    "KVSTORE_ROW_CACHE_BYTES": ("row_cache_bytes", int),
    "KVSTORE_BASE_FORMAT": ("base_format", str),
    "KVSTORE_MAX_KEYS_PER_REQUEST": ("max_keys_per_request", int),
    "KVSTORE_READ_THREADS": ("read_threads", int),
    "KVSTORE_PARALLEL_READ_KEYS": ("parallel_read_keys", int),
    "KVSTORE_MAX_REQUEST_BYTES": ("max_request_bytes", int),
}


@dataclass
class NodeConfig:
    """Settings of one storage node; the defaults work on a laptop.

    Sizes are in bytes, times in seconds.
    """

    host: str = "127.0.0.1"
    #: 0 picks a free port (tests); the bound port is written to ``port_file`` if set.
    port: int = 7070
    #: Port of the fast read path (Get over plain TCP, docs/fast-path.md): 0 = any free
    #: one (clients learn it from the cluster map), -1 = off.
    fast_port: int = 0
    data_dir: Path = Path("var/kvstore")
    #: Where bulk versions (the base) live: written once, then only read, so it can
    #: sit on cheap QLC flash. Default: ``<data_dir>/cold``.
    cold_dir: Path | None = None
    #: One LRU block cache shared by every shard of every table on the node.
    block_cache_bytes: int = 256 * MiB
    bloom_bits_per_key: float = 10.0
    #: RocksDB's row cache in front of the base versions: hot rows are answered without
    #: an index or block seek. Off by default: it paid off for zipfian keys (100-key p50
    #: 8-18% lower with 64 MiB on 1M rows) but every miss pays an insert and an
    #: eviction, which made uniform keys 24-29% slower (docs/operations.md). 0 = off.
    row_cache_bytes: int = 0
    #: Table format of new bulk versions' base shards: "plain" (RocksDB PlainTable:
    #: hashed keys, mmap, uncompressed; the faster lookups) or "block" (LZ4 blocks
    #: with checksums; smaller when rows compress). Kept versions keep their format.
    base_format: str = "plain"
    #: Verify RocksDB's block checksum on every read of a base version (~18% more CPU
    #: per lookup; the files are checked with crc32 when they are uploaded).
    verify_base_checksums: bool = False
    #: Threads besides the event loop's that read part of a large Get's shards (the
    #: MultiGets release the GIL); default: one fewer than the CPUs, at most 3.
    read_threads: int = max(0, min(3, len(os.sched_getaffinity(0)) - 1))
    #: A Get of at least this many keys is read on several threads.
    parallel_read_keys: int = 256
    #: A Get, Write or Delete naming more keys than this is refused with RequestTooLarge.
    max_keys_per_request: int = 100_000
    #: gRPC's limit on one incoming message; larger ones are refused before parsing.
    max_request_bytes: int = 64 * MiB
    #: Bulk versions kept besides the current one, for rollback and pinned reads.
    keep_versions: int = 2
    #: A bulk load with no upload for this long (seconds) is aborted and its files removed.
    load_lease_s: float = 60.0
    #: Writes with an event time further ahead of the node's clock are refused (seconds).
    max_clock_skew_s: float = 300.0
    #: fsync the WAL before acknowledging a write (survives power loss, not only a crash).
    sync_writes: bool = False
    #: Seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled.
    shutdown_grace_s: float = 5.0
    #: The address clients dial for this node (defaults to host:port as bound).
    advertise_address: str | None = None
    node_id: str = ""
    #: Create and fill the ``demo_users`` table on first start.
    demo: bool = False
    #: Write the bound port here once serving (lets a parent process find port 0).
    port_file: Path | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> NodeConfig:
        """Defaults, then ``KVSTORE_*`` environment variables, then ``overrides`` (not None)."""
        cfg = cls()
        for var, (attr, conv) in ENV_SETTINGS.items():
            if var in os.environ:
                setattr(cfg, attr, conv(os.environ[var]))
        for attr, value in overrides.items():
            if value is not None:
                setattr(cfg, attr, value)
        return cfg

    def load(self) -> None:
        """Derive what follows from the settings: absolute paths, the node id."""
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.cold_dir = Path(self.cold_dir or self.data_dir / "cold").expanduser().resolve()
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}:{self.data_dir}"
        if self.max_keys_per_request < 1:
            raise ValueError("max_keys_per_request must be at least 1")
        if self.keep_versions < 0:
            raise ValueError("keep_versions must be at least 0")
        if self.base_format not in BASE_FORMATS:
            raise ValueError(
                f"base_format {self.base_format!r} is not one of {', '.join(BASE_FORMATS)}"
            )
        if self.verify_base_checksums and self.base_format != "block":
            raise ValueError(
                "verify_base_checksums checks the block checksums of block-format versions; "
                f"new versions would be in the {self.base_format!r} format, which has none: "
                "add --base-format block (KVSTORE_BASE_FORMAT=block)"
            )
        if self.row_cache_bytes < 0:
            raise ValueError("row_cache_bytes must be at least 0")
        if self.read_threads < 0:
            raise ValueError("read_threads must be at least 0")
        if self.parallel_read_keys < 1:
            raise ValueError("parallel_read_keys must be at least 1")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
