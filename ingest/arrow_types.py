"""Arrow types of bulk-load input → feature dtypes: what a column may be, and its conversion.

The same rules answer two questions: which dtype a column gets when ``load(...,
create=True)`` derives a table from the files, and whether a column of the files
fits a feature of an existing table. Conversion to the feature's Arrow type then
goes through ``kvstore.columns.to_arrow_column`` (the write path's), after the steps
only files need (timestamps, view types, embeddings stored as plain lists).

| Arrow type of the column                                   | feature dtype      |
| ---------------------------------------------------------- | ------------------ |
| bool                                                       | bool               |
| int8, int16, int32, uint8, uint16                          | int32              |
| int64, uint32, uint64 (values above 2**63 - 1 rejected)    | int64              |
| timestamp[any unit, any zone]                              | int64 (µs, UTC)    |
| float16, float32                                           | float32            |
| float64                                                    | float64            |
| string, large_string, string_view, dictionary<…, string>   | string             |
| binary, large_binary, binary_view, fixed_size_binary[n]    | bytes              |
| fixed_size_list<float16/32/64>[N]                          | float32[N]         |
| list / large_list / fixed_size_list<any integer>           | int64[]            |

An existing table also accepts: a wider or narrower integer column for an int32 or
int64 feature (every value must fit), integer and float columns for float32 and
float64 features, a string column for a bytes feature, and ``list<float>`` for a
float32[N] feature when every list holds exactly N values. A float32[N]:float16 or
float32[N]:int8 feature takes the same columns as float32[N] (a derived table never
gets one: lossy storage is declared, not guessed); the values are quantized by the
codec as the rows are encoded, in C, after ``kvstore.columns`` refuses what the
storage cannot hold (float16: |x| >= 65520; int8: NaN, inf), naming the row. A
column of Arrow's null type (all values null) fits any feature.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvstore import _codec
from kvstore.schema import DType

__all__ = [
    "MAX_EXAMPLES",
    "accepted_types",
    "dtype_for_create",
    "event_time_problem",
    "event_times_us",
    "feature_array",
    "key_problem",
    "key_type_for_create",
]

#: How many bad rows or keys an error message lists.
MAX_EXAMPLES = 5

t = pa.types

_INT32_SOURCES = (pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16())
_INT32_RANGE = (-(2**31), 2**31 - 1)
_INT64_RANGE = (-(2**63), 2**63 - 1)

# Locates a row of the batch for a message: "row 12 of the input (file a.parquet, row 2)".
RowNamer = Callable[[int], str]


def _is_stringish(typ: pa.DataType) -> bool:
    if t.is_dictionary(typ):
        return _is_stringish(typ.value_type)
    return t.is_string(typ) or t.is_large_string(typ) or t.is_string_view(typ)


def _is_binaryish(typ: pa.DataType) -> bool:
    return (
        t.is_binary(typ)
        or t.is_large_binary(typ)
        or t.is_binary_view(typ)
        or t.is_fixed_size_binary(typ)
    )


def _is_list(typ: pa.DataType) -> bool:
    return (
        t.is_list(typ)
        or t.is_large_list(typ)
        or t.is_fixed_size_list(typ)
        or t.is_list_view(typ)
        or t.is_large_list_view(typ)
    )


def dtype_for_create(typ: pa.DataType) -> str | None:
    """The feature dtype a column of Arrow type ``typ`` gets in a created table, or None."""
    if t.is_boolean(typ):
        return "bool"
    if typ in _INT32_SOURCES:
        return "int32"
    if t.is_integer(typ) or t.is_timestamp(typ):
        return "int64"
    if t.is_float16(typ) or t.is_float32(typ):
        return "float32"
    if t.is_float64(typ):
        return "float64"
    if _is_stringish(typ):
        return "string"
    if _is_binaryish(typ):
        return "bytes"
    if t.is_fixed_size_list(typ) and t.is_floating(typ.value_type):
        return f"float32[{typ.list_size}]"
    if _is_list(typ) and t.is_integer(typ.value_type):
        return "int64[]"
    return None


def key_type_for_create(typ: pa.DataType) -> str | None:
    """The key type of a created table whose key column has Arrow type ``typ``, or None."""
    if t.is_integer(typ):
        return "int64"
    if _is_stringish(typ):
        return "string"
    return None


def accepted_types(dtype: DType) -> str:
    """The Arrow types a column for ``dtype`` may have, as a person reads them."""
    name = dtype.name
    if name == "bool":
        return "bool"
    if name in ("int32", "int64"):
        return "an integer type" + (" or a timestamp" if name == "int64" else "")
    if name in ("float32", "float64"):
        return "a float or integer type"
    if name == "string":
        return "string, large_string or dictionary<string>"
    if name == "bytes":
        return "binary, large_binary, fixed_size_binary or string"
    if name == "int64[]":
        return "a list of integers"
    return f"fixed_size_list<float>[{dtype.dim}], or a list of floats holding {dtype.dim} each"


def fits(dtype: DType, typ: pa.DataType) -> bool:
    """True when a column of Arrow type ``typ`` can be loaded into a feature of ``dtype``."""
    if t.is_null(typ):
        return True
    name = dtype.name
    if name == "bool":
        return t.is_boolean(typ)
    if name == "int32":
        return t.is_integer(typ)
    if name == "int64":
        return t.is_integer(typ) or t.is_timestamp(typ)
    if name in ("float32", "float64"):
        return t.is_integer(typ) or t.is_floating(typ)
    if name == "string":
        return _is_stringish(typ)
    if name == "bytes":
        return _is_binaryish(typ) or _is_stringish(typ)
    if name == "int64[]":
        return _is_list(typ) and (t.is_integer(typ.value_type) or t.is_null(typ.value_type))
    # float32[N]
    if not _is_list(typ) or not (t.is_floating(typ.value_type) or t.is_null(typ.value_type)):
        return False
    return not t.is_fixed_size_list(typ) or typ.list_size == dtype.dim


def key_problem(key_type: str, typ: pa.DataType) -> str | None:
    """Why a key column of Arrow type ``typ`` cannot hold keys of ``key_type``, or None."""
    if key_type == "int64" and not t.is_integer(typ):
        return f"the table's keys are int64, the column is {typ} (expected an integer type)"
    if key_type == "string" and not _is_stringish(typ):
        return f"the table's keys are strings, the column is {typ} (expected string)"
    return None


def event_time_problem(typ: pa.DataType) -> str | None:
    """Why a column of Arrow type ``typ`` cannot be the event time, or None."""
    if t.is_integer(typ) or t.is_timestamp(typ) or t.is_null(typ):
        return None
    return f"it is {typ}; an event time is a timestamp or an integer of µs since the epoch"


def event_times_us(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """An event-time column as int64 µs since the epoch, and the mask of its nulls (or None)."""
    if t.is_timestamp(arr.type):
        arr = arr.cast(pa.timestamp("us", arr.type.tz), safe=False)
    if t.is_null(arr.type):
        return np.zeros(len(arr), np.int64), np.ones(len(arr), bool)
    nulls = None
    if arr.null_count:
        nulls = np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
        arr = pc.fill_null(arr, 0)
    return np.ascontiguousarray(arr.cast(pa.int64()).to_numpy(zero_copy_only=False)), nulls


def _first_rows(mask: np.ndarray, name: RowNamer) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(name(int(r)) for r in rows[:MAX_EXAMPLES])
    more = f" and {len(rows) - MAX_EXAMPLES} more" if len(rows) > MAX_EXAMPLES else ""
    return shown + more


def out_of_range(arr: pa.Array, lo: int, hi: int) -> np.ndarray | None:
    """Mask of the integer values outside [lo, hi], or None when all fit."""
    if not len(arr) or arr.null_count == len(arr):
        return None
    bounds = pc.min_max(arr)
    if bounds["min"].as_py() >= lo and bounds["max"].as_py() <= hi:
        return None
    values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
    if values.dtype == np.uint64:
        return values > np.uint64(hi)
    return (values < lo) | (values > hi)


def feature_array(arr: pa.Array, dtype: DType, where: str, name: RowNamer) -> pa.Array:
    """Bring a column the files hold into a type ``to_arrow_column`` converts for ``dtype``.

    Checks what only files can get wrong, row by row but vectorised: integers that
    do not fit, embeddings of the wrong length. ``where`` prefixes messages (table,
    column, dtype); ``name(i)`` locates row ``i`` of the batch in the input.
    Raises ValueError with the message; the caller turns it into a LoadError.
    """
    typ = arr.type
    if t.is_null(typ):
        return pa.nulls(len(arr), dtype.arrow_type)
    if t.is_dictionary(typ):
        arr = arr.dictionary_decode()
        typ = arr.type
    if t.is_timestamp(typ):
        arr = arr.cast(pa.timestamp("us", typ.tz), safe=False).cast(pa.int64())
    elif t.is_string_view(typ):
        arr = arr.cast(pa.large_string())
    elif t.is_binary_view(typ) or t.is_fixed_size_binary(typ):
        arr = arr.cast(pa.large_binary())
    elif t.is_float16(typ):
        arr = arr.cast(pa.float32())
    elif t.is_list_view(typ) or t.is_large_list_view(typ):
        arr = arr.cast(pa.large_list(typ.value_type))
    kind = dtype.kind
    if kind in (_codec.KIND_INT32, _codec.KIND_INT64) and t.is_integer(arr.type):
        lo, hi = _INT32_RANGE if kind == _codec.KIND_INT32 else _INT64_RANGE
        bad = out_of_range(arr, lo, hi)
        if bad is not None:
            raise ValueError(
                f"{where}: values that do not fit in {dtype} at {_first_rows(bad, name)}"
            )
    elif kind == _codec.KIND_FLOAT32_VECTOR:
        arr = _embedding(arr, dtype, where, name)
    elif kind == _codec.KIND_INT64_LIST and t.is_integer(arr.type.value_type):
        values = arr.flatten()
        if values.null_count:
            raise ValueError(f"{where}: a null element inside a list ({_null_element(arr, name)})")
        if pa.types.is_uint64(values.type):
            bad = out_of_range(values, *_INT64_RANGE)
            if bad is not None:
                raise ValueError(f"{where}: list elements that do not fit in int64")
    return arr


def _embedding(arr: pa.Array, dtype: DType, where: str, name: RowNamer) -> pa.Array:
    """A list column as fixed_size_list<float32>[N]; every non-null value must hold N floats."""
    typ = arr.type
    if not t.is_fixed_size_list(typ):
        lengths = pc.list_value_length(arr)
        bad = pc.and_kleene(pc.is_valid(lengths), pc.not_equal(lengths, dtype.dim))
        bad = np.asarray(pc.fill_null(bad, False).to_numpy(zero_copy_only=False))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{where}: embeddings of the wrong length at {_first_rows(bad, name)} "
                f"(the first holds {lengths[first].as_py()} values, expected {dtype.dim})"
            )
    if arr.null_count != len(arr) and arr.flatten().null_count:
        raise ValueError(
            f"{where}: a null element inside an embedding ({_null_element(arr, name)}); "
            "elements cannot be null, the whole value can"
        )
    if typ.value_type != pa.float32() or not t.is_fixed_size_list(typ):
        arr = arr.cast(pa.list_(pa.float32(), dtype.dim))
    return arr


def _null_element(arr: pa.Array, name: RowNamer) -> str:
    # Only on the error path: which rows hold a list with a null inside.
    parents = pc.list_parent_indices(arr)
    nulls = pc.is_null(pc.list_flatten(arr))
    rows = np.unique(pc.filter(parents, nulls).to_numpy(zero_copy_only=False))
    mask = np.zeros(len(arr), bool)
    mask[rows] = True
    return _first_rows(mask, name)
