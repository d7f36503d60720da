"""User data (dict of columns, Arrow, row dicts) → checked Arrow columns → encoded rows.

Columns go through Arrow so that conversion runs in C, never per value in Python.
Only when a conversion fails does a slow path walk the column to name the first
bad row, so a user reads "table 'users', column 'age' (int32), row 3: 'abc' (str)".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvstore import _codec
from kvstore.clock import now_us
from kvstore.errors import InvalidArgument, UnknownFeature
from kvstore.keys import KeyBatch
from kvstore.schema import DType, TableSchema

__all__ = ["EncodedRows", "encode_rows"]

# A finite float32 at or above this magnitude rounds to inf as an IEEE half.
_FLOAT16_OVERFLOW = np.float32(65520.0)


class EncodedRows:
    """Keys, encoded rows and the features they set: what a Write request carries."""

    __slots__ = ("features", "keys", "offsets", "rows")

    def __init__(self, keys: KeyBatch, rows: bytes, offsets: np.ndarray, features: list[str]):
        self.keys = keys
        self.rows = rows
        self.offsets = offsets
        #: Empty when every feature is set (the rows replace what is stored).
        self.features = features

    def __len__(self) -> int:
        return self.keys.count


def encode_rows(
    schema: TableSchema,
    data: Any,
    key_column: str = "key",
    event_time: int | np.ndarray | None = None,
) -> EncodedRows:
    """Check ``data`` against ``schema`` and encode it.

    ``data`` is a dict of columns (lists or NumPy arrays), a ``pyarrow.Table`` or
    ``RecordBatch``, a pandas DataFrame, or a list of row dicts. The columns other
    than ``key_column`` are the features written; features left out keep their
    stored values. ``event_time`` is in µs since the epoch: one value or one per
    row; default now.
    """
    columns = _columns_of(data, schema.name)
    if key_column not in columns:
        raise InvalidArgument(
            f"table {schema.name!r}: the data has no key column {key_column!r}; "
            f"its columns are: {', '.join(columns) or '(none)'}"
        )
    keys = KeyBatch.from_values(schema.key_type, columns.pop(key_column), schema.name, key_column)
    n = keys.count
    if not columns:
        raise InvalidArgument(f"table {schema.name!r}: the data has a key column but no feature")
    codec_columns: list = [None] * len(schema.features)
    for name, values in columns.items():
        index = _feature_index(schema, name)
        feature = schema.features[index]
        dtype = feature.dtype
        if (
            type(values) is np.ndarray  # not a MaskedArray: its mask means nulls
            and values.ndim == 1
            and _codec.KIND_BOOL < dtype.kind <= _codec.KIND_FLOAT64
            and values.dtype == dtype.numpy_dtype
        ):
            # Already the feature's values, no nulls (NaN is a value): what Arrow would
            # give back, without going through it (an update stream's batch, per column).
            arr = values
            column = (np.ascontiguousarray(values), None)
        else:
            arr = to_arrow_column(values, dtype, schema.name, name)
            column = None
        if len(arr) != n:
            raise InvalidArgument(
                f"table {schema.name!r}, column {name!r}: {len(arr)} values for {n} keys"
            )
        codec_columns[index] = column or codec_column(arr, dtype, schema.name, name)
    if event_time is None:
        event_times = np.full(n, now_us(), dtype=np.int64)
    elif np.ndim(event_time) == 0:
        event_times = np.full(n, int(event_time), dtype=np.int64)
    else:
        event_times = np.ascontiguousarray(event_time, dtype=np.int64)
        if len(event_times) != n:
            raise InvalidArgument(
                f"table {schema.name!r}: {len(event_times)} event times for {n} keys"
            )
    rows, offsets = _codec.encode_rows(schema.layout, codec_columns, n, event_times)
    written = [f.name for f, c in zip(schema.features, codec_columns, strict=True) if c is not None]
    features = [] if len(written) == len(schema.features) else written
    return EncodedRows(keys, rows, offsets, features)


def _feature_index(schema: TableSchema, name: str) -> int:
    try:
        return schema.index_of(name)
    except UnknownFeature as exc:
        raise UnknownFeature(f"column {name!r}: {exc}") from None


def _columns_of(data: Any, table: str) -> dict[str, Any]:
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return {name: data.column(name) for name in data.column_names}
    if isinstance(data, dict):
        return dict(data)
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a pandas DataFrame
        return {str(c): data[c].to_numpy() for c in data.columns}
    if isinstance(data, list):
        if not all(isinstance(row, dict) for row in data):
            raise InvalidArgument(f"table {table!r}: a list of rows must hold dicts")
        names: dict[str, None] = {}
        for row in data:
            names.update(dict.fromkeys(row))
        return {name: [row.get(name) for row in data] for name in names}
    raise InvalidArgument(
        f"table {table!r}: cannot write a {type(data).__name__}; pass a dict of columns, "
        "a pyarrow.Table or RecordBatch, a pandas DataFrame or a list of row dicts"
    )


def _family_ok(source: pa.DataType, dtype: DType) -> bool:
    t = pa.types
    if t.is_null(source):
        return True
    name = dtype.name
    if name == "bool":
        return t.is_boolean(source)
    if name in ("int32", "int64"):
        return t.is_integer(source) or t.is_floating(source)
    if name in ("float32", "float64"):
        return t.is_integer(source) or t.is_floating(source)
    if name == "string":
        return t.is_string(source) or t.is_large_string(source) or t.is_dictionary(source)
    if name == "bytes":
        return t.is_binary(source) or t.is_large_binary(source) or t.is_string(source)
    if t.is_list(source) or t.is_large_list(source) or t.is_fixed_size_list(source):
        child = source.value_type
        if name == "int64[]":
            return t.is_integer(child) or t.is_null(child)
        return t.is_integer(child) or t.is_floating(child) or t.is_null(child)
    return False


def to_arrow_column(values: Any, dtype: DType, table: str, column: str) -> pa.Array:
    """One column as an Arrow array of the feature's type; InvalidArgument names the bad row."""
    target = dtype.arrow_type
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if dtype.kind != _codec.KIND_FLOAT32_VECTOR:
            raise InvalidArgument(
                f"table {table!r}, column {column!r} ({dtype}): a 2-D array of shape "
                f"{values.shape} for a scalar feature"
            )
        if values.shape[1] != dtype.dim:
            raise InvalidArgument(
                f"table {table!r}, column {column!r} ({dtype}): embeddings of length "
                f"{values.shape[1]}, expected {dtype.dim}"
            )
        if values.dtype.kind not in "fiu":
            raise InvalidArgument(
                f"table {table!r}, column {column!r} ({dtype}): an array of {values.dtype}"
            )
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel())
        return pa.FixedSizeListArray.from_arrays(flat, dtype.dim)
    try:
        arr = values if isinstance(values, pa.Array) else pa.array(values)
        if arr.type == target:
            return arr
        if not _family_ok(arr.type, dtype):
            raise TypeError(arr.type)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        return arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
        pass
    _raise_first_bad_row(values, dtype, table, column)
    raise AssertionError("unreachable")  # _raise_first_bad_row always raises


