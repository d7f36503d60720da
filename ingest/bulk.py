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
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from kvstore.errors import (
    InvalidArgument,
    KvstoreError,
    TableNotFound,
)
from kvstore.schema import TableSchema
from kvstore.wire.dial import dial_address

from .arrow_types import (
    accepted_types,
    dtype_for_create,
    event_time_problem,
    fits,
    key_problem,
    key_type_for_create,
)
from .bulk_input import BulkInput, LoadError
from .bulk_job import LoadJob
from .bulk_upload import SeedNode

__all__ = ["LoadError", "LoadSummary", "load"]

logger = logging.getLogger(__name__)

DEFAULT_EVENT_TIME_COLUMN = "event_time"
MIN_MEMORY_BUDGET = 64 << 20


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
            job = LoadJob(
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
