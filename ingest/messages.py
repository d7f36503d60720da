"""Update messages from a broker (JSON or Arrow IPC) → the writes that apply them.

A stream consumer reads a run of messages of one partition, ``Batch.add``s each
one (a malformed message raises ``BadMessage`` with the reason, and goes to the
dead letter) and then ``Batch.plan``s the writes: one upsert per set of features
(a partial row sets only its features) and one delete per event time. Per key
and per feature the newest event time wins on the node, so the order of these
writes does not matter; within one upsert a key appears once (the update with
the newest event time, the later one on a tie), so the node applies each write
in one pass. The formats are specified in docs/streaming.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvstore.columns import to_arrow_column
from kvstore.errors import InvalidArgument
from kvstore.ingest import arrow_types
from kvstore.ingest.json_values import INT64, is_int, json_type, value_check
from kvstore.schema import MAX_STRING_KEY_BYTES, TableSchema

__all__ = [
    "ARROW_DELETE_COLUMN",
    "ARROW_EVENT_TIME_COLUMN",
    "FORMATS",
    "BadMessage",
    "Batch",
    "Delete",
    "Message",
    "Upsert",
]

FORMATS = ("json", "arrow")
#: Reserved columns of an Arrow message besides the key column.
ARROW_EVENT_TIME_COLUMN = "event_time"
ARROW_DELETE_COLUMN = "delete"
_JSON_FIELDS = ("key", "event_time", "features", "delete")
#: Rows per write request; larger batches of Arrow rows are split.
MAX_ROWS_PER_WRITE = 50_000


@dataclass(slots=True)
class Message:
    """One broker message and where it sits in its source.

    ``offset``: the NATS stream sequence or the Kafka offset; ``partition``: 0 for
    NATS; ``timestamp_us``: when the broker stored it, µs since the epoch (the event
    time of an update that names none).
    """

    payload: bytes
    partition: int
    offset: int
    timestamp_us: int
    subject: str
    key: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


class BadMessage(ValueError):
    """A message that cannot be applied; the text says why (it goes to the dead letter)."""


@dataclass(slots=True)
class Upsert:
    """Rows that set the same features: one write. ``owners[i]``: the message of row i.

    A key appears once: its newest update. ``full`` keeps every update, in stream
    order, for when the node refuses a row: the updates it had replaced must then
    be applied after all (``rounds``).
    """

    features: tuple[str, ...]
    keys: pa.Array
    columns: dict[str, pa.Array]
    event_times: np.ndarray  # int64 µs
    owners: np.ndarray  # int64 message index within the batch
    full: Upsert | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def data(self) -> dict[str, pa.Array]:
        return {"key": self.keys, **self.columns}

    def take(self, rows: np.ndarray) -> Upsert:
        index = pa.array(rows, pa.int64())
        return Upsert(
            self.features,
            self.keys.take(index),
            {name: col.take(index) for name, col in self.columns.items()},
            self.event_times[rows],
            self.owners[rows],
        )

    def rounds(self) -> list[Upsert]:
        """Every update of ``full``, as writes of distinct keys: first occurrences, then
        second ones... (stream order within a key, as the messages came)."""
        rows = self.full if self.full is not None else self
        seen: dict[Any, int] = {}
        rounds: list[list[int]] = []
        for i, key in enumerate(rows.keys.to_pylist()):
            r = seen.get(key, 0)
            seen[key] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        return [rows.take(np.asarray(r, np.int64)) for r in rounds]


@dataclass(slots=True)
class Delete:
    """Keys deleted at one event time (µs): one delete request."""

    keys: list
    event_time: int
    owners: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray) -> Delete:
        return Delete([self.keys[i] for i in rows.tolist()], self.event_time, self.owners[rows])


Write = Upsert | Delete


class Batch:
    """The updates of a run of messages, grouped into the writes that apply them."""

    def __init__(self, schema: TableSchema, fmt: str = "json", key_column: str = "key") -> None:
        if fmt not in FORMATS:
            raise InvalidArgument(f"message format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.schema = schema
        self.format = fmt
        self.key_column = key_column
        self._json: dict[tuple[int, ...], _JsonGroup] = {}
        self._arrow: dict[tuple[int, ...], list[tuple[pa.Array, np.ndarray, dict, int]]] = {}
        self._deletes: dict[Any, tuple[int, int]] = {}  # key → (event time, message)
        self._checks = [value_check(f.dtype) for f in schema.features]
        self.messages = 0
        if fmt == "arrow":
            clash = {ARROW_EVENT_TIME_COLUMN, ARROW_DELETE_COLUMN} & set(schema.feature_names)
            if clash:
                raise InvalidArgument(
                    f"table {schema.name!r} has a feature named {sorted(clash)[0]!r}, a reserved "
                    "column of Arrow messages; consume JSON messages for this table"
                )

    def add(self, message: Message) -> None:
        """Take one message in; BadMessage says why it cannot be applied (nothing taken)."""
        index = self.messages
        self.messages += 1
        if self.format == "json":
            self._add_json(message, index)
        else:
            self._add_arrow(message, index)

    def plan(self) -> list[Write]:
        """The writes that apply every message added: upserts, then deletes."""
        writes: list[Write] = []
        for positions, group in self._json.items():
            writes.extend(_chunks(_newest_per_key(group.upsert(self.schema, positions))))
        for positions, parts in self._arrow.items():
            writes.extend(_chunks(_newest_per_key(_arrow_upsert(self.schema, positions, parts))))
        by_time: dict[int, tuple[list, list[int]]] = {}
        for key, (when, owner) in self._deletes.items():
            keys, owners = by_time.setdefault(when, ([], []))
            keys.append(key)
            owners.append(owner)
        for when in sorted(by_time):
            keys, owners = by_time[when]
            writes.append(Delete(keys, when, np.asarray(owners, np.int64)))
        return writes

    # -- JSON ------------------------------------------------------------------------

    def _add_json(self, message: Message, index: int) -> None:
        try:
            doc = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadMessage(f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadMessage(f"a message must be a JSON object, not {json_type(doc)}")
        unknown = [name for name in doc if name not in _JSON_FIELDS]
        if unknown:
            raise BadMessage(
                f"unknown field {unknown[0]!r}; a message has the fields "
                + ", ".join(repr(f) for f in _JSON_FIELDS)
            )
        if "key" not in doc or doc["key"] is None:
            raise BadMessage("the message has no 'key'")
        key = self._json_key(doc["key"])
        when = doc.get("event_time")
        if when is None:
            when = message.timestamp_us
        elif not is_int(when) or when <= 0 or when > INT64[1]:
            raise BadMessage(
                f"'event_time' must be a positive integer of µs since the epoch, not {when!r}"
            )
        if "delete" in doc:
            if doc["delete"] is not True:
                raise BadMessage(f"'delete' must be true when present, not {doc['delete']!r}")
            if "features" in doc:
                raise BadMessage("a message either deletes its key or sets features, not both")
            old = self._deletes.get(key)
            if old is None or when >= old[0]:
                self._deletes[key] = (when, index)
            return
        features = doc.get("features")
        if not isinstance(features, dict) or not features:
            raise BadMessage(
                "the message sets no feature: give 'features' (an object of feature names to "
                "values) or 'delete': true"
            )
        positions = []
        values = []
        for name, value in features.items():
            try:
                i = self.schema.index_of(name)
            except InvalidArgument as exc:
                raise BadMessage(str(exc)) from None
            if value is not None:
                problem, value = self._checks[i](value)
                if problem:
                    dtype = self.schema.features[i].dtype
                    raise BadMessage(f"feature {name!r} ({dtype}): {problem}, not {value!r}")
            positions.append(i)
            values.append(value)
        order = sorted(range(len(positions)), key=positions.__getitem__)
        signature = tuple(positions[j] for j in order)
        group = self._json.get(signature)
        if group is None:
            group = self._json[signature] = _JsonGroup(len(signature))
        group.add(key, when, [values[j] for j in order], index)

    def _json_key(self, key: Any) -> Any:
        if self.schema.key_type == "int64":
            if not is_int(key) or not INT64[0] <= key <= INT64[1]:
                raise BadMessage(f"the table's keys are int64; 'key' is {key!r}")
            return key
        if not isinstance(key, str):
            raise BadMessage(f"the table's keys are strings; 'key' is {key!r}")
        if len(key.encode()) > MAX_STRING_KEY_BYTES:
            raise BadMessage(f"'key' is longer than {MAX_STRING_KEY_BYTES} bytes")
        return key

    # -- Arrow -----------------------------------------------------------------------

    def _add_arrow(self, message: Message, index: int) -> None:
        try:
            table = pa.ipc.open_stream(pa.py_buffer(message.payload)).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise BadMessage(f"not an Arrow IPC stream: {exc}") from None
        if not table.num_rows:
            return
        names = table.column_names
        if len(set(names)) != len(names):
            raise BadMessage(f"a column is given twice: {names}")
        if self.key_column not in names:
            raise BadMessage(
                f"no key column {self.key_column!r}; the columns are: {', '.join(names)}"
            )
        keys = table.column(self.key_column).combine_chunks()
        problem = arrow_types.key_problem(self.schema.key_type, keys.type)
        if problem:
            raise BadMessage(f"key column {self.key_column!r}: {problem}")
        if keys.null_count:
            row = int(np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))[0])
            raise BadMessage(f"key column {self.key_column!r}: a null key at row {row}")
        keys = self._arrow_keys(keys)
        n = table.num_rows
        times = np.full(n, message.timestamp_us, np.int64)
        if ARROW_EVENT_TIME_COLUMN in names:
            column = table.column(ARROW_EVENT_TIME_COLUMN).combine_chunks()
            problem = arrow_types.event_time_problem(column.type)
            if problem:
                raise BadMessage(f"column {ARROW_EVENT_TIME_COLUMN!r}: {problem}")
            given, nulls = arrow_types.event_times_us(column)
            if nulls is not None:
                given[nulls] = message.timestamp_us
            if (given <= 0).any():
                row = int(np.flatnonzero(given <= 0)[0])
                raise BadMessage(
                    f"column {ARROW_EVENT_TIME_COLUMN!r}, row {row}: an event time must be a "
                    f"positive number of µs since the epoch, not {int(given[row])}"
                )
            times = given
        deleted = np.zeros(n, bool)
        if ARROW_DELETE_COLUMN in names:
            column = table.column(ARROW_DELETE_COLUMN).combine_chunks()
            if not pa.types.is_boolean(column.type):
                raise BadMessage(f"column {ARROW_DELETE_COLUMN!r} must be bool, not {column.type}")
            deleted = np.asarray(pc.fill_null(column, False).to_numpy(zero_copy_only=False))
        reserved = (self.key_column, ARROW_EVENT_TIME_COLUMN, ARROW_DELETE_COLUMN)
        columns: dict[int, pa.Array] = {}
        for name in names:
            if name in reserved:
                continue
            try:
                i = self.schema.index_of(name)
            except InvalidArgument as exc:
                raise BadMessage(f"column {name!r}: {exc}") from None
            columns[i] = self._arrow_feature(table.column(name).combine_chunks(), i)
        if not columns and ARROW_DELETE_COLUMN not in names:
            raise BadMessage(
                f"no feature column: the columns are {', '.join(names)}; the table's features "
                f"are {', '.join(self.schema.feature_names)}"
            )
        for row in np.flatnonzero(deleted).tolist():
            key = keys[row].as_py()
            when = int(times[row])
            old = self._deletes.get(key)
            if old is None or when >= old[0]:
                self._deletes[key] = (when, index)
        if not columns:
            return
        keep = ~deleted
        if not keep.all():
            mask = pa.array(keep)
            keys = keys.filter(mask)
            columns = {i: col.filter(mask) for i, col in columns.items()}
            times = times[keep]
        if not len(keys):
            return
        signature = tuple(sorted(columns))
        self._arrow.setdefault(signature, []).append(
            (keys, times, {i: columns[i] for i in signature}, index)
        )

    def _arrow_keys(self, keys: pa.Array) -> pa.Array:
        if self.schema.key_type == "int64":
            bad = arrow_types.out_of_range(keys, *INT64)
            if bad is not None:
                row = int(np.flatnonzero(bad)[0])
                raise BadMessage(f"key column {self.key_column!r}, row {row}: not an int64")
            return keys.cast(pa.int64())
        if pa.types.is_dictionary(keys.type):
            keys = keys.dictionary_decode()
        keys = keys.cast(pa.string())
        too_long = pc.greater(pc.binary_length(keys), MAX_STRING_KEY_BYTES)
        if pc.any(too_long).as_py():
            row = int(np.flatnonzero(too_long.to_numpy(zero_copy_only=False))[0])
            raise BadMessage(
                f"key column {self.key_column!r}, row {row}: longer than "
                f"{MAX_STRING_KEY_BYTES} bytes"
            )
        return keys

    def _arrow_feature(self, column: pa.Array, i: int) -> pa.Array:
        feature = self.schema.features[i]
        where = f"column {feature.name!r} ({feature.dtype})"
        if not arrow_types.fits(feature.dtype, column.type):
            raise BadMessage(
                f"{where}: the column is {column.type}; expected "
                f"{arrow_types.accepted_types(feature.dtype)}"
            )
        try:
            column = arrow_types.feature_array(column, feature.dtype, where, lambda r: f"row {r}")
            return to_arrow_column(column, feature.dtype, self.schema.name, feature.name)
        except (ValueError, InvalidArgument) as exc:
            raise BadMessage(str(exc)) from None


class _JsonGroup:
    """JSON updates of one feature set, in stream order."""

    __slots__ = ("keys", "owners", "times", "values")

    def __init__(self, width: int) -> None:
        self.keys: list = []
        self.times: list[int] = []
        self.owners: list[int] = []
        self.values: list[list] = [[] for _ in range(width)]

    def add(self, key: Any, when: int, values: list, owner: int) -> None:
        self.keys.append(key)
        self.times.append(when)
        self.owners.append(owner)
        for column, value in zip(self.values, values, strict=True):
            column.append(value)

    def upsert(self, schema: TableSchema, positions: tuple[int, ...]) -> Upsert:
        key_type = pa.int64() if schema.key_type == "int64" else pa.string()
        columns = {}
        for i, values in zip(positions, self.values, strict=True):
            feature = schema.features[i]
            columns[feature.name] = pa.array(values, type=feature.dtype.arrow_type)
        return Upsert(
            tuple(schema.features[i].name for i in positions),
            pa.array(self.keys, type=key_type),
            columns,
            np.asarray(self.times, np.int64),
            np.asarray(self.owners, np.int64),
        )


def _arrow_upsert(
    schema: TableSchema,
    positions: tuple[int, ...],
    parts: list[tuple[pa.Array, np.ndarray, dict, int]],
) -> Upsert:
    """The Arrow messages of one feature set, concatenated in stream order."""
    many = len(parts) > 1
    keys = pa.concat_arrays([p[0] for p in parts]) if many else parts[0][0]
    columns = {
        schema.features[i].name: (
            pa.concat_arrays([p[2][i] for p in parts]) if many else parts[0][2][i]
        )
        for i in positions
    }
    return Upsert(
        tuple(schema.features[i].name for i in positions),
        keys,
        columns,
        np.concatenate([p[1] for p in parts]),
        np.concatenate([np.full(len(p[0]), p[3], np.int64) for p in parts]),
    )


def _newest_per_key(upsert: Upsert) -> Upsert:
    """One row per key: the newest event time, the later row on a tie (as the node would)."""
    keys = upsert.keys
    if len(pc.unique(keys)) == len(keys):
        return upsert
    codes = np.asarray(pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False))
    order = np.lexsort((np.arange(len(keys)), upsert.event_times, codes))
    last = np.ones(len(order), bool)
    last[:-1] = codes[order][1:] != codes[order][:-1]
    newest = upsert.take(np.sort(order[last]))
    newest.full = upsert
    return newest


def _chunks(upsert: Upsert) -> list[Upsert]:
    n = len(upsert)
    if n <= MAX_ROWS_PER_WRITE:
        return [upsert]
    chunks = []
    for start in range(0, n, MAX_ROWS_PER_WRITE):
        chunk = upsert.take(np.arange(start, min(start + MAX_ROWS_PER_WRITE, n)))
        if upsert.full is not None:
            mine = pc.is_in(upsert.full.keys, value_set=chunk.keys)
            chunk.full = upsert.full.take(np.flatnonzero(mine.to_numpy(zero_copy_only=False)))
        chunks.append(chunk)
    return chunks
