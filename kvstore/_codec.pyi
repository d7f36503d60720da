"""Type stub for the compiled row codec (ext/codec.pyx), see docs/row-format.md."""

from collections.abc import Callable, Iterable
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

FORMAT_VERSION: int
HEADER_SIZE: int
DELTA_FORMAT_VERSION: int
NO_DELETE: int
"""INT64_MIN: the deleted_at of a key never deleted, the snapshot time of a read without a
version."""

KIND_BOOL: int
KIND_INT32: int
KIND_INT64: int
KIND_FLOAT32: int
KIND_FLOAT64: int
KIND_FLOAT32_VECTOR: int
KIND_STRING: int
KIND_BYTES: int
KIND_INT64_LIST: int
KIND_FLOAT16_VECTOR: int
"""A float32[N] stored as N IEEE halves; encoded from and decoded to float32."""
KIND_INT8_VECTOR: int
"""A float32[N] stored as a float32 scale and N int8 codes; encoded from and decoded to float32."""

class CorruptRow(ValueError):
    """A stored row that does not follow the row format; ``index`` is its position."""

    index: int
    reason: str

    def __init__(self, index: int, reason: str) -> None: ...

class SchemaMismatch(ValueError):
    """A row written with another schema id than the layout's; ``index`` is its position.

    ``expected``, when given, is the layout's schema id (it only makes the message clearer).
    """

    index: int
    schema_id: int
    expected: int | None

    def __init__(self, index: int, schema_id: int, expected: int | None = None) -> None: ...

@disjoint_base
class Layout:
    """The byte layout of one table schema: where each feature sits in a row.

    Immutable; sizes and offsets in bytes, ``fixed_offsets`` from the start of the row.
    """

    def __init__(self, schema_id: int, kinds: Iterable[int], dims: Iterable[int]) -> None: ...
    @property
    def schema_id(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    @property
    def kinds(self) -> list[int]: ...
    @property
    def dims(self) -> list[int]: ...
    @property
    def widths(self) -> list[int]: ...
    @property
    def fixed_offsets(self) -> list[int]: ...
    @property
    def var_index(self) -> list[int]: ...
    @property
    def null_bitmap_size(self) -> int: ...
    @property
    def fixed_size(self) -> int: ...
    @property
    def n_var(self) -> int: ...
    @property
    def min_row_size(self) -> int: ...

# Only in the stub: the forms a column takes in encode_rows and decode.
_FixedColumn = tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]
_VarColumn = tuple[npt.NDArray[np.int64], Any, npt.NDArray[np.uint8]]

def encode_rows(
    layout: Layout,
    columns: list[_FixedColumn | _VarColumn | None],
    n_rows: int,
    event_times: npt.NDArray[np.int64],
) -> tuple[bytes, npt.NDArray[np.int64]]: ...

# The node's side of a write (the end of ext/encode.pxi; kvstore.server.writes).

def gather_rows(
    buf: Any,
    offsets: npt.NDArray[np.int64],
    positions: npt.NDArray[np.int32] | npt.NDArray[np.int64],
) -> tuple[bytes, npt.NDArray[np.int64]]:
    """The rows at ``positions`` of a block (row i at ``buf[offsets[i] : offsets[i +
    1]]``) back to back, and their k + 1 byte offsets; ValueError for a position or
    row out of range."""

