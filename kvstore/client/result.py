"""GetResult: the answer to a batch lookup, held as column buffers (no object per feature)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from kvstore import _codec
from kvstore.keys import KeyBatch
from kvstore.schema import DType, Feature

if TYPE_CHECKING:
    from kvstore.client.core import GetPlan

__all__ = ["GetResult"]


class GetResult:
    """Feature columns for a batch of keys, in request order.

    * ``found``: bool array, False where the key has no row (never an error).
    * ``version``: the table version that answered.
    * ``event_times``: int64 array, µs since the epoch of each row's last write
      (0 where missing).
    * ``to_numpy()``, ``to_arrow()``, ``to_pylist()``: the features, see each.
    """

    __slots__ = (
        "_decoded",
        "_features",
        "_keys",
        "_names",
        "event_times",
        "features",
        "found",
        "version",
    )

    def __init__(self, keys: KeyBatch, plan: GetPlan, decoded: _codec.Decoded, version: int):
        self._keys = keys
        self._features = plan.features
        self._decoded = decoded
        #: The plan's feature names, never changed; ``features`` is the caller's copy.
        self._names = plan.feature_names
        self.features = list(self._names)
        self.found = decoded.found
        self.event_times = decoded.event_times
        self.version = version

    def __len__(self) -> int:
        return len(self.found)

    def __repr__(self) -> str:
        return (
            f"GetResult({len(self)} keys, {int(self.found.sum())} found, "
            f"features={self.features}, version={self.version})"
        )

    def _index(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not among the requested features {self._names}") from None

    def valid(self, feature: str) -> np.ndarray:
        """Bool array: True where the key was found and ``feature`` is not null."""
        return self._decoded.valid(self._index(feature)).astype(bool)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The features as NumPy arrays, one row per requested key.

        Where a key is missing or a value is null: float32/float64 and float32[N]
        hold NaN; int32, int64 and bool are ``numpy.ma.MaskedArray`` with those rows
        masked; string, bytes and int64[] are object arrays holding None (one Python
        object per value: a str, bytes or read-only int64 array). docs/serving.md
        says what each conversion costs.

        Fixed-width columns are views of the result's decoded block, not copies: each
        call returns new array objects over the same memory, so changing one in place
        changes what later calls (and ``to_arrow``) see.
        """
        # One C call builds every column (Decoded.numpy_dict): a 1-key answer's cost is
        # then NumPy's array objects, not a Python loop over the features.
        return self._decoded.numpy_dict(self._names)

    def to_arrow(self) -> pa.Table:
        """A ``pyarrow.Table``: the ``key`` column, then the features; nulls where missing.

        Every column is built from the decoded buffers (no Python object per value):
        fixed-width columns share the result's memory, strings and lists are Arrow
        string and list arrays over the decoded data.
        """
        arrays = [self._keys_arrow()]
        names = ["key"]
        decoded = self._decoded
        n = len(self.found)
        for k, feature in enumerate(self._features):
            arrays.append(_arrow_column(feature, n, decoded.arrow_buffers(k)))
            names.append(feature.name)
        return pa.Table.from_arrays(arrays, names=names)

    def to_pylist(self) -> list[dict[str, Any] | None]:
        """One dict per key (``{"key": …, feature: value, …}``), None for a missing key.

        Values are Python objects (what ``to_arrow().to_pylist()`` gives: None where
        null, lists for float32[N] and int64[]), built column by column.
        """
        keys = self._keys
        key_column = keys.ints.tolist() if keys.ints is not None else self._keys_arrow().to_pylist()
        # Decoded.pylists builds every feature's list in one C call (no Python loop).
        columns = [key_column, *self._decoded.pylists()]
        return _codec.rows_of(["key", *self._names], columns, self.found)

    def _keys_arrow(self) -> pa.Array:
        keys = self._keys
        if keys.ints is not None:
            return pa.array(keys.ints)
        return pa.LargeStringArray.from_buffers(
            len(keys), pa.py_buffer(keys.offsets), pa.py_buffer(keys.utf8)
        ).cast(pa.string())


#: The Arrow type of each dtype, made once (DType.arrow_type builds list types anew).
_ARROW_TYPES: dict[DType, pa.DataType] = {}


def _arrow_column(feature: Feature, n: int, buffers: tuple) -> pa.Array:
    """Feature's column of n rows as an Arrow array over the decoded buffers
    (``Decoded.arrow_buffers``: validity bitmap or None, int32 offsets, values)."""
    dtype = feature.dtype
    arrow_type = _ARROW_TYPES.get(dtype)
    if arrow_type is None:
        arrow_type = _ARROW_TYPES[dtype] = dtype.arrow_type
    validity, offsets, values = buffers
    validity = None if validity is None else pa.py_buffer(validity)
    kind = dtype.kind
    if kind == _codec.KIND_FLOAT32_VECTOR:
        child = pa.Array.from_buffers(pa.float32(), n * dtype.dim, [None, pa.py_buffer(values)])
        return pa.Array.from_buffers(arrow_type, n, [validity], children=[child])
    if offsets is None:
        return pa.Array.from_buffers(arrow_type, n, [validity, pa.py_buffer(values)])
    if kind == _codec.KIND_INT64_LIST:
        child = pa.Array.from_buffers(pa.int64(), len(values) // 8, [None, pa.py_buffer(values)])
        return pa.Array.from_buffers(
            arrow_type, n, [validity, pa.py_buffer(offsets)], children=[child]
        )
    return pa.Array.from_buffers(
        arrow_type, n, [validity, pa.py_buffer(offsets), pa.py_buffer(values)]
    )
