"""Type stub for the compiled row codec (ext/codec.pyx), see docs/row-format.md."""

from typing import Any

import numpy as np
import numpy.typing as npt

FORMAT_VERSION: int
HEADER_SIZE: int

KIND_BOOL: int
KIND_INT32: int
KIND_INT64: int
KIND_FLOAT32: int
KIND_FLOAT64: int
KIND_FLOAT32_VECTOR: int
KIND_STRING: int
KIND_BYTES: int
KIND_INT64_LIST: int

class CorruptRow(ValueError):
    """A stored row that does not follow the row format; ``index`` is its position."""

    index: int
    reason: str

class SchemaMismatch(ValueError):
    """A row written with another schema id than the layout's; ``index`` is its position."""

    index: int
    schema_id: int

class Layout:
    """The byte layout of one table schema: where each feature sits in a row."""

    schema_id: int
    n_features: int
    kinds: list[int]
    dims: list[int]
    widths: list[int]
    fixed_offsets: list[int]
    var_index: list[int]
    null_bitmap_size: int
    fixed_size: int
    n_var: int
    min_row_size: int

    def __init__(self, schema_id: int, kinds: list[int], dims: list[int]) -> None: ...

FixedColumn = tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]
VarColumn = tuple[npt.NDArray[np.int64], Any, npt.NDArray[np.uint8]]

def encode_rows(
    layout: Layout,
    columns: list[FixedColumn | VarColumn | None],
    n_rows: int,
    event_times: npt.NDArray[np.int64],
) -> tuple[bytes, npt.NDArray[np.int64]]: ...
def decode_columns(
    layout: Layout,
    projection: list[int],
    buf: Any,
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
) -> tuple[list[FixedColumn | VarColumn], npt.NDArray[np.int64]]: ...
def check_rows(
    layout: Layout, buf: Any, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
) -> tuple[int, str] | None: ...
def merge_rows(
    layout: Layout,
    old_rows: list[bytes | None],
    new_buf: bytes,
    new_offsets: npt.NDArray[np.int64],
    present: npt.NDArray[np.uint8],
) -> list[bytes]: ...
def encode_int_keys(keys: npt.NDArray[np.int64]) -> list[bytes]: ...
def encode_str_keys(buf: Any, offsets: npt.NDArray[np.int64]) -> list[bytes]: ...
def shard_ids_int(keys: npt.NDArray[np.int64], n_shards: int) -> npt.NDArray[np.int32]: ...
def shard_ids_str(
    buf: Any, offsets: npt.NDArray[np.int64], n_shards: int
) -> npt.NDArray[np.int32]: ...
def xxh3_64(data: bytes) -> int: ...
def join_values(values: list[bytes | None]) -> tuple[bytes, npt.NDArray[np.int32]]: ...
def split_rows(buf: Any, offsets: npt.NDArray[np.int64]) -> list[bytes]: ...
