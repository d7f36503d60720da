"""Sorted rows of one shard → SST files (rocksdict.SstFileWriter), ready to ingest.

The files are written with the node's own shard options
(``kvstore.storage.shard.rocksdb_options``: raw mode, LZ4, 10-bit bloom filter), so
an ingested file is laid out exactly like one the node's own flushes would write.
Keys are the node's stored form (``_codec.encode_int_keys`` / ``encode_str_keys``),
values the encoded rows, byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import rocksdict

from kvstore import _codec
from kvstore.storage.shard import rocksdb_options

from .bulk_sort import Chunk, IntKeys, KeyOps

__all__ = ["SST_TARGET_BYTES", "ShardSstWriter", "sst_options", "stored_keys", "stored_rows"]

#: An SST file is closed once it reaches this size (bytes); a shard may have many.
SST_TARGET_BYTES = 256 << 20


def sst_options() -> rocksdict.Options:
    """The shard options of the node; the block cache only matters for reads, so it is tiny."""
    return rocksdb_options(rocksdict.Cache(1 << 20))


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
    data, offsets = _binary_parts(keys)  # type: ignore[arg-type]
    return _codec.encode_str_keys(data, offsets)


def stored_rows(rows: pa.Array) -> list[bytes]:
    """The encoded rows of a large_binary array, one bytes object each."""
    data, offsets = _binary_parts(rows)
    return _codec.split_rows(data, offsets)


# Rows reach the SST writer as one bytes object each, this many bytes of them at a
# time: with lists of more than about an allocator arena (1 MiB), CPython maps and
# unmaps an arena for every list, and each first touch of a page is a page fault,
# which cost more than the writing itself on the machines measured.
_PUT_BYTES = 128 << 10


class ShardSstWriter:
    """Writes the sorted, unique rows of one shard into ``000001.sst``, ``000002.sst`` …

    ``on_file(shard, name, path, size)`` is called as each file is finished.
    """

    def __init__(
        self,
        shard: int,
        directory: str,
        ops: KeyOps,
        options: rocksdict.Options,
        on_file: Callable[[int, str, str, int], None],
        target_bytes: int = SST_TARGET_BYTES,
    ) -> None:
        self.shard = shard
        self.directory = directory
        self.ops = ops
        self.options = options
        self.on_file = on_file
        self.target_bytes = target_bytes
        self.files = 0
        self.rows = 0
        self._writer: rocksdict.SstFileWriter | None = None
        self._path = ""

    def add(self, chunk: Chunk) -> None:
        """Append rows whose keys are all greater than every key added before."""
        if not len(chunk):
            return
        if self._writer is None:
            self.files += 1
            name = f"{self.files:06d}.sst"
            self._path = os.path.join(self.directory, name)
            self._writer = rocksdict.SstFileWriter(self.options)
            self._writer.open(self._path)
        writer = self._writer
        data, offsets = _binary_parts(chunk.rows)
        n = len(chunk)
        step = max(16, _PUT_BYTES * n // max(1, int(offsets[-1] - offsets[0])))
        for start in range(0, n, step):
            stop = min(n, start + step)
            keys = stored_keys(self.ops, chunk.keys[start:stop])
            rows = _codec.split_rows(data, offsets[start : stop + 1])
            for key, row in zip(keys, rows, strict=True):
                writer[key] = row
        self.rows += n
        if writer.file_size() >= self.target_bytes:
            self._finish_file()

    def close(self) -> None:
        """Finish the last file."""
        if self._writer is not None:
            self._finish_file()

    def _finish_file(self) -> None:
        assert self._writer is not None
        self._writer.finish()
        self._writer = None
        self.on_file(
            self.shard, os.path.basename(self._path), self._path, os.path.getsize(self._path)
        )
