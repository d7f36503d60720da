"""Bulk loads: Parquet / Arrow IPC files → a sorted RocksDB database per shard → a new version.

    from kvstore.ingest.bulk import load
    summary = load("127.0.0.1:7070", "user_features", "snapshots/2026-11-23/",
                   key_column="user_id", label="2026-11-23")

The steps (docs/bulk-load.md):

1. **Open and check.** The input (a file, a list of files or a hive-partitioned
   directory, on any filesystem ``pyarrow.fs`` opens) is checked against the table
   from the files' metadata alone: key column, a column per feature, types
   (``ingest/arrow_types.py``), no unknown column. ``create=True`` derives the table
   from the Arrow schema when it does not exist.
2. **Encode and partition.** Record batches are read one at a time (bounded memory);
   keys are checked (no null, no over-long string), rows encoded by the Cython codec,
   shard ids and stored keys computed by the same functions the node uses, and the
   rows partitioned by shard into sorted runs (``ingest/bulk_sort.py``), spilled to a
   temporary directory only when the input does not fit ``memory_budget_bytes``.
3. **Begin, write, upload.** Only once the whole input has been read and found good
   does the node hear of the load (``BeginLoad``). Each shard's rows, merged in key
   order with duplicates rejected or dropped, become that shard's RocksDB database of
   the version, in the table format the node named (``ingest/bulk_shard_db.py``); each
   table file is uploaded to the shard's node as soon as it is flushed, the rest of
   the database when it is closed, while the loader writes on
   (``ingest/bulk_upload.py``).
4. **Commit.** ``CommitLoad``: the node moves each shard's database into the new
   version, checks it holds the rows the loader wrote, and makes the version current
   on every shard at once. Any failure aborts the
   load; the current version keeps serving, and the temporary files are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
    KvstoreError,
    SchemaChanged,
    StorageFull,
    TableNotFound,
    is_disk_full,
)
from kvstore.schema import MAX_STRING_KEY_BYTES, TableSchema
from kvstore.wire.dial import dial_address

from .arrow_types import (
    MAX_EXAMPLES,
    accepted_types,
    dtype_for_create,
    event_time_problem,
    event_times_us,
    feature_array,
    fits,
    key_problem,
    key_type_for_create,
    out_of_range,
)
from .bulk_input import BulkInput, InputFile, LoadError
from .bulk_shard_db import ShardDbWriter
from .bulk_sort import Chunk, DuplicateKeys, IntKeys, ShardSorter, StrKeys, release_memory
from .bulk_upload import LoadSession, SeedNode

__all__ = ["LoadError", "LoadSummary", "load"]

logger = logging.getLogger(__name__)

DEFAULT_EVENT_TIME_COLUMN = "event_time"
MIN_MEMORY_BUDGET = 64 << 20
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


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """What a load did. Bytes in bytes, seconds of wall clock, times in µs since the epoch.

    ``rows`` were loaded (one per key); ``input_rows`` were read, and differ by the
    rows ``dedupe`` dropped. ``mb_per_s`` is input megabytes (10**6 bytes) per second.
    """

    table: str
    version: int
    rows: int
    input_bytes: int
    shard_db_bytes: int
    seconds: float
    rows_per_s: float
    mb_per_s: float
    snapshot_time_us: int
    label: str = ""
    input_rows: int = 0
    input_files: int = 0
    duplicates_dropped: int = 0
    #: Key bytes + encoded row bytes of the rows loaded: the data, before RocksDB.
    logical_bytes: int = 0
    #: Bytes the node wrote to its cold path for this version (the shards' databases).
    cold_bytes_written: int = 0
    #: cold_bytes_written / logical_bytes: the cold tier's write amplification.
    cold_write_amplification: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict."""
        return asdict(self)