def _raise_first_bad_row(values: Any, dtype: DType, table: str, column: str) -> None:
    items = values.to_pylist() if isinstance(values, pa.Array) else list(values)
    where = f"table {table!r}, column {column!r} ({dtype})"
    for row, value in enumerate(items):
        if value is None:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if dtype.kind == _codec.KIND_FLOAT32_VECTOR:
            try:
                length = len(value)
            except TypeError:
                length = None
            if length is not None and length != dtype.dim:
                raise InvalidArgument(
                    f"{where}, row {row}: an embedding of length {length}, expected {dtype.dim}"
                )
        try:
            arr = pa.array([value])
            if not _family_ok(arr.type, dtype):
                raise TypeError
            arr.cast(dtype.arrow_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
            shown = repr(value)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            raise InvalidArgument(
                f"{where}, row {row}: {shown} ({type(value).__name__}) is not a valid {dtype}"
            ) from None
    raise InvalidArgument(f"{where}: the values cannot be converted to {dtype}")


def _validity(arr: pa.Array) -> np.ndarray | None:
    if arr.null_count == 0:
        return None
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=np.uint8)


def codec_column(arr: pa.Array, dtype: DType, table: str, column: str) -> tuple:
    """The buffers the codec reads for one Arrow column of ``dtype``."""
    valid = _validity(arr)
    kind = dtype.kind
    if kind <= _codec.KIND_FLOAT64:
        filled = (
            pc.fill_null(arr, False if kind == _codec.KIND_BOOL else 0)
            if valid is not None
            else arr
        )
        values = np.ascontiguousarray(
            filled.to_numpy(zero_copy_only=False), dtype=dtype.numpy_dtype
        )
        return values, valid
    if kind == _codec.KIND_FLOAT32_VECTOR:
        n = len(arr)
        child = arr.values.slice(arr.offset * dtype.dim, n * dtype.dim)
        if child.null_count:
            # A null value's elements are null too when Arrow casts a null to a list
            # (``[None]``): only a null inside a valid value is an error.
            nulls = np.asarray(child.is_null().to_numpy(zero_copy_only=False))
            inside = nulls.reshape(n, dtype.dim).any(axis=1)
            if valid is None or (inside & valid.astype(bool)).any():
                _raise_null_element(arr, table, column, dtype)
            child = pc.fill_null(child, 0.0)
        values = child.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        values = np.ascontiguousarray(values.reshape(n, dtype.dim))
        if dtype.storage:
            _check_quantizable(values, valid, dtype, table, column)
        return values, valid
    if kind == _codec.KIND_INT64_LIST:
        arr = arr.cast(pa.large_list(pa.int64()))
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
            arr.offset : arr.offset + len(arr) + 1
        ]
        child = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        if child.null_count:
            _raise_null_element(arr, table, column, dtype)
        data = np.ascontiguousarray(child.to_numpy(zero_copy_only=False), dtype="<i8").view(
            np.uint8
        )
        return (offsets - offsets[0]) * 8, data, valid
    arr = arr.cast(pa.large_string() if kind == _codec.KIND_STRING else pa.large_binary())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.empty(0, np.uint8)
    base = int(offsets[0])
    return offsets - base, data[base : int(offsets[-1])], valid


