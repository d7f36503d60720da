"""Sorted rows of one shard → that shard's RocksDB database of the new version.

The loader builds each shard of a version as a complete database, in the table format
the node named when the load began (``kvstore.storage.shard.build_options``: the
node's own options, plus a large memtable), and uploads its files; the node moves the
directory in and opens it (kvstore/server/loads.py). RocksDB cannot ingest PlainTable
SST files (they carry no comparator name), hence whole databases rather than SST files
to ingest. Rows go in through WriteBatches without a WAL, in key order; each time
RocksDB's memtable holds ``memtable_bytes`` by its own measure (several times fewer row
bytes for small rows), it is flushed into a table file, which is handed over for upload
at once (it never changes again): the node hears
from the load at least that often, and the temporary disk holds a few files, not a
shard. The rest of the database (MANIFEST, CURRENT, OPTIONS) follows at close. Keys are the node's
stored form (``_codec.encode_int_keys`` / ``encode_str_keys``), values the encoded
rows, byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import rocksdict

from kvstore import _codec
from kvstore.storage.shard import BUILD_FILE_BYTES, build_options

from .bulk_sort import Chunk, IntKeys, KeyOps

__all__ = ["ShardDbWriter", "shipped_files", "stored_keys", "stored_rows"]


def _binary_parts(arr: pa.Array) -> tuple[object, np.ndarray]:
    """The data buffer and the len + 1 absolute int64 offsets of a large_binary array."""
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = buffers[2] if buffers[2] is not None else b""
    return data, np.ascontiguousarray(offsets)


def stored_keys(ops: KeyOps, keys: np.ndarray | pa.Array) -> list[bytes]:
    """The RocksDB key bytes of ``keys``: the same functions the node uses."""
    if ops is IntKeys:
        return _codec.encode_int_keys(np.ascontiguousarray(keys, dtype=np.int64))
    data, offsets = _binary_parts(keys)
    return _codec.encode_str_keys(data, offsets)


def stored_rows(rows: pa.Array) -> list[bytes]:
    """The encoded rows of a large_binary array, one bytes object each."""
    data, offsets = _binary_parts(rows)
    return _codec.split_rows(data, offsets)


# Rows reach the database as one bytes object each, this many bytes of them at a
# time: with lists of more than about an allocator arena (1 MiB), CPython maps and
# unmaps an arena for every list, and each first touch of a page is a page fault,
# which cost more than the writing itself on the machines measured.
_PUT_BYTES = 128 << 10
#: RocksDB property: bytes of the active memtable (what its flush trigger measures).
_MEMTABLE_BYTES = "rocksdb.cur-size-active-mem-table"


def shipped_files(directory: str) -> list[str]:
    """The files of a closed database that make it up, in name order: table files,
    MANIFEST, CURRENT, OPTIONS, IDENTITY (not its lock, info logs or empty WAL)."""
    return sorted(
        name
        for name in os.listdir(directory)
        if name.endswith(".sst")
        or name.startswith(("MANIFEST-", "OPTIONS-"))
        or name in ("CURRENT", "IDENTITY")
    )


class ShardDbWriter:
    """Writes the sorted, unique rows of one shard into a RocksDB database in
    ``table_format`` (the node's) in ``directory``, with ``build_options``.

    ``on_file(shard, name, path, size)`` is called for each table file as it is
    flushed (each time the memtable holds ``memtable_bytes``, at most
    ``BUILD_FILE_BYTES``) and for the database's other
    files once it is closed (``close``); the receiver may delete each file once it
    has it. A shard that got no row has no database and no file.
    """

    def __init__(
        self,
        shard: int,
        directory: str,
        ops: KeyOps,
        table_format: str,
        on_file: Callable[[int, str, str, int], None],
        memtable_bytes: int,
    ) -> None:
        self.shard = shard
        self.directory = directory
        self.ops = ops
        #: When the loader flushes; the options give RocksDB's memtable room for twice.
        self.memtable_bytes = min(memtable_bytes, BUILD_FILE_BYTES)
        self.options = build_options(table_format, self.memtable_bytes)
        self.on_file = on_file
        self.rows = 0
        self._db: rocksdict.Rdict | None = None
        self._last_key: bytes | None = None
        self._handed: set[str] = set()
        self._write_options = rocksdict.WriteOptions()
        # A crash of the loader loses the load anyway: the memtable is flushed at close.
        # rocksdict's stub declares disable_wal a method; it is a property (a setter).
        self._write_options.disable_wal = True  # type: ignore[method-assign, assignment]

    def add(self, chunk: Chunk) -> None:
        """Append rows whose keys are all greater than every key added before."""
        if not len(chunk):
            return
        if self._db is None:
            self._db = rocksdict.Rdict(
                self.directory, self.options, column_families={"default": self.options}
            )
        db = self._db
        data, offsets = _binary_parts(chunk.rows)
        n = len(chunk)
        step = max(16, _PUT_BYTES * n // max(1, int(offsets[-1] - offsets[0])))
        for start in range(0, n, step):
            stop = min(n, start + step)
            keys = stored_keys(self.ops, chunk.keys[start:stop])
            # The sorter hands over unique keys in order; a memtable would silently keep
            # the last of two equal keys, so check that each piece follows the last.
            if self._last_key is not None and keys[0] <= self._last_key:
                raise AssertionError(
                    f"shard {self.shard}: key {keys[0]!r} follows {self._last_key!r}: the "
                    "rows are not sorted and unique"
                )
            self._last_key = keys[-1]
            rows = _codec.split_rows(data, offsets[start : stop + 1])
            batch = rocksdict.WriteBatch(raw_mode=True)
            for key, row in zip(keys, rows, strict=True):
                batch.put(key, row)
            db.write(batch, self._write_options)
            # The memtable's own measure (its arena), the one RocksDB flushes by at twice
            # this size: row bytes alone undercount small rows several times over.
            if (db.property_int_value(_MEMTABLE_BYTES) or 0) >= self.memtable_bytes:
                self._flush()
        self.rows += n

    def _flush(self) -> None:
        """Flush the memtable (waiting for it) and hand over the new table files."""
        assert self._db is not None
        self._db.flush(True)
        for name in shipped_files(self.directory):
            if name.endswith(".sst") and name not in self._handed:
                self._hand_over(name)

    def _hand_over(self, name: str) -> None:
        self._handed.add(name)
        path = os.path.join(self.directory, name)
        self.on_file(self.shard, name, path, os.path.getsize(path))

    def abandon(self) -> None:
        """Close the database without handing over its files (the load failed)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        """Flush and close the database, then hand over the files not handed yet."""
        if self._db is None:
            return
        self._flush()
        self._db.close()
        self._db = None
        for name in shipped_files(self.directory):
            if name not in self._handed:
                self._hand_over(name)