def load(
    address: str,
    table: str,
    source: str | Sequence[str],
    *,
    key_column: str = "key",
    label: str = "",
    create: bool = False,
    shards: int = 8,
    dedupe: str | None = None,
    snapshot_time_us: int | None = None,
    event_time_column: str | None = None,
    format: str | None = None,
    progress: bool | None = None,
    memory_budget_bytes: int = 1 << 30,
    timeout: float = 600.0,
) -> LoadSummary:
    """Load files into a new version of ``table`` and make it current; see the module doc.

    * ``address``: a node (host:port); the cluster map says which node gets each shard.
    * ``source``: a file, a list of files, or a (hive-)partitioned directory; a local
      path or a URI ``pyarrow.fs`` opens. ``format``: "parquet" or "ipc" ("arrow"),
      default from the file extensions.
    * ``key_column``: the column holding the keys. Every other column must be a
      feature of the table (the event-time column and hive partition fields aside).
    * ``create``: create the table (``shards`` shards) from the files' Arrow schema
      if it does not exist; it is dropped again if the load fails.
    * ``dedupe``: None rejects duplicate keys (the error lists some, with their input
      rows); "first" or "last" keeps one row per key, by input order.
    * ``event_time_column``: µs since the epoch (integer) or a timestamp; default
      "event_time" when the files have it. Not a feature. A row's event time is its
      value there, else the snapshot time.
    * ``snapshot_time_us``: the version's snapshot time (µs since the epoch); default
      the newest event time of the input, or now when there is none.
    * ``progress``: a progress bar on stderr; default only when stderr is a terminal.
    * ``memory_budget_bytes``: bound of the loader's buffers (bytes); inputs whose
      encoded rows exceed half of it are sorted in runs spilled to ``$TMPDIR``.
    * ``timeout``: deadline of each call to a node, seconds.

    Raises LoadError (an InvalidArgument) for bad input, naming file, column, row and
    key; TableNotFound without ``create``; other KvstoreErrors from the node.
    """
    started = time.monotonic()
    if dedupe not in (None, "first", "last"):
        raise InvalidArgument(f"dedupe must be None, 'first' or 'last', not {dedupe!r}")
    if memory_budget_bytes < MIN_MEMORY_BUDGET:
        raise InvalidArgument(
            f"memory_budget_bytes is {memory_budget_bytes}, at least {MIN_MEMORY_BUDGET} (64 MiB)"
        )
    src = BulkInput(source, format)
    if src.rows == 0:
        raise LoadError(
            f"{src.description}: no rows in {len(src.files)} file(s); a load must not make an "
            "empty version, so nothing was loaded"
        )
    show = sys.stderr.isatty() if progress is None else progress
    with SeedNode(address, timeout) as client:
        schema, created, event_column = _table_for(
            client, table, src, key_column, event_time_column, create, shards
        )
        try:
            cluster = client.cluster_map()
            owners = cluster["tables"].get(table)
            if owners is None or len(owners) != schema.shards:
                raise KvstoreError(f"the cluster map has no route for every shard of {table!r}")
            nodes = [dial_address(n["address"], client.address) for n in cluster["nodes"]]
            job = _LoadJob(
                src, schema, key_column, event_column, dedupe, snapshot_time_us, memory_budget_bytes
            )
            done = job.run(client, label, owners, nodes, timeout, show)
        except BaseException:
            if created:
                with contextlib.suppress(KvstoreError):
                    client.drop_table(table)
            raise
    seconds = time.monotonic() - started
    summary = LoadSummary(
        table=table,
        version=done["version"],
        rows=done["rows"],
        input_bytes=src.bytes,
        shard_db_bytes=done["shard_db_bytes"],
        seconds=round(seconds, 3),
        rows_per_s=round(src.rows / seconds, 1),
        mb_per_s=round(src.bytes / seconds / 1e6, 2),
        snapshot_time_us=done["snapshot_time_us"],
        logical_bytes=done["logical_bytes"],
        cold_bytes_written=done["cold_bytes_written"],
        cold_write_amplification=round(
            done["cold_bytes_written"] / max(1, done["logical_bytes"]), 3
        ),
        label=label,
        input_rows=src.rows,
        input_files=len(src.files),
        duplicates_dropped=src.rows - done["rows"],
    )
    logger.info("loaded %s", summary)
    return summary


# -- the table: checked against the files, or created from them ------------------------


def _event_column(src: BulkInput, requested: str | None, features: set[str]) -> str | None:
    if requested is not None:
        return requested
    first = src.files[0].schema.names if src.files else []
    if DEFAULT_EVENT_TIME_COLUMN in first and DEFAULT_EVENT_TIME_COLUMN not in features:
        return DEFAULT_EVENT_TIME_COLUMN
    return None