def _check_quantizable(
    values: np.ndarray, valid: np.ndarray | None, dtype: DType, table: str, column: str
) -> None:
    """Refuse what lossy storage cannot hold, naming the first row (the codec would
    refuse it too, without the table's name): for float16 a finite value of magnitude
    >= 65520 (it would become inf), for int8 NaN and inf (no scale holds them)."""
    finite = np.isfinite(values)
    if dtype.storage == "float16":
        bad = finite & (np.abs(values) >= _FLOAT16_OVERFLOW)
        why = "beyond float16's range (|x| < 65520); store it as float32[N] or scale it"
    else:
        bad = ~finite
        why = "not finite; int8 storage holds finite values only (a null value is fine)"
    rows = bad.any(axis=1)
    if valid is not None:
        rows &= valid.astype(bool)
    if not rows.any():
        return
    row = int(np.flatnonzero(rows)[0])
    element = int(np.flatnonzero(bad[row])[0])
    raise InvalidArgument(
        f"table {table!r}, column {column!r} ({dtype}), row {row}: element {element} is "
        f"{float(values[row, element])!r}, {why}"
    )


def _raise_null_element(arr: pa.Array, table: str, column: str, dtype: DType) -> None:
    for row, value in enumerate(arr.to_pylist()):
        if value is not None and any(v is None for v in value):
            raise InvalidArgument(
                f"table {table!r}, column {column!r} ({dtype}), row {row}: a null element "
                "inside the value; elements cannot be null (the whole value can)"
            )
    raise InvalidArgument(f"table {table!r}, column {column!r} ({dtype}): a null element")
