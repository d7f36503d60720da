"""One shard of a table's delta or of one bulk version: a RocksDB instance (rocksdict, raw mode).

The partition interface is small on purpose (after Venice's AbstractStoragePartition):
batched get, batched write of puts and deletes, scans, size estimates, close. The
RocksDB options of each kind of shard live here too: the delta's, a base version's
in each table format (``BASE_FORMATS``), and the loader's (``build_options``), so a
database the loader builds opens on the node exactly as it was written.

It is also where RocksDB's errors become kvstore's, in one place
(``_raise_for_status``, after plyvel's ``raise_for_status``): rocksdict raises a plain
``Exception`` carrying RocksDB's status text, which nothing above the shard reads.
Damaged data is a ``CorruptValue`` naming table and shard; any other failure is the
node's own and goes up unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import rocksdict

from kvstore.config import BASE_FORMATS
from kvstore.errors import CorruptValue
from kvstore.storage.delta_memory import DeltaMemory

logger = logging.getLogger(__name__)

SYSTEM_PREFIX = b"\xff\xfe"

__all__ = [
    "BUILD_FILE_BYTES",
    "SYSTEM_PREFIX",
    "Shard",
    "base_options",
    "base_read_options",
    "build_options",
    "create_empty_base",
    "delta_options",
    "files_bytes",
    "rocksdb_options",
]

#: Keys the node keeps for itself (consumer positions) start with these two bytes:
#: 0xFF never occurs in UTF-8, and they are longer than the 8 bytes of an int64 key,
#: so no row key can be one.

#: How RocksDB's status text begins when data it read is damaged (a checksum
#: mismatch, a truncated block or file).
_DAMAGED = ("Corruption",)
#: ... and when the files of a base shard cannot be opened as a base at all: damaged,
#: missing (no CURRENT, a lost table file), or not of the format's options.
_UNUSABLE = ("Corruption", "Invalid argument", "Not implemented", "IO error: No such file")


def rocksdb_options(
    cache: rocksdict.Cache,
    bloom_bits_per_key: float = 10.0,
    mmap_reads: bool = False,
    row_cache: rocksdict.Cache | None = None,
    pin_l0: bool = True,
    block_bytes: int | None = None,
) -> rocksdict.Options:
    """Options for a point-lookup shard: bloom filter, the node's shared block cache, LZ4.

    ``mmap_reads`` suits the immutable base versions: their files are never rewritten,
    and reading them through the mapping instead of pread was ~17% faster a lookup
    here (125k rows of 420 B, multi-gets of 125 keys: 2.06 -> 1.69 us a key).
    ``pin_l0``: keep level-0 files' index and filter blocks pinned in the block cache
    (the delta's few young files; a base's files all sit in level 0, for good).
    ``block_bytes``: the uncompressed size of a data block (None: RocksDB's 4 KiB).
    """
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    # rocksdict's stub says int; it takes the bits as a float (RocksDB's double).
    table.set_bloom_filter(bloom_bits_per_key, False)  # type: ignore[arg-type]
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(pin_l0)
    if block_bytes is not None:
        table.set_block_size(block_bytes)
    opts.set_block_based_table_factory(table)
    opts.set_compression_type(rocksdict.DBCompressionType.lz4())
    opts.set_max_background_jobs(2)
    opts.set_keep_log_file_num(2)
    if mmap_reads:
        opts.set_allow_mmap_reads(True)
    if row_cache is not None:
        opts.set_row_cache(row_cache)
    return opts


#: Buckets of a delta shard's memtable hash (8 bytes each: 512 KiB a memtable).
DELTA_MEMTABLE_BUCKETS = 1 << 16
#: The memtable's whole-key bloom filter, as a share of the 64 MiB write buffer: RocksDB
#: allocates it whole when a memtable is made, so 0.1 cost 6.4 MiB per shard resident
#: from the start (58 MiB for an empty 8-shard table). 0.01 is 5.4M bits: ~8 bits a key
#: for 100-byte rows filling the memtable, more for larger rows.
DELTA_MEMTABLE_BLOOM_RATIO = 0.01


def delta_options(cache: rocksdict.Cache, bloom_bits_per_key: float = 10.0) -> rocksdict.Options:
    """Options of a delta shard: ``rocksdb_options`` with a memtable made for point lookups.

    Online rows sit in the memtable until it fills (64 MiB), so that is where the reads
    of fresh rows go. RocksDB's default memtable is a skiplist: py-spy put ~40% of a
    delta MultiGet in its Seek and key compares. A hash of each whole key (RocksDB's
    hash-linklist memtable: the prefix extractor keeps the whole key, up to 128 bytes)
    to a short list, and a bloom filter of whole keys in front of it (a key the delta
    lacks is the common case of a read), measured in-process (loadtests.tiers, 100-key
    reads, 8 shards, 60k rows): delta MultiGets of keys it holds 162 -> 86 us, of
    keys it lacks 63 -> 44 us.

    The prefix extractor makes an iterator see one prefix only, unless it is opened
    with ``total_order_seek`` (``Shard`` does, for its scans). Writes are applied by
    one thread (the event loop), so the memtable's lack of concurrent inserts costs
    nothing. Table files keep the block-based format: a delta written before these
    options reads the same.
    """
    opts = rocksdb_options(cache, bloom_bits_per_key)
    opts.set_prefix_extractor(rocksdict.SliceTransform.create_max_len_prefix(128))
    opts.set_allow_concurrent_memtable_write(False)
    # rocksdict's stub omits the bucket count, which the function takes.
    buckets = DELTA_MEMTABLE_BUCKETS
    opts.set_memtable_factory(rocksdict.MemtableFactory.hash_link_list(buckets))  # type: ignore[call-arg]
    opts.set_memtable_prefix_bloom_ratio(DELTA_MEMTABLE_BLOOM_RATIO)
    opts.set_memtable_whole_key_filtering(True)
    return opts


# Table formats of a bulk version's base shards (BASE_FORMATS, NodeConfig.base_format).
# A format name stands for its options below for good: files carry them (PlainTable
# files refuse to open under another prefix extractor), and the catalog records only
# the name, so a change of them is a new format name, not an edit.
# * ``plain``: RocksDB's PlainTable, made for point lookups in memory-mapped files: a
#   hash of each whole key (its first 128 bytes for longer string keys) to its offset, a bloom
#   filter, rows stored uncompressed. Measured against ``block`` on the benchmark's
#   1M-row table (docs/architecture.md): 100-key Gets 441 -> 312 us p50, 1000-key
#   2.23 -> 1.11 ms. No compression and no block checksums.
# * ``block``: RocksDB's block-based table: LZ4-compressed 4 KiB blocks with checksums
#   (``--verify-base-checksums``) and a binary-searched index. Smaller on disk when
#   the rows compress; slower lookups. Versions loaded before formats existed are this.
# * ``zstd``: the block-based table with zstd and a dictionary trained per table file
#   (the loader writes one file per ``BUILD_FILE_BYTES`` of a shard's memtable, so a
#   dictionary per version's shard, as Venice's ZSTD_WITH_DICT has one per version),
#   ``ZSTD_BLOCK_BYTES`` blocks. RocksDB decompresses a block into the block cache
#   when a lookup first needs it: no Python object per row. For rows that compress
#   (small ints, categories, id lists, counters): measured in docs/benchmarks.md.

#: A base shard's memtable is flushed into a file of about this size while it is
#: built (PlainTable files address rows with 32-bit offsets: they must stay < 2 GiB).
BUILD_FILE_BYTES = 256 << 20


#: The ``zstd`` format's options, fixed with its name (files carry them): zstd's level
#: (3, its default; reads decompress as fast whatever the level), the dictionary's size
#: and the sample bytes it is trained on, and the uncompressed size of a block (one is
#: decompressed per lookup that misses the block cache). Measured on 200k rows of the
#: realistic bench table (loadtests/realistic.py, 247 B encoded), one file, B/row on
#: disk and 100-key MultiGets in memory with an 8 MiB block cache: no dictionary 178
#: B/row, ~850 us; a 16 KiB one 168 B/row (-5.5%), ~1,050 us (RocksDB here re-reads the
#: raw dictionary for each block it decompresses); 4 and 64 KiB dictionaries neither
#: smaller nor faster; trained on 10x its size as small as on 100x (zstd's advice for
#: small samples) and ~1.4 s faster to build per 200k rows; 8 and 16 KiB blocks 1-2%
#: smaller, 2-3x slower.
ZSTD_LEVEL = 3
ZSTD_DICT_BYTES = 16 << 10
ZSTD_TRAIN_BYTES = 10 * ZSTD_DICT_BYTES
ZSTD_BLOCK_BYTES = 4 << 10


def base_options(
    table_format: str,
    cache: rocksdict.Cache,
    bloom_bits_per_key: float = 10.0,
    row_cache: rocksdict.Cache | None = None,
) -> rocksdict.Options:
    """Options of a bulk version's base shard in ``table_format`` (see BASE_FORMATS).

    A base is written once, by the loader (``build_options``), and only read after
    that: read through mmap, never compacted. ``cache`` (block format only) is the
    node's block cache; ``row_cache`` the node's optional row cache.
    """
    if table_format in ("block", "zstd"):
        opts = rocksdb_options(
            cache,
            bloom_bits_per_key,
            mmap_reads=True,
            row_cache=row_cache,
            pin_l0=False,
            block_bytes=ZSTD_BLOCK_BYTES if table_format == "zstd" else None,
        )
        if table_format == "zstd":
            opts.set_compression_type(rocksdict.DBCompressionType.zstd())
            # w_bits -14 and strategy 0 are zstd's defaults (RocksDB's too).
            opts.set_compression_options(-14, ZSTD_LEVEL, 0, ZSTD_DICT_BYTES)
            opts.set_zstd_max_train_bytes(ZSTD_TRAIN_BYTES)
    elif table_format == "plain":
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        plain = rocksdict.PlainTableFactoryOptions()
        plain.user_key_length = 0  # variable: string keys
        plain.bloom_bits_per_key = int(bloom_bits_per_key)
        plain.hash_table_ratio = 0.75
        plain.index_sparseness = 1  # an index entry per key: no scan within a bucket
        # The hash index and bloom filter are written into the file when it is built
        # and mapped when it is opened, rather than rebuilt from every key at open
        # (125k rows: 23 -> 4 ms), which would stall the swap and the first read.
        plain.store_index_in_file = True  # type: ignore[attr-defined]  # not in the stub
        opts.set_plain_table_factory(plain)
        # The hash (and the bloom filter) is of the whole key, up to 128 bytes, RocksDB's
        # limit. Measured, 125k rows, 100-key MultiGets: with the first 8 bytes only,
        # string keys sharing them ("user_000…") fell into one bucket (174 us, no faster
        # than the block format's 181) and absent ones passed the filter (156 us
        # against 24); with whole keys, 74 and 22 us.
        opts.set_prefix_extractor(rocksdict.SliceTransform.create_max_len_prefix(128))
        opts.set_allow_mmap_reads(True)  # PlainTable reads rows in place
        opts.set_compression_type(rocksdict.DBCompressionType.none())
        opts.set_keep_log_file_num(2)
        if row_cache is not None:
            opts.set_row_cache(row_cache)
    else:
        raise ValueError(
            f"unknown base table format {table_format!r}; one of {', '.join(BASE_FORMATS)}"
        )
    # Immutable: a compaction would rewrite the cold tier (and stall nothing, as
    # nothing writes), so none ever runs, whatever the number of files.
    opts.set_disable_auto_compactions(True)
    opts.set_level_zero_slowdown_writes_trigger(1 << 30)
    opts.set_level_zero_stop_writes_trigger(1 << 30)
    return opts


def build_options(table_format: str, memtable_bytes: int = BUILD_FILE_BYTES) -> rocksdict.Options:
    """Options the loader writes a base shard with (``ingest.bulk_shard_db.ShardDbWriter``):
    ``base_options``, no need for a block cache, and room for a memtable of twice
    ``memtable_bytes``: the writer flushes it itself when RocksDB's own measure of it
    reaches ``memtable_bytes`` (each flush is one table file), with room to spare
    before RocksDB's limit."""
    opts = base_options(table_format, rocksdict.Cache(1 << 20))
    opts.set_write_buffer_size(2 * memtable_bytes)
    return opts


def create_empty_base(path: Path, options: rocksdict.Options) -> None:
    """An empty database at ``path`` (a base shard that got no row), for read-only use."""
    path.mkdir(parents=True, exist_ok=True)
    rocksdict.Rdict(str(path), options, column_families={"default": options}).close()


def files_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, 0 when it does not exist. A file RocksDB
    deletes meanwhile (a compaction's input, an old WAL) counts as gone, not as an error:
    the sizes reported to the cluster are read while the shards are written."""
    total = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def base_read_options(verify_checksums: bool) -> rocksdict.ReadOptions:
    """Read options of the base versions' shards.

    Their files are read through the memory map. A block that LZ4 could not shrink (the
    benchmark's random floats, most embeddings) is read in place, never cached, so
    RocksDB verifies its checksum (xxh3 of ~4 KiB) on every lookup: py-spy put a third
    of MultiGet's time there for 100-key reads of a 1M-row table, and skipping it took a
    100-key ``get_response`` from 321 to 272 us (verifying costs ~18% more). Compressed
    blocks are decompressed into the block cache and checked once, when they enter it.
    The files were checked when they arrived (crc32 of each uploaded file) and are never
    rewritten, so by default reads skip the per-block check
    (``NodeConfig.verify_base_checksums`` turns it back on).
    """
    read = rocksdict.ReadOptions()
    read.set_verify_checksums(verify_checksums)
    return read


def _raise_for_status(exc: Exception, shard: Shard, doing: str, kinds: tuple[str, ...]) -> None:
    """Raise the kvstore error for RocksDB's failure ``exc`` while ``doing`` (e.g. "read")
    on ``shard``, if its status is one of ``kinds``; else return (the caller re-raises)."""
    if type(exc) is not Exception or not str(exc).startswith(kinds):
        return
    where = f"table {shard.table!r}, shard {shard.index}" if shard.table else f"shard {shard.index}"
    message = f"{where} ({shard.path}): RocksDB could not {doing} it ({exc})"
    logger.error("%s", message)
    raise CorruptValue(message) from exc


class Shard:
    """A RocksDB instance holding the rows of one shard."""

    __slots__ = (
        "_db",
        "_memory_limit",
        "_scan_options",
        "empty",
        "index",
        "memory",
        "on_write",
        "path",
        "recorder",
        "table",
    )

    def __init__(
        self,
        path: Path,
        index: int,
        options: rocksdict.Options,
        read_options: rocksdict.ReadOptions | None = None,
        base: bool = False,
        table: str = "",
        memory_bytes: int = 0,
    ) -> None:
        """Open (or create) the shard at ``path``; ``table`` names it in errors.

        ``memory_bytes`` (a delta shard): keep its rows in memory too while they total
        at most that many bytes (``DeltaMemory``); 0 = never.

        ``base``: a bulk version's immutable shard, opened read-only: it must exist (a
        lost directory or file is an error, never an empty shard), and opening it
        writes no RocksDB file (only rocksdict's small ``rocksdict-config.json``, which
        rocksdict rewrites at every open: the cold directory cannot be mounted
        read-only). Its key count is exact (its files' entries),
        so emptiness is read from that rather than by iterating (PlainTable's hash
        index has no total order). Files RocksDB cannot open as a base (damaged,
        missing, another format) raise CorruptValue.
        """
        self.path = path
        self.index = index
        self.table = table
        #: Called as ``on_write(index, puts, deletes)`` before each write: the node's
        #: hot-row cache forgets those keys (kvstore.server.hot_rows).
        self.on_write: Callable[[int, list, Iterable[bytes]], None] | None = None
        #: Called with every batch applied (puts, deletes), in order, while a move copies
        #: this delta shard to another node (kvstore.server.transfer's change log).
        self.recorder: Callable[[list[tuple[bytes, bytes]], list[bytes]], None] | None = None
        if not base:
            path.mkdir(parents=True, exist_ok=True)
        try:
            # Passing the options per column family is what makes RocksDB use them on
            # reopen; Rdict(path, opts) alone silently falls back to the stored options.
            self._db = rocksdict.Rdict(
                str(path),
                options,
                column_families={"default": options},
                access_type=(
                    rocksdict.AccessType.read_only() if base else rocksdict.AccessType.read_write()
                ),
            )
        except Exception as exc:
            _raise_for_status(exc, self, "open", _UNUSABLE if base else _DAMAGED)
            raise
        if read_options is not None:
            self._db.set_read_options(read_options)
        # Scans see every key in order even under a prefix extractor (delta_options).
        self._scan_options = rocksdict.ReadOptions()
        self._scan_options.set_total_order_seek(True)
        #: The delta's rows in a dict, which reads use instead of RocksDB (None: too
        #: large, or a base shard).
        self.memory: DeltaMemory | None = None
        self._memory_limit = 0 if base else memory_bytes
        self._load_memory()
        #: True while the shard surely holds no key: reads then skip it (a bulk-loaded
        #: table with an empty delta pays for one lookup per key, not two).
        self.empty = self.estimate_keys() == 0 if base else self._first_key() is None

    def _load_memory(self) -> None:
        """Make the in-memory copy of the rows, if the shard has a limit and they fit."""
        if self._memory_limit > 0:
            self.memory = DeltaMemory.load(self._items(), self._memory_limit, self._name())

    def _name(self) -> str:
        return f"table {self.table!r}, delta shard {self.index}"

    def _first_key(self) -> bytes | None:
        return next((key for key, _ in self._items()), None)

    def _items(self, from_key: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys and values in key order from ``from_key`` (None = the first).

        Not ``Rdict.items()``: that ends quietly where RocksDB's iterator meets an
        error, so a damaged block would read as the end of the shard (measured: a
        scan of 2,000 rows stopped at 954). The iterator's status says which it was.
        """
        it = self._db.iter(self._scan_options)
        try:
            if from_key is None:
                it.seek_to_first()
            else:
                it.seek(from_key)
            while it.valid():
                yield it.key(), it.value()
                it.next()
            it.status()
        except Exception as exc:
            _raise_for_status(exc, self, "scan", _DAMAGED)
            raise

    def recheck_empty(self) -> None:
        """Look again whether the shard holds any key (after deletes or compaction); a
        shard whose rows outgrew memory keeps them there again if they fit now."""
        if self.memory is None:
            self._load_memory()
        self.empty = self._first_key() is None

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        """Values of ``keys`` (None where missing): one batched MultiGet, GIL released.

        (Measured: point gets in a loop are no faster here for a dozen keys a shard.)
        A delta shard held in memory (``memory``) answers from there.
        """
        memory = self.memory
        if memory is not None:
            return memory.get(keys)
        try:  # free unless it raises (zero-cost try since Python 3.11)
            # The stub types a list key as an invariant list of a union and the result as
            # Optional: a list of bytes keys is a MultiGet, which returns a list.
            return self._db[keys]  # type: ignore[index, return-value]
        except Exception as exc:
            _raise_for_status(exc, self, "read", _DAMAGED)
            raise

    def write(
        self,
        puts: list[tuple[bytes, bytes]],
        deletes: Iterable[bytes] = (),
        options: rocksdict.WriteOptions | None = None,
    ) -> None:
        """Apply puts and deletes atomically: one WriteBatch, through the WAL; the hot-row
        cache forgets the keys first, and the recorder, if any, gets the batch after (the
        one place every delta change passes): the in-memory copy, if any, takes it
        once RocksDB has."""
        if self.on_write is not None or self.recorder is not None or self.memory is not None:
            deletes = list(deletes)
        if self.on_write is not None:
            self.on_write(self.index, puts, deletes)
        self.empty = False
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in puts:
            batch.put(key, value)
        for key in deletes:
            batch.delete(key)
        try:
            if options is None:
                self._db.write(batch)
            else:
                self._db.write(batch, options)
        except Exception as exc:
            _raise_for_status(exc, self, "write", _DAMAGED)
            raise
        memory = self.memory
        if memory is not None:
            try:
                fits = memory.apply(puts, deletes, self._name())
            except BaseException:
                self.memory = None  # half-applied: RocksDB alone is right now
                raise
            if not fits:
                self.memory = None
        if self.recorder is not None:
            self.recorder(puts, deletes)  # type: ignore[arg-type]  # a list, made above

    def scan(self, chunk: int = 4096) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """Every row key and value in key order, ``chunk`` at a time (not the
        node's own bookkeeping keys, see SYSTEM_PREFIX)."""
        keys: list[bytes] = []
        values: list[bytes] = []
        for key, value in self._items():
            if key.startswith(SYSTEM_PREFIX) and len(key) != 8:
                continue
            keys.append(key)
            values.append(value)
            if len(keys) >= chunk:
                yield keys, values
                keys, values = [], []
        if keys:
            yield keys, values

    def raw_items(self, from_key: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value in key order from ``from_key``, the node's own keys too
        (a move copies a delta shard whole). One RocksDB iterator: a consistent view."""
        return self._items(from_key)

    def prefix_items(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with ``prefix`` and their values, in key order."""
        for key, value in self._items(prefix):
            if not key.startswith(prefix):
                break
            yield key, value

    def flush(self) -> None:
        """Write the memtable out to a table file (and wait for it)."""
        self._db.flush(True)

    def estimate_keys(self) -> int:
        return self._db.property_int_value("rocksdb.estimate-num-keys") or 0

    def disk_bytes(self) -> int:
        """Bytes of the shard's files."""
        return files_bytes(self.path)

    def close(self) -> None:
        self.memory = None
        self._db.close()
        # Dropped at once (the handle holds the DB lock); a use after close then fails on
        # None, as callers rely on, instead of reaching a closed RocksDB. Not Optional in
        # the annotation: every other method runs on an open shard.
        self._db = None  # type: ignore[assignment]