def _table_for(
    client: SeedNode,
    table: str,
    src: BulkInput,
    key_column: str,
    event_time_column: str | None,
    create: bool,
    shards: int,
) -> tuple[TableSchema, bool, str | None]:
    """The table's schema (created if asked and missing), whether it was created, the
    event-time column; every file checked against it."""
    try:
        schema = client.describe_table(table).schema
    except TableNotFound:
        if not create:
            raise TableNotFound(
                f"table {table!r} does not exist; create it first, or pass create=True "
                "(kvstore load --create) to derive it from the files"
            ) from None
        derived, event_column = _derive_schema(table, src, key_column, event_time_column, shards)
        _check_files(derived, src, key_column, event_column)
        info = client.create_table(
            table,
            key=derived.key_type,
            features={f.name: f.dtype.name for f in derived.features},
            shards=derived.shards,
        )
        logger.info("created table %r from the input: %s", table, info.schema.to_json())
        return info.schema, True, event_column
    event_column = _event_column(src, event_time_column, set(schema.feature_names))
    _check_files(schema, src, key_column, event_column)
    return schema, False, event_column


def _derive_schema(
    table: str, src: BulkInput, key_column: str, event_time_column: str | None, shards: int
) -> tuple[TableSchema, str | None]:
    first = src.files[0]
    names = first.schema.names
    if key_column not in names:
        raise LoadError(
            f"file {first.path}: no key column {key_column!r}; its columns are "
            f"{', '.join(names)} (pass key_column=…)"
        )
    key_type = key_type_for_create(first.schema.field(key_column).type)
    if key_type is None:
        raise LoadError(
            f"file {first.path}, key column {key_column!r}: keys must be integers or strings, "
            f"not {first.schema.field(key_column).type}"
        )
    event_column = _event_column(src, event_time_column, set())
    skip = {key_column, event_column, *src.partition_names}
    features = {}
    for field in first.schema:
        if field.name in skip:
            continue
        dtype = dtype_for_create(field.type)
        if dtype is None:
            raise LoadError(
                f"file {first.path}, column {field.name!r}: Arrow type {field.type} has no "
                "feature dtype (see docs/bulk-load.md for the mapping); cast it in the files, "
                "or create the table yourself"
            )
        features[field.name] = dtype
    if not features:
        raise LoadError(f"file {first.path}: no column besides the key to make features of")
    try:
        return TableSchema.build(table, key_type, features, shards), event_column
    except InvalidArgument as exc:
        raise LoadError(f"cannot create table {table!r} from {first.path}: {exc}") from None


def _check_files(
    schema: TableSchema, src: BulkInput, key_column: str, event_column: str | None
) -> None:
    """Every file has the key, a column per feature of a fitting type, nothing unknown."""
    seen: set[pa.Schema] = set()
    features = {f.name: f.dtype for f in schema.features}
    for f in src.files:
        if f.schema in seen:
            continue
        where = f"file {f.path}"
        names = f.schema.names
        if key_column not in names:
            raise LoadError(
                f"{where}: no key column {key_column!r}; its columns are {', '.join(names)} "
                "(pass key_column=… to name another)"
            )
        problem = key_problem(schema.key_type, f.schema.field(key_column).type)
        if problem:
            raise LoadError(f"{where}, key column {key_column!r}: {problem}")
        if event_column is not None:
            if event_column not in names:
                raise LoadError(f"{where}: no event-time column {event_column!r}")
            problem = event_time_problem(f.schema.field(event_column).type)
            if problem:
                raise LoadError(f"{where}, event-time column {event_column!r}: {problem}")
        missing = [n for n in features if n not in names]
        if missing:
            raise LoadError(
                f"{where}: no column for feature(s) {', '.join(missing)} of table "
                f"{schema.name!r}; a load replaces every row, so they would be null everywhere "
                "(add them to the files, as all-null columns if need be)"
            )
        partitions = set(src.partition_names)
        unknown = [
            n
            for n in names
            if n not in features and n not in (key_column, event_column) and n not in partitions
        ]
        if unknown:
            raise LoadError(
                f"{where}: column(s) {', '.join(unknown)} are not features of table "
                f"{schema.name!r} (its features: {', '.join(features)}); drop them from the "
                "files, or add the features to the table"
            )
        for name, dtype in features.items():
            found = f.schema.field(name).type
            if not fits(dtype, found):
                raise LoadError(
                    f"{where}, column {name!r}: table {schema.name!r} expects {dtype} "
                    f"({accepted_types(dtype)}), found {found}"
                )
        seen.add(f.schema)


# -- the load itself -------------------------------------------------------------------


class _LoadJob:
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
