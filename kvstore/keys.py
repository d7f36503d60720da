"""A batch of keys, packed: how keys travel, get encoded for RocksDB and get routed to shards.

Keys never become one protobuf message each: an int64 batch is one little-endian
array, a string batch is its UTF-8 bytes back to back plus offsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from kvstore import _codec
from kvstore.errors import InvalidArgument
from kvstore.schema import MAX_STRING_KEY_BYTES
from kvstore.v1 import feature_store_pb2 as pb

__all__ = ["KeyBatch"]


class KeyBatch:
    """``count`` keys of one type: ``ints`` (int64 array) or ``utf8`` + ``offsets`` (int64)."""

    __slots__ = ("count", "ints", "key_type", "offsets", "utf8")

    def __init__(
        self,
        key_type: str,
        ints: np.ndarray | None = None,
        utf8: bytes | None = None,
        offsets: np.ndarray | None = None,
    ) -> None:
        self.key_type = key_type
        self.ints = ints
        self.utf8 = utf8
        self.offsets = offsets
        self.count = len(ints) if ints is not None else len(offsets) - 1  # type: ignore[arg-type]

    # -- building (client side) ------------------------------------------------------

    @classmethod
    def from_values(cls, key_type: str, keys: Any, table: str, column: str = "key") -> KeyBatch:
        """Check and pack user keys (a list, NumPy array or Arrow array) for ``table``.

        InvalidArgument names the row and column of a null or wrongly typed key.
        """
        if isinstance(keys, (pa.ChunkedArray, pa.Array)):
            arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        elif isinstance(keys, np.ndarray) and keys.dtype.kind in "iu" and key_type == "int64":
            if keys.ndim != 1:
                raise InvalidArgument(f"table {table!r}: keys must be one-dimensional")
            if keys.dtype.kind == "u" and len(keys) and keys.max() > np.iinfo(np.int64).max:
                row = int(np.argmax(keys > np.iinfo(np.int64).max))
                raise InvalidArgument(
                    f"table {table!r}, column {column!r}, row {row}: key {keys[row]} "
                    "does not fit in int64"
                )
            return cls("int64", ints=np.ascontiguousarray(keys, dtype=np.int64))
        else:
            if isinstance(keys, (str, bytes, int)):
                raise InvalidArgument(f"table {table!r}: keys must be a list of keys, not one key")
            if key_type == "int64" and type(keys) is list and all(type(k) is int for k in keys):
                # Plain Python ints, the common call: NumPy packs them without Arrow's
                # conversion machinery (several times cheaper for a few keys).
                try:
                    return cls("int64", ints=np.array(keys, dtype=np.int64))
                except OverflowError:
                    pass  # the Arrow path below names the key that does not fit
            arr = None
            seq = keys if isinstance(keys, Sequence) else list(keys)
        if arr is None:
            arr = _to_arrow_keys(seq, key_type, table, column)
        if arr.null_count:
            row = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise InvalidArgument(f"table {table!r}, column {column!r}, row {row}: the key is null")
        if key_type == "int64":
            if not pa.types.is_integer(arr.type):
                raise InvalidArgument(
                    f"table {table!r}, column {column!r}: keys are {arr.type}, the table's key "
                    "type is int64"
                )
            try:
                arr = arr.cast(pa.int64())
            except pa.ArrowInvalid as exc:
                raise InvalidArgument(f"table {table!r}, column {column!r}: {exc}") from None
            return cls("int64", ints=np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)))
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise InvalidArgument(
                f"table {table!r}, column {column!r}: keys are {arr.type}, the table's key "
                "type is string"
            )
        arr = arr.cast(pa.large_string())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
            arr.offset : arr.offset + len(arr) + 1
        ]
        data = arr.buffers()[2]
        base = int(offsets[0]) if len(offsets) else 0
        offsets = offsets - base
        sizes = np.diff(offsets)
        if len(sizes) and sizes.max() > MAX_STRING_KEY_BYTES:
            row = int(np.argmax(sizes > MAX_STRING_KEY_BYTES))
            raise InvalidArgument(
                f"table {table!r}, column {column!r}, row {row}: key of {sizes[row]} bytes, "
                f"at most {MAX_STRING_KEY_BYTES}"
            )
        utf8 = data.to_pybytes()[base : base + int(offsets[-1])] if data is not None else b""
        return cls("string", utf8=utf8, offsets=np.ascontiguousarray(offsets))

    def to_proto(self) -> pb.Keys:
        msg = pb.Keys()
        self.fill_proto(msg)
        return msg

    def fill_proto(self, msg: pb.Keys) -> None:
        """Set the fields of an empty ``Keys`` message (one inside another, say)."""
        msg.count = self.count
        if self.ints is not None:
            msg.int64_le = self.ints.astype("<i8", copy=False).tobytes()
        else:
            msg.utf8 = self.utf8  # type: ignore[assignment]
            msg.utf8_offsets = self.offsets.astype("<i8", copy=False).tobytes()  # type: ignore[union-attr]

    # -- reading (node side) ---------------------------------------------------------

    @classmethod
    def from_proto(cls, msg: pb.Keys, key_type: str, table: str) -> KeyBatch:
        """Unpack the keys of a request for ``table``; InvalidArgument if they do not fit it."""
        packed = msg.int64_le  # each read of a bytes field copies it: read it once
        if packed:
            if key_type != "int64":
                raise InvalidArgument(
                    f"table {table!r} has string keys; the request sent int64 keys"
                )
            if len(packed) != 8 * msg.count:
                raise InvalidArgument(
                    f"table {table!r}: {len(packed)} bytes of int64 keys for {msg.count} keys"
                )
            return cls("int64", ints=np.frombuffer(packed, dtype="<i8"))
        if msg.utf8_offsets:
            if key_type != "string":
                raise InvalidArgument(
                    f"table {table!r} has int64 keys; the request sent string keys"
                )
            offsets = np.frombuffer(msg.utf8_offsets, dtype="<i8")
            if (
                len(offsets) != msg.count + 1
                or offsets[0] != 0
                or offsets[-1] != len(msg.utf8)
                or (np.diff(offsets) < 0).any()
            ):
                raise InvalidArgument(f"table {table!r}: malformed string key offsets")
            sizes = np.diff(offsets)
            if len(sizes) and sizes.max() > MAX_STRING_KEY_BYTES:
                row = int(np.argmax(sizes > MAX_STRING_KEY_BYTES))
                raise InvalidArgument(
                    f"table {table!r}, key {row}: {sizes[row]} bytes, at most "
                    f"{MAX_STRING_KEY_BYTES}"
                )
            return cls("string", utf8=msg.utf8, offsets=offsets)
        if msg.count:
            raise InvalidArgument(f"table {table!r}: {msg.count} keys announced, none sent")
        return cls(key_type, ints=np.empty(0, np.int64))

    # -- shared ----------------------------------------------------------------------

    def shard_ids(self, shards: int) -> np.ndarray:
        """The shard of every key (int32), the same function on client and node."""
        if self.ints is not None:
            return _codec.shard_ids_int(self.ints, shards)
        assert self.offsets is not None  # no ints: a string batch
        return _codec.shard_ids_str(self.utf8, self.offsets, shards)

    def shard_groups(self, shards: int) -> tuple[np.ndarray, list[tuple[int, list[bytes]]]]:
        """(order, groups): the keys' stored bytes grouped by shard, one (shard, keys)
        per shard that has keys, in shard order; ``order`` their positions in the batch
        (int32), the stable sort by shard."""
        if self.ints is not None:
            return _codec.group_int_keys(self.ints, shards)
        order, counts = _codec.group_by_shard(self.shard_ids(shards), shards)
        encoded = self.encoded(order)
        groups = []
        pos = 0
        for s, count in enumerate(counts):
            if count:
                groups.append((s, encoded[pos : pos + count]))
                pos += count
        return order, groups

    def encoded(self, positions: np.ndarray | None = None) -> list[bytes]:
        """The RocksDB key bytes of all keys, or of those at ``positions``."""
        if self.ints is not None:
            ints = self.ints if positions is None else self.ints[positions]
            return _codec.encode_int_keys(np.ascontiguousarray(ints))
        assert self.offsets is not None  # no ints: a string batch
        keys = _codec.encode_str_keys(self.utf8, self.offsets)
        if positions is None:
            return keys
        return [keys[i] for i in positions.tolist()]

    def take(self, positions: np.ndarray) -> KeyBatch:
        """The keys at ``positions`` (an int array), as a new batch."""
        if self.ints is not None:
            return KeyBatch("int64", ints=np.ascontiguousarray(self.ints[positions]))
        keys = self.encoded(positions)
        offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([len(k) for k in keys], out=offsets[1:])
        return KeyBatch("string", utf8=b"".join(keys), offsets=offsets)

    def describe(self, i: int) -> str:
        """Key ``i`` as a person reads it, for error messages."""
        if self.ints is not None:
            return str(int(self.ints[i]))
        raw = self.utf8[self.offsets[i] : self.offsets[i + 1]]  # type: ignore[index]
        return repr(raw.decode("utf-8", "replace"))

    def __len__(self) -> int:
        return self.count


def _to_arrow_keys(seq: Iterable, key_type: str, table: str, column: str) -> pa.Array:
    target = pa.int64() if key_type == "int64" else pa.string()
    try:
        return pa.array(seq, type=target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    # The slow path runs only to name the first bad key.
    for row, value in enumerate(seq):
        if value is None:
            raise InvalidArgument(f"table {table!r}, column {column!r}, row {row}: the key is null")
        ok = (
            isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            if key_type == "int64"
            else isinstance(value, str)
        )
        if ok and key_type == "int64" and not -(2**63) <= int(value) < 2**63:
            ok = False
        if not ok:
            raise InvalidArgument(
                f"table {table!r}, column {column!r}, row {row}: key {value!r} "
                f"({type(value).__name__}) is not a valid {key_type} key"
            )
    raise InvalidArgument(f"table {table!r}, column {column!r}: keys are not {key_type}")
