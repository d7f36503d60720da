"""GetResult: the answer to a batch lookup, held as column buffers (no object per feature)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from kvstore import _codec
from kvstore.keys import KeyBatch
from kvstore.schema import Feature

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
        masked; string, bytes and int64[] are object arrays holding None (these build
        one Python object per value: prefer ``to_arrow()`` for them).

        Fixed-width columns are views of the result's decoded block, not copies: each
        call returns new array objects over the same memory, so changing one in place
        changes what later calls (and ``to_arrow``) see.
        """
        decoded = self._decoded
        names = self._names
        out = decoded.values_dict(names)  # float kinds are final: NaN where invalid
        projection = decoded.projection
        for k in projection.masked_columns:
            out[names[k]] = np.ma.MaskedArray(
                decoded.values(k), mask=~decoded.valid(k).view(np.bool_)
            )
        for k in projection.var_columns:
            column = self._arrow_column(self._features[k], decoded.column(k), decoded.complete[k])
            out[names[k]] = column.to_numpy(zero_copy_only=False)
        # values_dict's None entries are the var columns, each replaced just above.
        return out  # type: ignore[return-value]

    def to_arrow(self) -> pa.Table:
        """A ``pyarrow.Table``: the ``key`` column, then the features; nulls where missing."""
        arrays = [self._keys_arrow()]
        names = ["key"]
        decoded = self._decoded
        for k, feature in enumerate(self._features):
            arrays.append(self._arrow_column(feature, decoded.column(k), decoded.complete[k]))
            names.append(feature.name)
        return pa.Table.from_arrays(arrays, names=names)

    def to_pylist(self) -> list[dict[str, Any] | None]:
        """One dict per key (``{"key": …, feature: value, …}``), None for a missing key."""
        rows = self.to_arrow().to_pylist()
        return [
            row if found else None for row, found in zip(rows, self.found.tolist(), strict=True)
        ]

    def _keys_arrow(self) -> pa.Array:
        keys = self._keys
        if keys.ints is not None:
            return pa.array(keys.ints)
        return pa.LargeStringArray.from_buffers(
            len(keys), pa.py_buffer(keys.offsets), pa.py_buffer(keys.utf8)
        ).cast(pa.string())

    @staticmethod
    def _arrow_column(feature: Feature, column: tuple, complete: bool) -> pa.Array:
        kind = feature.dtype.kind
        valid = column[-1].astype(bool)
        mask = None if complete else pa.array(~valid)
        if kind <= _codec.KIND_FLOAT64:
            return pa.array(
                column[0], type=feature.dtype.arrow_type, mask=None if mask is None else ~valid
            )
        if kind == _codec.KIND_FLOAT32_VECTOR:
            return pa.FixedSizeListArray.from_arrays(
                pa.array(column[0].ravel()), feature.dtype.dim, mask=mask
            )
        offsets, data, _ = column
        n = len(valid)
        validity = None if mask is None else pa.array(valid).buffers()[1]
        if kind == _codec.KIND_INT64_LIST:
            values = pa.array(data.view("<i8"))
            arr = pa.LargeListArray.from_arrays(pa.array(offsets // 8), values, mask=mask)
            return arr.cast(pa.list_(pa.int64()))
        arrow_type = pa.large_string() if kind == _codec.KIND_STRING else pa.large_binary()
        arr = pa.Array.from_buffers(
            arrow_type, n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
        )
        return arr.cast(feature.dtype.arrow_type)