def row_event_times(buf: Any, offsets: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The header event time (µs) of each row of a block; ValueError for a row outside
    the buffer or shorter than the header."""

def key_repeats(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int32] | None:
    """None when no int64 key repeats, else for each position how many times its key
    came before it."""

@disjoint_base
class Projection:
    """The features a decode fills, in order, checked once (repeats allowed)."""

    # Cython's __cinit__ takes the arguments: at run time __new__ does, not __init__.
    def __new__(cls, layout: Layout, projection: Iterable[int]) -> Self: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def features(self) -> tuple[int, ...]: ...
    @property
    def masked_columns(self) -> tuple[int, ...]: ...
    @property
    def var_columns(self) -> tuple[int, ...]: ...
    def __len__(self) -> int: ...

@disjoint_base
class Decoded:
    """n rows decoded into column blocks; columns are views read out on demand."""

    @property
    def projection(self) -> Projection: ...
    @property
    def n(self) -> int: ...
    @property
    def found(self) -> npt.NDArray[np.bool_]: ...
    @property
    def event_times(self) -> npt.NDArray[np.int64]: ...
    @property
    def complete(self) -> list[bool]: ...
    def values(self, k: int) -> npt.NDArray[Any]: ...
    def valid(self, k: int) -> npt.NDArray[np.uint8]: ...
    def column(self, k: int) -> _FixedColumn | _VarColumn: ...
    def values_dict(self, names: list[str]) -> dict[str, npt.NDArray[Any] | None]: ...
    def masked(self, k: int) -> np.ma.MaskedArray[Any, Any]: ...
    def numpy_dict(self, names: list[str]) -> dict[str, Any]: ...
    def objects(self, k: int) -> npt.NDArray[np.object_]: ...
    def pylist(self, k: int) -> list[Any]: ...
    def pylists(self) -> list[list[Any]]: ...
    def arrow_buffers(
        self, k: int
    ) -> tuple[bytes | None, npt.NDArray[np.int32] | None, npt.NDArray[Any] | bytes]: ...

def decode(
    projection: Projection,
    buf: Any,
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
) -> Decoded: ...
def decode_columns(
    layout: Layout,
    projection: list[int],
    buf: Any,
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
) -> tuple[list[_FixedColumn | _VarColumn], npt.NDArray[np.int64]]: ...
def rows_of(
    names: list[str], columns: list[list[Any]], found: Any
) -> list[dict[str, Any] | None]: ...
def check_rows(
    layout: Layout, buf: Any, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
) -> tuple[int, str] | None: ...
def delta_apply(
    layout: Layout,
    old_rows: list[bytes | None],
    new_buf: Any,
    new_offsets: npt.NDArray[np.int64],
    present: npt.NDArray[np.uint8] | npt.NDArray[np.bool_],
) -> list[bytes]:
    """Applies updates to the keys' delta rows; per feature the newest event time wins.

    Update i is the format-1 row ``new_buf[new_offsets[i] : new_offsets[i + 1]]`` (byte
    offsets, n + 1 of them), its event time (µs) the update's; ``present[f]`` is nonzero
    when the updates set feature f. ``old_rows[i]``: the key's stored delta row or None;
    keys are distinct within a call. On equal times the later-applied update wins (a
    redelivery is a no-op); an update no newer than the key's delete is ignored.
    Returns the new delta rows. Raises CorruptRow/SchemaMismatch for a stored row,
    ValueError for a bad update.
    """

def delta_delete(
    layout: Layout, old_rows: list[bytes | None], times: npt.NDArray[np.int64]
) -> list[bytes]:
    """Tombstones: key i deleted at ``times[i]`` (µs since the epoch); every feature no
    newer than the delete leaves its delta row. Returns the new delta rows."""

def overlay(
    layout: Layout,
    base_rows: list[bytes | None],
    delta_rows: list[bytes | None],
    snapshot_time: int,
    now_us: int,
    ttl_us: npt.NDArray[np.int64] | None = None,
    valid_us: npt.NDArray[np.int64] | None = None,
    valid_at: int = 0,
) -> list[bytes | None]:
    """What a read returns per key: the delta over the base row of the version read.

    ``snapshot_time``: the version's snapshot time in µs (NO_DELETE without a version);
    delta features and deletes no newer than it are superseded by the version.
    ``ttl_us``: None or one TTL per feature in µs (0 = none), against ``now_us`` (µs).
    Returns format-1 rows, None for a missing key, or the base row object itself when
    the read changes nothing in it. Raises CorruptRow ("base row: ..." / "delta row:
    ...") or SchemaMismatch naming the key's index. ``valid_us``: None, or 2n int64
    that receive each row's window (µs, inclusive; ``[2 (valid_at + i)]`` from, the
    next until) in which a read at another ``now_us`` answers the same.
    """

def overlay_join(
    layout: Layout,
    fetched: list[tuple[list[bytes | None], list[bytes | None]]],
    snapshot_time: int,
    now_us: int,
    ttl_us: npt.NDArray[np.int64] | None = None,
) -> tuple[bytes, npt.NDArray[np.int32]]:
    """``join_values`` of ``overlay`` of each (delta rows, base rows) group, in one pass:
    (block, int32 lengths, -1 = missing). A combined row is written into the block, never
    a bytes object of its own. Errors as ``overlay``'s, indexed across the groups."""

def delta_compact(
    layout: Layout, rows: list[bytes] | list[bytes | None], snapshot_time: int
) -> list[bytes | None]:
    """Drops from delta rows what a current version with ``snapshot_time`` (µs) supersedes.

    Per row: the same object when nothing changes, a smaller delta row, or None when
    nothing is left (the key's delta entry can go). Reads of that version do not change.
    """

def delta_merge_rows(
    layout: Layout, stored_rows: list[bytes | None], incoming_rows: list[bytes]
) -> list[bytes]:
    """Merges another copy's delta rows of the same keys into this copy's (None: none
    here): per feature the newest event time wins (equal: the incoming one), the newer
    delete holds. Converges whatever the order and however often a row is merged."""

def delta_info(layout: Layout, row: bytes) -> tuple[int, int, dict[int, int]]:
    """(event time, deleted_at, {feature index: event time}) of a delta row, all in µs."""

# A delta shard's rows in memory (ext/delta_rows.pxi; kvstore.storage.delta_memory).

@disjoint_base
class DeltaRows:
    """Stored key -> stored value of one delta shard: a C hash table, 8-byte keys inline."""

    def __len__(self) -> int: ...
    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""
    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys``, None where absent: a MultiGet's answer."""
    def apply(
        self, puts: list[tuple[bytes, bytes]], deletes: Iterable[bytes], overhead: int
    ) -> int:
        """Puts in order, then deletes (as a WriteBatch); the change in counted bytes
        (values' lengths plus ``overhead`` bytes a key)."""
    def values(self) -> list[bytes]: ...
    def items(self) -> list[tuple[bytes, bytes]]: ...

def encode_int_keys(keys: npt.NDArray[np.int64]) -> list[bytes]: ...
def encode_str_keys(buf: Any, offsets: npt.NDArray[np.int64]) -> list[bytes]: ...
def shard_ids_int(keys: npt.NDArray[np.int64], n_shards: int) -> npt.NDArray[np.int32]: ...
def shard_ids_str(
    buf: Any, offsets: npt.NDArray[np.int64], n_shards: int
) -> npt.NDArray[np.int32]: ...
def xxh3_64(data: bytes) -> int: ...
def join_values(values: list[bytes | None]) -> tuple[bytes, npt.NDArray[np.int32]]: ...
def group_int_keys(
    keys: npt.NDArray[np.int64], n_shards: int
) -> tuple[npt.NDArray[np.int32], list[tuple[int, list[bytes]]]]:
    """int64 keys grouped by shard in one pass: (order, [(shard, stored keys)])."""
    ...

def group_by_shard(
    shard_ids: npt.NDArray[np.int32], n_shards: int
) -> tuple[npt.NDArray[np.int32], list[int]]: ...
def response_layout(
    n: int, parts: list[tuple[bytes, bytes, npt.NDArray[np.int64] | None, int]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def split_rows(buf: Any, offsets: npt.NDArray[np.int64]) -> list[bytes]: ...

# The hot-row cache (ext/hot_rows.pxi; kvstore.server.hot_rows).

HOT_ENTRY_BYTES: int
HOT_COLD_RATIO: int
HOT_WINDOW_KEYS: int

@disjoint_base
class HotTable:
    """What the fast read path needs to answer a table's requests from the cache."""

    @property
    def table(self) -> Any: ...
    @property
    def version(self) -> int: ...
    @property
    def prefix(self) -> bytes: ...
    def __init__(
        self,
        table: Any,
        entry: Any,
        version: int,
        prefix: bytes,
        schema_id: int,
        int_keys: bool,
        feature_names: Iterable[str],
        stats: Any,
        max_keys: int,
    ) -> None: ...

@disjoint_base
class ReadTable:
    """What the fast read path needs to answer a table's gets from its shards in C
    (``fetch``: what reads a get of ``parallel_keys`` keys or more, on several threads)."""

    @property
    def table(self) -> Any: ...
    @property
    def version(self) -> int: ...
    def __init__(
        self,
        table: Any,
        entry: Any,
        schema: Any,
        version: int,
        base: list[Any] | None,
        delta: list[Any],
        snapshot_time: int,
        layout: Layout,
        ttl_us: npt.NDArray[np.int64] | None,
        schema_id: int,
        feature_names: Iterable[str],
        stats: Any,
        max_keys: int,
        fetch: Callable[
            [list[tuple[int, list[bytes]]], list[Any], list[Any] | None, int],
            list[tuple[list[Any], list[Any]]],
        ]
        | None = None,
        parallel_keys: int = ...,
    ) -> None: ...
    def holds(self, tables: dict[str, Any]) -> bool:
        """Whether this is still what ``tables`` (the node's, by name) reads by default."""

def answer_read(
    published: dict[str, ReadTable],
    body: bytes,
    request_id: int,
    tables: dict[str, Any],
    offset: int = 0,
) -> bytes | None:
    """The fast read path's response frame read from the shards in C, or None (full path)."""

def unfilled_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new bytes object of ``size`` bytes, not yet filled, and a writable view of it."""

@disjoint_base
class AnswerReader:
    """The receiving half of an AsyncClient connection, in C: answers split out of
    ``buffer`` and handed to the futures in ``waiting`` by request id."""

    buffer: bytearray
    view: memoryview
    start: int
    have: int
    need: int
    waiting: dict[int, tuple[Any, float, float]]
    @property
    def receive_buffer(self) -> int: ...
    @property
    def min_read(self) -> int: ...
    @property
    def largest_idle(self) -> int: ...
    def __init__(self, receive_buffer: int, min_read: int, largest_idle: int) -> None: ...
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def compact(self, need: int) -> None: ...

def take_answer(fd: int, buffer: Any, request_id: int) -> tuple[int, bytes] | int:
    """One read of socket ``fd`` into ``buffer`` without waiting: the answer to
    ``request_id`` as (status, body) when the read is that whole frame alone; else the
    bytes read (0: closed by the node, -1: nothing yet)."""

def get_request(prefix: bytes, keys: npt.NDArray[np.int64], version: int) -> bytes:
    """``prefix`` plus the serialized GetRequest fields of int64 ``keys`` and ``version``."""

def decode_answer(
    projection: Projection, body: bytes, n: int
) -> tuple[int, int, Decoded | None] | None:
    """(schema_id, version, Decoded or None for another schema) of a GetResponse body
    read in C; None for a body it leaves to protobuf."""

def answer_request(
    published: dict[str, ReadTable], data: bytes, tables: dict[str, Any], max_request_bytes: int
) -> bytes | None:
    """``answer_read`` of ``data`` when it is exactly one whole request frame, else None."""

@disjoint_base
class HotRows:
    """Answers of reads by (prefix, stored key), LRU, at most ``capacity`` bytes; a
    count per hash bucket makes most misses free, a doorkeeper admits a key on its
    second miss."""

    @property
    def capacity(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def discarded(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def cold(self) -> bool: ...
    def use(self) -> bool:
        """Whether a read should go through the cache (always unless ``cold``; then 1 in 16)."""
    @property
    def published(self) -> dict[str, HotTable]: ...
    def __init__(self, capacity: int) -> None: ...
    def __len__(self) -> int: ...
    def lookup_groups(
        self, prefix: bytes, groups: list[tuple[int, list[bytes]]], now_us: int
    ) -> tuple[list[bytes | None], list[tuple[int, list[bytes]]], list[int]]:
        """(rows, missed, positions): each key's cached row in group order, the (shard,
        keys not cached) of each group with any, and where those go in rows."""
    def store_groups(
        self,
        prefix: bytes,
        missed: list[tuple[int, list[bytes]]],
        answers: list[bytes | None],
        valid_us: npt.NDArray[np.int64],
        rows: list[bytes | None],
        positions: list[int],
        admit: bool = False,
    ) -> None:
        """``lookup_groups``' misses answered: ``answers[j]`` put in ``rows[positions[j]]``
        and cached in its window; ``admit``: only keys the doorkeeper saw miss before."""
    def discard(
        self, prefixes: list[bytes], puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes]
    ) -> None:
        """Forget a delta write's keys under every prefix."""
    def discard_prefixes(self, prefixes: set[bytes]) -> None:
        """Forget every entry under the prefixes."""
    def answer_frame(
        self, body: bytes, request_id: int, tables: dict[str, Any], offset: int = 0
    ) -> bytes | None:
        """The fast read path's response frame from the cache, or None (full path)."""
