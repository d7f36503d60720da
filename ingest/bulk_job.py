"""One bulk load's work, once its input and table are checked (``ingest/bulk.py``).

``LoadJob`` reads the input's record batches, encodes the rows with the Cython codec
and partitions them by shard into sorted runs (``ingest/bulk_sort.py``), then begins
the load on the node, writes each shard's RocksDB database in key order
(``ingest/bulk_shard_db.py``), uploads its files as they are flushed
(``ingest/bulk_upload.py``) and commits. The constants below share the load's memory
budget between these steps.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from kvstore import _codec
from kvstore.clock import now_us
from kvstore.columns import codec_column, to_arrow_column
from kvstore.errors import (
    InvalidArgument,
    SchemaChanged,
    StorageFull,
    is_disk_full,
)
from kvstore.schema import MAX_STRING_KEY_BYTES, TableSchema

from .arrow_types import (
    MAX_EXAMPLES,
    event_times_us,
    feature_array,
    out_of_range,
)
from .bulk_input import BulkInput, InputFile, LoadError
from .bulk_shard_db import ShardDbWriter
from .bulk_sort import Chunk, DuplicateKeys, IntKeys, ShardSorter, StrKeys, release_memory
from .bulk_upload import LoadSession, SeedNode

__all__ = ["LoadJob"]

logger = logging.getLogger(__name__)

# How memory_budget_bytes is shared: the buffer of encoded rows (one run), the windows
# of the runs while merging; the rest is for the reader's batches and the rows being
# gathered and written (each about budget / 32).
RUN_SHARE = 0.5
WRITE_CHUNK_BYTES = 8 << 20
MERGE_SHARE = 0.25
# A shard's database is written through a memtable of budget / 16, within the rest;
# each flush is one table file, uploaded while the next is written.
MEMTABLE_SHARE = 1 / 16
MIN_MEMTABLE_BYTES = 4 << 20


class LoadJob:
    """One load: read + encode + partition, then begin, write shard databases, upload,
    commit."""

    def __init__(
        self,
        src: BulkInput,
        schema: TableSchema,
        key_column: str,
        event_column: str | None,
        dedupe: str | None,
        snapshot_time_us: int | None,
        budget: int,
    ) -> None:
        self.src = src
        self.schema = schema
        self.key_column = key_column
        self.event_column = event_column
        self.dedupe = dedupe
        self.snapshot = snapshot_time_us
        self.newest_event = None if snapshot_time_us is not None else -(2**63)
        self.ops = IntKeys if schema.key_type == "int64" else StrKeys
        self.layout = schema.layout
        self.logical_bytes = 0
        # Bytes of a row as the codec writes it, plus its key and seq, for sizing buffers.
        self.row_bytes = self.layout.min_row_size + 32 * self.layout.n_var + 24
        self.budget = budget
        self.batch_rows = int(min(1 << 17, max(1024, budget // 32 // self.row_bytes)))
        # Rows are gathered in key order about WRITE_CHUNK_BYTES at a time.
        self.write_rows = int(min(1 << 16, max(64, WRITE_CHUNK_BYTES // self.row_bytes)))
        names = [key_column, *([event_column] if event_column else []), *schema.feature_names]
        self.columns = list(dict.fromkeys(names))

    def run(
        self,
        client: SeedNode,
        label: str,
        owners: list[int],
        nodes: list[str],
        timeout: float,
        show: bool,
    ) -> dict[str, int]:
        tmp = tempfile.mkdtemp(prefix=f"kvstore-load-{self.schema.name}-")
        session = LoadSession(client.address, self.schema.name, timeout)
        sorter = self.sorter(tmp)
        try:
            started = time.monotonic()
            self.read(sorter, show)
            read_s = time.monotonic() - started
            snapshot = self.snapshot_time()
            # The rows carry the schema id read at the start; the table may have been
            # dropped and created again while the input was read.
            current = client.describe_table(self.schema.name).schema
            if current.schema_id != self.schema.schema_id:
                raise SchemaChanged(
                    f"table {self.schema.name!r} was dropped and created again while its "
                    f"input was read (schema id {self.schema.schema_id}, now "
                    f"{current.schema_id}); load again"
                )
            session.begin(label, snapshot, owners, nodes, self.schema.schema_id)
            rows_per_shard, shard_db_bytes = self.write(
                sorter, tmp, session.upload, session.check, show, session.base_format
            )
            rows = sum(rows_per_shard)
            write_s = time.monotonic() - started - read_s
            pending = shard_db_bytes - session.bytes_sent
            with _progress_bar(
                f"{self.schema.name}: upload", pending, show and pending > 0, unit="B"
            ) as bar:
                base = session.bytes_sent
                session.finish_uploads(lambda sent: bar.update(sent - base - bar.n))
                bar.update(session.bytes_sent - base - bar.n)
            upload_s = time.monotonic() - started - read_s - write_s
            response = session.commit(rows_per_shard)
            version = response.version.version or session.version
            logger.info(
                "table %r version %d committed: %d rows, %d bytes of files, %d spilled runs; "
                "read %.2f s, write %.2f s, upload wait %.2f s, commit %.2f s (node %.2f s)",
                self.schema.name,
                version,
                rows,
                shard_db_bytes,
                sorter.spilled_runs,
                read_s,
                write_s,
                upload_s,
                time.monotonic() - started - read_s - write_s - upload_s,
                response.ingest_s,
            )
            return {
                "version": version,
                "rows": rows,
                "shard_db_bytes": shard_db_bytes,
                "snapshot_time_us": snapshot,
                "cold_bytes_written": response.cold_bytes_written,
                "logical_bytes": self.logical_bytes,
            }
        except BaseException as exc:
            session.abort()
            if is_disk_full(exc):
                raise StorageFull(
                    f"table {self.schema.name!r}: the loader's temporary directory {tmp} is "
                    f"full ({exc}); the load was aborted and the current version is unchanged. "
                    "Point TMPDIR at a disk with room for about the input's size"
                ) from None
            raise
        finally:
            sorter.close()
            session.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def sorter(self, tmp: str) -> ShardSorter:
        return ShardSorter(
            self.schema.shards,
            self.ops,
            tmp,
            run_bytes=int(self.budget * RUN_SHARE),
            merge_bytes=int(self.budget * MERGE_SHARE),
            dedupe=self.dedupe,
        )

    # -- phase 1: read, check, encode, partition ---------------------------------------

    def read(self, sorter: ShardSorter, show: bool) -> None:
        """Every batch of the input checked, encoded and handed to ``sorter``."""
        started = time.monotonic()
        done_bytes = 0.0
        with _progress_bar(f"{self.schema.name}: read", self.src.rows, show) as bar:
            for f, first_row, batch in self.src.batches(self.columns, self.batch_rows):
                chunk, shard_ids = self._encode(f, first_row, batch)
                sorter.add(chunk, shard_ids)
                bar.update(batch.num_rows)
                done_bytes += f.size * batch.num_rows / max(1, f.rows)
                elapsed = max(1e-9, time.monotonic() - started)
                bar.set_postfix_str(f"{done_bytes / elapsed / 1e6:.0f} MB/s", refresh=False)
        release_memory()
        try:
            sorter.finish()
        except DuplicateKeys as exc:
            raise LoadError(self._duplicates_message(exc)) from None

    def _encode(self, f: InputFile, first_row: int, batch: pa.RecordBatch) -> tuple[Chunk, Any]:
        n = batch.num_rows
        src, table = self.src, self.schema.name

        def name(i: int) -> str:
            return src.locate(first_row + i)

        keys, shard_ids = self._keys(f, batch.column(self.key_column), name)
        columns: list = [None] * len(self.schema.features)
        for index, feature in enumerate(self.schema.features):
            arr = batch.column(feature.name)
            where = f"table {table!r}, column {feature.name!r} ({feature.dtype})"
            try:
                arr = feature_array(arr, feature.dtype, where, name)
                arr = to_arrow_column(arr, feature.dtype, table, feature.name)
                columns[index] = codec_column(arr, feature.dtype, table, feature.name)
            except ValueError as exc:
                raise LoadError(str(exc)) from None
            except InvalidArgument as exc:
                raise LoadError(_in_batch(str(exc), name)) from None
        event_times = self._event_times(batch, n, name)
        rows, offsets = _codec.encode_rows(self.layout, columns, n, event_times)
        key_arr = batch.column(self.key_column)
        self.logical_bytes += len(rows) + (
            8 * n
            if self.schema.key_type == "int64"
            else int(pc.sum(pc.binary_length(key_arr)).as_py() or 0)
        )
        rows_arr = pa.Array.from_buffers(
            pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(rows)]
        )
        seq = np.arange(first_row, first_row + n, dtype=np.int64)
        return Chunk(keys, seq, rows_arr), shard_ids

    def _keys(self, f: InputFile, arr: pa.Array, name) -> tuple[Any, Any]:
        where = f"table {self.schema.name!r}, key column {self.key_column!r}"
        if arr.null_count:
            nulls = np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
            rows = np.flatnonzero(nulls)
            shown = ", ".join(name(int(r)) for r in rows[:MAX_EXAMPLES])
            more = f" and {len(rows) - MAX_EXAMPLES} more in this batch" if len(rows) > 5 else ""
            raise LoadError(f"{where}: null keys at {shown}{more}; every row needs a key")
        shards = self.schema.shards
        if self.ops is IntKeys:
            bad = out_of_range(arr, -(2**63), 2**63 - 1) if pa.types.is_uint64(arr.type) else None
            if bad is not None:
                first = int(np.flatnonzero(bad)[0])
                raise LoadError(f"{where}: key {arr[first]} at {name(first)} does not fit in int64")
            ints = np.ascontiguousarray(arr.cast(pa.int64()).to_numpy(zero_copy_only=False))
            return ints, _codec.shard_ids_int(ints, shards)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        arr = arr.cast(pa.large_string()).view(pa.large_binary())
        sizes = pc.binary_length(arr).to_numpy(zero_copy_only=False)
        if len(sizes) and sizes.max() > MAX_STRING_KEY_BYTES:
            first = int(np.argmax(sizes > MAX_STRING_KEY_BYTES))
            raise LoadError(
                f"{where}: a key of {sizes[first]} bytes at {name(first)}, at most "
                f"{MAX_STRING_KEY_BYTES}"
            )
        buffers = arr.buffers()
        offsets = np.frombuffer(buffers[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
        data = buffers[2] if buffers[2] is not None else b""
        return arr, _codec.shard_ids_str(data, np.ascontiguousarray(offsets), shards)

    def _event_times(self, batch: pa.RecordBatch, n: int, name) -> np.ndarray:
        if self.event_column is None:
            return np.full(n, self.snapshot_time(), np.int64)
        times, nulls = event_times_us(batch.column(self.event_column))
        valid = times if nulls is None else times[~nulls]
        if self.newest_event is not None and len(valid):
            self.newest_event = max(self.newest_event, int(valid.max()))
        if nulls is not None:
            times[nulls] = self.snapshot_time(scan=True)
        return times

    def snapshot_time(self, scan: bool = False) -> int:
        """The snapshot time: given, else the newest event time (a scan of that column
        when a row without event time needs it before the end), else now."""
        if self.snapshot is not None:
            return self.snapshot
        if self.event_column is None:
            self.snapshot = now_us()
            return self.snapshot
        if scan:
            newest = None
            for _, _, batch in self.src.batches([self.event_column], 1 << 20):
                times, nulls = event_times_us(batch.column(0))
                valid = times if nulls is None else times[~nulls]
                if len(valid):
                    top = int(valid.max())
                    newest = top if newest is None else max(newest, top)
            self.snapshot = int(newest) if newest is not None else now_us()
            return self.snapshot
        assert self.newest_event is not None
        self.snapshot = self.newest_event if self.newest_event > -(2**63) else now_us()
        return self.snapshot

    # -- phase 3: sorted shards → shard databases → uploads ------------------------------

    def write(
        self,
        sorter: ShardSorter,
        tmp: str,
        on_file: Callable[[int, str, str, int], None],
        check: Callable[[], None],
        show: bool,
        table_format: str,
    ) -> tuple[list[int], int]:
        """Each shard's sorted rows as a RocksDB database in ``table_format`` under
        ``tmp``; ``on_file(shard, name, path, size)`` for each of its files as it is
        finished (``ShardDbWriter``), ``check()`` between chunks (raises to stop).
        Returns (rows written to each shard, bytes of the databases' files)."""
        memtable_bytes = max(MIN_MEMTABLE_BYTES, int(self.budget * MEMTABLE_SHARE))
        rows_per_shard = [0] * self.schema.shards
        shard_db_bytes = 0

        def finished(shard: int, name: str, path: str, size: int) -> None:
            nonlocal shard_db_bytes
            shard_db_bytes += size
            on_file(shard, name, path, size)

        with _progress_bar(f"{self.schema.name}: write", self.src.rows, show) as bar:
            try:
                for shard in range(self.schema.shards):
                    directory = os.path.join(tmp, f"shard-{shard:04d}")
                    os.mkdir(directory)
                    writer = ShardDbWriter(
                        shard, directory, self.ops, table_format, finished, memtable_bytes
                    )
                    try:
                        for chunk in sorter.sorted_chunks(shard, self.write_rows):
                            writer.add(chunk)
                            bar.update(len(chunk))
                            check()
                        writer.close()
                    except BaseException:
                        writer.abandon()
                        raise
                    rows_per_shard[shard] = writer.rows
                    release_memory()
            except DuplicateKeys as exc:
                raise LoadError(self._duplicates_message(exc)) from None
            bar.update(sorter.dropped)
        return rows_per_shard, shard_db_bytes

    def _duplicates_message(self, exc: DuplicateKeys) -> str:
        shown = "; ".join(
            f"key {key} at {' and '.join(self.src.locate(r) for r in rows[:3])}"
            + (f" and {len(rows) - 3} more rows" if len(rows) > 3 else "")
            for key, rows in exc.examples
        )
        return (
            f"table {self.schema.name!r}: duplicate keys in the input ({shown}); a version holds "
            "one row per key: pass dedupe='last' or dedupe='first' (kvstore load --dedupe) to "
            "keep one of them by input order"
        )


def _progress_bar(desc: str, total: int, show: bool, unit: str = "row") -> tqdm:
    """A tqdm bar of rows (or bytes) on stderr, rate and ETA from ``total``; silent unless
    ``show`` (a disabled tqdm takes the same calls and draws nothing)."""
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.25,
        disable=not show,
    )


def _in_batch(message: str, name) -> str:
    """A write-path message about "row i" of a batch, with the row located in the input."""
    return re.sub(r"\brow (\d+)\b", lambda m: name(int(m.group(1))), message, count=1)
